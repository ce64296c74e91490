//! Relay sessions: which two agents a session joins, and what relaying its packets may cost.
//! Pure bookkeeping (no I/O, time passed in), so every rule is tested directly; the packets
//! themselves are moved by [`crate::forward`].
//!
//! A session is made when S introduces two agents. From then on either agent may send the
//! other packets through S, tagged with the session ID (see [`p2ptun::proto::relay`]). For
//! each packet S asks [`Sessions::packet`], which says whom to forward it to, or why to drop
//! it, or that the session has used up its budget and is closed. A packet over a rate is
//! dropped like one on a congested link: the end-to-end QUIC connection inside sees loss and
//! slows down, which is what a rate limit should make it do.
//!
//! Generic over what is kept per agent (S keeps its connection), so this is tested without
//! QUIC.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::RelayBudgets;
use crate::ratelimit::source_key;

/// How often idle sessions are looked for at most (a pass over every session); more often
/// for short idle timeouts, see [`Sessions::sweep_every`].
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Sessions S keeps at most; introductions beyond it are made without relaying.
pub const MAX_SESSIONS: usize = 100_000;
/// Sessions one agent's introductions may keep open; a newer one closes that agent's least
/// recently used one. Counted per forwarder, so nobody can close an exposer's sessions with
/// others by asking for it over and over.
pub const MAX_SESSIONS_PER_AGENT: usize = 1024;
/// Oversized packets of one session on their way out on streams at once; more are dropped.
pub const STREAMS_PER_SESSION: usize = 64;

/// One side of a session.
#[derive(Debug)]
pub struct Party<T> {
    /// Tells agents apart: their registration number (one per control connection).
    pub id: u64,
    /// Where the agent's control connection comes from (its real address, also when it
    /// arrives over TCP); its source is charged for what it sends.
    pub ip: IpAddr,
    /// What S keeps of the agent.
    pub agent: Arc<T>,
}

impl<T> Clone for Party<T> {
    fn clone(&self) -> Self {
        Party {
            id: self.id,
            ip: self.ip,
            agent: Arc::clone(&self.agent),
        }
    }
}

/// What to do with one relayed packet.
#[derive(Debug)]
pub enum Verdict<T> {
    /// Send it to this agent.
    Forward {
        /// The other side.
        to: Arc<T>,
        /// Permits for packets that must go on a stream (they may not all fit in a datagram).
        streams: Arc<Semaphore>,
    },
    /// Drop it.
    Drop(Dropped),
    /// Drop it: the session has used up its byte budget and is closed now.
    Close(Closed<T>),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// No such session (never made, or closed).
    UnknownSession,
    /// The sender is not one of the session's two agents.
    NotAParty,
    /// The session's rate is exceeded.
    SessionRate,
    /// The sender's source's rate, over all its sessions, is exceeded.
    SourceRate,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// It used up its byte budget.
    Budget,
    /// One of its agents' control connections ended.
    AgentLeft,
    /// No packet crossed it for the idle timeout ([`RelayBudgets::idle_timeout`]).
    Idle,
    /// Its forwarder made too many newer sessions.
    Evicted,
}

impl CloseCause {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseCause::Budget => "budget",
            CloseCause::AgentLeft => "agent_left",
            CloseCause::Idle => "idle",
            CloseCause::Evicted => "evicted",
        }
    }
}

/// A session that was closed: both agents are told.
#[derive(Debug)]
pub struct Closed<T> {
    /// The session.
    pub session: u64,
    /// Its two agents.
    pub agents: [Arc<T>; 2],
    /// Why, in the category metrics count.
    pub cause: CloseCause,
    /// Why, for the agents' logs.
    pub reason: String,
}

/// Why no relay session was made for an introduction (it is still made, without relaying).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOpened {
    /// Relaying is switched off (`relay_session_bytes = 0`).
    Disabled,
    /// S holds [`MAX_SESSIONS`] already.
    Full,
    /// The ID is taken (a 1 in 2^64 chance; the caller draws another).
    Exists,
}

