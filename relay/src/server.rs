//! [`Relay`]: binding S's sockets, and the accept loop that admits connections under the
//! limits and hands each to [`crate::control`], whether it came over UDP or over TCP.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use p2ptun::path::{canonical, PathSocket, Policy, ReplySocket};
use p2ptun::proto::{Fingerprint, ALPN_CONTROL};
use p2ptun::tunnel::endpoint::make_endpoint;
use p2ptun::tunnel::identity::create_private_dir;
use p2ptun::tunnel::tls::{self, TlsError};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::cluster::{self, Cluster, Member};
use crate::config::{ConfigError, RelayConfig};
use crate::control::{self, close, Carrier};
use crate::etcd::Etcd;
use crate::forward;
use crate::identity::{ServerIdentity, ServerIdentityError};
use crate::limits::{Admission, ConnLimits, ConnSlot};
use crate::links::{self, Claim, Links, TcpLink};
use crate::metrics::{self, Gauges, Metrics, Page};
use crate::names::{NameRegistry, NamesError, SWEEP_INTERVAL};
use crate::shared::Shared;
use crate::status;
use crate::stun_server::StunServer;
use crate::tcp::TcpFront;
use crate::token::Tokens;

/// How long a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request streams one agent may have open at once (besides its registration stream). The
/// shared transport settings allow thousands, for tunnels; a control connection needs few.
const MAX_STREAMS_PER_AGENT: u32 = 16;
/// Per-stream receive window: room for one largest frame and then some.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Per-connection receive window, so a stranger's unread data is bounded.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Unidirectional streams (one oversized relayed packet each) an agent may have open at once.
const RELAY_STREAMS_PER_AGENT: u32 = 128;
/// How often S tries to find a port number free on both UDP and TCP when told port 0.
const PORT_ATTEMPTS: usize = 16;

/// Why S could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory could not be made.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// S's identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] ServerIdentityError),
    /// The name claims could not be loaded.
    #[error(transparent)]
    Names(#[from] NamesError),
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source} (set `{key}` or --{flag} to another address)")]
    Bind {
        /// What the socket is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The configuration key that sets it.
        key: &'static str,
        /// The flag that sets it.
        flag: &'static str,
        /// What failed.
        source: std::io::Error,
    },
}

/// A bound, not yet running S.
#[derive(Debug)]
pub struct Relay {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    stun_alt_addr: SocketAddr,
    stun: StunServer,
    metrics_listener: Option<TcpListener>,
    tcp_listener: TcpListener,
    socket: Arc<PathSocket>,
    links: Arc<Links>,
    shared: Arc<Shared>,
    limits: Arc<ConnLimits>,
    fingerprint: Fingerprint,
}

fn bind_error(
    what: &'static str,
    addr: SocketAddr,
    key: &'static str,
) -> impl FnOnce(std::io::Error) -> RelayError {
    move |source| RelayError::Bind {
        what,
        addr,
        key,
        flag: match key {
            "stun_alt" => "stun-alt",
            other => other,
        },
        source,
    }
}

