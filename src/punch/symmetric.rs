//! Getting through a NAT that maps per destination ("symmetric"): which technique a session
//! uses, the ports it predicts, and the birthday arithmetic behind the numbers. Pure: no I/O.
//!
//! The ordinary checks fail when one side's NAT gives every destination its own public port:
//! the port S saw is not the port the peer's packets must reach. Two ways through, chosen
//! from how each side's NAT maps (reported at registration, passed on by S):
//! - the NAT counts ports up by a small step: predict the next few ports and check them all;
//! - the NAT picks ports at random: the symmetric side opens [`SOCKETS`] sockets, each of
//!   which sends toward the peer's single mapping and so gets a random public port of its
//!   own; the peer, whose NAT keeps one port for every destination, checks random ports of
//!   the symmetric side's address until one of them is among those open (a birthday
//!   problem: two sets of random ports meet long before either covers the range).
//!
//! When both NATs map per destination neither trick applies (each side's probes would leave
//! from ports the other cannot know); only a port mapping (UPnP, NAT-PMP, PCP) gets through,
//! otherwise the session stays on the relay.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::Rng;

use crate::proto::{Candidate, CandidateKind, NatMapping};

/// How many sockets the symmetric side opens toward the peer.
///
/// With `n` of the NAT's [`PORT_RANGE`] ports open and `k` distinct ports probed, a probe
/// misses them all with probability ∏(1 − n/(R − i)) ≈ (1 − n/R)^k. For n = 256 and
/// R = 64,512 that is 0.9960^k: about 252 probes expected (1.3 s at [`PROBE_RATE`]), 50%
/// after 175, 90% after 580, 99% after 1,160. 256 sockets is also few enough for any file
/// descriptor limit and any NAT's table, and they live only until the first success or
/// [`super::checks::DEADLINE`].
pub const SOCKETS: usize = 256;

/// Probes per second toward random ports of the symmetric side. Fast enough that the
/// expected meeting comes in about a second, slow enough not to look like a flood: each
/// probe is one ~100-byte STUN request, about 20 KB/s.
pub const PROBE_RATE: u32 = 200;

/// The ports a NAT allocates from for a source port of 1024 or above (Linux's range when none
/// is given; most NATs use most of it).
pub const PORT_RANGE: std::ops::RangeInclusive<u16> = 1024..=65535;

/// How long after the ordinary checks start the extra probing begins, unless a pair has
/// answered by then: a pair that works ordinarily answers within one round trip, and probes
/// sent before the symmetric side has opened its sockets are wasted.
pub const PROBE_AFTER: Duration = Duration::from_millis(300);

/// The largest difference between two successive public ports still taken as a counting
/// allocator. Two random ports land this close with probability 32/64,512 (0.05%), so a
/// random NAT is almost never mistaken for one that counts.
pub const MAX_STEP: i32 = 16;

/// How many successive allocations after the last one seen are predicted: the peer's NAT
/// hands out one port per new destination, and its host may talk to several (S's second
/// address, our host candidates, other peers) before its check to us.
pub const PREDICTED: usize = 32;

/// The extra technique a session uses on top of the ordinary checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// The ordinary checks are enough (or nothing is known).
    Ordinary,
    /// The peer's NAT counts ports: check these predicted addresses too.
    Predict(Vec<SocketAddr>),
    /// The peer's NAT picks random ports and opens many toward us: check random ports of
    /// this address at [`PROBE_RATE`].
    ProbeRandom(IpAddr),
    /// Our NAT picks random ports and the peer's keeps one: open [`SOCKETS`] sockets and send
    /// from each to this mapping of the peer's.
    OpenMany(SocketAddr),
    /// Both NATs map per destination and neither side has a port mapping: no direct UDP path
    /// can be found; the session stays on TCP or the relay.
    Impossible,
}

/// Chooses the technique from how our NAT and the peer's map, the peer's candidates, and
/// whether our gateway maps a port to us (`mapped`).
pub fn strategy(
    mine: NatMapping,
    peer: NatMapping,
    peer_candidates: &[Candidate],
    mapped: bool,
) -> Strategy {
    // NATs that map per destination are an IPv4 matter (IPv6 has no NAT here to speak
    // of, and the mapping was measured toward S over IPv4): only IPv4 candidates count.
    let first = |kind: CandidateKind| {
        peer_candidates
            .iter()
            .map(|c| (c.kind, crate::path::canonical(c.addr)))
            .find(|(k, a)| *k == kind && a.is_ipv4())
            .map(|(_, a)| a)
    };
    // A port either gateway opened is reachable from anywhere: the ordinary checks to it get
    // in, and their sources teach the other side the rest (peer-reflexive candidates).
    if mapped || first(CandidateKind::PortMapped).is_some() {
        return Strategy::Ordinary;
    }
    let Some(reflexive) = first(CandidateKind::ServerReflexive) else {
        return Strategy::Ordinary;
    };
    match (mine, peer) {
        (NatMapping::Independent, NatMapping::Sequential { step }) => {
            Strategy::Predict(predict(reflexive, step))
        }
        (NatMapping::Independent, NatMapping::Random) => Strategy::ProbeRandom(reflexive.ip()),
        (NatMapping::Random, NatMapping::Independent) => Strategy::OpenMany(reflexive),
        (mine, peer) if mine.per_destination() && peer.per_destination() => Strategy::Impossible,
        // A counting NAT on our side needs nothing from us: the peer predicts our ports.
        _ => Strategy::Ordinary,
    }
}

