//! Network-namespace plumbing: entering a namespace on a thread, running programs in one,
//! `ip` batches, `nft` scripts, sysctls, and removing namespaces left by dead test processes.
//!
//! Nothing here touches the root namespace's configuration: `ip -n NS`, `nft` and sysctl
//! writes all act inside a named namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Every namespace the lab creates starts with this, then `<pid>-<lab number>-<role>`.
pub const PREFIX: &str = "p2pl-";

/// Opens a named namespace (a file under /run/netns).
pub fn open(ns: &str) -> io::Result<File> {
    File::open(Path::new(NETNS_DIR).join(ns))
        .map_err(|e| io::Error::new(e.kind(), format!("netns {ns}: {e}")))
}

/// Moves the calling thread into the namespace `file` refers to. Per thread: other threads of
/// the process stay where they are.
pub fn enter(file: &File) -> io::Result<()> {
    // SAFETY: setns on a file descriptor we own; it only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result. Sockets opened
/// by `f` stay in that namespace after it returns. A panic in `f` is passed on.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> io::Result<T> {
    let file = open(ns)?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("natlab:{ns}"))
            .spawn_scoped(s, move || -> io::Result<T> {
                enter(&file)?;
                drop(file);
                Ok(f())
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Makes `cmd` start inside namespace `ns` (a `setns` between fork and exec, so the command's
/// own stdio, environment and working directory settings stay as they are).
pub fn prepare(cmd: &mut Command, ns: &str) -> io::Result<()> {
    let file = Arc::new(open(ns)?);
    // SAFETY: the closure only calls setns (async-signal-safe) and reads errno.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A command for `program` that will run inside namespace `ns`.
pub fn command(ns: &str, program: impl AsRef<OsStr>) -> io::Result<Command> {
    let mut cmd = Command::new(program);
    prepare(&mut cmd, ns)?;
    Ok(cmd)
}

/// Runs a command with `input` on stdin; an error carries its stderr.
fn run_with_input(mut cmd: Command, what: &str, input: &str) -> io::Result<()> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}\ninput:\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs `ip` commands (one per line, without the leading `ip`) in namespace `ns`.
pub fn ip_batch(ns: &str, cmds: &[String]) -> io::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-batch", "-"]);
    run_with_input(
        cmd,
        &format!("ip -n {ns} -batch"),
        &(cmds.join("\n") + "\n"),
    )
}

/// Loads an nftables script into namespace `ns` (atomically, as `nft -f` does).
pub fn nft(ns: &str, script: &str) -> io::Result<()> {
    let mut cmd = command(ns, "nft")?;
    cmd.args(["-f", "-"]);
    run_with_input(cmd, &format!("nft -f - (in {ns})"), script)
}

/// The output of `nft list ruleset` in `ns` (for debugging).
pub fn nft_list(ns: &str) -> io::Result<String> {
    let mut cmd = command(ns, "nft")?;
    cmd.args(["list", "ruleset"]);
    let out = cmd.output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes sysctls (paths under /proc/sys, with dots or slashes) inside `ns`. `required`
/// ones must exist; `optional` ones are skipped when the kernel lacks them.
pub fn sysctls(
    ns: &str,
    required: &[(&str, String)],
    optional: &[(&str, String)],
) -> io::Result<()> {
    let write = |key: &str, value: &str| -> io::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value} in {ns}: {e}")))
    };
    run_in(ns, || -> io::Result<()> {
        for (k, v) in required {
            write(k, v)?;
        }
        for (k, v) in optional {
            let _ = write(k, v);
        }
        Ok(())
    })?
}

/// Reads a sysctl inside `ns`.
pub fn read_sysctl(ns: &str, key: &str) -> io::Result<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run_in(ns, || std::fs::read_to_string(&path))?.map(|s| s.trim().to_owned())
}