impl Relay {
    /// Loads S's identity and name claims and binds its sockets (port 0 binds any free
    /// port; [`Relay::local_addr`] tells which).
    pub async fn bind(config: RelayConfig) -> Result<Relay, RelayError> {
        config.validate()?;
        create_private_dir(&config.state_dir).map_err(|source| RelayError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let identity = ServerIdentity::load(config.tls.as_ref(), &config.state_dir)?;
        let names = NameRegistry::load(
            &config.state_dir,
            config.name_expiry(),
            std::time::SystemTime::now(),
        )?;
        if let Some(days) = config.name_expiry_days {
            tracing::info!("names unused for {days} days are given up (name_expiry_days)");
        }
        let fingerprint = identity.fingerprint;

        let own_identity = identity.own;
        let mut server_config = tls::server_config(identity.certs, identity.key, ALPN_CONTROL)?;
        // The agent's control-connection settings (datagram buffers, MTU discovery), with
        // S's own limits on what an agent may open and send.
        let mut transport = tls::control_transport_config();
        transport.max_concurrent_bidi_streams((MAX_STREAMS_PER_AGENT + 1).into());
        transport.max_concurrent_uni_streams(RELAY_STREAMS_PER_AGENT.into());
        transport.stream_receive_window(STREAM_WINDOW.into());
        transport.receive_window(CONNECTION_WINDOW.into());
        // The agents' keep-alives keep both ends' timers and the NAT mappings fresh; S
        // sending its own as well would double the packets of an idle S with many agents.
        transport.keep_alive_interval(None);
        // The smaller of the two sides' idle timeouts applies: agents ask for their own 8 s
        // (tls::CONTROL_IDLE_TIMEOUT); older ones, which send keep-alives only every 4 s,
        // keep the 20 s they were made for.
        if let Ok(idle) = Duration::from_secs(20).try_into() {
            transport.max_idle_timeout(Some(idle));
        }
        server_config.transport_config(Arc::new(transport));

        let (udp, tcp_listener, listen) = bind_listen(config.listen, config.ipv4_fallback).await?;
        let (socket, stun_rx) = PathSocket::from_std(udp, Policy::AcceptAll)
            .map_err(bind_error("QUIC and STUN", listen, "listen"))?;
        let local_addr = socket
            .local()
            .map_err(bind_error("QUIC and STUN", listen, "listen"))?;
        let endpoint = make_endpoint(
            Arc::clone(&socket),
            Some(server_config),
            own_identity.as_ref(),
        )
        .map_err(bind_error("QUIC", local_addr, "listen"))?;

        // Validation guarantees an address; the fallback only keeps this total.
        let alt_bind = config
            .stun_alt_bind_beside(listen)
            .unwrap_or(SocketAddr::new(local_addr.ip(), 0));
        let alt = bind_udp(alt_bind)
            .and_then(ReplySocket::from_std)
            .map_err(bind_error("the alternate STUN port", alt_bind, "stun_alt"))?;
        let stun_alt_addr = alt.local_addr().map_err(bind_error(
            "the alternate STUN port",
            alt_bind,
            "stun_alt",
        ))?;

        let metrics_listener = match config.metrics {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(bind_error("metrics", addr, "metrics"))?,
            ),
            None => None,
        };

        if let Some(listener) = &metrics_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!("metrics on http://{addr}/metrics, status page on http://{addr}/");
            }
        }
        let metrics = Arc::new(Metrics::default());
        let stun = StunServer::new(
            Arc::clone(&socket),
            stun_rx,
            alt,
            config.limits.stun_rate_per_ip,
            Arc::clone(&metrics),
        )
        .map_err(bind_error("the alternate STUN port", alt_bind, "stun_alt"))?;
        let tokens = Tokens::new(&config.tokens);
        if tokens.is_open() {
            tracing::warn!(
                "no token configured: ANYONE can register names on this server \
                 (set `tokens` or pass --token)"
            );
        }
        let cluster = match config.cluster_addr().filter(|_| !config.etcd.is_empty()) {
            Some(public_addr) => {
                // Validation has checked the URLs.
                let etcd = Etcd::new(&config.etcd, cluster::CALL_TIMEOUT)
                    .map_err(|problem| ConfigError::Invalid {
                        key: "etcd",
                        problem,
                    })?
                    .with_tls(config.etcd_tls().as_ref())
                    .map_err(|problem| ConfigError::Invalid {
                        key: "etcd_ca/etcd_cert/etcd_key",
                        problem,
                    })?
                    .with_auth(config.etcd_auth());
                tracing::info!(
                    etcd = ?etcd.endpoints(),
                    %public_addr,
                    "cluster mode: names are claimed in etcd, shared with the other S there"
                );
                Some(Cluster::new(
                    etcd,
                    Member {
                        addr: public_addr,
                        fingerprint,
                    },
                ))
            }
            None => None,
        };
        let shared = Arc::new(Shared::new(
            tokens,
            names,
            metrics,
            stun_alt_addr,
            config.relay,
            cluster,
        ));
        if config.relay.session_bytes == 0 {
            tracing::info!("relaying is off (relay_session_bytes = 0)");
        }

        // The fingerprint comes before "listening": whoever waits for the latter (a test
        // harness, an operator's script) finds the former already written.
        tracing::info!(
            "server fingerprint {fingerprint}  (agents pin it on first use; pass \
             --server-fingerprint to be strict)"
        );
        let families = match local_addr.ip() {
            IpAddr::V6(ip) if ip.is_unspecified() => " (IPv6 and IPv4)",
            _ => "",
        };
        tracing::info!(
            state_dir = %config.state_dir.display(),
            "listening for QUIC and STUN on {local_addr}{families}, STUN also on \
             {stun_alt_addr}, QUIC over TCP on {local_addr}"
        );
        let relay = Relay {
            endpoint,
            local_addr,
            stun_alt_addr,
            stun,
            metrics_listener,
            tcp_listener,
            socket,
            links: Arc::new(Links::default()),
            shared,
            limits: ConnLimits::new(config.limits),
            fingerprint,
        };
        Ok(relay)
    }

    /// The UDP address QUIC and STUN are served on; the same address on TCP serves QUIC
    /// over TCP.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The UDP address of the alternate STUN socket.
    pub fn stun_alt_addr(&self) -> SocketAddr {
        self.stun_alt_addr
    }

    /// The address metrics are served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The fingerprint of the certificate S presents.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then closes every connection with a reason.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let Relay {
            endpoint,
            stun,
            metrics_listener,
            tcp_listener,
            socket,
            links,
            shared,
            limits,
            ..
        } = self;
        // Everything spawned lives in these sets, so dropping this future stops all of it.
        let mut background = JoinSet::new();
        background.spawn(stun.run());
        background.spawn(forward::sweep(Arc::clone(&shared)));
        background.spawn(sweep_names(Arc::clone(&shared)));
        if let Some(cluster) = &shared.cluster {
            background.spawn(Arc::clone(cluster).run());
        }
        let front = TcpFront {
            socket,
            links: Arc::clone(&links),
            limits: Arc::clone(&limits),
            metrics: Arc::clone(&shared.metrics),
        };
        background.spawn(front.serve(tcp_listener));
        if let Some(listener) = metrics_listener {
            let (shared, limits) = (Arc::clone(&shared), Arc::clone(&limits));
            background.spawn(metrics::serve(listener, move |page| match page {
                Page::Metrics => {
                    // One lock at a time: the names lock is taken before the directory's
                    // elsewhere, never after it.
                    let names_claimed = shared.names().len() as u64;
                    let agents_online = shared.directory().len() as u64;
                    shared.metrics.render(Gauges {
                        connections: limits.total().into(),
                        handshakes_pending: limits.pending().into(),
                        agents_online,
                        names_claimed,
                        relay_sessions: shared.relay().len() as u64,
                    })
                }
                Page::Status => status::render_html(&status::collect(&shared, &limits)),
                Page::StatusJson => status::render_json(&status::collect(&shared, &limits)),
            }));
        }
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    admit(&shared, &limits, &links, &mut connections, incoming);
                }
                Some(_) = connections.join_next() => {}
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    break;
                }
            }
        }
        endpoint.close(close::SHUTDOWN, b"S is shutting down");
        if let Some(cluster) = &shared.cluster {
            let _ = tokio::time::timeout(Duration::from_secs(1), cluster.leave()).await;
        }
        // Lets the close frames go out; agents learn at once instead of by timeout.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// Sweeps the names ([`Shared::sweep_names`]) at start, before the first agent can have
