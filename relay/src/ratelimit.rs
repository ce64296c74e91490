//! Per-source token buckets, and what counts as one source: an IPv4 address, or an IPv6 /64
//! (one subscriber usually holds a whole /64, so counting single IPv6 addresses would let
//! anyone multiply their allowance by 2^64).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The source an address is accounted to.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (!0u128 << 64);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// How many sources a [`RateLimiter`] tracks at most; new sources beyond it are refused
/// until idle ones are forgotten, so spoofed sources cannot grow the table without bound.
pub const MAX_SOURCES: usize = 65_536;

/// How often a full table is swept for idle sources; sweeping costs a pass over the table,
/// so a flood of new sources must not trigger it on every packet.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A token bucket per source: `rate` tokens a second, up to a burst of twice that.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    max_sources: usize,
    last_sweep: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// Allows `rate` events a second per source, in bursts of up to `2 × rate`.
    pub fn new(rate: u32) -> Self {
        Self::with_capacity(rate, MAX_SOURCES)
    }

    fn with_capacity(rate: u32, max_sources: usize) -> Self {
        let rate = f64::from(rate.max(1));
        RateLimiter {
            rate,
            burst: 2.0 * rate,
            buckets: HashMap::new(),
            max_sources,
            last_sweep: None,
        }
    }

    /// Whether an event from `ip` at `now` is within its allowance (and takes a token if so).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if !self.buckets.contains_key(&key) && !self.make_room(now) {
            return false;
        }
        let burst = self.burst;
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How many sources are tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Makes room for one more source if the table is full, by forgetting sources whose
    /// buckets have refilled (forgetting them changes nothing: a new bucket starts full).
    fn make_room(&mut self, now: Instant) -> bool {
        if self.buckets.len() < self.max_sources {
            return true;
        }
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return false;
        }
        self.last_sweep = Some(now);
        let refill = Duration::from_secs_f64(self.burst / self.rate);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < refill);
        self.buckets.len() < self.max_sources
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_addresses_or_slash_64s() {
        assert_eq!(source_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(source_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(source_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_key(ip("2001:db8:1:2::9")),
            source_key(ip("2001:db8:1:2:ffff::1"))
        );
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let mut rl = RateLimiter::new(10);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let passed = (0..100).filter(|_| rl.allow(a, t0)).count();
        assert_eq!(passed, 20);
        // Another source is not affected.
        assert!(rl.allow(ip("192.0.2.2"), t0));
        // A second later, ten more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| rl.allow(a, t1)).count(), 10);
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_are_forgotten() {
        let mut rl = RateLimiter::with_capacity(1, 4);
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(rl.allow(ip(&format!("192.0.2.{i}")), t0));
        }
        assert!(!rl.allow(ip("192.0.2.99"), t0));
        assert_eq!(rl.len(), 4);
        // Known sources still work while the table is full.
        assert!(rl.allow(ip("192.0.2.0"), t0));
        // Once buckets have refilled, their sources are forgotten to make room.
        let later = t0 + Duration::from_secs(10);
        assert!(rl.allow(ip("192.0.2.99"), later));
        assert_eq!(rl.len(), 1);
        assert!(!rl.is_empty());
    }
}
