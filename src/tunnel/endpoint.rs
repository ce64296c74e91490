//! Building a quinn endpoint over a [`PathSocket`].

use std::sync::Arc;

use crate::path::PathSocket;

/// A quinn endpoint on `socket`, serving `server` if given.
///
/// QUIC's fixed bit is never greased, because STUN shares the socket and is told apart from
/// QUIC by that very bit.
pub fn make_endpoint(
    socket: Arc<PathSocket>,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config.grease_quic_bit(false);
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, Arc::new(quinn::TokioRuntime))
}