/// One relay session as it stands, for the status page.
#[derive(Debug)]
pub struct SessionView<T> {
    /// The session ID.
    pub id: u64,
    /// The agent that asked for the introduction.
    pub forwarder: Arc<T>,
    /// The agent exposing the name it asked for.
    pub exposer: Arc<T>,
    /// Relay payload bytes it has carried, both ways.
    pub bytes: u64,
    /// How long since a packet crossed it (or since it was made).
    pub idle: Duration,
}

/// A token bucket of bytes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }
}

/// The rate and burst of one kind of bucket. The burst is a second's worth, but never less
/// than the largest packet, so that a low rate slows packets down rather than stopping them.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    fn new(per_sec: u64) -> Self {
        let per_sec = per_sec.max(1) as f64;
        let largest = p2ptun::proto::relay::MAX_STREAM_PAYLOAD as f64;
        Rate {
            per_sec,
            burst: per_sec.max(largest),
        }
    }
}

#[derive(Debug)]
struct Session<T> {
    parties: [Party<T>; 2],
    used: u64,
    bucket: Bucket,
    last_packet: Instant,
    streams: Arc<Semaphore>,
}

impl<T> Session<T> {
    fn closed(&self, session: u64, cause: CloseCause, reason: String) -> Closed<T> {
        Closed {
            session,
            agents: [
                Arc::clone(&self.parties[0].agent),
                Arc::clone(&self.parties[1].agent),
            ],
            cause,
            reason,
        }
    }
}

/// Every relay session S holds, and the per-source rates.
#[derive(Debug)]
pub struct Sessions<T> {
    budget: u64,
    idle_timeout: Duration,
    session_rate: Rate,
    source_rate: Rate,
    sessions: HashMap<u64, Session<T>>,
    /// Sessions by agent, so an agent leaving closes its sessions without a full scan.
    by_party: HashMap<u64, HashSet<u64>>,
    /// Sessions by the forwarder that asked for them, for [`MAX_SESSIONS_PER_AGENT`].
    by_forwarder: HashMap<u64, HashSet<u64>>,
    sources: HashMap<IpAddr, Bucket>,
}

impl<T> Sessions<T> {
    /// No sessions yet, under `budgets`.
    pub fn new(budgets: RelayBudgets) -> Self {
        Sessions {
            budget: budgets.session_bytes,
            idle_timeout: budgets.idle_timeout,
            session_rate: Rate::new(budgets.session_rate),
            source_rate: Rate::new(budgets.rate_per_ip),
            sessions: HashMap::new(),
            by_party: HashMap::new(),
            by_forwarder: HashMap::new(),
            sources: HashMap::new(),
        }
    }

    /// Whether S relays at all.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// How often [`Sessions::sweep`] should run: [`SWEEP_EVERY`], or a quarter of a shorter
    /// idle timeout (so a session is closed at most a quarter late), but not more often than
    /// ten times a second.
    pub fn sweep_every(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(100), SWEEP_EVERY)
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Every session held, as of `now`.
    pub fn list(&self, now: Instant) -> Vec<SessionView<T>> {
        self.sessions
            .iter()
            .map(|(id, s)| SessionView {
                id: *id,
                forwarder: Arc::clone(&s.parties[0].agent),
                exposer: Arc::clone(&s.parties[1].agent),
                bytes: s.used,
                idle: now.saturating_duration_since(s.last_packet),
            })
            .collect()
    }

