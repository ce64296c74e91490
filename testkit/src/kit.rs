//! The test kit's one bundle: S, an exposing agent, a forwarding agent and the services they
//! carry ([`Tunnel`]), started by one builder ([`Kit`]) for every caller: the loopback tests,
//! the NAT-lab tests, the grid and the benchmark.
//!
//! - **Where** ([`Place`]): this network namespace, or a named one (a lab host, S's
//!   namespace). A process is started inside it; an agent in a namespace is always a process.
//! - **How** ([`How`]): `p2ptun expose` and `p2ptun forward` processes, `p2ptun up -c FILE`
//!   daemons, or inside the test process: S by `Relay::bind` and `run`
//!   ([`LocalRelay`]), the agents by `Agent::start` ([`LocalAgent`]). In-process parts run
//!   on 127.0.0.1 only, each on a tokio runtime of its own with one worker (as the agent
//!   binary runs by default), so that their timers and path checks never wait behind the
//!   test's clients and services, and so that dropping one stops all of its tasks. They log
//!   to the test's captured output (`P2PTUN_TEST_LOG`, default `info`), and a panic on one
//!   of their threads fails the tunnel's health check as a "panicked" line in a process's
//!   log does. They are for tests where the process boundary is not the point; tests of
//!   the command line, exit codes, signals, logs, or S restarting as a process keep
//!   processes.
//! - **S**: started with the tunnel ([`Kit::relay_opts`]; [`RelayOpts`] says where, on
//!   which addresses, with which flags), handed to it ([`Kit::relay`]), or someone else's
//!   that the agents only talk to ([`Kit::server`], as the benchmark's many pairs do).
//! - **Ready** ([`Ready`]): what starting waits for before it returns.
//!
//! The exposer starts first and must register before the forwarder starts;
//! [`Tunnel::forwarder_started`] is when the forwarder was started, for callers that time
//! the setup. The exposer is told S's key (when the kit knows it), the forwarder pins it on
//! first use, as a user who copied it from S's log and one who did not would.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::natlab::{self, netns, Host};
use super::{
    agent_bin, agent_status, child_env_level, find_fingerprint, free_port, is_fingerprint,
    log_level, relay_bin, run_command, stun_ping, try_wait_tunnel, Lab, Proc, RunOutput, Service,
    ONE_SHOT, RELAY_START, TUNNEL_READY,
};

/// How long an agent may take to register with S.
pub const REGISTER: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Where things run

/// Where a process runs: this network namespace, or a named one (a NAT-lab host's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    ns: Option<String>,
}

impl Place {
    /// This namespace.
    pub fn here() -> Place {
        Place::default()
    }

    /// The network namespace `ns` (a lab host's is `Place::from(&host)`).
    pub fn netns(ns: &str) -> Place {
        Place {
            ns: Some(ns.to_owned()),
        }
    }

    /// The namespace's name, unless it is this one.
    pub fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// Whether this is the test's own namespace.
    pub fn is_here(&self) -> bool {
        self.ns.is_none()
    }

    /// A command that runs `program` here.
    pub fn command(&self, program: impl AsRef<OsStr>) -> io::Result<Command> {
        match &self.ns {
            None => Ok(Command::new(program)),
            Some(ns) => netns::command(ns, program),
        }
    }

    /// Runs `f` on a thread in this place (sockets it opens stay here); panics if the
    /// namespace is gone.
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        match &self.ns {
            None => f(),
            Some(ns) => {
                netns::run_in(ns, f).unwrap_or_else(|e| panic!("cannot enter namespace {ns}: {e}"))
            }
        }
    }

    /// A tokio runtime with `workers` threads, all in this place, so that every socket its
    /// tasks open is here (`block_on` runs on the caller's thread: spawn the work instead).
    pub fn runtime(&self, name: &str, workers: usize) -> io::Result<Runtime> {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).thread_name(name).enable_all();
        if let Some(ns) = &self.ns {
            let file = Arc::new(netns::open(ns)?);
            let ns = ns.clone();
            b.on_thread_start(move || {
                if let Err(e) = netns::enter(&file) {
                    panic!("cannot enter namespace {ns}: {e}");
                }
            });
        }
        b.build()
    }
}

impl From<&Host> for Place {
    fn from(host: &Host) -> Place {
        Place::netns(host.ns())
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ns {
            None => f.write_str("this namespace"),
            Some(ns) => write!(f, "namespace {ns}"),
        }
    }
}

/// Something the kit started (a process, or S or an agent in this process) as health
/// checks and failure messages see it.
pub trait Runs {
    /// Its name in messages.
    fn label(&self) -> &str;
    /// Whether it still runs.
    fn is_running(&self) -> bool;
    /// One line naming it, its state and where its log is.
    fn brief(&self) -> String;
    /// Its last log lines with a heading (an in-process part logs to the test's output).
    fn report(&self) -> String {
        self.brief()
    }
    /// Panics if it panicked (a process: its log shows a Rust panic).
    fn assert_no_panic(&self);
}

impl Runs for Proc {
    fn label(&self) -> &str {
        &self.label
    }
    fn is_running(&self) -> bool {
        Proc::is_running(self)
    }
    fn brief(&self) -> String {
        Proc::brief(self)
    }
    fn report(&self) -> String {
        Proc::report(self)
    }
    fn assert_no_panic(&self) {
        Proc::assert_no_panic(self)
    }
}

/// Panics on the threads of in-process parts: (thread name, message).
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// A multi-thread runtime with one worker, for one in-process part, and the name of its
/// threads (`kit-LABEL-N`, unique in this process).
fn own_runtime(label: &str) -> io::Result<(Runtime, String)> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let name = format!("kit-{label}-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(&name)
        .enable_all()
        .build()?;
    Ok((rt, name))
}

/// Once per test binary: sends the logs of in-process parts to the test's captured output,
/// and records panics on their threads (a task's panic ends only that task, as a process's
/// would leave a "panicked" line in its log).
fn init_in_process() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::new(log_level("P2PTUN_TEST_LOG", "info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_test_writer()
            .try_init();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(name) = std::thread::current().name() {
                if name.starts_with("kit-") {
                    PANICS
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((name.to_owned(), info.to_string()));
                }
            }
            previous(info);
        }));
    });
}

