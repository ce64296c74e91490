//! What S answers to a STUN datagram (RFC 8489 Binding, with RFC 5780's CHANGE-REQUEST,
//! RESPONSE-ORIGIN and OTHER-ADDRESS), decided from the bytes and addresses alone. The
//! sockets that carry the answer are [`crate::stun_server`]'s.

use std::net::SocketAddr;

use p2ptun::path::canonical;
use p2ptun::proto::stun::{self, change_request, ResponseExtras};

/// A response is never larger than this many times its request, as QUIC's anti-amplification
/// limit, so S cannot be used to multiply a spoofed sender's traffic.
pub const AMPLIFICATION: usize = 3;

/// One of S's two STUN sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The main port, shared with QUIC.
    Main,
    /// The alternate port, STUN only.
    Alt,
}

impl Via {
    /// The other socket.
    pub fn other(self) -> Via {
        match self {
            Via::Main => Via::Alt,
            Via::Alt => Via::Main,
        }
    }
}

/// The addresses S's STUN sockets are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunAddrs {
    /// The main socket.
    pub main: SocketAddr,
    /// The alternate socket.
    pub alt: SocketAddr,
}

impl StunAddrs {
    fn of(&self, via: Via) -> SocketAddr {
        match via {
            Via::Main => self.main,
            Via::Alt => self.alt,
        }
    }

    /// The address to report for `via`: none for a socket bound to the unspecified address,
    /// since S cannot tell which of its addresses the client used, and a wrong address
    /// would mislead the client's behaviour tests more than a missing one.
    fn reportable(&self, via: Via) -> Option<SocketAddr> {
        let addr = canonical(self.of(via));
        (!addr.ip().is_unspecified()).then_some(addr)
    }
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The socket to send it from.
    pub via: Via,
    /// Where to send it: the request's source.
    pub to: SocketAddr,
    /// The encoded response.
    pub bytes: Vec<u8>,
}

/// The answer to `request`, which came from `from` on socket `arrived_on`; `None` for
/// anything that is not a well-formed Binding request (no error responses: a stranger gets
/// nothing to reflect).
///
/// CHANGE-REQUEST (either flag) moves the answer to the other socket. S has one IP address
/// per socket pair, so "change IP" is served as well as it can be: from the other port. That
/// is what miniupnpd's check needs (it wants an answer to all four flag combinations), and
/// RESPONSE-ORIGIN still tells a careful client which address really answered.
pub fn answer(
    request: &[u8],
    from: SocketAddr,
    arrived_on: Via,
    addrs: &StunAddrs,
) -> Option<Reply> {
    let mapped = canonical(from);
    let ip = mapped.ip();
    if from.port() == 0 || ip.is_unspecified() || ip.is_multicast() || is_broadcast(&ip) {
        return None;
    }
    if !stun::is_stun(request) {
        return None;
    }
    let msg = stun::decode(request).ok()?;
    if !stun::is_binding_request(&msg) {
        return None;
    }
    let via = match change_request(request) {
        Some((change_ip, change_port)) if change_ip || change_port => arrived_on.other(),
        _ => arrived_on,
    };
    let extras = ResponseExtras {
        response_origin: addrs.reportable(via),
        other_address: addrs.reportable(arrived_on.other()),
    };
    let budget = request.len().saturating_mul(AMPLIFICATION);
    let bytes = stun::binding_success(msg.transaction_id(), mapped, extras, None, budget);
    if bytes.is_empty() || bytes.len() > budget {
        return None;
    }
    Some(Reply {
        via,
        to: from,
        bytes,
    })
}

