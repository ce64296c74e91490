//! The relay path on the agent's side: a peer's QUIC packets sent to S as datagrams on the
//! control connection (format in [`crate::proto::relay`]), and S's datagrams handed back to
//! quinn as if they had come from the peer's virtual address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use quinn::Connection;
use tokio::sync::mpsc;

use super::server::Registered;
use super::Ctx;
use crate::path::{Injected, PathKind};
use crate::proto::relay::{self, Reassembly, Relayed};
use crate::tunnel::relayed::{self, NotSent, Sent};

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
        let mut split = 0u32;
        while let Some(packet) = rx.recv().await {
            if !send(&conn, relay::encode(session, &packet), &mut split) {
                break;
            }
        }
        // The control connection is gone: so is this path.
        table_owner
            .table_write()
            .remove_path(virt, PathKind::Relay, server);
    });
}

/// Sends one relay payload: as datagrams, or on a stream of its own when none can carry it.
/// `split` counts the packets sent in pieces. Returns false once the connection is closed.
fn send(conn: &Connection, payload: Bytes, split: &mut u32) -> bool {
    let before = *split;
    let number = || {
        *split = split.wrapping_add(1);
        relay::packet_number(*split, false)
    };
    match relayed::send(conn, payload, number) {
        Ok(Sent::Split(_)) if before == 0 => {
            tracing::info!(
                room = conn.max_datagram_size(),
                "relayed packets are sent in pieces: they no longer fit in one datagram to S \
                 (a small MTU on the way, or congestion loss taken for one)"
            );
            true
        }
        Ok(_) => true,
        Err(NotSent::NeedsStream(payload)) => {
            let conn = conn.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = conn.open_uni().await {
                    let _ = s.write_all(&payload).await;
                    let _ = s.finish();
                }
            });
            true
        }
        Err(NotSent::Closed) => false,
        Err(e) => {
            tracing::debug!("{e}");
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
    // Pieces come as datagrams; a piece on a stream is possible but rare (see proto::relay).
    let pieces = std::sync::Arc::new(Mutex::new(Reassembly::default()));
    let deliver = move |payload: Bytes| {
        let (session, what) = relay::decode(&payload)?;
        // Before reassembly, so that pieces of no session of ours take no room there.
        let from = *ctx.relays.lock().get(&session)?;
        let data = match what {
            Relayed::Packet(packet) => packet,
            Relayed::Fragment(piece) => pieces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(session, piece)?,
        };
        // A full queue is congestion: the packet is lost, QUIC recovers.
        let _ = injector.try_send(Injected { from, data });
        Some(())
    };
    let datagrams = async {
        while let Ok(payload) = conn.read_datagram().await {
            deliver(payload);
        }
    };
    let streams = async {
        while let Ok(mut uni) = conn.accept_uni().await {
            let deliver = deliver.clone();
            tokio::spawn(async move {
                if let Ok(payload) = uni.read_to_end(relay::MAX_STREAM_PAYLOAD).await {
                    deliver(Bytes::from(payload));
                }
            });
        }
    };
    tokio::join!(datagrams, streams);
}