/// Panics with the message of every panic on the threads named `thread` (see
/// [`own_runtime`]), if there was one.
fn assert_no_panic_on(label: &str, thread: &str) {
    let panics: Vec<String> = PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(name, _)| name == thread)
        .map(|(_, msg)| msg.clone())
        .collect();
    if !panics.is_empty() {
        panic!("{label} (in this process) panicked:\n{}", panics.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// S

/// How to start S.
#[derive(Debug, Clone, Default)]
pub struct RelayOpts {
    /// `--token` values (agents made with [`Lab::agent`] use the first).
    pub tokens: Vec<String>,
    /// Further arguments.
    pub extra_args: Vec<String>,
    /// Where S runs.
    pub place: Place,
    /// Its listen and second STUN addresses; `None`: 127.0.0.1 with free ports.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Started with its defaults, as the README tells an operator (no `--listen` and
    /// `--stun-alt`); `addrs` are then where agents find it, not flags.
    pub no_address_flags: bool,
    /// Inside the test process ([`LocalRelay`]) instead of as `p2ptun-relay`.
    pub in_process: bool,
    /// `RUST_LOG` of the process (default `P2PTUN_TEST_LOG`, else `info`).
    pub log: Option<String>,
}

impl RelayOpts {
    /// S in the NAT lab: in its namespace, on [`natlab::S_LISTEN`] and [`natlab::S_ALT`].
    pub fn lab(lab: &natlab::Lab) -> RelayOpts {
        RelayOpts {
            place: Place::netns(lab.s_ns()),
            addrs: Some((
                natlab::S_LISTEN.parse().expect("S's lab address"),
                natlab::S_ALT.parse().expect("S's second lab address"),
            )),
            ..RelayOpts::default()
        }
    }

    /// S in the NAT lab started as an operator would, with no address flags: it listens on
    /// both families' wildcard at its default ports; agents reach it at [`natlab::S_LISTEN`].
    pub fn lab_defaults(lab: &natlab::Lab) -> RelayOpts {
        let main: SocketAddr = natlab::S_LISTEN.parse().expect("S's lab address");
        RelayOpts {
            addrs: Some((main, SocketAddr::new(main.ip(), main.port() + 1))),
            no_address_flags: true,
            ..RelayOpts::lab(lab)
        }
    }
}

/// S running in this process: `Relay::bind` with the configuration its command line would
/// give, then `run`, on a runtime of its own. Dropping it stops S at once, as a crash
/// would (nothing says goodbye).
pub struct LocalRelay {
    rt: Option<Runtime>,
    task: Option<JoinHandle<()>>,
    thread: String,
}

impl LocalRelay {
    /// Starts S with the arguments `p2ptun-relay` would get; returns it with its listen
    /// address, second STUN address and key fingerprint.
    pub async fn start(
        label: &str,
        args: &[String],
    ) -> anyhow::Result<(LocalRelay, SocketAddr, SocketAddr, String)> {
        use clap::Parser as _;
        init_in_process();
        let argv = std::iter::once("p2ptun-relay").chain(args.iter().map(String::as_str));
        let config = p2ptun_relay::cli::Cli::try_parse_from(argv)
            .context("S's arguments")?
            .into_config()
            .context("S's configuration")?;
        let (rt, thread) = own_runtime(label)?;
        let relay = rt
            .spawn(p2ptun_relay::Relay::bind(config))
            .await
            .context("S's start task")?
            .context("cannot start the relay")?;
        let (addr, alt, fp) = (
            relay.local_addr(),
            relay.stun_alt_addr(),
            relay.fingerprint().to_string(),
        );
        // `run` is `run_until` a shutdown that never comes: S stops when its runtime goes.
        let task = rt.spawn(relay.run());
        let local = LocalRelay {
            rt: Some(rt),
            task: Some(task),
            thread,
        };
        Ok((local, addr, alt, fp))
    }

    fn is_running(&self) -> bool {
        self.rt.is_some() && self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops S at once: its runtime goes, and every socket and task with it.
    fn kill(&mut self) {
        self.task.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for LocalRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

enum RelayRun {
    Process(Proc),
    InProcess(LocalRelay),
}

/// A running S (see [`RelayOpts`]).
pub struct Relay {
    /// `None` only until the first start.
    run: Option<RelayRun>,
    addr: SocketAddr,
    alt: SocketAddr,
    /// S's state dir.
    pub state_dir: PathBuf,
    /// How it was started.
    pub opts: RelayOpts,
    /// S's key fingerprint (from its log at start, for a process).
    pub fingerprint: Option<String>,
    label: String,
    logs: PathBuf,
}

impl Relay {
    /// Starts S with `opts` and waits until it answers; panics if it does not.
    pub async fn start(lab: &Lab, label: &str, opts: RelayOpts) -> Relay {
        Relay::try_start(lab, label, opts)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts S with `opts` and waits until it answers (a process: until it logs
    /// "listening" or, in this namespace, answers STUN).
    pub async fn try_start(lab: &Lab, label: &str, opts: RelayOpts) -> anyhow::Result<Relay> {
        let mut relay = Relay {
            run: None,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            alt: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            state_dir: lab.state_dir(label),
            opts,
            fingerprint: None,
            label: label.to_owned(),
            logs: lab.logs(),
        };
        let mut last = None;
        for _attempt in 0..3 {
            let (addr, alt) = match relay.opts.addrs {
                Some(addrs) => addrs,
                // S picks free ports itself.
                None if relay.opts.in_process => (relay.addr, relay.alt),
                None => {
                    let (port, alt) = (free_port(), free_port());
                    let at = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
                    (at(port), at(alt))
                }
            };
            match relay.launch(addr, alt).await {
                Ok(()) => return Ok(relay),
                // Someone took a free port between our check and S's bind: try others.
                Err(e) if relay.opts.addrs.is_none() && format!("{e:#}").contains("in use") => {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("S did not start")))
    }

    /// The arguments of `p2ptun-relay` for these addresses.
    fn args(&self, addr: SocketAddr, alt: SocketAddr) -> Vec<String> {
        let mut args = Vec::new();
        if !self.opts.no_address_flags {
            args.extend([
                "--listen".to_owned(),
                addr.to_string(),
                "--stun-alt".to_owned(),
                alt.to_string(),
            ]);
        }
        args.extend([
            "--state-dir".to_owned(),
            self.state_dir.to_string_lossy().into_owned(),
        ]);
        for t in &self.opts.tokens {
            args.extend(["--token".to_owned(), t.clone()]);
        }
        args.extend(self.opts.extra_args.iter().cloned());
        args
    }

    /// Starts S on `addr` and `alt` and waits until it is ready.
    async fn launch(&mut self, addr: SocketAddr, alt: SocketAddr) -> anyhow::Result<()> {
        let args = self.args(addr, alt);
        if self.opts.in_process {
            ensure!(
                self.opts.place.is_here(),
                "S in this process runs in this namespace, not in {}",
                self.opts.place
            );
            let (local, addr, alt, fp) = LocalRelay::start(&self.label, &args)
                .await
                .with_context(|| format!("S in this process on {addr}"))?;
            (self.run, self.addr, self.alt) = (Some(RelayRun::InProcess(local)), addr, alt);
            self.fingerprint = Some(fp);
            return Ok(());
        }
        let mut cmd = self
            .opts
            .place
            .command(relay_bin())
            .with_context(|| format!("a command in {}", self.opts.place))?;
        cmd.args(&args);
        let level = match &self.opts.log {
            Some(level) => level.clone(),
            None => log_level("P2PTUN_TEST_LOG", "info"),
        };
        child_env_level(&mut cmd, &level);
        let proc = Proc::spawn(&self.label, cmd, &self.logs);
        wait_relay_ready(&proc, addr, self.opts.place.is_here())
            .await
            .map_err(|e| anyhow!("{e}\n{}", proc.report()))?;
        self.fingerprint = find_fingerprint(&proc.log());
        (self.run, self.addr, self.alt) = (Some(RelayRun::Process(proc)), addr, alt);
        Ok(())
    }

    fn run(&self) -> &RelayRun {
        self.run.as_ref().expect("S was started")
    }

    /// `HOST:PORT` for `--server`.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// S's main address (QUIC and STUN on UDP, QUIC over TLS on TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// S's second STUN address.
    pub fn alt_addr(&self) -> SocketAddr {
        self.alt
    }

    /// The process; panics if S runs in this process.
    pub fn proc(&self) -> &Proc {
        match self.run() {
            RelayRun::Process(p) => p,
            RelayRun::InProcess(_) => panic!("{} runs in this process, not as one", self.label),
        }
    }

    /// Kills S (SIGKILL, or its runtime dropped: a crash, nothing said goodbye).
    pub fn kill(&mut self) {
        match &mut self.run {
            Some(RelayRun::Process(p)) => p.kill(),
            Some(RelayRun::InProcess(r)) => r.kill(),
            None => {}
        }
    }

    /// Kills S if it runs, then starts it again on the same addresses with the same state.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + RELAY_START;
        loop {
            match self.launch(self.addr, self.alt).await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    // The old socket may linger for a moment; try again.
                    eprintln!("harness: S did not restart yet ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("S did not restart on {}: {e:#}", self.addr),
            }
        }
    }
}

impl Runs for Relay {
    fn label(&self) -> &str {
        &self.label
    }
    fn is_running(&self) -> bool {
        match self.run() {
            RelayRun::Process(p) => p.is_running(),
            RelayRun::InProcess(r) => r.is_running(),
        }
    }
    fn brief(&self) -> String {
        match self.run() {
            RelayRun::Process(p) => p.brief(),
            RelayRun::InProcess(r) => format!(
                "[{} in this process ({}); its log is in the test's output]",
                self.label,
                if r.is_running() { "running" } else { "stopped" }
            ),
        }
    }
    fn report(&self) -> String {
        match self.run() {
            RelayRun::Process(p) => p.report(),
            RelayRun::InProcess(_) => self.brief(),
        }
    }
    fn assert_no_panic(&self) {
        match self.run() {
            RelayRun::Process(p) => p.assert_no_panic(),
            RelayRun::InProcess(r) => assert_no_panic_on(&self.label, &r.thread),
        }
    }
}

/// Waits until S logs "listening" or, if `ping` (S is in this namespace), answers STUN.
async fn wait_relay_ready(proc: &Proc, addr: SocketAddr, ping: bool) -> anyhow::Result<()> {
    let sock = if ping {
        Some(tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?)
    } else {
        None
    };
    let deadline = Instant::now() + RELAY_START;
    loop {
        if let Some(st) = proc.exit_status() {
            bail!("S exited ({st}) before it was ready");
        }
        if proc.log().to_lowercase().contains("listening") {
            return Ok(());
        }
        if let Some(sock) = &sock {
            if stun_ping(sock, addr, Duration::from_millis(200)).await {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "S neither answered a STUN Binding request at {addr} nor logged \"listening\" \
                 within {RELAY_START:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

/// The agents' UDP socket address (`--bind`). Loopback, so that agents offer no host
/// candidate on another interface and every test packet stays on 127.0.0.1.
pub const AGENT_BIND: &str = "127.0.0.1:0";

/// The agents' UDP socket on a NAT-lab host: the agent's default, one dual-stack socket on
/// every interface of its namespace (loopback would reach nothing there).
pub const LAB_BIND: &str = "[::]:0";

/// How to run `p2ptun` as one agent: its state dir and S.
#[derive(Debug, Clone)]
pub struct Agent {
    /// A name for messages and log files.
    pub label: String,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--server`.
    pub server: String,
    /// `--token`, if any.
    pub token: Option<String>,
    /// `--server-fingerprint`, if known (else S's key is pinned on first use).
    pub server_fingerprint: Option<String>,
    /// `--bind` (and `bind` in an `up` config): [`AGENT_BIND`] unless changed (an agent in
    /// a NAT lab namespace binds every interface there).
    pub bind: String,
    /// Where its processes run.
    pub place: Place,
    /// More global flags (e.g. `--portmap pcp`), after the others.
    pub flags: Vec<String>,
    /// Its processes' `RUST_LOG`.
    pub log: String,
    logs: PathBuf,
}

/// One `[[expose]]` of an `up` config.
#[derive(Debug, Clone, Default)]
pub struct UpExpose {
    /// Name.
    pub name: String,
    /// `PORT` or `HOST:PORT`.
    pub local: String,
    /// Allowed fingerprints (empty: anyone).
    pub allow: Vec<String>,
    /// A UDP service (`protocol = "udp"`, `--udp`).
    pub udp: bool,
    /// More TOML lines for the table (e.g. `idle_timeout_secs = 2`).
    pub extra: String,
}

/// One `[[forward]]` of an `up` config.
#[derive(Debug, Clone, Default)]
pub struct UpForward {
    /// Name.
    pub name: String,
    /// `PORT` or `IP:PORT`.
    pub local: String,
    /// A UDP forward (`protocol = "udp"`, `--udp`).
    pub udp: bool,
    /// More TOML lines for the table (e.g. `max_flows = 2`).
    pub extra: String,
}

/// The `protocol` line of a service table.
fn protocol_line(udp: bool) -> &'static str {
    if udp {
        "protocol = \"udp\"\n"
    } else {
        ""
    }
}

/// The arguments of `p2ptun expose TARGET --name NAME [--allow FP]... [--udp]`.
fn expose_args<'a>(target: &'a str, name: &'a str, allow: &[&'a str], udp: bool) -> Vec<&'a str> {
    let mut args = vec!["expose", target, "--name", name];
    for fp in allow {
        args.push("--allow");
        args.push(fp);
    }
    if udp {
        args.push("--udp");
    }
    args
}

fn toml_str(s: &str) -> String {
    // A JSON string is a valid TOML basic string.
    serde_json::to_string(s).expect("a string serialises")
}

impl Lab {
    /// An agent with its own state dir, talking to `relay`.
    pub fn agent(&self, label: &str, relay: &Relay) -> Agent {
        Agent {
            token: relay.opts.tokens.first().cloned(),
            server_fingerprint: relay.fingerprint.clone(),
            ..self.agent_at(label, &relay.server())
        }
    }

    /// An agent with its own state dir, for S at `server` (which need not run).
    pub fn agent_at(&self, label: &str, server: &str) -> Agent {
        Agent {
            label: label.to_owned(),
            state_dir: self.state_dir(label),
            logs: self.logs(),
            server: server.to_owned(),
            token: None,
            server_fingerprint: None,
            bind: AGENT_BIND.to_owned(),
            place: Place::here(),
            flags: Vec::new(),
            log: log_level("P2PTUN_TEST_LOG", "info"),
        }
    }

    /// Starts S with `opts`.
    pub async fn relay(&self, label: &str, opts: RelayOpts) -> Relay {
        Relay::start(self, label, opts).await
    }
}

impl Agent {
    /// The same agent with another token (`None`: no `--token` flag).
    pub fn with_token(mut self, token: Option<&str>) -> Agent {
        self.token = token.map(str::to_owned);
        self
    }

    /// The same agent under another label, with its own state dir in `lab`.
    pub fn renamed(mut self, lab: &Lab, label: &str) -> Agent {
        self.label = label.to_owned();
        self.state_dir = lab.state_dir(label);
        self
    }

    /// `--server S --state-dir D --bind B [--token T] [--server-fingerprint F] [FLAGS]`.
    pub fn global_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--server".into(),
            (&self.server).into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--bind".into(),
            (&self.bind).into(),
        ];
        if let Some(t) = &self.token {
            args.extend(["--token".into(), t.into()]);
        }
        if let Some(fp) = &self.server_fingerprint {
            args.extend(["--server-fingerprint".into(), fp.into()]);
        }
        args.extend(self.flags.iter().map(Into::into));
        args
    }

    /// `p2ptun` in the agent's place with a clean environment and no arguments yet.
    fn program(&self) -> Command {
        let mut cmd = self
            .place
            .command(agent_bin())
            .unwrap_or_else(|e| panic!("{}: a command in {}: {e}", self.label, self.place));
        child_env_level(&mut cmd, &self.log);
        cmd
    }

    /// `p2ptun [global flags] ARGS`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.program();
        cmd.args(self.global_args()).args(args);
        cmd
    }

    /// Starts `p2ptun [global flags] ARGS` in the background.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        Proc::spawn(&self.label, self.command(args), &self.logs)
    }

    /// Starts `p2ptun ARGS [global flags]`: the global flags after the command.
    pub fn spawn_flags_after(&self, args: &[&str]) -> Proc {
        let mut cmd = self.program();
        cmd.args(args).args(self.global_args());
        Proc::spawn(&self.label, cmd, &self.logs)
    }

    /// `p2ptun expose TARGET --name NAME [--allow FP]...`.
    pub fn expose(&self, target: &str, name: &str, allow: &[&str]) -> Proc {
        self.spawn(&expose_args(target, name, allow, false))
    }

    /// `p2ptun forward NAME PORT`.
    pub fn forward(&self, name: &str, port: u16) -> Proc {
        self.spawn(&["forward", name, &port.to_string()])
    }

    /// The TOML of an `up` config with this agent's server, token and state dir.
    pub fn up_config(&self, exposes: &[UpExpose], forwards: &[UpForward]) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "server = {}", toml_str(&self.server));
        if let Some(tok) = &self.token {
            let _ = writeln!(t, "token = {}", toml_str(tok));
        }
        if let Some(fp) = &self.server_fingerprint {
            let _ = writeln!(t, "server_fingerprint = {}", toml_str(fp));
        }
        let dir = self.state_dir.to_str().expect("utf-8 temp path");
        let _ = writeln!(t, "state_dir = {}", toml_str(dir));
        let _ = writeln!(t, "bind = {}", toml_str(&self.bind));
        for e in exposes {
            let allow: Vec<String> = e.allow.iter().map(|a| toml_str(a)).collect();
            let _ = write!(
                t,
                "\n[[expose]]\nname = {}\nlocal = {}\nallow = [{}]\n{}{}\n",
                toml_str(&e.name),
                toml_str(&e.local),
                allow.join(", "),
                protocol_line(e.udp),
                e.extra
            );
        }
        for f in forwards {
            let _ = write!(
                t,
                "\n[[forward]]\nname = {}\nlocal = {}\n{}{}\n",
                toml_str(&f.name),
                toml_str(&f.local),
                protocol_line(f.udp),
                f.extra
            );
        }
        t
    }

    /// The config file [`Agent::up_with`] writes and `up` reads (next to the logs).
    pub fn config_path(&self) -> PathBuf {
        self.logs
            .parent()
            .expect("logs dir has a parent")
            .join(format!("{}.toml", self.label))
    }

    /// Writes `config` next to the logs and starts `p2ptun up -c FILE [FLAGS]`.
    pub fn up_with(&self, config: &str) -> Proc {
        let file = self.config_path();
        fs::write(&file, config).expect("write config");
        let mut cmd = self.program();
        cmd.arg("up").arg("-c").arg(&file).args(&self.flags);
        Proc::spawn(&self.label, cmd, &self.logs)
    }

    /// `p2ptun up -c FILE` with the given exposes and forwards.
    pub fn up(&self, exposes: &[UpExpose], forwards: &[UpForward]) -> Proc {
        self.up_with(&self.up_config(exposes, forwards))
    }

    /// Runs `p2ptun [global flags] ARGS` to its end (at most [`ONE_SHOT`]).
    pub async fn run(&self, args: &[&str]) -> RunOutput {
        run_command(&self.label, self.command(args), None, ONE_SHOT, &self.logs).await
    }

    /// `p2ptun id`: this agent's fingerprint (checked to be one line of the right form).
    pub async fn id(&self) -> String {
        let out = self.run(&["id"]).await;
        assert_eq!(out.code(), 0, "`p2ptun id` failed\n{}", out.describe());
        let line = out.stdout.trim_end_matches('\n');
        assert!(
            is_fingerprint(line),
            "`p2ptun id` should print one line `SHA256:` + 43 base64 characters, printed {:?}",
            out.stdout
        );
        line.to_owned()
    }

    /// The options `p2ptun up` would run with for these services, made as the binary makes
    /// them (`ConfigFile::into_options`), without port mapping (on loopback there is nothing
    /// to map, and the machine's own gateway must not be asked).
    pub fn options(
        &self,
        exposes: &[UpExpose],
        forwards: &[UpForward],
    ) -> anyhow::Result<p2ptun::agent::AgentOptions> {
        use p2ptun::agent::Protocol;
        use p2ptun::config::{ConfigFile, ExposeEntry, ForwardEntry, Overrides};
        ensure!(
            self.flags.is_empty(),
            "{}: an agent in this process takes no flags ({:?})",
            self.label,
            self.flags
        );
        let fingerprint = |s: &str| s.parse().map_err(|e| anyhow!("{s}: {e}"));
        let protocol = |udp: bool| if udp { Protocol::Udp } else { Protocol::Tcp };
        let mut expose = Vec::new();
        for e in exposes {
            ensure!(
                e.extra.is_empty() && !forwards.iter().any(|f| !f.extra.is_empty()),
                "{}: extra TOML is for `up` files, not agents in this process",
                self.label
            );
            expose.push(ExposeEntry {
                protocol: protocol(e.udp),
                idle_timeout_secs: None,
                max_flows: None,
                name: e.name.clone(),
                local: e.local.clone(),
                allow: e
                    .allow
                    .iter()
                    .map(|a| fingerprint(a))
                    .collect::<anyhow::Result<_>>()?,
            });
        }
        let forward = forwards
            .iter()
            .map(|f| ForwardEntry {
                name: f.name.clone(),
                local: f.local.clone(),
                protocol: protocol(f.udp),
                idle_timeout_secs: None,
                max_flows: None,
            })
            .collect();
        let file = ConfigFile {
            expose,
            forward,
            ..ConfigFile::default()
        };
        let over = Overrides {
            server: Some(self.server.clone()),
            token: self.token.clone(),
            server_fingerprint: self
                .server_fingerprint
                .as_deref()
                .map(fingerprint)
                .transpose()?,
            state_dir: Some(self.state_dir.clone()),
            bind: Some(self.bind.parse().context("the agent's bind address")?),
            portmap: Some(p2ptun::portmap::Mode::Off),
        };
        file.into_options(over)
    }

    /// Starts this agent `how` with these services.
    pub async fn start(
        &self,
        how: How,
        exposes: &[UpExpose],
        forwards: &[UpForward],
    ) -> anyhow::Result<Running> {
        Ok(match how {
            How::Commands => Running::Process(match (exposes, forwards) {
                ([e], []) => {
                    let allow: Vec<&str> = e.allow.iter().map(String::as_str).collect();
                    self.spawn(&expose_args(&e.local, &e.name, &allow, e.udp))
                }
                ([], [f]) if f.udp => self.spawn(&["forward", &f.name, &f.local, "--udp"]),
                ([], [f]) => self.spawn(&["forward", &f.name, &f.local]),
                _ => bail!(
                    "{}: `p2ptun expose` and `p2ptun forward` carry one service each; use \
                     How::Daemons for more",
                    self.label
                ),
            }),
            How::Daemons => Running::Process(self.up(exposes, forwards)),
            How::InProcess => {
                ensure!(
                    self.place.is_here(),
                    "{}: an agent in this process runs in this namespace, not in {}",
                    self.label,
                    self.place
                );
                let opts = self.options(exposes, forwards)?;
                Running::InProcess(LocalAgent::start(&self.label, opts).await?)
            }
        })
    }
}

/// An agent running in this process: `Agent::start`, then what `p2ptun::agent::run` does
/// (run until it fails for good; dropping it is the Ctrl-C), on a runtime of its own. Its
/// status socket is served as a process's is.
pub struct LocalAgent {
    label: String,
    thread: String,
    rt: Option<Runtime>,
    task: JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl LocalAgent {
    /// Starts an agent with `opts`; fails as `Agent::start` does.
    pub async fn start(label: &str, opts: p2ptun::agent::AgentOptions) -> anyhow::Result<Self> {
        init_in_process();
        let (rt, thread) = own_runtime(label)?;
        let mut agent = rt
            .spawn(p2ptun::agent::Agent::start(opts))
            .await
            .context("the agent's start task")?
            .with_context(|| format!("{label} did not start"))?;
        let failure = Arc::new(Mutex::new(None));
        let failed = Arc::clone(&failure);
        let task = rt.spawn(async move {
            let fatal = agent.failed().await;
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{fatal:#}"));
            agent.shutdown().await;
        });
        Ok(LocalAgent {
            label: label.to_owned(),
            thread,
            rt: Some(rt),
            task,
            failure,
        })
    }

    /// Why the agent stopped by itself, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for LocalAgent {
    /// Stops the agent at once, as a killed process stops: its runtime goes, and every
    /// socket and task with it.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A running agent: a process, or an agent in this process.
pub enum Running {
    /// `p2ptun` as a child process.
    Process(Proc),
    /// In this process.
    InProcess(LocalAgent),
}

impl Running {
    /// The process; panics if the agent runs in this process (a test that reads an agent's
    /// log or signals it must run it as a process).
    pub fn proc(&self) -> &Proc {
        match self {
            Running::Process(p) => p,
            Running::InProcess(a) => panic!("{} runs in this process, not as one", a.label),
        }
    }
}

impl Runs for Running {
    fn label(&self) -> &str {
        match self {
            Running::Process(p) => &p.label,
            Running::InProcess(a) => &a.label,
        }
    }
    fn is_running(&self) -> bool {
        match self {
            Running::Process(p) => p.is_running(),
            Running::InProcess(a) => !a.task.is_finished(),
        }
    }
    fn brief(&self) -> String {
        match self {
            Running::Process(p) => p.brief(),
            Running::InProcess(a) => format!(
                "[{} in this process ({}); its log is in the test's output]",
                a.label,
                match a.failure() {
                    Some(why) => format!("failed: {why}"),
                    None if self.is_running() => "running".to_owned(),
                    None => "stopped".to_owned(),
                }
            ),
        }
    }
    fn report(&self) -> String {
        match self {
            Running::Process(p) => p.report(),
            Running::InProcess(_) => self.brief(),
        }
    }
    fn assert_no_panic(&self) {
        match self {
            Running::Process(p) => p.assert_no_panic(),
            Running::InProcess(a) => assert_no_panic_on(&a.label, &a.thread),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bundle

/// How the agents of a [`Kit`] run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// `p2ptun expose` and `p2ptun forward` processes (one service).
    Commands,
    /// `p2ptun up -c FILE` processes (any number of services).
    Daemons,
    /// In this process ([`LocalAgent`]), and S too when the kit starts it.
    InProcess,
}

/// What [`Kit::start`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Nothing after starting the forwarder (for callers that time what follows).
    Started,
    /// Both agents registered with S (their status says so).
    Registered,
    /// An echo round trip through the first forward (a [`Service`] answers echo) from here.
    Echo,
}

/// Which step of [`Kit::try_start`] failed: the context of its error
/// (`error.downcast_ref::<Step>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Starting S.
    Relay,
    /// Starting the exposer and its registration.
    Exposer,
    /// Starting the forwarder.
    Forwarder,
    /// What [`Ready`] asked for.
    Ready,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Relay => "S did not start",
            Step::Exposer => "the exposer did not start and register",
            Step::Forwarder => "the forwarder did not start",
            Step::Ready => "the tunnel did not become ready",
        })
    }
}

/// What a service of a tunnel is, to the exposer: the address it reaches it at.
pub trait Target {
    /// `HOST:PORT` for `expose`.
    fn target(&self) -> String;
}

impl Target for Service {
    fn target(&self) -> String {
        Service::target(self)
    }
}

impl Target for SocketAddr {
    fn target(&self) -> String {
        self.to_string()
    }
}

impl Target for String {
    fn target(&self) -> String {
        self.clone()
    }
}

/// The name of service `i` of a tunnel named `name`: `name`, then `name-2`, `name-3`, ….
pub fn service_name(name: &str, i: usize) -> String {
    match i {
        0 => name.to_owned(),
        i => format!("{name}-{}", i + 1),
    }
}

enum KitRelay<'a> {
    Start(RelayOpts),
    Given(Box<Relay>),
    Server(&'a Relay),
}

/// Starts a [`Tunnel`]; see the module doc. By default: on 127.0.0.1, S started as a
/// process, `p2ptun expose` and `p2ptun forward` processes, forwards on free ports, waiting
/// until both agents registered.
pub struct Kit<'a> {
    files: &'a Lab,
    name: String,
    how: How,
    ready: Ready,
    relay: KitRelay<'a>,
    labels: [String; 2],
    places: [Place; 2],
    flags: [Vec<String>; 2],
    servers: [Option<String>; 2],
    bind: String,
    agent_log: Option<String>,
    first_port: Option<u16>,
    udp: bool,
}

impl<'a> Kit<'a> {
    /// A tunnel for the service(s) named `name` (see [`service_name`]), with its state dirs
    /// and logs in `files`.
    pub fn new(files: &'a Lab, name: &str) -> Kit<'a> {
        Kit {
            files,
            name: name.to_owned(),
            how: How::Commands,
            ready: Ready::Registered,
            relay: KitRelay::Start(RelayOpts::default()),
            labels: ["exposer".to_owned(), "forwarder".to_owned()],
            places: [Place::here(), Place::here()],
            flags: [Vec::new(), Vec::new()],
            servers: [None, None],
            bind: AGENT_BIND.to_owned(),
            agent_log: None,
            first_port: None,
            udp: false,
        }
    }

    /// The services' name: `name`, `name-2`, … (see [`service_name`]) instead of the one
    /// given to [`Kit::new`].
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The services are UDP: `expose --udp` and `forward --udp` (`protocol = "udp"`).
    pub fn udp(mut self) -> Self {
        self.udp = true;
        self
    }

    /// S, the exposer and the forwarder in this process.
    pub fn in_process(mut self) -> Self {
        self.how = How::InProcess;
        if let KitRelay::Start(opts) = &mut self.relay {
            opts.in_process = true;
        }
        self
    }

    /// Both agents as `p2ptun up -c FILE` daemons.
    pub fn daemons(mut self) -> Self {
        self.how = How::Daemons;
        self
    }

    /// What starting waits for.
    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = ready;
        self
    }

    /// S started with `opts` (in this process if [`Kit::in_process`] says so).
    pub fn relay_opts(mut self, mut opts: RelayOpts) -> Self {
        opts.in_process |= self.how == How::InProcess;
        self.relay = KitRelay::Start(opts);
        self
    }

    /// S already running, handed to the tunnel.
    pub fn relay(mut self, relay: Relay) -> Self {
        self.relay = KitRelay::Given(Box::new(relay));
        self
    }

    /// S someone else runs: the agents talk to it, the tunnel does not hold it.
    pub fn server(mut self, relay: &'a Relay) -> Self {
        self.relay = KitRelay::Server(relay);
        self
    }

    /// The agents' labels (log files, state dirs, messages).
    pub fn labels(mut self, exposer: &str, forwarder: &str) -> Self {
        self.labels = [exposer.to_owned(), forwarder.to_owned()];
        self
    }

    /// The exposer on lab host `a`, the forwarder on `b`, both on [`LAB_BIND`] (S is not
    /// chosen by this: see [`RelayOpts::lab`]).
    pub fn on_hosts(self, a: &Host, b: &Host) -> Self {
        self.exposer_in(Place::from(a))
            .forwarder_in(Place::from(b))
            .bind(LAB_BIND)
    }

    /// Where the exposer runs (and reaches its services from).
    pub fn exposer_in(mut self, place: Place) -> Self {
        self.places[0] = place;
        self
    }

    /// Where the forwarder runs (and its forwards listen).
    pub fn forwarder_in(mut self, place: Place) -> Self {
        self.places[1] = place;
        self
    }

    /// More global flags for the exposer.
    pub fn exposer_flags(mut self, flags: &[&str]) -> Self {
        self.flags[0].extend(flags.iter().map(|f| (*f).to_owned()));
        self
    }

    /// More global flags for the forwarder.
    pub fn forwarder_flags(mut self, flags: &[&str]) -> Self {
        self.flags[1].extend(flags.iter().map(|f| (*f).to_owned()));
        self
    }

    /// The `--server` of the exposer and of the forwarder when not S's [`Relay::server`]
    /// (an IPv6-only host reaches S at its IPv6 address); `None` keeps that one.
    pub fn servers(mut self, exposer: Option<&str>, forwarder: Option<&str>) -> Self {
        self.servers = [exposer.map(str::to_owned), forwarder.map(str::to_owned)];
        self
    }

    /// More global flags for both agents.
    pub fn flags(self, flags: &[&str]) -> Self {
        self.exposer_flags(flags).forwarder_flags(flags)
    }

    /// The agents' `--bind` (default [`AGENT_BIND`]).
    pub fn bind(mut self, bind: &str) -> Self {
        self.bind = bind.to_owned();
        self
    }

    /// The agent processes' `RUST_LOG`.
    pub fn agent_log(mut self, level: &str) -> Self {
        self.agent_log = Some(level.to_owned());
        self
    }

    /// Forwards on 127.0.0.1:`first`, `first + 1`, … (in the forwarder's place) rather than
    /// on free ports of this namespace.
    pub fn forward_ports(mut self, first: u16) -> Self {
        self.first_port = Some(first);
        self
    }

    /// Starts a [`Service`] here and the tunnel to it; panics on failure.
    pub async fn serve(self) -> Tunnel<Service> {
        let service = Service::start().await;
        self.start(vec![service]).await
    }

    /// Starts the tunnel for `services`; panics (with the logs) on failure.
    pub async fn start<Svc: Target>(self, services: Vec<Svc>) -> Tunnel<Svc> {
        self.try_start(services)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts S (unless given), the exposer of `services` (registered before the next step)
    /// and the forwarder of them, and waits for [`Ready`]. An error's context is the
    /// [`Step`] that failed; its message has the logs of what had started.
    pub async fn try_start<Svc: Target>(self, services: Vec<Svc>) -> anyhow::Result<Tunnel<Svc>> {
        ensure!(!services.is_empty(), "a tunnel has at least one service");
        ensure!(
            self.how != How::Commands || services.len() == 1,
            "`p2ptun expose` carries one service; use Kit::daemons for {}",
            services.len()
        );
        let files = self.files;
        let (owned, server) = match self.relay {
            KitRelay::Start(opts) => (
                Some(
                    Relay::try_start(files, "relay", opts)
                        .await
                        .context(Step::Relay)?,
                ),
                None,
            ),
            KitRelay::Given(relay) => (Some(*relay), None),
            KitRelay::Server(relay) => (None, Some(relay)),
        };
        let relay = server.or(owned.as_ref()).expect("an S");
        let [exposer_place, forwarder_place] = self.places;
        let [exposer_flags, forwarder_flags] = self.flags;
        let [exposer_server, forwarder_server] = self.servers;
        let exposer_server_given = exposer_server.is_some();
        let agent = |label: &str, place: Place, flags: Vec<String>, server: Option<String>| {
            let agent = files.agent(label, relay);
            Agent {
                place,
                flags,
                bind: self.bind.clone(),
                log: self
                    .agent_log
                    .clone()
                    .unwrap_or_else(|| log_level("P2PTUN_TEST_LOG", "info")),
                server: server.unwrap_or(agent.server.clone()),
                ..agent
            }
        };
        let mut expose_agent = agent(
            &self.labels[0],
            exposer_place,
            exposer_flags,
            exposer_server,
        );
        let mut forward_agent = agent(
            &self.labels[1],
            forwarder_place,
            forwarder_flags,
            forwarder_server,
        );
        // The forwarder pins S's key on first use, and so does an exposer sent to another S.
        forward_agent.server_fingerprint = None;
        if exposer_server_given {
            expose_agent.server_fingerprint = None;
        }

        let names: Vec<String> = (0..services.len())
            .map(|i| service_name(&self.name, i))
            .collect();
        let ports: Vec<u16> = (0..services.len())
            .map(|i| match self.first_port {
                Some(first) => first + u16::try_from(i).expect("a few services"),
                None => free_port(),
            })
            .collect();
        let exposes: Vec<UpExpose> = names
            .iter()
            .zip(&services)
            .map(|(name, svc)| UpExpose {
                name: name.clone(),
                local: svc.target(),
                udp: self.udp,
                ..UpExpose::default()
            })
            .collect();
        let forwards: Vec<UpForward> = names
            .iter()
            .zip(&ports)
            .map(|(name, port)| UpForward {
                name: name.clone(),
                local: format!("127.0.0.1:{port}"),
                udp: self.udp,
                ..UpForward::default()
            })
            .collect();

        let s: Vec<&dyn Runs> = owned.iter().map(|r| r as &dyn Runs).collect();
        let exposer_started = Instant::now();
        let exposer = expose_agent
            .start(self.how, &exposes, &[])
            .await
            .context(Step::Exposer)?;
        wait_registered(&exposer, &expose_agent.state_dir, &s)
            .await
            .context(Step::Exposer)?;
        let exposer_registered_in = exposer_started.elapsed();
        let forwarder_started = Instant::now();
        let forwarder = forward_agent
            .start(self.how, &[], &forwards)
            .await
            .with_context(|| reports_full(&[s.as_slice(), &[&exposer]].concat()))
            .context(Step::Forwarder)?;
        let tunnel = Tunnel {
            forwarder,
            exposer,
            relay: owned,
            expose_agent,
            forward_agent,
            names,
            ports,
            forwarder_started,
            exposer_registered_in,
            services,
            files: None,
        };
        let ready = match self.ready {
            Ready::Started => Ok(()),
            Ready::Registered => {
                let others = tunnel.parts();
                wait_registered(&tunnel.forwarder, &tunnel.forward_agent.state_dir, &others).await
            }
            Ready::Echo => try_wait_tunnel(tunnel.port(), &tunnel.parts(), TUNNEL_READY)
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e:#}\n{}", reports_full(&tunnel.parts()))),
        };
        ready.context(Step::Ready)?;
        Ok(tunnel)
    }
}

/// Every part's [`Runs::report`].
fn reports_full(parts: &[&dyn Runs]) -> String {
    parts
        .iter()
        .map(|p| p.report())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the agent of `state_dir` says it is registered with S, failing if it or one
/// of `others` ends, or after [`REGISTER`].
async fn wait_registered(
    agent: &Running,
    state_dir: &Path,
    others: &[&dyn Runs],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + REGISTER;
    let all = || [others, &[agent as &dyn Runs]].concat();
    loop {
        if let Some(gone) = all().into_iter().find(|p| !p.is_running()) {
            bail!(
                "{} ended while {} was registering\n{}",
                gone.label(),
                agent.label(),
                reports_full(&all())
            );
        }
        let st = agent_status(state_dir).await.unwrap_or_default();
        if st
            .iter()
            .any(|s| s["registered"] == serde_json::Value::Bool(true))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not register with S within {REGISTER:?}; status: {}\n{}",
                agent.label(),
                serde_json::to_string(&st).unwrap_or_default(),
                reports_full(&all())
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// S, an exposer and a forwarder of one or more services: the kit's one bundle (see the
/// module doc). Dropping it stops the agents, then S, then the services.
pub struct Tunnel<Svc> {
    /// The forwarding agent.
    pub forwarder: Running,
    /// The exposing agent.
    pub exposer: Running,
    /// S, unless the agents use someone else's ([`Kit::server`]).
    pub relay: Option<Relay>,
    /// How the exposer runs (its state dir, S, place).
    pub expose_agent: Agent,
    /// How the forwarder runs.
    pub forward_agent: Agent,
    /// The services' names (see [`service_name`]).
    pub names: Vec<String>,
    /// The forwarder's local port of each service (on 127.0.0.1 in its place).
    pub ports: Vec<u16>,
    /// When the forwarder was started.
    pub forwarder_started: Instant,
    /// From starting the exposer to its status saying it is registered with S.
    pub exposer_registered_in: Duration,
    /// What the exposer exposes.
    pub services: Vec<Svc>,
    /// The test's files, if the tunnel holds them ([`Tunnel::holding`]); dropped last, so
    /// logs outlive the processes.
    pub files: Option<Lab>,
}

impl<Svc> Tunnel<Svc> {
    /// The same tunnel holding `files` (kept until after its processes end).
    pub fn holding(mut self, files: Lab) -> Self {
        self.files = Some(files);
        self
    }

    /// S; panics if the agents use someone else's.
    pub fn relay(&self) -> &Relay {
        self.relay
            .as_ref()
            .expect("this tunnel's agents use an S it does not hold")
    }

    /// S, to kill or restart it.
    pub fn relay_mut(&mut self) -> &mut Relay {
        self.relay
            .as_mut()
            .expect("this tunnel's agents use an S it does not hold")
    }

    /// The forwarder's port of the first service.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// The first service's name.
    pub fn name(&self) -> &str {
        &self.names[0]
    }

    /// Where clients of the first service connect: 127.0.0.1 in the forwarder's place.
    pub fn forward_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    /// The first service.
    pub fn service(&self) -> &Svc {
        &self.services[0]
    }

    /// Service `i`.
    pub fn service_at(&self, i: usize) -> &Svc {
        &self.services[i]
    }

    /// S (if held), the exposer, the forwarder.
    pub fn parts(&self) -> Vec<&dyn Runs> {
        let mut parts: Vec<&dyn Runs> = self.relay.iter().map(|r| r as &dyn Runs).collect();
        parts.extend([&self.exposer as &dyn Runs, &self.forwarder]);
        parts
    }

    /// One line per part, for failure messages.
    pub fn reports(&self) -> String {
        super::reports(&self.parts())
    }

    /// An error naming the part that ended, with every part's log tail.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        match self.parts().into_iter().find(|p| !p.is_running()) {
            None => Ok(()),
            Some(gone) => bail!("{} ended\n{}", gone.label(), reports_full(&self.parts())),
        }
    }

    /// Panics with the logs if a part ended or a process panicked.
    pub fn assert_healthy(&self, context: &str) {
        let parts = self.parts();
        super::assert_all_running(&parts, context);
        for p in parts {
            p.assert_no_panic();
        }
    }
}
