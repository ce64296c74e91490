//! The integration-test harness: S (`p2ptun-relay`) and `p2ptun` agents as processes or in
//! the test process, on 127.0.0.1 or on NAT-lab hosts, put together by the one bundle of
//! [`kit`] ([`Kit`] starts a [`Tunnel`]); in-process TCP services that check every byte by
//! SHA-256; bounded waits.
//!
//! - Modules: [`kit`] (tunnels), [`natlab`] (NAT routers and hosts in network namespaces),
//!   [`support`] (the NAT-lab tests' tunnels, paced transfers and drop rules), [`flood`]
//!   (hostile traffic toward S), [`etcd`] (a real etcd cluster on loopback), [`udp`] (UDP services: an echo service, a checked client,
//!   the agents' datagram counts). One crate, compiled once for every test binary.
//! - Binaries: the agent is `p2ptun` beside the test binary's `deps` folder, which cargo
//!   builds for the package's tests. The relay belongs to another package of the
//!   workspace, so cargo builds its library (a dependency, for S in the test process) but
//!   not its binary for p2ptun's tests; a test that starts S as a
//!   process has the harness run `cargo build --workspace` (same profile, same target
//!   directory) once per test binary, which is a no-op when `.ci/run` or the developer built
//!   the workspace first, and keeps a developer's `cargo test` from using a stale relay.
//!   `P2PTUN_TEST_AGENT_BIN` / `P2PTUN_TEST_RELAY_BIN` point the tests (and the benchmark)
//!   at other binaries (then nothing is built).
//! - Processes: each child's stdout and stderr go to a log file in the test's temp dir; the
//!   child is killed when its handle drops, also on panic, and then the last lines of its log
//!   are printed. A failed test keeps its temp dir and prints where it is.
//! - Services: [`Service`] speaks a tiny protocol chosen by a 24-byte header (echo, duplex
//!   stream, reply-after-EOF, sink) and reports what it received, so a test can check SHA-256
//!   digests of both directions.
//! - Every wait has a deadline; every address is 127.0.0.1 (or inside the NAT lab's
//!   namespaces, for a [`Place`] there).
//!
//! Environment: `P2PTUN_TEST_LOG` sets the children's `RUST_LOG` and the in-process parts'
//! log filter (default `info`);
//! `P2PTUN_TEST_KEEP=1` keeps every test's temp dir (a failed test's is always kept).

pub mod etcd;
pub mod flood;
pub mod kit;
pub mod natlab;
pub mod support;
pub mod udp;

pub use kit::*;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How long S may take to start answering.
pub const RELAY_START: Duration = Duration::from_secs(20);
/// How long an expose + forward pair may take until a round trip works.
pub const TUNNEL_READY: Duration = Duration::from_secs(20);
/// How long a one-shot command (`p2ptun id`, a refused start) may run.
pub const ONE_SHOT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Binaries

/// The agent binary: `p2ptun` beside the `deps` folder the running test binary lies in,
/// which cargo builds before it runs the package's tests.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("P2PTUN_TEST_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => bin_dir().join(format!("p2ptun{}", std::env::consts::EXE_SUFFIX)),
    }
}

/// Where cargo put this profile's binaries (`target/release`): test binaries and benchmarks
/// run from its `deps` folder.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test binary");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries lie in target/PROFILE/deps")
        .to_path_buf()
}

/// The relay binary, built (once per test binary) if needed; see the module doc.
pub fn relay_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_or_build_relay).clone()
}

fn find_or_build_relay() -> PathBuf {
    if let Some(p) = std::env::var_os("P2PTUN_TEST_RELAY_BIN") {
        return PathBuf::from(p);
    }
    let dir = bin_dir();
    let relay = dir.join(format!("p2ptun-relay{}", std::env::consts::EXE_SUFFIX));
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"));
    let mut cmd = Command::new(&cargo);
    // The same command as .ci/run's, so that it resolves the same features and is a no-op
    // after it.
    without_cargo_target_env(&mut cmd);
    cmd.args(["build", "--quiet", "--workspace"])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    // The target dir is the one this test binary was built in.
    if let Some(target) = dir.parent() {
        cmd.arg("--target-dir").arg(target);
    }
    cmd.stdin(Stdio::null());
    eprintln!("harness: building the relay: {cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            if relay.exists() {
                eprintln!(
                    "harness: WARNING: `cargo build --workspace` failed; using the existing \
                     (maybe stale) {}:\n{}",
                    relay.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            } else {
                panic!(
                    "cannot build p2ptun-relay ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Err(e) => {
            if !relay.exists() {
                panic!(
                    "cannot run {} to build p2ptun-relay ({e}); run `cargo build --workspace` \
                     first or set P2PTUN_TEST_RELAY_BIN",
                    cargo.display()
                );
            }
        }
    }
    assert!(
        relay.exists(),
        "{} does not exist after building p2ptun-relay",
        relay.display()
    );
    relay
}

// ---------------------------------------------------------------------------------------------
// Ports

/// A port on 127.0.0.1 that is free for both TCP and UDP (S uses one number for both).
///
/// Ports come from below the kernel's ephemeral range, one after another from a start that
/// depends on the process id. A port the kernel handed out for `bind(0)` is free only for a
/// moment: the next outgoing connection of any test running beside this one may take it as
/// its source port before the process it was meant for binds it (this failed a CI run).
/// Below the ephemeral range only explicit binds land, and within this process the counter
/// never hands a number out twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Far enough below 32768 (Linux's default first ephemeral port) for a test binary's
    // thousands of ports, and above the ports services usually bind.
    const FIRST: u32 = 16_384;
    const COUNT: u32 = 14_336;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        let tcp = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!(
        "no port in {FIRST}..{} is free for both UDP and TCP on 127.0.0.1",
        FIRST + COUNT
    );
}

