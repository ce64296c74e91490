//! Introducing two agents: the pair of [`Rendezvous`] messages for one session, with fresh
//! short-term credentials and start delays that make both sides begin checking together.
//! Pure: no I/O, so every rule here is tested directly.

use std::net::SocketAddr;
use std::time::Duration;

use p2ptun::proto::{Candidate, CandidateKind, Credentials, Fingerprint, NatMapping, Rendezvous};
use rand::distributions::Alphanumeric;
use rand::Rng;

/// Length of a username fragment (RFC 8445 §5.3 asks for at least 24 bits of randomness;
/// 8 alphanumerics give about 47).
pub const UFRAG_LEN: usize = 8;
/// Length of a password (RFC 8445 asks for at least 128 bits; 24 alphanumerics give about
/// 142).
pub const PWD_LEN: usize = 24;
/// Slack added to the later side's delivery time, for the time S takes to send and the
/// agents to act.
pub const START_MARGIN: Duration = Duration::from_millis(20);

/// What S knows of one side of a session.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// The identity the agent proved in its handshake.
    pub fingerprint: Fingerprint,
    /// The candidates it sent.
    pub candidates: &'a [Candidate],
    /// The address S sees its control connection come from.
    pub observed: SocketAddr,
    /// The round-trip time of its control connection.
    pub rtt: Duration,
    /// How its NAT picks public ports, as it reported.
    pub nat: NatMapping,
}

/// The two messages of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introduction {
    /// For the forwarder, as the answer to its `Connect`.
    pub to_forwarder: Rendezvous,
    /// For the exposer, pushed as `Incoming`.
    pub to_exposer: Rendezvous,
}

/// Makes the session `session` between `forwarder`, which asked for `name`, and `exposer`;
/// `relay` says whether S relays its packets.
pub fn introduce(
    session: u64,
    name: &str,
    forwarder: Side,
    exposer: Side,
    relay: bool,
) -> Introduction {
    let (f_ufrag, f_pwd) = (random_string(UFRAG_LEN), random_string(PWD_LEN));
    let (e_ufrag, e_pwd) = (random_string(UFRAG_LEN), random_string(PWD_LEN));
    let (f_wait, e_wait) = start_delays(forwarder.rtt, exposer.rtt);
    Introduction {
        to_forwarder: Rendezvous {
            session,
            name: name.to_owned(),
            peer_fingerprint: exposer.fingerprint,
            peer_candidates: with_observed(exposer.candidates, exposer.observed),
            credentials: Credentials {
                local_ufrag: f_ufrag.clone(),
                local_pwd: f_pwd.clone(),
                remote_ufrag: e_ufrag.clone(),
                remote_pwd: e_pwd.clone(),
            },
            start_in_ms: millis(f_wait),
            relay,
            peer_nat: exposer.nat,
        },
        to_exposer: Rendezvous {
            session,
            name: name.to_owned(),
            peer_fingerprint: forwarder.fingerprint,
            peer_candidates: with_observed(forwarder.candidates, forwarder.observed),
            credentials: Credentials {
                local_ufrag: e_ufrag,
                local_pwd: e_pwd,
                remote_ufrag: f_ufrag,
                remote_pwd: f_pwd,
            },
            start_in_ms: millis(e_wait),
            relay,
            peer_nat: forwarder.nat,
        },
    }
}

/// How long each side waits after receiving its message, so both start at the same moment.
///
/// S sends both messages at once; each arrives about half its connection's RTT later. The
/// common start is the later arrival plus [`START_MARGIN`]; each side waits from its own
/// arrival until then. Returns (forwarder's wait, exposer's wait).
pub fn start_delays(rtt_forwarder: Duration, rtt_exposer: Duration) -> (Duration, Duration) {
    let start = rtt_forwarder.max(rtt_exposer) / 2 + START_MARGIN;
    (start - rtt_forwarder / 2, start - rtt_exposer / 2)
}