/// Classifies a NAT from the public ports one socket got toward S's two addresses.
/// `primary` is the mapping S's main address saw, `alternate` the one its other address saw.
pub fn classify(primary: SocketAddr, alternate: Option<SocketAddr>, public: bool) -> NatMapping {
    if public {
        return NatMapping::Independent;
    }
    let Some(alternate) = alternate else {
        return NatMapping::Unknown;
    };
    if alternate == primary {
        return NatMapping::Independent;
    }
    let step = i32::from(alternate.port()) - i32::from(primary.port());
    if alternate.ip() == primary.ip() && step != 0 && step.abs() <= MAX_STEP {
        NatMapping::Sequential { step }
    } else {
        NatMapping::Random
    }
}

/// The ports a counting NAT may hand out next after `last`, the mapping S saw: every port
/// of the [`PREDICTED`] allocations after the alternate one (which took the first step),
/// nearest first.
///
/// Every port of that window, not only those on the step's grid: the NAT counts for every
/// flow of every host behind it, so the step measured between S's two addresses may include
/// someone else's allocation (the agent's own TCP connection to S is one, in the lab's
/// counting NAT a step of 1 was measured as 2), and the flow toward us lands wherever the
/// counter is by then. The step gives the direction and the scale of the window.
pub fn predict(last: SocketAddr, step: i32) -> Vec<SocketAddr> {
    // The step comes from the peer, through S: bounded as [`classify`] bounds our own, so a
    // hostile peer cannot make the window (and this loop) as large as it likes.
    let (dir, size) = (
        step.signum(),
        step.unsigned_abs().min(MAX_STEP as u32) as i32,
    );
    let first = size + 1;
    let end = size * (PREDICTED as i32 + 1);
    (first..=end)
        .map(|k| i32::from(last.port()) + dir * k)
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| PORT_RANGE.contains(p))
        .map(|p| SocketAddr::new(last.ip(), p))
        .collect()
}

/// Random distinct ports of [`PORT_RANGE`], for [`Strategy::ProbeRandom`]. Each is probed
/// once: a port that was not open when probed is as likely as any other to be open later,
/// so a fresh one is always worth more.
#[derive(Debug, Default)]
pub struct RandomPorts {
    used: HashSet<u16>,
}

impl RandomPorts {
    /// The next port never given before, or `None` once the whole range is used.
    pub fn next(&mut self, rng: &mut impl Rng) -> Option<u16> {
        let size = usize::from(PORT_RANGE.end() - PORT_RANGE.start()) + 1;
        if self.used.len() >= size {
            return None;
        }
        loop {
            let port = rng.gen_range(PORT_RANGE);
            if self.used.insert(port) {
                return Some(port);
            }
        }
    }
}

