//! What S answers to a STUN datagram (RFC 8489 Binding, with RFC 5780's CHANGE-REQUEST,
//! RESPONSE-ORIGIN and OTHER-ADDRESS; and RFC 3489's classic Binding), decided from the
//! bytes and addresses alone. The sockets that carry the answer are
//! [`crate::stun_server`]'s.

use std::net::{IpAddr, SocketAddr};

use p2ptun::path::canonical;
use p2ptun::proto::stun::{self, change_request, ClassicRequest, ResponseExtras};

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
        canonical(match via {
            Via::Main => self.main,
            Via::Alt => self.alt,
        })
    }

    /// The address `via` is reached at by a client whose request reached S at `dst`.
    ///
    /// A socket bound to a specific address is reached there. One bound to the unspecified
    /// address is reached at every address of the host, so S reports the one this client
    /// used, `dst`, with the socket's port: both sockets are on the same host, so what
    /// reached one reaches the other. Without `dst` (no packet info on this platform), and
    /// for an IPv6 `dst` at an IPv4 socket, which cannot be reached so, S reports nothing:
    /// a wrong address would mislead a client's behaviour tests more than a missing one.
    fn reached_at(&self, via: Via, dst: Option<IpAddr>) -> Option<SocketAddr> {
        let bound = self.of(via);
        if !bound.ip().is_unspecified() {
            return Some(bound);
        }
        let dst = dst?;
        (bound.is_ipv6() || dst.is_ipv4()).then_some(SocketAddr::new(dst, bound.port()))
    }

    /// The source IP to give an answer sent from `via` to a client whose request reached S
    /// at `dst`: `dst` for a socket bound to the unspecified address (left to itself, the
    /// kernel may pick another of the host's addresses, whose answer the client's NAT or
    /// firewall would drop); nothing for one bound to a specific address, which sends from
    /// that.
    fn source_ip(&self, via: Via, dst: Option<IpAddr>) -> Option<IpAddr> {
        if !self.of(via).ip().is_unspecified() {
            return None;
        }
        self.reached_at(via, dst).map(|a| a.ip())
    }
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The socket to send it from.
    pub via: Via,
    /// Where to send it: the request's source.
    pub to: SocketAddr,
    /// The source IP to send it from (the address the request reached), when the socket is
    /// bound to the unspecified address; `None`: the socket's own.
    pub src_ip: Option<IpAddr>,
    /// The encoded response.
    pub bytes: Vec<u8>,
}

/// The answer to `request`, which came from `from` to S's address `dst` (when the platform
/// tells it) on socket `arrived_on`; `None` for anything that is not a well-formed Binding
/// request (no error responses: a stranger gets nothing to reflect).
///
/// CHANGE-REQUEST (either flag) moves the answer to the other socket. S has one IP address
/// per socket pair, so "change IP" is served as well as it can be: from the other port. That
/// is what miniupnpd's check needs (it wants an answer to all four flag combinations), and
/// RESPONSE-ORIGIN still tells a careful client which address really answered.
///
/// A classic request (RFC 3489, without the magic cookie) gets MAPPED-ADDRESS and its whole
/// transaction ID back, as RFC 8489 §12.2 asks, and nothing else; see [`answer_classic`]
/// for what else differs.
pub fn answer(
    request: &[u8],
    from: SocketAddr,
    dst: Option<IpAddr>,
    arrived_on: Via,
    addrs: &StunAddrs,
) -> Option<Reply> {
    let mapped = canonical(from);
    let ip = mapped.ip();
    if from.port() == 0 || ip.is_unspecified() || ip.is_multicast() || is_broadcast(&ip) {
        return None;
    }
    let dst = dst.map(|ip| ip.to_canonical());
    if dst.is_some_and(|d| d.is_unspecified() || d.is_multicast() || is_broadcast(&d)) {
        // Sent to many hosts at once: no host should answer, and none can from there.
        return None;
    }
    // No answer is larger than its request, so a forged source gets no more bytes than
    // were sent in its name, except that every request may have the smallest complete
    // answer (40 bytes for IPv4, 52 for IPv6, to a request of 20 at the least): clients that send bare
    // requests, miniupnpd's among them, are not left without one. Optional attributes
    // come only within the request's size.
    let budget = request.len().max(stun::minimal_answer_len(mapped));
    if let Some(classic) = stun::classic_request(request) {
        return answer_classic(classic, from, dst, arrived_on, addrs);
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
        response_origin: addrs.reached_at(via, dst),
        other_address: addrs.reached_at(arrived_on.other(), dst),
    };
    let bytes = stun::binding_success(msg.transaction_id(), mapped, extras, None, budget);
    if bytes.is_empty() || bytes.len() > budget {
        return None;
    }
    Some(Reply {
        via,
        to: from,
        src_ip: addrs.source_ip(via, dst),
        bytes,
    })
}