    /// Makes session `id` between `forwarder` (who asked) and `exposer`. If the forwarder
    /// had [`MAX_SESSIONS_PER_AGENT`] already, its least recently used one is closed to make
    /// room and returned, for its agents to be told.
    pub fn open(
        &mut self,
        id: u64,
        forwarder: Party<T>,
        exposer: Party<T>,
        now: Instant,
    ) -> Result<Option<Closed<T>>, NotOpened> {
        if !self.enabled() {
            return Err(NotOpened::Disabled);
        }
        if self.sessions.contains_key(&id) {
            return Err(NotOpened::Exists);
        }
        let mut evicted = None;
        let own = self.by_forwarder.get(&forwarder.id).map_or(0, HashSet::len);
        if own >= MAX_SESSIONS_PER_AGENT {
            let oldest = self.by_forwarder.get(&forwarder.id).and_then(|ids| {
                ids.iter()
                    .filter_map(|s| self.sessions.get(s).map(|x| (x.last_packet, *s)))
                    .min()
                    .map(|(_, s)| s)
            });
            if let Some(oldest) = oldest {
                evicted = self.close(
                    oldest,
                    CloseCause::Evicted,
                    format!(
                        "the forwarding agent opened more than {MAX_SESSIONS_PER_AGENT} \
                         sessions; its least recently used one is closed"
                    ),
                );
            }
        } else if self.sessions.len() >= MAX_SESSIONS {
            return Err(NotOpened::Full);
        }
        for party in [&forwarder, &exposer] {
            self.by_party.entry(party.id).or_default().insert(id);
        }
        self.by_forwarder
            .entry(forwarder.id)
            .or_default()
            .insert(id);
        self.sessions.insert(
            id,
            Session {
                parties: [forwarder, exposer],
                used: 0,
                bucket: Bucket::full(self.session_rate.burst, now),
                last_packet: now,
                streams: Arc::new(Semaphore::new(STREAMS_PER_SESSION)),
            },
        );
        Ok(evicted)
    }

    /// Decides about a packet of `len` bytes (the whole relay payload) that agent `from`
    /// sent on `session`, and charges it if it goes through.
    pub fn packet(&mut self, session: u64, from: u64, len: usize, now: Instant) -> Verdict<T> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Verdict::Drop(Dropped::UnknownSession);
        };
        let (sender, receiver) = if s.parties[0].id == from {
            (0, 1)
        } else if s.parties[1].id == from {
            (1, 0)
        } else {
            return Verdict::Drop(Dropped::NotAParty);
        };
        let len64 = len as u64;
        if s.used.saturating_add(len64) > self.budget {
            let reason = format!("relay budget of {} bytes used up", self.budget);
            return match self.close(session, CloseCause::Budget, reason) {
                Some(closed) => Verdict::Close(closed),
                None => Verdict::Drop(Dropped::UnknownSession),
            };
        }
        let need = len as f64;
        let source = source_key(s.parties[sender].ip);
        let src_rate = self.source_rate;
        let src = self
            .sources
            .entry(source)
            .or_insert_with(|| Bucket::full(src_rate.burst, now));
        src.refill(src_rate.per_sec, src_rate.burst, now);
        s.bucket
            .refill(self.session_rate.per_sec, self.session_rate.burst, now);
        // Both buckets are checked before either is charged: a packet dropped for one rate
        // must not use up the other.
        if s.bucket.tokens < need {
            return Verdict::Drop(Dropped::SessionRate);
        }
        if src.tokens < need {
            return Verdict::Drop(Dropped::SourceRate);
        }
        s.bucket.tokens -= need;
        src.tokens -= need;
        s.used += len64;
        s.last_packet = now;
        Verdict::Forward {
            to: Arc::clone(&s.parties[receiver].agent),
            streams: Arc::clone(&s.streams),
        }
    }

    /// Closes every session of agent `party`, whose control connection ended.
    pub fn remove_party(&mut self, party: u64) -> Vec<Closed<T>> {
        let ids: Vec<u64> = self
            .by_party
            .get(&party)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| {
                self.close(
                    id,
                    CloseCause::AgentLeft,
                    "the other agent's connection to S ended".into(),
                )
            })
            .collect()
    }

    /// Closes the sessions idle for the idle timeout and forgets sources whose buckets are
    /// full again (forgetting them changes nothing: a new bucket starts full).
    pub fn sweep(&mut self, now: Instant) -> Vec<Closed<T>> {
        let idle: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_packet) >= self.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        let rate = self.source_rate;
        self.sources.retain(|_, b| {
            b.refill(rate.per_sec, rate.burst, now);
            b.tokens < rate.burst
        });
        let reason = format!("no packet for {}", human_duration(self.idle_timeout));
        idle.into_iter()
            .filter_map(|id| self.close(id, CloseCause::Idle, reason.clone()))
            .collect()
    }

    /// Forgets session `id` without telling anyone (its introduction was never delivered).
    pub fn forget(&mut self, id: u64) {
        self.close(id, CloseCause::AgentLeft, String::new());
    }

    fn close(&mut self, id: u64, cause: CloseCause, reason: String) -> Option<Closed<T>> {
        let s = self.sessions.remove(&id)?;
        for party in &s.parties {
            unindex(&mut self.by_party, party.id, id);
        }
        unindex(&mut self.by_forwarder, s.parties[0].id, id);
        Some(s.closed(id, cause, reason))
    }
}

