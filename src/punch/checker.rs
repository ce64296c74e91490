//! The connectivity checks of one introduction as a state machine without I/O, in the way
//! quinn-proto keeps QUIC: it is told what arrived and what time it is, and answers what to
//! send now and when it next needs to wake. The driver ([`super::session`]) only moves
//! packets; everything that decides — pacing, retransmits, admission of peer-reflexive
//! addresses, nomination, liveness of the chosen path, giving up — lives here and is tested
//! on simulated time against a second machine, with loss, delay and reordering.
//!
//! A checker goes through two phases. **Checking**: each candidate pair is checked, paced
//! [`PACING`] apart and retransmitted on [`send_offset`]'s schedule until [`DEADLINE`]; a
//! valid check the peer sends from an address we do not know admits that address as a new
//! pair, checked at once (a peer-reflexive candidate, RFC 8445 §7.3.1.3). After the first
//! answer it waits [`SETTLE`] for a faster one and nominates the fastest. **Watching**: the
//! nominated path is checked every [`INTERVAL`]; these checks are also the keepalive that holds
//! both NATs open. Unanswered for [`DEAD_AFTER`], the path is dead; answered again, it is
//! revived. While it is dead, a valid check from the peer at a new address (its NAT picked a
//! new port) is checked, and if answered the checker moves to it. Dead for [`GIVE_UP`], the
//! checker expires and its owner drops it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_codec::TransactionId;

use super::checks::{send_offset, DEADLINE, MAX_CANDIDATES, PACING, SETTLE};

/// Time between two keepalive checks of the nominated path.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// How long the nominated path may go without an answer before it is dead: about four
/// rounds of checks (each with retransmits) must all go unanswered, so that a path carrying
/// a saturating transfer — whose checks may wait behind bulk data in queues on the way — is
/// not declared dead for a late answer, while a path that really died (a NAT that lost its
/// state) hands over in time for a re-punch to bring it back within seconds.
pub const DEAD_AFTER: Duration = Duration::from_secs(2);

/// How long a dead path is still checked (it may come back: a link that was cut, a Wi-Fi
/// that roamed back) before the checker gives up.
pub const GIVE_UP: Duration = Duration::from_secs(60);

/// Sends of one keepalive round, [`ROUND_SPACING`] apart while unanswered: at 10% loss each
/// way a round is lost about once in a thousand, at 30% once in fifteen.
const ROUND_SENDS: u32 = 4;

/// Time between the sends of a keepalive round.
const ROUND_SPACING: Duration = Duration::from_millis(100);

/// Most pairs a checker keeps: its candidates and the peer-reflexive addresses it admits.
/// Bounds what a peer can make us send.
pub const MAX_PAIRS: usize = MAX_CANDIDATES * 2;

/// A check to send: a Binding request with the session's credentials and this ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub to: SocketAddr,
    /// Its transaction ID (the same for a pair's retransmits).
    pub tid: TransactionId,
}

/// What the checker tells its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The checks chose a path: the peer answers from `remote` in about `rtt`.
    Found {
        /// The peer's address on the path.
        remote: SocketAddr,
        /// The round-trip time of the check that proved it.
        rtt: Duration,
    },
    /// A keepalive of the live path was answered.
    Rtt {
        /// The path.
        remote: SocketAddr,
        /// The round-trip time of that check.
        rtt: Duration,
    },
    /// The path went unanswered for [`DEAD_AFTER`].
    Dead {
        /// The path.
        remote: SocketAddr,
    },
    /// A dead path answered again.
    Revived {
        /// The path.
        remote: SocketAddr,
        /// The round-trip time of the check.
        rtt: Duration,
    },
    /// The dead path was given up for a new address of the peer (its NAT's new port), which
    /// answers; `Found` for that address follows.
    Moved {
        /// The address given up.
        from: SocketAddr,
    },
    /// No pair answered before the deadline. Final.
    Failed {
        /// How many addresses were checked.
        tried: usize,
    },
    /// The path stayed dead for [`GIVE_UP`]. Final.
    Expired {
        /// The path.
        remote: SocketAddr,
    },
}

