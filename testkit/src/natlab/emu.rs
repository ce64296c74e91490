//! The link emulator: delay and loss on one link, in user space, because this kernel has no
//! `netem` and no NFQUEUE.
//!
//! A "link" namespace holds two veth ends without addresses, `to-nat` (peered with the NAT's or
//! public host's WAN interface) and `to-inet` (peered with a port of the internet bridge). One
//! thread of the test process enters that namespace, opens an AF_PACKET raw socket on each
//! end and copies every frame read on one to the other after `delay`, dropping a `loss` share
//! of the IPv4 and IPv6 frames (ARP and IPv6 neighbour discovery are delayed, never dropped,
//! so the neighbour tables settle).
//!
//! The sockets use `PACKET_VNET_HDR`: each frame comes with its virtio-net header (checksum
//! offload and GSO state) and goes out with it, so partially checksummed or GSO frames cross
//! the emulator intact. `PACKET_IGNORE_OUTGOING` (and a check of `sll_pkttype`) keeps the
//! emulator from reading back what it sent. The loop polls with a bounded timeout and ends
//! when its stop flag is set (on drop).

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns;
use super::Shaping;

const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_OUTGOING: u8 = 4;
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;
/// Size of `struct virtio_net_hdr`, prefixed to every frame read and written.
const VNET_HDR_LEN: usize = 10;
/// Frames waiting per direction before the emulator tail-drops.
const MAX_QUEUE: usize = 8192;
/// Frames read per socket per loop turn.
const READ_BURST: usize = 256;

/// Counters of one emulated link. Direction 0 is up (from the NAT/host to the internet),
/// 1 is down.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub forwarded: [AtomicU64; 2],
    pub lost: [AtomicU64; 2],
    pub overflow: [AtomicU64; 2],
    pub send_errors: [AtomicU64; 2],
    pub max_frame: AtomicU64,
}

/// A snapshot of [`LinkCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames forwarded (up, down).
    pub forwarded: [u64; 2],
    /// Frames dropped by the loss setting (up, down).
    pub lost: [u64; 2],
    /// Frames dropped because the delay queue was full (up, down).
    pub overflow: [u64; 2],
    /// Frames the kernel refused to send (up, down).
    pub send_errors: [u64; 2],
    /// The largest frame seen, in bytes (without the virtio-net header).
    pub max_frame: u64,
}

impl LinkCounters {
    pub fn snapshot(&self) -> LinkStats {
        let two = |a: &[AtomicU64; 2]| [a[0].load(Ordering::Relaxed), a[1].load(Ordering::Relaxed)];
        LinkStats {
            forwarded: two(&self.forwarded),
            lost: two(&self.lost),
            overflow: two(&self.overflow),
            send_errors: two(&self.send_errors),
            max_frame: self.max_frame.load(Ordering::Relaxed),
        }
    }
}

/// A running link emulator; stops (and joins its thread) on drop.
pub struct Emulator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<LinkCounters>,
}

