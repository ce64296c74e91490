//! S's STUN service: requests from the main socket (handed over by the [`PathSocket`]) and
//! from the alternate socket meet one rate limiter and [`crate::stun::answer`], and the
//! answers leave from whichever socket that decides, from the address the request reached.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2ptun::path::{canonical, PathSocket, ReplySocket, StunPacket};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::stun::{answer, StunAddrs, Via};

/// The STUN responder on S's two sockets.
#[derive(Debug)]
pub struct StunServer {
    main: Arc<PathSocket>,
    main_rx: mpsc::Receiver<StunPacket>,
    alt: ReplySocket,
    addrs: StunAddrs,
    limiter: RateLimiter,
    metrics: Arc<Metrics>,
}

impl StunServer {
    /// A responder for the STUN that `main` diverts into `main_rx` and for everything
    /// arriving on `alt`, allowing `rate_per_ip` requests a second per source.
    pub fn new(
        main: Arc<PathSocket>,
        main_rx: mpsc::Receiver<StunPacket>,
        alt: ReplySocket,
        rate_per_ip: u32,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let addrs = StunAddrs {
            main: main.local()?,
            alt: alt.local_addr()?,
        };
        Ok(StunServer {
            main,
            main_rx,
            alt,
            addrs,
            limiter: RateLimiter::new(rate_per_ip),
            metrics,
        })
    }

    /// Answers until the main socket goes away.
    pub async fn run(mut self) {
        let mut buf = vec![0u8; ReplySocket::BUFFER];
        loop {
            tokio::select! {
                packet = self.main_rx.recv() => match packet {
                    Some(p) => self.handle(&p.data, p.from, p.to, Via::Main).await,
                    None => return,
                },
                received = self.alt.recv(&mut buf) => match received {
                    Ok(received) => {
                        for datagram in received.datagrams(&buf) {
                            self.handle(datagram, received.from, received.to, Via::Alt).await;
                        }
                    }
                    Err(e) => {
                        // Mostly ICMP errors for earlier answers; they concern one client.
                        tracing::debug!(error = %e, "alternate STUN socket receive error");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                },
            }
        }
    }

    /// Answers one datagram that came from `from` to S's address `dst` on socket `on`.
    async fn handle(&mut self, data: &[u8], from: SocketAddr, dst: Option<IpAddr>, on: Via) {
        // One limit per source over both sockets and both STUN generations; an IPv4 source
        // counts as itself whether it reached an IPv4 or a dual-stack socket.
        let from = canonical(from);
        if !self.limiter.allow(from.ip(), Instant::now()) {
            Metrics::inc(&self.metrics.stun_rate_limited_total);
            return;
        }
        let Some(reply) = answer(data, from, dst, on, &self.addrs) else {
            Metrics::inc(&self.metrics.stun_ignored_total);
            tracing::trace!(%from, ?dst, ?on, len = data.len(), "ignoring a datagram on a STUN socket");
            return;
        };
        let sent = match reply.via {
            Via::Main => {
                self.main
                    .send_from(&reply.bytes, reply.to, reply.src_ip)
                    .await
            }
            Via::Alt => {
                self.alt
                    .send_from(&reply.bytes, reply.to, reply.src_ip)
                    .await
            }
        };
        match sent {
            Ok(()) => Metrics::inc(&self.metrics.stun_answered_total),
            Err(e) => tracing::debug!(
                to = %reply.to,
                src_ip = ?reply.src_ip,
                error = %e,
                "STUN answer not sent"
            ),
        }
    }
}
