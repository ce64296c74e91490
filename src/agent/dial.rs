//! How the agent reaches S: S's addresses in the order RFC 8305 (Happy Eyeballs v2) gives
//! them, and the race of QUIC over UDP and QUIC framed on TCP to them.
//!
//! UDP is what the agent wants (its NAT mapping toward S is the one peers punch to, and no
//! head-of-line blocking), so every address is tried over UDP first; TCP to the same
//! address joins after [`TCP_HEAD_START`]. Behind a firewall that drops UDP the agent is
//! registered a few hundred milliseconds later than it would be over UDP, not after a
//! timeout. [`schedule`] decides who starts when; [`dial`] runs it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::{anyhow, Context};
use quinn::Connection;

use super::ctx::Ctx;
use super::registration::EXCHANGE_TIMEOUT;
use crate::path::PathSocket;
use crate::punch::candidates::{interleave, Families};

/// Between the first attempts to two successive addresses of S (RFC 8305 §5's Connection
/// Attempt Delay, its recommended 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// How long UDP to an address has alone before TCP to the same address joins the race. A
/// QUIC handshake to S takes one round trip, so on all but the longest paths UDP wins when
/// it works at all; an agent whose UDP is blocked loses only this much.
pub const TCP_HEAD_START: Duration = Duration::from_millis(300);

/// The carrier of a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// QUIC over the agent's UDP socket.
    Udp,
    /// QUIC framed on a TCP connection to S's port.
    Tcp,
}

/// One attempt of the race: start it `at` after the race begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// When to start, from the start of the race.
    pub at: Duration,
    /// S's address to try.
    pub addr: SocketAddr,
    /// Over what.
    pub carrier: Carrier,
}

/// S's addresses, resolved from `HOST:PORT`, that a socket reaching `families` can use,
/// in RFC 8305 §4's order: the families interleaved, IPv6 first (as the system's resolver
/// order also puts it).
pub async fn resolve(server: &str, families: Families) -> anyhow::Result<Vec<SocketAddr>> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve '{server}'"))?
        .map(crate::path::canonical)
        .collect();
    let usable = order(found.iter().copied().filter(|a| families.allows(*a)));
    if usable.is_empty() {
        let want = match (families.v4, families.v6) {
            (true, false) => "IPv4 ",
            (false, true) => "IPv6 ",
            _ => "",
        };
        return Err(anyhow!(
            "'{server}' has no {want}address this agent can use (found: {found:?})"
        ));
    }
    Ok(usable)
}

/// `addrs` without duplicates, families interleaved, IPv6 first.
pub fn order(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut v6 = Vec::new();
    let mut v4 = Vec::new();
    for a in addrs {
        let list = if a.is_ipv6() { &mut v6 } else { &mut v4 };
        if !list.contains(&a) {
            list.push(a);
        }
    }
    interleave(v6, v4)
}

/// Who starts when: UDP to each address [`ATTEMPT_DELAY`] apart, TCP to each address
/// [`TCP_HEAD_START`] after UDP to it (if `tcp`), sorted by start time.
pub fn schedule(addrs: &[SocketAddr], tcp: bool) -> Vec<Attempt> {
    let mut out = Vec::new();
    for (i, &addr) in addrs.iter().enumerate() {
        let at = ATTEMPT_DELAY * i as u32;
        out.push(Attempt {
            at,
            addr,
            carrier: Carrier::Udp,
        });
        if tcp {
            out.push(Attempt {
                at: at + TCP_HEAD_START,
                addr,
                carrier: Carrier::Tcp,
            });
        }
    }
    out.sort_by_key(|a| a.at);
    out
}

/// A control connection that won the race.
#[derive(Debug)]
pub struct Dialed {
    /// The QUIC connection to S.
    pub conn: Connection,
    /// S's address it reached.
    pub server: SocketAddr,
    /// What carries it.
    pub carrier: Carrier,
}

