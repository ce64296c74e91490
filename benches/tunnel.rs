//! The p2ptun benchmark: the release build measured against raw TCP over the same link, in
//! the same run.
//!
//! ```text
//! cargo bench --bench tunnel               # the table on stdout
//! cargo bench --bench tunnel -- --json     # JSON on stdout, the table on stderr
//! scripts/bench.sh [--json] [--quick] [--loopback] [--keep] [--scale 1000,10000] [--only direct,scale,relay]
//! ```
//!
//! # Topology
//!
//! As root, the NAT lab of `testkit/src/natlab/` (network namespaces, kernel NATs by nftables):
//! S (`p2ptun-relay`) in its own namespace on 203.0.113.1/.2, the exposing agent and the
//! service behind one `easy` NAT (masquerade, 10.1.0.0/24), the forwarding agent and the
//! clients behind another (10.2.0.0/24); no shaping. The raw-TCP comparison runs the same
//! client and service code over the same namespaces, routers and veths: the client in the
//! forwarder's namespace connects to a port forward (DNAT) on the exposer's router, so its
//! packets cross both NATs as the tunnel's UDP does. The clients run in this process (a tokio
//! runtime whose one worker sits in the forwarder's namespace); the service is this binary
//! started again as `tunnel --service BIND FILE` in the exposer's namespace, so its sockets
//! count against its own RLIMIT_NOFILE. Each agent pair gets a fresh state directory and name.
//!
//! Without root (or `ip netns`/`nft`), or with `--loopback`, everything runs on 127.0.0.1
//! in the current namespace instead, the relay-path figures are skipped, and the output says
//! so at the top.
//!
//! # What it measures
//!
//! - throughput through one forwarded connection each way and through 8 parallel ones, the
//!   same with raw TCP, and the ratio; CPU seconds per GiB of each agent (utime+stime from
//!   /proc/PID/stat). Each figure is the median of three rounds (one with `--quick`), tunnel
//!   and raw TCP taking turns so that a passing load on the machine hits both; a round sends
//!   for 1.5 s (1 s with `--quick`), at most 8 GiB. Raw TCP moves a few GiB/s here, so a
//!   round bounded by size alone would last a tenth of a second and measure mostly noise;
//! - 1-byte ping-pong latency (5,000 round trips each), p50/p99, tunnel and raw taking turns
//!   in blocks of 100 so that the machine's passing states touch both alike;
//! - setup: from spawning `p2ptun forward` to the first byte echoed back, and to the
//!   forwarder reporting `path.kind == "direct_udp"` (its status socket, the JSON that
//!   `p2ptun status --json` prints, polled every 20 ms);
//! - scale: 1,000 and 10,000 concurrent idle forwarded connections, each checked with a
//!   1-byte echo; VmRSS of both agents and S before, with them open, after closing; memory
//!   per connection; each level on a fresh pair of agents, then a second round of as many on
//!   the same agents (memory the first round freed is reused: a leak shows as growth again,
//!   and so does a per-connection buffer that the first round got lazily zeroed from the OS);
//! - the relay path: UDP and TCP between the two routers' public addresses dropped (an nft
//!   table on the exposer's router), so only paths through S work; throughput and S's CPU
//!   seconds per GiB relayed, once with S's default relay caps and once through a second S
//!   (same namespace, port 7100) whose caps are raised out of the way.
//!
//! Finally every process's log is scanned for WARN/ERROR lines and panics (the expected ones,
//! "no token" and trusting S's key on first use, left out); with any, or with `--keep`, the
//! logs are kept and their directory printed.
//!
//! # Rules it keeps
//!
//! Traffic goes only to 127.0.0.1 or to addresses inside the namespaces it creates; they are
//! removed on exit, on panic (the lab's `Drop`) and on SIGINT/SIGTERM/SIGHUP (a signal
//! thread). Every loop is bounded in count and time. RLIMIT_NOFILE is raised for this
//! process (to 65,536, or to the hard limit without CAP_SYS_RESOURCE); the agents inherit
//! it. A scale level that needs more descriptors than that is skipped and says so.

use p2ptun_testkit as common;

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use common::{natlab, Kit, Place, Proc, Ready, Relay, RelayOpts, UpExpose, UpForward};

#[path = "common/host.rs"]
mod host;
#[path = "tunnel/iperf.rs"]
mod iperf;

use host::{is_our_child, loadavg, raise_nofile};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// The second S (relay caps raised), in the same namespace.
const LAB_S2_LISTEN: &str = "203.0.113.1:7100";
const LAB_S2_ALT: &str = "203.0.113.2:7101";
/// Where each S serves its metrics, on the loopback of S's namespace.
const LAB_S_METRICS: &str = "127.0.0.1:9101";
const LAB_S2_METRICS: &str = "127.0.0.1:9102";
/// The service's port in the exposer's namespace (also the raw-TCP port forward).
const LAB_SERVICE_PORT: u16 = 5201;
/// The iperf3 server's port in the exposer's namespace, port-forwarded (TCP and UDP) on its
/// router for the raw UDP rows.
const LAB_IPERF_PORT: u16 = 5202;
/// The first forward port in the forwarder's namespace.
const LAB_FIRST_FORWARD_PORT: u16 = 4001;

/// How long S may take to listen, an agent to register, a pair to echo a first byte.
const START_WAIT: Duration = Duration::from_secs(20);
const SETUP_WAIT: Duration = Duration::from_secs(30);
/// The status poll interval for "time until direct".
const STATUS_POLL: Duration = Duration::from_millis(20);
/// How many connections the scale test opens at a time.
const OPEN_CONCURRENCY: usize = 256;
/// RLIMIT_NOFILE asked for (the bench holds both ends of every idle connection).
const WANT_NOFILE: u64 = 65_536;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    json: bool,
    quick: bool,
    loopback: bool,
    keep: bool,
    scale: Vec<usize>,
    /// Which parts run (`--only`): the first pair (setup, latency, throughput), the scale
    /// levels, the relay path. All of them by default.
    direct: bool,
    do_scale: bool,
    relay: bool,
    udp: bool,
}