fn is_broadcast(ip: &std::net::IpAddr) -> bool {
    matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: &str = "198.51.100.7:40000";

    fn addrs() -> StunAddrs {
        StunAddrs {
            main: "203.0.113.1:7000".parse().unwrap(),
            alt: "203.0.113.1:7001".parse().unwrap(),
        }
    }

    fn from() -> SocketAddr {
        FROM.parse().unwrap()
    }

    #[test]
    fn a_binding_request_gets_the_mapping_and_both_addresses() {
        let tid = stun::new_tid();
        let req = stun::binding_request(tid, None);
        let reply = answer(&req, from(), Via::Main, &addrs()).unwrap();
        assert_eq!(reply.via, Via::Main);
        assert_eq!(reply.to, from());
        assert!(reply.bytes.len() <= AMPLIFICATION * req.len());
        let msg = stun::decode(&reply.bytes).unwrap();
        assert!(stun::is_binding_success(&msg));
        assert_eq!(msg.transaction_id(), tid);
        assert_eq!(stun::mapped_address(&msg), Some(from()));
    }

    #[test]
    fn the_budget_drops_optional_attributes_first() {
        // A bare 20-byte request allows 60 bytes: the mapping fits, not both extra addresses.
        let req = stun::binding_request(stun::new_tid(), None);
        assert_eq!(req.len(), 20);
        let reply = answer(&req, from(), Via::Main, &addrs()).unwrap();
        assert!(reply.bytes.len() <= 60, "{}", reply.bytes.len());
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::mapped_address(&msg), Some(from()));

        // A request with CHANGE-REQUEST (28 bytes) allows 84: everything fits.
        let req = stun::binding_request(stun::new_tid(), Some((false, false)));
        let reply = answer(&req, from(), Via::Main, &addrs()).unwrap();
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::other_address(&msg), Some(addrs().alt));
    }

    #[test]
    fn change_request_answers_from_the_other_socket() {
        for (flags, main_to, alt_to) in [
            (None, Via::Main, Via::Alt),
            (Some((false, false)), Via::Main, Via::Alt),
            (Some((false, true)), Via::Alt, Via::Main),
            (Some((true, false)), Via::Alt, Via::Main),
            (Some((true, true)), Via::Alt, Via::Main),
        ] {
            let req = stun::binding_request(stun::new_tid(), flags);
            let on_main = answer(&req, from(), Via::Main, &addrs()).unwrap();
            let on_alt = answer(&req, from(), Via::Alt, &addrs()).unwrap();
            assert_eq!((on_main.via, on_alt.via), (main_to, alt_to), "{flags:?}");
            if flags.is_some() {
                // OTHER-ADDRESS is relative to where the request arrived (and fits the
                // budget of a request with CHANGE-REQUEST).
                let msg = stun::decode(&on_alt.bytes).unwrap();
                assert_eq!(stun::other_address(&msg), Some(addrs().main));
            }
        }
    }

    #[test]
    fn change_request_flags_are_read_as_rfc_5780_defines_them() {
        // miniupnpd's request: a bare header and CHANGE-REQUEST with 0x4 (IP) and/or 0x2 (port).
        let request = |flags: u8| {
            let mut r = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
            r.extend_from_slice(&[7; 12]);
            r.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, flags]);
            r
        };
        assert_eq!(change_request(&request(0)), Some((false, false)));
        assert_eq!(change_request(&request(4)), Some((true, false)));
        assert_eq!(change_request(&request(2)), Some((false, true)));
        assert_eq!(change_request(&request(6)), Some((true, true)));
        for flags in [2, 4, 6] {
            let reply = answer(&request(flags), from(), Via::Main, &addrs()).unwrap();
            assert_eq!(reply.via, Via::Alt, "flags {flags}");
        }
        assert_eq!(
            answer(&request(0), from(), Via::Main, &addrs())
                .unwrap()
                .via,
            Via::Main
        );
        assert_eq!(
            change_request(&stun::binding_request(stun::new_tid(), None)),
            None
        );
        assert_eq!(change_request(&request(4)[..26]), None);
    }

    #[test]
    fn unspecified_bind_addresses_are_not_reported() {
        let addrs = StunAddrs {
            main: "0.0.0.0:7000".parse().unwrap(),
            alt: "0.0.0.0:7001".parse().unwrap(),
        };
        let req = stun::binding_request(stun::new_tid(), Some((false, false)));
        let reply = answer(&req, from(), Via::Main, &addrs).unwrap();
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::other_address(&msg), None);
        assert_eq!(stun::mapped_address(&msg), Some(from()));
    }

    #[test]
    fn ipv4_mapped_sources_are_reported_as_ipv4() {
        let req = stun::binding_request(stun::new_tid(), None);
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().unwrap();
        let reply = answer(&req, mapped, Via::Main, &addrs()).unwrap();
        assert_eq!(reply.to, mapped);
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::mapped_address(&msg), Some(from()));
    }

    #[test]
    fn garbage_and_other_messages_are_ignored() {
        let addrs = addrs();
        assert!(answer(&[], from(), Via::Alt, &addrs).is_none());
        assert!(answer(&[0x40; 100], from(), Via::Alt, &addrs).is_none());
        let mut truncated = stun::binding_request(stun::new_tid(), Some((true, true)));
        truncated.truncate(24);
        assert!(answer(&truncated, from(), Via::Alt, &addrs).is_none());
        // A response is not a request.
        let resp = stun::binding_success(
            stun::new_tid(),
            from(),
            ResponseExtras::default(),
            None,
            100,
        );
        assert!(answer(&resp, from(), Via::Main, &addrs).is_none());
        // Nothing goes to addresses that cannot have sent it.
        let req = stun::binding_request(stun::new_tid(), None);
        for bad in [
            "0.0.0.0:1",
            "198.51.100.7:0",
            "224.0.0.1:5",
            "255.255.255.255:9",
        ] {
            assert!(answer(&req, bad.parse().unwrap(), Via::Main, &addrs).is_none());
        }
        for seed in 0u8..=255 {
            let mut junk = stun::binding_request(stun::new_tid(), Some((true, false)));
            for (i, b) in junk.iter_mut().enumerate().skip(20) {
                *b = b.wrapping_mul(seed).wrapping_add(i as u8);
            }
            let _ = answer(&junk, from(), Via::Main, &addrs); // must not panic
        }
    }
}