/// One contestant of a race: a boxed future that may fail.
pub type Racer<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// Runs `racers` at once and returns the first to succeed; the others are dropped, which
/// abandons what they were doing. Fails with every racer's error when none succeeds.
pub async fn first_ok<T>(racers: Vec<Racer<'_, T>>) -> Result<T, Vec<String>> {
    let mut racers: Vec<Option<Racer<'_, T>>> = racers.into_iter().map(Some).collect();
    let mut errors = Vec::new();
    std::future::poll_fn(|cx| {
        for slot in racers.iter_mut() {
            let Some(racer) = slot else { continue };
            if let Poll::Ready(result) = racer.as_mut().poll(cx) {
                *slot = None;
                match result {
                    Ok(won) => return Poll::Ready(Ok(won)),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        if racers.iter().all(Option::is_none) {
            return Poll::Ready(Err(std::mem::take(&mut errors)));
        }
        Poll::Pending
    })
    .await
}

/// Runs `attempts` (from [`schedule`]) and returns the first connection made; the others
/// are dropped, which abandons their handshakes and closes their TCP connections. Fails
/// with every attempt's error when none succeeds.
pub async fn dial(
    ctx: &Ctx,
    config: quinn::ClientConfig,
    host: &str,
    attempts: &[Attempt],
) -> anyhow::Result<Dialed> {
    let racers = attempts
        .iter()
        .map(|&a| {
            let config = config.clone();
            Box::pin(async move {
                tokio::time::sleep(a.at).await;
                let conn = match a.carrier {
                    Carrier::Udp => connect_udp(ctx, config, a.addr, host).await,
                    Carrier::Tcp => connect_tcp(ctx, config, a.addr, host).await,
                }
                .with_context(|| format!("over {:?} to {}", a.carrier, a.addr))?;
                Ok(Dialed {
                    conn,
                    server: a.addr,
                    carrier: a.carrier,
                })
            }) as Racer<'_, Dialed>
        })
        .collect();
    first_ok(racers)
        .await
        .map_err(|errors| anyhow!("{}", errors.join("; ")))
}

/// A QUIC handshake with S over the agent's UDP socket.
pub async fn connect_udp(
    ctx: &Ctx,
    config: quinn::ClientConfig,
    server: SocketAddr,
    host: &str,
) -> anyhow::Result<Connection> {
    ctx.router.socket().allow(server);
    let connecting = ctx
        .endpoint
        .connect_with(config, server, host)
        .map_err(|e| anyhow!("cannot connect: {e}"))?;
    tokio::time::timeout(EXCHANGE_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {}s", EXCHANGE_TIMEOUT.as_secs()))?
        .map_err(|e| anyhow!("QUIC handshake failed: {e}"))
}

/// Takes a TCP connection's virtual peer out of the path table unless it won: that ends the
/// connection's task, and with it the TCP connection.
struct TcpPath {
    socket: Arc<PathSocket>,
    virt: SocketAddr,
    won: bool,
}

impl Drop for TcpPath {
    fn drop(&mut self) {
        if !self.won {
            self.socket.table_write().remove_peer(self.virt);
        }
    }
}

/// The control connection framed on TCP to S's port: S gets a virtual address in the path
/// table whose only path is the TCP connection, and quinn connects to that.
pub async fn connect_tcp(
    ctx: &Ctx,
    config: quinn::ClientConfig,
    server: SocketAddr,
    host: &str,
) -> anyhow::Result<Connection> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::time::timeout(EXCHANGE_TIMEOUT, tokio::net::TcpStream::connect(server))
        .await
        .map_err(|_| anyhow!("TCP connect timed out"))?
        .context("TCP connect failed")?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(crate::path::tcp::SERVER_PREAMBLE).await?;
    let socket = ctx.router.socket().clone();
    let virt = socket.table_write().anonymous_peer();
    let (tx, done) = crate::path::tcp::spawn(tcp, virt, socket.injector());
    socket
        .table_write()
        .add_channel_path(virt, crate::path::PathKind::DirectTcp, server, tx, None);
    let mut path = TcpPath {
        socket: socket.clone(),
        virt,
        won: false,
    };
    tokio::spawn(async move {
        let _ = done.await;
        socket.table_write().remove_peer(virt);
    });
    let connecting = ctx
        .endpoint
        .connect_with(config, virt, host)
        .map_err(|e| anyhow!("cannot connect: {e}"))?;
    let conn = tokio::time::timeout(EXCHANGE_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no QUIC answer over TCP"))?
        .map_err(|e| anyhow!("QUIC handshake over TCP failed: {e}"))?;
    path.won = true;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn families_are_interleaved_ipv6_first_without_duplicates() {
        let found = addrs(&[
            "192.0.2.1:7000",
            "192.0.2.2:7000",
            "[2001:db8::1]:7000",
            "192.0.2.1:7000",
        ]);
        assert_eq!(
            order(found),
            addrs(&["[2001:db8::1]:7000", "192.0.2.1:7000", "192.0.2.2:7000"])
        );
        assert_eq!(
            order(addrs(&["192.0.2.1:7000"])),
            addrs(&["192.0.2.1:7000"])
        );
    }

    #[tokio::test]
    async fn the_first_success_wins_and_failures_are_all_reported() {
        let after = |ms: u64, ok: bool| -> Racer<'static, u64> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ok {
                    Ok(ms)
                } else {
                    Err(anyhow!("racer {ms} failed"))
                }
            })
        };
        // A quick failure does not end the race; the quickest success wins it.
        let won = first_ok(vec![after(30, true), after(5, false), after(20, true)]).await;
        assert_eq!(won, Ok(20));
        let lost = first_ok(vec![after(1, false), after(2, false)]).await;
        assert_eq!(
            lost,
            Err(vec![
                "racer 1 failed".to_owned(),
                "racer 2 failed".to_owned()
            ])
        );
        assert_eq!(first_ok::<u64>(Vec::new()).await, Err(Vec::new()));
    }

    #[test]
    fn udp_leads_and_tcp_follows_each_address() {
        let ms = Duration::from_millis;
        let plan = schedule(&addrs(&["[2001:db8::1]:7000", "192.0.2.1:7000"]), true);
        let got: Vec<(u64, String, Carrier)> = plan
            .iter()
            .map(|a| (a.at.as_millis() as u64, a.addr.to_string(), a.carrier))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "[2001:db8::1]:7000".into(), Carrier::Udp),
                (250, "192.0.2.1:7000".into(), Carrier::Udp),
                (300, "[2001:db8::1]:7000".into(), Carrier::Tcp),
                (550, "192.0.2.1:7000".into(), Carrier::Tcp),
            ]
        );
        assert!(plan.iter().all(|a| a.at < ms(1000)));
        assert!(schedule(&addrs(&["192.0.2.1:7000"]), false)
            .iter()
            .all(|a| a.carrier == Carrier::Udp));
    }
}