/// registered for long, and every [`SWEEP_INTERVAL`] after.
async fn sweep_names(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(SWEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        shared.sweep_names(std::time::SystemTime::now()).await;
    }
}

/// Binds UDP and TCP at `listen` ([`bind_udp_and_tcp`]); returns the sockets and the
/// address they were bound at. With `ipv4_fallback`, a `listen` of `[::]` on a host without
/// IPv6 becomes `0.0.0.0` with the same port.
async fn bind_listen(
    listen: SocketAddr,
    ipv4_fallback: bool,
) -> Result<(std::net::UdpSocket, TcpListener, SocketAddr), RelayError> {
    let may_fall_back = ipv4_fallback && listen.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    match bind_udp_and_tcp(listen).await {
        Ok((udp, tcp)) => Ok((udp, tcp, listen)),
        Err(RelayError::Bind { source, .. }) if may_fall_back && no_ipv6(&source) => {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), listen.port());
            tracing::info!(
                "this host has no IPv6 ({source}): listening on {v4}, IPv4 only, instead of \
                 {listen}"
            );
            let (udp, tcp) = bind_udp_and_tcp(v4).await?;
            Ok((udp, tcp, v4))
        }
        Err(e) => Err(e),
    }
}

/// Whether binding an IPv6 socket failed because the host has no IPv6: the kernel has no
/// IPv6 at all (EAFNOSUPPORT) or no IPv6 address to bind (EADDRNOTAVAIL).
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Binds UDP at `listen` and TCP at the same address and port. Told port 0, it draws UDP
/// ports until one is free on TCP as well.
async fn bind_udp_and_tcp(
    listen: SocketAddr,
) -> Result<(std::net::UdpSocket, TcpListener), RelayError> {
    let mut attempt = 1;
    loop {
        let udp = bind_udp(listen).map_err(bind_error("QUIC and STUN", listen, "listen"))?;
        let addr = udp
            .local_addr()
            .map_err(bind_error("QUIC and STUN", listen, "listen"))?;
        match bind_tcp(addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if listen.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < PORT_ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(e) => return Err(bind_error("QUIC over TCP", addr, "listen")(e)),
        }
    }
}

