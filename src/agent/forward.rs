//! `forward`: a local TCP listener whose every connection becomes one stream to the exposer.

use tokio::net::{TcpListener, TcpStream};

use super::activity::Role;
use super::ctx::ForwardSpec;
use super::peers::Peers;
use crate::tunnel::{copy, header};

/// Accepts local connections for `spec` until the task is aborted (a reload that removes or
/// changes the forward; the connections it accepted go on). The listener is shared so that
/// a reload that changes only the name keeps the port open throughout.
pub async fn serve(peers: Peers, spec: ForwardSpec, listener: std::sync::Arc<TcpListener>) {
    loop {
        match listener.accept().await {
            Ok((tcp, from)) => {
                let peers = peers.clone();
                let name = spec.name.clone();
                tokio::spawn(async move {
                    if let Err(e) = carry(&peers, &name, tcp).await {
                        tracing::warn!(%name, %from, "connection failed: {e:#}");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(name = %spec.name, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn carry(peers: &Peers, name: &str, tcp: TcpStream) -> anyhow::Result<()> {
    let conn = match peers.get(name).await {
        Ok(c) => c,
        Err(e) => {
            reset(tcp);
            return Err(e);
        }
    };
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            reset(tcp);
            anyhow::bail!("cannot open a stream: {}", why_lost(&conn, e));
        }
    };
    if let Some(peer) = crate::tunnel::tls::peer_fingerprint(&conn) {
        peers
            .ctx()
            .activity
            .peer_connected(peer, Role::Forward, name, &conn);
    }
    let guard = peers.ctx().activity.stream_opened(Role::Forward, name);
    if let Err(e) = send.write_all(&header::encode(name)).await {
        reset(tcp);
        anyhow::bail!("{}", why_lost(&conn, e));
    }
    let outcome = copy::splice(tcp, send, recv).await;
    guard.moved(outcome.up, outcome.down);
    if let Some(why) = outcome.failure {
        anyhow::bail!("{}", why_lost(&conn, why));
    }
    tracing::debug!(%name, up = outcome.up, down = outcome.down, "connection done");
    Ok(())
}

/// An error, with the reason the peer gave if it closed the connection: quinn's stream errors
/// say only "connection lost", while the close reason says why (e.g. an `--allow` refusal).
fn why_lost(conn: &quinn::Connection, err: impl std::fmt::Display) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => format!(
            "{err}: the exposer closed the connection: {}",
            String::from_utf8_lossy(&close.reason)
        ),
        Some(reason) => format!("{err}: {reason}"),
        None => err.to_string(),
    }
}

/// Closes a local connection with RST, so its client sees a failure rather than an empty
/// reply.
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
}
