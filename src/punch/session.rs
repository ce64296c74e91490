//! One punch: checks every candidate pair of a session until one answers, and installs the
//! best as the peer's direct path.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::checks::{self, DEADLINE, PACING, SETTLE};
use super::router::{Response, SessionHandle, StunRouter};
use super::symmetric::{self, Strategy};
use crate::proto::stun;
use crate::proto::{Credentials, Rendezvous};

/// A path found by a punch.
pub struct Punched {
    /// The peer's address on it.
    pub remote: SocketAddr,
    /// The check's round-trip time.
    pub rtt: Duration,
    /// Keeps answering the peer's checks; drop it when the connection ends.
    pub session: SessionHandle,
    /// Keeps checking the path (and marks it dead or live); stops when dropped.
    pub monitor: super::monitor::AbortOnDrop,
}

/// Why a punch found no path.
#[derive(Debug, thiserror::Error)]
pub enum PunchError {
    /// No check was answered before the deadline.
    #[error(
        "no direct path to the peer: none of its {tried} candidate address(es) answered within {}s \
         (both NATs may map per destination, or UDP is blocked)", DEADLINE.as_secs()
    )]
    NoPath {
        /// How many addresses were checked.
        tried: usize,
    },
}

/// Longest start delay obeyed, whatever S says.
const MAX_START_DELAY: Duration = Duration::from_secs(2);

/// How long to wait before checking, as S asked (within reason).
pub fn start_delay(rv: &Rendezvous) -> Duration {
    Duration::from_millis(rv.start_in_ms).min(MAX_START_DELAY)
}

/// Runs the connectivity checks of session `rv` and installs the best answered pair as the
/// direct path of the peer at virtual address `virt`.
///
/// Checks that reach *us* count too: their source proves the peer gets through from there,
/// so it becomes a path at once (QUIC can answer on it) and a new pair to check — this is how
/// a port chosen by the peer's NAT is learnt (a peer-reflexive candidate, RFC 8445 §7.3.1.3).
///
/// `strategy` adds probes for a peer behind a NAT that maps per destination
/// ([`Strategy::Predict`], [`Strategy::ProbeRandom`]); other strategies change nothing here.
pub async fn punch(
    router: &Arc<StunRouter>,
    virt: SocketAddr,
    rv: &Rendezvous,
    strategy: &Strategy,
) -> Result<Punched, PunchError> {
    let mut session = router.open_session(&rv.credentials);
    tokio::time::sleep(start_delay(rv)).await;

    let ipv4 = router.socket().local().map(|a| a.is_ipv4()).unwrap_or(true);
    let targets = checks::plan(&rv.peer_candidates, ipv4, false);
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let mut checking: HashSet<SocketAddr> = HashSet::new();
    let mut tasks = JoinSet::new();
    for (i, to) in targets.iter().enumerate() {
        checking.insert(*to);
        let start = started + PACING * i as u32;
        tasks.spawn(check(
            router.clone(),
            *to,
            rv.credentials.clone(),
            start,
            deadline,
        ));
    }

    let mut probes = Probes::new(router, rv, strategy, started + symmetric::PROBE_AFTER);
    let mut answered: Vec<(SocketAddr, Duration)> = Vec::new();
    let mut settle_at: Option<Instant> = None;
    loop {
        let until = settle_at.unwrap_or(deadline);
        let probing = answered.is_empty() && probes.is_active();
        tokio::select! {
            _ = tokio::time::sleep_until(probes.next_at), if probing => probes.send_next().await,
            Some(resp) = probes.response(), if probing => {
                if let Some(pair) = probes.accept(resp) {
                    tracing::info!(remote = %pair.0, probes = probes.sent, "a probe through the peer's symmetric NAT was answered");
                    answered.push(pair);
                    settle_at.get_or_insert(Instant::now() + SETTLE);
                }
            }
            done = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(Ok(Some(pair))) = done {
                    tracing::debug!(remote = %pair.0, rtt = ?pair.1, "check answered");
                    answered.push(pair);
                    settle_at.get_or_insert(Instant::now() + SETTLE);
                }
            }
            Some(from) = session.checked_from.recv() => {
                add_path(router, virt, from, None);
                if checking.len() < checks::MAX_CANDIDATES * 2 && checking.insert(from) {
                    tracing::debug!(%from, "checking a peer-reflexive address");
                    let now = Instant::now();
                    tasks.spawn(check(router.clone(), from, rv.credentials.clone(), now, deadline));
                }
            }
            _ = tokio::time::sleep_until(until) => break,
        }
        if tasks.is_empty() && answered.is_empty() && settle_at.is_none() {
            // Every pair gave up; only a late check from the peer could still help.
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    tasks.abort_all();
    probes.stop();
    let Some((remote, rtt)) = checks::best(&answered) else {
        return Err(PunchError::NoPath {
            tried: checking.len() + probes.sent,
        });
    };
    add_path(router, virt, remote, Some(rtt));
    let monitor = tokio::spawn(super::monitor::watch(
        router.clone(),
        virt,
        remote,
        rv.credentials.clone(),
    ));
    Ok(Punched {
        remote,
        rtt,
        session,
        monitor: super::monitor::AbortOnDrop(monitor),
    })
}

/// The extra checks toward a peer behind a NAT that maps per destination: predicted ports, or
/// random ones at [`symmetric::PROBE_RATE`], one at a time. They all carry one transaction,
/// so the first answer from any of them completes it.
struct Probes<'a> {
    router: &'a Arc<StunRouter>,
    creds: &'a Credentials,
    /// Predicted addresses still to probe, or the address whose random ports are probed.
    targets: ProbeTargets,
    next_at: Instant,
    interval: Duration,
    tid: stun::Tid,
    request: Vec<u8>,
    waiting: Option<tokio::sync::oneshot::Receiver<Response>>,
    sent_at: HashMap<SocketAddr, Instant>,
    sent: usize,
}

