//! The relay path on the agent's side: a peer's QUIC packets sent to S as datagrams on the
//! control connection (format in [`crate::proto::relay`]), and S's datagrams handed back to
//! quinn as if they had come from the peer's virtual address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quinn::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::path::Injected;
use crate::proto::relay::{self, Reassembly, Relayed};
use crate::tunnel::relayed::{self, NotSent, Sent};

/// Packets waiting for the control connection before new ones are lost.
const QUEUE: usize = 1024;

/// Relayed sessions of this agent: session ID → the peer's virtual address, for packets
/// coming back from S.
#[derive(Debug, Default)]
pub struct RelaySessions {
    peers: Mutex<HashMap<u64, SocketAddr>>,
}

impl RelaySessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SocketAddr>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One relay session through S, usable as a path: what goes into [`RelayPath::sink`] is
/// sent to S for the peer. Packets of the session coming back are handed to quinn as the
/// peer's for as long as this lives.
#[derive(Debug)]
pub struct RelayPath {
    /// The session's ID.
    pub session: u64,
    /// S's address (what status shows as the path's remote).
    pub server: SocketAddr,
    /// Where the peer's outgoing QUIC packets go.
    pub sink: mpsc::Sender<Bytes>,
    sessions: Arc<RelaySessions>,
}

impl Drop for RelayPath {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.session);
    }
}

/// Makes session `session` on the control connection `conn` to S (at `server`) a path to
/// the peer at `virt`. The receiver completes when the control connection is gone; the
/// sending task ends then, or when every sender of the path is dropped.
pub fn open(
    sessions: &Arc<RelaySessions>,
    conn: &Connection,
    server: SocketAddr,
    session: u64,
    virt: SocketAddr,
) -> (RelayPath, oneshot::Receiver<()>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let (closed_tx, closed) = oneshot::channel();
    sessions.lock().insert(session, virt);
    let conn = conn.clone();
    tokio::spawn(async move {
        let mut split = 0u32;
        loop {
            tokio::select! {
                packet = rx.recv() => match packet {
                    Some(packet) => {
                        if !send(&conn, relay::encode(session, &packet), &mut split) {
                            break;
                        }
                    }
                    // The path was given up.
                    None => return,
                },
                _ = conn.closed() => break,
            }
        }
        let _ = closed_tx.send(());
    });
    let path = RelayPath {
        session,
        server,
        sink: tx,
        sessions: sessions.clone(),
    };
    (path, closed)
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

/// Hands relayed packets arriving on the control connection `conn` to quinn, until it ends.
pub async fn pump(
    sessions: Arc<RelaySessions>,
    injector: mpsc::Sender<Injected>,
    conn: Connection,
) {
    // Pieces come as datagrams; a piece on a stream is possible but rare (see proto::relay).
    let pieces = Arc::new(Mutex::new(Reassembly::default()));
    let deliver = move |payload: Bytes| {
        let (session, what) = relay::decode(&payload)?;
        // Before reassembly, so that pieces of no session of ours take no room there.
        let from = *sessions.lock().get(&session)?;
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
