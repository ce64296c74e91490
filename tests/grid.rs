//! The grid test: every ordered pair (exposer preset × forwarder preset) of the NAT lab's
//! presets runs `p2ptun expose` and `p2ptun forward`, moves 8 MiB each way through the tunnel
//! with SHA-256 checks, and must reach the path kind [`expected`] names for it.
//!
//! Per pair: a fresh [`natlab::Lab`]; S started as an operator would (`p2ptun-relay`, no
//! address flags: both families' wildcard, ports 7000 and 7001) in S's namespace, reached at
//! 203.0.113.1:7000 (at [2001:db8::1]:7000 from an IPv6-only host); host A (exposer) and host B (forwarder) with the two
//! presets (`same-lan`: both behind one `easy` router, on its LAN; `hairpin` and `no-hairpin`:
//! both behind one `easy` router that does or does not hairpin, isolated from each other on
//! its LAN; these three pair only with themselves).
//! The service is the harness's [`common::Service`], listening on 127.0.0.1 inside A's
//! namespace; in duplex mode it reads the client's 8 MiB (hashing) while it writes its own
//! 8 MiB seeded stream, then only its 64-byte trailer (the two digests). The client connects
//! from inside B's namespace to the forward's 127.0.0.1 port, first with echo probes until the
//! tunnel works (the "ready" time: from starting the forwarder to the first echoed byte), then
//! with the transfer, and compares both digests (and the service's own record of what it
//! received).
//!
//! The path kind is what the forwarder reports for its peer on its status socket (what
//! `p2ptun status --json` prints), read once the punches are over (a direct UDP path, both
//! punch outcomes in the forwarder's log, or [`SETTLE_MAX`]) and again after the transfer. It
//! is confirmed independently by the bytes S's interface received during the transfer: under
//! 2 MiB for a direct path, over 8 MiB for the relay.
//!
//! All pairs run first (a few at a time, [`JOBS`] or `P2PTUN_GRID_JOBS`), then the grid is
//! printed and the test fails listing every pair whose outcome differs from the expectation,
//! with the relevant lines of its agents' and S's logs. `P2PTUN_GRID_ONLY=easy/hard,hard/hard`
//! runs only those pairs (exposer/forwarder); `P2PTUN_GRID_LOG` sets the children's
//! `RUST_LOG` (default `info`); `P2PTUN_GRID_HOLD=SECS` keeps each pair's lab and processes
//! that long after it ran, for a look from a shell; `P2PTUN_GRID_SHAPING=50/2` puts 50 ms
//! delay and 2 % loss on every WAN link. A failed pair's temp dir is kept (every pair's with
//! `P2PTUN_GRID_KEEP=1`).
//!
//! Needs root (network namespaces, nftables): skips otherwise, fails under `CI=true`.

use p2ptun_testkit as common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use common::natlab;
use common::{
    data_digest, echo_once, hex, transfer_via, Kit, Mode, Proc, Ready, RelayOpts, Service, Step,
    Tunnel,
};
use natlab::{Host, Ipv6, Lab, Nat, RouterSpec, Shaping, Stack};

/// Bytes moved each way per pair.
const LEN: u64 = 8 * 1024 * 1024;
/// The forward's port on 127.0.0.1 in B's namespace (a fresh namespace: always free).
const FWD_PORT: u16 = 7100;
/// Pairs run at once (each is a lab, S and two agents; 2 cores manage 4).
const JOBS: usize = 4;
/// Everything one pair does must end within this.
const PAIR_DEADLINE: Duration = Duration::from_secs(90);
/// The same for the pair over shaped links (200 ms RTT, about 4 % loss per direction).
/// QUIC over such links moved 8 MiB each way in about 230 s in trials (quinn's Cubic backs off
/// on every random loss), direct TCP in about 8 s (the kernel's BBR).
const SHAPED_DEADLINE: Duration = Duration::from_secs(480);
/// How long the forward may take to carry a first echo round trip.
const READY: Duration = Duration::from_secs(30);
/// One echo probe's limit (the forwarder may hold a local connection through a whole punch).
const PROBE: Duration = Duration::from_secs(15);
/// How long after the tunnel works the punches may still change the path (UDP and TCP
/// punches run for 10 s after a start delay of at most 2 s).
const SETTLE_MAX: Duration = Duration::from_secs(16);
/// S may receive at most this much during the transfer over a direct path…
const DIRECT_MAX_S_RX: u64 = 2 * 1024 * 1024;
/// …and at least this much over the relay (it receives both directions' 8 MiB).
const RELAY_MIN_S_RX: u64 = 8 * 1024 * 1024;
/// A limit for one-shot commands (`p2ptun status`, `ip`).
const ONE_SHOT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Presets and the contract

/// The grid's presets: the lab's NAT presets, and three of two hosts behind one router
/// (`same-lan`, `hairpin`, `no-hairpin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Preset {
    Public,
    Easy,
    FullCone,
    Restricted,
    Hard,
    SameLan,
    Hairpin,
    NoHairpin,
    Double,
    UdpBlocked,
    TcpToSOnly,
    /// `hard` with a home router's IPv6: routed, no NAT66, new inbound dropped.
    HardV6,
    /// `hard` whose router drops all IPv6: the hosts have addresses, nothing passes.
    HardV6Drop,
    /// IPv6 only (no IPv4 at all), behind a home router's IPv6 firewall.
    V6Only,
    /// A counting NAT: a new public port per destination, one above the last.
    Sequential,
    /// `easy` without an input firewall (unsolicited packets to its WAN make conntrack
    /// entries of its own), one ISP hop away from the internet.
    EasyOpen,
}

