//! Paths to peers, and the one UDP socket they all share.
//!
//! quinn sees each peer at one stable *virtual* address; [`PathTable`] maps that address to
//! the peer's best working path and back, and [`PathSocket`] applies the mapping to every
//! datagram while taking STUN out of the stream before quinn sees it. Changing a peer's path
//! is therefore invisible to the QUIC connection above: no stream notices.

mod batch;
mod socket;
mod table;
pub mod tcp;

pub use socket::{Injected, PathSocket, Policy, Received, ReplySocket, StunPacket};
pub use table::{canonical, PathKind, PathStatus, PathTable, PeerStatus, Route};
