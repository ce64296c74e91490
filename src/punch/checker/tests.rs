//! Two checkers against each other on simulated time, through simulated NATs, with loss,
//! delay and reordering. No sockets, no clocks: every run is exact and repeatable.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a test address")
}

/// How a simulated NAT maps and filters (RFC 4787's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// No NAT: the host's address is public.
    Public,
    /// Endpoint-independent mapping, address-and-port-dependent filtering (Linux masquerade).
    Easy,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// A new port per destination, address-and-port-dependent filtering.
    Symmetric,
}

/// One side's NAT: its mappings and what each mapping has sent to.
struct Nat {
    behaviour: Behaviour,
    public_ip: IpAddr,
    host: SocketAddr,
    /// Destination (or `None` for endpoint-independent) → public port.
    ports: HashMap<Option<SocketAddr>, u16>,
    /// (public port, destination) pairs sent, for filtering.
    sent: HashSet<(u16, SocketAddr)>,
    next_port: u16,
}

impl Nat {
    fn new(behaviour: Behaviour, host: &str, public_ip: &str) -> Nat {
        Nat {
            behaviour,
            public_ip: public_ip.parse().expect("an IP"),
            host: addr(host),
            ports: HashMap::new(),
            sent: HashSet::new(),
            next_port: 40_000,
        }
    }

    /// The public address a packet from the host to `to` leaves from.
    fn outbound(&mut self, to: SocketAddr) -> SocketAddr {
        if self.behaviour == Behaviour::Public {
            return self.host;
        }
        let key = (self.behaviour == Behaviour::Symmetric).then_some(to);
        let next = &mut self.next_port;
        let port = *self.ports.entry(key).or_insert_with(|| {
            *next += 7;
            *next
        });
        self.sent.insert((port, to));
        SocketAddr::new(self.public_ip, port)
    }

    /// Whether a packet from `from` to the public address `to` gets in.
    fn inbound(&self, from: SocketAddr, to: SocketAddr) -> bool {
        match self.behaviour {
            Behaviour::Public => to == self.host,
            _ if to.ip() != self.public_ip => false,
            Behaviour::Restricted => self
                .sent
                .iter()
                .any(|(p, d)| *p == to.port() && d.ip() == from.ip()),
            Behaviour::Easy | Behaviour::Symmetric => self.sent.contains(&(to.port(), from)),
        }
    }

    /// Forgets every mapping (a router reboot): the next packets get new ports.
    fn flush(&mut self) {
        self.ports.clear();
        self.sent.clear();
        self.next_port += 1000;
    }
}

#[derive(Debug, Clone, Copy)]
enum Payload {
    Check(TransactionId),
    Response(TransactionId),
}

#[derive(Debug, Clone, Copy)]
struct Packet {
    /// The side it goes to.
    to_side: usize,
    from: SocketAddr,
    to: SocketAddr,
    payload: Payload,
}

struct Side {
    checker: Checker,
    nat: Nat,
    events: Vec<(Duration, Event)>,
    /// Checks sent (each answered one also costs the other side a response).
    sent: usize,
}

/// The network between the two sides: S (for server-reflexive addresses) is not simulated;
/// a side's mapping toward S is made by sending to S's address once.
struct Sim {
    start: Instant,
    now: Instant,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    packets: HashMap<u64, Packet>,
    seq: u64,
    sides: [Side; 2],
    loss: f64,
    delay: Duration,
    jitter: Duration,
    cut: bool,
}

const S: &str = "198.51.100.1:7000";

impl Sim {
    /// Two sides behind `a` and `b`; each side's checker gets `candidates(other's NAT)`.
    fn new(a: Behaviour, b: Behaviour, seed: u64) -> Sim {
        let mut na = Nat::new(a, "10.0.1.2:5000", "203.0.113.1");
        let mut nb = Nat::new(b, "10.0.2.2:6000", "203.0.113.2");
        if a == Behaviour::Public {
            na.host = addr("203.0.113.1:5000");
        }
        if b == Behaviour::Public {
            nb.host = addr("203.0.113.2:6000");
        }
        let now = Instant::now();
        let srflx_a = na.outbound(addr(S));
        let srflx_b = nb.outbound(addr(S));
        let sides = [
            Side {
                checker: Checker::new(&[nb.host, srflx_b], now, 1),
                nat: na,
                events: Vec::new(),
                sent: 0,
            },
            Side {
                checker: Checker::new(&[srflx_a], now, 2),
                nat: nb,
                events: Vec::new(),
                sent: 0,
            },
        ];
        Sim {
            start: now,
            now,
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            packets: HashMap::new(),
            seq: 0,
            sides,
            loss: 0.0,
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            cut: false,
        }
    }

