//! One punch: checks every candidate pair of a session until one answers, and installs the
//! best as the peer's direct path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::checks::{self, DEADLINE, PACING, SETTLE};
use super::router::{SessionHandle, StunRouter};
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

/// Runs the connectivity checks of session `rv` and installs the best answered pair as the
/// direct path of the peer at virtual address `virt`.
///
/// Checks that reach *us* count too: their source proves the peer gets through from there,
/// so it becomes a path at once (QUIC can answer on it) and a new pair to check — this is how
/// a port chosen by the peer's NAT is learnt (a peer-reflexive candidate, RFC 8445 §7.3.1.3).
pub async fn punch(
    router: &Arc<StunRouter>,
    virt: SocketAddr,
    rv: &Rendezvous,
) -> Result<Punched, PunchError> {
    let mut session = router.open_session(&rv.credentials);
    tokio::time::sleep(Duration::from_millis(rv.start_in_ms).min(MAX_START_DELAY)).await;

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

    let mut answered: Vec<(SocketAddr, Duration)> = Vec::new();
    let mut settle_at: Option<Instant> = None;
    loop {
        let until = settle_at.unwrap_or(deadline);
        tokio::select! {
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
    let Some((remote, rtt)) = checks::best(&answered) else {
        return Err(PunchError::NoPath {
            tried: checking.len(),
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

fn add_path(router: &StunRouter, virt: SocketAddr, remote: SocketAddr, rtt: Option<Duration>) {
    router
        .socket()
        .table_write()
        .add_udp_path(virt, remote, rtt);
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
    let username = format!("{}:{}", creds.remote_ufrag, creds.local_ufrag);
    let request = stun::connectivity_check(tid, &username, &creds.remote_pwd);
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
