//! A small STUN responder for the lab and a blocking Binding client, built on
//! `p2ptun::proto::stun`. Enough to observe a NAT's mapping from inside the lab without S.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use p2ptun::proto::stun;

use super::Host;

/// Answers Binding requests on some UDP addresses of one lab host (usually S) with
/// XOR-MAPPED-ADDRESS = the request's source. Stops on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    answered: Arc<AtomicU64>,
}

impl Responder {
    /// Binds `addrs` inside `host`'s namespace and answers on each from its own thread.
    pub fn start(host: &Host, addrs: &[SocketAddr]) -> io::Result<Responder> {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let mut responder = Responder {
            stop: stop.clone(),
            threads: Vec::new(),
            answered: answered.clone(),
        };
        for &addr in addrs {
            let sock = host.udp_bind(addr)?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let stop = stop.clone();
            let answered = answered.clone();
            responder.threads.push(
                std::thread::Builder::new()
                    .name(format!("natlab-stun:{addr}"))
                    .spawn(move || serve(sock, addr, &stop, &answered))?,
            );
        }
        Ok(responder)
    }

    /// How many requests were answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(sock: UdpSocket, local: SocketAddr, stop: &AtomicBool, answered: &AtomicU64) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(msg) = stun::decode(&buf[..n]) else {
            continue;
        };
        if !stun::is_binding_request(&msg) {
            continue;
        }
        let extras = stun::ResponseExtras {
            response_origin: Some(local),
            other_address: None,
        };
        let reply = stun::binding_success(msg.transaction_id(), from, extras, None, 512);
        if sock.send_to(&reply, from).is_ok() {
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends Binding requests from `sock` to `server` (up to `attempts`, waiting `wait` for each)
/// and returns the mapped address of the first matching answer, or `None`. Other datagrams
/// arriving meanwhile are discarded.
pub fn binding(
    sock: &UdpSocket,
    server: SocketAddr,
    wait: Duration,
    attempts: u32,
) -> io::Result<Option<SocketAddr>> {
    let mut buf = [0u8; 1500];
    for _ in 0..attempts {
        let tid = stun::new_tid();
        // A failed send (e.g. EPERM from a local drop rule) counts as a lost request.
        let _ = sock.send_to(&stun::binding_request(tid, None), server);
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))?;
            let n = match sock.recv_from(&mut buf) {
                Ok((n, _)) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                // ICMP errors on an unconnected socket (rare on Linux): keep waiting.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            };
            let Ok(msg) = stun::decode(&buf[..n]) else {
                continue;
            };
            if stun::is_binding_success(&msg) && msg.transaction_id() == tid {
                return Ok(stun::mapped_address(&msg));
            }
        }
    }
    Ok(None)
}