/// Creates a named namespace.
pub fn add(ns: &str) -> io::Result<()> {
    let out = Command::new("ip").args(["netns", "add", ns]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip netns add {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Deletes a named namespace (the kernel frees it once no process, thread or socket uses it).
pub fn del(ns: &str) -> io::Result<()> {
    let out = Command::new("ip").args(["netns", "del", ns]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip netns del {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether a named namespace exists.
pub fn exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// All named namespaces that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Removes lab namespaces whose creating process is gone (the PID after [`PREFIX`] does not
/// exist): kills what still runs in them, then deletes them. Returns the names removed.
pub fn remove_stale() -> Vec<String> {
    let me = std::process::id();
    let stale: Vec<String> = list(PREFIX)
        .into_iter()
        .filter(|name| {
            let pid = name[PREFIX.len()..]
                .split('-')
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|pid| pid != me && !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    kill_all_in_any(&stale);
    let mut removed = Vec::new();
    for name in stale {
        // Another process may be removing it at the same time.
        match del(&name) {
            Ok(()) => removed.push(name),
            Err(e) if exists(&name) => eprintln!("natlab: removing stale namespace: {e}"),
            Err(_) => {}
        }
    }
    removed
}

/// Kills (SIGKILL) every process whose network namespace is one of `names`, in one pass over
/// /proc; returns how many.
pub fn kill_all_in_any(names: &[String]) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ids: Vec<(u64, u64)> = names
        .iter()
        .filter_map(|n| std::fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if ids.is_empty() {
        return 0;
    }
    let me = std::process::id() as i32;
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for entry in proc_dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 1 || pid == me {
            continue;
        }
        let Ok(m) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if ids.contains(&(m.dev(), m.ino())) {
            // SAFETY: plain kill(2) of a process inside a namespace this lab owns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            n += 1;
        }
    }
    n
}

/// One line of `ip -o link show` per interface name.
fn link_lines(ns: &str) -> io::Result<Vec<(String, String)>> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let name = line.split_whitespace().nth(1).unwrap_or("");
            let name = name.trim_end_matches(':').split('@').next().unwrap_or("");
            (name.to_owned(), line.to_owned())
        })
        .collect())
}

/// Polls `ip -o link show` in `ns` until `ready` holds for each of `ifaces`.
fn wait_links(
    ns: &str,
    ifaces: &[&str],
    timeout: Duration,
    ready: impl Fn(&str) -> bool,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = link_lines(ns)?;
        let pending: Vec<&str> = ifaces
            .iter()
            .copied()
            .filter(|want| !lines.iter().any(|(name, line)| name == want && ready(line)))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "interfaces {pending:?} in {ns} not ready after {timeout:?}:\n{}",
                    text.join("\n")
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the veth interfaces `ifaces` of `ns` are operationally up (the kernel does
/// that asynchronously; a bridge enables a port only then). Quick: veth changes are urgent
/// for the kernel's link watcher.
pub fn wait_up(ns: &str, ifaces: &[&str], timeout: Duration) -> io::Result<()> {
    wait_links(ns, ifaces, timeout, |line| line.contains(" state UP "))
}

/// Waits until bridge `bridge` of `ns` has carrier and a working qdisc (not `noop`).
pub fn wait_bridge(ns: &str, bridge: &str, timeout: Duration) -> io::Result<()> {
    wait_links(ns, &[bridge], timeout, |line| {
        line.contains("LOWER_UP") && !line.contains("qdisc noop")
    })
}

/// Sends ICMPv6 echo requests from namespace `ns` to `target` (one every 100 ms) until one
/// is answered or `timeout` passes. The first packets to a new neighbour can be lost while
/// neighbour discovery runs; after an answer, every neighbour on the path is resolved.
pub fn wait_ping6(ns: &str, target: std::net::Ipv6Addr, timeout: Duration) -> io::Result<()> {
    use std::mem;
    use std::os::fd::{FromRawFd, OwnedFd};
    run_in(ns, || -> io::Result<()> {
        // SAFETY: plain socket(2).
        let raw = unsafe {
            libc::socket(
                libc::AF_INET6,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMPV6,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a pointer to a live timeval and its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
        let mut to: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        to.sin6_addr.s6_addr = target.octets();
        let id = (std::process::id() as u16) ^ 0x6c61;
        let deadline = Instant::now() + timeout;
        let mut seq: u16 = 0;
        let mut last_err = None;
        while Instant::now() < deadline {
            seq = seq.wrapping_add(1);
            // Echo request: type 128, code 0, checksum (the kernel fills it in), id, seq.
            let mut req = [
                128u8, 0, 0, 0, 0, 0, 0, 0, b'n', b'a', b't', b'l', b'a', b'b',
            ];
            req[4..6].copy_from_slice(&id.to_be_bytes());
            req[6..8].copy_from_slice(&seq.to_be_bytes());
            // SAFETY: sendto with a live buffer and sockaddr_in6 and their sizes.
            let sent = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    req.as_ptr() as *const libc::c_void,
                    req.len(),
                    0,
                    &to as *const libc::sockaddr_in6 as *const libc::sockaddr,
                    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            };
            if sent < 0 {
                last_err = Some(io::Error::last_os_error());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let turn_end = Instant::now() + Duration::from_millis(100);
            while Instant::now() < turn_end {
                let mut buf = [0u8; 1500];
                // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
                let mut from: libc::sockaddr_in6 = unsafe { mem::zeroed() };
                let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                // SAFETY: recvfrom into live buffers with their sizes.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                        &mut from as *mut libc::sockaddr_in6 as *mut libc::sockaddr,
                        &mut len,
                    )
                };
                if n < 0 {
                    break;
                }
                let n = n as usize;
                if n >= 8
                    && buf[0] == 129
                    && buf[4..6] == id.to_be_bytes()
                    && from.sin6_addr.s6_addr == target.octets()
                {
                    return Ok(());
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no ICMPv6 echo reply from {target} in {ns} after {timeout:?}{}",
                last_err
                    .map(|e| format!(" (last send error: {e})"))
                    .unwrap_or_default()
            ),
        ))
    })?
}

/// One connection-tracking entry (from `/proc/net/nf_conntrack` of a namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// "udp", "tcp", "icmp", …
    pub proto: String,
    /// The original direction: source, destination.
    pub orig: (std::net::SocketAddr, std::net::SocketAddr),
    /// The reply direction: source, destination (the NAT's choice shows here).
    pub reply: (std::net::SocketAddr, std::net::SocketAddr),
    /// Whether no reply was seen yet.
    pub unreplied: bool,
}

/// The conntrack entries (with ports: UDP, TCP) of namespace `ns`.
pub fn conntrack(ns: &str) -> io::Result<Vec<CtEntry>> {
    // /proc/net follows the namespace of the process's main thread; thread-self, this thread's.
    let text = run_in(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")
    })??;
    Ok(text.lines().filter_map(parse_ct_line).collect())
}

fn parse_ct_line(line: &str) -> Option<CtEntry> {
    let mut words = line.split_whitespace();
    let _family = words.next()?;
    let _family_num = words.next()?;
    let proto = words.next()?.to_owned();
    let mut src = Vec::new();
    let mut dst = Vec::new();
    let mut sport = Vec::new();
    let mut dport = Vec::new();
    let mut unreplied = false;
    for w in words {
        if w == "[UNREPLIED]" {
            unreplied = true;
        }
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        match k {
            "src" => src.push(v.parse::<std::net::IpAddr>().ok()?),
            "dst" => dst.push(v.parse::<std::net::IpAddr>().ok()?),
            "sport" => sport.push(v.parse::<u16>().ok()?),
            "dport" => dport.push(v.parse::<u16>().ok()?),
            _ => {}
        }
    }
    if src.len() < 2 || dst.len() < 2 || sport.len() < 2 || dport.len() < 2 {
        return None;
    }
    let sa = std::net::SocketAddr::new;
    Some(CtEntry {
        proto,
        orig: (sa(src[0], sport[0]), sa(dst[0], dport[0])),
        reply: (sa(src[1], sport[1]), sa(dst[1], dport[1])),
        unreplied,
    })
}