impl Opts {
    fn parse() -> Result<Opts> {
        let mut o = Opts {
            json: false,
            quick: false,
            loopback: false,
            keep: false,
            scale: Vec::new(),
            direct: true,
            do_scale: true,
            relay: true,
            udp: true,
        };
        let mut scale = None;
        let mut only = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                // `cargo bench` passes --bench to every bench target.
                "--bench" => {}
                "--json" => o.json = true,
                "--quick" => o.quick = true,
                "--loopback" => o.loopback = true,
                "--keep" => o.keep = true,
                "--scale" => scale = Some(args.next().context("--scale needs a list")?),
                s if s.starts_with("--scale=") => scale = Some(s["--scale=".len()..].to_owned()),
                "--only" => only = Some(args.next().context("--only needs a list")?),
                s if s.starts_with("--only=") => only = Some(s["--only=".len()..].to_owned()),
                "-h" | "--help" => {
                    println!(
                        "usage: cargo bench --bench tunnel -- [--json] [--quick] [--loopback] \
                         [--keep] [--scale N,N] [--only PARTS]\n  --json      JSON on stdout, table on stderr\n  \
                         --quick     smaller figures (64 MiB/2 s, 1,000 pings, scale 1,000)\n  \
                         --loopback  127.0.0.1 only, no namespaces\n  --keep      keep the \
                         temp dir with the processes' logs\n  --scale     idle connection \
                         counts (default 1000,10000)\n  --only      \
                         the parts to run, of direct,scale,relay,udp (default all)"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        o.scale = match scale {
            Some(list) => list
                .split(',')
                .map(|n| n.trim().replace('_', "").parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .context("--scale takes numbers separated by commas")?,
            None if o.quick => vec![1000],
            None => vec![1000, 10_000],
        };
        if let Some(list) = only {
            (o.direct, o.do_scale, o.relay, o.udp) = (false, false, false, false);
            for part in list.split(',').map(str::trim) {
                match part {
                    "direct" => o.direct = true,
                    "scale" => o.do_scale = true,
                    "relay" => o.relay = true,
                    "udp" => o.udp = true,
                    other => bail!("--only: unknown part {other:?} (direct, scale, relay, udp)"),
                }
            }
        }
        Ok(o)
    }
}

/// The bounds of the measurements.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    bulk_bytes: u64,
    bulk_time: Duration,
    /// Rounds per throughput figure (its median).
    rounds: usize,
    parallel: usize,
    pings: usize,
    warmup_pings: usize,
    /// Pairs started only for a setup sample.
    setup_only: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                bulk_bytes: 8 << 30,
                bulk_time: Duration::from_secs(1),
                rounds: 1,
                parallel: 8,
                pings: 1000,
                warmup_pings: 100,
                setup_only: 0,
            }
        } else {
            Sizes {
                bulk_bytes: 8 << 30,
                bulk_time: Duration::from_millis(1500),
                rounds: 3,
                parallel: 8,
                pings: 5000,
                warmup_pings: 200,
                setup_only: 2,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup on signals

#[derive(Default)]
struct Registry {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    /// The run's temp dir (state dirs and logs).
    files: Option<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    namespaces: Vec::new(),
    files: None,
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT, SIGTERM or SIGHUP: kill the children and everything in the lab's namespaces,
/// delete the namespaces, exit 130.
fn install_signal_cleanup() -> Result<()> {
    host::on_interrupt("bench-signals", || {
        let reg = registry();
        for &pid in reg.pids.iter().filter(|&&pid| is_our_child(pid)) {
            // SAFETY: kill(2) of a child this process started and has not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        natlab::netns::kill_all_in_any(&reg.namespaces);
        std::thread::sleep(Duration::from_millis(50));
        for ns in reg.namespaces.iter().rev() {
            if natlab::netns::exists(ns) {
                let _ = natlab::netns::del(ns);
            }
        }
        if let Some(dir) = &reg.files {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("bench: interrupted; processes killed, namespaces and temp dir removed");
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The children's `RUST_LOG`: the bench's own, else `info`.
fn log_level() -> String {
    common::log_level("RUST_LOG", "info")
}

/// Records a child (every [`Proc`] the bench or the kit starts, through
/// [`common::on_spawn`]) for the signal cleanup.
fn register(pid: u32) {
    let mut reg = registry();
    // Processes dropped since are reaped; forget them.
    reg.pids.retain(|&pid| is_our_child(pid));
    reg.pids.push(pid);
}

// ---------------------------------------------------------------------------------------------
// Where things run

/// Runs `fut` on a worker of `rt` (inside its namespace) and waits for it.
fn on<T: Send + 'static>(rt: &Runtime, fut: impl Future<Output = T> + Send + 'static) -> T {
    let handle = rt.spawn(fut);
    wait_task(rt, handle)
}

fn wait_task<T: Send + 'static>(rt: &Runtime, handle: tokio::task::JoinHandle<T>) -> T {
    match rt.block_on(handle) {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("benchmark task failed: {e}"),
    }
}

/// The network the benchmark runs on.
struct Net {
    /// The lab (lab mode); dropping it removes every namespace.
    lab: Option<natlab::Lab>,
    s: Place,
    /// The exposer and the service.
    a: Place,
    /// The forwarder and the clients.
    b: Place,
    /// S's two addresses (lab mode; on loopback it takes free ports).
    s_addrs: Option<(SocketAddr, SocketAddr)>,
    /// Where the service listens (inside `a`).
    service_bind: SocketAddr,
    /// The exposer's router: namespace and public address; the forwarder's router's public
    /// address (lab mode).
    router_a: Option<(String, Ipv4Addr)>,
    router_b_public: Option<Ipv4Addr>,
    description: String,
}

fn lab_usable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    for (prog, args) in [("ip", &["netns", "list"][..]), ("nft", &["--version"][..])] {
        match Command::new(prog).args(args).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "{prog} {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Err(format!("{prog}: {e}")),
        }
    }
    Ok(())
}

impl Net {
    fn lab() -> Result<Net> {
        use natlab::{Lab, Nat, Shaping};
        let lab = Lab::new()?;
        registry().namespaces = lab.namespaces();
        let a = lab.add_host(Nat::Easy, Shaping::none())?;
        let b = lab.add_host(Nat::Easy, Shaping::none())?;
        registry().namespaces = lab.namespaces();
        let ra = lab.router_of(&a).context("the exposer has a router")?;
        let rb = lab.router_of(&b).context("the forwarder has a router")?;
        // The raw-TCP path: a port forward on the exposer's router to the service, so raw
        // TCP from the forwarder's host crosses both NATs like the tunnel's packets.
        natlab::netns::nft(
            ra.ns(),
            &format!(
                "add rule ip lab prerouting iifname \"wan\" tcp dport {p} dnat to {ip}:{p}\n\
                 insert rule ip lab forward iifname \"wan\" ip daddr {ip} tcp dport {p} ct status dnat accept\n\
                 add rule ip lab prerouting iifname \"wan\" meta l4proto {{ tcp, udp }} th dport {i} dnat to {ip}:{i}\n\
                 insert rule ip lab forward iifname \"wan\" ip daddr {ip} meta l4proto {{ tcp, udp }} th dport {i} ct status dnat accept\n",
                p = LAB_SERVICE_PORT,
                i = LAB_IPERF_PORT,
                ip = a.ip()
            ),
        )?;
        let description = format!(
            "NAT lab (network namespaces): S {} in its own namespace; exposer {} behind an \
             `easy` NAT (public {}); forwarder {} behind an `easy` NAT (public {}); direct \
             path, no shaping. Raw TCP: the forwarder's host to a port forward on the \
             exposer's router ({}:{}).",
            natlab::S_LISTEN,
            a.ip(),
            ra.public_ip(),
            b.ip(),
            rb.public_ip(),
            ra.public_ip(),
            LAB_SERVICE_PORT
        );
        Ok(Net {
            s: Place::netns(lab.s_ns()),
            a: Place::from(&a),
            b: Place::from(&b),
            s_addrs: Some((natlab::S_LISTEN.parse()?, natlab::S_ALT.parse()?)),
            service_bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, LAB_SERVICE_PORT)),
            router_a: Some((ra.ns().to_owned(), ra.public_ip())),
            router_b_public: Some(rb.public_ip()),
            description,
            lab: Some(lab),
        })
    }

    fn loopback(reason: &str) -> Result<Net> {
        Ok(Net {
            lab: None,
            s: Place::here(),
            a: Place::here(),
            b: Place::here(),
            s_addrs: None,
            service_bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            router_a: None,
            router_b_public: None,
            description: format!(
                "LOOPBACK FALLBACK ({reason}): S, agents, service and clients all on 127.0.0.1 \
                 in one namespace, no NAT; the relay path is not measured"
            ),
        })
    }

    fn is_lab(&self) -> bool {
        self.lab.is_some()
    }

    /// Drops UDP and TCP between the two routers' public addresses (on the exposer's router).
    fn block_direct(&self) -> Result<()> {
        let (Some((ns, _)), Some(other)) = (self.router_a.as_ref(), self.router_b_public) else {
            bail!("blocking needs the namespace lab");
        };
        natlab::netns::nft(
            ns,
            &format!(
                "table ip benchblock {{\n  chain forward {{ type filter hook forward priority filter - 20; policy accept;\n    \
                 ip saddr {other} meta l4proto {{ udp, tcp }} drop\n    ip daddr {other} meta l4proto {{ udp, tcp }} drop\n  }}\n}}\n"
            ),
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The service and the clients (the same code for the tunnel and for raw TCP)

/// Modes, the first byte a client sends.
const MODE_ECHO: u8 = b'E';
const MODE_UPLOAD: u8 = b'U';
const MODE_DOWNLOAD: u8 = b'D';

/// 128 KiB of non-trivial bytes to send.
fn pattern() -> Arc<Vec<u8>> {
    Arc::new(
        (0..128 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    )
}

#[derive(Debug, Default)]
struct ServiceStats {
    accepted: AtomicU64,
    errors: AtomicU64,
}

/// Echo: echoes until EOF. Upload: reads to EOF, answers the byte count (u64 BE). Download:
/// reads (bytes u64, millis u64), sends until either is reached, then closes. The first 20
/// connection errors go to stderr.
async fn serve(listener: TcpListener, stats: Arc<ServiceStats>) {
    let data = pattern();
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        let data = data.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(s, &data).await {
                if stats.errors.fetch_add(1, Ordering::Relaxed) < 20 {
                    eprintln!("bench-service: ERROR connection: {e}");
                }
            }
        });
    }
}

/// `tunnel --service BIND FILE`: the service as its own process (so its sockets count
/// against its own RLIMIT_NOFILE, not the clients'). Writes its address to FILE, then
/// `accepted errors` to FILE.stats every 200 ms; runs until killed.
fn service_main(bind: &str, file: &Path) -> Result<()> {
    let bind: SocketAddr = bind.parse()?;
    raise_nofile(WANT_NOFILE);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = TcpListener::bind(bind).await?;
        let addr = l.local_addr()?;
        let stats = Arc::new(ServiceStats::default());
        tokio::spawn(serve(l, stats.clone()));
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, file)?;
        let stats_file = file.with_extension("stats");
        loop {
            let text = format!(
                "{} {}\n",
                stats.accepted.load(Ordering::Relaxed),
                stats.errors.load(Ordering::Relaxed)
            );
            let _ = std::fs::write(&stats_file, text);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

async fn handle(mut s: TcpStream, data: &[u8]) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    match mode[0] {
        MODE_ECHO => {
            let mut buf = [0u8; 512];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return s.shutdown().await;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        MODE_UPLOAD => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        MODE_DOWNLOAD => {
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).await?;
            let bytes = u64::from_be_bytes(hdr[..8].try_into().expect("8 bytes"));
            let millis = u64::from_be_bytes(hdr[8..].try_into().expect("8 bytes"));
            let start = Instant::now();
            let limit = Duration::from_millis(millis);
            let mut sent = 0u64;
            while sent < bytes && start.elapsed() < limit {
                let n = (bytes - sent).min(data.len() as u64) as usize;
                s.write_all(&data[..n]).await?;
                sent += n as u64;
            }
            s.shutdown().await?;
            // Wait for the client's EOF so the close is clean.
            let mut buf = [0u8; 64];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
        _ => Err(std::io::Error::other("unknown mode")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dir {
    /// Client → service (forwarder → exposer).
    Up,
    /// Service → client.
    Down,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Up => "upload",
            Dir::Down => "download",
        }
    }
}

/// One connection's transfer: bytes that arrived and the time from the first byte sent (or
/// asked for) until the receiver had them all.
async fn transfer(
    addr: SocketAddr,
    dir: Dir,
    bytes: u64,
    limit: Duration,
    data: Arc<Vec<u8>>,
) -> Result<(u64, Duration)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    match dir {
        Dir::Up => {
            s.write_all(&[MODE_UPLOAD]).await?;
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < bytes && start.elapsed() < limit {
                let n = (bytes - sent).min(data.len() as u64) as usize;
                s.write_all(&data[..n]).await?;
                sent += n as u64;
            }
            s.shutdown().await?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count)
                .await
                .context("reading the service's byte count")?;
            let got = u64::from_be_bytes(count);
            ensure!(got == sent, "sent {sent} bytes, the service got {got}");
            Ok((got, start.elapsed()))
        }
        Dir::Down => {
            let mut hdr = [0u8; 17];
            hdr[0] = MODE_DOWNLOAD;
            hdr[1..9].copy_from_slice(&bytes.to_be_bytes());
            hdr[9..].copy_from_slice(&(limit.as_millis() as u64).to_be_bytes());
            let start = Instant::now();
            s.write_all(&hdr).await?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            let took = start.elapsed();
            s.shutdown().await?;
            ensure!(got > 0, "no bytes arrived");
            Ok((got, took))
        }
    }
}

/// `conns` transfers at once, `bytes` in all; total bytes and the time until the last ended.
async fn bulk(
    addr: SocketAddr,
    dir: Dir,
    conns: usize,
    bytes: u64,
    limit: Duration,
) -> Result<(u64, Duration)> {
    let data = pattern();
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..conns {
        set.spawn(transfer(
            addr,
            dir,
            bytes / conns as u64,
            limit,
            data.clone(),
        ));
    }
    let all = async {
        let mut total = 0;
        while let Some(r) = set.join_next().await {
            total += r.map_err(|e| anyhow!("transfer task: {e}"))??.0;
        }
        Ok::<_, anyhow::Error>(total)
    };
    let total = tokio::time::timeout(limit + Duration::from_secs(30), all)
        .await
        .map_err(|_| {
            anyhow!(
                "transfers not done within {:?}",
                limit + Duration::from_secs(30)
            )
        })??;
    Ok((total, start.elapsed()))
}

/// Round trips are taken in blocks of this many, alternating between the tunnel and raw TCP.
const PING_BLOCK: usize = 100;

/// `n` 1-byte round trips through `tunnel` and as many through `raw`, after `warmup`
/// unrecorded ones each, within `limit`. The two take turns in blocks of [`PING_BLOCK`], so
/// that the machine's passing states (CPU clocks, idle states, other load) touch both alike
/// and the difference between them is the tunnel's.
async fn pingpong(
    tunnel: SocketAddr,
    raw: SocketAddr,
    warmup: usize,
    n: usize,
    limit: Duration,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let deadline = Instant::now() + limit;
    let mut conns = Vec::new();
    for (what, addr) in [("p2ptun", tunnel), ("raw TCP", raw)] {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("{what}: connect {addr}"))?;
        s.set_nodelay(true)?;
        s.write_all(&[MODE_ECHO]).await?;
        for i in 0..warmup {
            round_trip(&mut s, i, deadline)
                .await
                .with_context(|| format!("{what}: warm-up"))?;
        }
        conns.push((what, s, Vec::with_capacity(n)));
    }
    let mut i = warmup;
    while conns.iter().any(|c| c.2.len() < n) {
        for (what, s, rtts) in conns.iter_mut() {
            for _ in 0..PING_BLOCK.min(n - rtts.len()) {
                let rtt = round_trip(s, i, deadline)
                    .await
                    .with_context(|| format!("{what}: only {} of {n} round trips", rtts.len()))?;
                rtts.push(rtt);
                i += 1;
            }
        }
    }
    let mut out = Vec::new();
    for (_, mut s, rtts) in conns {
        s.shutdown().await?;
        out.push(rtts);
    }
    let raw = out.pop().unwrap_or_default();
    let tunnel = out.pop().unwrap_or_default();
    Ok((tunnel, raw))
}

/// One 1-byte echo (the byte is `i`'s low bits), before `deadline`.
async fn round_trip(s: &mut TcpStream, i: usize, deadline: Instant) -> Result<Duration> {
    ensure!(Instant::now() < deadline, "time limit reached");
    let t = Instant::now();
    s.write_all(&[i as u8]).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .context("no echo within 5 s")??;
    ensure!(b[0] == i as u8, "echo mismatch");
    Ok(t.elapsed())
}

/// Retries until a connection echoes one byte; returns when it did.
async fn first_echo(addr: SocketAddr, deadline: Instant) -> Result<Instant> {
    let mut last = String::from("nothing tried");
    while Instant::now() < deadline {
        match TcpStream::connect(addr).await {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                let tried = async {
                    s.write_all(&[MODE_ECHO, 0x42]).await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    Ok::<_, std::io::Error>(b[0])
                };
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, tried).await {
                    Ok(Ok(0x42)) => return Ok(Instant::now()),
                    Ok(Ok(b)) => last = format!("echoed {b:#x}"),
                    Ok(Err(e)) => last = format!("echo: {e}"),
                    Err(_) => last = "no echo".into(),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                last = format!("connect: {e}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    bail!("no byte echoed back before the deadline (last: {last})")
}

/// Opens `n` idle connections, each checked with a 1-byte echo.
async fn open_idle(
    addr: SocketAddr,
    n: usize,
    limit: Duration,
) -> (Vec<TcpStream>, Vec<String>, Duration) {
    let start = Instant::now();
    let deadline = start + limit;
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
            let left = deadline.saturating_duration_since(Instant::now());
            let once = async {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                s.write_all(&[MODE_ECHO, 7]).await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            };
            match tokio::time::timeout(left, once).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("time limit".to_owned()),
            }
        });
    }
    let mut open = Vec::with_capacity(n);
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (open, errors, start.elapsed())
}

/// One more 1-byte echo on every connection (are they all still alive?).
async fn recheck(streams: Vec<TcpStream>, limit: Duration) -> (Vec<TcpStream>, usize) {
    let deadline = Instant::now() + limit;
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let mut set = JoinSet::new();
    for mut s in streams {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let left = deadline.saturating_duration_since(Instant::now());
            let ok = tokio::time::timeout(left, async {
                s.write_all(&[9]).await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(b[0] == 9)
            })
            .await;
            (s, matches!(ok, Ok(Ok(true))))
        });
    }
    let mut out = Vec::new();
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok((s, ok)) => {
                if !ok {
                    failed += 1;
                }
                out.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    (out, failed)
}

/// Median TCP connect time from here to `addr` (one RTT), over `n` tries.
async fn connect_rtt(addr: SocketAddr, n: usize) -> Result<Duration> {
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        v.push(t.elapsed());
        drop(s);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    v.sort();
    Ok(v[v.len() / 2])
}

// ---------------------------------------------------------------------------------------------
// Agents

/// The status agent `proc` of `state_dir` reports (`p2ptun status --json`'s entry).
fn agent_status(state_dir: &Path, proc: &Proc) -> Result<Value> {
    let pid = proc
        .pid()
        .with_context(|| format!("{} was killed", proc.label))?;
    common::agent_status_blocking(state_dir)?
        .into_iter()
        .find(|s| s["pid"].as_u64() == Some(u64::from(pid)))
        .ok_or_else(|| anyhow!("no status of agent {pid} in {}", state_dir.display()))
}

/// The path kind of the agent's first peer (`direct_udp`, `direct_tcp`, `relay`).
fn path_kind(status: &Value) -> Option<String> {
    status["peers"]
        .as_array()?
        .iter()
        .find_map(|p| p["path"]["kind"].as_str().map(str::to_owned))
}

fn open_streams(status: &Value) -> u64 {
    status["services"]
        .as_array()
        .map(|s| s.iter().filter_map(|x| x["open_streams"].as_u64()).sum())
        .unwrap_or(0)
}

/// An exposer and a forwarder of one name: the kit's bundle, on the bench's S (which it
/// does not hold), exposing the bench's service.
type Pair = common::Tunnel<SocketAddr>;

/// What the bench reads of a pair's agents (the kit's bundle lives in another crate).
trait PairStatus {
    /// The forwarder's status.
    fn forwarder_status(&self) -> Result<Value>;
    /// The exposer's status.
    fn exposer_status(&self) -> Result<Value>;
    /// The kind of the forwarder's selected path.
    fn path_kind(&self) -> Option<String>;
}

impl PairStatus for Pair {
    fn forwarder_status(&self) -> Result<Value> {
        agent_status(&self.forward_agent.state_dir, self.forwarder.proc())
    }

