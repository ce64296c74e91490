//! TLS for both kinds of connection p2ptun makes: to S (ALPN `p2ptun/1`) and to a peer (ALPN
//! `p2ptun-peer/1`).
//!
//! Identities are self-signed keys, so the handshake itself only proves that each side holds
//! the key of the certificate it shows; rustls checks that. *Which* key is acceptable is
//! decided after the handshake, by fingerprint ([`peer_fingerprint`]), where the caller can
//! say exactly what was wrong and what to do about it, before any secret (a token) or any
//! tunnel byte is sent.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::identity::{fingerprint_of_cert, Identity};
use crate::proto::Fingerprint;

/// Why a TLS configuration could not be built or a certificate not verified.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The QUIC layer refused the TLS configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by every p2ptun connection.
///
/// Keep-alives every 4 s keep NAT mappings open even behind NATs with 10 s UDP timeouts. The
/// connection-level receive window stays unlimited (quinn's default) so that a stalled stream
/// can only fill its own window and never blocks its siblings.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(4)));
    if let Ok(idle) = Duration::from_secs(20).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(16_384u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((4u32 << 20).into());
    t.send_window(32 << 20);
    t
}

/// The largest UDP payload the end-to-end connection probes up to. Relayed, its packets ride
/// inside DATAGRAM frames of the control connection with an 8-byte session tag and about 40
/// bytes of outer QUIC overhead: whole once the control connection's MTU reaches
/// [`CONTROL_MTU`], in pieces below that (see [`crate::proto::relay`]).
pub const PEER_MAX_MTU: u16 = 1400;

/// The largest UDP payload a control connection probes up to: room for a relayed packet of
/// [`PEER_MAX_MTU`] in one datagram.
///
/// It starts at QUIC's 1200 and finds the path's MTU in a few round trips after the
/// handshake; until then, and for good on paths that carry less, relayed packets go in pieces.
/// Starting at 1452 instead stalls relayed traffic on a path that cannot carry it (measured:
/// pauses over a second): quinn notices a black hole only after several rounds of loss.
pub const CONTROL_MTU: u16 = 1452;

/// How soon a control connection looks for its MTU again after quinn's black-hole detection
/// dropped it to 1200.
///
/// Relayed traffic is almost all full-size datagrams, so an ordinary congestion loss (a busy
/// receiver's socket buffer overflowing) looks to quinn like full-size packets vanishing, and
/// it decides the path is a black hole. Relayed packets then go in pieces until the MTU is
/// found again; at quinn's default of one minute that cost a lot (before pieces, when each
/// such packet went on a stream of its own, 8 streams relayed to a one-thread agent fell
/// from ~250 to ~50 MiB/s). A real black hole costs a few lost probes per try, so trying
/// again soon is cheap.
pub const CONTROL_BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(1);

/// How often a control connection below [`CONTROL_MTU`] searches again. quinn sends a probe
/// only when nothing else waits, and a probe lost three times ends the search; under a
/// sustained relayed load after a spurious black hole that can leave the MTU short, and
/// relayed packets in pieces, until the next search (quinn's default: 10 minutes). At the
/// upper bound a search sends nothing, so a healthy connection pays nothing for this.
pub const CONTROL_MTU_SEARCH_EVERY: Duration = Duration::from_secs(30);

/// MTU discovery of control connections (both ends use [`control_transport_config`]): up
/// to [`CONTROL_MTU`], and see [`CONTROL_BLACK_HOLE_COOLDOWN`] and
/// [`CONTROL_MTU_SEARCH_EVERY`].
fn control_mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(CONTROL_MTU);
    mtu.black_hole_cooldown(CONTROL_BLACK_HOLE_COOLDOWN);
    mtu.interval(CONTROL_MTU_SEARCH_EVERY);
    mtu
}

/// Transport settings of the end-to-end connection between agents.
pub fn peer_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(PEER_MAX_MTU);
    t.mtu_discovery_config(Some(mtu));
    // BBR rather than Cubic: on lossy paths (the lab's 2% loss, 100 ms RTT) Cubic halves its
    // window at every random loss and crawls; BBR paces by measured bandwidth.
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// How long a control connection lives without hearing from the other side. Shorter than
/// the peers' 20 s: an agent whose S died must notice, register with another S of the
/// cluster and get a new relay session there before a relayed peer connection times out.
/// QUIC restarts the idle timer when it sends the first packet after hearing last, so
/// silence is noticed between this and this plus [`CONTROL_KEEP_ALIVE`] after it began.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(8);

/// How often an idle control connection sends a keep-alive: often enough that three lost
/// in a row are forgiven within [`CONTROL_IDLE_TIMEOUT`]; for S, one small packet per
/// agent every 2 s.
pub const CONTROL_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Transport settings of an agent's control connection to S, which also carries relayed
/// packets as datagrams.
pub fn control_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    t.keep_alive_interval(Some(CONTROL_KEEP_ALIVE));
    // S opens no request streams toward an agent (it pushes on the one the agent opened to
    // register), and quinn keeps state for every stream the other side may open: about
    // 1 MB per control connection at the peers' 16,384. S sets its own limit.
    t.max_concurrent_bidi_streams(0u32.into());
    if let Ok(idle) = CONTROL_IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t.mtu_discovery_config(Some(control_mtu_discovery()));
    // S sends a relayed payload no datagram can carry, even in pieces, on a stream of its own.
    t.max_concurrent_uni_streams(128u32.into());
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    t
}

/// The transport settings for a connection speaking `alpn`.
fn transport_for(alpn: &[u8]) -> quinn::TransportConfig {
    if alpn == crate::proto::ALPN_CONTROL {
        control_transport_config()
    } else {
        peer_transport_config()
    }
}

/// A client configuration presenting `identity`, accepting any certificate whose handshake
/// signature checks out; the caller then checks [`peer_fingerprint`]. The transport settings
/// follow the ALPN: [`control_transport_config`] for S, [`peer_transport_config`] otherwise.
pub fn client_config(identity: &Identity, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_for(alpn)));
    Ok(config)
}

/// A server configuration presenting `certs`/`key` that requires every client to present a
/// certificate (any key; the caller checks [`peer_fingerprint`]).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyCert(provider())))
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_for(alpn)));
    Ok(config)
}

/// The certificates the other side of `conn` presented.
pub fn peer_certs(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
        .unwrap_or_default()
}

/// The fingerprint of the key the other side of `conn` proved it holds.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    peer_certs(conn)
        .first()
        .and_then(|c| fingerprint_of_cert(c).ok())
}

/// Verifies a server's chain against the system's root certificates for `host`: how an agent
/// accepts an S whose certificate a CA issued.
pub fn verify_with_system_roots(
    certs: &[CertificateDer<'static>],
    host: &str,
) -> Result<(), String> {
    let (end, rest) = certs.split_first().ok_or("no certificate presented")?;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        return Err("no system root certificates found".into());
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(end, rest, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Accepts any certificate as the peer's identity, but still verifies handshake signatures
/// against it, so the peer must hold that certificate's key.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for AnyCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}