impl Emulator {
    /// Starts an emulator in namespace `ns` between interfaces `ifs[0]` (up side) and
    /// `ifs[1]`. Returns once both sockets are open.
    pub fn start(ns: &str, ifs: [&str; 2], shaping: Shaping) -> io::Result<Emulator> {
        let file = netns::open(ns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(LinkCounters::default());
        let (tx, rx) = mpsc::channel::<io::Result<()>>();
        let names = [ifs[0].to_owned(), ifs[1].to_owned()];
        let seed = seed_from(ns);
        let thread = {
            let stop = stop.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name(format!("natlab-emu:{ns}"))
                .spawn(move || {
                    let opened = open_pair(file, &names);
                    match opened {
                        Ok(socks) => {
                            let _ = tx.send(Ok(()));
                            run(&socks, shaping, &stop, &counters, seed);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })?
        };
        let mut emu = Emulator {
            stop,
            thread: Some(thread),
            counters,
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(emu),
            Ok(Err(e)) => {
                emu.stop();
                Err(e)
            }
            Err(_) => {
                emu.stop();
                Err(io::Error::other(format!(
                    "link emulator in {ns} did not start"
                )))
            }
        }
    }

    /// What the emulator has done so far.
    pub fn stats(&self) -> LinkStats {
        self.counters.snapshot()
    }

    /// Stops the thread and waits for it (it notices within one poll timeout, 20 ms).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("natlab: link emulator thread panicked");
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the loss setting applies to an Ethernet frame: IPv4, and IPv6 except neighbour
/// discovery (ICMPv6 types 133–137 right after the fixed header), so that, as with ARP, the
/// neighbour tables settle.
fn may_lose(eth: &[u8]) -> bool {
    match eth.get(12..14) {
        Some([0x08, 0x00]) => true,
        Some([0x86, 0xdd]) => {
            let next_header = eth.get(14 + 6).copied();
            let icmp_type = eth.get(14 + 40).copied().unwrap_or(0);
            !(next_header == Some(58) && (133..=137).contains(&icmp_type))
        }
        _ => false,
    }
}

fn seed_from(ns: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ns.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h ^ nanos) | 1
}

/// xorshift64*: enough randomness to decide which frames to lose.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct PacketSock {
    fd: OwnedFd,
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PacketSock {
    /// An AF_PACKET raw socket on `ifname` of the calling thread's namespace.
    fn open(ifname: &str) -> io::Result<PacketSock> {
        // Protocol 0: receives nothing until bound to the interface below.
        // SAFETY: plain socket(2).
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt_int(&fd, SOL_PACKET, PACKET_VNET_HDR, 1)?;
        // Older kernels lack it; `sll_pkttype` is checked as well.
        let _ = setsockopt_int(&fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        let _ = setsockopt_int(&fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20);
        let _ = setsockopt_int(&fd, libc::SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20);
        let name = CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {ifname} in the link namespace"),
            ));
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: bind with a pointer to a live sockaddr_ll and its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSock { fd })
    }

    /// One frame (with its virtio-net header) and its packet type; `None` when nothing waits.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, u8)>> {
        // SAFETY: as above.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom into a live buffer of the given length.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some((n as usize, sll.sll_pkttype)))
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send from a live buffer; the socket is bound, so no address is needed.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn open_pair(file: File, names: &[String; 2]) -> io::Result<[PacketSock; 2]> {
    netns::enter(&file)?;
    drop(file);
    Ok([PacketSock::open(&names[0])?, PacketSock::open(&names[1])?])
}

fn run(
    socks: &[PacketSock; 2],
    shaping: Shaping,
    stop: &AtomicBool,
    counters: &LinkCounters,
    seed: u64,
) {
    let delay = Duration::from_millis(shaping.delay_ms);
    let loss = (shaping.loss_pct / 100.0).clamp(0.0, 1.0);
    let mut rng = Rng(seed);
    let mut queues: [VecDeque<(Instant, Vec<u8>)>; 2] = Default::default();
    let mut buf = vec![0u8; 1 << 17];
    let send = |d: usize, frame: &[u8]| match socks[1 - d].send(frame) {
        Ok(()) => {
            counters.forwarded[d].fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            counters.send_errors[d].fetch_add(1, Ordering::Relaxed);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for (d, queue) in queues.iter_mut().enumerate() {
            while queue.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, frame)) = queue.pop_front() {
                    send(d, &frame);
                }
            }
        }
        let mut wait = Duration::from_millis(20);
        for queue in &queues {
            if let Some((due, _)) = queue.front() {
                wait = wait.min(due.saturating_duration_since(now));
            }
        }
        let mut pfds = [
            libc::pollfd {
                fd: socks[0].fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: socks[1].fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout_ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: poll on two live descriptors.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
        if r <= 0 {
            continue;
        }
        for d in 0..2 {
            let revents = pfds[d].revents;
            if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                && revents & libc::POLLIN == 0
            {
                // The interface is going away (lab teardown): don't spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if revents & libc::POLLIN == 0 {
                continue;
            }
            for _ in 0..READ_BURST {
                let (n, pkttype) = match socks[d].recv(&mut buf) {
                    Ok(Some(got)) => got,
                    Ok(None) | Err(_) => break,
                };
                if pkttype == PACKET_OUTGOING || n < VNET_HDR_LEN + 14 {
                    continue;
                }
                counters
                    .max_frame
                    .fetch_max((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                let frame = &mut buf[..n];
                // Only NEEDS_CSUM means anything on transmit.
                frame[0] &= 1;
                if loss > 0.0 && may_lose(&frame[VNET_HDR_LEN..]) && rng.next_f64() < loss {
                    counters.lost[d].fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if delay.is_zero() {
                    send(d, frame);
                } else if queues[d].len() >= MAX_QUEUE {
                    counters.overflow[d].fetch_add(1, Ordering::Relaxed);
                } else {
                    queues[d].push_back((Instant::now() + delay, frame.to_vec()));
                }
            }
        }
    }
}