/// `candidates` plus the address S observed, as a server-reflexive candidate, unless the
/// agent listed that address already.
pub fn with_observed(candidates: &[Candidate], observed: SocketAddr) -> Vec<Candidate> {
    let mut all = candidates.to_vec();
    // A TCP candidate with the same address (NATs that keep ports map the TCP punching port,
    // which shares the UDP port's number, to the same public port) is no UDP candidate.
    if !all.iter().any(|c| c.addr == observed && !c.kind.is_tcp()) {
        all.push(Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: observed,
        });
    }
    all
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A random string of ASCII letters and digits (the ICE credential alphabet minus '+' and
/// '/', which some implementations mishandle).
fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tcp_candidate_at_the_observed_address_does_not_hide_the_udp_one() {
        use super::*;
        let observed: SocketAddr = "203.0.113.10:4000".parse().unwrap();
        let tcp = Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr: observed,
        };
        let all = with_observed(&[tcp], observed);
        assert!(all
            .iter()
            .any(|c| c.kind == CandidateKind::ServerReflexive && c.addr == observed));
        let udp = Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: observed,
        };
        assert_eq!(with_observed(&[udp], observed).len(), 1);
    }

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn both_sides_start_together() {
        let (f, e) = start_delays(ms(100), ms(40));
        // The forwarder's message lands at 50 ms, the exposer's at 20 ms; both start at 70.
        assert_eq!(f, ms(20));
        assert_eq!(e, ms(50));
        assert_eq!(ms(50) + f, ms(20) + e);
        assert_eq!(start_delays(ms(0), ms(0)), (START_MARGIN, START_MARGIN));
        let (f, e) = start_delays(ms(30), ms(30));
        assert_eq!(f, e);
    }

    #[test]
    fn the_introduction_mirrors_credentials_and_candidates() {
        let host_f = Candidate {
            kind: CandidateKind::Host,
            addr: "10.0.0.2:4000".parse().unwrap(),
        };
        let forwarder = Side {
            fingerprint: Fingerprint([1; 32]),
            candidates: &[host_f],
            observed: "198.51.100.1:5000".parse().unwrap(),
            rtt: ms(80),
            nat: NatMapping::Random,
        };
        let observed_e: SocketAddr = "203.0.113.9:6000".parse().unwrap();
        let listed = [Candidate {
            kind: CandidateKind::PortMapped,
            addr: observed_e,
        }];
        let exposer = Side {
            fingerprint: Fingerprint([2; 32]),
            candidates: &listed,
            observed: observed_e,
            rtt: ms(20),
            nat: NatMapping::Independent,
        };
        let intro = introduce(7, "home", forwarder, exposer, true);
        let (f, e) = (&intro.to_forwarder, &intro.to_exposer);
        assert_eq!((f.session, e.session), (7, 7));
        assert_eq!((f.name.as_str(), e.name.as_str()), ("home", "home"));
        assert_eq!(f.peer_fingerprint, exposer.fingerprint);
        assert_eq!(e.peer_fingerprint, forwarder.fingerprint);
        // The exposer listed its observed address already: no duplicate.
        assert_eq!(f.peer_candidates, listed.to_vec());
        assert_eq!(
            e.peer_candidates,
            vec![
                host_f,
                Candidate {
                    kind: CandidateKind::ServerReflexive,
                    addr: forwarder.observed
                }
            ]
        );
        assert_eq!(f.credentials.local_ufrag, e.credentials.remote_ufrag);
        assert_eq!(f.credentials.local_pwd, e.credentials.remote_pwd);
        assert_eq!(f.credentials.remote_ufrag, e.credentials.local_ufrag);
        assert_eq!(f.credentials.remote_pwd, e.credentials.local_pwd);
        assert_eq!(f.credentials.local_ufrag.len(), UFRAG_LEN);
        assert_eq!(f.credentials.local_pwd.len(), PWD_LEN);
        assert_ne!(f.credentials.local_pwd, e.credentials.local_pwd);
        assert!(f
            .credentials
            .local_pwd
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()));
        assert_eq!((f.start_in_ms, e.start_in_ms), (20, 50));
        assert!(f.relay && e.relay);
        // Each side learns how the other's NAT maps.
        assert_eq!(f.peer_nat, NatMapping::Independent);
        assert_eq!(e.peer_nat, NatMapping::Random);
        let intro = introduce(8, "home", forwarder, exposer, false);
        assert!(!intro.to_forwarder.relay && !intro.to_exposer.relay);
    }
}
