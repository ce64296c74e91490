//! The agent: `expose`, `forward` and `up` put together.
//!
//! One agent process has one identity, one UDP socket ([`crate::path::PathSocket`]) and one
//! quinn endpoint on it, shared by every part through [`ctx::Ctx`]. [`server`] keeps it
//! registered with S; [`link`] owns everything that carries traffic to each peer agent and
//! keeps its paths healthy; [`expose`] hands S's introductions to the links and serves
//! streams to local services; [`forward`] listens on local ports and carries each connection
//! to a peer, whose connection [`peers`] makes, and [`udp`] does both for UDP services;
//! [`services`] holds which are running and
//! reloads them. [`socket`] answers local commands ([`status`], [`ping`], reload). [`Agent`] runs all of it in this process.

pub mod activity;
pub mod backoff;
pub mod ctx;
pub mod dial;
pub mod expose;
pub mod forward;
pub mod heal;
pub mod known;
pub mod link;
pub mod paths;
pub mod peers;
pub mod ping;
pub mod registration;
pub mod relay;
pub mod server;
pub mod services;
pub mod socket;
pub mod status;
pub mod udp;
pub mod visit;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use ctx::{AgentOptions, Ctx, ExposeSpec, ForwardSpec, Protocol};

use crate::path::{PathSocket, Policy};
use crate::proto::ALPN_PEER;
use crate::punch::candidates::{ipv4_side, Families};
use crate::punch::StunRouter;
use crate::tunnel::{endpoint, tls, Identity};
use server::ServerEvent;

/// The identity file in a state directory.
pub fn identity_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("identity.pem")
}

/// A running agent: its tasks, its status, and how to stop it. [`Agent::start`] runs one in
/// this process (tests do, and [`run`] for the binary).
pub struct Agent {
    ctx: Arc<Ctx>,
    links: Arc<link::Links>,
    peers: peers::Peers,
    services: Arc<services::Services>,
    control: JoinHandle<anyhow::Error>,
    tasks: Vec<JoinHandle<()>>,
    status_task: JoinHandle<anyhow::Result<()>>,
    keeper: crate::portmap::Keeper,
    _lock: std::fs::File,
}

impl Agent {
    /// Starts an agent with `opts`: binds its local ports and socket, then registers with
    /// S, exposes and forwards in the background. Fails at once on what the user must fix
    /// (a port in use, a state directory another agent holds).
    pub async fn start(opts: AgentOptions) -> anyhow::Result<Agent> {
        Agent::start_from(opts, None).await
    }

