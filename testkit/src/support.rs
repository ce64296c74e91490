//! What the NAT-lab tests (`tests/lab_paths.rs`, `link.rs`, `portmap.rs`, `reach_s.rs`, `flood.rs`) need around the NAT lab: the kit's tunnel there (S, an exposer
//! and a forwarder in their namespaces, as processes), a checked TCP service inside the
//! exposer's namespace, paced transfers from inside the forwarder's namespace that measure
//! gaps in arriving bytes, the agents' status (read from their status sockets), drop rules
//! between two peers, and a timeline.
//!
//! # The service's protocol
//!
//! A connection carries any number of *rounds*. The client sends a 24-byte header (`LABP`,
//! 4 zero bytes, seed, length; big-endian) and then `length` bytes of [`DataGen`]`(seed)`.
//! At the same time the service sends `length` bytes of `DataGen(down_seed(seed))`; when it
//! has read all of the client's bytes it sends their SHA-256 (32 bytes). The client checks
//! that digest against what it sent, and the digest of what it received against what the
//! service must have sent. EOF instead of a header ends the connection. Both sides pace
//! their sending by a [`Pace`] shared through the test (keyed by seed), so a transfer can
//! be made to last across events (a block, an unblock) and unpaced afterwards.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate as common;
use crate::natlab::{self, Host, Lab, Nat, Shaping};
use crate::{DataGen, Kit, Place, Ready, Relay, RelayOpts};

/// The forwarder's local port (inside the forwarder's namespace, so it is always free).
pub const FORWARD_PORT: u16 = 4000;
/// The name the exposer registers (its first service's, when it has several).
pub const NAME: &str = "svc";

/// Header magic of the service's protocol.
const MAGIC: [u8; 4] = *b"LABP";

/// The seed of the service's data in the round whose client seed is `seed`.
pub fn down_seed(seed: u64) -> u64 {
    seed ^ 0xD0E5_11C3_5EED_0001
}

// ---------------------------------------------------------------------------------------------
// Running a lab test

/// The transfer tests of one test binary run one at a time (they measure times on a machine
/// with few CPUs; cargo runs the binaries themselves one after the other).
static HEAVY: Mutex<()> = Mutex::new(());

/// Holds the CPU for one transfer test until dropped (see [`HEAVY`]); a test that failed
/// while holding it does not stop the others.
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The runtime a lab test runs in: the service and the clients live in it, so it gets more
/// threads than the machine has cores (a client's reads must not wait behind the service's
/// writes).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs one transfer test of the NAT lab: skips it without root and nftables (see
/// [`natlab::require_root`]; fails instead under CI=true), holds [`heavy`] and runs `test`
/// in a fresh [`runtime`].
pub fn run_heavy(test: impl std::future::Future<Output = ()>) {
    if !natlab::require_root() {
        return;
    }
    let _heavy = heavy();
    runtime().block_on(test);
}

/// An easy × easy lab: A (the exposer's host) and B (the forwarder's host), each behind its
/// own `easy` NAT.
pub fn easy_pair(lab: &Lab) -> (Host, Host) {
    let a = lab.add_host(Nat::Easy, Shaping::none()).expect("host A");
    let b = lab.add_host(Nat::Easy, Shaping::none()).expect("host B");
    (a, b)
}

// ---------------------------------------------------------------------------------------------
// Timeline

/// Events with their time since the test's start; printed as they happen (the test harness
/// shows them when a test fails, or with `--nocapture`) and all together at the end.
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<(f64, String)>>,
}

impl Default for Timeline {
    fn default() -> Timeline {
        Timeline::new()
    }
}