    fn exposer_status(&self) -> Result<Value> {
        agent_status(&self.expose_agent.state_dir, self.exposer.proc())
    }

    fn path_kind(&self) -> Option<String> {
        self.forwarder_status().ok().as_ref().and_then(path_kind)
    }
}

/// What starting a pair took.
#[derive(Debug, Clone)]
struct SetupSample {
    first_byte: Duration,
    /// When the forwarder first reported the wanted path kind.
    path: Option<Duration>,
    want: String,
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Debug, Clone, Default)]
struct BulkResult {
    bytes: u64,
    secs: f64,
    /// MiB/s of each round, in the order run.
    rounds: Vec<f64>,
    /// CPU seconds of forwarder, exposer, S during the measurement.
    cpu: [f64; 3],
    path_after: Option<String>,
}

impl BulkResult {
    /// The median round's MiB/s (over all bytes and time with no rounds recorded).
    fn mib_s(&self) -> f64 {
        if self.rounds.is_empty() {
            return self.bytes as f64 / MIB / self.secs.max(1e-9);
        }
        let mut r = self.rounds.clone();
        r.sort_by(f64::total_cmp);
        let mid = r.len() / 2;
        if r.len() % 2 == 1 {
            r[mid]
        } else {
            (r[mid - 1] + r[mid]) / 2.0
        }
    }

    /// Adds one round: bytes, time and CPU add up (CPU per GiB is over all rounds).
    fn add_round(&mut self, round: &BulkResult) {
        self.bytes += round.bytes;
        self.secs += round.secs;
        for (total, c) in self.cpu.iter_mut().zip(round.cpu) {
            *total += c;
        }
        self.rounds.push(round.mib_s());
        self.path_after.clone_from(&round.path_after);
    }

    /// The rounds' MiB/s as "a / b / c".
    fn rounds_text(&self) -> String {
        let r: Vec<String> = self.rounds.iter().map(|x| format!("{x:.0}")).collect();
        r.join(" / ")
    }

    fn cpu_per_gib(&self, i: usize) -> f64 {
        self.cpu[i] / (self.bytes as f64 / GIB).max(1e-12)
    }
}

#[derive(Debug, Clone)]
struct ThroughputRow {
    label: String,
    dir: Dir,
    conns: usize,
    tunnel: Result<BulkResult, String>,
    raw: Option<Result<BulkResult, String>>,
}

#[derive(Debug, Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    mean: f64,
    max: f64,
    n: usize,
}

fn lat_of(mut v: Vec<Duration>) -> Lat {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pct = |p: f64| us(v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]);
    Lat {
        p50: pct(50.0),
        p99: pct(99.0),
        mean: v.iter().map(|d| us(*d)).sum::<f64>() / v.len() as f64,
        max: us(*v.last().expect("non-empty")),
        n: v.len(),
    }
}

#[derive(Debug, Clone, Default)]
struct Mem {
    forwarder: Option<u64>,
    exposer: Option<u64>,
    relay: Option<u64>,
}

impl Mem {
    fn json(&self) -> Value {
        json!({"forwarder": self.forwarder, "exposer": self.exposer, "relay": self.relay})
    }
}

#[derive(Debug, Clone, Default)]
struct ScaleResult {
    wanted: usize,
    opened: usize,
    errors: Vec<String>,
    open_secs: f64,
    before: Mem,
    open: Mem,
    closed: Mem,
    fds: (Option<usize>, Option<usize>),
    streams_seen: (u64, u64),
    streams_after_close: (u64, u64),
    recheck_failed: usize,
    path: Option<String>,
    note: Option<String>,
    /// A second round on the same agents (does memory grow again, or is it reused?).
    reopened: usize,
    reopen: Mem,
    reclosed: Mem,
}

