//! S's STUN service: requests from the main socket (handed over by the [`PathSocket`]) and
//! from the alternate socket meet one rate limiter and [`crate::stun::answer`], and the
//! answers leave from whichever socket that decides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2ptun::path::{PathSocket, StunPacket};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::stun::{answer, StunAddrs, Via};

/// The largest datagram read on the alternate socket; a Binding request S answers is far
/// smaller, so a longer one is cut short and then ignored as malformed.
const MAX_DATAGRAM: usize = 2048;

/// The STUN responder on S's two sockets.
#[derive(Debug)]
pub struct StunServer {
    main: Arc<PathSocket>,
    main_rx: mpsc::Receiver<StunPacket>,
    alt: UdpSocket,
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
        alt: UdpSocket,
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
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                packet = self.main_rx.recv() => match packet {
                    Some(packet) => self.handle(&packet.data, packet.from, Via::Main).await,
                    None => return,
                },
                received = self.alt.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        let data = buf[..n].to_vec();
                        self.handle(&data, from, Via::Alt).await;
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

    async fn handle(&mut self, data: &[u8], from: SocketAddr, on: Via) {
        if !self.limiter.allow(from.ip(), Instant::now()) {
            Metrics::inc(&self.metrics.stun_rate_limited_total);
            return;
        }
        let Some(reply) = answer(data, from, on, &self.addrs) else {
            Metrics::inc(&self.metrics.stun_ignored_total);
            tracing::trace!(%from, ?on, len = data.len(), "ignoring a datagram on a STUN socket");
            return;
        };
        let sent = match reply.via {
            Via::Main => self.main.send_to(&reply.bytes, reply.to).await,
            Via::Alt => {
                let to = family(self.addrs.alt, reply.to);
                self.alt.send_to(&reply.bytes, to).await.map(|_| ())
            }
        };
        match sent {
            Ok(()) => Metrics::inc(&self.metrics.stun_answered_total),
            Err(e) => tracing::debug!(to = %reply.to, error = %e, "STUN answer not sent"),
        }
    }
}

/// Spells `to` as a socket bound at `local` needs it: IPv4-mapped on an IPv6 socket.
fn family(local: SocketAddr, to: SocketAddr) -> SocketAddr {
    match (local, to) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => to,
    }
}