impl Timeline {
    /// A timeline starting now.
    pub fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Seconds from the start to `t`.
    pub fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }

    /// Records `what` as happening now.
    pub fn event(&self, what: impl Into<String>) {
        self.event_at(Instant::now(), what);
    }

    /// Records `what` as happening at `t`.
    pub fn event_at(&self, t: Instant, what: impl Into<String>) {
        let what = what.into();
        let secs = self.at(t);
        println!("[{secs:8.3} s] {what}");
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((secs, what));
    }

    /// Every event, sorted by time.
    pub fn render(&self) -> String {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = String::from("timeline:\n");
        for (t, what) in events {
            let _ = writeln!(out, "  {t:8.3} s  {what}");
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Pacing and progress

/// A sending rate in bytes per second shared by the two ends of a transfer; 0 is unlimited.
#[derive(Debug, Default)]
pub struct Pace(AtomicU64);

impl Pace {
    /// A pace of `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> Arc<Pace> {
        Arc::new(Pace(AtomicU64::new(bytes_per_sec)))
    }

    /// The rate now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Changes the rate (0: unlimited) for the bytes sent from now on.
    pub fn set(&self, bytes_per_sec: u64) {
        self.0.store(bytes_per_sec, Ordering::Relaxed);
    }
}

/// What a client has moved on one connection, and the longest pause in arriving bytes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of data sent (headers not counted).
    pub sent: AtomicU64,
    /// Bytes of data received (trailers not counted).
    pub received: AtomicU64,
    gaps: Mutex<Gaps>,
}

#[derive(Debug, Default, Clone)]
struct Gaps {
    longest: Duration,
    longest_end: Option<Instant>,
    /// Pauses over [`Progress::NOTABLE`]: (end, length).
    notable: Vec<(Instant, Duration)>,
}

impl Progress {
    /// Pauses at least this long are kept for the timeline.
    pub const NOTABLE: Duration = Duration::from_millis(300);

    /// A fresh counter.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    fn gap(&self, length: Duration, end: Instant) {
        let mut g = self.gaps.lock().unwrap_or_else(|e| e.into_inner());
        if length > g.longest {
            g.longest = length;
            g.longest_end = Some(end);
        }
        if length >= Self::NOTABLE {
            g.notable.push((end, length));
        }
    }

    /// The longest time between two reads that returned data within one round (from its
    /// first byte to its last), and when it ended.
    pub fn longest_gap(&self) -> (Duration, Option<Instant>) {
        let g = self.gaps.lock().unwrap_or_else(|e| e.into_inner());
        (g.longest, g.longest_end)
    }

    /// Every pause of at least [`Progress::NOTABLE`]: (when it ended, how long).
    pub fn notable_gaps(&self) -> Vec<(Instant, Duration)> {
        self.gaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notable
            .clone()
    }
}

