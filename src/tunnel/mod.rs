//! The end-to-end layer: identities and TLS, the QUIC endpoint over [`crate::path::PathSocket`],
//! the header that opens each forwarded stream, and copying bytes between TCP and QUIC.

pub mod copy;
pub mod endpoint;
pub mod header;
pub mod identity;
pub mod relayed;
pub mod tls;

pub use identity::{Identity, IdentityError};