    /// Starts a new introduction: fresh checkers with each side's current candidates.
    fn reintroduce(&mut self) {
        let srflx_a = self.sides[0].nat.outbound(addr(S));
        let srflx_b = self.sides[1].nat.outbound(addr(S));
        self.sides[0].checker = Checker::new(&[srflx_b], self.now, 3);
        self.sides[1].checker = Checker::new(&[srflx_a], self.now, 4);
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Sends from side `from_side`'s host to `to`, through both NATs.
    fn send(&mut self, from_side: usize, to: SocketAddr, payload: Payload) {
        if matches!(payload, Payload::Check(_)) {
            self.sides[from_side].sent += 1;
        }
        let from = self.sides[from_side].nat.outbound(to);
        let to_side = 1 - from_side;
        if self.cut || self.rng.gen_bool(self.loss) {
            return;
        }
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(self.rng.gen::<f64>())
        };
        let at = self.now + self.delay + jitter;
        self.seq += 1;
        self.packets.insert(
            self.seq,
            Packet {
                to_side,
                from,
                to,
                payload,
            },
        );
        self.queue.push(Reverse((at, self.seq, to_side)));
    }

    fn deliver(&mut self, packet: Packet) {
        let side = packet.to_side;
        if self.cut || !self.sides[side].nat.inbound(packet.from, packet.to) {
            return;
        }
        match packet.payload {
            // The router answers every valid check and reports where it came from.
            Payload::Check(tid) => {
                self.sides[side]
                    .checker
                    .handle_check_from(packet.from, self.now);
                self.send(side, packet.from, Payload::Response(tid));
            }
            Payload::Response(tid) => {
                self.sides[side]
                    .checker
                    .handle_response(tid, packet.from, self.now)
            }
        }
    }

    fn drain(&mut self) {
        for i in 0..2 {
            while let Some(t) = self.sides[i].checker.poll_transmit(self.now) {
                self.send(i, t.to, Payload::Check(t.tid));
            }
            let elapsed = self.elapsed();
            while let Some(e) = self.sides[i].checker.poll_event() {
                self.sides[i].events.push((elapsed, e));
            }
        }
    }

    /// Runs until `elapsed` from the start.
    fn run_until(&mut self, elapsed: Duration) {
        let end = self.start + elapsed;
        let mut spins = 0;
        loop {
            self.drain();
            let next_packet = self.queue.peek().map(|Reverse((t, _, _))| *t);
            let next = [
                next_packet,
                self.sides[0].checker.poll_timeout(),
                self.sides[1].checker.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|t| *t <= end) else {
                self.now = self.now.max(end);
                self.drain();
                return;
            };
            if next <= self.now {
                spins += 1;
                assert!(spins < 10_000, "the checkers spin at {:?}", self.elapsed());
            } else {
                spins = 0;
            }
            self.now = self.now.max(next);
            while let Some(Reverse((t, seq, _))) = self.queue.peek().copied() {
                if t > self.now {
                    break;
                }
                self.queue.pop();
                if let Some(p) = self.packets.remove(&seq) {
                    self.deliver(p);
                }
            }
            for side in &mut self.sides {
                side.checker.handle_timeout(self.now);
            }
        }
    }

    fn events(&self, side: usize) -> &[(Duration, Event)] {
        &self.sides[side].events
    }

    /// When side `side` first had an event matching `f`.
    fn first(&self, side: usize, f: impl Fn(&Event) -> bool) -> Option<Duration> {
        self.events(side)
            .iter()
            .find(|(_, e)| f(e))
            .map(|(t, _)| *t)
    }

