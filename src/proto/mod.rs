//! The wire protocol shared by agents and S: control messages and their framing, the
//! fingerprint that names an identity, and STUN (RFC 8489) encoding.
//!
//! Nothing here does I/O beyond reading and writing frames on a stream handed in, so every
//! message type is tested without sockets.

mod fingerprint;
mod frame;
mod msg;
pub mod relay;
pub mod stun;

pub use fingerprint::{Fingerprint, FingerprintError};
pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME};
pub use msg::*;

/// ALPN of the control connection between an agent and S.
pub const ALPN_CONTROL: &[u8] = b"p2ptun/1";
/// ALPN of the end-to-end connection between two agents.
pub const ALPN_PEER: &[u8] = b"p2ptun-peer/1";
/// Version of the control protocol; S refuses agents that speak another. 3: relayed packets
/// may come in pieces and session IDs never have their top bit set ([`relay`]).
pub const PROTOCOL_VERSION: u32 = 3;
