//! Building a quinn endpoint over a [`PathSocket`].

use std::sync::Arc;

use super::Identity;
use crate::path::PathSocket;

/// A quinn endpoint on `socket`, serving `server` if given.
///
/// QUIC's fixed bit is never greased, because STUN shares the socket and is told apart from
/// QUIC by that very bit. With an `identity`, the stateless-reset key is derived from it, so
/// after a restart the process can still reset connections its former self had: peers learn
/// at once that the old connection is gone instead of waiting for an idle timeout.
pub fn make_endpoint(
    socket: Arc<PathSocket>,
    server: Option<quinn::ServerConfig>,
    identity: Option<&Identity>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = match identity {
        Some(id) => {
            let secret = id.derive_secret(b"p2ptun stateless reset key");
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
            quinn::EndpointConfig::new(Arc::new(key))
        }
        None => quinn::EndpointConfig::default(),
    };
    config.grease_quic_bit(false);
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, Arc::new(quinn::TokioRuntime))
}