/// Writes the `len` bytes of `seed` at `pace`; returns their SHA-256.
async fn send_paced<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    pace: &Pace,
    progress: Option<&AtomicU64>,
) -> std::io::Result<[u8; 32]> {
    let mut gen = DataGen::new(seed, len);
    let mut h = Sha256::new();
    let mut sent = 0u64;
    // (time, bytes sent then, rate) when the current rate took effect.
    let mut mark: Option<(Instant, u64, u64)> = None;
    while let Some(chunk) = gen.next_chunk() {
        let rate = pace.get();
        if rate > 0 {
            let (t0, b0, _) = match mark {
                Some(m) if m.2 == rate => m,
                _ => {
                    let m = (Instant::now(), sent, rate);
                    mark = Some(m);
                    m
                }
            };
            let due = t0 + Duration::from_secs_f64((sent - b0) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        } else {
            mark = None;
        }
        h.update(chunk);
        w.write_all(chunk).await?;
        sent += chunk.len() as u64;
        if let Some(p) = progress {
            p.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }
    w.flush().await?;
    Ok(h.finalize().into())
}

/// Reads exactly `len` bytes; returns their SHA-256. Counts into `progress` and records the
/// pauses between reads there.
async fn receive<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    progress: Option<&Progress>,
) -> anyhow::Result<[u8; 32]> {
    let mut buf = vec![0u8; common::CHUNK];
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut last: Option<Instant> = None;
    while got < len {
        let want = (len - got).min(buf.len() as u64) as usize;
        let n = r
            .read(&mut buf[..want])
            .await
            .with_context(|| format!("reading after {got} of {len} bytes"))?;
        if n == 0 {
            bail!("the connection ended after {got} of {len} bytes");
        }
        let now = Instant::now();
        h.update(&buf[..n]);
        got += n as u64;
        if let Some(p) = progress {
            p.received.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(prev) = last {
                p.gap(now - prev, now);
            }
        }
        last = Some(now);
    }
    Ok(h.finalize().into())
}

// ---------------------------------------------------------------------------------------------
// The service

#[derive(Default)]
struct ServiceState {
    paces: Mutex<HashMap<u64, Arc<Pace>>>,
    errors: Mutex<Vec<String>>,
    accepted: AtomicU64,
    rounds: AtomicU64,
}

/// The checked TCP service, listening on 127.0.0.1 inside one host's namespace.
pub struct Service {
    port: u16,
    state: Arc<ServiceState>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Starts it inside `host`'s namespace (the listener is made there; its connections stay
    /// there), served by the current tokio runtime.
    pub fn start(host: &Host) -> Service {
        let listener = host
            .tcp_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind the service in the exposer's namespace");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("local_addr").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let state = Arc::new(ServiceState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                        let st = st.clone();
                        conns.spawn(async move {
                            if let Err(e) = serve(stream, &st).await {
                                st.errors.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{e:#}"));
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Service { port, state, task }
    }

    /// Its port on 127.0.0.1 (in its namespace).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Makes the service send the rounds of `seed` at `pace`.
    pub fn set_pace(&self, seed: u64, pace: Arc<Pace>) {
        self.state
            .paces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seed, pace);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Rounds served to their end.
    pub fn rounds(&self) -> u64 {
        self.state.rounds.load(Ordering::Relaxed)
    }

    /// Errors of connections that failed on the service's side.
    pub fn errors(&self) -> Vec<String> {
        self.state
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl common::Target for Service {
    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn serve(stream: TcpStream, st: &ServiceState) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    loop {
        let mut hdr = [0u8; 24];
        // EOF before a header: the client is done.
        match r.read(&mut hdr[..1]).await? {
            0 => {
                w.shutdown().await?;
                return Ok(());
            }
            _ => r.read_exact(&mut hdr[1..]).await?,
        };
        ensure!(hdr[..4] == MAGIC, "bad header {:?}", &hdr[..8]);
        let seed = u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes"));
        let len = u64::from_be_bytes(hdr[16..24].try_into().expect("8 bytes"));
        let pace = st
            .paces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&seed)
            .cloned()
            .unwrap_or_default();
        let (_, received) = tokio::try_join!(
            async {
                send_paced(&mut w, down_seed(seed), len, &pace, None)
                    .await
                    .context("service sending")
            },
            receive(&mut r, len, None),
        )
        .with_context(|| format!("service, round of seed {seed:#x}"))?;
        w.write_all(&received).await?;
        st.rounds.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A client connection to the forwarder, made inside the forwarder's namespace.
pub struct Conn {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    /// What it moved.
    pub progress: Arc<Progress>,
}

/// What one round measured.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Bytes each way.
    pub len: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl Round {
    /// MiB/s of one direction.
    pub fn mib_per_s(&self) -> f64 {
        self.len as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Conn {
    /// Connects to 127.0.0.1:`port` in `place` (the forwarder's host).
    pub fn open(place: &Place, port: u16) -> anyhow::Result<Conn> {
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let std = place
            .run_in(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .with_context(|| format!("connecting to {to} in {place}"))?;
        std.set_nonblocking(true)?;
        let stream = TcpStream::from_std(std)?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Ok(Conn {
            r,
            w,
            progress: Progress::new(),
        })
    }

    /// One round: `len` bytes of `seed` up at `pace`, the service's `len` bytes down (at the
    /// pace the service was given for `seed`), both checked by SHA-256.
    pub async fn round(&mut self, seed: u64, len: u64, pace: &Pace) -> anyhow::Result<Round> {
        let start = Instant::now();
        let expected_down =
            tokio::task::spawn_blocking(move || common::data_digest(down_seed(seed), len));
        let mut hdr = [0u8; 24];
        hdr[..4].copy_from_slice(&MAGIC);
        hdr[8..16].copy_from_slice(&seed.to_be_bytes());
        hdr[16..24].copy_from_slice(&len.to_be_bytes());
        let progress = self.progress.clone();
        let (r, w) = (&mut self.r, &mut self.w);
        let writer = async {
            w.write_all(&hdr).await?;
            let digest = send_paced(w, seed, len, pace, Some(&progress.sent))
                .await
                .context("sending")?;
            anyhow::Ok(digest)
        };
        let reader = async {
            let got = receive(r, len, Some(&progress)).await?;
            let mut trailer = [0u8; 32];
            r.read_exact(&mut trailer)
                .await
                .context("reading the service's digest after the data")?;
            anyhow::Ok((got, trailer))
        };
        let (sent, (got, trailer)) = tokio::try_join!(writer, reader)?;
        let expected = expected_down.await.context("digest task")?;
        ensure!(
            got == expected,
            "the {len} bytes that arrived differ from what the service sent: SHA-256 {} != {}",
            common::hex(&got),
            common::hex(&expected)
        );
        ensure!(
            trailer == sent,
            "the service received other bytes than the {len} sent: SHA-256 {} != {}",
            common::hex(&trailer),
            common::hex(&sent)
        );
        Ok(Round {
            len,
            elapsed: start.elapsed(),
        })
    }

    /// Runs [`Conn::round`] in a task of its own and hands the connection back with the
    /// result, so that a test can watch paths while the round runs and then go on using the
    /// same connection (a stream that must outlive path changes).
    pub fn spawn_round(
        mut self,
        seed: u64,
        len: u64,
        pace: Arc<Pace>,
    ) -> tokio::task::JoinHandle<(Conn, anyhow::Result<Round>)> {
        tokio::spawn(async move {
            let r = self.round(seed, len, &pace).await;
            (self, r)
        })
    }

    /// Ends the connection: shuts the write side and expects the service's EOF.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.w.shutdown().await?;
        common::expect_eof(&mut self.r).await
    }
}

// ---------------------------------------------------------------------------------------------
// S and the agents

/// The kit's bundle with this file's service: S, the exposer in `a` and the forwarder in `b`.
pub type Tunnel = common::Tunnel<Service>;

/// Starts S in the lab's S namespace and waits until it listens.
pub async fn start_relay(lab: &Lab, files: &common::Lab) -> Relay {
    start_relay_with(lab, files, &[]).await
}

/// As [`start_relay`], with more flags for S (e.g. `--relay-idle-timeout 3`).
pub async fn start_relay_with(lab: &Lab, files: &common::Lab, flags: &[&str]) -> Relay {
    let opts = RelayOpts {
        extra_args: flags.iter().map(|f| (*f).to_owned()).collect(),
        ..RelayOpts::lab(lab)
    };
    Relay::start(files, "relay", opts).await
}

/// The kit in the lab, S not chosen yet: the exposer in `a`, the forwarder in `b` (agents in
/// a namespace are processes), the forwards on [`FORWARD_PORT`], …, agents logging
/// `info,p2ptun=debug` (or `P2PTUN_TEST_LOG`), ready once both registered.
pub fn kit<'a>(a: &Host, b: &Host, files: &'a common::Lab) -> Kit<'a> {
    Kit::new(files, NAME)
        .on_hosts(a, b)
        .forward_ports(FORWARD_PORT)
        .agent_log(&common::log_level("P2PTUN_TEST_LOG", "info,p2ptun=debug"))
        .ready(Ready::Registered)
}

/// The name of service `i` of a [`Tunnel`]: [`NAME`], then `svc-2`, `svc-3`, ….
pub fn service_name(i: usize) -> String {
    common::service_name(NAME, i)
}

impl Tunnel {
    /// Starts S, the service in `a`, the exposer in `a` and the forwarder in `b`, and waits
    /// until both agents are registered with S. Nothing has crossed the tunnel yet. The
    /// tunnel holds the test's files (named after `test`).
    pub async fn start(lab: &Lab, a: &Host, b: &Host, test: &str) -> Tunnel {
        let files = common::Lab::new(test);
        kit(a, b, &files)
            .relay_opts(RelayOpts::lab(lab))
            .start(vec![Service::start(a)])
            .await
            .holding(files)
    }

    /// As [`Tunnel::start`], with S already running (and its files), and extra global flags
    /// for the exposer and the forwarder (e.g. `--portmap pcp`).
    pub async fn start_with(
        a: &Host,
        b: &Host,
        files: common::Lab,
        relay: Relay,
        exposer_flags: &[&str],
        forwarder_flags: &[&str],
    ) -> Tunnel {
        kit(a, b, &files)
            .relay(relay)
            .exposer_flags(exposer_flags)
            .forwarder_flags(forwarder_flags)
            .start(vec![Service::start(a)])
            .await
            .holding(files)
    }

    /// As [`Tunnel::start`], but both agents run `p2ptun up -c FILE` (the daemon) with
    /// `services` services: the exposer has an `[[expose]]` for each (a service of its own
    /// in `a`), the forwarder a `[[forward]]` for each (see [`service_name`]; service `i` is
    /// forwarded on [`FORWARD_PORT`] + `i`).
    pub async fn start_daemons(
        lab: &Lab,
        a: &Host,
        b: &Host,
        test: &str,
        services: usize,
    ) -> Tunnel {
        let files = common::Lab::new(test);
        kit(a, b, &files)
            .relay_opts(RelayOpts::lab(lab))
            .daemons()
            .start((0..services).map(|_| Service::start(a)).collect())
            .await
            .holding(files)
    }

    /// A client connection to the forwarder, from inside `b`.
    pub fn connect(&self) -> Conn {
        self.connect_service(0)
    }

    /// A client connection to service `i` (see [`service_name`]), from inside `b`.
    pub fn connect_service(&self, i: usize) -> Conn {
        Conn::open(&self.forward_agent.place, self.ports[i])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.reports()))
    }

    /// Waits until a small round through a new connection works (the peer connection is then
    /// made), failing with the logs after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) {
        self.wait_ready_on(0, timeout).await;
    }

    /// [`Tunnel::wait_ready`] for service `i`.
    pub async fn wait_ready_on(&self, i: usize, timeout: Duration) {
        let start = Instant::now();
        let mut attempt = 0u64;
        loop {
            self.assert_healthy("waiting for the tunnel");
            attempt += 1;
            let seed = 0x5EAD_0000 + attempt;
            let tried = tokio::time::timeout(Duration::from_secs(10), async {
                let mut c = Conn::open(&self.forward_agent.place, self.ports[i])?;
                c.round(seed, 4096, &Pace::default()).await?;
                c.close().await
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("no round trip within 10 s")));
            match tried {
                Ok(()) => {
                    println!(
                        "tunnel to {} ready after {:.2} s ({attempt} attempt(s))",
                        self.names[i],
                        start.elapsed().as_secs_f64()
                    );
                    return;
                }
                Err(e) if start.elapsed() >= timeout => panic!(
                    "no round trip through the tunnel to {} within {timeout:?}; last error: \
                     {e:#}\n{}",
                    self.names[i],
                    self.reports()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

/// What any lab tunnel's agents report of their peers and paths, whatever its services.
impl<Svc> common::Tunnel<Svc> {
    /// Every peer the forwarder's status lists (over all agents of its state dir).
    pub async fn forwarder_peers(&self) -> Vec<Value> {
        all_peers(&self.forward_agent.state_dir).await
    }

    /// Every peer the exposer's status lists.
    pub async fn exposer_peers(&self) -> Vec<Value> {
        all_peers(&self.expose_agent.state_dir).await
    }

    /// Both agents' log lines about their paths (found, lost, switched), for a failure
    /// message that must show why a path changed.
    pub fn path_log(&self) -> String {
        let mut out = String::new();
        for agent in [self.forwarder.proc(), self.exposer.proc()] {
            let lines = agent.lines_with(PATH_LOG_WORDS);
            let _ = writeln!(out, "{}'s path log lines ({}):", agent.label, lines.len());
            // The first and the last ones: how it began and how it ended.
            let skip = lines.len().saturating_sub(40);
            for (i, l) in lines.iter().enumerate() {
                if i < 10 || i >= skip.max(10) {
                    let _ = writeln!(out, "  {l}");
                } else if i == 10 {
                    let _ = writeln!(out, "  … {} more …", skip - 10);
                }
            }
        }
        out
    }

    /// The forwarder's view of its peer (the exposer).
    pub async fn forwarder_peer(&self) -> Option<Value> {
        first_peer(&self.forward_agent.state_dir).await
    }

    /// The exposer's view of its peer (the forwarder).
    pub async fn exposer_peer(&self) -> Option<Value> {
        first_peer(&self.expose_agent.state_dir).await
    }

    /// The forwarder's selected path.
    pub async fn forwarder_path(&self) -> Option<PathView> {
        self.forwarder_peer().await.as_ref().and_then(PathView::of)
    }

    /// Waits until the forwarder's selected path is of `kind`; returns it and when it was
    /// seen, or `None` at the deadline. Samples every `every`.
    pub async fn wait_path(
        &self,
        kind: &str,
        timeout: Duration,
        every: Duration,
    ) -> Option<(PathView, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.forwarder_path().await {
                if p.kind == kind {
                    return Some((p, Instant::now()));
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Runs `p2ptun status --json` (the CLI) for the forwarder, in its namespace.
    pub async fn status_cli(&self) -> Vec<Value> {
        let out = self.forward_agent.run(&["status", "--json"]).await;
        assert_eq!(
            out.code(),
            0,
            "`p2ptun status --json` failed\n{}",
            out.describe()
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`p2ptun status --json` printed no JSON list ({e})\n{}",
                out.describe()
            )
        })
    }

    /// Both agents' whole status as JSON, for failure messages.
    pub async fn status_dump(&self) -> String {
        format!(
            "forwarder status: {}\nexposer status: {}",
            serde_json::to_string(
                &status(&self.forward_agent.state_dir)
                    .await
                    .unwrap_or_default()
            )
            .unwrap_or_default(),
            serde_json::to_string(
                &status(&self.expose_agent.state_dir)
                    .await
                    .unwrap_or_default()
            )
            .unwrap_or_default()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Status

/// Reads the status of every agent of `state_dir` (see [`common::agent_status`]).
pub use crate::agent_status as status;

/// Words of the agents' log lines about paths (see [`Tunnel::path_log`]); "stopped
/// answering" is how the agent reports a path's death.
pub const PATH_LOG_WORDS: &[&str] = &[
    "stopped answering",
    "went silent",
    "now using",
    "found direct",
    "no direct",
    "birthday punch:",
    "connected to peer",
    "S stopped relaying",
    "relay session",
    "lost the connection",
];

/// Every peer in the status of the agents of `state_dir` (empty if none answers).
pub async fn all_peers(state_dir: &Path) -> Vec<Value> {
    status(state_dir)
        .await
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s["peers"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The first peer in the status of the agent of `state_dir`.
pub async fn first_peer(state_dir: &Path) -> Option<Value> {
    let st = status(state_dir).await.ok()?;
    st.into_iter()
        .find_map(|s| s["peers"].as_array().and_then(|p| p.first().cloned()))
}

/// A path as status reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathView {
    /// `direct_udp`, `direct_tcp` or `relay`.
    pub kind: String,
    /// The peer's address on it (S's for the relay).
    pub remote: String,
    /// Seconds since it was found (or came back).
    pub age_secs: u64,
    /// Whether its checks are answered.
    pub live: bool,
}

impl PathView {
    /// The selected path of a status peer entry.
    pub fn of(peer: &Value) -> Option<PathView> {
        Self::parse(&peer["path"])
    }

    fn parse(p: &Value) -> Option<PathView> {
        Some(PathView {
            kind: p["kind"].as_str()?.to_owned(),
            remote: p["remote"].as_str()?.to_owned(),
            age_secs: p["age_secs"].as_u64().unwrap_or(0),
            live: p["live"].as_bool().unwrap_or(true),
        })
    }

    /// Every path of a status peer entry, if status lists them (`paths`).
    pub fn all(peer: &Value) -> Vec<PathView> {
        peer["paths"]
            .as_array()
            .map(|a| a.iter().filter_map(Self::parse).collect())
            .unwrap_or_default()
    }
}

impl std::fmt::Display for PathView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (age {} s{})",
            self.kind,
            self.remote,
            self.age_secs,
            if self.live { "" } else { ", dead" }
        )
    }
}

/// A path for messages, or "no path".
pub fn describe_path(p: &Option<PathView>) -> String {
    p.as_ref()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "no path".into())
}

/// One sample of both agents' selected paths: (forwarder's, exposer's).
pub async fn sample_paths(t: &Tunnel) -> (Option<PathView>, Option<PathView>) {
    let f = t.forwarder_path().await;
    let e = t.exposer_peer().await.as_ref().and_then(PathView::of);
    (f, e)
}

/// Records in a [`Timeline`] each change of either agent's selected path.
#[derive(Default)]
pub struct PathWatch {
    forwarder: Option<String>,
    exposer: Option<String>,
}

impl PathWatch {
    /// Nothing seen yet: the first sample is a change.
    pub fn new() -> PathWatch {
        PathWatch::default()
    }

    /// Samples every `every` until the forwarder's path is of `kind`, at most `within`;
    /// returns when it was seen.
    pub async fn wait_kind(
        &mut self,
        t: &Tunnel,
        tl: &Timeline,
        kind: &str,
        within: Duration,
        every: Duration,
    ) -> Option<Instant> {
        self.wait_until(t, tl, within, every, |p| {
            p.as_ref().is_some_and(|p| p.kind == kind)
        })
        .await
    }

    /// Samples every `every` until the forwarder's path satisfies `want`, for up to
    /// `within`; when it did.
    pub async fn wait_until(
        &mut self,
        t: &Tunnel,
        tl: &Timeline,
        within: Duration,
        every: Duration,
        want: impl Fn(&Option<PathView>) -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let p = self.sample(t, tl).await;
            if want(&p) {
                return Some(Instant::now());
            }
            tokio::time::sleep(every).await;
        }
        None
    }

    /// Samples both agents; logs changes; returns the forwarder's path.
    pub async fn sample(&mut self, t: &Tunnel, tl: &Timeline) -> Option<PathView> {
        self.sample_both(t, tl).await.0
    }

    /// Samples both agents; logs changes; returns (the forwarder's, the exposer's) paths.
    pub async fn sample_both(
        &mut self,
        t: &Tunnel,
        tl: &Timeline,
    ) -> (Option<PathView>, Option<PathView>) {
        let (f, e) = sample_paths(t).await;
        let fk = f.as_ref().map(|p| format!("{} {}", p.kind, p.remote));
        let ek = e.as_ref().map(|p| format!("{} {}", p.kind, p.remote));
        if fk != self.forwarder {
            tl.event(format!("forwarder path -> {}", describe_path(&f)));
            self.forwarder = fk;
        }
        if ek != self.exposer {
            tl.event(format!("exposer path -> {}", describe_path(&e)));
            self.exposer = ek;
        }
        (f, e)
    }
}

// ---------------------------------------------------------------------------------------------
// Blocking traffic between two peers

/// The table this file adds to a router (apart from the lab's own `lab` and `labblock`, so
/// `Lab::block`/`unblock` never touch it).
const PEER_BLOCK_TABLE: &str = "lab_paths_peerblock";

/// What [`block_peer`] drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerTraffic {
    /// UDP only (S stays reachable, so the control connection and the relay keep working).
    Udp,
    /// UDP and TCP (no direct path of any kind).
    UdpAndTcp,
}

/// Drops `what` between `host` and `peer_ip` (the peer's public address) in `host`'s NAT
/// router: one `forward` chain at priority `filter - 20` in table `lab_paths_peerblock`, with
/// `ip saddr PEER … drop` and `ip daddr PEER … drop`. Traffic to S (another address) passes.
/// Forwarded packets are dropped after conntrack has seen them, so the NAT's mappings
/// toward the peer stay as they were.
pub fn block_peer(lab: &Lab, host: &Host, peer_ip: Ipv4Addr, what: PeerTraffic) {
    let router = lab
        .router_of(host)
        .expect("block_peer needs a host behind a NAT router");
    let protos: &[&str] = match what {
        PeerTraffic::Udp => &["udp"],
        PeerTraffic::UdpAndTcp => &["udp", "tcp"],
    };
    let mut script = format!(
        "table ip {PEER_BLOCK_TABLE} {{\n  chain forward {{ type filter hook forward priority filter - 20; policy accept; }}\n}}\nflush chain ip {PEER_BLOCK_TABLE} forward\n"
    );
    for p in protos {
        for dir in ["saddr", "daddr"] {
            let _ = writeln!(
                script,
                "add rule ip {PEER_BLOCK_TABLE} forward ip {dir} {peer_ip} meta l4proto {p} counter drop"
            );
        }
    }
    natlab::netns::nft(router.ns(), &script)
        .unwrap_or_else(|e| panic!("adding the peer block in {}: {e}", router.ns()));
}

/// Removes the rules of [`block_peer`].
pub fn unblock_peer(lab: &Lab, host: &Host) {
    let router = lab.router_of(host).expect("a host behind a NAT router");
    natlab::netns::nft(
        router.ns(),
        &format!("flush chain ip {PEER_BLOCK_TABLE} forward\n"),
    )
    .unwrap_or_else(|e| panic!("removing the peer block in {}: {e}", router.ns()));
}

/// The rules of [`block_peer`] with their counters, for the log.
pub fn peer_block_rules(lab: &Lab, host: &Host) -> String {
    let Some(router) = lab.router_of(host) else {
        return String::new();
    };
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            router.ns(),
            "nft",
            "list",
            "table",
            "ip",
            PEER_BLOCK_TABLE,
        ])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(nft list failed: {e})"),
    }
}

/// Empties the connection tracking table of `host`'s (innermost) NAT router, as a router
/// reboot does: every NAT mapping through it is gone, and the next packet of each flow gets
/// a new one (a new random port behind `hard`), while the peer's packets to the old one are
/// dropped. Returns when `conntrack -F` has done it.
pub fn flush_conntrack(lab: &Lab, host: &Host) {
    let router = lab
        .router_of(host)
        .expect("flush_conntrack needs a host behind a NAT router");
    let out = natlab::netns::command(router.ns(), "conntrack")
        .and_then(|mut c| c.arg("-F").output())
        .unwrap_or_else(|e| panic!("running conntrack -F in {}: {e}", router.ns()));
    assert!(
        out.status.success(),
        "conntrack -F in {} failed ({}): {}",
        router.ns(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Busy CPUs

/// Threads that spin to keep CPUs busy, until [`CpuHog::stop`], a drop, or `limit` after
/// the start, whichever comes first (so a failing test never leaves them running).
pub struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CpuHog {
    /// Starts `threads` spinning threads.
    pub fn start(threads: usize, limit: Duration) -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let end = Instant::now() + limit;
        let threads = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("cpu-hog-{i}"))
                    .spawn(move || {
                        let mut rounds = 0u64;
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                            // Some arithmetic the optimiser cannot drop, between clock reads.
                            for _ in 0..100_000 {
                                x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                            }
                            rounds += 1;
                        }
                        rounds
                    })
                    .expect("spawn a CPU hog thread")
            })
            .collect();
        CpuHog { stop, threads }
    }

    /// Stops the threads; returns how many rounds of work each did (to show they ran).
    pub fn stop(mut self) -> Vec<u64> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|t| t.join().unwrap_or(0))
            .collect()
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.halt();
    }
}

// ---------------------------------------------------------------------------------------------
// Interface counters

/// (received, sent) bytes of interface `ifname` in `host`'s namespace.
pub fn iface_bytes(host: &Host, ifname: &str) -> (u64, u64) {
    let text = host
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .expect("read /proc/thread-self/net/dev");
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if fields.len() >= 9 {
            return (fields[0], fields[8]);
        }
    }
    panic!("no interface {ifname} in {}:\n{text}", host.ns());
}

/// MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