/// Transaction IDs: a random prefix and a counter, so they never repeat within a checker and
/// a test can make them deterministic.
#[derive(Debug)]
struct Tids {
    prefix: [u8; 4],
    next: u64,
}

impl Tids {
    fn next(&mut self) -> TransactionId {
        self.next += 1;
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&self.prefix);
        id[4..].copy_from_slice(&self.next.to_be_bytes());
        TransactionId::new(id)
    }
}

/// One transaction toward one address, with its retransmit schedule.
#[derive(Debug)]
struct Probe {
    to: SocketAddr,
    tid: TransactionId,
    /// When the first send is due.
    start: Instant,
    /// Sends so far.
    sent: u32,
    /// Most sends (`u32::MAX`: until the deadline).
    max_sends: u32,
    /// Evenly spaced sends, or (`None`) [`send_offset`]'s backoff.
    spacing: Option<Duration>,
    last_sent: Option<Instant>,
}

impl Probe {
    fn new(to: SocketAddr, tid: TransactionId, start: Instant, max_sends: u32) -> Probe {
        Probe {
            to,
            tid,
            start,
            sent: 0,
            max_sends,
            spacing: None,
            last_sent: None,
        }
    }

    /// A keepalive round: [`ROUND_SENDS`] sends, [`ROUND_SPACING`] apart.
    fn round(to: SocketAddr, tid: TransactionId, start: Instant) -> Probe {
        Probe {
            spacing: Some(ROUND_SPACING),
            ..Probe::new(to, tid, start, ROUND_SENDS)
        }
    }

    /// When the next send is due, if any is left.
    fn next_send(&self) -> Option<Instant> {
        let offset = match self.spacing {
            Some(spacing) => spacing * self.sent,
            None => send_offset(self.sent),
        };
        (self.sent < self.max_sends).then(|| self.start + offset)
    }

    /// Sends if due before `until`.
    fn poll(&mut self, now: Instant, until: Instant) -> Option<Transmit> {
        let due = self.next_send()?;
        if due > now || due >= until {
            return None;
        }
        self.sent += 1;
        self.last_sent = Some(now);
        Some(Transmit {
            to: self.to,
            tid: self.tid,
        })
    }

    /// The round-trip time of an answer at `now` (timed from the latest send: an answer to
    /// an earlier one makes it look shorter, never longer).
    fn rtt(&self, now: Instant) -> Duration {
        self.last_sent
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default()
    }
}

#[derive(Debug)]
enum Phase {
    Checking {
        pairs: Vec<Probe>,
        answered: Vec<(SocketAddr, Duration)>,
        settle_at: Option<Instant>,
        /// Every address ever checked, for the failure report and the admission bound.
        tried: usize,
    },
    Watching(Watch),
    Done,
}

#[derive(Debug)]
struct Watch {
    remote: SocketAddr,
    live: bool,
    last_answer: Instant,
    /// This round's transaction, and the previous round's (a late answer still counts).
    round: Probe,
    previous: Option<TransactionId>,
    next_round: Instant,
    /// Checks toward new addresses of the peer while the path is dead.
    rebinds: Vec<Probe>,
}

/// The connectivity checks of one introduction. See the module doc.
#[derive(Debug)]
pub struct Checker {
    phase: Phase,
    deadline: Instant,
    tids: Tids,
    events: VecDeque<Event>,
}