    fn found(&self, side: usize) -> Option<(Duration, SocketAddr, Duration)> {
        self.events(side).iter().find_map(|(t, e)| match e {
            Event::Found { remote, rtt } => Some((*t, *remote, *rtt)),
            _ => None,
        })
    }
}

fn is_dead(e: &Event) -> bool {
    matches!(e, Event::Dead { .. })
}

#[test]
fn two_public_hosts_find_each_other_at_once() {
    let mut sim = Sim::new(Behaviour::Public, Behaviour::Public, 1);
    sim.run_until(Duration::from_secs(3));
    let (t_a, remote_a, rtt_a) = sim.found(0).expect("A found a path");
    let (t_b, remote_b, _) = sim.found(1).expect("B found a path");
    assert_eq!(remote_a, addr("203.0.113.2:6000"));
    assert_eq!(remote_b, addr("203.0.113.1:5000"));
    assert_eq!(rtt_a, Duration::from_millis(20));
    // The first answer, then the settle time.
    assert!(t_a <= Duration::from_millis(20) + SETTLE, "{t_a:?}");
    assert!(t_b <= Duration::from_millis(20) + SETTLE, "{t_b:?}");
    assert!(sim.first(0, is_dead).is_none() && sim.first(1, is_dead).is_none());
}

#[test]
fn both_behind_easy_nats_meet_once_both_have_sent() {
    let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 2);
    sim.run_until(Duration::from_secs(3));
    let (_, remote_a, _) = sim.found(0).expect("A found a path");
    let (_, remote_b, _) = sim.found(1).expect("B found a path");
    assert_eq!(remote_a.ip(), "203.0.113.2".parse::<IpAddr>().unwrap());
    assert_eq!(remote_b.ip(), "203.0.113.1".parse::<IpAddr>().unwrap());
}

#[test]
fn a_symmetric_side_is_reached_at_the_port_its_checks_came_from() {
    let mut sim = Sim::new(Behaviour::Restricted, Behaviour::Symmetric, 3);
    sim.run_until(Duration::from_secs(3));
    let (_, remote_a, _) = sim.found(0).expect("A found a path");
    let (_, remote_b, _) = sim.found(1).expect("B found a path");
    // B's NAT gave the port toward A, not the one S saw: A learnt it from B's checks.
    let toward_a = sim.sides[1].nat.ports[&Some(addr("203.0.113.1:40007"))];
    assert_eq!(
        remote_a,
        SocketAddr::new("203.0.113.2".parse().unwrap(), toward_a)
    );
    assert_eq!(remote_b, addr("203.0.113.1:40007"));
}

