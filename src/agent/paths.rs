//! Starting the punches of one introduction: the UDP checks, the TCP simultaneous open and,
//! behind a symmetric NAT, the birthday punch, side by side. Each reports what it found to
//! the caller (the peer's link), which alone installs paths; nothing here writes the path
//! table.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::ctx::Ctx;
use crate::path::PathKind;
use crate::proto::Rendezvous;
use crate::punch::checker::Event;
use crate::punch::symmetric::{self, Strategy};
use crate::punch::{birthday, checks, start_delay, Punch};

/// A direct path with a task of its own — a TCP connection, or a birthday punch's UDP
/// socket — whose datagrams go through a channel. The task ends when every sender of
/// `sink` is dropped.
#[derive(Debug)]
pub struct ChannelPath {
    /// Its kind.
    pub kind: PathKind,
    /// The peer's address on it.
    pub remote: SocketAddr,
    /// Where the peer's outgoing QUIC packets go.
    pub sink: mpsc::Sender<Bytes>,
    /// Whether it is live (a black-holed path stays open: this says so).
    pub live: watch::Receiver<bool>,
    /// Completes when the task ended (the connection closed or failed).
    pub done: oneshot::Receiver<std::io::Result<()>>,
}

/// What a TCP or birthday punch ended with.
#[derive(Debug)]
pub enum Outcome {
    /// A path.
    Found(ChannelPath),
    /// Why there is none (for the log).
    Failed(String),
}

/// Starts the punches toward the peer of `rv` (at virtual address `virt`). The UDP checks
/// report their [`Event`]s to `udp`, tagged with `id`, for as long as the returned [`Punch`]
/// lives; the TCP punch (when this agent has a TCP port) and the birthday punch (when this
/// side's NAT picks random ports and the peer's does not) send one [`Outcome`] each to
/// `outcomes`.
pub fn start(
    ctx: &Arc<Ctx>,
    rv: &Rendezvous,
    virt: SocketAddr,
    controlling: bool,
    id: u64,
    udp: mpsc::Sender<(u64, Event)>,
    outcomes: mpsc::Sender<Outcome>,
) -> Punch {
    let strategy = strategy(ctx, rv);
    if let Strategy::OpenMany(to) = strategy {
        let (ctx, rv, tx) = (ctx.clone(), rv.clone(), outcomes.clone());
        tokio::spawn(async move {
            let outcome = open_many(&ctx, &rv, virt, to).await;
            let _ = tx.send(outcome).await;
        });
    }
    if let Some(tcp) = ctx.tcp.clone() {
        let (ctx, rv) = (ctx.clone(), rv.clone());
        tokio::spawn(async move {
            let outcome = match tcp.punch(&rv, controlling).await {
                Ok((stream, remote)) => {
                    let injector = ctx.router.socket().injector();
                    let (sink, done, live) =
                        crate::path::tcp::spawn_checked(stream, virt, injector);
                    Outcome::Found(ChannelPath {
                        kind: PathKind::DirectTcp,
                        remote,
                        sink,
                        live,
                        done,
                    })
                }
                Err(e) => Outcome::Failed(e.to_string()),
            };
            let _ = outcomes.send(outcome).await;
        });
    }
    crate::punch::start(&ctx.router, rv, &strategy, id, udp)
}

/// How to get through the NATs of this introduction (see [`symmetric::strategy`]).
fn strategy(ctx: &Ctx, rv: &Rendezvous) -> Strategy {
    let mine = ctx
        .registration
        .borrow()
        .as_ref()
        .map(|r| r.nat)
        .unwrap_or_default();
    let mapped = ctx
        .portmap
        .borrow()
        .iter()
        .any(|m| m.candidate().kind == crate::proto::CandidateKind::PortMapped);
    let strategy = symmetric::strategy(mine, rv.peer_nat, &rv.peer_candidates, mapped);
    match &strategy {
        Strategy::Ordinary => {}
        Strategy::Impossible => tracing::info!(
            session = rv.session,
            "both NATs give each destination its own port and neither side has a port \
             mapping: no direct UDP path can be punched; TCP or the relay will carry it"
        ),
        Strategy::Predict(ports) => tracing::info!(
            session = rv.session, ?mine, peer = ?rv.peer_nat,
            "through a symmetric NAT: probing {} predicted ports, {} to {}",
            ports.len(),
            ports.first().map(|a| a.to_string()).unwrap_or_default(),
            ports.last().map(|a| a.port().to_string()).unwrap_or_default()
        ),
        other => {
            tracing::info!(session = rv.session, ?mine, peer = ?rv.peer_nat, strategy = ?other, "through a symmetric NAT")
        }
    }
    strategy
}

/// The symmetric side of a birthday punch: many sockets toward the peer's mapping; the one
/// the peer's probes reach becomes a direct UDP path.
async fn open_many(ctx: &Arc<Ctx>, rv: &Rendezvous, virt: SocketAddr, to: SocketAddr) -> Outcome {
    tokio::time::sleep(start_delay(rv)).await;
    let started = tokio::time::Instant::now();
    // The side sockets are IPv4, as the peer's mapping is (see symmetric::strategy).
    let local = match ctx.router.socket().local() {
        Ok(local) => crate::punch::candidates::ipv4_side(local).ip(),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let punch = birthday::open_many(local, to, &rv.credentials, started + checks::DEADLINE);
    // The ordinary checks may get through after all (the peer's NAT filters by address
    // only): then the sockets are closed at once, not at the deadline.
    let direct = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let selected = ctx.router.socket().table_read().selected(virt);
            if matches!(selected, Some((PathKind::DirectUdp, _))) {
                return;
            }
        }
    };
    let (socket, remote) = tokio::select! {
        won = punch => match won {
            Ok(won) => won,
            Err(e) => return Outcome::Failed(e.to_string()),
        },
        () = direct => return Outcome::Failed(
            "birthday punch not needed: the ordinary checks found a direct UDP path".into(),
        ),
    };
    tracing::info!(%remote, after_ms = started.elapsed().as_millis() as u64, "birthday punch: the peer reached one of our sockets");
    let injector = ctx.router.socket().injector();
    let (sink, done, live) =
        birthday::spawn_path(socket, remote, virt, rv.credentials.clone(), injector);
    Outcome::Found(ChannelPath {
        kind: PathKind::DirectUdp,
        remote,
        sink,
        live,
        done,
    })
}