impl ScaleResult {
    /// Bytes per connection for one process: (open - before) / opened.
    fn per_conn(&self, f: impl Fn(&Mem) -> Option<u64>) -> Option<f64> {
        let (b, a) = (f(&self.before)?, f(&self.open)?);
        (self.opened > 0).then(|| (a as f64 - b as f64) * 1024.0 / self.opened as f64)
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark

struct Bench {
    // Dropped in this order: processes, runtimes, then the namespaces, then the files.
    pairs: Vec<Pair>,
    old_relays: Vec<Relay>,
    /// The S agents are started against.
    relay: Relay,
    service: Proc,
    rt_b: Runtime,
    service_addr: SocketAddr,
    raw_addr: SocketAddr,
    net: Net,
    files: Option<common::Lab>,
    sizes: Sizes,
    seq: usize,
    problems: Vec<String>,
    progress_start: Instant,
}

impl Bench {
    fn say(&self, what: &str) {
        eprintln!(
            "[{:7.2} s] {what}",
            self.progress_start.elapsed().as_secs_f64()
        );
    }

    fn files(&self) -> &common::Lab {
        self.files.as_ref().expect("files")
    }

    /// Starts an exposer (registered) and then a forwarder; measures the setup until the
    /// first echoed byte and until the forwarder's path is `want`.
    fn start_pair(&mut self, want: &str) -> Result<(Pair, SetupSample)> {
        self.seq += 1;
        let k = self.seq;
        // No port mapping: without root the agents run on this host, where asking would send
        // NAT-PMP and SSDP to the machine's real gateway; in the lab no router has a daemon.
        let mut kit = Kit::new(self.files(), &format!("svc{k}"))
            .server(&self.relay)
            .labels(&format!("exposer{k}"), &format!("forwarder{k}"))
            .exposer_in(self.net.a.clone())
            .forwarder_in(self.net.b.clone())
            .flags(&["--no-portmap"])
            .agent_log(&log_level())
            .ready(Ready::Started);
        if self.net.is_lab() {
            kit = kit
                .bind(common::LAB_BIND)
                .forward_ports(LAB_FIRST_FORWARD_PORT + k as u16);
        }
        let pair = self.rt_b.block_on(kit.try_start(vec![self.service_addr]))?;
        let t0 = pair.forwarder_started;
        let echo = self
            .rt_b
            .spawn(first_echo(pair.forward_addr(), t0 + SETUP_WAIT));
        // Poll the status every 20 ms until the path is the one wanted.
        let mut path = None;
        let mut last_kind = None;
        while t0.elapsed() < SETUP_WAIT {
            pair.ensure_running()?;
            if let Ok(st) = pair.forwarder_status() {
                last_kind = path_kind(&st);
                if last_kind.as_deref() == Some(want) {
                    path = Some(t0.elapsed());
                    break;
                }
            }
            std::thread::sleep(STATUS_POLL);
        }
        let first = wait_task(&self.rt_b, echo).with_context(|| {
            format!(
                "pair {}: first byte\n{}\n{}",
                pair.name(),
                pair.forwarder.proc().tail(15),
                pair.exposer.proc().tail(15)
            )
        })?;
        if path.is_none() {
            self.problems.push(format!(
                "pair {}: the forwarder's path was not {want} within {SETUP_WAIT:?} (last seen: {})",
                pair.name(),
                last_kind.as_deref().unwrap_or("none")
            ));
        }
        Ok((
            pair,
            SetupSample {
                first_byte: first - t0,
                path,
                want: want.to_owned(),
            },
        ))
    }

    fn mem(&self, pair: &Pair) -> Mem {
        Mem {
            forwarder: pair.forwarder.proc().rss_kib(),
            exposer: pair.exposer.proc().rss_kib(),
            relay: self.relay.proc().rss_kib(),
        }
    }

    fn cpu(&self, pair: &Pair) -> [f64; 3] {
        [
            pair.forwarder.proc().cpu_secs().unwrap_or(0.0),
            pair.exposer.proc().cpu_secs().unwrap_or(0.0),
            self.relay.proc().cpu_secs().unwrap_or(0.0),
        ]
    }

    fn bulk(
        &self,
        pair: Option<&Pair>,
        addr: SocketAddr,
        dir: Dir,
        conns: usize,
    ) -> Result<BulkResult> {
        let cpu0 = pair.map(|p| self.cpu(p));
        let (bytes, took) = on(
            &self.rt_b,
            bulk(
                addr,
                dir,
                conns,
                self.sizes.bulk_bytes,
                self.sizes.bulk_time,
            ),
        )?;
        let mut r = BulkResult {
            bytes,
            secs: took.as_secs_f64(),
            ..BulkResult::default()
        };
        if let (Some(p), Some(c0)) = (pair, cpu0) {
            let c1 = self.cpu(p);
            r.cpu = [c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]];
            r.path_after = p.path_kind();
        }
        Ok(r)
    }

    fn throughput(&mut self, pair: &Pair, with_raw: bool, prefix: &str) -> Vec<ThroughputRow> {
        let par = self.sizes.parallel;
        let mut rows = Vec::new();
        for (dir, conns) in [
            (Dir::Up, 1),
            (Dir::Down, 1),
            (Dir::Up, par),
            (Dir::Down, par),
        ] {
            let label = format!(
                "{prefix}{conns} conn{}, {}",
                if conns == 1 { "" } else { "s" },
                dir.name()
            );
            let mut tunnel = Ok(BulkResult::default());
            let mut raw = with_raw.then(|| Ok(BulkResult::default()));
            for round in 1..=self.sizes.rounds {
                let of = format!("round {round} of {}", self.sizes.rounds);
                self.say(&format!(
                    "throughput: {label} through p2ptun ({}), {of}",
                    pair.name()
                ));
                if let Ok(total) = &mut tunnel {
                    match self.bulk(Some(pair), pair.forward_addr(), dir, conns) {
                        Ok(r) => total.add_round(&r),
                        Err(e) => tunnel = Err(format!("{of}: {e:#}")),
                    }
                }
                if let Some(Ok(total)) = &mut raw {
                    self.say(&format!("throughput: {label}, raw TCP, {of}"));
                    match self.bulk(None, self.raw_addr, dir, conns) {
                        Ok(r) => total.add_round(&r),
                        Err(e) => raw = Some(Err(format!("{of}: {e:#}"))),
                    }
                }
            }
            for r in [Some(&tunnel), raw.as_ref()].into_iter().flatten() {
                if let Err(e) = r {
                    self.problems
                        .push(format!("throughput {label} ({}): {e}", pair.name()));
                }
            }
            rows.push(ThroughputRow {
                label,
                dir,
                conns,
                tunnel,
                raw,
            });
        }
        rows
    }

    /// The UDP rows ([`iperf`]): an iperf3 server in the exposer's namespace, a pair of
    /// `up` agents forwarding its port as TCP (control) and UDP (the test), and each rate
    /// and direction of [`iperf::RUNS`] through the tunnel and raw, taking turns.
    fn udp(&mut self) -> (Vec<iperf::UdpRow>, Option<String>, Value) {
        if !common::installed("iperf3", "--version") {
            return (
                Vec::new(),
                Some("not measured: iperf3 is not installed (Debian: iperf3)".to_owned()),
                Value::Null,
            );
        }
        match self.udp_rows() {
            Ok((rows, counts)) => (rows, None, counts),
            Err(e) => {
                self.problems.push(format!("udp: {e:#}"));
                (Vec::new(), Some(format!("FAILED: {e:#}")), Value::Null)
            }
        }
    }

    /// The rows, and both agents' datagram counts after them (`p2ptun status`'s `udp`).
    fn udp_rows(&mut self) -> Result<(Vec<iperf::UdpRow>, Value)> {
        self.seq += 1;
        let k = self.seq;
        let logs = self.files().logs();
        let (port, bind) = if self.net.is_lab() {
            (LAB_IPERF_PORT, "0.0.0.0")
        } else {
            (common::free_port(), "127.0.0.1")
        };
        let mut server = self.net.a.command("iperf3")?;
        server.args(["-s", "-p", &port.to_string(), "-B", bind]);
        common::child_env_level(&mut server, &log_level());
        let server = Proc::spawn("iperf3-server", server, &logs);

        let agent = |label: String, place: &Place| {
            let mut agent = self.files().agent(&label, &self.relay);
            agent.place = place.clone();
            agent.flags = vec!["--no-portmap".to_owned()];
            agent.log = log_level();
            if self.net.is_lab() {
                agent.bind = common::LAB_BIND.to_owned();
            }
            agent
        };
        let (ctl, data) = (format!("iperf{k}"), format!("iperf{k}-udp"));
        let local = format!("127.0.0.1:{port}");
        let forward_port = if self.net.is_lab() {
            LAB_FIRST_FORWARD_PORT + k as u16
        } else {
            common::free_port()
        };
        let exposer = agent(format!("exposer{k}"), &self.net.a);
        let e = exposer.up(
            &[
                UpExpose {
                    name: ctl.clone(),
                    local: local.clone(),
                    ..UpExpose::default()
                },
                UpExpose {
                    name: data.clone(),
                    local,
                    udp: true,
                    ..UpExpose::default()
                },
            ],
            &[],
        );
        let forwarder = agent(format!("forwarder{k}"), &self.net.b);
        let deadline = Instant::now() + START_WAIT;
        while agent_status(&exposer.state_dir, &e)
            .map(|s| s["registered"] != true)
            .unwrap_or(true)
        {
            ensure!(Instant::now() < deadline, "the exposer did not register");
            std::thread::sleep(STATUS_POLL);
        }
        let fwd = format!("127.0.0.1:{forward_port}");
        let f = forwarder.up(
            &[],
            &[
                UpForward {
                    name: ctl,
                    local: fwd.clone(),
                    ..UpForward::default()
                },
                UpForward {
                    name: data,
                    local: fwd,
                    udp: true,
                    ..UpForward::default()
                },
            ],
        );
        let here: IpAddr = Ipv4Addr::LOCALHOST.into();
        let (raw_host, raw_port) = match &self.net.router_a {
            Some((_, public)) => (IpAddr::from(*public), LAB_IPERF_PORT),
            None => (here, port),
        };
        let secs = if self.sizes.rounds == 1 { 2 } else { 3 };
        let b = self.net.b.clone();
        let iperf = |host, port, rate: &'static str, reverse, secs| {
            let (b, logs) = (b.clone(), logs.clone());
            on(&self.rt_b, async move {
                iperf::client(&b, &logs, host, port, rate, reverse, secs).await
            })
        };
        // The first run makes the peer connection; iperf3's control stream opens it.
        self.say("udp: iperf3 through the tunnel, first run");
        let deadline = Instant::now() + SETUP_WAIT;
        loop {
            for p in [&server, &e, &f] {
                p.ensure_running()?;
            }
            match iperf(here, forward_port, "10M", false, 1) {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context("no iperf3 run through the tunnel"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        let deadline = Instant::now() + SETUP_WAIT;
        while agent_status(&forwarder.state_dir, &f)
            .ok()
            .as_ref()
            .and_then(path_kind)
            .as_deref()
            != Some("direct_udp")
        {
            ensure!(Instant::now() < deadline, "the UDP pair never went direct");
            std::thread::sleep(STATUS_POLL);
        }
        let mut rows = Vec::new();
        for (rate, reverse) in iperf::RUNS {
            let dir = if reverse { "down" } else { "up" };
            self.say(&format!("udp: iperf3 -u -b {rate} {dir} through p2ptun"));
            let tunnel =
                iperf(here, forward_port, rate, reverse, secs).map_err(|e| format!("{e:#}"));
            self.say(&format!("udp: iperf3 -u -b {rate} {dir}, raw"));
            let raw = iperf(raw_host, raw_port, rate, reverse, secs).map_err(|e| format!("{e:#}"));
            for (what, r) in [("p2ptun", &tunnel), ("raw", &raw)] {
                if let Err(e) = r {
                    self.problems
                        .push(format!("udp {rate} {dir} ({what}): {e}"));
                }
            }
            rows.push(iperf::UdpRow {
                rate,
                reverse,
                tunnel,
                raw,
            });
        }
        let counts = |dir: &Path, p: &Proc, role: &str| {
            agent_status(dir, p).ok().and_then(|st| {
                st["services"]
                    .as_array()?
                    .iter()
                    .find(|svc| svc["role"] == role && svc["udp"].is_object())
                    .map(|svc| svc["udp"].clone())
            })
        };
        let counts = json!({
            "forwarder": counts(&forwarder.state_dir, &f, "forward"),
            "exposer": counts(&exposer.state_dir, &e, "expose"),
        });
        Ok((rows, counts))
    }

    fn scale(&mut self, n: usize, nofile: u64) -> Result<(ScaleResult, SetupSample)> {
        let mut r = ScaleResult {
            wanted: n,
            ..ScaleResult::default()
        };
        let (pair, sample) = self.start_pair("direct_udp")?;
        let result = (|| -> Result<ScaleResult> {
            // Every process holds one socket per connection (the service the other end).
            if (n as u64 + 1024) > nofile {
                r.note = Some(format!(
                    "skipped: RLIMIT_NOFILE is {nofile}, {n} connections need about {}",
                    n + 1024
                ));
                return Ok(r.clone());
            }
            std::thread::sleep(Duration::from_secs(1));
            r.before = self.mem(&pair);
            self.say(&format!(
                "scale: opening {n} idle connections through {}",
                pair.name()
            ));
            let (streams, errors, took) = on(
                &self.rt_b,
                open_idle(pair.forward_addr(), n, Duration::from_secs(180)),
            );
            r.opened = streams.len();
            r.open_secs = took.as_secs_f64();
            r.errors = errors;
            // Wait until both agents count them (bounded), then let memory settle.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let f = pair
                    .forwarder_status()
                    .map(|s| open_streams(&s))
                    .unwrap_or(0);
                let e = pair.exposer_status().map(|s| open_streams(&s)).unwrap_or(0);
                r.streams_seen = (f, e);
                if (f as usize >= r.opened && e as usize >= r.opened) || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(2));
            r.open = self.mem(&pair);
            r.fds = (pair.forwarder.proc().fds(), pair.exposer.proc().fds());
            r.path = pair.path_kind();
            self.say(&format!(
                "scale: re-checking the {} open connections",
                r.opened
            ));
            let (streams, failed) = on(&self.rt_b, recheck(streams, Duration::from_secs(120)));
            r.recheck_failed = failed;
            on(&self.rt_b, async move { drop(streams) });
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let f = pair
                    .forwarder_status()
                    .map(|s| open_streams(&s))
                    .unwrap_or(u64::MAX);
                let e = pair
                    .exposer_status()
                    .map(|s| open_streams(&s))
                    .unwrap_or(u64::MAX);
                r.streams_after_close = (f, e);
                if (f == 0 && e == 0) || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(2));
            r.closed = self.mem(&pair);
            // The same again: memory that grows a second time would be a leak; memory
            // reused means the first round's was only kept by the allocator.
            self.say(&format!("scale: second round of {n} on the same agents"));
            let (streams, _, _) = on(
                &self.rt_b,
                open_idle(pair.forward_addr(), n, Duration::from_secs(180)),
            );
            r.reopened = streams.len();
            std::thread::sleep(Duration::from_secs(2));
            r.reopen = self.mem(&pair);
            on(&self.rt_b, async move { drop(streams) });
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                let f = pair
                    .forwarder_status()
                    .map(|s| open_streams(&s))
                    .unwrap_or(u64::MAX);
                let e = pair
                    .exposer_status()
                    .map(|s| open_streams(&s))
                    .unwrap_or(u64::MAX);
                if f == 0 && e == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(2));
            r.reclosed = self.mem(&pair);
            pair.ensure_running()?;
            Ok(r.clone())
        })();
        drop(pair);
        Ok((result?, sample))
    }
}

