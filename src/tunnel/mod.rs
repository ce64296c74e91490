//! The end-to-end layer: identities and TLS, the QUIC endpoint over [`crate::path::PathSocket`],
//! the header that opens each forwarded stream, copying bytes between TCP and QUIC, and
//! UDP flows as QUIC datagrams.

pub mod copy;
pub mod endpoint;
pub mod flow;
pub mod header;
pub mod identity;
pub mod relayed;
pub mod tls;

pub use identity::{Identity, IdentityError};
