//! Facts about this host and this process that both benchmarks need: the machine, the
//! children they may signal, RLIMIT_NOFILE. Included by `#[path]` from `benches/tunnel.rs`
//! and `benches/load.rs` (each bench target is a crate of its own).

// Each bench uses its own subset.
#![allow(dead_code)]

/// What the machine is.
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_gib: Option<f64>,
}

/// The machine's cores, CPU model, kernel and memory, from /proc.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib as f64 / (1024.0 * 1024.0));
    Machine {
        nproc,
        cpu_model,
        kernel,
        mem_gib,
    }
}

/// The load average (1, 5, 15 minutes).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Datagrams the kernel dropped for a full socket receive buffer, on all UDP sockets of
/// this network namespace so far (`RcvbufErrors` in /proc/net/snmp): read before and after
/// a phase, the difference says whether a socket overflowed meanwhile (any process's).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Whether `pid` is a child of this process not yet reaped: a PID recorded earlier and
/// reused since by another process is never signalled.
pub fn is_our_child(pid: u32) -> bool {
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            // After the command name: state, then the parent's PID.
            let rest = &t[t.rfind(')')? + 2..];
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        });
    parent == Some(std::process::id())
}

/// Raises RLIMIT_NOFILE (soft, and hard when allowed); returns the soft limit now.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let mut new = lim;
        new.rlim_max = lim.rlim_max.max(want as libc::rlim_t);
        new.rlim_cur = want as libc::rlim_t;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
            new.rlim_max = lim.rlim_max;
            new.rlim_cur = lim.rlim_max.min(want as libc::rlim_t);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &new);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    #[allow(clippy::unnecessary_cast)]
    let soft = lim.rlim_cur as u64;
    soft
}

/// Runs `cleanup` on a thread of its own at the first SIGINT, SIGTERM or SIGHUP, then exits
/// with 130. Call it before any child exists, so that no signal slips through.
pub fn on_interrupt(thread: &str, cleanup: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new()
        .name(thread.to_owned())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
            });
            cleanup();
            std::process::exit(130);
        })?;
    Ok(())
}
