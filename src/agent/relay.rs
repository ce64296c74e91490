//! The relay path on the agent's side: a peer's QUIC packets sent to S as datagrams on the
//! control connection (format in [`crate::proto::relay`]), and S's datagrams handed back to
//! quinn as if they had come from the peer's virtual address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use quinn::{Connection, SendDatagramError};
use tokio::sync::mpsc;

use super::server::Registered;
use super::Ctx;
use crate::path::{Injected, PathKind};
use crate::proto::relay;

/// Packets waiting for the control connection before new ones are lost.
const QUEUE: usize = 1024;

/// Relayed sessions of this agent: session ID → the peer's virtual address.
#[derive(Debug, Default)]
pub struct RelaySessions {
    peers: Mutex<HashMap<u64, SocketAddr>>,
}

impl RelaySessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SocketAddr>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Makes S's relay a path to the peer at `virt` for `session`, through the registration
/// `reg`. The path goes away when the control connection does or [`close`] is called.
pub fn open(ctx: &Ctx, reg: &Registered, session: u64, virt: SocketAddr) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    ctx.relays.lock().insert(session, virt);
    ctx.router
        .socket()
        .table_write()
        .add_channel_path(virt, PathKind::Relay, reg.server, tx, None);
    let conn = reg.conn.clone();
    let server = reg.server;
    let table_owner = ctx.router.socket().clone();
    tokio::spawn(async move {
        while let Some(packet) = rx.recv().await {
            if !send(&conn, relay::encode(session, &packet)) {
                break;
            }
        }
        // The control connection is gone: so is this path.
        table_owner
            .table_write()
            .remove_path(virt, PathKind::Relay, server);
    });
}

/// Sends one relay payload: as a datagram, or on a stream of its own when it does not fit.
/// Returns false once the connection is closed.
fn send(conn: &Connection, payload: Bytes) -> bool {
    match conn.send_datagram(payload.clone()) {
        Ok(()) => true,
        Err(SendDatagramError::TooLarge) => {
            let conn = conn.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = conn.open_uni().await {
                    let _ = s.write_all(&payload).await;
                    let _ = s.finish();
                }
            });
            true
        }
        Err(SendDatagramError::ConnectionLost(_)) => false,
        Err(e) => {
            tracing::debug!("relay datagram not sent: {e}");
            true
        }
    }
}

/// Stops using the relay for `session` (S closed it).
pub fn close(ctx: &Ctx, session: u64, server: SocketAddr) {
    if let Some(virt) = ctx.relays.lock().remove(&session) {
        ctx.router
            .socket()
            .table_write()
            .remove_path(virt, PathKind::Relay, server);
    }
}

/// Hands relayed packets arriving on the control connection `conn` to quinn, until it ends.
pub async fn pump(ctx: std::sync::Arc<Ctx>, conn: Connection) {
    let injector = ctx.router.socket().injector();
    let deliver = |payload: Bytes| {
        let (session, packet) = relay::decode(&payload)?;
        let virt = *ctx.relays.lock().get(&session)?;
        Some(Injected {
            from: virt,
            data: packet,
        })
    };
    let datagrams = async {
        while let Ok(payload) = conn.read_datagram().await {
            if let Some(packet) = deliver(payload) {
                // A full queue is congestion: the packet is lost, QUIC recovers.
                let _ = injector.try_send(packet);
            }
        }
    };
    let streams = async {
        while let Ok(mut uni) = conn.accept_uni().await {
            let injector = injector.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let Ok(payload) = uni.read_to_end(relay::MAX_STREAM_PAYLOAD).await else {
                    return;
                };
                let Some((session, packet)) = relay::decode(&Bytes::from(payload)) else {
                    return;
                };
                let virt = ctx.relays.lock().get(&session).copied();
                if let Some(virt) = virt {
                    let _ = injector.try_send(Injected {
                        from: virt,
                        data: packet,
                    });
                }
            });
        }
    };
    tokio::join!(datagrams, streams);
}
