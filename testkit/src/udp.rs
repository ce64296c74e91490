//! UDP through the tunnel: an echo service and a client whose every datagram is checked by
//! SHA-256 and counted, and the agents' own counts of a UDP service from their status, so
//! a test can say where each lost datagram went.
//!
//! A datagram of a round is its sequence number (8 bytes, big-endian) and then the bytes of
//! seed `seed + seq` ([`crate::DataGen`]); the client checks each echo's SHA-256 against
//! [`crate::data_digest`] of that seed.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use p2ptun::tunnel::flow::FlowCounts;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;

use crate::kit::{Place, Target};
use crate::{agent_status, data_digest, DataGen};

/// Bytes before a round's payload: the sequence number.
const SEQ: usize = 8;

/// A UDP socket bound to 127.0.0.1 in `place`, served by the current runtime.
fn bind_in(place: &Place) -> anyhow::Result<UdpSocket> {
    let std = place
        .run_in(|| std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)))
        .with_context(|| format!("binding a UDP socket in {place}"))?;
    std.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(std)?)
}

/// A UDP echo service on 127.0.0.1 in a place: sends every datagram back to its sender.
pub struct UdpEcho {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpEcho {
    /// Starts it in `place`, served by the current runtime.
    pub fn start(place: &Place) -> UdpEcho {
        let socket = bind_in(place).expect("the UDP echo service's socket");
        let addr = socket.local_addr().expect("local_addr");
        let (received, echoed) = (
            Arc::new(AtomicU64::default()),
            Arc::new(AtomicU64::default()),
        );
        let (got, sent) = (received.clone(), echoed.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                got.fetch_add(1, Ordering::Relaxed);
                if socket.send_to(&buf[..n], from).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        UdpEcho {
            addr,
            received,
            echoed,
            task,
        }
    }

    /// Datagrams it received.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams it sent back.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

impl Target for UdpEcho {
    fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one echo round saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EchoRound {
    /// Datagrams sent.
    pub sent: u64,
    /// Echoes received whose SHA-256 matched.
    pub received: u64,
    /// Echoes whose bytes were not the ones sent (must be 0).
    pub corrupt: u64,
    /// Echoes of a datagram already echoed (must be 0).
    pub duplicate: u64,
}

impl EchoRound {
    /// Datagrams that never came back.
    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }
}

impl std::ops::Add for EchoRound {
    type Output = EchoRound;

    fn add(self, other: EchoRound) -> EchoRound {
        EchoRound {
            sent: self.sent + other.sent,
            received: self.received + other.received,
            corrupt: self.corrupt + other.corrupt,
            duplicate: self.duplicate + other.duplicate,
        }
    }
}

/// A client of a forwarded UDP port: one socket on 127.0.0.1 in a place, so one flow.
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    /// A client in `place` of the port 127.0.0.1:`port` there.
    pub async fn open(place: &Place, port: u16) -> anyhow::Result<UdpClient> {
        let socket = bind_in(place)?;
        socket
            .connect((Ipv4Addr::LOCALHOST, port))
            .await
            .with_context(|| format!("connecting a UDP socket to port {port} in {place}"))?;
        Ok(UdpClient { socket })
    }

    /// Its address: the flow's key at the forwarder.
    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local_addr")
    }

    /// Sends `payload` once.
    pub async fn send(&self, payload: &[u8]) -> anyhow::Result<()> {
        self.socket
            .send(payload)
            .await
            .context("sending a datagram")?;
        Ok(())
    }