    /// As [`Agent::start`], for options read from `source`, which the agent reads again to
    /// reload ([`services`]).
    pub async fn start_from(
        mut opts: AgentOptions,
        source: Option<services::Source>,
    ) -> anyhow::Result<Agent> {
        let identity = Identity::load_or_create(&identity_path(&opts.state_dir))
            .context("cannot load this agent's identity")?;
        let lock = lock_state_dir(&opts.state_dir)?;
        // Bind the local ports first: a port in use is the user's to fix, now.
        let mut listeners = Vec::new();
        for f in &opts.forwards {
            listeners.push((f.clone(), services::Listener::bind(f).await?));
        }
        let udp = bind_udp(opts.bind)
            .with_context(|| format!("cannot bind the UDP socket at {}", opts.bind))?;
        let (socket, stun_rx) = PathSocket::from_std(udp, Policy::KnownOnly)
            .with_context(|| format!("cannot use the UDP socket at {}", opts.bind))?;
        let router = StunRouter::start(socket.clone(), stun_rx);
        // The TCP punching port takes the UDP port's number when it is free, which keeps
        // firewall rules simple; any port works.
        // TCP punching is IPv4 only: a dual-stack agent's punching port listens on IPv4's
        // wildcard (IPv6 needs no NAT traversal, and its UDP paths are checked directly).
        let udp_local = ipv4_side(socket.local()?);
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
        let (events_tx, mut events) = mpsc::channel(64);
        let exposes = watch::Sender::new(std::mem::take(&mut opts.exposes));
        let ctx = Arc::new(Ctx {
            opts,
            exposes,
            identity,
            endpoint,
            router,
            registration: reg_rx,
            activity: activity::Activity::default(),
            relays: Arc::default(),
            tcp,
            portmap: keeper.mappings(),
            demuxes: Default::default(),
        });
        tracing::info!(id = %ctx.identity.fingerprint(), udp = ?ctx.router.socket().local().ok(), "agent started");

        let visits = visit::Visits::new(ctx.clone(), events_tx.clone());
        let links = link::Links::new(ctx.clone(), visits);
        let peers = peers::Peers::new(ctx.clone(), links.clone());
        let services = services::Services::start(ctx.clone(), peers.clone(), listeners, source);
        let answers = socket::Answers {
            ctx: ctx.clone(),
            links: links.clone(),
            peers: peers.clone(),
            services: services.clone(),
        };
        let status_task = tokio::spawn(socket::serve(
            answers,
            socket::socket_path(&ctx.opts.state_dir),
        ));
        let control = tokio::spawn(server::run(ctx.clone(), reg_tx, events_tx));
        let exposer = expose::Exposer::new(ctx.clone(), links.clone());
        let mut tasks = Vec::new();
        {
            let (exposer, links) = (exposer.clone(), links.clone());
            tasks.push(tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        ServerEvent::Introduced(rv, reg) => exposer.introduced(*rv, reg).await,
                        ServerEvent::RelayClosed { session } => links.relay_closed(session),
                    }
                }
            }));
        }
        tasks.push(tokio::spawn(exposer.accept_connections()));
        tasks.push(tokio::spawn(services.clone().watch()));
        Ok(Agent {
            ctx,
            links,
            peers,
            services,
            control,
            tasks,
            status_task,
            keeper,
            _lock: lock,
        })
    }

    /// What `p2ptun status` would show of this agent now.
    pub fn status(&self) -> status::Status {
        status::snapshot(&self.ctx, &self.links)
    }

    /// Pings the exposer of `req.name` (see [`ping`]), sending each event to `out`.
    pub async fn ping(&self, req: &ping::PingRequest, out: mpsc::Sender<ping::PingEvent>) {
        ping::run(&self.peers, req, out).await
    }

    /// Waits until the agent fails in a way retrying cannot fix (S refused its token or a
    /// name), and returns why.
    pub async fn failed(&mut self) -> anyhow::Error {
        (&mut self.control)
            .await
            .unwrap_or_else(|e| anyhow::anyhow!("control task failed: {e}"))
    }

    /// Stops the agent: closes the peers' connections and deletes the port mappings, each
    /// bounded by a second, so this never hangs on a silent peer or gateway.
    pub async fn shutdown(self) {
        self.ctx.endpoint.close(
            crate::tunnel::header::close::SHUTDOWN.into(),
            b"agent stopped",
        );
        let wait = Duration::from_secs(1);
        tokio::join!(
            async {
                let _ = tokio::time::timeout(wait, self.ctx.endpoint.wait_idle()).await;
            },
            self.keeper.shutdown(wait),
        );
        self.control.abort();
        self.services.stop().await;
        for task in &self.tasks {
            task.abort();
        }
        // Aborting drops the task's guard, which removes the status socket.
        self.status_task.abort();
        let _ = self.status_task.await;
    }
}

/// Runs an agent until Ctrl-C, or until an error that retrying cannot fix; one started from
/// a file (`source`) reloads it on SIGHUP, when it changes, and on `p2ptun reload`.
pub async fn run(opts: AgentOptions, source: Option<services::Source>) -> anyhow::Result<()> {
    let mut agent = Agent::start_from(opts, source).await?;
    tokio::select! {
        fatal = agent.failed() => {
            agent.shutdown().await;
            Err(fatal)
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            agent.shutdown().await;
            Ok(())
        }
    }
}

