//! Finding direct paths for a session: the UDP and TCP punches run side by side, and each
//! path found is installed in the path table, where the best one carries the traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Ctx;
use crate::path::PathKind;
use crate::proto::Rendezvous;
use crate::punch::{punch, Punched};

/// A direct path a punch found; dropping it gives the path up.
pub enum Found {
    /// UDP, checked by its monitor.
    Udp(Punched),
    /// A TCP connection; dropping it removes the path, which closes the connection.
    Tcp(TcpPath),
}

/// A direct TCP path in the table.
pub struct TcpPath {
    socket: Arc<crate::path::PathSocket>,
    virt: SocketAddr,
    remote: SocketAddr,
}

impl Drop for TcpPath {
    fn drop(&mut self) {
        // The table holds the path's only sender: removing it ends the framing task, which
        // closes the connection.
        self.socket
            .table_write()
            .remove_path(self.virt, PathKind::DirectTcp, self.remote);
    }
}

/// The direct paths of one session, held for as long as the session is in use.
pub type Held = Arc<std::sync::Mutex<Vec<Found>>>;

/// What one punch ended with.
pub type Outcome = Result<Found, String>;

/// Starts both punches toward the peer of `rv` (at virtual address `virt`). Each sends its
/// outcome on the returned channel, which yields exactly two outcomes (or one, when this
/// agent has no TCP port).
pub fn start(
    ctx: &Arc<Ctx>,
    rv: &Rendezvous,
    virt: SocketAddr,
    controlling: bool,
) -> mpsc::Receiver<Outcome> {
    let (tx, rx) = mpsc::channel(2);
    {
        let (ctx, rv, tx) = (ctx.clone(), rv.clone(), tx.clone());
        tokio::spawn(async move {
            let outcome = punch(&ctx.router, virt, &rv)
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
                Ok((stream, remote)) => Ok(install_tcp(&ctx, virt, stream, remote)),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(outcome).await;
        });
    }
    rx
}

/// Makes a punched TCP connection the peer's direct TCP path until it ends or is given up.
fn install_tcp(
    ctx: &Arc<Ctx>,
    virt: SocketAddr,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
) -> Found {
    let socket = ctx.router.socket().clone();
    let (tx, done, mut live) = crate::path::tcp::spawn_checked(stream, virt, socket.injector());
    socket
        .table_write()
        .add_channel_path(virt, PathKind::DirectTcp, remote, tx, None);
    {
        // A black-holed TCP connection stays open: follow its pings instead.
        let socket = socket.clone();
        tokio::spawn(async move {
            while live.changed().await.is_ok() {
                let now = *live.borrow_and_update();
                socket
                    .table_write()
                    .set_live(virt, PathKind::DirectTcp, remote, now);
                if now {
                    tracing::info!(%remote, "direct TCP path answers again");
                } else {
                    tracing::warn!(%remote, "direct TCP path went silent; using the next path");
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
            tracing::debug!(%remote, "direct TCP path ended: {why}");
            socket
                .table_write()
                .remove_path(virt, PathKind::DirectTcp, remote);
        });
    }
    Found::Tcp(TcpPath {
        socket,
        virt,
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
            Found::Tcp(t) => format!("direct TCP to {}", t.remote),
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
