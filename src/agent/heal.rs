//! When a link asks S for a fresh introduction (a re-punch): pure scheduling on the time it
//! is given, so every rule is tested without sockets or clocks.
//!
//! A link that is not on direct UDP never settles: it tries again at once after losing a
//! direct path, then after [`FIRST`], doubling up to [`CAP`]; at once when the network
//! changes (an interface address, or the mapping S observes) or S closes its relay session.
//! One attempt is in flight at a time; an attempt ends when its punch reports, or after
//! [`ATTEMPT`] at most.

use std::time::{Duration, Instant};

/// The first wait after an attempt that found no direct path.
pub const FIRST: Duration = Duration::from_secs(5);

/// The longest wait between attempts.
pub const CAP: Duration = Duration::from_secs(120);

/// The longest an attempt counts as in flight: S's answer, the start delay and the checks'
/// deadline, with room to spare.
pub const ATTEMPT: Duration = Duration::from_secs(15);

/// The wait after an attempt S could not answer because the peer is moving to another S
/// of a cluster: it is registered there within a second or two, and a relayed connection
/// has no time for the usual back-off.
pub const MOVING: Duration = Duration::from_secs(1);

/// The re-punch schedule of one link.
#[derive(Debug)]
pub struct Heal {
    direct: bool,
    /// When the attempt in flight started.
    in_flight: Option<Instant>,
    /// Try again as soon as the attempt in flight ends.
    again: bool,
    next: Option<Instant>,
    step: u32,
    attempts: u64,
}

impl Heal {
    /// A link whose first introduction is in flight since `now`.
    pub fn new(now: Instant) -> Heal {
        Heal {
            direct: false,
            in_flight: Some(now),
            again: false,
            next: None,
            step: 0,
            attempts: 0,
        }
    }

    /// How long after the `step`th fruitless attempt (from 0) the next one starts.
    pub fn delay(step: u32) -> Duration {
        FIRST.saturating_mul(1 << step.min(16)).min(CAP)
    }

    /// The link's selected path changed: direct UDP or not.
    pub fn on_path(&mut self, direct: bool, now: Instant) {
        if direct {
            // Whatever was in flight reached its goal, however the path was found (the
            // ordinary checks, or a birthday punch beside them).
            self.direct = true;
            self.in_flight = None;
            self.again = false;
            self.next = None;
            self.step = 0;
        } else if self.direct {
            // A loss: try again at once.
            self.direct = false;
            self.at_once(now);
        }
    }

    /// Something changed that a new punch may get through: the local network, the mapping S
    /// sees, or the relay is gone. Ignored while direct.
    pub fn on_change(&mut self, now: Instant) {
        if !self.direct {
            self.step = 0;
            self.at_once(now);
        }
    }

    fn at_once(&mut self, now: Instant) {
        if self.in_flight.is_some() {
            self.again = true;
        } else {
            self.next = Some(now);
        }
    }

    /// Starts an attempt (the owner asked S for an introduction).
    pub fn on_attempt_started(&mut self, now: Instant) {
        self.in_flight = Some(now);
        self.next = None;
        self.attempts += 1;
    }

    /// The attempt in flight ended (its punch found a path or failed, or S refused).
    pub fn on_attempt_done(&mut self, now: Instant) {
        if self.in_flight.take().is_none() {
            return;
        }
        if self.direct {
            return;
        }
        if std::mem::take(&mut self.again) {
            self.next = Some(now);
        } else {
            self.next = Some(now + Self::delay(self.step));
            self.step = self.step.saturating_add(1);
        }
    }

    /// The attempt in flight ended because the peer is between two S: the next one starts
    /// [`MOVING`] later, and the back-off does not grow.
    pub fn on_attempt_moving(&mut self, now: Instant) {
        if self.in_flight.take().is_none() || self.direct {
            return;
        }
        self.again = false;
        self.next = Some(now + MOVING);
    }

    /// Passes on an attempt that was due but cannot be made (nothing to ask S with, or no S
    /// now): the next is scheduled as after a fruitless one, without counting this one.
    pub fn skip(&mut self, now: Instant) {
        self.next = Some(now + Self::delay(self.step));
        self.step = self.step.saturating_add(1);
    }

    /// Whether to start an attempt now. Ends an attempt in flight for too long.
    pub fn poll(&mut self, now: Instant) -> bool {
        if let Some(started) = self.in_flight {
            if now >= started + ATTEMPT {
                self.on_attempt_done(now);
            } else {
                return false;
            }
        }
        !self.direct && self.next.is_some_and(|t| now >= t)
    }

