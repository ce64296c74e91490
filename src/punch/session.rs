//! The I/O driver of one introduction's checks: runs a [`Checker`] on the agent's socket
//! through the [`StunRouter`], and passes what it decides to the owner of the peer's paths.
//! Everything the checks decide is in [`super::checker`]; this module only moves packets and
//! time. It writes nothing but datagrams: installing paths is the owner's job.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::candidates::Families;
use super::checker::{Checker, Event};
use super::checks::{self, DEADLINE};
use super::router::{Response, StunRouter};
use super::symmetric::{self, Strategy};
use crate::proto::stun;
use crate::proto::{Credentials, Rendezvous};

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

/// A running punch: its checks go on, and the peer's checks under its credentials are
/// answered, until it is dropped or its checker ends ([`Event::Failed`], [`Event::Expired`]).
pub struct Punch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Punch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the checks of introduction `rv`; every [`Event`] goes to `events` tagged with
/// `id`. `strategy` adds probes for a peer behind a NAT that maps per destination
/// ([`Strategy::Predict`], [`Strategy::ProbeRandom`]).
pub fn start(
    router: &Arc<StunRouter>,
    rv: &Rendezvous,
    strategy: &Strategy,
    id: u64,
    events: mpsc::Sender<(u64, Event)>,
) -> Punch {
    let (router, rv, strategy) = (router.clone(), rv.clone(), strategy.clone());
    let task = tokio::spawn(async move {
        drive(&router, &rv, &strategy, |e| {
            let events = events.clone();
            async move { events.send((id, e)).await.is_ok() }
        })
        .await
    });
    Punch { task }
}

/// Runs one punch until it finds a path or fails, for callers that own the path themselves
/// (tests of the layers below the agent). The returned [`Punch`] keeps the path watched
/// and the peer's checks answered.
pub async fn find(
    router: &Arc<StunRouter>,
    rv: &Rendezvous,
    strategy: &Strategy,
) -> Result<(Punch, SocketAddr, Duration), PunchError> {
    let (tx, mut rx) = mpsc::channel(16);
    let punch = start(router, rv, strategy, 0, tx);
    while let Some((_, event)) = rx.recv().await {
        match event {
            Event::Found { remote, rtt } => return Ok((punch, remote, rtt)),
            Event::Failed { tried } => return Err(PunchError::NoPath { tried }),
            _ => {}
        }
    }
    Err(PunchError::NoPath { tried: 0 })
}

/// The driver loop: sends what the checker asks, feeds it what arrives and the time, and
/// hands its events to `emit` (which says whether anyone still listens).
async fn drive<F, Fut>(router: &Arc<StunRouter>, rv: &Rendezvous, strategy: &Strategy, emit: F)
where
    F: Fn(Event) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // The session is open before the wait, so the peer's early checks are answered.
    let mut session = router.open_session(&rv.credentials);
    let families = router
        .socket()
        .local()
        .map(Families::of)
        .unwrap_or(Families::V4);
    let targets = checks::plan(&rv.peer_candidates, families, false);
    // Primed at once and again at the start: the first while the peer has not started for
    // sure, the second in case the first was lost.
    prime(router, &targets, &rv.credentials).await;
    tokio::time::sleep(start_delay(rv)).await;
    prime(router, &targets, &rv.credentials).await;
    let started = Instant::now();
    let mut checker = Checker::new(
        &targets,
        started.into_std(),
        u32::from_be_bytes(session.prefix),
    );
    let mut probes = Probes::new(router, rv, strategy, started + symmetric::PROBE_AFTER);
    loop {
        let now = Instant::now().into_std();
        while let Some(t) = checker.poll_transmit(now) {
            let request = check_request(t.tid, &rv.credentials);
            if let Err(e) = router.socket().send_to(&request, t.to).await {
                tracing::trace!(to = %t.to, error = %e, "check not sent");
            }
        }
        while let Some(event) = checker.poll_event() {
            if !emit(event).await {
                return;
            }
        }
        if checker.is_done() {
            return;
        }
        let wake = checker
            .poll_timeout()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let probing = probes.is_active() && checker.is_checking();
        let next_probe = probes.next_at;
        tokio::select! {
            biased;
            Some(resp) = session.responses.recv() => {
                if is_valid_answer(&resp, &rv.credentials) {
                    checker.handle_response(resp.msg.transaction_id(), resp.from, Instant::now().into_std());
                }
            }
            Some(from) = session.checked_from.recv() => {
                checker.handle_check_from(from, Instant::now().into_std());
            }
            Some(resp) = probes.response(), if probing => {
                if let Some((remote, rtt)) = probes.accept(resp) {
                    tracing::info!(%remote, probes = probes.sent, "a probe through the peer's symmetric NAT was answered");
                    checker.handle_found(remote, rtt, Instant::now().into_std());
                }
            }
            _ = tokio::time::sleep_until(next_probe), if probing => probes.send_next().await,
            _ = tokio::time::sleep_until(wake) => checker.handle_timeout(Instant::now().into_std()),
        }
        if !checker.is_checking() && probes.is_active() {
            probes.stop();
        }
    }
}

/// A success response to one of our checks with the peer's integrity.
fn is_valid_answer(resp: &Response, creds: &Credentials) -> bool {
    stun::is_binding_success(&resp.msg) && stun::has_valid_integrity(&resp.msg, &creds.remote_pwd)
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

/// A connectivity check of the session: USERNAME `theirs:ours`, keyed by the peer's password.
/// The time to live of the priming checks: through this host's own router, and no further
/// than the next hop.
pub const PRIME_TTL: u8 = 2;

/// Opens this side's NAT toward every target without reaching the far NAT: one check to
/// each, sent with a time to live of [`PRIME_TTL`].
///
/// A router without an input firewall (many cheap CPEs) answers an unsolicited packet to
/// its WAN address by making a conntrack entry of its own for it; if the peer's first check
/// gets there before this host has sent anything to the peer, the router already holds
/// that flow, and this host's own checks from the same port are mapped to another public
/// port, so the two sides never meet. A check that dies on the way out still makes this
/// side's mapping, and the peer's checks then match it. The TTL of 2 gets through one NAT
/// (a home router), not through a carrier-grade NAT behind it, and expires at the next
/// router on the way, long before the peer's router on any real path (the lab puts an ISP
/// hop in front of such routers for the same reason). Checks a router answers (its ICMP
/// "time exceeded") and answers to primers that reached the peer anyway are of no use and
/// ignored: the primer's transaction is nobody's.
async fn prime(router: &StunRouter, targets: &[SocketAddr], creds: &Credentials) {
    for &to in targets {
        let request = check_request(stun::new_tid(), creds);
        if let Err(e) = router.socket().send_with_ttl(&request, to, PRIME_TTL).await {
            tracing::trace!(%to, error = %e, "priming check not sent");
        }
    }
}

pub(crate) fn check_request(tid: stun::Tid, creds: &Credentials) -> Vec<u8> {
    let username = format!("{}:{}", creds.remote_ufrag, creds.local_ufrag);
    stun::connectivity_check(tid, &username, &creds.remote_pwd)
}
