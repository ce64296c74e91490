//! The agent: `expose`, `forward` and `up` put together.
//!
//! One agent process has one identity, one UDP socket ([`crate::path::PathSocket`]) and one
//! quinn endpoint on it. [`server`] keeps it registered with S; [`expose`] answers
//! introductions and serves streams to local services; [`forward`] listens on local ports
//! and carries each connection to a peer, which [`peers`] finds and keeps connected.

pub mod backoff;
pub mod expose;
pub mod forward;
pub mod known;
pub mod paths;
pub mod peers;
pub mod relay;
pub mod server;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::path::{PathSocket, Policy};
use crate::proto::{Fingerprint, ALPN_PEER};
use crate::punch::StunRouter;
use crate::tunnel::{endpoint, tls, Identity};

/// A local service to expose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeSpec {
    /// The name to expose it under.
    pub name: String,
    /// Where it listens, `HOST:PORT`.
    pub local: String,
    /// Forwarders allowed to use it; empty allows every agent S introduces.
    pub allow: Vec<Fingerprint>,
}

/// A local port to forward to a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The name to reach.
    pub name: String,
    /// Where to listen locally.
    pub bind: SocketAddr,
}

/// Everything an agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// S as `HOST:PORT`.
    pub server: String,
    /// The token S requires, if any.
    pub token: Option<String>,
    /// S's expected key; without it S's key is pinned on first use.
    pub server_fingerprint: Option<Fingerprint>,
    /// Where the identity and pins are kept.
    pub state_dir: PathBuf,
    /// Where the agent's UDP socket binds.
    pub bind: SocketAddr,
    /// Services to expose.
    pub exposes: Vec<ExposeSpec>,
    /// Ports to forward.
    pub forwards: Vec<ForwardSpec>,
    /// Which port-mapping protocols to ask the gateway with.
    pub portmap: crate::portmap::Mode,
}

/// What every part of a running agent shares.
pub struct Ctx {
    /// The options it runs with.
    pub opts: AgentOptions,
    /// Its identity.
    pub identity: Identity,
    /// The quinn endpoint on its socket.
    pub endpoint: quinn::Endpoint,
    /// STUN dispatch on its socket.
    pub router: Arc<StunRouter>,
    /// The current registration with S.
    pub registration: watch::Receiver<Option<Arc<server::Registered>>>,
    /// What status reports.
    pub activity: status::Activity,
    /// Sessions whose packets S relays.
    pub relays: relay::RelaySessions,
    /// The TCP punching port, if one could be bound.
    pub tcp: Option<Arc<crate::punch::tcp::TcpPunch>>,
    /// The port mappings the gateway granted (empty until, unless, one is).
    pub portmap: watch::Receiver<Vec<crate::portmap::Mapping>>,
}

impl Ctx {
    /// Whether the socket is IPv4.
    pub fn ipv4(&self) -> bool {
        self.router
            .socket()
            .local()
            .map(|a| a.is_ipv4())
            .unwrap_or(true)
    }
}

/// The identity file in a state directory.
pub fn identity_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("identity.pem")
}