impl Preset {
    const ALL: [Preset; 11] = [
        Preset::Public,
        Preset::Easy,
        Preset::FullCone,
        Preset::Restricted,
        Preset::Hard,
        Preset::SameLan,
        Preset::Hairpin,
        Preset::NoHairpin,
        Preset::Double,
        Preset::UdpBlocked,
        Preset::TcpToSOnly,
    ];

    fn name(self) -> &'static str {
        match self {
            Preset::SameLan => "same-lan",
            Preset::Hairpin => "hairpin",
            Preset::NoHairpin => "no-hairpin",
            Preset::HardV6 => "hard+ipv6",
            Preset::HardV6Drop => "hard+ipv6-drop",
            Preset::V6Only => "ipv6-only",
            Preset::Sequential => "sequential",
            Preset::EasyOpen => "easy-open",
            other => other.nat().name(),
        }
    }

    fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL
            .into_iter()
            .chain(NETWORKS.iter().flat_map(|&(e, f)| [e, f]))
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The lab preset (`same-lan`: the router both hosts share).
    fn nat(self) -> Nat {
        match self {
            Preset::Public => Nat::Public,
            Preset::Easy
            | Preset::SameLan
            | Preset::Hairpin
            | Preset::NoHairpin
            | Preset::EasyOpen => Nat::Easy,
            Preset::FullCone => Nat::FullCone,
            Preset::Restricted => Nat::Restricted,
            Preset::Hard
            | Preset::HardV6
            | Preset::HardV6Drop
            | Preset::V6Only
            | Preset::Sequential => Nat::Hard,
            Preset::Double => Nat::Double,
            Preset::UdpBlocked => Nat::UdpBlocked,
            Preset::TcpToSOnly => Nat::TcpToSOnly,
        }
    }

    /// A host of this preset in `lab` (not the pair presets).
    fn add_host(self, lab: &Lab, shaping: Shaping) -> std::io::Result<Host> {
        let spec = match self {
            Preset::HardV6 | Preset::V6Only => RouterSpec {
                ipv6: Ipv6::Firewall,
                ..RouterSpec::new(Nat::Hard)
            },
            Preset::HardV6Drop => RouterSpec {
                ipv6: Ipv6::Drop,
                ..RouterSpec::new(Nat::Hard)
            },
            Preset::Sequential => RouterSpec::sequential(1),
            Preset::EasyOpen => RouterSpec::easy_open(),
            other => return lab.add_host(other.nat(), shaping),
        };
        let router = lab.add_router_with(RouterSpec { shaping, ..spec })?;
        let stack = match self {
            Preset::V6Only => Stack::V6Only,
            Preset::HardV6 | Preset::HardV6Drop => Stack::Dual,
            _ => Stack::V4,
        };
        lab.add_host_behind_with(&router, stack)
    }

    /// The `--server` an agent on such a host needs when S's IPv4 address is no use to it.
    fn server(self) -> Option<&'static str> {
        (self == Preset::V6Only).then_some(natlab::S_LISTEN6)
    }
}

/// The rows of the networks test ([`networks`]): presets beside the grid's, each pair with
/// S started with its defaults. (exposer, forwarder).
const NETWORKS: [(Preset, Preset); 8] = [
    (Preset::Easy, Preset::Hard),
    (Preset::Hard, Preset::Easy),
    (Preset::HardV6, Preset::HardV6),
    (Preset::HardV6Drop, Preset::HardV6Drop),
    (Preset::V6Only, Preset::Easy),
    (Preset::Sequential, Preset::Easy),
    (Preset::Easy, Preset::Sequential),
    (Preset::EasyOpen, Preset::EasyOpen),
];

/// A path kind as `p2ptun status --json` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Udp,
    Tcp,
    Relay,
}

impl Kind {
    fn from_status(kind: &str) -> Option<Kind> {
        match kind {
            "direct_udp" => Some(Kind::Udp),
            "direct_tcp" => Some(Kind::Tcp),
            "relay" => Some(Kind::Relay),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Udp => "UDP",
            Kind::Tcp => "TCP",
            Kind::Relay => "relay",
        }
    }
}

/// What a pair must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Path(Kind),
    /// `same-lan` with another preset: not a pair.
    NotApplicable,
}