/// The answer to a classic (RFC 3489) Binding request: MAPPED-ADDRESS only.
///
/// RFC 3489's clients classify NATs by whether an answer from *another IP* arrives, and
/// have no RESPONSE-ORIGIN to tell them where an answer really came from. S has one IP, so
/// it answers "change port" (from the other socket, truthfully) but not "change IP", whose
/// answer from the same IP would read as a NAT more open than it is; and it sends no
/// CHANGED-ADDRESS, which would name an "other IP" that does not exist. A request with
/// another comprehension-required attribute (RESPONSE-ADDRESS, credentials) gets nothing:
/// RFC 8489 §12.2 answers those with an error, and S sends strangers no errors.
fn answer_classic(
    request: ClassicRequest,
    from: SocketAddr,
    dst: Option<IpAddr>,
    arrived_on: Via,
    addrs: &StunAddrs,
) -> Option<Reply> {
    if request.unknown_required {
        return None;
    }
    let via = match request.change {
        None | Some((false, false)) => arrived_on,
        Some((false, true)) => arrived_on.other(),
        Some((true, _)) => return None,
    };
    // No larger than the smallest modern answer, which any request may have.
    let bytes = stun::classic_binding_success(&request.tid, canonical(from));
    Some(Reply {
        via,
        to: from,
        src_ip: addrs.source_ip(via, dst),
        bytes,
    })
}