// ---------------------------------------------------------------------------------------------
// Machine facts

fn machine() -> Value {
    let m = host::machine();
    json!({"nproc": m.nproc, "cpu_model": m.cpu_model, "kernel": m.kernel, "mem_gib": m.mem_gib})
}

fn git_rev() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = |args: &[&str]| {
        Command::new("git")
            .args(["-C", dir])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match out(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty = out(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!(
                "{rev}{}",
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            )
        }
        None => "unknown".into(),
    }
}

/// Starts S (`p2ptun-relay`) in `place`, on `addrs` (`None`: 127.0.0.1, free ports), with
/// `extra` flags, and waits until it listens.
fn start_relay(
    rt: &Runtime,
    files: &common::Lab,
    label: &str,
    place: &Place,
    addrs: Option<(SocketAddr, SocketAddr)>,
    extra: &[&str],
) -> Result<Relay> {
    let opts = RelayOpts {
        place: place.clone(),
        addrs,
        extra_args: extra.iter().map(|a| (*a).to_owned()).collect(),
        log: Some(log_level()),
        ..RelayOpts::default()
    };
    rt.block_on(Relay::try_start(files, label, opts))
}

/// Problem lines (WARN, ERROR, panics, fatal errors) in every log, grouped by process.
fn scan_logs(logs: &Path) -> Vec<(String, usize, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(logs) else {
        return out;
    };
    let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).into_owned();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains(" WARN ")
                    || l.contains(" ERROR ")
                    || l.contains("panicked")
                    || l.starts_with("error")
            })
            // S's warning about running without a token is expected here.
            .filter(|l| !l.contains("no token configured"))
            // So is trusting S's key on first use (each agent has a fresh state dir).
            .filter(|l| !l.contains("first connection to this S: pinned its key"))
            .collect();
        if bad.is_empty() {
            continue;
        }
        // Up to 4 distinct messages (without the timestamp).
        let mut samples: Vec<String> = Vec::new();
        for l in &bad {
            let msg = l.split_once(' ').map_or(*l, |x| x.1).trim().to_owned();
            let key: String = msg.chars().take(60).collect();
            if !samples.iter().any(|s| s.starts_with(&key)) && samples.len() < 4 {
                samples.push(msg.chars().take(300).collect());
            }
        }
        let name = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, bad.len(), samples));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Output

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

fn opt_mib(k: Option<u64>) -> String {
    k.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn meets(ok: bool) -> &'static str {
    if ok {
        "meets"
    } else {
        "MISSES"
    }
}

/// What S's metrics say it did with relayed packets (its `p2ptun_relay_*` counters).
#[derive(Debug, Clone, Copy, Default)]
struct RelayCounters {
    /// Packets (or pieces) sent on.
    forwarded: u64,
    /// Whole packets S split to fit the receiver's datagrams.
    split: u64,
    /// Payloads S sent on a stream of their own.
    streamed: u64,
    /// Packets dropped on the way out (the receiver's connection could not take them).
    send_failed: u64,
}

impl RelayCounters {
    /// Reads S's metrics at `addr`, from a task of `rt` (in S's namespace).
    fn fetch(rt: &Runtime, addr: SocketAddr) -> Result<RelayCounters> {
        let text = on(rt, async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
            let mut text = String::new();
            s.read_to_string(&mut text).await?;
            anyhow::Ok(text)
        })
        .with_context(|| format!("reading S's metrics at {addr}"))?;
        let get = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(RelayCounters {
            forwarded: get("p2ptun_relay_relay_packets_total{result=\"forwarded\"}"),
            split: get("p2ptun_relay_relay_split_packets_total"),
            streamed: get("p2ptun_relay_relay_stream_packets_total"),
            send_failed: get("p2ptun_relay_relay_packets_total{result=\"send_failed\"}"),
        })
    }

    /// What happened between `before` and `self`.
    fn since(self, before: RelayCounters) -> RelayCounters {
        RelayCounters {
            forwarded: self.forwarded.saturating_sub(before.forwarded),
            split: self.split.saturating_sub(before.split),
            streamed: self.streamed.saturating_sub(before.streamed),
            send_failed: self.send_failed.saturating_sub(before.send_failed),
        }
    }

    fn json(&self) -> Value {
        json!({"forwarded": self.forwarded, "split_by_s": self.split,
               "on_streams": self.streamed, "send_failed": self.send_failed})
    }
}

struct Report {
    header: Vec<String>,
    rtt_s: Option<Duration>,
    idle: Option<Mem>,
    latency: Option<(Result<Lat, String>, Result<Lat, String>)>,
    direct: Vec<ThroughputRow>,
    relay: Vec<ThroughputRow>,
    relay_note: Option<String>,
    /// S's relay counters over each S's relay rows: (which S, counters).
    relay_counters: Vec<(String, Result<RelayCounters, String>)>,
    udp: Vec<iperf::UdpRow>,
    udp_note: Option<String>,
    /// Both agents' datagram counts after the UDP rows.
    udp_counts: Value,
    setups: Vec<SetupSample>,
    relay_setup: Option<SetupSample>,
    scale: Vec<Result<ScaleResult, String>>,
    problems: Vec<String>,
    log_problems: Vec<(String, usize, Vec<String>)>,
    machine: Value,
    mode: String,
    load_start: String,
    load_end: String,
    duration: Duration,
    nofile: u64,
    logs_kept: Option<PathBuf>,
    sizes: Sizes,
    rev: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

impl Report {
    fn first_byte_target_ms(&self) -> Option<f64> {
        self.rtt_s.map(|r| 2.0 * r.as_secs_f64() * 1000.0 + 100.0)
    }

    fn direct_cpu_per_gib(&self, i: usize) -> Option<f64> {
        let (mut cpu, mut bytes) = (0.0, 0u64);
        for r in &self.direct {
            if let Ok(t) = &r.tunnel {
                cpu += t.cpu[i];
                bytes += t.bytes;
            }
        }
        (bytes > 0).then(|| cpu / (bytes as f64 / GIB))
    }

