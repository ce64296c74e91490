//! What S answers to a STUN datagram (`p2ptun_relay::stun::answer`), modern or classic
//! (RFC 3489), from any source to any of its addresses. An answer goes back to the sender,
//! is no larger than the request or else the smallest complete answer, echoes the
//! transaction ID and reports the sender's address.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use p2ptun::path::canonical;
use p2ptun::proto::stun;
use p2ptun_relay::stun::{answer, StunAddrs, Via};

const FROM: [&str; 6] = [
    "198.51.100.7:40000",
    "[2001:db8::7]:40000",
    "[::ffff:198.51.100.7]:40000",
    "0.0.0.0:1",
    "224.0.0.1:5",
    "255.255.255.255:9",
];
const DST: [Option<&str>; 4] = [None, Some("203.0.113.1"), Some("::"), Some("2001:db8::1")];
const BOUND: [(&str, &str); 3] = [
    ("203.0.113.1:7000", "203.0.113.1:7001"),
    ("[::]:7000", "[::]:7001"),
    ("0.0.0.0:7000", "0.0.0.0:7001"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, request)) = data.split_first() else {
        return;
    };
    let pick = usize::from(pick);
    let from: SocketAddr = FROM[pick % 6].parse().expect("an address");
    let dst: Option<IpAddr> = DST[(pick / 6) % 4].map(|d| d.parse().expect("an address"));
    let (main, alt) = BOUND[(pick / 24) % 3];
    let addrs = StunAddrs {
        main: main.parse().expect("an address"),
        alt: alt.parse().expect("an address"),
    };
    let via = if pick & 0x80 == 0 {
        Via::Main
    } else {
        Via::Alt
    };

    let Some(reply) = answer(request, from, dst, via, &addrs) else {
        return;
    };
    assert_eq!(reply.to, from);
    assert!(reply.bytes.len() <= request.len().max(stun::minimal_answer_len(canonical(from))));
    if let Some(classic) = stun::classic_request(request) {
        assert_eq!(reply.bytes[..2], [0x01, 0x01], "a classic Binding success");
        assert_eq!(reply.bytes[4..20], classic.tid);
        return;
    }
    let msg = stun::decode(&reply.bytes).expect("S's answer decodes");
    let req = stun::decode(request).expect("only STUN is answered");
    assert!(stun::is_binding_request(&req));
    assert!(stun::is_binding_success(&msg));
    assert_eq!(msg.transaction_id(), req.transaction_id());
    assert_eq!(stun::mapped_address(&msg), Some(canonical(from)));
});