/// The chance that `probes` distinct random ports miss all of `open` random ports of
/// [`PORT_RANGE`]: the arithmetic behind [`SOCKETS`] and [`PROBE_RATE`].
pub fn miss_probability(open: usize, probes: usize) -> f64 {
    let range = f64::from(u32::from(PORT_RANGE.end() - PORT_RANGE.start()) + 1);
    (0..probes).fold(1.0, |p, i| {
        p * (1.0 - open as f64 / (range - i as f64)).max(0.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::testing::cand;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_port_allocation() {
        let p = addr("203.0.113.5:40000");
        assert_eq!(classify(p, Some(p), false), NatMapping::Independent);
        assert_eq!(classify(p, None, true), NatMapping::Independent);
        assert_eq!(classify(p, None, false), NatMapping::Unknown);
        assert_eq!(
            classify(p, Some(addr("203.0.113.5:40001")), false),
            NatMapping::Sequential { step: 1 }
        );
        assert_eq!(
            classify(p, Some(addr("203.0.113.5:39998")), false),
            NatMapping::Sequential { step: -2 }
        );
        assert_eq!(
            classify(p, Some(addr("203.0.113.5:51234")), false),
            NatMapping::Random
        );
        // Another public address for another destination is no counter to predict from.
        assert_eq!(
            classify(p, Some(addr("203.0.113.6:40001")), false),
            NatMapping::Random
        );
    }

    #[test]
    fn predicts_the_ports_after_the_alternate_one() {
        let ports: Vec<u16> = predict(addr("203.0.113.5:40000"), 2)
            .iter()
            .map(|a| a.port())
            .collect();
        assert_eq!(ports.len(), 2 * PREDICTED);
        assert_eq!(&ports[..3], &[40003, 40004, 40005]);
        let one: Vec<u16> = predict(addr("203.0.113.5:40000"), 1)
            .iter()
            .map(|a| a.port())
            .collect();
        assert_eq!(one.len(), PREDICTED);
        assert_eq!(&one[..2], &[40002, 40003]);
        // Near the end of the range, only real ports.
        let high = predict(addr("203.0.113.5:65530"), 1);
        assert_eq!(
            high.iter().map(|a| a.port()).collect::<Vec<_>>(),
            [65532, 65533, 65534, 65535]
        );
        let low = predict(addr("203.0.113.5:1030"), -1);
        assert!(low.iter().all(|a| a.port() >= 1024));
    }

    #[test]
    fn a_step_a_peer_reports_is_bounded_as_our_own() {
        // A peer's NAT report arrives through S unchecked: an absurd step must cost no more
        // than the largest real one, and must not overflow.
        let p = addr("203.0.113.5:40000");
        let largest = predict(p, MAX_STEP).len();
        for step in [MAX_STEP + 1, 65_075_263, i32::MAX, i32::MIN, -MAX_STEP - 1] {
            assert!(predict(p, step).len() <= largest, "step {step}");
        }
    }

    #[test]
    fn chooses_by_both_sides_mapping() {
        let peer = [
            cand(CandidateKind::Host, "10.0.0.2:4000"),
            cand(CandidateKind::ServerReflexive, "203.0.113.9:40000"),
        ];
        use NatMapping::*;
        assert_eq!(
            strategy(Independent, Random, &peer, false),
            Strategy::ProbeRandom("203.0.113.9".parse().unwrap())
        );
        assert_eq!(
            strategy(Random, Independent, &peer, false),
            Strategy::OpenMany(addr("203.0.113.9:40000"))
        );
        assert_eq!(
            strategy(Independent, Sequential { step: 1 }, &peer, false),
            Strategy::Predict(predict(addr("203.0.113.9:40000"), 1))
        );
        assert_eq!(
            strategy(Sequential { step: 1 }, Independent, &peer, false),
            Strategy::Ordinary
        );
        assert_eq!(strategy(Random, Random, &peer, false), Strategy::Impossible);
        assert_eq!(
            strategy(Random, Sequential { step: 1 }, &peer, false),
            Strategy::Impossible
        );
        assert_eq!(
            strategy(Independent, Independent, &peer, false),
            Strategy::Ordinary
        );
        assert_eq!(strategy(Unknown, Random, &peer, false), Strategy::Ordinary);
        // A port mapping makes every trick unnecessary.
        let mut mapped = peer.to_vec();
        mapped.push(cand(CandidateKind::PortMapped, "203.0.113.9:5000"));
        assert_eq!(
            strategy(Independent, Random, &mapped, false),
            Strategy::Ordinary
        );
        assert_eq!(strategy(Random, Random, &mapped, false), Strategy::Ordinary);
        assert_eq!(
            strategy(Random, Independent, &peer, true),
            Strategy::Ordinary
        );
        assert_eq!(strategy(Random, Random, &peer, true), Strategy::Ordinary);
        // Without the address S saw there is nothing to aim at.
        assert_eq!(
            strategy(Independent, Random, &peer[..1], false),
            Strategy::Ordinary
        );
    }

    #[test]
    fn random_ports_are_distinct_and_in_range() {
        let mut ports = RandomPorts::default();
        let mut rng = rand::thread_rng();
        let drawn: Vec<u16> = (0..5000).filter_map(|_| ports.next(&mut rng)).collect();
        assert_eq!(drawn.len(), 5000);
        assert_eq!(drawn.iter().collect::<HashSet<_>>().len(), 5000);
        assert!(drawn.iter().all(|p| PORT_RANGE.contains(p)));
    }

    #[test]
    fn the_birthday_numbers_hold() {
        // What the doc comment of SOCKETS promises.
        assert!((miss_probability(SOCKETS, 175) - 0.5).abs() < 0.02);
        assert!(miss_probability(SOCKETS, 580) < 0.1);
        assert!(miss_probability(SOCKETS, 1160) < 0.01);
        // Within the checks' deadline at PROBE_RATE, failure is all but impossible.
        let probes =
            (super::super::checks::DEADLINE - PROBE_AFTER).as_secs_f64() * f64::from(PROBE_RATE);
        assert!(miss_probability(SOCKETS, probes as usize) < 0.001);
    }
}