// ---------------------------------------------------------------------------------------------
// Lab: the temp dir of one test

static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// One test's directory: state dirs, config files and logs.
pub struct Lab {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Lab {
    /// A fresh temp dir named after the test.
    pub fn new(test: &str) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix(&format!("p2ptun-{test}-"))
            .tempdir()
            .expect("create a temp dir");
        let path = dir.path().to_path_buf();
        fs::create_dir_all(path.join("logs")).expect("create logs dir");
        Lab {
            dir: Some(dir),
            path,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A state dir for `label` (not created: the program makes it).
    pub fn state_dir(&self, label: &str) -> PathBuf {
        self.path.join("state").join(label)
    }

    /// Where logs go.
    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }

    /// Writes `contents` to `name` in the lab and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Keeps the directory after the test (a failure the test reports without panicking);
    /// returns where it is.
    pub fn keep(mut self) -> PathBuf {
        match self.dir.take() {
            Some(dir) => dir.keep(),
            None => self.path.clone(),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let keep = std::env::var_os("P2PTUN_TEST_KEEP").is_some();
        if std::thread::panicking() || keep {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "harness: the test's files (logs, state) are kept in {}",
                    kept.display()
                );
            }
        }
    }
}

fn log_path(logs: &Path, label: &str) -> PathBuf {
    let n = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
    logs.join(format!("{label}.{n}.log"))
}

/// Removes ANSI escape sequences (colour codes) from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process whose output goes to a log file; killed on drop.
pub struct Proc {
    /// A name for messages.
    pub label: String,
    child: Mutex<Option<Child>>,
    status: Mutex<Option<ExitStatus>>,
    log_path: PathBuf,
}

/// The `RUST_LOG` a test's children get: the test's own variable `log_var` if set, else
/// `default_log`.
pub fn log_level(log_var: &str, default_log: &str) -> String {
    std::env::var(log_var).unwrap_or_else(|_| default_log.to_owned())
}

/// Sets the environment every child gets: no inherited p2ptun settings, plain log text, and
/// `RUST_LOG` from `log_var` (a test's own variable) or else `default_log`.
pub fn child_env(cmd: &mut Command, log_var: &str, default_log: &str) {
    child_env_level(cmd, &log_level(log_var, default_log));
}

/// [`child_env`] with `RUST_LOG=level`.
pub fn child_env_level(cmd: &mut Command, level: &str) {
    for var in [
        "P2PTUN_TOKEN",
        "P2PTUN_SERVER",
        "P2PTUN_STATE_DIR",
        "P2PTUN_SERVER_FINGERPRINT",
        "P2PTUN_RELAY_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", level)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1");
}

/// [`child_env`] with `P2PTUN_TEST_LOG`, default `info`.
fn clean_env(cmd: &mut Command) {
    child_env(cmd, "P2PTUN_TEST_LOG", "info");
}

/// What [`on_spawn`] set.
static ON_SPAWN: OnceLock<fn(u32)> = OnceLock::new();