/// The path kind the forwarder must end up on when `exposer` exposes and `forwarder` forwards.
/// This is the contract of issues 3 and 4; an outcome that differs is a failure to report,
/// not a reason to change it.
fn expected(exposer: Preset, forwarder: Preset) -> Expect {
    use Kind::*;
    use Preset::*;
    match (exposer, forwarder) {
        // IPv6 behind home routers: no NAT, a stateful firewall on each side. The checks to
        // each other's host address leave at the same moment and each opens its sender's
        // firewall for the other's: direct over IPv6, where IPv4 (hard × hard) could only be
        // relayed.
        (HardV6, HardV6) => Expect::Path(Udp),
        // Both routers drop IPv6 and IPv4 is hard × hard: the relay.
        (HardV6Drop, HardV6Drop) => Expect::Path(Relay),
        // An IPv6-only host and an IPv4-only host share no family: only S, which listens on
        // both, can carry them.
        (V6Only, _) | (_, V6Only) => Expect::Path(Relay),
        // A counting NAT: S's two addresses saw two ports `step` apart, so the easy side
        // checks the ports after them (punch::symmetric::Strategy::Predict) and one of them
        // is the mapping the counting side's checks come from.
        (Sequential, Easy) | (Easy, Sequential) => Expect::Path(Udp),
        // Routers that take unsolicited WAN packets: each side's first checks leave with a
        // low TTL, open its own NAT and die before the far router, so neither router makes
        // a conntrack entry of its own for the other's checks; then as easy × easy.
        (EasyOpen, EasyOpen) => Expect::Path(Udp),
        // Both hosts on one LAN: each offers its LAN address as a host candidate and the
        // checks go straight across the bridge, never through the NAT.
        (SameLan, SameLan) => Expect::Path(Udp),
        // Both hosts behind one `easy` NAT but isolated from each other on its LAN (client
        // isolation): the host candidates go nowhere. A NAT that hairpins takes a check sent
        // to the peer's public mapping back inside (with the sender's public mapping as its
        // source), so the server-reflexive pair works: direct UDP through the NAT.
        (Hairpin, Hairpin) => Expect::Path(Udp),
        // Without hairpinning a packet to the NAT's own public address goes nowhere, and there
        // is no other way between the two: the relay. (TCP would need hairpinning too.)
        (NoHairpin, NoHairpin) => Expect::Path(Relay),
        // `same-lan`, `hairpin` and `no-hairpin` are pair presets: no partner of another kind.
        (SameLan | Hairpin | NoHairpin, _) | (_, SameLan | Hairpin | NoHairpin) => {
            Expect::NotApplicable
        }
        // Only TCP to S's two addresses leaves that network: no UDP at all, and no TCP to the
        // peer, so the only way is the relay, reached over TCP to S.
        (TcpToSOnly, _) | (_, TcpToSOnly) => Expect::Path(Relay),
        // UDP blocked on one side, so no direct UDP. A direct TCP path needs a simultaneous
        // open through both NATs, which needs each side to know the port its peer's NAT
        // maps the punching connection to. Under `hard` every TCP connection is masqueraded
        // to a random port (endpoint-dependent mapping for TCP too): the port S sees is not
        // the one the peer's SYNs must reach, so only the relay is left.
        (UdpBlocked, Hard) | (Hard, UdpBlocked) => Expect::Path(Relay),
        // UDP blocked on one side, the other side's TCP maps endpoint-independently (public:
        // no NAT; easy, fullcone, restricted, double: TCP is masqueraded as easy, keeping the
        // port): the TCP mapping S reports is the one the peer reaches, and the simultaneous
        // open (each SYN opens its sender's NAT for the other's) gives direct TCP. Two
        // udp-blocked sides are both easy for TCP, so the same holds.
        (UdpBlocked, _) | (_, UdpBlocked) => Expect::Path(Tcp),
        // Both map per destination (at random): neither can tell the other which port its
        // checks will come from, so every check hits a port with no mapping for it. The
        // agents see this from the mappings they report (punch::symmetric::Strategy::
        // Impossible) and leave the session on the relay without spraying probes.
        (Hard, Hard) => Expect::Path(Relay),
        // One side maps per destination at random, the other keeps one port but filters by
        // address and port (easy, and double's outer NAT): the ordinary checks cannot meet.
        // The birthday punch gets through: the hard side opens 256 sockets toward the easy
        // side's mapping, the easy side probes random ports of the hard side's address at
        // 200/s until one of them is among those 256 (about 1.3 s expected).
        (Easy | Double, Hard) | (Hard, Easy | Double) => Expect::Path(Udp),
        // At least one side maps endpoint-independently and the pair is none of the above:
        // - public, fullcone: the hard side's check from its new port is let in (no filter,
        //   or endpoint-independent filtering), and the answer goes back to that port;
        // - restricted: it has sent to the hard side's address (its S-facing port), and the
        //   filter is by address only, so the check from the new port passes; the restricted
        //   side learns that port from it (a peer-reflexive candidate) and answers there;
        // - double and the remaining EIM × EIM pairs: each side's mapping is the same for
        //   every destination, so the srflx candidates S reports are the ones checks reach,
        //   and each side's own checks open its NAT's filter for the other's.
        _ => Expect::Path(Udp),
    }
}

/// The family a pair's direct path must use: IPv6 where both hosts have it through home
/// routers (it needs no NAT traversal and the measured RTTs tie), else IPv4.
fn expected_ipv6(exposer: Preset, forwarder: Preset) -> bool {
    matches!((exposer, forwarder), (Preset::HardV6, Preset::HardV6))
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The children's `RUST_LOG`: `P2PTUN_GRID_LOG`, default `info`.
fn log_level() -> String {
    common::log_level("P2PTUN_GRID_LOG", "info")
}

/// Runs `cmd` to its end (killed after `limit`); returns its stdout, or an error saying how it
/// failed (with its stderr).
fn run_capture(mut cmd: Command, limit: Duration) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {line}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status: Option<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    match status {
        None => bail!("{line} did not end within {limit:?}"),
        Some(st) if !st.success() => bail!("{line} failed ({st}): {}", stderr.trim()),
        Some(_) => Ok(stdout),
    }
}

