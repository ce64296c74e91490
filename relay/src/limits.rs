//! Admission of QUIC connections (over UDP and over TCP): what a stranger can make S spend
//! before it proves anything, and what a registered agent holds.
//!
//! A connection goes through three stages, each bounded on its own:
//! - **handshaking**: every UDP client first proves its address with a QUIC Retry (stateless
//!   for S, and smaller than the Initial that asked for it, so spoofed Initials can neither
//!   hold state nor be amplified); a proven source may then start `handshake_rate_per_ip`
//!   handshakes a second, and `max_pending_handshakes` may be in progress in all;
//! - **unregistered**: handshaken but not registered (which must happen within
//!   [`crate::control::REGISTER_DEADLINE`]); a source holds at most
//!   `max_unregistered_per_ip` connections in the first two stages;
//! - **registered**: an agent whose registration S accepted (its token checked, when S has
//!   tokens). Agents are told apart by their key, one connection per key, so thousands of
//!   them behind one carrier-grade NAT are thousands of agents; `max_agents_per_ip` only
//!   keeps one address from taking all of `max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::Limits;
use crate::ratelimit::{source_key, RateLimiter};

/// Why a connection attempt, or a registration, was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// S holds `max_connections` already.
    Total,
    /// `max_pending_handshakes` handshakes are in progress.
    Pending,
    /// The source started `handshake_rate_per_ip` handshakes in the last second (and used
    /// up its burst).
    HandshakeRate,
    /// The source holds `max_unregistered_per_ip` connections that have not registered.
    Unregistered,
    /// The source has `max_agents_per_ip` registered agents already.
    Agents,
}

impl Refusal {
    /// Every refusal, in the order metrics list them.
    pub const ALL: [Refusal; 5] = [
        Refusal::Total,
        Refusal::Pending,
        Refusal::HandshakeRate,
        Refusal::Unregistered,
        Refusal::Agents,
    ];

    /// The configuration key of the limit, for logs, metrics and errors.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::Pending => "max_pending_handshakes",
            Refusal::HandshakeRate => "handshake_rate_per_ip",
            Refusal::Unregistered => "max_unregistered_per_ip",
            Refusal::Agents => "max_agents_per_ip",
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Accept it; the slot is held until its last clone is dropped.
    Accept(ConnSlot),
    /// Answer with a QUIC Retry: the client must prove it receives at its address first.
    Retry,
    /// Refuse it.
    Refuse(Refusal),
}

/// The connection accounting of one S.
#[derive(Debug)]
pub struct ConnLimits {
    limits: Limits,
    counts: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    total: u32,
    pending: u32,
    /// Only sources holding at least one connection have an entry, so the map is no larger
    /// than `max_connections`.
    per_source: HashMap<IpAddr, SourceCounts>,
    handshakes: RateLimiter,
}

#[derive(Debug, Default, Clone, Copy)]
struct SourceCounts {
    unregistered: u32,
    agents: u32,
}

/// Where one connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Handshaking,
    Unregistered,
    Registered,
}

impl ConnLimits {
    /// Accounting under `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(ConnLimits {
            limits,
            counts: Mutex::new(Counts {
                total: 0,
                pending: 0,
                per_source: HashMap::new(),
                handshakes: RateLimiter::new(limits.handshake_rate_per_ip),
            }),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Every update is a few integer operations; a panic cannot leave them half done.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides about an attempt from `ip`. `validated` says whether the client has proved
    /// its address: it came back with a Retry token, or it is a TCP peer.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Admission {
        self.admit_at(ip, validated, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, validated: bool, now: Instant) -> Admission {
        if !validated {
            // Checked before anything is counted or stored: an unproven address may be
            // anyone's, and a Retry costs S one small packet and no state.
            return Admission::Retry;
        }
        let key = source_key(ip);
        let l = &self.limits;
        let mut counts = self.counts();
        if counts.total >= l.max_connections {
            return Admission::Refuse(Refusal::Total);
        }
        if counts.pending >= l.max_pending_handshakes {
            return Admission::Refuse(Refusal::Pending);
        }
        let source = counts.per_source.get(&key).copied().unwrap_or_default();
        if source.unregistered >= l.max_unregistered_per_ip {
            return Admission::Refuse(Refusal::Unregistered);
        }
        // Last, so that attempts refused for other reasons do not use up the allowance.
        if !counts.handshakes.allow(key, now) {
            return Admission::Refuse(Refusal::HandshakeRate);
        }
        counts.total += 1;
        counts.pending += 1;
        counts.per_source.entry(key).or_default().unregistered += 1;
        Admission::Accept(ConnSlot(Arc::new(SlotInner {
            owner: Arc::clone(self),
            key,
            stage: Mutex::new(Stage::Handshaking),
        })))
    }