/// Calls `hook` with the PID of every child [`Proc::spawn`] starts from now on (the
/// benchmark records them, to kill them on a signal). Once per process.
pub fn on_spawn(hook: fn(u32)) {
    let _ = ON_SPAWN.set(hook);
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to a new log file in `logs`.
    pub fn spawn(label: &str, mut cmd: Command, logs: &Path) -> Proc {
        let log_path = log_path(logs, label);
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        cmd.stdin(Stdio::null()).stdout(log2).stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        if let Some(hook) = ON_SPAWN.get() {
            hook(child.id());
        }
        Proc {
            label: label.to_owned(),
            child: Mutex::new(Some(child)),
            status: Mutex::new(None),
            log_path,
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().expect("lock").as_ref().map(|c| c.id())
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far, without colour codes, and with the test's temp
    /// dir written as `$LAB` (so that a word in the temp dir's name never matches a search).
    pub fn log(&self) -> String {
        let text = strip_ansi(&String::from_utf8_lossy(
            &fs::read(&self.log_path).unwrap_or_default(),
        ));
        // Logs live in LAB/logs/.
        match self.log_path.parent().and_then(Path::parent) {
            Some(lab) => text.replace(&*lab.to_string_lossy(), "$LAB"),
            None => text,
        }
    }

    /// The lines of the log that report a problem: tracing's WARN and ERROR lines, and lines
    /// starting with `error` (a fatal error as `main` prints it).
    pub fn problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| is_problem_line(l))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until a problem line (see [`Proc::problems`]) contains one of `needles`
    /// (case-insensitive); returns that line.
    pub async fn wait_problem(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for line in self.problems() {
                let lower = line.to_lowercase();
                if needles.iter().any(|n| lower.contains(&n.to_lowercase())) {
                    return Some(line);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The lines of the log that contain one of `needles` (case-insensitive).
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        let needles: Vec<String> = needles.iter().map(|n| n.to_lowercase()).collect();
        self.log()
            .lines()
            .filter(|l| {
                let lower = l.to_lowercase();
                needles.iter().any(|n| lower.contains(n))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The log tail with a heading, for failure messages.
    pub fn report(&self) -> String {
        let state = match self.exit_status() {
            Some(st) => format!("exited: {st}"),
            None => "running".to_owned(),
        };
        format!(
            "----- {} ({state}; log {}), last 60 lines -----\n{}\n----- end of {} -----",
            self.label,
            self.log_path.display(),
            self.tail(60),
            self.label
        )
    }

    /// One line naming the process, its state and its log file, for failure messages (the
    /// log's last lines are printed anyway when the handle drops during a panic).
    pub fn brief(&self) -> String {
        let state = match self.exit_status() {
            Some(st) => format!("exited: {st}"),
            None => "running".to_owned(),
        };
        format!(
            "[{} ({state}); its log: {}; last lines below]",
            self.label,
            self.log_path.display()
        )
    }

    /// The exit status, if the process has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().expect("lock");
        if status.is_none() {
            if let Some(child) = self.child.lock().expect("lock").as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    *status = Some(st);
                }
            }
        }
        *status
    }

    /// Sends SIGINT (what Ctrl-C sends), if the process has not been reaped yet; follow with
    /// [`Proc::wait_exit`].
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    /// Sends signal `sig` (e.g. `libc::SIGHUP`), if the process has not been reaped yet.
    pub fn signal(&self, sig: i32) {
        // The locks in the order `exit_status` takes them: while both are held and no status
        // was recorded, the child has not been reaped, so its PID is still its own.
        let status = self.status.lock().expect("lock");
        let mut child = self.child.lock().expect("lock");
        let Some(c) = child.as_mut() else { return };
        if status.is_some() || !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on our own child, still running and unreaped (above), with a
            // plain signal number.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Panics (with the log) if the process has ended.
    pub fn assert_running(&self, context: &str) {
        if let Some(st) = self.exit_status() {
            panic!(
                "{} exited ({st}) but should still run ({context})\n{}",
                self.label,
                self.brief()
            );
        }
    }

    /// Panics if the log shows a Rust panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        if let Some(at) = log.find("panicked") {
            let start = log[..at].rfind('\n').map_or(0, |i| i + 1);
            let excerpt: String = log[start..].lines().take(20).collect::<Vec<_>>().join("\n");
            panic!("{} panicked:\n{excerpt}\n{}", self.label, self.brief());
        }
    }

    /// Waits until the process ends; `None` if it still runs after `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exit_status() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the log contains one of `needles` (case-insensitive); returns the one seen.
    pub async fn wait_log_any(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log().to_lowercase();
            if let Some(n) = needles.iter().find(|n| log.contains(&n.to_lowercase())) {
                return Some((*n).to_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails with the log's last lines if the process has ended (for code that reports
    /// errors rather than panicking, such as the benchmark).
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        match self.exit_status() {
            None => Ok(()),
            Some(st) => bail!(
                "{} exited ({st}); last lines of {}:\n{}",
                self.label,
                self.log_path.display(),
                self.tail(15)
            ),
        }
    }

    /// Its resident memory (VmRSS) in KiB, while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// The CPU time it has used (user + system) in seconds, while it runs.
    pub fn cpu_secs(&self) -> Option<f64> {
        cpu_secs_of(self.pid()?)
    }

    /// How many file descriptors it holds, while it runs.
    pub fn fds(&self) -> Option<usize> {
        fs::read_dir(format!("/proc/{}/fd", self.pid()?))
            .ok()
            .map(|d| d.count())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = child.kill();
            if let Ok(st) = child.wait() {
                let mut status = self.status.lock().expect("lock");
                if status.is_none() {
                    *status = Some(st);
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            // Read the status before the kill, so the report says whether it had died.
            let report = self.report();
            self.kill();
            eprintln!("{report}");
        } else {
            self.kill();
        }
    }
}

/// The CPU time process `pid` has used (user + system) in seconds, from /proc/PID/stat.
pub fn cpu_secs_of(pid: u32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3; utime 14 and stime 15 (1-based, whole line).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / tck)
}

/// Whether a log line reports a problem: a tracing WARN/ERROR line or an `error...` line.
pub fn is_problem_line(line: &str) -> bool {
    let t = line.trim_start();
    t.to_lowercase().starts_with("error")
        || line.contains(" WARN ")
        || line.contains(" ERROR ")
        || t.starts_with("WARN")
}

/// Fails with every part's log if one of `procs` has ended.
pub fn assert_all_running<P: Runs + ?Sized>(procs: &[&P], context: &str) {
    for p in procs {
        if !p.is_running() {
            panic!("{} ended while {context}\n{}", p.label(), reports(procs));
        }
    }
}

/// One line per part for failure messages (see [`Proc::brief`]).
pub fn reports<P: Runs + ?Sized>(procs: &[&P]) -> String {
    procs
        .iter()
        .map(|p| p.brief())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The outcome of a command run to its end (or killed at its deadline).
#[derive(Debug)]
pub struct RunOutput {
    /// `None` if the command was killed because it ran past its deadline.
    pub status: Option<ExitStatus>,
    /// What it wrote on stdout.
    pub stdout: String,
    /// What it wrote on stderr (colour codes removed).
    pub stderr: String,
    /// The command line, for messages.
    pub cmdline: String,
}

impl RunOutput {
    /// The exit code; panics if the command timed out or died by a signal.
    pub fn code(&self) -> i32 {
        match self.status {
            None => panic!(
                "`{}` did not exit in time\n{}",
                self.cmdline,
                self.describe()
            ),
            Some(st) => st.code().unwrap_or_else(|| {
                panic!(
                    "`{}` died by a signal ({st})\n{}",
                    self.cmdline,
                    self.describe()
                )
            }),
        }
    }

    /// Everything, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }

    /// Asserts the command failed cleanly: exited (in time) non-zero, said something on stderr
    /// that contains every one of `needles` (case-insensitive), and did not panic.
    pub fn assert_clean_failure(&self, needles: &[&str]) {
        let code = self.code();
        assert_ne!(
            code,
            0,
            "`{}` should have failed\n{}",
            self.cmdline,
            self.describe()
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "`{}` panicked instead of failing with a message\n{}",
            self.cmdline,
            self.describe()
        );
        let lower = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr of `{}` should mention {n:?}\n{}",
                self.cmdline,
                self.describe()
            );
        }
    }
}

/// Runs `cmd` to its end, feeding it `stdin`, killing it after `timeout`. Output goes through
/// files in `logs` (so a hung command still shows what it said).
pub async fn run_command(
    label: &str,
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    logs: &Path,
) -> RunOutput {
    let cmdline = format!("{cmd:?}");
    let out_path = log_path(logs, &format!("{label}.stdout"));
    let err_path = log_path(logs, &format!("{label}.stderr"));
    let out = File::create(&out_path).expect("create stdout file");
    let err = File::create(&err_path).expect("create stderr file");
    cmd.stdout(out).stderr(err);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => Some(std::thread::spawn(move || {
            use std::io::Write;
            // The command may exit without reading everything; that is its business.
            let _ = pipe.write_all(&data);
        })),
        _ => None,
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    RunOutput {
        status,
        stdout: String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned(),
        stderr: strip_ansi(&String::from_utf8_lossy(
            &fs::read(&err_path).unwrap_or_default(),
        )),
        cmdline,
    }
}

/// Runs `p2ptun ARGS` (no flags added) with a clean environment; see [`run_command`].
pub async fn run_p2ptun(lab: &Lab, args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args);
    clean_env(&mut cmd);
    run_command("p2ptun-run", cmd, None, ONE_SHOT, &lab.logs()).await
}

// ---------------------------------------------------------------------------------------------
// STUN and fingerprints

/// Sends one STUN Binding request (RFC 8489) and waits for the matching response.
pub async fn stun_ping(sock: &tokio::net::UdpSocket, to: SocketAddr, wait: Duration) -> bool {
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&0x0001u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    let txid: [u8; 12] = rand::random();
    req.extend_from_slice(&txid);
    if sock.send_to(&req, to).await.is_err() {
        return false;
    }
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                if n >= 20 && buf[0] & 0xC0 == 0 && buf[8..20] == txid {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

/// The first `SHA256:` + 43 base64 characters in `text`.
pub fn find_fingerprint(text: &str) -> Option<String> {
    let mut rest = text;
    while let Some(i) = rest.find("SHA256:") {
        let cand = &rest[i..];
        let digest: String = cand[7..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '+' || *c == '/')
            .collect();
        if digest.len() == 43 {
            return Some(format!("SHA256:{digest}"));
        }
        rest = &rest[i + 7..];
    }
    None
}

/// Whether `s` is exactly a fingerprint as `p2ptun id` prints it.
pub fn is_fingerprint(s: &str) -> bool {
    find_fingerprint(s).as_deref() == Some(s)
}

// ---------------------------------------------------------------------------------------------
// Agent status

/// How long one agent's status socket may take to answer.
pub const STATUS_WAIT: Duration = Duration::from_secs(3);

/// The status of every agent running with `state_dir`, as `p2ptun status --json` prints it
/// (one entry per agent), read from their status sockets (`agent-PID.sock`) the way the CLI
/// reads them. Blocks, at most [`STATUS_WAIT`] per read; async code uses [`agent_status`].
/// An error if a socket does not answer or answers no JSON; empty if no agent runs.
pub fn agent_status_blocking(state_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    for path in p2ptun::agent::socket::sockets(state_dir)? {
        let mut body = Vec::new();
        let mut sock = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        // Saying nothing and closing our side asks for the status.
        sock.shutdown(std::net::Shutdown::Write)?;
        sock.set_read_timeout(Some(STATUS_WAIT))?;
        sock.read_to_end(&mut body)
            .with_context(|| format!("{}: no answer", path.display()))?;
        out.push(
            serde_json::from_slice(&body)
                .with_context(|| format!("{}: status JSON", path.display()))?,
        );
    }
    Ok(out)
}

/// [`agent_status_blocking`] on tokio's blocking threads.
pub async fn agent_status(state_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = state_dir.to_owned();
    tokio::task::spawn_blocking(move || agent_status_blocking(&dir))
        .await
        .context("status task")?
}

// ---------------------------------------------------------------------------------------------
// Seeded data and digests

/// The size of the chunks data is made and copied in.
pub const CHUNK: usize = 64 * 1024;

/// A deterministic stream of pseudo-random bytes (splitmix64), cheap enough for debug builds.
pub struct DataGen {
    state: u64,
    left: u64,
    buf: Vec<u8>,
}

impl DataGen {
    /// `len` bytes from `seed`.
    pub fn new(seed: u64, len: u64) -> DataGen {
        DataGen {
            state: seed ^ 0x5DEE_CE66_D1CE_4E5B,
            left: len,
            buf: vec![0u8; CHUNK],
        }
    }

    /// The next chunk (at most [`CHUNK`] bytes), or `None` at the end.
    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        for word in self.buf.chunks_exact_mut(8) {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Some(&self.buf[..n])
    }
}

/// SHA-256 of the `len` bytes of `seed`.
pub fn data_digest(seed: u64, len: u64) -> [u8; 32] {
    let mut gen = DataGen::new(seed, len);
    let mut h = Sha256::new();
    while let Some(c) = gen.next_chunk() {
        h.update(c);
    }
    h.finalize().into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Writes the `len` bytes of `seed` to `w`, counting into `progress`; returns their digest.
pub async fn send_data<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    progress: Option<&AtomicU64>,
) -> std::io::Result<[u8; 32]> {
    let mut gen = DataGen::new(seed, len);
    let mut h = Sha256::new();
    while let Some(c) = gen.next_chunk() {
        h.update(c);
        w.write_all(c).await?;
        if let Some(p) = progress {
            p.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
    }
    w.flush().await?;
    Ok(h.finalize().into())
}

/// Reads `r` to EOF; returns the digest and the byte count.
pub async fn hash_to_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    progress: Option<&AtomicU64>,
) -> std::io::Result<([u8; 32], u64)> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((h.finalize().into(), total));
        }
        h.update(&buf[..n]);
        total += n as u64;
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Reads exactly `len` bytes; returns their digest. An early EOF is an error saying how far
/// it got.
pub async fn hash_exact<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> anyhow::Result<[u8; 32]> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut got = 0u64;
    while got < len {
        let want = (len - got).min(CHUNK as u64) as usize;
        let n = r
            .read(&mut buf[..want])
            .await
            .with_context(|| format!("reading after {got} of {len} bytes"))?;
        if n == 0 {
            bail!("the connection ended after {got} of {len} bytes");
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    Ok(h.finalize().into())
}

// ---------------------------------------------------------------------------------------------
// The test service

const SVC_MAGIC: [u8; 4] = *b"TSVC";

/// What the service does on a connection; chosen by the client's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Echo everything until EOF, then close.
    Echo = 1,
    /// At once send `len` bytes of `seed` while hashing what arrives; after both, send the
    /// trailer (SHA-256 of what was sent, SHA-256 of what was received) and close.
    Duplex = 2,
    /// Read to EOF first; then send `len` bytes of `seed` and the trailer, and close.
    Reply = 3,
    /// Shut the write side at once, then read to EOF; the digest is kept in the
    /// service's [`ConnProgress`] for `seed`.
    Sink = 4,
}

/// The header a client sends first: magic, mode, 3 zero bytes, seed, len (big-endian).
pub fn header(mode: Mode, seed: u64, len: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..4].copy_from_slice(&SVC_MAGIC);
    h[4] = mode as u8;
    h[8..16].copy_from_slice(&seed.to_be_bytes());
    h[16..24].copy_from_slice(&len.to_be_bytes());
    h
}

/// What the service has done on the connection of one seed.
#[derive(Debug, Default)]
pub struct ConnProgress {
    /// Bytes written so far.
    pub sent: AtomicU64,
    /// Bytes read so far.
    pub received: AtomicU64,
    /// The connection was served to its end.
    pub done: AtomicBool,
    /// SHA-256 of what was received, once EOF was read.
    pub received_digest: Mutex<Option<[u8; 32]>>,
    /// Why serving failed, if it did.
    pub error: Mutex<Option<String>>,
}

#[derive(Default)]
struct ServiceState {
    conns: Mutex<HashMap<u64, Arc<ConnProgress>>>,
    accepted: AtomicUsize,
}

impl ServiceState {
    fn progress(&self, seed: u64) -> Arc<ConnProgress> {
        self.conns
            .lock()
            .expect("lock")
            .entry(seed)
            .or_default()
            .clone()
    }
}

/// The in-process TCP service on 127.0.0.1:0 (see [`Mode`]).
pub struct Service {
    addr: SocketAddr,
    state: Arc<ServiceState>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Starts it on the current tokio runtime.
    pub async fn start() -> Service {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the test service");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(ServiceState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so dropping the service ends them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                        let st = st.clone();
                        conns.spawn(async move { serve(stream, st).await });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Service { addr, state, task }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// The progress of the connection that sent `seed` (made empty if none did yet).
    pub fn progress(&self, seed: u64) -> Arc<ConnProgress> {
        self.state.progress(seed)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, state: Arc<ServiceState>) {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let mut hdr = [0u8; 24];
    if r.read_exact(&mut hdr).await.is_err() || hdr[..4] != SVC_MAGIC {
        return;
    }
    let seed = u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let len = u64::from_be_bytes(hdr[16..24].try_into().expect("8 bytes"));
    let mode = hdr[4];
    if mode == Mode::Echo as u8 {
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
        return;
    }
    let prog = state.progress(seed);
    let result: std::io::Result<()> = async {
        if mode == Mode::Duplex as u8 {
            let (received, sent) = tokio::try_join!(
                hash_to_eof(&mut r, Some(&prog.received)),
                send_data(&mut w, seed, len, Some(&prog.sent)),
            )?;
            *prog.received_digest.lock().expect("lock") = Some(received.0);
            w.write_all(&sent).await?;
            w.write_all(&received.0).await?;
            w.shutdown().await?;
        } else if mode == Mode::Reply as u8 {
            let received = hash_to_eof(&mut r, Some(&prog.received)).await?;
            *prog.received_digest.lock().expect("lock") = Some(received.0);
            let sent = send_data(&mut w, seed, len, Some(&prog.sent)).await?;
            w.write_all(&sent).await?;
            w.write_all(&received.0).await?;
            w.shutdown().await?;
        } else if mode == Mode::Sink as u8 {
            w.shutdown().await?;
            let received = hash_to_eof(&mut r, Some(&prog.received)).await?;
            *prog.received_digest.lock().expect("lock") = Some(received.0);
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => prog.done.store(true, Ordering::SeqCst),
        Err(e) => *prog.error.lock().expect("lock") = Some(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Connects to 127.0.0.1:`port` (5 s limit).
pub async fn connect(port: u16) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await
    .map_err(|_| anyhow!("connecting to 127.0.0.1:{port} took over 5 s"))?
    .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// What a checked transfer measured.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes sent.
    pub up: u64,
    /// Bytes received.
    pub down: u64,
    /// Time from the header to the end.
    pub elapsed: Duration,
}

impl Transfer {
    /// MiB/s of the larger direction.
    pub fn mib_per_s(&self) -> f64 {
        self.up.max(self.down) as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64()
    }
}

/// On `stream`, asks the service for `mode` (Duplex or Reply) with `down` = (seed, len) and
/// sends `up` = (seed, len) of its own, shutting its write side after; then checks what came
/// back by SHA-256 against the service's trailer, both directions, and that the service then
/// closed.
pub async fn transfer(
    stream: TcpStream,
    mode: Mode,
    up: (u64, u64),
    down: (u64, u64),
) -> anyhow::Result<Transfer> {
    let start = Instant::now();
    let (mut r, mut w) = stream.into_split();
    let writer = async {
        w.write_all(&header(mode, down.0, down.1)).await?;
        let digest = send_data(&mut w, up.0, up.1, None).await?;
        w.shutdown().await?;
        anyhow::Ok(digest)
    };
    let reader = async {
        let got = hash_exact(&mut r, down.1)
            .await
            .context("receiving the service's data")?;
        let mut trailer = [0u8; 64];
        r.read_exact(&mut trailer)
            .await
            .context("receiving the service's digests (the trailer after the data)")?;
        let mut extra = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut extra))
            .await
            .map_err(|_| anyhow!("the connection did not end after the trailer"))?
            .context("reading the end of the connection")?;
        ensure!(n == 0, "bytes after the trailer");
        anyhow::Ok((got, trailer))
    };
    let (sent_digest, (got, trailer)) = tokio::try_join!(writer, reader)?;
    ensure!(
        got[..] == trailer[..32],
        "the {} bytes that arrived differ from what the service sent: SHA-256 {} != {}",
        down.1,
        hex(&got),
        hex(&trailer[..32])
    );
    ensure!(
        sent_digest[..] == trailer[32..],
        "the service received other bytes than the {} sent: SHA-256 {} != {}",
        up.1,
        hex(&trailer[32..]),
        hex(&sent_digest)
    );
    Ok(Transfer {
        up: up.1,
        down: down.1,
        elapsed: start.elapsed(),
    })
}

/// Connects to `port` and runs [`transfer`].
pub async fn transfer_via(
    port: u16,
    mode: Mode,
    up: (u64, u64),
    down: (u64, u64),
) -> anyhow::Result<Transfer> {
    transfer(connect(port).await?, mode, up, down).await
}

/// A long-lived echo connection.
pub struct EchoConn {
    stream: TcpStream,
    rounds: u64,
}

impl EchoConn {
    /// Connects and asks for echo.
    pub async fn open(port: u16) -> anyhow::Result<EchoConn> {
        let mut stream = connect(port).await?;
        stream.write_all(&header(Mode::Echo, 0, 0)).await?;
        Ok(EchoConn { stream, rounds: 0 })
    }

    /// Sends `n` random bytes and expects them back within `wait`.
    pub async fn ping(&mut self, n: usize, wait: Duration) -> anyhow::Result<()> {
        let data: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
        let round = async {
            self.stream.write_all(&data).await?;
            let mut back = vec![0u8; n];
            self.stream.read_exact(&mut back).await?;
            anyhow::Ok(back)
        };
        let back = tokio::time::timeout(wait, round)
            .await
            .map_err(|_| anyhow!("no echo of {n} bytes within {wait:?}"))??;
        ensure!(back == data, "the echo differs from what was sent");
        self.rounds += 1;
        Ok(())
    }

    /// Round trips done.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Shuts the write side and expects the service's EOF back.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.stream.shutdown().await?;
        expect_eof(&mut self.stream).await
    }
}

/// An [`EchoConn`] pinged in the background (each round trip answered within 10 s, for at
/// most 180 s in all) while a test breaks things around it.
pub struct Pinger {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<EchoConn>>,
}

impl Pinger {
    /// Starts pinging `conn` with `size` bytes every `every`.
    pub fn start(mut conn: EchoConn, size: usize, every: Duration) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(conn.rounds()));
        let task = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(180);
                while !stop.load(Ordering::SeqCst) {
                    ensure!(
                        Instant::now() < deadline,
                        "the pinger ran out of its 180 s before the test stopped it"
                    );
                    conn.ping(size, Duration::from_secs(10))
                        .await
                        .map_err(|e| e.context(format!("ping {}", conn.rounds())))?;
                    rounds.store(conn.rounds(), Ordering::SeqCst);
                    tokio::time::sleep(every).await;
                }
                anyhow::Ok(conn)
            })
        };
        Pinger { stop, rounds, task }
    }

    /// Round trips so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Whether it still pings (no round trip has failed).
    pub fn is_alive(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops pinging; the connection, or the error of the round trip that failed.
    pub async fn finish(self) -> anyhow::Result<EchoConn> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .map_err(|_| anyhow!("the pinger did not stop within 30 s"))?
            .map_err(|e| anyhow!("the pinger task failed: {e}"))?
    }
}

