//! Finding direct paths for a session: the UDP and TCP punches (and, behind a symmetric NAT,
//! the birthday punch) run side by side, and each path found is installed in the path table,
//! where the best one carries the traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::Ctx;
use crate::path::PathKind;
use crate::proto::Rendezvous;
use crate::punch::symmetric::{self, Strategy};
use crate::punch::{birthday, checks, punch, start_delay, Punched};

/// A direct path a punch found; dropping it gives the path up.
pub enum Found {
    /// UDP from the agent's socket, checked by its monitor.
    Udp(Punched),
    /// A path with a task of its own: a TCP connection, or a birthday punch's UDP socket.
    /// Dropping it removes the path, which ends the task.
    Channel(ChannelPath),
}

/// A path in the table whose datagrams go through a channel to the task that owns it.
pub struct ChannelPath {
    socket: Arc<crate::path::PathSocket>,
    virt: SocketAddr,
    kind: PathKind,
    remote: SocketAddr,
}

impl Drop for ChannelPath {
    fn drop(&mut self) {
        // The table holds the path's only sender: removing it ends the task, which closes
        // the connection or socket.
        self.socket
            .table_write()
            .remove_path(self.virt, self.kind, self.remote);
    }
}

/// The direct paths of one session, held for as long as the session is in use.
pub type Held = Arc<std::sync::Mutex<Vec<Found>>>;

/// What one punch ended with.
pub type Outcome = Result<Found, String>;

/// Starts the punches toward the peer of `rv` (at virtual address `virt`). Each sends its
/// outcome on the returned channel, which yields one outcome per punch started: UDP, TCP
/// (when this agent has a TCP port) and the birthday punch (when this side's NAT picks
/// random ports and the peer's does not).
pub fn start(
    ctx: &Arc<Ctx>,
    rv: &Rendezvous,
    virt: SocketAddr,
    controlling: bool,
) -> mpsc::Receiver<Outcome> {
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
        other => {
            tracing::info!(session = rv.session, ?mine, peer = ?rv.peer_nat, strategy = ?other, "through a symmetric NAT")
        }
    }
    let (tx, rx) = mpsc::channel(3);
    if let Strategy::OpenMany(to) = strategy {
        let (ctx, rv, tx) = (ctx.clone(), rv.clone(), tx.clone());
        tokio::spawn(async move {
            let outcome = open_many(&ctx, &rv, virt, to).await;
            let _ = tx.send(outcome).await;
        });
    }
    {
        let (ctx, rv, tx) = (ctx.clone(), rv.clone(), tx.clone());
        tokio::spawn(async move {
            let outcome = punch(&ctx.router, virt, &rv, &strategy)
                .await
                .map(Found::Udp)
                .map_err(|e| e.to_string());
            let _ = tx.send(outcome).await;
        });
    }
    if let Some(tcp) = ctx.tcp.clone() {
        let (ctx, rv) = (ctx.clone(), rv.clone());
        tokio::spawn(async move {
            let outcome = match tcp.punch(&rv, controlling).await {
                Ok((stream, remote)) => {
                    let injector = ctx.router.socket().injector();
                    let (tx, done, live) = crate::path::tcp::spawn_checked(stream, virt, injector);
                    let path = Task { tx, done, live };
                    Ok(install(&ctx, virt, PathKind::DirectTcp, remote, path))
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(outcome).await;
        });
    }
    rx
}

/// The symmetric side of a birthday punch: many sockets toward the peer's mapping; the one
/// the peer's probes reach becomes a direct UDP path.
async fn open_many(ctx: &Arc<Ctx>, rv: &Rendezvous, virt: SocketAddr, to: SocketAddr) -> Outcome {
    tokio::time::sleep(start_delay(rv)).await;
    let started = tokio::time::Instant::now();
    let local = ctx.router.socket().local().map_err(|e| e.to_string())?.ip();
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
        won = punch => won.map_err(|e| e.to_string())?,
        () = direct => return Err("birthday punch not needed: the ordinary checks found a direct UDP path".into()),
    };
    tracing::info!(%remote, after_ms = started.elapsed().as_millis() as u64, "birthday punch: the peer reached one of our sockets");
    let injector = ctx.router.socket().injector();
    let (tx, done, live) =
        birthday::spawn_path(socket, remote, virt, rv.credentials.clone(), injector);
    let path = Task { tx, done, live };
    Ok(install(ctx, virt, PathKind::DirectUdp, remote, path))
}

/// The handles of a task that carries a path: where to send datagrams, when it ended, and
/// whether it is live.
struct Task {
    tx: mpsc::Sender<Bytes>,
    done: oneshot::Receiver<std::io::Result<()>>,
    live: watch::Receiver<bool>,
}

/// Makes the path carried by `task` one of the peer's paths until it ends or is given up.
fn install(
    ctx: &Arc<Ctx>,
    virt: SocketAddr,
    kind: PathKind,
    remote: SocketAddr,
    task: Task,
) -> Found {
    let Task { tx, done, mut live } = task;
    let socket = ctx.router.socket().clone();
    socket
        .table_write()
        .add_channel_path(virt, kind, remote, tx, None);
    {
        // A black-holed path stays open: follow its liveness instead.
        let socket = socket.clone();
        tokio::spawn(async move {
            while live.changed().await.is_ok() {
                let now = *live.borrow_and_update();
                socket.table_write().set_live(virt, kind, remote, now);
                if now {
                    tracing::info!(%remote, "{kind} path answers again");
                } else {
                    tracing::warn!(%remote, "{kind} path went silent; using the next path");
                }
            }
        });
    }
    {
        let socket = socket.clone();
        tokio::spawn(async move {
            let why = match done.await {
                Ok(Ok(())) | Err(_) => "closed".to_owned(),
                Ok(Err(e)) => e.to_string(),
            };
            tracing::debug!(%remote, "{kind} path ended: {why}");
            socket.table_write().remove_path(virt, kind, remote);
        });
    }
    Found::Channel(ChannelPath {
        socket,
        virt,
        kind,
        remote,
    })
}

impl Found {
    /// Describes the path for logs.
    pub fn describe(&self) -> String {
        match self {
            Found::Udp(p) => format!(
                "direct UDP to {} (rtt {:.2} ms)",
                p.remote,
                p.rtt.as_secs_f64() * 1000.0
            ),
            Found::Channel(t) => format!("{} to {}", t.kind, t.remote),
        }
    }
}

/// Keeps every path found for as long as the returned holder lives, logging as they come.
pub fn keep(mut outcomes: mpsc::Receiver<Outcome>, label: String) -> Held {
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let weak = Arc::downgrade(&held);
    tokio::spawn(async move {
        while let Some(outcome) = outcomes.recv().await {
            match outcome {
                Ok(found) => {
                    tracing::info!("{label}: found {}", found.describe());
                    match weak.upgrade() {
                        Some(held) => held.lock().unwrap_or_else(|e| e.into_inner()).push(found),
                        None => return,
                    }
                }
                Err(e) => tracing::info!("{label}: {e}"),
            }
        }
    });
    held
}