/// Makes a socket for `addr`'s family; an IPv6 one accepts IPv4 as well. IPV6_V6ONLY is set
/// explicitly, as the system's default varies (Linux's `net.ipv6.bindv6only`, and other
/// systems default to on).
fn new_socket(addr: SocketAddr, kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

/// A UDP socket bound at `addr` (dual-stack for an IPv6 address).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A TCP listener at `addr` (dual-stack for an IPv6 address). SO_REUSEADDR, as
/// `TcpListener::bind` sets it, so that a restarted S can bind while its old connections
/// linger in TIME_WAIT.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

fn admit(
    shared: &Arc<Shared>,
    limits: &Arc<ConnLimits>,
    links: &Links,
    connections: &mut JoinSet<()>,
    incoming: quinn::Incoming,
) {
    // An IPv4 client of the dual-stack socket shows up IPv4-mapped; S counts and logs it as
    // the IPv4 address it is (a TCP connection from it is counted so as well).
    let remote = canonical(incoming.remote_address());
    if links::is_virtual(remote) {
        // Carried on TCP: the TCP connection was admitted under the limits already, and its
        // slot passes to the QUIC connection. Anything else from a virtual address (a second
        // connection on one link, or a UDP datagram that claims such a source) is dropped.
        match links.claim(remote) {
            Some(Claim { slot, link }) => {
                connections.spawn(handshake_and_serve(
                    Arc::clone(shared),
                    incoming,
                    slot,
                    Some(link),
                ));
            }
            None => {
                tracing::debug!(%remote, "ignoring QUIC from a virtual address without a free link");
                incoming.ignore();
            }
        }
        return;
    }
    let metrics = &shared.metrics;
    match limits.admit(remote.ip(), incoming.remote_address_validated()) {
        Admission::Accept(slot) => {
            connections.spawn(handshake_and_serve(
                Arc::clone(shared),
                incoming,
                slot,
                None,
            ));
        }
        Admission::Retry => {
            Metrics::inc(&metrics.retries_total);
            if incoming.retry().is_err() {
                tracing::debug!(%remote, "cannot send a Retry");
            }
        }
        Admission::Refuse(why) => {
            metrics.refused(why);
            tracing::debug!(%remote, limit = why.label(), "refusing a connection");
            incoming.refuse();
        }
    }
}

/// Completes the handshake and serves the connection; `link` is the TCP connection carrying
/// it, if any (dropping it at the end tells the TCP side).
async fn handshake_and_serve(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    slot: ConnSlot,
    link: Option<TcpLink>,
) {
    let remote = link
        .as_ref()
        .map_or(canonical(incoming.remote_address()), |link| link.peer);
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "cannot accept");
            return;
        }
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            return;
        }
    };
    slot.handshake_done();
    Metrics::inc(&shared.metrics.connections_total);
    match link {
        None => control::serve(shared, conn, Carrier::Udp, slot.clone()).await,
        Some(link) => {
            let carrier = Carrier::Tcp {
                peer: link.peer,
                local: link.local,
            };
            let mut serve = pin!(control::serve(shared, conn.clone(), carrier, slot.clone()));
            tokio::select! {
                () = &mut serve => {}
                () = link.tcp_ended.notified() => {
                    // Closing lets the agent's state at S be cleaned up now rather than at
                    // the idle timeout; serve() notices and finishes.
                    conn.close(close::LINK_LOST, b"the TCP connection carrying it ended");
                    serve.await;
                }
            }
        }
    }
    drop(slot);
}

/// Binds S as `config` says and serves until Ctrl-C or SIGTERM.
pub async fn run(config: RelayConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let relay = Relay::bind(config)
        .await
        .context("cannot start the relay")?;
    relay.run_until(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        // Without signal handling, run until killed.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_ipv6_is_told_from_other_bind_failures() {
        for errno in [libc::EAFNOSUPPORT, libc::EADDRNOTAVAIL] {
            assert!(no_ipv6(&std::io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::EADDRINUSE, libc::EACCES] {
            assert!(!no_ipv6(&std::io::Error::from_raw_os_error(errno)));
        }
    }

    #[tokio::test]
    async fn an_ipv6_bind_accepts_ipv4_too() {
        let Ok(udp) = bind_udp("[::]:0".parse().unwrap()) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "[::] cannot be bound, and CI=true requires IPv6"
            );
            println!("SKIPPED: no IPv6 here");
            return;
        };
        udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let only_v6 = socket2::SockRef::from(&udp).only_v6().unwrap();
        assert!(!only_v6, "the UDP socket is dual-stack");
        let port = udp.local_addr().unwrap().port();
        let tcp = bind_tcp(SocketAddr::from(([0u16; 8], port))).unwrap();
        assert!(!socket2::SockRef::from(&tcp).only_v6().unwrap());
        // An IPv4 client reaches both.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"v4", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"v4");
        assert_eq!(canonical(from), client.local_addr().unwrap());
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
    }
}
