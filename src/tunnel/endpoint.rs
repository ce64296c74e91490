//! Building a quinn endpoint over a [`PathSocket`].

use std::sync::Arc;

use super::Identity;
use crate::path::PathSocket;

/// A quinn endpoint on `socket`, serving `server` if given.
///
/// QUIC's fixed bit is never greased, because STUN shares the socket and is told apart from
/// QUIC by that very bit. With an `identity`, the stateless-reset key and the key that
/// connection IDs are hashed with are derived from it, so after a restart the process still
/// recognises the connection IDs its former self issued and can reset those connections:
/// peers learn at once that the old connection is gone instead of waiting for an idle
/// timeout. (With quinn's random per-process CID key, the old IDs look invalid and the
/// packets are dropped without a reset.)
pub fn make_endpoint(
    socket: Arc<PathSocket>,
    server: Option<quinn::ServerConfig>,
    identity: Option<&Identity>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = match identity {
        Some(id) => {
            let secret = id.derive_secret(b"p2ptun stateless reset key");
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
            let mut config = quinn::EndpointConfig::new(Arc::new(key));
            let cid_secret = id.derive_secret(b"p2ptun connection id key");
            let mut cid_key = [0u8; 8];
            cid_key.copy_from_slice(&cid_secret[..8]);
            let cid_key = u64::from_le_bytes(cid_key);
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    config.grease_quic_bit(false);
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, Arc::new(quinn::TokioRuntime))
}