/// Bytes received so far by interface `dev` of namespace `ns` (netlink, via `ip -s -j`).
fn rx_bytes(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-s", "-j", "link", "show", "dev", dev]);
    let out = run_capture(cmd, ONE_SHOT)?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("`ip -s -j link` printed {out:?}"))?;
    v.get(0)
        .and_then(|l| l.pointer("/stats64/rx/bytes"))
        .and_then(|b| b.as_u64())
        .ok_or_else(|| anyhow!("no stats64.rx.bytes for {dev} in {ns}: {out}"))
}

/// What the agents of `state_dir` report (one agent per state dir), as a JSON list.
fn status(state_dir: &Path) -> anyhow::Result<serde_json::Value> {
    common::agent_status_blocking(state_dir).map(serde_json::Value::Array)
}

/// The forwarder's path to its peer, as its status reports it.
#[derive(Clone, Debug)]
struct PathSeen {
    kind: Option<Kind>,
    /// QUIC's smoothed RTT to the peer (the peer's `rtt_ms`), milliseconds.
    quic_rtt_ms: Option<f64>,
    /// The peer's address on the path.
    remote: Option<std::net::SocketAddr>,
    /// The whole `path` object (or `null`), for messages.
    raw: String,
}

fn forward_path(state_dir: &Path) -> anyhow::Result<Option<PathSeen>> {
    let v = status(state_dir)?;
    let agents = v.as_array().cloned().unwrap_or_default();
    for agent in &agents {
        for peer in agent
            .get("peers")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            if peer.get("role").and_then(|r| r.as_str()) != Some("forward") {
                continue;
            }
            let path = peer.get("path").cloned().unwrap_or(serde_json::Value::Null);
            let kind = path
                .get("kind")
                .and_then(|k| k.as_str())
                .and_then(Kind::from_status);
            return Ok(Some(PathSeen {
                kind,
                quic_rtt_ms: peer.get("rtt_ms").and_then(|r| r.as_f64()),
                remote: path
                    .get("remote")
                    .and_then(|r| r.as_str())
                    .and_then(|r| r.parse().ok()),
                raw: path.to_string(),
            }));
        }
    }
    Ok(None)
}