/// Runs `p2ptun release NAME`: gives `name` back to S with the key of `opts.state_dir`.
///
/// Takes no lock on the state directory and registers nothing, so it can run beside the
/// agent of that directory; S refuses while that agent exposes `name`.
pub async fn release(opts: AgentOptions, name: &str) -> anyhow::Result<()> {
    let id_path = identity_path(&opts.state_dir);
    // A key made now would own nothing: the user gave the wrong state directory.
    anyhow::ensure!(
        id_path.exists(),
        "{} holds no identity, so it holds no names; pass the --state-dir of the agent \
         that exposed '{name}'",
        opts.state_dir.display()
    );
    let identity =
        Identity::load_or_create(&id_path).context("cannot load this agent's identity")?;
    let udp = bind_udp(opts.bind)
        .with_context(|| format!("cannot bind the UDP socket at {}", opts.bind))?;
    let (socket, stun_rx) = PathSocket::from_std(udp, Policy::KnownOnly)
        .with_context(|| format!("cannot use the UDP socket at {}", opts.bind))?;
    let router = StunRouter::start(socket.clone(), stun_rx);
    let endpoint =
        endpoint::make_endpoint(socket, None, None).context("cannot start the QUIC endpoint")?;
    // The parts of a Ctx that only a running agent fills stay empty.
    let ctx = Ctx {
        opts,
        exposes: watch::Sender::new(Vec::new()),
        identity,
        endpoint,
        router,
        registration: watch::channel(None).1,
        activity: activity::Activity::default(),
        relays: Arc::default(),
        tcp: None,
        portmap: watch::channel(Vec::new()).1,
        demuxes: Default::default(),
    };
    let released = server::release(&ctx, name).await;
    // Lets the close frame go out, so S forgets the connection at once.
    let _ = tokio::time::timeout(Duration::from_secs(1), ctx.endpoint.wait_idle()).await;
    released
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

/// Binds the agent's UDP socket at `addr`. The unspecified IPv6 address makes one
/// dual-stack socket (IPv4 peers appear IPv4-mapped), so one socket still carries
/// everything; on a host without IPv6 it falls back to IPv4's unspecified address.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = |addr: SocketAddr| -> std::io::Result<std::net::UdpSocket> {
        let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_only_v6(false)?;
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    match addr {
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => dual(addr).or_else(|e| {
            let v4 = ipv4_side(addr);
            tracing::info!("no IPv6 on this host ({e}); the agent uses IPv4 only, at {v4}");
            std::net::UdpSocket::bind(v4)
        }),
        _ => std::net::UdpSocket::bind(addr),
    }
}

/// Runs `p2ptun netcheck`: probes the network's NAT behaviour against S's STUN addresses,
/// over IPv4 (mapping and filtering) and over IPv6 (reachability and whether there is NAT).
///
/// The port-mapping probe (the protocols `portmap` allows) runs alongside the STUN probes.
pub async fn netcheck(
    server: &str,
    bind: SocketAddr,
    portmap: crate::portmap::Mode,
) -> anyhow::Result<crate::punch::netcheck::Report> {
    // A PathSocket is read by quinn's endpoint driver: without an endpoint nothing receives.
    let open = || -> anyhow::Result<(Arc<StunRouter>, quinn::Endpoint)> {
        let std = bind_udp(bind).with_context(|| format!("cannot bind a UDP socket at {bind}"))?;
        let (socket, rx) = PathSocket::from_std(std, Policy::KnownOnly)
            .with_context(|| format!("cannot use the UDP socket at {bind}"))?;
        let endpoint = endpoint::make_endpoint(socket.clone(), None, None)?;
        Ok((StunRouter::start(socket, rx), endpoint))
    };
    let ((main, _main_endpoint), (fresh, _fresh_endpoint)) = (open()?, open()?);
    let local = main.socket().local()?;
    let addrs = dial::resolve(server, Families::of(local)).await?;
    let locals: Vec<SocketAddr> = crate::punch::candidates::host_candidates(local)
        .into_iter()
        .map(|c| c.addr)
        .collect();
    let v4 = async {
        match addrs.iter().find(|a| a.is_ipv4()) {
            Some(v4) => Some(crate::punch::netcheck::run(&main, &fresh, *v4, &locals).await),
            None => None,
        }
    };
    let v6 =
        crate::punch::netcheck::ipv6(&main, addrs.iter().copied().find(|a| a.is_ipv6()), &locals);
    let portmap_ip = if local.is_ipv4() {
        local.ip()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let (report, ipv6, mapped) =
        tokio::join!(v4, v6, crate::portmap::probe::probe(portmap, portmap_ip),);
    let mut report = report.unwrap_or_else(crate::punch::netcheck::Report::no_ipv4);
    report.ipv6 = ipv6;
    report.portmap = mapped;
    Ok(report)
}