    fn table(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(o, "p2ptun benchmark (release build, {})", self.rev);
        let _ = writeln!(
            o,
            "machine: {} CPUs, {}, kernel {}, {:.1} GiB RAM; load average (1/5/15 min) at start {}, at end {}",
            m["nproc"],
            m["cpu_model"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["mem_gib"].as_f64().unwrap_or(0.0),
            self.load_start,
            self.load_end
        );
        for h in &self.header {
            let _ = writeln!(o, "{h}");
        }
        let _ = writeln!(
            o,
            "RLIMIT_NOFILE {}; run took {:.0} s; throughput: median of {} round(s), each sending for {:.1} s (at most {} GiB); {} round trips (+{} warm-up)",
            self.nofile,
            self.duration.as_secs_f64(),
            self.sizes.rounds,
            self.sizes.bulk_time.as_secs_f64(),
            self.sizes.bulk_bytes >> 30,
            self.sizes.pings,
            self.sizes.warmup_pings
        );
        let _ = writeln!(
            o,
            "RTT to S (TCP connect from the forwarder's host): {}",
            self.rtt_s.map_or("n/a".into(), |r| format!(
                "{:.3} ms",
                r.as_secs_f64() * 1000.0
            ))
        );

        // Throughput.
        let _ = writeln!(o, "\nTHROUGHPUT, direct path (MiB/s; CPU s per GiB moved)");
        let _ = writeln!(
            o,
            "  {:<22} {:>10} {:>10} {:>9} {:>13} {:>11} {:>11}  path",
            "", "p2ptun", "raw TCP", "p2ptun/raw", "target", "fwd CPU/GiB", "exp CPU/GiB"
        );
        for r in &self.direct {
            let raw = r.raw.as_ref().and_then(|x| x.as_ref().ok());
            let (t_mib, fwd, exp, path) = match &r.tunnel {
                Ok(t) => (
                    f1(t.mib_s()),
                    format!("{:.2}", t.cpu_per_gib(0)),
                    format!("{:.2}", t.cpu_per_gib(1)),
                    t.path_after.clone().unwrap_or_else(|| "?".into()),
                ),
                Err(_) => ("FAILED".into(), "-".into(), "-".into(), "-".into()),
            };
            let ratio = match (&r.tunnel, raw) {
                (Ok(t), Some(w)) => Some(t.mib_s() / w.mib_s()),
                _ => None,
            };
            let target = if r.conns == 1 {
                match ratio {
                    Some(x) => format!("≥25% {}", meets(x >= 0.25)),
                    None => "≥25%".into(),
                }
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "  {:<22} {:>10} {:>10} {:>9} {:>13} {:>11} {:>11}  {}",
                r.label,
                t_mib,
                raw.map_or("n/a".into(), |w| f1(w.mib_s())),
                ratio.map_or("n/a".into(), |x| format!("{:.1}%", x * 100.0)),
                target,
                fwd,
                exp,
                path
            );
        }
        let _ = writeln!(
            o,
            "  rounds (MiB/s, in the order run; the figures above are their medians):"
        );
        for r in &self.direct {
            let rounds = |b: Option<&Result<BulkResult, String>>| match b {
                Some(Ok(b)) => b.rounds_text(),
                Some(Err(_)) => "failed".into(),
                None => "n/a".into(),
            };
            let _ = writeln!(
                o,
                "    {:<20} p2ptun {:<22} raw TCP {}",
                r.label,
                rounds(Some(&r.tunnel)),
                rounds(r.raw.as_ref())
            );
        }
        let _ = writeln!(
            o,
            "  agents' CPU s per GiB over all direct transfers: forwarder {}, exposer {}",
            self.direct_cpu_per_gib(0)
                .map_or("n/a".into(), |x| format!("{x:.2}")),
            self.direct_cpu_per_gib(1)
                .map_or("n/a".into(), |x| format!("{x:.2}"))
        );

        iperf::table(
            &mut o,
            &self.udp,
            self.udp_note.as_deref(),
            &self.udp_counts,
        );

        // Relay.
        let _ = writeln!(
            o,
            "\nTHROUGHPUT, relay path through S (UDP and TCP between the routers dropped; S default caps 100 MB/s per session, 200 MB/s per source IP; raised: 100 GB/s)"
        );
        if let Some(n) = &self.relay_note {
            let _ = writeln!(o, "  {n}");
        }
        if !self.relay.is_empty() {
            let _ = writeln!(
                o,
                "  {:<34} {:>10} {:>11} {:>11} {:>11}  {:<10}  rounds (MiB/s)",
                "", "MiB/s", "S CPU/GiB", "fwd CPU/GiB", "exp CPU/GiB", "path"
            );
        }
        for r in &self.relay {
            match &r.tunnel {
                Ok(t) => {
                    let _ = writeln!(
                        o,
                        "  {:<34} {:>10} {:>11.2} {:>11.2} {:>11.2}  {:<10}  {}",
                        r.label,
                        f1(t.mib_s()),
                        t.cpu_per_gib(2),
                        t.cpu_per_gib(0),
                        t.cpu_per_gib(1),
                        t.path_after.clone().unwrap_or_else(|| "?".into()),
                        t.rounds_text()
                    );
                }
                Err(e) => {
                    let _ = writeln!(o, "  {:<34} FAILED: {e}", r.label);
                }
            }
        }
        for (which, c) in &self.relay_counters {
            let _ = match c {
                Ok(c) => writeln!(
                    o,
                    "  S's counters over the \"{which}\" rows: {} packets forwarded, {} split by S to fit, {} on streams, {} dropped on the way out",
                    c.forwarded, c.split, c.streamed, c.send_failed
                ),
                Err(e) => writeln!(o, "  S's counters over the \"{which}\" rows: not read: {e}"),
            };
        }

        // Latency.
        let _ = writeln!(o, "\nLATENCY, 1-byte ping-pong over one connection (µs)");
        match &self.latency {
            Some((t, r)) => {
                let _ = writeln!(
                    o,
                    "  {:<22} {:>9} {:>9} {:>9} {:>9}",
                    "", "p50", "p99", "mean", "max"
                );
                for (name, l) in [("p2ptun", t), ("raw TCP", r)] {
                    match l {
                        Ok(l) => {
                            let _ = writeln!(
                                o,
                                "  {:<22} {:>9.1} {:>9.1} {:>9.1} {:>9.1}   ({} round trips)",
                                name, l.p50, l.p99, l.mean, l.max, l.n
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(o, "  {name:<22} FAILED: {e}");
                        }
                    }
                }
                if let (Ok(t), Ok(r)) = (t, r) {
                    let added = t.p50 - r.p50;
                    let _ = writeln!(
                        o,
                        "  {:<22} {:>9.1} {:>9.1}   target: added p50 < 100 µs: {}",
                        "added by p2ptun",
                        added,
                        t.p99 - r.p99,
                        meets(added < 100.0)
                    );
                }
            }
            None => {
                let _ = writeln!(o, "  not measured");
            }
        }

        // Setup.
        let _ = writeln!(
            o,
            "\nSETUP (from spawning `p2ptun forward`; exposer already registered)"
        );
        let firsts: Vec<f64> = self
            .setups
            .iter()
            .map(|s| s.first_byte.as_secs_f64() * 1000.0)
            .collect();
        let directs: Vec<f64> = self
            .setups
            .iter()
            .filter_map(|s| s.path.map(|p| p.as_secs_f64() * 1000.0))
            .collect();
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let target = self.first_byte_target_ms();
        let _ = writeln!(
            o,
            "  first byte echoed back: median {} ms of {} pairs [{}]; target ≤ 2×RTT(S)+100 ms = {}{}",
            median(firsts.clone()).map_or("n/a".into(), |x| format!("{x:.0}")),
            firsts.len(),
            list(&firsts),
            target.map_or("n/a".into(), |t| format!("{t:.1} ms")),
            match (median(firsts.clone()), target) {
                (Some(x), Some(t)) => format!(": {}", meets(x <= t)),
                _ => String::new(),
            }
        );
        let _ = writeln!(
            o,
            "  path direct_udp (status polled every 20 ms): median {} ms [{}]{}",
            median(directs.clone()).map_or("n/a".into(), |x| format!("{x:.0}")),
            list(&directs),
            if directs.len() < self.setups.len() {
                format!(
                    "; {} pair(s) never went direct",
                    self.setups.len() - directs.len()
                )
            } else {
                String::new()
            }
        );
        if let Some(s) = &self.relay_setup {
            let _ = writeln!(
                o,
                "  relay-only pair: first byte {:.0} ms, path {} after {}",
                s.first_byte.as_secs_f64() * 1000.0,
                s.want,
                s.path.map_or("never".into(), |p| format!(
                    "{:.0} ms",
                    p.as_secs_f64() * 1000.0
                ))
            );
        }

        // Memory.
        let _ = writeln!(o, "\nMEMORY (VmRSS, MiB)");
        if let Some(m) = &self.idle {
            let worst = m.forwarder.max(m.exposer);
            let _ = writeln!(
                o,
                "  idle agents after one connection: forwarder {}, exposer {}, S {}; target idle agent < 20 MiB: {}",
                opt_mib(m.forwarder),
                opt_mib(m.exposer),
                opt_mib(m.relay),
                worst.map_or("n/a", |w| meets(w < 20 * 1024))
            );
        }
        let _ = writeln!(
            o,
            "  {:>6} {:>6} {:>7} {:>19} {:>19} {:>19} {:>9} {:>9}  target < 32 KiB/conn",
            "conns",
            "opened",
            "open s",
            "fwd before/open/closed",
            "exp before/open/closed",
            "S before/open/closed",
            "fwd KiB/c",
            "exp KiB/c",
        );
        for s in &self.scale {
            match s {
                Ok(s) if s.note.is_some() => {
                    let _ = writeln!(o, "  {:>6} {}", s.wanted, s.note.as_deref().unwrap_or(""));
                }
                Ok(s) => {
                    let trio = |f: &dyn Fn(&Mem) -> Option<u64>| {
                        format!(
                            "{}/{}/{}",
                            opt_mib(f(&s.before)),
                            opt_mib(f(&s.open)),
                            opt_mib(f(&s.closed))
                        )
                    };
                    let fpc = s.per_conn(|m| m.forwarder);
                    let epc = s.per_conn(|m| m.exposer);
                    let kib =
                        |x: Option<f64>| x.map_or("n/a".into(), |b| format!("{:.1}", b / 1024.0));
                    let ok = match (fpc, epc) {
                        (Some(a), Some(b)) => meets(a.max(b) < 32.0 * 1024.0),
                        _ => "n/a",
                    };
                    let _ = writeln!(
                        o,
                        "  {:>6} {:>6} {:>7.1} {:>19} {:>19} {:>19} {:>9} {:>9}  {}",
                        s.wanted,
                        s.opened,
                        s.open_secs,
                        trio(&|m| m.forwarder),
                        trio(&|m| m.exposer),
                        trio(&|m| m.relay),
                        kib(fpc),
                        kib(epc),
                        ok
                    );
                    let _ = writeln!(
                        o,
                        "  {:>6} open streams seen fwd/exp {}/{}; fds fwd/exp {}/{}; re-check echo failures {}; after close open streams {}/{}; path {}{}",
                        "",
                        s.streams_seen.0,
                        s.streams_seen.1,
                        s.fds.0.map_or("?".into(), |x| x.to_string()),
                        s.fds.1.map_or("?".into(), |x| x.to_string()),
                        s.recheck_failed,
                        s.streams_after_close.0,
                        s.streams_after_close.1,
                        s.path.as_deref().unwrap_or("?"),
                        if s.errors.is_empty() {
                            String::new()
                        } else {
                            format!("; {} failed to open, e.g. {}", s.errors.len(), s.errors[0])
                        }
                    );
                    let second = |f: &dyn Fn(&Mem) -> Option<u64>| -> Option<f64> {
                        let (a, b) = (f(&s.closed)?, f(&s.reopen)?);
                        (s.reopened > 0).then(|| (b as f64 - a as f64) / s.reopened as f64)
                    };
                    let (f2, e2) = (second(&|m| m.forwarder), second(&|m| m.exposer));
                    let _ = writeln!(
                        o,
                        "  {:>6} second round on the same agents ({} opened): RSS open/closed fwd {}/{}, exp {}/{}, S {}/{} MiB; growth {}/{} KiB/conn fwd/exp: {}",
                        "",
                        s.reopened,
                        opt_mib(s.reopen.forwarder),
                        opt_mib(s.reclosed.forwarder),
                        opt_mib(s.reopen.exposer),
                        opt_mib(s.reclosed.exposer),
                        opt_mib(s.reopen.relay),
                        opt_mib(s.reclosed.relay),
                        f2.map_or("n/a".into(), |x| format!("{x:.1}")),
                        e2.map_or("n/a".into(), |x| format!("{x:.1}")),
                        match (f2, e2) {
                            (Some(a), Some(b)) => meets(a.max(b) < 32.0),
                            _ => "n/a",
                        }
                    );
                }
                Err(e) => {
                    let _ = writeln!(o, "  FAILED: {e}");
                }
            }
        }

        // Problems.
        let _ = writeln!(o, "\nPROBLEMS");
        if self.problems.is_empty() && self.log_problems.is_empty() {
            let _ = writeln!(
                o,
                "  none seen (no failed measurement, no WARN/ERROR in any log)"
            );
        }
        for p in &self.problems {
            let _ = writeln!(o, "  - {p}");
        }
        for (name, n, samples) in &self.log_problems {
            let _ = writeln!(o, "  - {name}.log: {n} WARN/ERROR line(s), e.g.:");
            for s in samples {
                let _ = writeln!(o, "      {s}");
            }
        }
        if let Some(p) = &self.logs_kept {
            let _ = writeln!(o, "  logs kept in {}", p.display());
        }
        o
    }

    fn json(&self) -> Value {
        let bulk = |b: &Result<BulkResult, String>| match b {
            Ok(b) => json!({
                "bytes": b.bytes, "secs": b.secs, "mib_per_s": b.mib_s(), "rounds_mib_per_s": b.rounds,
                "cpu_s": {"forwarder": b.cpu[0], "exposer": b.cpu[1], "relay": b.cpu[2]},
                "cpu_s_per_gib": {"forwarder": b.cpu_per_gib(0), "exposer": b.cpu_per_gib(1), "relay": b.cpu_per_gib(2)},
                "path_after": b.path_after,
            }),
            Err(e) => json!({"error": e}),
        };
        let rows = |rows: &[ThroughputRow]| -> Vec<Value> {
            rows.iter()
                .map(|r| {
                    let raw = r.raw.as_ref().map(|x| match x {
                        Ok(w) => json!({"bytes": w.bytes, "secs": w.secs, "mib_per_s": w.mib_s(), "rounds_mib_per_s": w.rounds}),
                        Err(e) => json!({"error": e}),
                    });
                    let ratio = match (&r.tunnel, r.raw.as_ref()) {
                        (Ok(t), Some(Ok(w))) => Some(t.mib_s() / w.mib_s()),
                        _ => None,
                    };
                    json!({"test": r.label, "direction": r.dir.name(), "connections": r.conns,
                           "p2ptun": bulk(&r.tunnel), "raw_tcp": raw, "ratio": ratio})
                })
                .collect()
        };
        let lat = |l: &Result<Lat, String>| match l {
            Ok(l) => {
                json!({"p50_us": l.p50, "p99_us": l.p99, "mean_us": l.mean, "max_us": l.max, "round_trips": l.n})
            }
            Err(e) => json!({"error": e}),
        };
        let latency = self.latency.as_ref().map(|(t, r)| {
            let added = match (t, r) {
                (Ok(t), Ok(r)) => json!({"p50_us": t.p50 - r.p50, "p99_us": t.p99 - r.p99}),
                _ => Value::Null,
            };
            json!({"p2ptun": lat(t), "raw_tcp": lat(r), "added": added})
        });
        let setup = |s: &SetupSample| {
            json!({"first_byte_ms": s.first_byte.as_secs_f64() * 1000.0,
                   "path": s.want, "path_ms": s.path.map(|p| p.as_secs_f64() * 1000.0)})
        };
        let scale: Vec<Value> = self
            .scale
            .iter()
            .map(|s| match s {
                Ok(s) => json!({
                    "connections": s.wanted, "opened": s.opened, "open_secs": s.open_secs,
                    "open_errors": s.errors.len(), "open_error_samples": s.errors.iter().take(5).collect::<Vec<_>>(),
                    "rss_kib": {"before": s.before.json(), "open": s.open.json(), "closed": s.closed.json(),
                                "second_round_open": s.reopen.json(), "second_round_closed": s.reclosed.json()},
                    "second_round_opened": s.reopened,
                    "second_round_bytes_per_connection": {
                        "forwarder": s.reopen.forwarder.zip(s.closed.forwarder).filter(|_| s.reopened > 0).map(|(b, a)| (b as f64 - a as f64) * 1024.0 / s.reopened as f64),
                        "exposer": s.reopen.exposer.zip(s.closed.exposer).filter(|_| s.reopened > 0).map(|(b, a)| (b as f64 - a as f64) * 1024.0 / s.reopened as f64),
                    },
                    "bytes_per_connection": {"forwarder": s.per_conn(|m| m.forwarder), "exposer": s.per_conn(|m| m.exposer), "relay": s.per_conn(|m| m.relay)},
                    "fds": {"forwarder": s.fds.0, "exposer": s.fds.1},
                    "open_streams_seen": {"forwarder": s.streams_seen.0, "exposer": s.streams_seen.1},
                    "open_streams_after_close": {"forwarder": s.streams_after_close.0, "exposer": s.streams_after_close.1},
                    "recheck_failed": s.recheck_failed, "path": s.path, "note": s.note,
                }),
                Err(e) => json!({"error": e}),
            })
            .collect();
        json!({
            "revision": self.rev,
            "machine": self.machine,
            "mode": self.mode,
            "topology": self.header,
            "load_average": {"start": self.load_start, "end": self.load_end},
            "duration_s": self.duration.as_secs_f64(),
            "rlimit_nofile": self.nofile,
            "bounds": {"bulk_bytes": self.sizes.bulk_bytes, "bulk_secs": self.sizes.bulk_time.as_secs_f64(),
                       "parallel": self.sizes.parallel, "round_trips": self.sizes.pings},
            "rtt_to_s_ms": self.rtt_s.map(|r| r.as_secs_f64() * 1000.0),
            "throughput_direct": rows(&self.direct),
            "cpu_s_per_gib_direct": {"forwarder": self.direct_cpu_per_gib(0), "exposer": self.direct_cpu_per_gib(1)},
            "throughput_relay": rows(&self.relay),
            "relay_note": self.relay_note,
            "udp": self.udp.iter().map(iperf::UdpRow::json).collect::<Vec<_>>(),
            "udp_note": self.udp_note,
            "udp_agent_counts": self.udp_counts,
            "relay_counters": self.relay_counters.iter().map(|(which, c)| json!({
                "s": which,
                "counters": c.as_ref().map(RelayCounters::json).map_err(Clone::clone).unwrap_or_else(|e| json!({"error": e})),
            })).collect::<Vec<_>>(),
            "latency": latency,
            "setup": {"direct_pairs": self.setups.iter().map(setup).collect::<Vec<_>>(),
                      "relay_pair": self.relay_setup.as_ref().map(setup),
                      "first_byte_target_ms": self.first_byte_target_ms()},
            "idle_rss_kib": self.idle.as_ref().map(Mem::json),
            "scale": scale,
            "targets": {
                "direct_one_connection_ratio_min": 0.25,
                "added_p50_latency_us_max": 100,
                "idle_connection_bytes_max": 32 * 1024,
                "idle_agent_rss_mib_max": 20,
                "first_byte": "2 RTTs to S + 100 ms",
            },
            "problems": self.problems,
            "log_problems": self.log_problems.iter().map(|(n, c, s)| json!({"log": n, "lines": c, "samples": s})).collect::<Vec<_>>(),
            "logs_kept": self.logs_kept,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// main

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--service") && args.len() == 4 {
        if let Err(e) = service_main(&args[2], Path::new(&args[3])) {
            eprintln!("bench-service: ERROR {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(opts) {
        eprintln!("bench: FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: Opts) -> Result<()> {
    let started = Instant::now();
    install_signal_cleanup()?;
    common::on_spawn(register);
    let sizes = Sizes::new(opts.quick);
    let load_start = loadavg();
    let nofile = raise_nofile(WANT_NOFILE);

    let lab_check = if opts.loopback {
        Err("--loopback given".to_owned())
    } else {
        lab_usable()
    };
    let net = match &lab_check {
        Ok(()) => Net::lab()?,
        Err(reason) => {
            eprintln!("bench: WARNING: no network namespaces ({reason}); falling back to loopback");
            Net::loopback(reason)?
        }
    };
    let mode = if net.is_lab() { "netns" } else { "loopback" }.to_owned();
    let files = common::Lab::new("bench");
    registry().files = Some(files.path().to_owned());
    let logs = files.logs();

    // S, and the clients' runtime.
    let rt_b = net.b.runtime("bench-client", 1)?;
    let relay = start_relay(
        &rt_b,
        &files,
        "relay",
        &net.s,
        net.s_addrs,
        // Its metrics tell what it did with relayed packets; only the lab measures the relay.
        if net.is_lab() {
            &["--metrics", LAB_S_METRICS][..]
        } else {
            &[]
        },
    )?;

    // The service (its own process, in the exposer's namespace).
    let addr_file = files.path().join("service.addr");
    let mut cmd = net.a.command(std::env::current_exe()?)?;
    cmd.arg("--service")
        .arg(net.service_bind.to_string())
        .arg(&addr_file);
    common::child_env_level(&mut cmd, &log_level());
    let service = Proc::spawn("service", cmd, &logs);
    let deadline = Instant::now() + START_WAIT;
    let service_addr: SocketAddr = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            break text.trim().parse()?;
        }
        service.ensure_running()?;
        ensure!(Instant::now() < deadline, "the service did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    let raw_addr = match &net.router_a {
        Some((_, public)) => SocketAddr::V4(SocketAddrV4::new(*public, LAB_SERVICE_PORT)),
        None => service_addr,
    };

    let mut header = vec![format!("network: {}", net.description)];
    header.push(if net.is_lab() {
        "clients: this process (one tokio worker, in the forwarder's namespace); service: this \
         binary as a child process (one tokio worker, in the exposer's namespace); agents: the \
         release `p2ptun` (RUST_LOG=info); S: the release `p2ptun-relay` with default settings \
         (a second S with the relay caps raised for the last relay rows)"
            .to_owned()
    } else {
        "clients: this process (one tokio worker); service: this binary as a child process (one \
         tokio worker); agents: the release `p2ptun` (RUST_LOG=info); S: the release \
         `p2ptun-relay` with default settings"
            .to_owned()
    });
    let mut b = Bench {
        pairs: Vec::new(),
        old_relays: Vec::new(),
        relay,
        service,
        rt_b,
        service_addr,
        raw_addr,
        net,
        files: Some(files),
        sizes,
        seq: 0,
        problems: Vec::new(),
        progress_start: started,
    };
    b.say(&format!("mode {mode}; S listening on {}", b.relay.addr()));

    let s_listen = b.relay.addr();
    let rtt_s = on(&b.rt_b, connect_rtt(s_listen, 7))
        .map_err(|e| b.problems.push(format!("RTT to S: {e:#}")))
        .ok();

    // Pair 1: setup, idle memory, latency, throughput.
    let mut setups = Vec::new();
    let mut idle = None;
    let mut latency = None;
    let mut direct = Vec::new();
    b.say("starting the first pair");
    match opts.direct.then(|| b.start_pair("direct_udp")).transpose() {
        Ok(None) => {}
        Ok(Some((pair, sample))) => {
            b.say(&format!(
                "first pair: first byte after {:.0} ms, direct after {}",
                sample.first_byte.as_secs_f64() * 1000.0,
                sample.path.map_or("never".into(), |p| format!(
                    "{:.0} ms",
                    p.as_secs_f64() * 1000.0
                ))
            ));
            setups.push(sample);
            std::thread::sleep(Duration::from_secs(1));
            idle = Some(b.mem(&pair));

            b.say("latency: p2ptun and raw TCP, taking turns");
            let (w, n) = (b.sizes.warmup_pings, b.sizes.pings);
            let lim = Duration::from_secs(60);
            latency = Some(
                match on(
                    &b.rt_b,
                    pingpong(pair.forward_addr(), b.raw_addr, w, n, lim),
                ) {
                    Ok((t, r)) => (Ok(lat_of(t)), Ok(lat_of(r))),
                    Err(e) => (Err(format!("{e:#}")), Err(format!("{e:#}"))),
                },
            );

            b.say("warm-up transfer");
            let warm = 64 << 20;
            let addr = pair.forward_addr();
            if let Err(e) = on(
                &b.rt_b,
                bulk(addr, Dir::Up, 1, warm, Duration::from_secs(2)),
            ) {
                b.problems.push(format!("warm-up: {e:#}"));
            }
            direct = b.throughput(&pair, true, "");
            b.pairs.push(pair);
        }
        Err(e) => b.problems.push(format!("first pair: {e:#}")),
    }
    // Only the first pair's numbers matter from here; stop it so it costs nothing.
    b.pairs.clear();

    for _ in 0..sizes.setup_only * usize::from(opts.direct) {
        b.say("setup-only pair");
        match b.start_pair("direct_udp") {
            Ok((_pair, sample)) => setups.push(sample),
            Err(e) => b.problems.push(format!("setup pair: {e:#}")),
        }
    }

    // Scale, each level on a fresh pair.
    let mut scale = Vec::new();
    for &n in opts.scale.iter().filter(|_| opts.do_scale) {
        b.say(&format!("scale: {n} connections, fresh pair"));
        match b.scale(n, nofile) {
            Ok((r, sample)) => {
                if r.opened < r.wanted && r.note.is_none() {
                    b.problems.push(format!(
                        "scale {n}: only {} of {n} connections opened; first errors: {:?}",
                        r.opened,
                        r.errors.iter().take(3).collect::<Vec<_>>()
                    ));
                }
                if r.recheck_failed > 0 {
                    b.problems.push(format!(
                        "scale {n}: {} open connection(s) did not echo on the re-check",
                        r.recheck_failed
                    ));
                }
                setups.push(sample);
                scale.push(Ok(r));
            }
            Err(e) => {
                b.problems.push(format!("scale {n}: {e:#}"));
                scale.push(Err(format!("{e:#}")));
            }
        }
    }

    // UDP, on the direct path (before the relay rows block it).
    let (udp, udp_note, udp_counts) = if opts.udp {
        b.udp()
    } else {
        (
            Vec::new(),
            Some("not measured: not asked for (--only)".to_owned()),
            Value::Null,
        )
    };

    // The relay path.
    let mut relay_rows = Vec::new();
    let mut relay_counters = Vec::new();
    let mut relay_setup = None;
    let relay_note = if !opts.relay {
        Some("not measured: not asked for (--only)".to_owned())
    } else if b.net.is_lab() {
        b.say("relay path: dropping UDP and TCP between the routers");
        let mut failures = Vec::new();
        let rt_s = b.net.s.runtime("bench-s", 1)?;
        let mut metrics: SocketAddr = LAB_S_METRICS.parse()?;
        if let Err(e) = b.net.block_direct() {
            failures.push(format!("blocking the direct paths: {e:#}"));
        }
        // First S with its default caps, then a second S with the caps out of the way (its
        // own process, so its CPU time is its own), to see what relaying itself costs.
        for (caps, prefix) in [(false, "S default caps: "), (true, "S caps raised: ")] {
            if !failures.is_empty() {
                break;
            }
            if caps {
                let (listen, alt) = (
                    LAB_S2_LISTEN.parse::<SocketAddr>()?,
                    LAB_S2_ALT.parse::<SocketAddr>()?,
                );
                match start_relay(
                    &b.rt_b,
                    b.files(),
                    "relay2",
                    &b.net.s,
                    Some((listen, alt)),
                    &[
                        "--relay-session-rate",
                        "100000000000",
                        "--relay-rate-per-ip",
                        "100000000000",
                        "--relay-session-bytes",
                        "68719476736",
                        "--metrics",
                        LAB_S2_METRICS,
                    ],
                ) {
                    Ok(s2) => {
                        // The first S keeps running (its agents stay registered there).
                        let s1 = std::mem::replace(&mut b.relay, s2);
                        b.old_relays.push(s1);
                        metrics = LAB_S2_METRICS.parse()?;
                    }
                    Err(e) => {
                        failures.push(format!("second S: {e:#}"));
                        break;
                    }
                }
            }
            match b.start_pair("relay") {
                Ok((pair, sample)) => {
                    if !caps {
                        relay_setup = Some(sample);
                    }
                    let before = RelayCounters::fetch(&rt_s, metrics);
                    relay_rows.extend(b.throughput(&pair, false, prefix));
                    let after = RelayCounters::fetch(&rt_s, metrics);
                    let counted = match (before, after) {
                        (Ok(before), Ok(after)) => Ok(after.since(before)),
                        (Err(e), _) | (_, Err(e)) => Err(format!("{e:#}")),
                    };
                    relay_counters.push((prefix.trim_end_matches(": ").to_owned(), counted));
                    if let Some(k) = pair.path_kind().filter(|k| k != "relay") {
                        b.problems.push(format!(
                            "relay pair ({prefix}): path is {k} at the end, expected relay"
                        ));
                    }
                }
                Err(e) => failures.push(format!("relay pair ({prefix}): {e:#}")),
            }
        }
        for f in &failures {
            b.problems.push(f.clone());
        }
        (!failures.is_empty()).then(|| format!("FAILED: {}", failures.join("; ")))
    } else {
        Some("not measured: needs the namespace lab (root)".to_owned())
    };
    b.pairs.clear();

    let service_stats =
        std::fs::read_to_string(addr_file.with_extension("stats")).unwrap_or_default();
    if let [accepted, errors] = service_stats.split_whitespace().collect::<Vec<_>>()[..] {
        if errors != "0" {
            b.problems.push(format!(
                "the service saw {errors} connection error(s) (of {accepted} accepted); see {}",
                b.service.log_path().display()
            ));
        }
    }
    if let Err(e) = b.service.ensure_running() {
        b.problems.push(format!("the service: {e:#}"));
    }
    if let Err(e) = b.relay.proc().ensure_running() {
        b.problems.push(format!("S: {e:#}"));
    }
    let log_problems = scan_logs(&b.files().logs());
    let keep = opts.keep || !b.problems.is_empty() || !log_problems.is_empty();
    let logs_kept = if keep {
        registry().files = None;
        b.files.take().map(|f| f.keep().join("logs"))
    } else {
        None
    };
    b.say("done");
    let report = Report {
        header,
        rtt_s,
        idle,
        latency,
        direct,
        relay: relay_rows,
        relay_note,
        relay_counters,
        udp,
        udp_note,
        udp_counts,
        setups,
        relay_setup,
        scale,
        problems: std::mem::take(&mut b.problems),
        log_problems,
        machine: machine(),
        mode,
        load_start,
        load_end: loadavg(),
        duration: started.elapsed(),
        nofile,
        logs_kept,
        sizes,
        rev: git_rev(),
    };
    drop(b);
    let table = report.table();
    if opts.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{table}");
    }
    Ok(())
}
