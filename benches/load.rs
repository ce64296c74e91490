//! The load generator for S (`p2ptun-relay`): many agents played from this one process
//! against a real S, and what that costs S.
//!
//! ```text
//! cargo build --release -p p2ptun-relay          # the S that is measured
//! cargo bench --bench load                       # 10,000 agents; the table on stdout
//! cargo bench --bench load -- --quick            # 500 agents, a smoke run of well under a minute
//! cargo bench --bench load -- --agents 2000 --json --only single
//! ```
//!
//! Flags: `--agents N` (default 10,000; `--quick` makes it 500 and shortens every phase),
//! `--json` (JSON on stdout, the table on stderr), `--only single|cluster` (one of the two
//! scenarios), `--at-once C` (registrations and introductions in flight, default 128),
//! `--relay-pairs P` (relay sessions carrying bulk bytes, default 8).
//!
//! # Topology
//!
//! Everything is on loopback. S runs as its own process, the release `p2ptun-relay`
//! (target/release, which the test kit builds with `cargo build --workspace --release` when
//! it is missing or stale, a no-op after the command above), started as the README tells an
//! operator to, with only the flags the load needs: `--listen 127.0.0.1:PORT` and
//! `--stun-alt 127.0.0.1:PORT` (free ports), `--state-dir` (a temp dir), `--metrics
//! 127.0.0.1:PORT` (S's own count of the bytes it relayed), and the relay rate caps raised
//! out of the way (`--relay-session-rate`, `--relay-rate-per-ip`, so the relay figure is
//! S's cost and not its cap). Beyond 10,000 agents on one S, `-c FILE` raises
//! `max_connections` (no flag sets it); the output names every flag given.
//!
//! The agents are this process: each has its own key (made before any timing starts), and
//! its own QUIC control connection made with the agent's own TLS client configuration
//! (`p2ptun::tunnel::tls::client_config`, ALPN `p2ptun/1`); it checks S's key and sends
//! `Register` as `p2ptun` does, keeping the registration stream open; its transport is the
//! agent's control transport as it is (`tls::control_transport_config`: a keep-alive every
//! 2 s, `CONTROL_KEEP_ALIVE`, and no request streams allowed to S). Agents are dealt
//! round-robin over one quinn endpoint (one UDP socket) per source address 127.0.x.y
//! (N/50 of them, at least 8), so that S's per-source limits (`handshake_rate_per_ip` 100/s
//! with bursts of 200, `max_unregistered_per_ip` 32) see many sources, as they would see
//! many hosts, and are not hit: S's defaults stay in force.
//!
//! Two scenarios:
//! - **(a) single**: one S with its default embedded name store (`names.json` and its
//!   journal, `names.journal`).
//! - **(b) cluster**: a real 3-member etcd on loopback (the test kit's `EtcdCluster`; Debian's
//!   `etcd-server`) and two S started with `--etcd URL,URL,URL --public-addr 127.0.0.1:PORT`;
//!   the agents are spread evenly over both.
//!
//! # The figures
//!
//! 1. **Registrations per second**: agents whose `Register` S answered `Registered`, over
//!    the time from the wave's start to the last such answer, with `--at-once` attempts in
//!    flight (handshake with QUIC Retry, key check, the exchange). Two waves: first every
//!    odd-numbered agent, which exposes nothing (a forwarder), then every even-numbered one,
//!    which claims one new name (`load-ID`): claiming a name is a write to S's name store,
//!    so the two rates differ. Failures are counted by reason; nothing is retried.
//! 2. **S's memory per agent**: VmRSS of each S process (/proc/PID/status) before the
//!    first agent and with all of them registered (after a settling second), the growth
//!    divided by the agents registered with that S. Also S's CPU while the registered
//!    agents idle (each agent's control connection sends a QUIC keep-alive every 2 s; S sends
//!    none, it only answers them), and VmRSS after the introductions
//!    (each made a relay session that S keeps until it idles out).
//! 3. **Introductions per second**: agent 2k+1 asks S (`Connect`) for agent 2k's name, 2×
//!    over every pair; an introduction is complete when the forwarder has its `Rendezvous`
//!    and the exposer its `Incoming` for the same session. The rate is completions over the
//!    time from the first request to the last completion. In (b), half the pairs have their
//!    forwarder on the other S than the exposer. Its home S answers such a `Connect` with
//!    `Elsewhere` (the exposer's home, its address and fingerprint), and the generator does
//!    what the agent does (`agent::visit`): the forwarder registers with that S too, from
//!    its own socket and with its own key, checks that S presents the fingerprint vouched
//!    for, exposes no names, and asks again there; that S's `Rendezvous` and the exposer's
//!    `Incoming` make the introduction. The visit is made lazily, at the forwarder's first
//!    `Elsewhere`, and kept for its second request, because that is what the agent does
//!    (it registers with another S only when a link needs it, and keeps the registration
//!    while links use it): the first introduction across S pays for a handshake and a
//!    registration, the second one does not, and every one of them costs two `Connect`s.
//!    Same-S and across-S completions are counted and timed separately (each from the first
//!    request to the last completion of its kind), beside the `Elsewhere` answers and the
//!    visits made with their mean registration time.
//! 4. **Relayed GiB per CPU-second of S**: `--relay-pairs` forwarders (on the same S as
//!    their exposer) each get a fresh relay session and send full-size relayed datagrams
//!    (1,408 bytes, the session tag and an inner packet of the agents' largest MTU) as fast
//!    as their control connection's congestion control lets them, for 5 s (2 s with
//!    `--quick`), each keeping at most 256 datagrams on their way (the congestion window of
//!    the connection a real pair runs inside); the exposers count what S delivers. The
//!    bytes S relayed (its metrics' `p2ptun_relay_relay_bytes_total`) over S's CPU time
//!    (utime+stime, /proc/PID/stat) in that interval, and over the interval's length; what
//!    the exposers received is shown beside it. S's CPU in the interval includes its idle
//!    cost of the N registered agents (figure 2 shows how much that is).
//!
//! Beside them, the datagrams the kernel dropped at a full UDP receive buffer during each
//! timed phase (`RcvbufErrors` of /proc/net/snmp, host-wide: any process's sockets), which
//! tells a loss on loopback from a slow S; and the load average at the end of the run.
//!
//! # Rules it keeps
//!
//! All traffic goes to 127.0.0.0/8. Every phase has a count and a deadline and stops by
//! itself (the default run takes a few minutes, `--quick` well under one). S and etcd are
//! child processes killed when their handles drop (also on error and on panic), and on
//! SIGINT/SIGTERM/SIGHUP by a signal thread, which also removes the temp dir. RLIMIT_NOFILE
//! is raised for this process (and so for S, its child). Nothing from the network is
//! unwrapped: every failure is counted or reported.