fn is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
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
        let reply = answer(&req, from(), None, Via::Main, &addrs()).unwrap();
        assert_eq!(reply.via, Via::Main);
        assert_eq!(reply.to, from());
        assert!(reply.bytes.len() <= req.len());
        let msg = stun::decode(&reply.bytes).unwrap();
        assert!(stun::is_binding_success(&msg));
        assert_eq!(msg.transaction_id(), tid);
        assert_eq!(stun::mapped_address(&msg), Some(from()));
    }

    #[test]
    fn no_answer_is_larger_than_its_request_beyond_the_smallest_complete_one() {
        // A bare 20-byte request gets the mapping alone: 40 bytes for IPv4.
        let mut bare = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        bare.extend_from_slice(&[9; 12]);
        assert_eq!(bare.len(), 20);
        let reply = answer(&bare, from(), None, Via::Main, &addrs()).unwrap();
        assert_eq!(reply.bytes.len(), stun::minimal_answer_len(from()));
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::mapped_address(&msg), Some(from()));
        assert_eq!(stun::other_address(&msg), None);

        // The agent's requests are as large as the fullest answer, which they get.
        for change in [None, Some((false, false))] {
            let req = stun::binding_request(stun::new_tid(), change);
            assert_eq!(req.len(), stun::FULL_ANSWER_LEN);
            for from in [from(), "[2001:db8::7]:40000".parse().unwrap()] {
                let reply = answer(&req, from, None, Via::Main, &addrs()).unwrap();
                assert!(reply.bytes.len() <= req.len());
                let msg = stun::decode(&reply.bytes).unwrap();
                assert_eq!(stun::other_address(&msg), Some(addrs().alt));
                assert_eq!(stun::response_origin(&msg), Some(addrs().main));
            }
        }
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
            let on_main = answer(&req, from(), None, Via::Main, &addrs()).unwrap();
            let on_alt = answer(&req, from(), None, Via::Alt, &addrs()).unwrap();
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
            let reply = answer(&request(flags), from(), None, Via::Main, &addrs()).unwrap();
            assert_eq!(reply.via, Via::Alt, "flags {flags}");
        }
        assert_eq!(
            answer(&request(0), from(), None, Via::Main, &addrs())
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
        let reply = answer(&req, from(), None, Via::Main, &addrs).unwrap();
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::other_address(&msg), None);
        assert_eq!(stun::mapped_address(&msg), Some(from()));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn wildcard(main: &str, alt: &str) -> StunAddrs {
        StunAddrs {
            main: sa(main),
            alt: sa(alt),
        }
    }

    /// What a modern answer reports: (XOR-)MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS.
    type Reported = (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>);

    fn reported(reply: &Reply) -> Reported {
        let msg = stun::decode(&reply.bytes).unwrap();
        (
            stun::mapped_address(&msg),
            stun::response_origin(&msg),
            stun::other_address(&msg),
        )
    }

    #[test]
    fn a_wildcard_bind_reports_and_answers_from_the_address_asked() {
        let addrs = wildcard("0.0.0.0:7000", "0.0.0.0:7001");
        let asked = Some(ip("203.0.113.9"));
        // 28 bytes with CHANGE-REQUEST: the budget has room for both addresses.
        let plain = stun::binding_request(stun::new_tid(), Some((false, false)));
        let reply = answer(&plain, from(), asked, Via::Main, &addrs).unwrap();
        assert_eq!((reply.via, reply.src_ip), (Via::Main, asked));
        assert_eq!(
            reported(&reply),
            (
                Some(from()),
                Some(sa("203.0.113.9:7000")),
                Some(sa("203.0.113.9:7001"))
            )
        );
        // Change port: from the alternate socket, same address; OTHER-ADDRESS is still the
        // alternate of the socket asked.
        let change = stun::binding_request(stun::new_tid(), Some((false, true)));
        let reply = answer(&change, from(), asked, Via::Main, &addrs).unwrap();
        assert_eq!((reply.via, reply.src_ip), (Via::Alt, asked));
        let (_, origin, other) = reported(&reply);
        assert_eq!(origin, Some(sa("203.0.113.9:7001")));
        assert_eq!(other, Some(sa("203.0.113.9:7001")));
        // Asked on the alternate socket: the main one is the other.
        let reply = answer(&plain, from(), asked, Via::Alt, &addrs).unwrap();
        assert_eq!((reply.via, reply.src_ip), (Via::Alt, asked));
        assert_eq!(reported(&reply).2, Some(sa("203.0.113.9:7000")));
    }

    #[test]
    fn a_dual_stack_bind_reports_each_family_in_its_own_form() {
        let addrs = wildcard("[::]:7000", "[::]:7001");
        let req = stun::binding_request(stun::new_tid(), Some((false, false)));
        // An IPv4 client on the dual-stack socket: every address in its IPv4 form.
        let v4_client = sa("[::ffff:198.51.100.7]:40000");
        let reply = answer(
            &req,
            v4_client,
            Some(ip("::ffff:203.0.113.9")),
            Via::Main,
            &addrs,
        )
        .unwrap();
        assert_eq!(reply.to, v4_client);
        assert_eq!(reply.src_ip, Some(ip("203.0.113.9")));
        assert_eq!(
            reported(&reply),
            (
                Some(from()),
                Some(sa("203.0.113.9:7000")),
                Some(sa("203.0.113.9:7001"))
            )
        );
        // An IPv6 client. IPv6 addresses are 12 bytes longer: the 84-byte budget of a
        // 28-byte request holds the mapping and OTHER-ADDRESS, which comes first.
        let v6_client = sa("[2001:db8:1::7]:40000");
        let reply = answer(&req, v6_client, Some(ip("2001:db8::1")), Via::Main, &addrs).unwrap();
        assert_eq!(reply.src_ip, Some(ip("2001:db8::1")));
        let (mapped, _, other) = reported(&reply);
        assert_eq!(mapped, Some(v6_client));
        assert_eq!(other, Some(sa("[2001:db8::1]:7001")));
    }

    #[test]
    fn what_a_wildcard_socket_cannot_know_or_reach_is_not_reported() {
        let req = stun::binding_request(stun::new_tid(), Some((false, false)));
        // No destination address (a platform without packet info): nothing to report, and
        // the kernel picks the source.
        let any = wildcard("0.0.0.0:7000", "0.0.0.0:7001");
        let reply = answer(&req, from(), None, Via::Main, &any).unwrap();
        assert_eq!(reported(&reply), (Some(from()), None, None));
        assert_eq!(reply.src_ip, None);
        // An IPv4-only alternate socket beside a dual-stack main one: an IPv6 client
        // cannot reach it, so it is not offered.
        let mixed = wildcard("[::]:7000", "0.0.0.0:7001");
        let v6_client = sa("[2001:db8:1::7]:40000");
        let reply = answer(&req, v6_client, Some(ip("2001:db8::1")), Via::Main, &mixed).unwrap();
        assert_eq!(reported(&reply).2, None);
        // A socket bound to a specific address reports it and sends from it, whatever the
        // request's destination says.
        let reply = answer(&req, from(), Some(ip("192.0.2.99")), Via::Main, &addrs()).unwrap();
        assert_eq!(reply.src_ip, None);
        assert_eq!(reported(&reply).2, Some(addrs().alt));
        // Requests sent to a broadcast or multicast address are not answered at all.
        for group in ["255.255.255.255", "224.0.0.1", "ff02::1", "0.0.0.0"] {
            assert!(answer(&req, from(), Some(ip(group)), Via::Main, &any).is_none());
        }
    }

    /// A classic (RFC 3489) Binding request by hand.
    fn classic(attributes: &[u8]) -> (Vec<u8>, [u8; 16]) {
        let tid: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        let mut r = vec![0x00, 0x01];
        r.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        r.extend_from_slice(&tid);
        r.extend_from_slice(attributes);
        (r, tid)
    }

    #[test]
    fn classic_requests_get_mapped_address_and_their_whole_transaction_id() {
        let addrs = wildcard("[::]:7000", "[::]:7001");
        let asked = Some(ip("203.0.113.9"));
        let (req, tid) = classic(&[]);
        for (client, family, address) in [
            (from(), 0x01, vec![198, 51, 100, 7]),
            (
                sa("[::ffff:198.51.100.7]:40000"),
                0x01,
                vec![198, 51, 100, 7],
            ),
            (
                sa("[2001:db8:1::7]:40000"),
                0x02,
                "2001:db8:1::7"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec(),
            ),
        ] {
            for on in [Via::Main, Via::Alt] {
                let reply = answer(&req, client, asked, on, &addrs).unwrap();
                assert_eq!((reply.via, reply.to), (on, client));
                let b = &reply.bytes;
                assert!(
                    b.len() <= req.len().max(stun::minimal_answer_len(client)),
                    "{}",
                    b.len()
                );
                assert_eq!(b[..2], [0x01, 0x01], "a Binding success response");
                assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])) + 20, b.len());
                assert_eq!(b[4..20], tid, "the whole 16-byte ID is echoed");
                assert_eq!(b[20..22], [0x00, 0x01], "MAPPED-ADDRESS, not XOR-MAPPED");
                assert_eq!(b[24..26], [0x00, family]);
                assert_eq!(b[26..28], 40000u16.to_be_bytes());
                assert_eq!(b[28..], address[..]);
            }
        }
    }

    #[test]
    fn classic_change_requests_are_answered_only_where_s_can_be_truthful() {
        let addrs = wildcard("0.0.0.0:7000", "0.0.0.0:7001");
        let asked = Some(ip("203.0.113.9"));
        let change = |flags: u8| classic(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, flags]).0;
        let reply = answer(&change(0), from(), asked, Via::Main, &addrs).unwrap();
        assert_eq!((reply.via, reply.src_ip), (Via::Main, asked));
        // Change port: the other socket, from the same address.
        let reply = answer(&change(2), from(), asked, Via::Main, &addrs).unwrap();
        assert_eq!((reply.via, reply.src_ip), (Via::Alt, asked));
        let reply = answer(&change(2), from(), asked, Via::Alt, &addrs).unwrap();
        assert_eq!(reply.via, Via::Main);
        // Change IP: S has no other IP, and a classic client could not tell.
        assert!(answer(&change(4), from(), asked, Via::Main, &addrs).is_none());
        assert!(answer(&change(6), from(), asked, Via::Main, &addrs).is_none());
        // RESPONSE-ADDRESS (comprehension-required, unsupported): nothing.
        let (redirect, _) = classic(&[0x00, 0x02, 0x00, 0x08, 0, 1, 0, 9, 192, 0, 2, 1]);
        assert!(answer(&redirect, from(), asked, Via::Main, &addrs).is_none());
    }

    #[test]
    fn malformed_classic_requests_get_nothing() {
        let addrs = addrs();
        let (good, _) = classic(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0]);
        assert!(answer(&good, from(), None, Via::Main, &addrs).is_some());
        for n in 0..good.len() {
            assert!(
                answer(&good[..n], from(), None, Via::Main, &addrs).is_none(),
                "{n}"
            );
        }
        let mut bad_len = good.clone();
        bad_len[3] = 12;
        assert!(answer(&bad_len, from(), None, Via::Main, &addrs).is_none());
        let mut longer = good.clone();
        longer.extend_from_slice(&[0, 0, 0, 0]);
        assert!(answer(&longer, from(), None, Via::Main, &addrs).is_none());
        for seed in 0u8..=255 {
            let mut junk = good.clone();
            for (i, b) in junk.iter_mut().enumerate().skip(20) {
                *b = b.wrapping_mul(seed).wrapping_add(i as u8);
            }
            let _ = answer(&junk, from(), None, Via::Alt, &addrs); // must not panic
        }
    }

    #[test]
    fn ipv4_mapped_sources_are_reported_as_ipv4() {
        let req = stun::binding_request(stun::new_tid(), None);
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().unwrap();
        let reply = answer(&req, mapped, None, Via::Main, &addrs()).unwrap();
        assert_eq!(reply.to, mapped);
        let msg = stun::decode(&reply.bytes).unwrap();
        assert_eq!(stun::mapped_address(&msg), Some(from()));
    }

    #[test]
    fn garbage_and_other_messages_are_ignored() {
        let addrs = addrs();
        assert!(answer(&[], from(), None, Via::Alt, &addrs).is_none());
        assert!(answer(&[0x40; 100], from(), None, Via::Alt, &addrs).is_none());
        let mut truncated = stun::binding_request(stun::new_tid(), Some((true, true)));
        truncated.truncate(24);
        assert!(answer(&truncated, from(), None, Via::Alt, &addrs).is_none());
        // A response is not a request.
        let resp = stun::binding_success(
            stun::new_tid(),
            from(),
            ResponseExtras::default(),
            None,
            100,
        );
        assert!(answer(&resp, from(), None, Via::Main, &addrs).is_none());
        // Nothing goes to addresses that cannot have sent it.
        let req = stun::binding_request(stun::new_tid(), None);
        for bad in [
            "0.0.0.0:1",
            "198.51.100.7:0",
            "224.0.0.1:5",
            "255.255.255.255:9",
        ] {
            assert!(answer(&req, bad.parse().unwrap(), None, Via::Main, &addrs).is_none());
        }
        for seed in 0u8..=255 {
            let mut junk = stun::binding_request(stun::new_tid(), Some((true, false)));
            for (i, b) in junk.iter_mut().enumerate().skip(20) {
                *b = b.wrapping_mul(seed).wrapping_add(i as u8);
            }
            let _ = answer(&junk, from(), None, Via::Main, &addrs); // must not panic
        }
    }
}
