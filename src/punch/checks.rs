//! The connectivity-check plan: which remote addresses to check, when to send each check,
//! and which answered pair to use. No I/O, so all of it is unit-tested.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::candidates::{is_link_local, Families};
use crate::proto::{Candidate, CandidateKind};

/// Pacing between the first checks of successive pairs (RFC 8445's Ta is 50 ms).
pub const PACING: Duration = Duration::from_millis(50);

/// How long checks go on before the session gives up on a direct path.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// After the first pair answers, how long to wait for a better one (lower RTT) before using
/// it: long enough for a same-LAN answer to overtake a reflexive one, short enough that
/// nobody notices.
pub const SETTLE: Duration = Duration::from_millis(150);

/// Most candidates taken from a peer: bounds how many addresses a stranger can make us send
/// checks to.
pub const MAX_CANDIDATES: usize = 16;

/// When the `n`th check (from 0) of a pair is sent, counted from the pair's first check:
/// 0, 100, 300, 700 ms, then every 1 s. Retransmits ride out loss; the 1 s tail keeps a NAT
/// that opens late (its side started late) in reach until [`DEADLINE`].
pub fn send_offset(n: u32) -> Duration {
    let ms = match n {
        0 => 0,
        1 => 100,
        2 => 300,
        3 => 700,
        n => 700 + 1000 * u64::from(n - 3),
    };
    Duration::from_millis(ms)
}

/// The remote addresses to check, best first, without duplicates: host candidates (a shared
/// LAN is the best path there is), then mapped, reflexive and learnt ones. At most
/// [`MAX_CANDIDATES`], of the socket's address `families`, and of UDP or (`tcp`) TCP kinds.
///
/// Both families are checked side by side and the pair with the lowest RTT wins whatever
/// its family ([`best`]): where IPv6 needs no NAT traversal it often succeeds where IPv4
/// cannot, and where both work they are usually within a millisecond of each other, so
/// measured RTT is a better judge than a fixed preference for either.
pub fn plan(candidates: &[Candidate], families: Families, tcp: bool) -> Vec<SocketAddr> {
    let rank = |k: CandidateKind| match k {
        CandidateKind::Host => 0,
        CandidateKind::PortMapped => 1,
        CandidateKind::ServerReflexive => 2,
        CandidateKind::PeerReflexive => 3,
        CandidateKind::TcpHost => 0,
        CandidateKind::TcpPortMapped => 1,
        CandidateKind::TcpServerReflexive => 2,
    };
    let mut sorted: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.kind.is_tcp() == tcp)
        .filter(|c| families.allows(c.addr) && c.addr.port() != 0)
        .filter(|c| !c.addr.ip().is_unspecified() && !c.addr.ip().is_multicast())
        .filter(|c| !is_link_local(c.addr.ip()))
        .collect();
    sorted.sort_by_key(|c| rank(c.kind));
    let mut seen = HashSet::new();
    sorted
        .into_iter()
        .map(|c| crate::path::canonical(c.addr))
        .filter(|a| seen.insert(*a))
        .take(MAX_CANDIDATES)
        .collect()
}

/// Picks the pair to use among those that answered: lowest RTT.
pub fn best(answered: &[(SocketAddr, Duration)]) -> Option<(SocketAddr, Duration)> {
    answered.iter().copied().min_by_key(|(_, rtt)| *rtt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::testing::cand;

    #[test]
    fn plan_orders_dedups_and_filters() {
        let cands = [
            cand(CandidateKind::ServerReflexive, "203.0.113.5:4000"),
            cand(CandidateKind::Host, "10.0.0.2:4000"),
            cand(CandidateKind::Host, "203.0.113.5:4000"),
            cand(CandidateKind::Host, "[2001:db8::1]:4000"),
            cand(CandidateKind::Host, "0.0.0.0:4000"),
            cand(CandidateKind::Host, "10.0.0.3:0"),
        ];
        let p = plan(&cands, Families::V4, false);
        assert_eq!(
            p,
            vec![
                "10.0.0.2:4000".parse().unwrap(),
                "203.0.113.5:4000".parse::<SocketAddr>().unwrap()
            ]
        );
    }

    #[test]
    fn a_dual_stack_plan_checks_both_families() {
        let cands = [
            cand(CandidateKind::ServerReflexive, "203.0.113.5:4000"),
            cand(CandidateKind::Host, "[2001:db8:1::2]:4000"),
            cand(CandidateKind::Host, "[fe80::1]:4000"),
        ];
        let both = Families { v4: true, v6: true };
        let p = plan(&cands, both, false);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0], "[2001:db8:1::2]:4000".parse().unwrap());
        let v6_only = Families {
            v4: false,
            v6: true,
        };
        assert!(plan(&cands, v6_only, false).iter().all(|a| a.is_ipv6()));
    }

    #[test]
    fn plan_is_bounded() {
        let cands: Vec<Candidate> = (1..100)
            .map(|i| cand(CandidateKind::Host, &format!("10.0.0.{i}:4000")))
            .collect();
        assert_eq!(plan(&cands, Families::V4, false).len(), MAX_CANDIDATES);
        assert!(plan(&cands, Families::V4, true).is_empty());
    }

    #[test]
    fn retransmits_back_off_then_stay_steady() {
        let offsets: Vec<u64> = (0..7).map(|n| send_offset(n).as_millis() as u64).collect();
        assert_eq!(offsets, [0, 100, 300, 700, 1700, 2700, 3700]);
        let sends_before_deadline = (0..).take_while(|n| send_offset(*n) < DEADLINE).count();
        assert!(sends_before_deadline < 16, "{sends_before_deadline}");
    }

    #[test]
    fn best_is_the_fastest() {
        let a: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let b: SocketAddr = "203.0.113.5:1".parse().unwrap();
        let ms = Duration::from_millis;
        assert_eq!(best(&[(b, ms(30)), (a, ms(1))]), Some((a, ms(1))));
        assert_eq!(best(&[]), None);
    }
}