use p2ptun_testkit as kit;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use p2ptun::proto::Fingerprint;
use serde_json::{json, Value};

use kit::etcd::EtcdCluster;
use kit::{Relay, RelayOpts};

#[path = "load/agents.rs"]
mod agents;
#[path = "common/host.rs"]
mod host;

use agents::{Forwarder, Intros, Live, Pushed, Relayed, Sources, Target, Wave};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
/// S's default `max_connections`: more agents than this on one S need a config file.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The relay caps given to S, out of the way of what two cores can relay.
const RELAY_CAP: &str = "10000000000";
/// RLIMIT_NOFILE asked for: S holds a few descriptors per agent at most (none per QUIC
/// connection; its sockets are few), this process one per source.
const WANT_NOFILE: u64 = 65_536;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    agents: usize,
    quick: bool,
    json: bool,
    single: bool,
    cluster: bool,
    at_once: usize,
    relay_pairs: usize,
}

impl Opts {
    fn parse() -> Result<Opts> {
        let mut o = Opts {
            agents: 0,
            quick: false,
            json: false,
            single: true,
            cluster: true,
            at_once: 128,
            relay_pairs: 8,
        };
        let mut agents = None;
        let mut args = std::env::args().skip(1);
        let num = |v: Option<String>, flag: &str| -> Result<usize> {
            v.with_context(|| format!("{flag} needs a number"))?
                .replace('_', "")
                .parse::<usize>()
                .with_context(|| format!("{flag} takes a whole number"))
        };
        while let Some(a) = args.next() {
            match a.as_str() {
                // `cargo bench` passes --bench to every bench target.
                "--bench" => {}
                "--json" => o.json = true,
                "--quick" => o.quick = true,
                "--agents" => agents = Some(num(args.next(), "--agents")?),
                "--at-once" => o.at_once = num(args.next(), "--at-once")?.max(1),
                "--relay-pairs" => o.relay_pairs = num(args.next(), "--relay-pairs")?,
                "--only" => match args.next().as_deref() {
                    Some("single") => o.cluster = false,
                    Some("cluster") => o.single = false,
                    other => bail!("--only takes single or cluster, not {other:?}"),
                },
                "-h" | "--help" => {
                    println!(
                        "usage: cargo bench --bench load -- [--agents N] [--quick] [--json] \
                         [--only single|cluster] [--at-once C] [--relay-pairs P]\n  \
                         --agents N       agents to register (default 10000; 500 with --quick)\n  \
                         --quick          a smoke run: 500 agents, short phases\n  \
                         --json           JSON on stdout, the table on stderr\n  \
                         --only S         one scenario: single (one S) or cluster (two S, etcd)\n  \
                         --at-once C      registrations/introductions in flight (default 128)\n  \
                         --relay-pairs P  relay sessions carrying bulk bytes (default 8)"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        o.agents = agents.unwrap_or(if o.quick { 500 } else { 10_000 });
        if o.agents < 4 {
            bail!("--agents must be at least 4 (two pairs)");
        }
        Ok(o)
    }
}

/// The bounds of each phase.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Both registration waves together.
    register: Duration,
    /// S's idle window with all agents registered.
    idle: Duration,
    introduce: Duration,
    relay: Duration,
    /// Bytes one relay session may send at most.
    relay_bytes: u64,
    /// How long S's memory is left to settle before it is read.
    settle: Duration,
}

impl Bounds {
    fn new(quick: bool) -> Bounds {
        if quick {
            Bounds {
                register: Duration::from_secs(15),
                idle: Duration::from_secs(1),
                introduce: Duration::from_secs(8),
                relay: Duration::from_secs(2),
                relay_bytes: 2 << 30,
                settle: Duration::from_millis(500),
            }
        } else {
            Bounds {
                register: Duration::from_secs(75),
                idle: Duration::from_secs(3),
                introduce: Duration::from_secs(30),
                relay: Duration::from_secs(5),
                relay_bytes: 3 << 30,
                settle: Duration::from_secs(1),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup on signals

/// Children and the temp dir, for the signal thread.
static CHILDREN: Mutex<(Vec<u32>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));

fn children() -> std::sync::MutexGuard<'static, (Vec<u32>, Option<PathBuf>)> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records each child the kit starts (S, etcd), through `kit::on_spawn`.
fn record_child(pid: u32) {
    let mut c = children();
    c.0.retain(|&p| host::is_our_child(p));
    c.0.push(pid);
}

/// On SIGINT, SIGTERM or SIGHUP: kill the children, remove the temp dir, exit 130. (On
/// a normal end, an error or a panic the handles' `Drop` does the same.)
fn install_signal_cleanup() -> Result<()> {
    host::on_interrupt("load-signals", || {
        let c = children();
        for &pid in c.0.iter().filter(|&&pid| host::is_our_child(pid)) {
            // SAFETY: kill(2) of a child this process started and has not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(dir) = &c.1 {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("load: interrupted; S and etcd killed, temp dir removed");
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One S

/// One S of a scenario.
struct Server {
    label: String,
    relay: Relay,
    target: Target,
    /// Where S serves its metrics (`--metrics`, loopback): its own count of relayed bytes.
    metrics: SocketAddr,
    /// The command line as started (the kit adds the address and state flags).
    command: String,
}

/// What S's metrics say it did with relayed packets.
#[derive(Debug, Default, Clone)]
struct RelayCounters {
    /// Payload bytes S sent on (`p2ptun_relay_relay_bytes_total`).
    forwarded_bytes: u64,
    /// Packets by what became of them (`p2ptun_relay_relay_packets_total{result=...}`).
    packets: BTreeMap<String, u64>,
}

impl RelayCounters {
    fn since(&self, before: &RelayCounters) -> RelayCounters {
        RelayCounters {
            forwarded_bytes: self.forwarded_bytes.saturating_sub(before.forwarded_bytes),
            packets: self
                .packets
                .iter()
                .map(|(k, v)| {
                    let b = before.packets.get(k).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(b))
                })
                .filter(|(_, v)| *v > 0)
                .collect(),
        }
    }
}

impl Server {
    fn rss_kib(&self) -> Option<u64> {
        self.relay.proc().rss_kib()
    }

    fn cpu_secs(&self) -> Option<f64> {
        self.relay.proc().cpu_secs()
    }

    /// S's relay counters, from its metrics page (bounded by a timeout).
    async fn relay_counters(&self) -> Result<RelayCounters> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics;
        let fetch = async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
            let mut text = String::new();
            s.read_to_string(&mut text).await?;
            anyhow::Ok(text)
        };
        let text = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .context("S's metrics did not answer within 5 s")??;
        let mut c = RelayCounters::default();
        for line in text.lines() {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            if key == "p2ptun_relay_relay_bytes_total" {
                c.forwarded_bytes = value;
            } else if let Some(result) = key
                .strip_prefix("p2ptun_relay_relay_packets_total{result=\"")
                .and_then(|r| r.strip_suffix("\"}"))
            {
                c.packets.insert(result.to_owned(), value);
            }
        }
        Ok(c)
    }
}

/// Starts S `label` on free loopback ports with `extra` flags, waits until it listens and
/// reads its key fingerprint from its log.
async fn start_server(lab: &kit::Lab, label: &str, extra: Vec<String>) -> Result<Server> {
    let (port, alt, metrics) = (kit::free_port(), kit::free_port(), kit::free_port());
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let alt = SocketAddr::from(([127, 0, 0, 1], alt));
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics));
    // `--public-addr` (cluster mode) must name this S's own port, known only now.
    let extra: Vec<String> = extra
        .into_iter()
        .map(|a| match a.as_str() {
            "{listen}" => listen.to_string(),
            "{metrics}" => metrics.to_string(),
            _ => a,
        })
        .collect();
    let opts = RelayOpts {
        addrs: Some((listen, alt)),
        extra_args: extra.clone(),
        // As an operator runs it: S's default log level.
        log: Some("info".to_owned()),
        ..RelayOpts::default()
    };
    let relay = Relay::try_start(lab, label, opts)
        .await
        .with_context(|| format!("starting {label}"))?;
    let fingerprint: Fingerprint = relay
        .fingerprint
        .as_deref()
        .context("S logged no fingerprint")?
        .parse()
        .map_err(|e| anyhow::anyhow!("S's fingerprint: {e}"))?;
    let command = format!(
        "RUST_LOG=info p2ptun-relay --listen {listen} --stun-alt {alt} --state-dir TMP/{label} {}",
        extra.join(" ")
    );
    Ok(Server {
        label: label.to_owned(),
        target: Target {
            addr: relay.addr(),
            fingerprint,
        },
        relay,
        metrics,
        command: command.trim_end().to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// A scenario

/// What one scenario measured.
struct Outcome {
    name: &'static str,
    servers: Vec<ServerFigures>,
    sources: usize,
    forwarders: Wave,
    exposers: Wave,
    /// Registered agents whose connection S still held after the idle window.
    still_registered: usize,
    intros: Intros,
    relayed: Relayed,
    /// S's CPU seconds during the relay interval, all S together.
    relay_cpu: f64,
    relay_closed: u64,
    /// What S's metrics counted in the relay interval, all S together.
    s_relayed: RelayCounters,
    /// UDP datagrams the host dropped at full receive buffers during the registrations,
    /// the introductions and the relaying ([`host::udp_rcvbuf_errors`]).
    udp_drops: [Option<u64>; 3],
    notes: Vec<String>,
}

/// One S's figures in a scenario.
struct ServerFigures {
    label: String,
    command: String,
    agents: usize,
    rss_before: Option<u64>,
    rss_registered: Option<u64>,
    rss_after_intros: Option<u64>,
    /// Share of one core S used while the registered agents idled.
    idle_cpu: Option<f64>,
    relay_cpu: Option<f64>,
}

impl ServerFigures {
    fn kib_per_agent(&self) -> Option<f64> {
        let (a, b) = (self.rss_before?, self.rss_registered?);
        (self.agents > 0).then(|| (b as f64 - a as f64) / self.agents as f64)
    }
}

/// Which S agent `id` registers with: in a pair k (exposer 2k, forwarder 2k+1) the exposer
/// is on S `k % 2`; the forwarder is on the same S when `k / 2` is even and on the other
/// one when it is odd, so both S get half the agents and half the pairs cross S.
fn home_of(id: usize, servers: usize) -> usize {
    if servers < 2 {
        return 0;
    }
    let k = id / 2;
    let exposer_home = k % 2;
    if id.is_multiple_of(2) || (k / 2).is_multiple_of(2) {
        exposer_home
    } else {
        1 - exposer_home
    }
}

fn name_of(id: usize) -> String {
    format!("load-{id}")
}

fn say(start: Instant, what: &str) {
    eprintln!("load [{:6.1}s] {what}", start.elapsed().as_secs_f64());
}

async fn scenario(
    opts: &Opts,
    bounds: Bounds,
    prepared: &[agents::Prepared],
    lab: &kit::Lab,
    cluster: bool,
    t0: Instant,
) -> Result<Outcome> {
    let name = if cluster {
        "(b) two S, etcd cluster"
    } else {
        "(a) one S"
    };
    let n = opts.agents;
    let n_servers = if cluster { 2 } else { 1 };
    let mut notes = Vec::new();

    // etcd first (S in cluster mode needs it to claim names), killed when `etcd` drops.
    let etcd = if cluster {
        say(t0, "starting a 3-member etcd on loopback");
        Some(EtcdCluster::start(lab, 3).await?)
    } else {
        None
    };
    let mut servers = Vec::new();
    for i in 0..n_servers {
        let label = if cluster {
            format!("s{}", i + 1)
        } else {
            "s".to_owned()
        };
        let mut extra = vec![
            // S's own count of the bytes it relayed (loopback only).
            "--metrics".to_owned(),
            "{metrics}".to_owned(),
            "--relay-session-rate".to_owned(),
            RELAY_CAP.to_owned(),
            "--relay-rate-per-ip".to_owned(),
            RELAY_CAP.to_owned(),
        ];
        if let Some(etcd) = &etcd {
            extra.extend([
                "--etcd".to_owned(),
                etcd.urls(),
                "--public-addr".to_owned(),
                "{listen}".to_owned(),
            ]);
        }
        let on_this = (0..n).filter(|&id| home_of(id, n_servers) == i).count();
        if on_this > DEFAULT_MAX_CONNECTIONS {
            // No flag sets max_connections; its config key does.
            let file = lab.write(
                &format!("{label}.toml"),
                &format!("max_connections = {}\n", on_this + 1024),
            );
            extra.extend(["-c".to_owned(), file.to_string_lossy().into_owned()]);
        }
        servers.push(start_server(lab, &label, extra).await?);
    }
    let targets: Vec<Target> = servers.iter().map(|s| s.target.clone()).collect();
    tokio::time::sleep(bounds.settle).await;
    let rss_before: Vec<Option<u64>> = servers.iter().map(Server::rss_kib).collect();

    let sources = Sources::bind((n / 50).clamp(8, 60_000))?;
    say(
        t0,
        &format!(
            "{name}: registering {n} agents from {} loopback sources",
            sources.len()
        ),
    );
    let pushed = Arc::new(Pushed::default());
    let drops_before = host::udp_rcvbuf_errors();
    let deadline = Instant::now() + bounds.register;
    let home = |id| home_of(id, n_servers);
    let (mut live, forwarders) = agents::register_wave(
        prepared,
        &sources,
        &targets,
        (1..n).step_by(2).collect(),
        |_| Vec::new(),
        home,
        opts.at_once,
        deadline,
        &pushed,
    )
    .await;
    say(
        t0,
        &format!(
            "forwarders: {} of {} registered, {:.0}/s",
            forwarders.ok,
            forwarders.attempted,
            forwarders.rate()
        ),
    );
    let (exp_live, exposers) = agents::register_wave(
        prepared,
        &sources,
        &targets,
        (0..n).step_by(2).collect(),
        |id| vec![name_of(id)],
        home,
        opts.at_once,
        deadline,
        &pushed,
    )
    .await;
    live.extend(exp_live);
    say(
        t0,
        &format!(
            "exposers: {} of {} registered, {:.0}/s",
            exposers.ok,
            exposers.attempted,
            exposers.rate()
        ),
    );
    let drops_registered = host::udp_rcvbuf_errors();
    for s in &servers {
        s.relay.proc().ensure_running()?;
    }

    tokio::time::sleep(bounds.settle).await;
    let rss_registered: Vec<Option<u64>> = servers.iter().map(Server::rss_kib).collect();
    // S's cost of holding the agents: its CPU while they only send keep-alives.
    let cpu0: Vec<Option<f64>> = servers.iter().map(Server::cpu_secs).collect();
    let idle_start = Instant::now();
    tokio::time::sleep(bounds.idle).await;
    let idle_len = idle_start.elapsed().as_secs_f64();
    let idle_cpu: Vec<Option<f64>> = servers
        .iter()
        .zip(&cpu0)
        .map(|(s, c0)| Some((s.cpu_secs()? - (*c0)?) / idle_len))
        .collect();
    let still_registered = live
        .iter()
        .filter(|a| a.conn.close_reason().is_none())
        .count();

    // Introductions: every pair whose two agents registered, twice over.
    let by_id: std::collections::HashMap<usize, &Live> = live.iter().map(|a| (a.id, a)).collect();
    let pairs: Vec<(usize, usize)> = (0..n / 2)
        .map(|k| (2 * k, 2 * k + 1))
        .filter(|(e, f)| by_id.contains_key(e) && by_id.contains_key(f))
        .collect();
    let intro_pairs: Vec<(Arc<Forwarder>, String)> = pairs
        .iter()
        .map(|&(e, f)| {
            let fwd = Forwarder::new(
                f,
                by_id[&f].conn.clone(),
                prepared[f].config.clone(),
                sources.of(f).clone(),
            );
            (Arc::new(fwd), name_of(e))
        })
        .collect();
    let count = intro_pairs.len() * 2;
    say(
        t0,
        &format!("introducing: {count} requests over {} pairs", pairs.len()),
    );
    let drops_intro0 = host::udp_rcvbuf_errors();
    let intros = agents::introduce(
        &intro_pairs,
        &targets,
        count,
        opts.at_once,
        Instant::now() + bounds.introduce,
        Duration::from_secs(3),
        &pushed,
    )
    .await;
    say(
        t0,
        &format!(
            "introductions: {} completed ({:.0}/s; {} across S, {} Elsewhere answers, {} visits), \
             {} errors, {} failed",
            intros.completed,
            intros.rate(),
            intros.completed_across,
            intros.elsewhere,
            intros.visits,
            intros.errors.values().sum::<usize>(),
            intros.failed.values().sum::<usize>()
        ),
    );
    let drops_intro1 = host::udp_rcvbuf_errors();
    tokio::time::sleep(bounds.settle).await;
    let rss_after_intros: Vec<Option<u64>> = servers.iter().map(Server::rss_kib).collect();

    // Relaying: pairs on one S, spread over the S, each pair's agents on other sources.
    let mut relay_pairs = Vec::new();
    for s in 0..n_servers {
        let want = opts.relay_pairs.div_ceil(n_servers);
        relay_pairs.extend(
            pairs
                .iter()
                .filter(|&&(e, f)| home(e) == s && home(f) == s)
                .take(want)
                .map(|&(e, f)| (by_id[&f].conn.clone(), by_id[&e].conn.clone(), name_of(e))),
        );
    }
    relay_pairs.truncate(opts.relay_pairs);
    say(
        t0,
        &format!(
            "relaying: {} sessions for {:.0} s",
            relay_pairs.len(),
            bounds.relay.as_secs_f64()
        ),
    );
    let mut counters0 = Vec::new();
    for s in &servers {
        counters0.push(s.relay_counters().await?);
    }
    let cpu0: Vec<Option<f64>> = servers.iter().map(Server::cpu_secs).collect();
    let drops_relay0 = host::udp_rcvbuf_errors();
    let relayed = agents::relay(&relay_pairs, bounds.relay, bounds.relay_bytes).await;
    let drops_relay1 = host::udp_rcvbuf_errors();
    let since = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    let udp_drops = [
        since(drops_before, drops_registered),
        since(drops_intro0, drops_intro1),
        since(drops_relay0, drops_relay1),
    ];
    let relay_cpu: Vec<Option<f64>> = servers
        .iter()
        .zip(&cpu0)
        .map(|(s, c0)| Some(s.cpu_secs()? - (*c0)?))
        .collect();
    let mut s_relayed = RelayCounters::default();
    for (s, before) in servers.iter().zip(&counters0) {
        let d = s.relay_counters().await?.since(before);
        s_relayed.forwarded_bytes += d.forwarded_bytes;
        for (k, v) in d.packets {
            *s_relayed.packets.entry(k).or_default() += v;
        }
    }
    say(
        t0,
        &format!(
            "relayed {:.0} MiB in {:.1} s ({} problems)",
            relayed.received_bytes as f64 / MIB,
            relayed.took.as_secs_f64(),
            relayed.problems.len()
        ),
    );
    for s in &servers {
        s.relay.proc().ensure_running()?;
        let warn = s.relay.proc().problems();
        let warn: Vec<&String> = warn
            .iter()
            // S's warning that it runs without a token is expected here.
            .filter(|l| !l.contains("no token configured") && !l.contains("open registration"))
            .collect();
        if !warn.is_empty() {
            notes.push(format!(
                "{} logged {} WARN/ERROR line(s), e.g.: {}",
                s.label,
                warn.len(),
                warn[0].chars().take(200).collect::<String>()
            ));
        }
    }

    // Tear down: the agents say goodbye, then S and etcd go with their handles.
    let relay_closed = pushed
        .relay_closed
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(by_id);
    drop(relay_pairs);
    drop(intro_pairs);
    drop(live);
    sources.close(Duration::from_secs(2)).await;

    let figures = servers
        .iter()
        .enumerate()
        .map(|(i, s)| ServerFigures {
            label: s.label.clone(),
            command: s.command.clone(),
            agents: (0..n).filter(|&id| home_of(id, n_servers) == i).count(),
            rss_before: rss_before[i],
            rss_registered: rss_registered[i],
            rss_after_intros: rss_after_intros[i],
            idle_cpu: idle_cpu[i],
            relay_cpu: relay_cpu[i],
        })
        .collect::<Vec<_>>();
    drop(servers);
    drop(etcd);
    Ok(Outcome {
        name,
        sources: (n / 50).clamp(8, 60_000),
        still_registered,
        relay_cpu: figures.iter().filter_map(|f| f.relay_cpu).sum(),
        servers: figures,
        forwarders,
        exposers,
        intros,
        relayed,
        relay_closed,
        s_relayed,
        udp_drops,
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// Output

fn opt_mib(k: Option<u64>) -> String {
    k.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

impl Outcome {
    fn registered(&self) -> usize {
        self.forwarders.ok + self.exposers.ok
    }

    /// Both waves as one: all registrations over the two waves' time.
    fn all_rate(&self) -> f64 {
        let t = self.forwarders.took + self.exposers.took;
        self.registered() as f64 / t.as_secs_f64().max(1e-9)
    }

    fn mib_s(&self) -> f64 {
        self.relayed.received_bytes as f64 / MIB / self.relayed.took.as_secs_f64().max(1e-9)
    }

    /// S's relayed bytes (its own count) per CPU-second of S.
    fn gib_per_cpu_s(&self) -> Option<f64> {
        (self.relay_cpu > 0.0).then(|| self.s_relayed.forwarded_bytes as f64 / GIB / self.relay_cpu)
    }

    /// S's relayed bytes (its own count) per second.
    fn s_mib_s(&self) -> f64 {
        self.s_relayed.forwarded_bytes as f64 / MIB / self.relayed.took.as_secs_f64().max(1e-9)
    }

    fn per_server(&self, f: impl Fn(&ServerFigures) -> String) -> String {
        if self.servers.len() == 1 {
            return f(&self.servers[0]);
        }
        self.servers
            .iter()
            .map(|s| format!("{}: {}", s.label, f(s)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Both waves' failures, by kind.
    fn failures(a: &Wave, b: &Wave) -> String {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for (k, c) in a.failures.iter().chain(&b.failures) {
            *kinds.entry(k).or_default() += c;
        }
        let mut s = String::new();
        for (k, c) in kinds {
            let _ = write!(s, "{c}× {k}; ");
        }
        let not_started = a.not_started + b.not_started;
        if not_started > 0 {
            let _ = write!(s, "{not_started} not started (deadline)");
        }
        s.trim_end_matches("; ").to_owned()
    }

    fn json(&self) -> Value {
        let wave = |w: &Wave| {
            json!({"attempted": w.attempted, "registered": w.ok, "seconds": w.took.as_secs_f64(),
                   "per_s": w.rate(), "failures": w.failures, "not_started": w.not_started})
        };
        json!({
            "scenario": self.name,
            "sources": self.sources,
            "registered": self.registered(),
            "still_registered_after_idle": self.still_registered,
            "registrations_per_s": self.all_rate(),
            "wave_no_names": wave(&self.forwarders),
            "wave_one_name_each": wave(&self.exposers),
            "servers": self.servers.iter().map(|s| json!({
                "label": s.label,
                "command": s.command,
                "agents": s.agents,
                "vmrss_kib_before": s.rss_before,
                "vmrss_kib_registered": s.rss_registered,
                "vmrss_kib_after_introductions": s.rss_after_intros,
                "kib_per_agent": s.kib_per_agent(),
                "idle_cpu_share_of_one_core": s.idle_cpu,
                "relay_cpu_s": s.relay_cpu,
            })).collect::<Vec<_>>(),
            "introductions": {
                "asked": self.intros.asked,
                "completed": self.intros.completed,
                "per_s": self.intros.rate(),
                "seconds": self.intros.took.as_secs_f64(),
                "completed_same_s": self.intros.completed_here,
                "same_s_per_s": self.intros.rate_here(),
                "same_s_seconds": self.intros.took_here.as_secs_f64(),
                "completed_across_s": self.intros.completed_across,
                "across_s_per_s": self.intros.rate_across(),
                "across_s_seconds": self.intros.took_across.as_secs_f64(),
                "elsewhere_answers": self.intros.elsewhere,
                "visits": self.intros.visits,
                "visit_ms_mean": self.intros.visit_ms(),
                "answered": self.intros.answered,
                "answers_per_s": self.intros.answer_rate(),
                "rendezvous_without_incoming": self.intros.half,
                "errors": self.intros.errors,
                "error_examples": self.intros.examples,
                "failed": self.intros.failed,
                "not_started": self.intros.not_started,
            },
            "relay": {
                "sessions": self.relayed.sessions,
                "payload_bytes": self.relayed.payload,
                "seconds": self.relayed.took.as_secs_f64(),
                "sent_bytes": self.relayed.sent_bytes,
                "received_bytes": self.relayed.received_bytes,
                "sent_datagrams": self.relayed.sent_datagrams,
                "received_datagrams": self.relayed.received_datagrams,
                "delivered_mib_per_s": self.mib_s(),
                "s_forwarded_bytes": self.s_relayed.forwarded_bytes,
                "s_forwarded_mib_per_s": self.s_mib_s(),
                "s_packets": self.s_relayed.packets,
                "s_cpu_seconds": self.relay_cpu,
                "gib_per_cpu_second": self.gib_per_cpu_s(),
                "problems": self.relayed.problems,
            },
            "relay_closed_pushes": self.relay_closed,
            "udp_rcvbuf_drops": {
                "registration": self.udp_drops[0],
                "introductions": self.udp_drops[1],
                "relay": self.udp_drops[2],
            },
            "notes": self.notes,
        })
    }
}

fn table(outcomes: &[Outcome], header: &[String]) -> String {
    let mut t = String::new();
    for h in header {
        let _ = writeln!(t, "{h}");
    }
    let _ = writeln!(t);
    let _ = write!(t, "| figure |");
    for o in outcomes {
        let _ = write!(t, " {} |", o.name);
    }
    let _ = writeln!(t);
    let _ = write!(t, "|---|");
    for _ in outcomes {
        let _ = write!(t, "---|");
    }
    let _ = writeln!(t);
    let mut row = |label: &str, f: &dyn Fn(&Outcome) -> String| {
        let _ = write!(t, "| {label} |");
        for o in outcomes {
            let _ = write!(t, " {} |", f(o));
        }
        let _ = writeln!(t);
    };
    row("agents registered", &|o| {
        let attempted = o.forwarders.attempted + o.exposers.attempted;
        let mut s = format!("{} of {attempted}", o.registered());
        if o.servers.len() > 1 {
            let _ = write!(s, " ({})", o.per_server(|f| f.agents.to_string()));
        }
        if o.still_registered != o.registered() {
            let _ = write!(
                s,
                "; {} still held after the idle window",
                o.still_registered
            );
        }
        s
    });
    row("registrations/s, all", &|o| format!("{:.0}", o.all_rate()));
    row("registrations/s, exposing nothing", &|o| {
        format!("{:.0}", o.forwarders.rate())
    });
    row("registrations/s, claiming one new name each", &|o| {
        format!("{:.0}", o.exposers.rate())
    });
    row("registration failures", &|o| {
        let f = Outcome::failures(&o.forwarders, &o.exposers);
        if f.is_empty() {
            "none".into()
        } else {
            f
        }
    });
    row("S VmRSS before → registered (MiB)", &|o| {
        o.per_server(|s| format!("{} → {}", opt_mib(s.rss_before), opt_mib(s.rss_registered)))
    });
    row("S KiB per registered agent", &|o| {
        o.per_server(|s| {
            s.kib_per_agent()
                .map_or("n/a".into(), |k| format!("{k:.1}"))
        })
    });
    row("S CPU with the agents idle (% of a core)", &|o| {
        o.per_server(|s| {
            s.idle_cpu
                .map_or("n/a".into(), |c| format!("{:.1}", c * 100.0))
        })
    });
    row("S VmRSS after the introductions (MiB)", &|o| {
        o.per_server(|s| opt_mib(s.rss_after_intros))
    });
    row("introductions completed/s, all", &|o| {
        format!(
            "{:.0} ({} of {} in {:.1} s)",
            o.intros.rate(),
            o.intros.completed,
            o.intros.asked,
            o.intros.took.as_secs_f64()
        )
    });
    row("introductions completed/s, same S", &|o| {
        format!(
            "{:.0} ({} in {:.1} s)",
            o.intros.rate_here(),
            o.intros.completed_here,
            o.intros.took_here.as_secs_f64()
        )
    });
    row(
        "introductions completed/s, across S (Elsewhere, visit, ask again)",
        &|o| {
            if o.intros.elsewhere == 0 && o.intros.completed_across == 0 {
                return "none asked".into();
            }
            format!(
                "{:.0} ({} in {:.1} s)",
                o.intros.rate_across(),
                o.intros.completed_across,
                o.intros.took_across.as_secs_f64()
            )
        },
    );
    row(
        "Elsewhere answers; visits made (mean registration ms)",
        &|o| {
            format!(
                "{}; {} ({})",
                o.intros.elsewhere,
                o.intros.visits,
                o.intros
                    .visit_ms()
                    .map_or("n/a".into(), |ms| format!("{ms:.0}"))
            )
        },
    );
    row("introductions not completed", &|o| {
        let mut parts = Vec::new();
        for (k, c) in &o.intros.errors {
            parts.push(format!("{c}× {k}"));
        }
        for (k, c) in &o.intros.failed {
            parts.push(format!("{c}× failed: {k}"));
        }
        if o.intros.half > 0 {
            parts.push(format!("{}× Rendezvous without Incoming", o.intros.half));
        }
        if o.intros.not_started > 0 {
            parts.push(format!("{} not started (deadline)", o.intros.not_started));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            format!(
                "{} (all answers: {:.0}/s)",
                parts.join("; "),
                o.intros.answer_rate()
            )
        }
    });
    row("relayed MiB/s (S's count; delivered)", &|o| {
        format!(
            "{:.0}; {:.0} ({} sessions, {} B datagrams, {:.1}% of those sent not delivered)",
            o.s_mib_s(),
            o.mib_s(),
            o.relayed.sessions,
            o.relayed.payload,
            100.0
                * (1.0
                    - o.relayed.received_datagrams as f64 / o.relayed.sent_datagrams.max(1) as f64)
        )
    });
    row(
        "UDP receive-buffer drops on the host: registration; introductions; relay",
        &|o| {
            let n = |d: Option<u64>| d.map_or("n/a".into(), |d| d.to_string());
            format!(
                "{}; {}; {}",
                n(o.udp_drops[0]),
                n(o.udp_drops[1]),
                n(o.udp_drops[2])
            )
        },
    );
    row("relayed GiB per CPU-second of S", &|o| {
        o.gib_per_cpu_s().map_or("n/a".into(), |g| {
            format!("{g:.2} ({:.2} CPU-s of S)", o.relay_cpu)
        })
    });
    let _ = writeln!(t);
    for o in outcomes {
        for s in &o.servers {
            let _ = writeln!(t, "{} {}: `{}`", o.name, s.label, s.command);
        }
        if !o.s_relayed.packets.is_empty() {
            let _ = writeln!(
                t,
                "{}: relayed packets by S's verdict: {:?}",
                o.name, o.s_relayed.packets
            );
        }
        for n in o.notes.iter().chain(&o.relayed.problems) {
            let _ = writeln!(t, "{}: note: {n}", o.name);
        }
        for (k, e) in &o.intros.examples {
            let _ = writeln!(t, "{}: S's answer ({k}…): \"{e}\"", o.name);
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// main

fn main() {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(opts) {
        eprintln!("load: FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: Opts) -> Result<()> {
    let t0 = Instant::now();
    install_signal_cleanup()?;
    kit::on_spawn(record_child);
    let nofile = host::raise_nofile(WANT_NOFILE);
    let bounds = Bounds::new(opts.quick);
    let lab = kit::Lab::new("load");
    children().1 = Some(lab.path().to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The generator's runtime: as many workers as cores; S (and etcd) share them.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;

    say(t0, &format!("making {} agent keys", opts.agents));
    let keys_start = Instant::now();
    let prepared = agents::prepare(opts.agents, cores)?;
    let keys_took = keys_start.elapsed();

    let mut outcomes = Vec::new();
    let mut skipped = Vec::new();
    if opts.single {
        outcomes.push(rt.block_on(scenario(&opts, bounds, &prepared, &lab, false, t0))?);
    }
    if opts.cluster {
        if EtcdCluster::available() {
            outcomes.push(rt.block_on(scenario(&opts, bounds, &prepared, &lab, true, t0))?);
        } else {
            skipped.push(
                "(b) skipped: no `etcd` binary (Debian: apt-get install etcd-server)".to_owned(),
            );
        }
    }
    drop(rt);

    let machine = host::machine();
    let mut header = vec![
        format!(
            "machine: {} cores ({}), {:.0} GiB; load generator and S share them; \
             RLIMIT_NOFILE {nofile}",
            cores,
            machine.cpu_model,
            machine.mem_gib.unwrap_or(0.0)
        ),
        format!(
            "agents: {} (each its own key, made in {:.1} s before timing), {} at once; \
             phases: registration ≤ {:.0} s, introductions ≤ {:.0} s, relay {:.0} s",
            opts.agents,
            keys_took.as_secs_f64(),
            opts.at_once,
            bounds.register.as_secs_f64(),
            bounds.introduce.as_secs_f64(),
            bounds.relay.as_secs_f64()
        ),
        format!(
            "run took {:.0} s; load average at the end {} (anything else running shares the \
             cores)",
            t0.elapsed().as_secs_f64(),
            host::loadavg()
        ),
    ];
    header.extend(skipped.iter().cloned());
    let text = table(&outcomes, &header);
    if opts.json {
        eprintln!("{text}");
        let out = json!({
            "machine": {"cores": cores, "cpu_model": machine.cpu_model, "mem_gib": machine.mem_gib},
            "agents": opts.agents,
            "at_once": opts.at_once,
            "quick": opts.quick,
            "rlimit_nofile": nofile,
            "key_generation_s": keys_took.as_secs_f64(),
            "run_s": t0.elapsed().as_secs_f64(),
            "skipped": skipped,
            "scenarios": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{text}");
    }
    Ok(())
}