impl Checker {
    /// Checks `targets` (best first, as [`super::checks::plan`] orders them), the first at
    /// `start`. `seed` makes the transaction IDs; give it a random value.
    pub fn new(targets: &[SocketAddr], start: Instant, seed: u32) -> Checker {
        let mut tids = Tids {
            prefix: seed.to_be_bytes(),
            next: 0,
        };
        let pairs: Vec<Probe> = targets
            .iter()
            .take(MAX_PAIRS)
            .enumerate()
            .map(|(i, to)| Probe::new(*to, tids.next(), start + PACING * i as u32, u32::MAX))
            .collect();
        Checker {
            deadline: start + DEADLINE,
            phase: Phase::Checking {
                tried: pairs.len(),
                pairs,
                answered: Vec::new(),
                settle_at: None,
            },
            tids,
            events: VecDeque::new(),
        }
    }

    /// The nominated path and whether it is live, once there is one.
    pub fn path(&self) -> Option<(SocketAddr, bool)> {
        match &self.phase {
            Phase::Watching(w) => Some((w.remote, w.live)),
            _ => None,
        }
    }

    /// Whether the checker has finished ([`Event::Failed`] or [`Event::Expired`]).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next check to send now, if one is due. Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.handle_timeout(now);
        let deadline = self.deadline;
        match &mut self.phase {
            Phase::Checking { pairs, .. } => pairs.iter_mut().find_map(|p| p.poll(now, deadline)),
            Phase::Watching(w) => {
                if now >= w.next_round {
                    w.previous = Some(w.round.tid);
                    w.round = Probe::round(w.remote, self.tids.next(), now);
                    w.next_round += INTERVAL;
                    // A driver that woke late skips the rounds it missed.
                    if w.next_round <= now {
                        w.next_round = now + INTERVAL;
                    }
                }
                let far = now + GIVE_UP;
                w.round
                    .poll(now, far)
                    .or_else(|| w.rebinds.iter_mut().find_map(|p| p.poll(now, far)))
            }
            Phase::Done => None,
        }
    }

    /// When the checker next needs [`Self::handle_timeout`] (or a poll), if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Checking {
                pairs, settle_at, ..
            } => {
                let sends = pairs.iter().filter_map(Probe::next_send);
                sends
                    .chain(*settle_at)
                    .chain(Some(self.deadline))
                    .filter(|t| *t <= self.deadline)
                    .min()
            }
            Phase::Watching(w) => {
                let verdict = if w.live {
                    w.last_answer + DEAD_AFTER
                } else {
                    w.last_answer + DEAD_AFTER + GIVE_UP
                };
                let sends = w.rebinds.iter().filter_map(Probe::next_send);
                sends
                    .chain(w.round.next_send())
                    .chain([w.next_round, verdict])
                    .min()
            }
            Phase::Done => None,
        }
    }

    /// Acts on the passing of time: nomination after the settle time, failure at the
    /// deadline, a path's death and expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Checking {
                answered,
                settle_at,
                tried,
                ..
            } => {
                let settled = settle_at.is_some_and(|t| now >= t) || now >= self.deadline;
                if let Some((remote, rtt)) = super::checks::best(answered).filter(|_| settled) {
                    self.nominate(remote, rtt, now);
                } else if now >= self.deadline {
                    self.events.push_back(Event::Failed { tried: *tried });
                    self.phase = Phase::Done;
                }
            }
            Phase::Watching(w) => {
                if w.live && now >= w.last_answer + DEAD_AFTER {
                    w.live = false;
                    self.events.push_back(Event::Dead { remote: w.remote });
                } else if !w.live && now >= w.last_answer + DEAD_AFTER + GIVE_UP {
                    self.events.push_back(Event::Expired { remote: w.remote });
                    self.phase = Phase::Done;
                }
            }
            Phase::Done => {}
        }
    }

    fn nominate(&mut self, remote: SocketAddr, rtt: Duration, now: Instant) {
        self.events.push_back(Event::Found { remote, rtt });
        self.phase = Phase::Watching(Watch {
            remote,
            live: true,
            last_answer: now,
            // The first round is an empty one: the nominating answer was the check.
            round: Probe::new(remote, self.tids.next(), now, 0),
            previous: None,
            next_round: now + INTERVAL,
            rebinds: Vec::new(),
        });
    }

    /// A success response with valid integrity to the check `tid` came from `from`.
    /// Responses from another address than the check went to are ignored (RFC 8445 §7.2.5.2.1:
    /// the pair is not symmetric).
    pub fn handle_response(&mut self, tid: TransactionId, from: SocketAddr, now: Instant) {
        match &mut self.phase {
            Phase::Checking {
                pairs,
                answered,
                settle_at,
                ..
            } => {
                let Some(i) = pairs.iter().position(|p| p.tid == tid && p.to == from) else {
                    return;
                };
                let pair = pairs.remove(i);
                answered.push((from, pair.rtt(now)));
                settle_at.get_or_insert(now + SETTLE);
            }
            Phase::Watching(w) => {
                if let Some(i) = w.rebinds.iter().position(|p| p.tid == tid && p.to == from) {
                    let rtt = w.rebinds[i].rtt(now);
                    let old = w.remote;
                    self.events.push_back(Event::Moved { from: old });
                    self.nominate(from, rtt, now);
                    return;
                }
                let current = w.round.tid == tid;
                if from != w.remote || !(current || w.previous == Some(tid)) {
                    return;
                }
                let rtt = if current {
                    w.round.rtt(now)
                } else {
                    // A late answer to the previous round: its RTT is unknown, only its
                    // proof of life counts.
                    Duration::ZERO
                };
                w.last_answer = now;
                if w.live {
                    if current {
                        self.events.push_back(Event::Rtt {
                            remote: w.remote,
                            rtt,
                        });
                    }
                } else {
                    w.live = true;
                    w.rebinds.clear();
                    self.events.push_back(Event::Revived {
                        remote: w.remote,
                        rtt,
                    });
                }
                if current {
                    // Answered: no more retransmits this round.
                    w.round.max_sends = w.round.sent;
                }
            }
            Phase::Done => {}
        }
    }

    /// The peer sent us a valid check from `from`: it reaches us from there. An address not
    /// yet checked becomes a pair checked at once (while checking), or a new address to try
    /// while the nominated path is dead.
    pub fn handle_check_from(&mut self, from: SocketAddr, now: Instant) {
        match &mut self.phase {
            Phase::Checking {
                pairs,
                answered,
                tried,
                ..
            } => {
                let known =
                    pairs.iter().any(|p| p.to == from) || answered.iter().any(|(a, _)| *a == from);
                if !known && *tried < MAX_PAIRS && now < self.deadline {
                    *tried += 1;
                    pairs.push(Probe::new(from, self.tids.next(), now, u32::MAX));
                }
            }
            Phase::Watching(w) => {
                // A rebind check that ran out may be tried again when the peer checks again.
                w.rebinds.retain(|p| p.next_send().is_some());
                let known = from == w.remote || w.rebinds.iter().any(|p| p.to == from);
                if !w.live && !known && w.rebinds.len() < MAX_CANDIDATES {
                    // Bounded by the round schedule: a rebind check lives as long as a
                    // keepalive round, so a peer cannot keep us sending to many addresses.
                    let tid = self.tids.next();
                    w.rebinds.push(Probe::round(from, tid, now));
                }
            }
            Phase::Done => {}
        }
    }

    /// A path found by other means (a probe through the peer's symmetric NAT) that answered
    /// one of this session's checks: it competes for nomination like an answered pair.
    pub fn handle_found(&mut self, remote: SocketAddr, rtt: Duration, now: Instant) {
        if let Phase::Checking {
            answered,
            settle_at,
            tried,
            ..
        } = &mut self.phase
        {
            *tried += 1;
            answered.push((remote, rtt));
            settle_at.get_or_insert(now + SETTLE);
        }
    }

    /// Whether the checker is still looking for its first path (probes may help).
    pub fn is_checking(&self) -> bool {
        matches!(
            &self.phase,
            Phase::Checking { answered, .. } if answered.is_empty()
        )
    }
}

#[cfg(test)]
mod tests;