/// After shutting down a connection's write side: the service's EOF within 10 s, with no
/// byte before it.
pub async fn expect_eof<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<()> {
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf))
        .await
        .map_err(|_| anyhow!("no EOF within 10 s after shutting down the write side"))??;
    ensure!(
        n == 0,
        "{n} unexpected bytes after shutting down the write side"
    );
    Ok(())
}

/// One echo round trip on a new connection, all within `wait`.
pub async fn echo_once(port: u16, wait: Duration) -> anyhow::Result<()> {
    tokio::time::timeout(wait, async {
        let mut c = EchoConn::open(port).await?;
        c.ping(64, wait).await?;
        c.close().await
    })
    .await
    .map_err(|_| anyhow!("no echo round trip within {wait:?}"))?
}

/// Waits until a fresh connection to 127.0.0.1:`port` does an echo round trip, failing with
/// every log of `procs` if that does not happen within `timeout` or one of them exits.
pub async fn wait_tunnel<P: Runs + ?Sized>(port: u16, procs: &[&P], timeout: Duration) {
    if let Err(e) = try_wait_tunnel(port, procs, timeout).await {
        panic!("{e:#}\n{}", reports(procs));
    }
}

/// [`wait_tunnel`] that returns how long it took, or an error saying what went wrong.
pub async fn try_wait_tunnel<P: Runs + ?Sized>(
    port: u16,
    procs: &[&P],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if let Some(gone) = procs.iter().find(|p| !p.is_running()) {
            bail!(
                "{} ended while waiting for the tunnel on port {port}",
                gone.label()
            );
        }
        let last = match echo_once(port, Duration::from_secs(5)).await {
            Ok(()) => {
                eprintln!(
                    "harness: tunnel on port {port} ready after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                return Ok(start.elapsed());
            }
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!(
                "no echo round trip through 127.0.0.1:{port} within {timeout:?}; last error: \
                 {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How a connection ended when the test expected it to be refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// Orderly EOF.
    Eof,
    /// Reset or another error.
    Error(String),
}

/// Connects to `port` (retrying refused connects until `timeout`, for a forward that is still
/// binding), sends an echo request and a few bytes, and expects the connection to be closed
/// without a single byte coming back, within `timeout`.
pub async fn expect_closed(port: u16, timeout: Duration) -> anyhow::Result<Closed> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match connect(port).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // Writing may already fail if the far side was quick; that counts as closed.
    let _ = stream.write_all(&header(Mode::Echo, 0, 0)).await;
    let _ = stream.write_all(b"anyone there?").await;
    let mut buf = [0u8; 64];
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, stream.read(&mut buf)).await {
        Err(_) => bail!("the connection stayed open for {timeout:?}; expected it to be closed"),
        Ok(Ok(0)) => Ok(Closed::Eof),
        Ok(Ok(n)) => bail!(
            "expected the connection to be closed, but {n} bytes came back: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Ok(Err(e)) => Ok(Closed::Error(e.to_string())),
    }
}

/// Runs `f` with a deadline, failing the test with `what` if it takes longer.
pub async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} took longer than {limit:?}"),
    }
}

/// Whether `program` is installed: it runs with `arg` (e.g. `--version`) and succeeds.
pub fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this process runs as root (effective uid 0), read from /proc.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Skips a test that cannot run here, or fails it under CI (`CI=true`), where everything it
/// needs must be installed.
pub fn skip_or_fail(reason: &str) {
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("cannot run under CI: {reason}");
    }
    println!("SKIPPED: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// Removes what cargo sets for the target it runs (this test or bench) from `cmd`'s
/// environment: build scripts that watch one of these (ring's watches CARGO_MANIFEST_DIR)
/// would otherwise be rerun, and everything above them rebuilt, every time the build is
/// invoked from here and then again from a shell.
pub fn without_cargo_target_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let per_target = matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        ) || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_");
        if per_target {
            cmd.env_remove(key);
        }
    }
}