#[test]
fn thirty_percent_loss_each_way_still_finds_the_path_and_keeps_it() {
    for seed in 0..40 {
        let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 100 + seed);
        sim.loss = 0.3;
        sim.run_until(DEADLINE + Duration::from_secs(1));
        assert!(
            sim.found(0).is_some() && sim.found(1).is_some(),
            "seed {seed}: {:?} / {:?}",
            sim.events(0),
            sim.events(1)
        );
        // At this loss a run of unlucky rounds can pass for a death now and then; the path
        // must then come back with the next answered round, not stay dead.
        sim.run_until(Duration::from_secs(60));
        for side in 0..2 {
            let events = sim.events(side);
            for (i, (t, e)) in events.iter().enumerate() {
                if is_dead(e) {
                    let back = events[i..]
                        .iter()
                        .find(|(_, e)| matches!(e, Event::Revived { .. }))
                        .map(|(at, _)| *at - *t);
                    assert!(
                        back.is_some_and(|d| d <= 4 * INTERVAL),
                        "seed {seed}, side {side}: dead at {t:?}, back after {back:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn ten_percent_loss_never_passes_for_a_dead_path() {
    for seed in 0..40 {
        let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 200 + seed);
        sim.loss = 0.1;
        sim.run_until(Duration::from_secs(120));
        assert!(
            sim.found(0).is_some() && sim.found(1).is_some(),
            "seed {seed}"
        );
        let dead = sim.first(0, is_dead).or(sim.first(1, is_dead));
        assert!(dead.is_none(), "seed {seed}: a path died at {dead:?}");
    }
}

#[test]
fn delay_and_reordering_do_not_confuse_the_checks() {
    let mut sim = Sim::new(Behaviour::Easy, Behaviour::Restricted, 4);
    sim.delay = Duration::from_millis(20);
    sim.jitter = Duration::from_millis(60);
    sim.run_until(Duration::from_secs(30));
    let (_, _, rtt) = sim.found(0).expect("A found a path");
    assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
    assert!(sim.found(1).is_some());
    assert!(sim.first(0, is_dead).is_none() && sim.first(1, is_dead).is_none());
}

#[test]
fn a_path_that_dies_is_reported_and_revived_when_it_returns() {
    let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 5);
    sim.run_until(Duration::from_secs(5));
    assert!(sim.found(0).is_some() && sim.found(1).is_some());
    sim.cut = true;
    let cut_at = sim.elapsed();
    sim.run_until(Duration::from_secs(25));
    for side in 0..2 {
        let dead = sim.first(side, is_dead).expect("the cut path is dead");
        let after = dead - cut_at;
        assert!(
            after >= DEAD_AFTER - INTERVAL && after <= DEAD_AFTER + INTERVAL,
            "side {side}: dead {after:?} after the cut"
        );
    }
    sim.cut = false;
    let healed_at = sim.elapsed();
    sim.run_until(Duration::from_secs(30));
    for side in 0..2 {
        let revived = sim
            .first(side, |e| matches!(e, Event::Revived { .. }))
            .expect("the path came back");
        assert!(
            revived - healed_at <= INTERVAL + Duration::from_millis(50),
            "side {side}: revived {:?} after the heal",
            revived - healed_at
        );
    }
}

#[test]
fn a_new_introduction_finds_the_peers_new_mapping() {
    let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 6);
    sim.run_until(Duration::from_secs(5));
    let (_, before, _) = sim.found(0).expect("A found a path");
    // B's router reboots: its ports change; the old path dies on both sides.
    sim.sides[1].nat.flush();
    sim.run_until(Duration::from_secs(10));
    assert!(sim.first(0, is_dead).is_some() && sim.first(1, is_dead).is_some());
    sim.sides[0].events.clear();
    sim.sides[1].events.clear();
    sim.reintroduce();
    sim.run_until(Duration::from_secs(15));
    let (_, after, _) = sim.found(0).expect("A found the new path");
    assert_ne!(before, after);
    assert!(sim.found(1).is_some());
}

#[test]
fn a_dead_path_moves_to_the_peers_new_port_when_its_checks_get_through() {
    // A filters by address only, so B's keepalives from its new port reach A.
    let mut sim = Sim::new(Behaviour::Restricted, Behaviour::Easy, 7);
    sim.run_until(Duration::from_secs(5));
    let (_, before, _) = sim.found(0).expect("A found a path");
    sim.sides[1].nat.flush();
    sim.run_until(Duration::from_secs(12));
    let moved = sim
        .events(0)
        .iter()
        .any(|(_, e)| *e == Event::Moved { from: before });
    assert!(moved, "{:?}", sim.events(0));
    let (remote, live) = sim.sides[0].checker.path().expect("A has a path");
    assert!(live && remote != before, "{remote} {live}");
    // B's checks from its new port were answered all along (A filters by address only):
    // B never lost its path.
    assert!(sim.first(1, is_dead).is_none(), "{:?}", sim.events(1));
}

#[test]
fn nothing_answering_fails_at_the_deadline() {
    let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 8);
    sim.cut = true;
    sim.run_until(DEADLINE + Duration::from_secs(1));
    let failed = sim.events(0).last().copied();
    assert!(
        matches!(failed, Some((t, Event::Failed { tried: 2 })) if t == DEADLINE),
        "{failed:?}"
    );
    assert!(sim.sides[0].checker.is_done());
    assert_eq!(sim.sides[0].checker.poll_timeout(), None);
    let sent = sim.sides[0].sent;
    // Two pairs, each on the retransmit schedule: about fifteen checks each, not more.
    assert!(sent <= 2 * 16, "{sent}");
}