    /// Connections held (in any stage).
    pub fn total(&self) -> u32 {
        self.counts().total
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> u32 {
        self.counts().pending
    }

    /// Connections handshaking or handshaken but not registered.
    pub fn unregistered(&self) -> u32 {
        self.counts()
            .per_source
            .values()
            .map(|s| s.unregistered)
            .sum()
    }
}

/// One admitted connection's share of the limits, given back when its last clone is
/// dropped. Clones share the one share: the accept loop holds one, and the connection's
/// session another to record the registration.
#[derive(Debug, Clone)]
pub struct ConnSlot(Arc<SlotInner>);

#[derive(Debug)]
struct SlotInner {
    owner: Arc<ConnLimits>,
    key: IpAddr,
    stage: Mutex<Stage>,
}

impl SlotInner {
    fn stage(&self) -> MutexGuard<'_, Stage> {
        self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ConnSlot {
    /// The handshake is over (either way): the slot no longer counts as pending.
    pub fn handshake_done(&self) {
        let mut stage = self.0.stage();
        if *stage == Stage::Handshaking {
            *stage = Stage::Unregistered;
            let mut counts = self.0.owner.counts();
            counts.pending = counts.pending.saturating_sub(1);
        }
    }

    /// The connection's agent is registering: from now on it counts as one of its source's
    /// agents, not as one of its unregistered connections. Refused when the source has
    /// `max_agents_per_ip` agents already. Registering twice is harmless.
    pub fn register(&self) -> Result<(), Refusal> {
        let mut stage = self.0.stage();
        if *stage == Stage::Registered {
            return Ok(());
        }
        let owner = &self.0.owner;
        let mut counts = owner.counts();
        let was_pending = *stage == Stage::Handshaking;
        let source = counts.per_source.entry(self.0.key).or_default();
        if source.agents >= owner.limits.max_agents_per_ip {
            return Err(Refusal::Agents);
        }
        source.agents += 1;
        source.unregistered = source.unregistered.saturating_sub(1);
        if was_pending {
            counts.pending = counts.pending.saturating_sub(1);
        }
        *stage = Stage::Registered;
        Ok(())
    }
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        let stage = *self.stage();
        let mut counts = self.owner.counts();
        counts.total = counts.total.saturating_sub(1);
        if stage == Stage::Handshaking {
            counts.pending = counts.pending.saturating_sub(1);
        }
        if let Some(source) = counts.per_source.get_mut(&self.key) {
            match stage {
                Stage::Registered => source.agents = source.agents.saturating_sub(1),
                _ => source.unregistered = source.unregistered.saturating_sub(1),
            }
            if source.agents == 0 && source.unregistered == 0 {
                counts.per_source.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 100,
            max_pending_handshakes: 100,
            handshake_rate_per_ip: 1000,
            max_unregistered_per_ip: 100,
            max_agents_per_ip: 100,
            stun_rate_per_ip: 1,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn accept(a: Admission) -> ConnSlot {
        match a {
            Admission::Accept(slot) => slot,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    fn refused(a: Admission) -> Refusal {
        match a {
            Admission::Refuse(why) => why,
            other => panic!("expected Refuse, got {other:?}"),
        }
    }

    #[test]
    fn unproven_addresses_are_asked_to_retry_and_cost_nothing() {
        let l = ConnLimits::new(limits());
        for _ in 0..1000 {
            assert!(matches!(l.admit(ip("192.0.2.1"), false), Admission::Retry));
        }
        assert_eq!(l.total(), 0);
        assert_eq!(l.counts().per_source.len(), 0);
        // Their rate allowance is untouched, too.
        let _ = accept(l.admit(ip("192.0.2.1"), true));
    }

    #[test]
    fn a_source_holds_a_bounded_number_of_unregistered_connections() {
        let l = ConnLimits::new(Limits {
            max_unregistered_per_ip: 2,
            ..limits()
        });
        let a1 = accept(l.admit(ip("192.0.2.1"), true));
        let a2 = accept(l.admit(ip("192.0.2.1"), true));
        assert_eq!(
            refused(l.admit(ip("192.0.2.1"), true)),
            Refusal::Unregistered
        );
        // Another source is not affected.
        let _b = accept(l.admit(ip("192.0.2.2"), true));
        // A registered agent no longer counts as unregistered: room for one more.
        a1.handshake_done();
        a1.register().unwrap();
        let _a3 = accept(l.admit(ip("192.0.2.1"), true));
        assert_eq!(l.unregistered(), 3);
        drop(a2);
        let _a4 = accept(l.admit(ip("192.0.2.1"), true));
    }

    #[test]
    fn a_thousand_agents_register_from_one_address() {
        // What a carrier-grade NAT looks like: one address, many keys, and each connection
        // registers before the next few arrive.
        let l = ConnLimits::new(Limits {
            max_connections: 2000,
            max_unregistered_per_ip: 8,
            handshake_rate_per_ip: 100,
            max_agents_per_ip: 1500,
            ..limits()
        });
        let t0 = Instant::now();
        let mut agents = Vec::new();
        let mut refused_for_rate = 0;
        let mut t = t0;
        while agents.len() < 1000 {
            match l.admit_at(ip("198.51.100.7"), true, t) {
                Admission::Accept(slot) => {
                    slot.handshake_done();
                    slot.register().unwrap();
                    agents.push(slot);
                }
                Admission::Refuse(Refusal::HandshakeRate) => {
                    refused_for_rate += 1;
                    t += Duration::from_millis(100);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(l.total(), 1000);
        assert_eq!(l.unregistered(), 0);
        assert!(refused_for_rate > 0, "the rate held back the burst");
        // 200 at once (the burst), then 100 a second.
        assert!(t - t0 >= Duration::from_secs(7), "{:?}", t - t0);
        assert!(t - t0 <= Duration::from_secs(9), "{:?}", t - t0);
    }

    #[test]
    fn handshakes_per_second_per_source_are_bounded() {
        let l = ConnLimits::new(Limits {
            handshake_rate_per_ip: 5,
            ..limits()
        });
        let t0 = Instant::now();
        let mut slots = Vec::new();
        for _ in 0..10 {
            slots.push(accept(l.admit_at(ip("192.0.2.1"), true, t0)));
        }
        assert_eq!(
            refused(l.admit_at(ip("192.0.2.1"), true, t0)),
            Refusal::HandshakeRate
        );
        // An IPv4 source counts once in both spellings (a dual-stack socket sees it
        // IPv4-mapped; TCP peers are canonical).
        assert_eq!(
            refused(l.admit_at(ip("::ffff:192.0.2.1"), true, t0)),
            Refusal::HandshakeRate
        );
        let _other = accept(l.admit_at(ip("192.0.2.2"), true, t0));
        let later = t0 + Duration::from_secs(1);
        accept(l.admit_at(ip("192.0.2.1"), true, later));
    }

    #[test]
    fn pending_handshakes_and_the_total_are_bounded_and_given_back() {
        let l = ConnLimits::new(Limits {
            max_pending_handshakes: 2,
            max_connections: 3,
            ..limits()
        });
        let a = accept(l.admit(ip("192.0.2.1"), true));
        let b = accept(l.admit(ip("192.0.2.2"), true));
        assert_eq!(refused(l.admit(ip("192.0.2.3"), true)), Refusal::Pending);
        a.handshake_done();
        assert_eq!(l.pending(), 1);
        let _c = accept(l.admit(ip("192.0.2.3"), true));
        assert_eq!(refused(l.admit(ip("192.0.2.4"), true)), Refusal::Total);
        assert_eq!(l.total(), 3);
        // A slot's clones share it: it is given back once, with the last of them.
        let b2 = b.clone();
        drop(b);
        assert_eq!(l.total(), 3);
        drop(b2);
        assert_eq!(l.total(), 2);
        assert_eq!(l.pending(), 1);
        drop(a);
        assert_eq!(l.total(), 1);
    }

    #[test]
    fn registered_agents_per_source_are_bounded() {
        let l = ConnLimits::new(Limits {
            max_agents_per_ip: 1,
            ..limits()
        });
        let a = accept(l.admit(ip("2001:db8:1:2::1"), true));
        a.handshake_done();
        a.register().unwrap();
        a.register().unwrap();
        // The same /64 is the same source.
        let b = accept(l.admit(ip("2001:db8:1:2::2"), true));
        b.handshake_done();
        assert_eq!(b.register(), Err(Refusal::Agents));
        // Refused, b still counts as unregistered until it is dropped.
        assert_eq!(l.unregistered(), 1);
        drop(b);
        assert_eq!(l.unregistered(), 0);
        drop(a);
        assert_eq!(l.total(), 0);
        assert!(l.counts().per_source.is_empty());
    }
}