    /// When [`Self::poll`] next needs calling, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.in_flight {
            Some(started) => Some(started + ATTEMPT),
            None if !self.direct => self.next,
            None => None,
        }
    }

    /// Whether an attempt is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Attempts started so far (the first introduction not counted).
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// When the next attempt is due, if one is scheduled.
    pub fn next_attempt(&self) -> Option<Instant> {
        if self.direct || self.in_flight.is_some() {
            None
        } else {
            self.next
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Runs attempts that never find a direct path, each ending 2 s after it starts, and
    /// returns when each started (seconds from `t0`).
    fn fruitless(h: &mut Heal, t0: Instant, until: Duration) -> Vec<u64> {
        let mut starts = Vec::new();
        let mut t = t0;
        while t < t0 + until {
            if h.poll(t) {
                h.on_attempt_started(t);
                starts.push((t - t0).as_secs());
                h.on_attempt_done(t + secs(2));
                t += secs(2);
                continue;
            }
            t += Duration::from_millis(100);
        }
        starts
    }

    #[test]
    fn a_peer_moving_between_s_is_asked_for_again_soon_without_backing_off() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        h.on_attempt_done(t0);
        assert!(h.poll(t0 + FIRST));
        h.on_attempt_started(t0 + FIRST);
        h.on_attempt_moving(t0 + FIRST + secs(1));
        assert_eq!(h.next_attempt(), Some(t0 + FIRST + secs(1) + MOVING));
        assert!(h.poll(t0 + FIRST + secs(2)));
        h.on_attempt_started(t0 + FIRST + secs(2));
        // A fruitless attempt then backs off from where it was, not further.
        h.on_attempt_done(t0 + FIRST + secs(3));
        assert_eq!(
            h.next_attempt(),
            Some(t0 + FIRST + secs(3) + Heal::delay(1))
        );
    }

    #[test]
    fn backs_off_from_five_seconds_to_the_cap() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        h.on_attempt_done(t0 + secs(1));
        let starts = fruitless(&mut h, t0, secs(600));
        // First at 1 + 5; each next 2 s (the attempt) + the doubled wait, capped at 120 s.
        assert_eq!(starts, [6, 18, 40, 82, 164, 286, 408, 530]);
        assert_eq!(h.attempts(), 8);
    }

    #[test]
    fn a_lost_direct_path_is_retried_at_once_and_the_backoff_starts_over() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        h.on_attempt_done(t0);
        let _ = fruitless(&mut h, t0, secs(100));
        h.on_path(true, t0 + secs(100));
        assert!(!h.poll(t0 + secs(200)));
        assert_eq!(h.poll_timeout(), None);
        h.on_path(false, t0 + secs(300));
        assert!(h.poll(t0 + secs(300)));
        h.on_attempt_started(t0 + secs(300));
        h.on_attempt_done(t0 + secs(301));
        assert_eq!(h.next_attempt(), Some(t0 + secs(306)));
    }

    #[test]
    fn a_change_during_an_attempt_retries_as_soon_as_it_ends() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        h.on_change(t0 + secs(1));
        assert!(!h.poll(t0 + secs(1)));
        h.on_attempt_done(t0 + secs(3));
        assert!(h.poll(t0 + secs(3)));
    }

    #[test]
    fn reaching_direct_ends_the_attempt_so_a_loss_right_after_retries_at_once() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        // The path was found by other means than the attempt's checks, which go on.
        h.on_path(true, t0 + secs(1));
        assert!(!h.in_flight());
        h.on_path(false, t0 + secs(5));
        assert!(h.poll(t0 + secs(5)));
    }

    #[test]
    fn changes_are_ignored_while_direct() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        h.on_path(true, t0);
        h.on_attempt_done(t0);
        h.on_change(t0 + secs(1));
        assert!(!h.poll(t0 + secs(2)));
        assert_eq!(h.next_attempt(), None);
    }

    #[test]
    fn a_skipped_attempt_backs_off_and_is_not_counted() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        h.on_attempt_done(t0);
        assert!(h.poll(t0 + FIRST));
        h.skip(t0 + FIRST);
        assert!(!h.poll(t0 + FIRST));
        assert_eq!(h.attempts(), 0);
        assert_eq!(h.next_attempt(), Some(t0 + FIRST + Heal::delay(1)));
    }

    #[test]
    fn an_attempt_that_never_reports_ends_after_its_time() {
        let t0 = Instant::now();
        let mut h = Heal::new(t0);
        assert_eq!(h.poll_timeout(), Some(t0 + ATTEMPT));
        assert!(!h.poll(t0 + ATTEMPT - secs(1)));
        assert!(!h.poll(t0 + ATTEMPT));
        assert_eq!(h.next_attempt(), Some(t0 + ATTEMPT + FIRST));
    }
}