/// "10 minutes", "90 seconds", "1 second": whole minutes when it is some, else seconds.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        1 => "1 second".to_owned(),
        s if s >= 60 && s % 60 == 0 => match s / 60 {
            1 => "1 minute".to_owned(),
            m => format!("{m} minutes"),
        },
        s => format!("{s} seconds"),
    }
}

fn unindex(index: &mut HashMap<u64, HashSet<u64>>, key: u64, id: u64) {
    if let Some(ids) = index.get_mut(&key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(session_bytes: u64, session_rate: u64, rate_per_ip: u64) -> RelayBudgets {
        RelayBudgets {
            session_bytes,
            session_rate,
            rate_per_ip,
            idle_timeout: RelayBudgets::default().idle_timeout,
        }
    }

    fn party(id: u64, ip: &str) -> Party<&'static str> {
        let name: &'static str = Box::leak(format!("agent{id}").into_boxed_str());
        Party {
            id,
            ip: ip.parse().unwrap(),
            agent: Arc::new(name),
        }
    }

    fn forwarded_to(v: Verdict<&'static str>) -> &'static str {
        match v {
            Verdict::Forward { to, .. } => *to,
            other => panic!("expected Forward, got {other:?}"),
        }
    }

    fn dropped(v: Verdict<&'static str>) -> Dropped {
        match v {
            Verdict::Drop(why) => why,
            other => panic!("expected Drop, got {other:?}"),
        }
    }

    const BIG: u64 = 1 << 40;

    #[test]
    fn packets_go_to_the_other_party_only() {
        let mut s = Sessions::new(budgets(BIG, BIG, BIG));
        let now = Instant::now();
        assert!(s
            .open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), now)
            .unwrap()
            .is_none());
        assert_eq!(forwarded_to(s.packet(7, 1, 100, now)), "agent2");
        assert_eq!(forwarded_to(s.packet(7, 2, 100, now)), "agent1");
        assert_eq!(dropped(s.packet(7, 3, 100, now)), Dropped::NotAParty);
        assert_eq!(dropped(s.packet(8, 1, 100, now)), Dropped::UnknownSession);
        let later = now + Duration::from_secs(3);
        let listed = s.list(later);
        assert_eq!(listed.len(), 1);
        let v = &listed[0];
        assert_eq!((v.id, *v.forwarder, *v.exposer), (7, "agent1", "agent2"));
        assert_eq!((v.bytes, v.idle), (200, Duration::from_secs(3)));
        assert_eq!(
            s.open(7, party(1, "192.0.2.1"), party(3, "192.0.2.3"), now)
                .unwrap_err(),
            NotOpened::Exists
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_byte_budget_closes_the_session() {
        let mut s = Sessions::new(budgets(1000, BIG, BIG));
        let now = Instant::now();
        s.open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), now)
            .unwrap();
        for _ in 0..10 {
            forwarded_to(s.packet(7, 1, 100, now));
        }
        // 1000 bytes used exactly: the next byte is one too many.
        match s.packet(7, 2, 1, now) {
            Verdict::Close(c) => {
                assert_eq!(c.session, 7);
                assert_eq!(c.cause, CloseCause::Budget);
                assert_eq!(c.reason, "relay budget of 1000 bytes used up");
                assert_eq!([*c.agents[0], *c.agents[1]], ["agent1", "agent2"]);
            }
            other => panic!("expected Close, got {other:?}"),
        }
        assert_eq!(dropped(s.packet(7, 1, 1, now)), Dropped::UnknownSession);
        assert!(s.is_empty());
        assert!(s.by_party.is_empty() && s.by_forwarder.is_empty());
    }

    #[test]
    fn a_session_rate_drops_the_excess_and_refills() {
        // 100 kB/s: the burst is the largest packet (65 543 bytes), more than a second's worth.
        let mut s = Sessions::new(budgets(BIG, 100_000, BIG));
        let t0 = Instant::now();
        s.open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), t0)
            .unwrap();
        let passed = (0..200)
            .filter(|_| matches!(s.packet(7, 1, 1000, t0), Verdict::Forward { .. }))
            .count();
        assert_eq!(passed, 100);
        assert_eq!(dropped(s.packet(7, 2, 1000, t0)), Dropped::SessionRate);
        // Dropped packets are not charged to the byte budget.
        assert_eq!(s.sessions[&7].used, 100_000);
        let t1 = t0 + Duration::from_millis(100);
        let passed = (0..200)
            .filter(|_| matches!(s.packet(7, 1, 1000, t1), Verdict::Forward { .. }))
            .count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn a_low_rate_still_lets_the_largest_packet_through() {
        let mut s = Sessions::new(budgets(BIG, 1, 1));
        let now = Instant::now();
        s.open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), now)
            .unwrap();
        let largest = p2ptun::proto::relay::MAX_STREAM_PAYLOAD;
        forwarded_to(s.packet(7, 1, largest, now));
        assert_eq!(dropped(s.packet(7, 1, 1, now)), Dropped::SessionRate);
    }

    #[test]
    fn a_source_rate_covers_all_its_sessions() {
        let mut s = Sessions::new(budgets(BIG, BIG, 100_000));
        let t0 = Instant::now();
        // Agents 1 and 3 share a source (two connections from one host, or one /64).
        s.open(7, party(1, "2001:db8::1"), party(2, "192.0.2.2"), t0)
            .unwrap();
        s.open(8, party(3, "2001:db8::99"), party(4, "192.0.2.4"), t0)
            .unwrap();
        let mut passed = 0;
        for _ in 0..100 {
            for (session, from) in [(7, 1), (8, 3)] {
                if matches!(s.packet(session, from, 1000, t0), Verdict::Forward { .. }) {
                    passed += 1;
                }
            }
        }
        assert_eq!(passed, 100);
        assert_eq!(dropped(s.packet(7, 1, 1000, t0)), Dropped::SourceRate);
        // The other direction comes from other sources and is unaffected; and the dropped
        // packets above did not use up the sessions' own buckets.
        forwarded_to(s.packet(7, 2, 1000, t0));
        forwarded_to(s.packet(8, 4, 1000, t0));
    }

    #[test]
    fn an_agent_leaving_closes_its_sessions() {
        let mut s = Sessions::new(budgets(BIG, BIG, BIG));
        let now = Instant::now();
        s.open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), now)
            .unwrap();
        s.open(8, party(3, "192.0.2.3"), party(2, "192.0.2.2"), now)
            .unwrap();
        s.open(9, party(3, "192.0.2.3"), party(4, "192.0.2.4"), now)
            .unwrap();
        let mut closed: Vec<u64> = s.remove_party(2).iter().map(|c| c.session).collect();
        closed.sort_unstable();
        assert_eq!(closed, vec![7, 8]);
        assert!(s.remove_party(2).is_empty());
        assert_eq!(s.len(), 1);
        forwarded_to(s.packet(9, 3, 10, now));
        assert_eq!(s.remove_party(4)[0].cause, CloseCause::AgentLeft);
        assert!(s.is_empty());
        assert!(s.by_party.is_empty() && s.by_forwarder.is_empty());
    }

    #[test]
    fn idle_sessions_and_full_source_buckets_are_forgotten() {
        let mut s = Sessions::new(budgets(BIG, BIG, 100_000));
        let t0 = Instant::now();
        s.open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), t0)
            .unwrap();
        s.open(8, party(3, "192.0.2.3"), party(4, "192.0.2.4"), t0)
            .unwrap();
        forwarded_to(s.packet(8, 3, 1000, t0));
        assert_eq!(s.sources.len(), 1);
        let later = t0 + Duration::from_secs(300);
        forwarded_to(s.packet(8, 3, 1000, later));
        assert!(s.sweep(later).is_empty());
        let closed = s.sweep(t0 + RelayBudgets::default().idle_timeout);
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].session, closed[0].cause), (7, CloseCause::Idle));
        assert_eq!(closed[0].reason, "no packet for 10 minutes");
        assert_eq!(s.len(), 1);
        // Session 8's source bucket had refilled: forgotten.
        assert!(s.sources.is_empty());
        assert_eq!(
            s.sweep(later + RelayBudgets::default().idle_timeout)[0].session,
            8
        );
    }

    #[test]
    fn a_short_idle_timeout_closes_sooner_and_is_swept_more_often() {
        let mut s = Sessions::new(RelayBudgets {
            idle_timeout: Duration::from_secs(3),
            ..budgets(BIG, BIG, BIG)
        });
        assert_eq!(s.sweep_every(), Duration::from_millis(750));
        let t0 = Instant::now();
        s.open(7, party(1, "192.0.2.1"), party(2, "192.0.2.2"), t0)
            .unwrap();
        assert!(s.sweep(t0 + Duration::from_millis(2900)).is_empty());
        let closed = s.sweep(t0 + Duration::from_secs(3));
        assert_eq!((closed[0].session, closed[0].cause), (7, CloseCause::Idle));
        assert_eq!(closed[0].reason, "no packet for 3 seconds");
        assert!(s.is_empty());
        // The default sweeps every 30 s; a tiny timeout not more than ten times a second.
        assert_eq!(
            Sessions::<&str>::new(budgets(1, 1, 1)).sweep_every(),
            SWEEP_EVERY
        );
        let tiny = Sessions::<&str>::new(RelayBudgets {
            idle_timeout: Duration::from_secs(1),
            ..budgets(1, 1, 1)
        });
        assert_eq!(tiny.sweep_every(), Duration::from_millis(250));
        assert_eq!(human_duration(Duration::from_secs(60)), "1 minute");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 seconds");
        assert_eq!(human_duration(Duration::from_secs(1)), "1 second");
    }

    #[test]
    fn a_busy_forwarder_replaces_its_least_recently_used_session() {
        let mut s = Sessions::new(budgets(BIG, BIG, BIG));
        let t0 = Instant::now();
        for i in 0..MAX_SESSIONS_PER_AGENT as u64 {
            let t = t0 + Duration::from_millis(i);
            s.open(i, party(1, "192.0.2.1"), party(2, "192.0.2.2"), t)
                .unwrap();
        }
        // Session 0 is the oldest, but used recently; session 1 is the least recently used.
        forwarded_to(s.packet(0, 1, 10, t0 + Duration::from_secs(5)));
        let evicted = s
            .open(
                10_000,
                party(1, "192.0.2.1"),
                party(2, "192.0.2.2"),
                t0 + Duration::from_secs(6),
            )
            .unwrap()
            .expect("one session evicted");
        assert_eq!((evicted.session, evicted.cause), (1, CloseCause::Evicted));
        assert_eq!(s.len(), MAX_SESSIONS_PER_AGENT);
        // The exposer's sessions with others are not this forwarder's to evict.
        assert!(s
            .open(20_000, party(5, "192.0.2.5"), party(2, "192.0.2.2"), t0)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_zero_budget_switches_relaying_off() {
        let mut s = Sessions::<&str>::new(budgets(0, BIG, BIG));
        assert!(!s.enabled());
        let err = s
            .open(
                1,
                party(1, "192.0.2.1"),
                party(2, "192.0.2.2"),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(err, NotOpened::Disabled);
    }
}