enum ProbeTargets {
    None,
    /// Predicted addresses, checked in turn and then again, as retransmits.
    Predicted(Vec<SocketAddr>),
    Random(std::net::IpAddr, symmetric::RandomPorts),
}

impl<'a> Probes<'a> {
    fn new(
        router: &'a Arc<StunRouter>,
        rv: &'a Rendezvous,
        strategy: &Strategy,
        start: Instant,
    ) -> Self {
        let targets = match strategy {
            Strategy::Predict(addrs) => ProbeTargets::Predicted(addrs.clone()),
            Strategy::ProbeRandom(ip) => ProbeTargets::Random(*ip, Default::default()),
            _ => ProbeTargets::None,
        };
        let tid = stun::new_tid();
        Probes {
            router,
            creds: &rv.credentials,
            targets,
            next_at: start,
            interval: Duration::from_secs(1) / symmetric::PROBE_RATE,
            tid,
            request: check_request(tid, &rv.credentials),
            waiting: None,
            sent_at: HashMap::new(),
            sent: 0,
        }
    }

    fn is_active(&self) -> bool {
        !matches!(self.targets, ProbeTargets::None)
    }

    /// Sends the next probe and schedules the one after.
    async fn send_next(&mut self) {
        let to = match &mut self.targets {
            ProbeTargets::None => return,
            ProbeTargets::Predicted(addrs) => addrs.get(self.sent % addrs.len().max(1)).copied(),
            ProbeTargets::Random(ip, ports) => ports
                .next(&mut rand::thread_rng())
                .map(|port| SocketAddr::new(*ip, port)),
        };
        let Some(to) = to else {
            self.stop();
            return;
        };
        self.next_at += self.interval;
        self.sent += 1;
        self.sent_at.insert(to, Instant::now());
        if self.waiting.is_none() {
            self.waiting = self.router.send_request(self.tid, &self.request, to).await;
        } else if let Err(e) = self.router.socket().send_to(&self.request, to).await {
            tracing::trace!(%to, error = %e, "probe not sent");
        }
    }

    /// The answer to any probe, when it comes.
    async fn response(&mut self) -> Option<Response> {
        match &mut self.waiting {
            Some(rx) => {
                let resp = rx.await.ok();
                self.waiting = None;
                resp
            }
            None => std::future::pending().await,
        }
    }

    /// Takes an answer as a path if it is a valid answer from an address probed.
    fn accept(&mut self, resp: Response) -> Option<(SocketAddr, Duration)> {
        // The transaction is used up either way; later probes start a new one.
        self.router.forget(&self.tid);
        self.tid = stun::new_tid();
        self.request = check_request(self.tid, self.creds);
        let sent = self.sent_at.get(&resp.from)?;
        let valid = stun::is_binding_success(&resp.msg)
            && stun::has_valid_integrity(&resp.msg, &self.creds.remote_pwd);
        valid.then(|| (resp.from, sent.elapsed()))
    }

    fn stop(&mut self) {
        self.targets = ProbeTargets::None;
        self.waiting = None;
        self.router.forget(&self.tid);
    }
}

fn add_path(router: &StunRouter, virt: SocketAddr, remote: SocketAddr, rtt: Option<Duration>) {
    router
        .socket()
        .table_write()
        .add_udp_path(virt, remote, rtt);
}

/// A connectivity check of the session: USERNAME `theirs:ours`, keyed by the peer's password.
pub(crate) fn check_request(tid: stun::Tid, creds: &Credentials) -> Vec<u8> {
    let username = format!("{}:{}", creds.remote_ufrag, creds.local_ufrag);
    stun::connectivity_check(tid, &username, &creds.remote_pwd)
}

/// Checks one pair from `start` until answered or `deadline`: `Some((remote, rtt))` when a
/// response with valid integrity came back from the address the check went to.
pub(crate) async fn check(
    router: Arc<StunRouter>,
    to: SocketAddr,
    creds: Credentials,
    start: Instant,
    deadline: Instant,
) -> Option<(SocketAddr, Duration)> {
    tokio::time::sleep_until(start).await;
    let tid = stun::new_tid();
    let request = check_request(tid, &creds);
    let first = Instant::now();
    let mut last_sent = first;
    let mut rx = router.send_request(tid, &request, to).await?;
    let mut n = 1;
    let result = loop {
        let next = (first + checks::send_offset(n)).min(deadline);
        tokio::select! {
            resp = &mut rx => {
                let Ok(resp) = resp else { break None };
                let valid = stun::is_binding_success(&resp.msg)
                    && stun::has_valid_integrity(&resp.msg, &creds.remote_pwd)
                    && resp.from == to;
                break valid.then(|| (to, last_sent.elapsed()));
            }
            _ = tokio::time::sleep_until(next) => {
                if next >= deadline {
                    break None;
                }
                last_sent = Instant::now();
                let _ = router.socket().send_to(&request, to).await;
                n += 1;
            }
        }
    };
    router.forget(&tid);
    result
}