    /// The next datagram within `wait`, if any.
    pub async fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(wait, self.socket.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    /// Sends one small datagram every 500 ms until one comes back, within `limit`: the
    /// flow is open and the peer connection made. The echoes of the others are waited for
    /// (a moment), so none is left for what comes next; returns what was sent and received.
    pub async fn wait_echo(&self, limit: Duration) -> anyhow::Result<EchoRound> {
        const HELLO: &[u8] = b"hello?";
        let start = Instant::now();
        let mut round = EchoRound::default();
        while start.elapsed() < limit {
            self.send(HELLO).await?;
            round.sent += 1;
            if let Some(echo) = self.recv(Duration::from_millis(500)).await {
                ensure!(
                    echo == HELLO,
                    "the first echo was {} other bytes",
                    echo.len()
                );
                round.received += 1;
                while round.received < round.sent {
                    match self.recv(Duration::from_millis(500)).await {
                        Some(echo) if echo == HELLO => round.received += 1,
                        Some(_) => round.corrupt += 1,
                        None => break,
                    }
                }
                return Ok(round);
            }
        }
        Err(anyhow!("no echo through the UDP forward within {limit:?}"))
    }

    /// Sends `count` datagrams of `size` bytes (at least 8) from `seed`, at most `window`
    /// unanswered at once, and checks every echo. A window's stragglers are given `wait`
    /// after the last echo; what has not come back by then counts as lost.
    pub async fn round(
        &self,
        seed: u64,
        count: u64,
        size: usize,
        window: u64,
        wait: Duration,
    ) -> anyhow::Result<EchoRound> {
        ensure!(
            size >= SEQ,
            "a round's datagrams carry at least {SEQ} bytes"
        );
        let body = (size - SEQ) as u64;
        let mut seen = HashSet::new();
        let mut round = EchoRound::default();
        let mut buf = vec![0u8; 65_536];
        let mut next = 0u64;
        while next < count {
            let end = (next + window).min(count);
            for seq in next..end {
                let mut datagram = seq.to_be_bytes().to_vec();
                let mut gen = DataGen::new(seed + seq, body);
                while let Some(chunk) = gen.next_chunk() {
                    datagram.extend_from_slice(chunk);
                }
                self.send(&datagram).await?;
                round.sent += 1;
            }
            let mut outstanding = end - next;
            while outstanding > 0 {
                let Ok(Ok(n)) = tokio::time::timeout(wait, self.socket.recv(&mut buf)).await else {
                    break;
                };
                let echo = &buf[..n];
                let Some(seq) = echo
                    .get(..SEQ)
                    .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
                else {
                    round.corrupt += 1;
                    continue;
                };
                let digest: [u8; 32] = Sha256::digest(&echo[SEQ..]).into();
                if seq >= count || echo.len() != size || digest != data_digest(seed + seq, body) {
                    round.corrupt += 1;
                } else if !seen.insert(seq) {
                    round.duplicate += 1;
                } else {
                    round.received += 1;
                    if (next..end).contains(&seq) {
                        outstanding -= 1;
                    }
                }
            }
            next = end;
        }
        Ok(round)
    }
}

/// The flow counters the agent of `state_dir` reports for UDP service `name` in `role`
/// (`"expose"` or `"forward"`), if it lists it.
pub async fn flow_counts(state_dir: &Path, role: &str, name: &str) -> Option<FlowCounts> {
    let statuses = agent_status(state_dir).await.ok()?;
    statuses.iter().find_map(|st| {
        st["services"].as_array()?.iter().find_map(|svc| {
            (svc["name"] == name && svc["role"] == role)
                .then(|| serde_json::from_value(svc["udp"].clone()).ok())
                .flatten()
        })
    })
}

/// Where the datagrams of a round went, from both agents' counts: what the forwarder took
/// from clients and sent, what the exposer received and gave the service, and the same way
/// back. Every datagram a client sent is in one of these; what the path lost is the
/// difference between one agent's `to_tunnel` and the other's `from_tunnel`.
#[derive(Debug, Clone, Copy)]
pub struct Accounting {
    /// The forwarder's counts.
    pub forwarder: FlowCounts,
    /// The exposer's counts.
    pub exposer: FlowCounts,
}

impl Accounting {
    /// Both agents' counts of UDP service `name`.
    pub async fn read(
        forwarder_dir: &Path,
        exposer_dir: &Path,
        name: &str,
    ) -> anyhow::Result<Accounting> {
        let forwarder = flow_counts(forwarder_dir, "forward", name)
            .await
            .with_context(|| format!("the forwarder's status lists no UDP service {name}"))?;
        let exposer = flow_counts(exposer_dir, "expose", name)
            .await
            .with_context(|| format!("the exposer's status lists no UDP service {name}"))?;
        Ok(Accounting { forwarder, exposer })
    }

    /// Datagrams the path lost toward the exposer.
    pub fn lost_up(&self) -> u64 {
        self.forwarder
            .to_tunnel
            .saturating_sub(self.exposer.from_tunnel)
    }

    /// Datagrams the path lost toward the forwarder.
    pub fn lost_down(&self) -> u64 {
        self.exposer
            .to_tunnel
            .saturating_sub(self.forwarder.from_tunnel)
    }

    /// Follows the datagrams of an echo service's rounds hop by hop, from what clients sent
    /// (`sent`) through both agents and the service (which received `svc_received` and sent
    /// back `svc_echoed`) back to what clients received (`received`), and says where each
    /// missing one went. An error if an agent's counts do not add up (a datagram it lost
    /// without counting) or a hop shows more than the one before it (one from nowhere).
    pub fn follow(
        &self,
        sent: u64,
        svc_received: u64,
        svc_echoed: u64,
        received: u64,
    ) -> anyhow::Result<Vec<(&'static str, u64)>> {
        let (f, e) = (&self.forwarder, &self.exposer);
        let detail = || {
            format!(
                "{self:#?}\nclients sent {sent} and received {received}; the service received \
                 {svc_received} and echoed {svc_echoed}"
            )
        };
        for (who, c) in [("forwarder", f), ("exposer", e)] {
            ensure!(
                c.from_local == c.to_tunnel + c.too_large + c.dropped_in,
                "the {who}'s datagrams from the local side are not all sent or counted as \
                 dropped\n{}",
                detail()
            );
            ensure!(
                c.from_tunnel == c.to_local + c.dropped_out,
                "the {who}'s datagrams from the tunnel are not all delivered or counted as \
                 dropped\n{}",
                detail()
            );
        }
        let hops = [
            ("client -> forwarder (kernel)", sent, f.from_local),
            (
                "forwarder dropped (too large)",
                f.from_local,
                f.from_local - f.too_large,
            ),
            (
                "forwarder dropped (other)",
                f.from_local - f.too_large,
                f.to_tunnel,
            ),
            ("path toward the exposer", f.to_tunnel, e.from_tunnel),
            ("exposer dropped", e.from_tunnel, e.to_local),
            ("exposer -> service (kernel)", e.to_local, svc_received),
            ("service did not echo", svc_received, svc_echoed),
            ("service -> exposer (kernel)", svc_echoed, e.from_local),
            (
                "exposer dropped (too large)",
                e.from_local,
                e.from_local - e.too_large,
            ),
            (
                "exposer dropped (other)",
                e.from_local - e.too_large,
                e.to_tunnel,
            ),
            ("path toward the forwarder", e.to_tunnel, f.from_tunnel),
            ("forwarder dropped", f.from_tunnel, f.to_local),
            ("forwarder -> client (kernel)", f.to_local, received),
        ];
        let mut losses = Vec::new();
        for (hop, before, after) in hops {
            ensure!(
                after <= before,
                "{hop}: {after} datagrams after it, {before} before\n{}",
                detail()
            );
            if before > after {
                losses.push((hop, before - after));
            }
        }
        Ok(losses)
    }
}