#[test]
fn a_path_dead_for_good_expires_and_stops_sending() {
    let mut sim = Sim::new(Behaviour::Public, Behaviour::Public, 9);
    sim.run_until(Duration::from_secs(2));
    sim.cut = true;
    sim.run_until(Duration::from_secs(2) + DEAD_AFTER + GIVE_UP + Duration::from_secs(2));
    let expired = sim.first(0, |e| matches!(e, Event::Expired { .. }));
    assert!(expired.is_some(), "{:?}", sim.events(0));
    assert!(sim.sides[0].checker.is_done());
    let sent = sim.sides[0].sent;
    sim.run_until(Duration::from_secs(120));
    assert_eq!(sim.sides[0].sent, sent, "an expired checker sent more");
}

#[test]
fn an_idle_live_path_costs_a_few_checks_a_second() {
    let mut sim = Sim::new(Behaviour::Public, Behaviour::Public, 10);
    sim.run_until(Duration::from_secs(5));
    let before = sim.sides[0].sent;
    sim.run_until(Duration::from_secs(65));
    let per_minute = sim.sides[0].sent - before;
    // One check per interval, answered at once: no retransmits.
    assert_eq!(per_minute as u32, 60_000 / INTERVAL.as_millis() as u32);
}

#[test]
fn peer_reflexive_admission_is_bounded() {
    let now = Instant::now();
    let mut c = Checker::new(&[addr("203.0.113.9:1")], now, 11);
    for port in 0..200u16 {
        c.handle_check_from(
            SocketAddr::new("203.0.113.7".parse().unwrap(), 1000 + port),
            now,
        );
    }
    let mut targets = HashSet::new();
    let mut t = now;
    while t < now + DEADLINE {
        while let Some(tx) = c.poll_transmit(t) {
            targets.insert(tx.to);
        }
        t += Duration::from_millis(10);
    }
    assert_eq!(targets.len(), MAX_PAIRS);
}

#[test]
fn responses_from_another_address_or_unknown_transactions_are_ignored() {
    let now = Instant::now();
    let target = addr("203.0.113.9:1");
    let mut c = Checker::new(&[target], now, 12);
    let tx = c.poll_transmit(now).expect("a first check");
    c.handle_response(tx.tid, addr("203.0.113.9:2"), now);
    let other = TransactionId::new([9; 12]);
    c.handle_response(other, target, now);
    c.handle_timeout(now + SETTLE * 2);
    assert!(c.poll_event().is_none());
    c.handle_response(tx.tid, target, now + Duration::from_millis(5));
    c.handle_timeout(now + Duration::from_millis(5) + SETTLE);
    assert_eq!(
        c.poll_event(),
        Some(Event::Found {
            remote: target,
            rtt: Duration::from_millis(5)
        })
    );
}

#[test]
fn a_probe_found_path_competes_for_nomination() {
    let now = Instant::now();
    let mut c = Checker::new(&[addr("203.0.113.9:1")], now, 13);
    assert!(c.is_checking());
    let probed = addr("203.0.113.9:4242");
    c.handle_found(probed, Duration::from_millis(3), now);
    assert!(!c.is_checking());
    c.handle_timeout(now + SETTLE);
    assert_eq!(
        c.poll_event(),
        Some(Event::Found {
            remote: probed,
            rtt: Duration::from_millis(3)
        })
    );
}

#[test]
fn a_punch_costs_a_handful_of_checks() {
    // What one (re-)punch sends between two easy NATs, each side with an address the other
    // cannot reach (a LAN address) beside the one that works, until both have nominated.
    let mut sim = Sim::new(Behaviour::Easy, Behaviour::Easy, 14);
    sim.run_until(Duration::from_secs(1));
    assert!(sim.found(0).is_some() && sim.found(1).is_some());
    let (a, b) = (sim.sides[0].sent, sim.sides[1].sent);
    // A: two pairs, the unreachable one retransmitted until nomination; B: one pair, its
    // first check dropped by A's NAT until A has sent. Each check is about 80 bytes.
    println!("one punch: A sent {a} checks, B {b}");
    assert!(a <= 8 && b <= 4, "checks sent: A {a}, B {b}");
}