/// Runs an agent until Ctrl-C, or until an error that retrying cannot fix.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let identity = Identity::load_or_create(&identity_path(&opts.state_dir))
        .context("cannot load this agent's identity")?;
    let _lock = lock_state_dir(&opts.state_dir)?;
    // Bind the local ports first: a port in use is the user's to fix, now.
    let mut listeners = Vec::new();
    for f in &opts.forwards {
        let listener = tokio::net::TcpListener::bind(f.bind)
            .await
            .with_context(|| format!("cannot listen on {} for forward '{}'", f.bind, f.name))?;
        listeners.push((f.clone(), listener));
    }
    let (socket, stun_rx) = PathSocket::bind(opts.bind, Policy::KnownOnly)
        .with_context(|| format!("cannot bind the UDP socket at {}", opts.bind))?;
    let router = StunRouter::start(socket.clone(), stun_rx);
    // The TCP punching port takes the UDP port's number when it is free, which keeps
    // firewall rules simple; any port works.
    let udp_local = socket.local()?;
    let tcp = crate::punch::tcp::TcpPunch::bind(udp_local)
        .or_else(|_| crate::punch::tcp::TcpPunch::bind(SocketAddr::new(udp_local.ip(), 0)))
        .map_err(|e| tracing::warn!("no TCP punching port ({e}); only UDP and relay paths"))
        .ok();
    // Port mapping runs in the background: registration and punching never wait for it; a
    // mapping that arrives later is sent to S as an update.
    let keeper =
        crate::portmap::Keeper::start(opts.portmap, udp_local, tcp.as_ref().map(|t| t.local()));
    let server_config =
        tls::server_config(identity.cert_chain(), identity.private_key(), ALPN_PEER)?;
    let endpoint = endpoint::make_endpoint(socket, Some(server_config), Some(&identity))
        .context("cannot start the QUIC endpoint")?;

    let (reg_tx, reg_rx) = watch::channel(None);
    let (incoming_tx, incoming_rx) = mpsc::channel(64);
    let ctx = Arc::new(Ctx {
        opts,
        identity,
        endpoint,
        router,
        registration: reg_rx,
        activity: status::Activity::default(),
        relays: relay::RelaySessions::default(),
        tcp,
        portmap: keeper.mappings(),
    });
    tracing::info!(id = %ctx.identity.fingerprint(), udp = ?ctx.router.socket().local().ok(), "agent started");

    let status_path = status::socket_path(&ctx.opts.state_dir);
    let status_task = tokio::spawn(status::serve(ctx.clone(), status_path));
    let control = tokio::spawn(server::run(ctx.clone(), reg_tx, incoming_tx));
    let exposer = expose::Exposer::new(ctx.clone());
    tokio::spawn(exposer.clone().answer_introductions(incoming_rx));
    tokio::spawn(exposer.accept_connections());
    let peers = peers::Peers::new(ctx.clone());
    for (spec, listener) in listeners {
        tracing::info!(name = %spec.name, local = ?listener.local_addr().ok(), "forwarding");
        tokio::spawn(forward::serve(peers.clone(), spec, listener));
    }

    let result = tokio::select! {
        fatal = control => {
            let err = fatal.unwrap_or_else(|e| anyhow::anyhow!("control task failed: {e}"));
            ctx.endpoint.close(crate::tunnel::header::close::SHUTDOWN.into(), b"agent stopped");
            keeper.shutdown(std::time::Duration::from_secs(1)).await;
            Err(err)
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            ctx.endpoint.close(crate::tunnel::header::close::SHUTDOWN.into(), b"agent stopped");
            // Closing the peers' connections and deleting the port mappings go on together;
            // each is bounded, so Ctrl-C never hangs on a silent peer or gateway.
            let wait = std::time::Duration::from_secs(1);
            tokio::join!(
                async { let _ = tokio::time::timeout(wait, ctx.endpoint.wait_idle()).await; },
                keeper.shutdown(wait),
            );
            Ok(())
        }
    };
    // Aborting drops the task's guard, which removes the status socket.
    status_task.abort();
    let _ = status_task.await;
    result
}

/// Takes the state directory's lock for as long as the returned file lives.
///
/// Two agents with one state directory would share one identity, and S keeps one registration
/// per identity: the second would silently take the first one's names offline.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another p2ptun agent is running with the state directory {} (see `p2ptun status`). \
             Run both in one `p2ptun up` config, or give this one its own --state-dir",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Runs `p2ptun netcheck`: probes the network's NAT behaviour against S's STUN addresses.
///
/// The port-mapping probe (the protocols `portmap` allows) runs alongside the STUN probes.
pub async fn netcheck(
    server: &str,
    bind: SocketAddr,
    portmap: crate::portmap::Mode,
) -> anyhow::Result<crate::punch::netcheck::Report> {
    // A PathSocket is read by quinn's endpoint driver: without an endpoint nothing receives.
    let open = || -> anyhow::Result<(Arc<StunRouter>, quinn::Endpoint)> {
        let (socket, rx) = PathSocket::bind(bind, Policy::KnownOnly)
            .with_context(|| format!("cannot bind a UDP socket at {bind}"))?;
        let endpoint = endpoint::make_endpoint(socket.clone(), None, None)?;
        Ok((StunRouter::start(socket, rx), endpoint))
    };
    let ((main, _main_endpoint), (fresh, _fresh_endpoint)) = (open()?, open()?);
    let server_addr = server::resolve(server, bind.is_ipv4()).await?;
    let locals: Vec<SocketAddr> = main
        .socket()
        .local()
        .map(crate::punch::candidates::host_candidates)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.addr)
        .collect();
    let (mut report, mapped) = tokio::join!(
        crate::punch::netcheck::run(&main, &fresh, server_addr, &locals),
        crate::portmap::probe::probe(portmap, bind.ip()),
    );
    report.portmap = mapped;
    Ok(report)
}