/// Whether `e` is a refused TCP connect (nobody listening yet).
fn is_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// Log lines worth showing for a failed pair: problems, and what the agents said about
/// registration, introductions, punches and paths.
fn excerpt(p: &Proc, max: usize) -> String {
    const KEYS: [&str; 14] = [
        "connected to peer",
        "forward 'grid'",
        "found direct",
        "no direct",
        "relay",
        "over tcp",
        "introduced",
        "registered",
        "checking paths",
        "forwarder connected",
        "forwarder disconnected",
        "connection failed",
        "listening",
        "panicked",
    ];
    let log = p.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            let lower = l.to_lowercase();
            common::is_problem_line(l) || KEYS.iter().any(|k| lower.contains(k))
        })
        .collect();
    let skipped = lines.len().saturating_sub(max);
    let mut out = format!(
        "  --- {} ({}; {}) ---\n",
        p.label,
        match p.exit_status() {
            Some(st) => format!("exited: {st}"),
            None => "running".to_owned(),
        },
        p.log_path().display()
    );
    if skipped > 0 {
        let _ = writeln!(out, "  [{skipped} earlier matching lines left out]");
    }
    for l in &lines[skipped..] {
        let _ = writeln!(out, "  {l}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// One pair

#[derive(Clone, Copy, Debug)]
struct PairSpec {
    exposer: Preset,
    forwarder: Preset,
    shaping: Shaping,
    seed: u64,
    /// Everything the pair does must end within this.
    deadline: Duration,
}

/// What a pair that moved its data saw.
#[derive(Clone, Debug)]
struct Observed {
    /// Path before the transfer (after the punches settled) and after it.
    before: PathSeen,
    after: PathSeen,
    /// From starting the exposer to its status saying it is registered with S.
    registered: Duration,
    /// From starting the forwarder to the first echoed byte.
    ready: Duration,
    /// From the tunnel working to the punches being over (or [`SETTLE_MAX`]).
    settle: Duration,
    /// Bytes S's interface received during the transfer.
    s_rx: u64,
    /// The transfer's duration.
    transfer: Duration,
}

/// A pair's result.
struct PairResult {
    spec: PairSpec,
    expect: Expect,
    outcome: Result<Observed, (String, String)>,
    /// Why the pair fails the contract (empty: it passes).
    problems: Vec<String>,
    /// Log lines for the report, if it failed.
    logs: String,
    /// The kept temp dir, if it failed.
    kept: Option<PathBuf>,
    elapsed: Duration,
}

impl PairResult {
    fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    /// The grid cell.
    fn cell(&self) -> String {
        let Expect::Path(want) = self.expect else {
            return "n/a".into();
        };
        match &self.outcome {
            Ok(o) if self.passed() => format!("{} {}ms", want.label(), o.ready.as_millis()),
            Ok(o) => {
                let got = o.after.kind.map_or("no path", Kind::label);
                if o.after.kind == Some(want) {
                    // The kind is right but another check is not.
                    format!("FAIL(expected {}, got {got}, see below)", want.label())
                } else {
                    format!("FAIL(expected {}, got {got})", want.label())
                }
            }
            Err((short, _)) => format!("FAIL(expected {}, got {short})", want.label()),
        }
    }
}

/// Everything a pair started, dropped in this order: the tunnel (processes, then the
/// service), the runtime, the lab.
#[derive(Default)]
struct PairRun {
    tunnel: Option<Tunnel<Service>>,
    rt: Option<tokio::runtime::Runtime>,
    lab: Option<Lab>,
    /// What is being done, for a short failure reason.
    stage: &'static str,
}

impl PairRun {
    fn procs(&self) -> Vec<&Proc> {
        match &self.tunnel {
            Some(t) => vec![t.forwarder.proc(), t.exposer.proc(), t.relay().proc()],
            None => Vec::new(),
        }
    }
}

fn run_pair(spec: PairSpec) -> PairResult {
    let started = Instant::now();
    let expect = expected(spec.exposer, spec.forwarder);
    let files = common::Lab::new(&format!(
        "grid-{}-{}",
        spec.exposer.name(),
        spec.forwarder.name()
    ));
    let mut run = PairRun {
        stage: "setup error",
        ..PairRun::default()
    };
    let body = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pair_body(spec, &files, &mut run)
    }));
    let outcome = match body {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => Err((run.stage.to_owned(), format!("{e:#}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "(no message)".into());
            Err(("panic".to_owned(), format!("panicked: {msg}")))
        }
    };
    if let Some(secs) = std::env::var("P2PTUN_GRID_HOLD")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        // A debugging aid: keep the pair's namespaces and processes for a look from a shell.
        let secs = secs.min(600);
        if let Some(lab) = &run.lab {
            say(&format!(
                "grid: holding {} × {} for {secs} s; namespaces: {}; files: {}\n",
                spec.exposer.name(),
                spec.forwarder.name(),
                lab.namespaces().join(" "),
                files.path().display()
            ));
        }
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut result = PairResult {
        spec,
        expect,
        problems: judge(
            expect,
            expected_ipv6(spec.exposer, spec.forwarder),
            &outcome,
        ),
        outcome,
        logs: String::new(),
        kept: None,
        elapsed: started.elapsed(),
    };
    if !result.passed() {
        let mut logs = String::new();
        for (p, max) in run.procs().into_iter().zip([40, 25, 15]) {
            logs.push_str(&excerpt(p, max));
        }
        result.logs = logs;
    }
    // The tunnel first (processes, then the service), the runtime, the lab.
    drop(run.tunnel.take());
    if let Some(rt) = run.rt.take() {
        rt.shutdown_timeout(Duration::from_secs(2));
    }
    drop(run.lab.take());
    if !result.passed() || std::env::var_os("P2PTUN_GRID_KEEP").is_some() {
        result.kept = Some(files.keep());
    }
    result
}

/// The contract's verdict on one outcome (`ipv6`: the family a direct path must use).
fn judge(expect: Expect, ipv6: bool, outcome: &Result<Observed, (String, String)>) -> Vec<String> {
    let Expect::Path(want) = expect else {
        return Vec::new();
    };
    let o = match outcome {
        Ok(o) => o,
        Err((_, why)) => return vec![why.clone()],
    };
    let mut problems = Vec::new();
    match o.after.kind {
        Some(k) if k == want => {}
        Some(k) => problems.push(format!(
            "expected {}, got {} (status path: {})",
            want.label(),
            k.label(),
            o.after.raw
        )),
        None => problems.push(format!(
            "expected {}, but the forwarder's status shows no path ({})",
            want.label(),
            o.after.raw
        )),
    }
    if let (Some(Kind::Udp | Kind::Tcp), Some(remote)) = (o.after.kind, o.after.remote) {
        if remote.is_ipv6() != ipv6 {
            problems.push(format!(
                "expected a direct path over {}, got one to {remote}",
                if ipv6 { "IPv6" } else { "IPv4" }
            ));
        }
    }
    if o.before.kind != o.after.kind {
        problems.push(format!(
            "the path changed during the transfer: {} before, {} after",
            o.before.raw, o.after.raw
        ));
    }
    match o.after.kind {
        Some(Kind::Udp | Kind::Tcp) if o.s_rx >= DIRECT_MAX_S_RX => problems.push(format!(
            "status says a direct path, but S's interface received {:.2} MiB during the transfer \
             (a direct path leaves it under {:.0} MiB)",
            mib(o.s_rx),
            mib(DIRECT_MAX_S_RX)
        )),
        Some(Kind::Relay) if o.s_rx <= RELAY_MIN_S_RX => problems.push(format!(
            "status says relay, but S's interface received only {:.2} MiB during the transfer \
             (relaying 8 MiB each way passes over {:.0} MiB through it)",
            mib(o.s_rx),
            mib(RELAY_MIN_S_RX)
        )),
        _ => {}
    }
    problems
}

fn pair_body(spec: PairSpec, files: &common::Lab, run: &mut PairRun) -> anyhow::Result<Observed> {
    let deadline = Instant::now() + spec.deadline;

    // The lab and the two hosts.
    let lab = run.lab.insert(Lab::new().context("creating the lab")?);
    let (a, b): (Host, Host) = match (spec.exposer, spec.forwarder) {
        (Preset::SameLan, Preset::SameLan) => lab.add_same_lan_pair(Nat::Easy, spec.shaping)?,
        (Preset::Hairpin, Preset::Hairpin) => {
            lab.add_same_nat_pair(Nat::Easy, true, spec.shaping)?
        }
        (Preset::NoHairpin, Preset::NoHairpin) => {
            lab.add_same_nat_pair(Nat::Easy, false, spec.shaping)?
        }
        (Preset::SameLan | Preset::Hairpin | Preset::NoHairpin, _)
        | (_, Preset::SameLan | Preset::Hairpin | Preset::NoHairpin) => {
            bail!("same-lan, hairpin and no-hairpin pair only with themselves")
        }
        (e, f) => (
            e.add_host(lab, spec.shaping)
                .with_context(|| format!("adding the {} host", e.name()))?,
            f.add_host(lab, spec.shaping)
                .with_context(|| format!("adding the {} host", f.name()))?,
        ),
    };
    let s_ns = lab.s_ns().to_owned();

    // The service in A's namespace, served by this pair's runtime.
    run.stage = "setup error";
    let rt = &*run.rt.insert(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    let service = a.run_in(|| rt.block_on(Service::start()));

    // S, the exposer (registered), then the forwarder.
    let kit = Kit::new(files, "grid")
        .relay_opts(RelayOpts {
            log: Some(log_level()),
            ..RelayOpts::lab_defaults(lab)
        })
        .on_hosts(&a, &b)
        .servers(spec.exposer.server(), spec.forwarder.server())
        .forward_ports(FWD_PORT)
        .agent_log(&log_level())
        .ready(Ready::Started);
    let t = match rt.block_on(kit.try_start(vec![service])) {
        Ok(t) => &*run.tunnel.insert(t),
        Err(e) => {
            run.stage = match e.downcast_ref::<Step>() {
                Some(Step::Relay) => "no S",
                Some(Step::Exposer) => "no registration",
                _ => "setup error",
            };
            return Err(e);
        }
    };

    // The first echo through the forwarder.
    run.stage = "no tunnel";
    let t0 = t.forwarder_started;
    let ready = b.run_in(|| {
        rt.block_on(async {
            let until = deadline.min(Instant::now() + READY);
            for attempt in 1u32.. {
                t.ensure_running()?;
                let left = until.saturating_duration_since(Instant::now());
                let wait = PROBE.min(left).max(Duration::from_millis(500));
                let (last, refused) = match echo_once(FWD_PORT, wait).await {
                    Ok(()) => return Ok(t0.elapsed()),
                    Err(e) => (format!("{e:#}"), is_refused(&e)),
                };
                if Instant::now() >= until {
                    bail!(
                        "no echo through the forward within {:.1} s ({attempt} attempts); \
                         last error: {last}",
                        READY.as_secs_f64()
                    );
                }
                // Until the forwarder listens, knock often, so that the ready time measures
                // the agent and not this loop; after other errors, give it a moment.
                let pause = if refused { 10 } else { 300 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            unreachable!("the loop only ends by returning")
        })
    })?;

    // Let the punches end: a direct UDP path cannot get better; otherwise wait for both
    // punch outcomes in the forwarder's log (one if it has no TCP port), or SETTLE_MAX.
    run.stage = "no path in status";
    let settle_start = Instant::now();
    let settle_until = deadline.min(settle_start + SETTLE_MAX);
    let forwarder_dir = &t.forward_agent.state_dir;
    let before = loop {
        t.ensure_running()?;
        let seen = forward_path(forwarder_dir)?;
        let log = t.forwarder.proc().log();
        let outcomes = log.matches("forward 'grid': ").count();
        let no_tcp = log.contains("no TCP punching port");
        let done = match &seen {
            Some(p) if p.kind == Some(Kind::Udp) => true,
            _ => outcomes >= 2 || (no_tcp && outcomes >= 1),
        };
        if done || Instant::now() >= settle_until {
            break seen.ok_or_else(|| anyhow!("the forwarder's status lists no peer"))?;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let settle = settle_start.elapsed();

    // The transfer, counting what S receives meanwhile.
    run.stage = "transfer error";
    let (seed_up, seed_down) = (spec.seed * 2 + 1, spec.seed * 2 + 2);
    let rx0 = rx_bytes(&s_ns, "eth0")?;
    let moving = Instant::now();
    let moved = b.run_in(|| {
        rt.block_on(async {
            tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                transfer_via(FWD_PORT, Mode::Duplex, (seed_up, LEN), (seed_down, LEN)),
            )
            .await
        })
    });
    let transfer = moving.elapsed();
    let rx1 = rx_bytes(&s_ns, "eth0")?;
    match moved {
        Err(_) => bail!(
            "the transfer did not end within the pair's deadline ({:.1} s in)",
            transfer.as_secs_f64()
        ),
        Ok(Err(e)) => bail!(
            "the transfer failed after {:.1} s: {e:#}",
            transfer.as_secs_f64()
        ),
        Ok(Ok(_)) => {}
    }
    // The service's own record of what it received, against the client's seeded stream.
    let received = *t
        .service()
        .progress(seed_down)
        .received_digest
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let want = data_digest(seed_up, LEN);
    ensure!(
        received == Some(want),
        "the service recorded SHA-256 {} of what it received, the client sent {}",
        received
            .map(|d| hex(&d))
            .unwrap_or_else(|| "(nothing)".into()),
        hex(&want)
    );

    run.stage = "no path in status";
    t.ensure_running()?;
    let after = forward_path(forwarder_dir)?
        .ok_or_else(|| anyhow!("after the transfer, the forwarder's status lists no peer"))?;
    Ok(Observed {
        before,
        after,
        registered: t.exposer_registered_in,
        ready,
        settle,
        s_rx: rx1.saturating_sub(rx0),
        transfer,
    })
}

// ---------------------------------------------------------------------------------------------
// Reporting

/// Writes straight to stderr, past the test harness's capture, so the grid shows also when
/// the test passes.
fn say(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

fn detail(r: &PairResult) -> String {
    let pair = format!("{} × {}", r.spec.exposer.name(), r.spec.forwarder.name());
    let want = match r.expect {
        Expect::Path(k) => k.label(),
        Expect::NotApplicable => "n/a",
    };
    let verdict = if r.passed() { "ok  " } else { "FAIL" };
    let line = match &r.outcome {
        Ok(o) => format!(
            "{verdict} {pair:<30} expected {want:<5} got {:<8} exposer registered in {:>4} ms, \
             ready {:>5} ms, settled after {:>4.1} s, 2×8 MiB in {:>6.2} s, S rx {:>6.2} MiB, \
             QUIC rtt {:>6.1} ms, path {} ({:.0} s total)\n",
            o.after.kind.map_or("no path", Kind::label),
            o.registered.as_millis(),
            o.ready.as_millis(),
            o.settle.as_secs_f64(),
            o.transfer.as_secs_f64(),
            mib(o.s_rx),
            o.after.quic_rtt_ms.unwrap_or(f64::NAN),
            o.after.raw,
            r.elapsed.as_secs_f64()
        ),
        Err((short, why)) => format!(
            "{verdict} {pair:<30} expected {want:<5} got {short}: {why} ({:.0} s total)\n",
            r.elapsed.as_secs_f64()
        ),
    };
    match &r.kept {
        Some(dir) => format!("{}  files: {}\n", line.trim_end(), dir.display()),
        None => line,
    }
}

/// The grid: rows are exposer presets, columns forwarder presets.
fn table(results: &[PairResult]) -> String {
    let cell = |e: Preset, f: Preset| -> String {
        results
            .iter()
            .find(|r| r.spec.exposer == e && r.spec.forwarder == f)
            .map(|r| r.cell())
            .unwrap_or_else(|| match expected(e, f) {
                Expect::NotApplicable => "n/a".into(),
                Expect::Path(_) => "-".into(),
            })
    };
    let corner = "exposer \\ forwarder";
    let mut widths = vec![corner.len()];
    for e in Preset::ALL {
        widths[0] = widths[0].max(e.name().len());
    }
    for f in Preset::ALL {
        let w = Preset::ALL
            .iter()
            .map(|&e| cell(e, f).len())
            .chain([f.name().len()])
            .max()
            .unwrap_or(0);
        widths.push(w);
    }
    let mut out = String::new();
    let _ = write!(out, "{corner:<w$}", w = widths[0]);
    for (i, f) in Preset::ALL.iter().enumerate() {
        let _ = write!(out, " | {:<w$}", f.name(), w = widths[i + 1]);
    }
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for e in Preset::ALL {
        let _ = write!(out, "{:<w$}", e.name(), w = widths[0]);
        for (i, f) in Preset::ALL.iter().enumerate() {
            let _ = write!(out, " | {:<w$}", cell(e, *f), w = widths[i + 1]);
        }
        out.push('\n');
    }
    out
}

/// The pairs to run: all, or those `P2PTUN_GRID_ONLY` names (`exposer/forwarder,...`).
/// `all`, or those of them `P2PTUN_GRID_ONLY` names.
fn selected_pairs(all: Vec<(Preset, Preset)>) -> Vec<(Preset, Preset)> {
    let Ok(only) = std::env::var("P2PTUN_GRID_ONLY") else {
        return all;
    };
    let wanted: Vec<(Preset, Preset)> = only
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (e, f) = s
                .split_once('/')
                .unwrap_or_else(|| panic!("P2PTUN_GRID_ONLY: {s:?} is not exposer/forwarder"));
            let p = |n: &str| {
                Preset::from_name(n)
                    .unwrap_or_else(|| panic!("P2PTUN_GRID_ONLY: no preset called {n:?}"))
            };
            (p(e), p(f))
        })
        .collect();
    all.into_iter().filter(|p| wanted.contains(p)).collect()
}

/// The shaping of every WAN link in the grid: none, or `P2PTUN_GRID_SHAPING=DELAY_MS/LOSS_PCT`.
fn grid_shaping() -> Shaping {
    let Ok(spec) = std::env::var("P2PTUN_GRID_SHAPING") else {
        return Shaping::none();
    };
    let parsed = spec.split_once('/').and_then(|(d, l)| {
        Some(Shaping {
            delay_ms: d.trim().parse().ok()?,
            loss_pct: l.trim().parse().ok()?,
        })
    });
    parsed.unwrap_or_else(|| panic!("P2PTUN_GRID_SHAPING={spec:?} is not DELAY_MS/LOSS_PCT"))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Every pair of presets: expose, forward, 8 MiB each way, and the path kind [`expected`].
#[test]
fn grid() {
    if !natlab::require_root() {
        return;
    }
    let all = Preset::ALL
        .into_iter()
        .flat_map(|e| Preset::ALL.into_iter().map(move |f| (e, f)))
        .filter(|&(e, f)| expected(e, f) != Expect::NotApplicable)
        .collect();
    run_pairs("grid", selected_pairs(all), true);
}

/// The networks users are on beyond the grid's presets ([`NETWORKS`]): IPv6 behind home
/// routers, IPv6 dropped, an IPv6-only host, a counting NAT, routers without an input
/// firewall; with the same checks as the grid.
#[test]
fn networks() {
    if !natlab::require_root() {
        return;
    }
    run_pairs("networks", selected_pairs(NETWORKS.to_vec()), false);
}

/// Runs `pairs` a few at a time, prints the results (as the grid's table if `as_table`),
/// and fails listing every pair whose outcome differs from the contract.
fn run_pairs(what: &str, pairs: Vec<(Preset, Preset)>, as_table: bool) {
    if pairs.is_empty() {
        say(&format!("{what}: no pair selected (P2PTUN_GRID_ONLY)\n"));
        return;
    }
    let started = Instant::now();
    // Build (or find) S's binary once, before the pairs race for it.
    let _ = common::relay_bin();
    let shaping = grid_shaping();
    let deadline = if shaping.is_none() {
        PAIR_DEADLINE
    } else {
        SHAPED_DEADLINE
    };
    let jobs = std::env::var("P2PTUN_GRID_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .filter(|&j| j > 0)
        .unwrap_or(JOBS);
    say(&format!(
        "{what}: {} pairs, {jobs} at a time, 2×{} MiB each, WAN links {shaping:?}\n",
        pairs.len(),
        LEN >> 20
    ));
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(pairs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(exposer, forwarder)) = pairs.get(i) else {
                    return;
                };
                let r = run_pair(PairSpec {
                    exposer,
                    forwarder,
                    shaping,
                    seed: 1000 + i as u64,
                    deadline,
                });
                say(&format!(
                    "{what}: [{:>2}/{}] {}",
                    i + 1,
                    pairs.len(),
                    detail(&r)
                ));
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let order = |p: Preset| Preset::ALL.iter().position(|&q| q == p);
    results.sort_by_key(|r| (order(r.spec.exposer), order(r.spec.forwarder)));

    let failed: Vec<&PairResult> = results.iter().filter(|r| !r.passed()).collect();
    let table = if as_table {
        format!(
            "\n{what}: exposer presets down, forwarder presets across; cells: path kind and ms \
             from starting the forwarder to the first echoed byte\n\n{}",
            table(&results)
        )
    } else {
        String::new()
    };
    let mut report = format!(
        "{table}\n{what}: {} of {} pairs as expected, {} not; {:.0} s in all\n",
        results.len() - failed.len(),
        results.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    report.push_str(&format!("\n{what}: every pair\n"));
    for r in &results {
        report.push_str(&detail(r));
    }
    for r in &failed {
        let _ = writeln!(
            report,
            "\n===== FAILED: {} × {} (files kept in {}) =====",
            r.spec.exposer.name(),
            r.spec.forwarder.name(),
            r.kept
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        for p in &r.problems {
            let _ = writeln!(report, "  - {p}");
        }
        report.push_str(&r.logs);
    }
    say(&report);
    let list: Vec<String> = failed
        .iter()
        .map(|r| {
            format!(
                "{} × {}: {}",
                r.spec.exposer.name(),
                r.spec.forwarder.name(),
                r.problems.join("; ")
            )
        })
        .collect();
    assert!(
        list.is_empty(),
        "{} of {} pairs differ from the contract (grid and logs above):\n{}",
        list.len(),
        results.len(),
        list.join("\n")
    );
}

/// easy × easy again, with 50 ms delay and 2 % loss each way on both WAN links: still direct
/// UDP, still every byte.
#[test]
fn easy_pair_over_delayed_lossy_links() {
    if !natlab::require_root() {
        return;
    }
    let _ = common::relay_bin();
    let r = run_pair(PairSpec {
        exposer: Preset::Easy,
        forwarder: Preset::Easy,
        shaping: Shaping {
            delay_ms: 50,
            loss_pct: 2.0,
        },
        seed: 7,
        deadline: SHAPED_DEADLINE,
    });
    let mut report = format!("shaped easy × easy: {}", detail(&r));
    if !r.passed() {
        for p in &r.problems {
            let _ = writeln!(report, "  - {p}");
        }
        report.push_str(&r.logs);
        if let Some(k) = &r.kept {
            let _ = writeln!(report, "  files kept in {}", k.display());
        }
    }
    say(&report);
    assert!(
        r.passed(),
        "easy × easy over 50 ms / 2 % loss links: {}",
        r.problems.join("; ")
    );
}
