//! Admission of QUIC connections: how many S holds in all, per source, and in the middle of
//! a handshake, and when to make a client prove its address with a Retry first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Limits;
use crate::ratelimit::source_key;

/// Why a connection attempt was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// S holds `max_connections` already.
    Total,
    /// The source holds `max_connections_per_ip` already.
    PerSource,
    /// `max_pending_handshakes` handshakes are in progress.
    Pending,
}

impl Refusal {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerSource => "max_connections_per_ip",
            Refusal::Pending => "max_pending_handshakes",
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Accept it; the slot is held until dropped.
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

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    pending: u32,
    per_source: HashMap<IpAddr, u32>,
}

impl ConnLimits {
    /// Accounting under `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(ConnLimits {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Every update is a few integer operations; a panic cannot leave them half done.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides about an attempt from `ip`. `validated` says whether the client has proved
    /// its address (it came back with a Retry token); `may_retry` whether a Retry is still
    /// possible.
    ///
    /// Retries are asked for once half the handshake slots are busy: they cost S nothing
    /// (no state is kept), and they stop spoofed sources from holding handshake slots.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool, may_retry: bool) -> Admission {
        let key = source_key(ip);
        let mut counts = self.counts();
        let l = &self.limits;
        if counts.total >= l.max_connections {
            return Admission::Refuse(Refusal::Total);
        }
        if counts.per_source.get(&key).copied().unwrap_or(0) >= l.max_connections_per_ip {
            return Admission::Refuse(Refusal::PerSource);
        }
        let busy = counts.pending >= l.max_pending_handshakes.div_ceil(2);
        if busy && !validated && may_retry {
            return Admission::Retry;
        }
        if counts.pending >= l.max_pending_handshakes {
            return Admission::Refuse(Refusal::Pending);
        }
        counts.total += 1;
        counts.pending += 1;
        *counts.per_source.entry(key).or_insert(0) += 1;
        Admission::Accept(ConnSlot {
            owner: Arc::clone(self),
            key,
            pending: true,
        })
    }

    /// Connections held (established or handshaking).
    pub fn total(&self) -> u32 {
        self.counts().total
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> u32 {
        self.counts().pending
    }
}

/// One admitted connection's share of the limits, given back when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    owner: Arc<ConnLimits>,
    key: IpAddr,
    pending: bool,
}

impl ConnSlot {
    /// The handshake is over (either way): the slot no longer counts as pending.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.pending) {
            let mut counts = self.owner.counts();
            counts.pending = counts.pending.saturating_sub(1);
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.handshake_done();
        let mut counts = self.owner.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_source.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_source.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections_per_ip: 2,
            max_connections: 3,
            max_pending_handshakes: 4,
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

    #[test]
    fn per_source_and_total_limits_hold_and_are_given_back() {
        let l = ConnLimits::new(limits());
        let a1 = accept(l.admit(ip("192.0.2.1"), true, false));
        let _a2 = accept(l.admit(ip("192.0.2.1"), true, false));
        assert!(matches!(
            l.admit(ip("192.0.2.1"), true, false),
            Admission::Refuse(Refusal::PerSource)
        ));
        let _b = accept(l.admit(ip("192.0.2.2"), true, false));
        assert!(matches!(
            l.admit(ip("192.0.2.3"), true, false),
            Admission::Refuse(Refusal::Total)
        ));
        assert_eq!(l.total(), 3);
        drop(a1);
        assert_eq!(l.total(), 2);
        let _a3 = accept(l.admit(ip("192.0.2.1"), true, false));
    }

    #[test]
    fn an_ipv4_source_counts_once_in_both_spellings() {
        // A dual-stack socket sees IPv4 clients IPv4-mapped; TCP peers are canonical.
        let l = ConnLimits::new(limits());
        let _a = accept(l.admit(ip("::ffff:192.0.2.1"), true, false));
        let _b = accept(l.admit(ip("192.0.2.1"), true, false));
        assert!(matches!(
            l.admit(ip("::ffff:192.0.2.1"), true, false),
            Admission::Refuse(Refusal::PerSource)
        ));
    }

    #[test]
    fn busy_handshakes_ask_for_retry_then_refuse() {
        let l = ConnLimits::new(Limits {
            max_connections_per_ip: 100,
            max_connections: 100,
            ..limits()
        });
        let mut slots: Vec<_> = (0..2)
            .map(|i| accept(l.admit(ip(&format!("192.0.2.{i}")), false, true)))
            .collect();
        // Half the handshake slots are busy: unvalidated clients must retry.
        assert!(matches!(
            l.admit(ip("192.0.2.9"), false, true),
            Admission::Retry
        ));
        slots.push(accept(l.admit(ip("192.0.2.9"), true, false)));
        slots.push(accept(l.admit(ip("192.0.2.10"), true, false)));
        assert_eq!(l.pending(), 4);
        assert!(matches!(
            l.admit(ip("192.0.2.11"), true, false),
            Admission::Refuse(Refusal::Pending)
        ));
        for s in &mut slots {
            s.handshake_done();
        }
        assert_eq!(l.pending(), 0);
        assert_eq!(l.total(), 4);
        accept(l.admit(ip("192.0.2.11"), false, true));
    }
}
