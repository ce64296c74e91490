//! Sending one relay payload (format in [`crate::proto::relay`]) on a control connection as
//! DATAGRAMs: whole when it fits, in pieces when the connection's MTU has shrunk. Both the
//! agents and S send relayed packets this way; what to do with a payload no datagram can
//! carry (a stream of its own) is left to them.

use bytes::Bytes;
use quinn::{Connection, SendDatagramError};

use crate::proto::relay;

/// How a payload went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// As one datagram.
    Whole,
    /// Split into this many datagrams.
    Split(usize),
}

/// Why a payload did not go out as datagrams.
#[derive(Debug, thiserror::Error)]
pub enum NotSent {
    /// No datagram can carry it, whole or split: it needs a stream. The payload comes back.
    #[error("no datagram can carry {} bytes; it needs a stream", .0.len())]
    NeedsStream(Bytes),
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// Datagrams are switched off on this connection, or a piece failed after the ones
    /// before it went out (the MTU shrank in between); the packet is lost, as in any loss.
    #[error("relay datagram not sent: {0}")]
    Failed(SendDatagramError),
}

/// Sends `payload` as one datagram, or split into fragments numbered `number()` when it is
/// too large for one. quinn drops the oldest queued datagram rather than block when its
/// buffer is full: that is loss, which the QUIC connection inside recovers from.
pub fn send(
    conn: &Connection,
    payload: Bytes,
    number: impl FnOnce() -> u32,
) -> Result<Sent, NotSent> {
    match conn.send_datagram(payload.clone()) {
        Ok(()) => Ok(Sent::Whole),
        Err(SendDatagramError::TooLarge) => {
            let pieces = conn
                .max_datagram_size()
                .and_then(|max| relay::fragment(&payload, max, number));
            let Some(pieces) = pieces else {
                return Err(NotSent::NeedsStream(payload));
            };
            let count = pieces.len();
            for piece in pieces {
                conn.send_datagram(piece).map_err(failed)?;
            }
            Ok(Sent::Split(count))
        }
        Err(SendDatagramError::UnsupportedByPeer) => Err(NotSent::NeedsStream(payload)),
        Err(e) => Err(failed(e)),
    }
}

fn failed(e: SendDatagramError) -> NotSent {
    match e {
        SendDatagramError::ConnectionLost(_) => NotSent::Closed,
        e => NotSent::Failed(e),
    }
}
