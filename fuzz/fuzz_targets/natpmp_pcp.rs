//! NAT-PMP and PCP answers, read by `crab_nat` behind the agent's own entry
//! (`p2ptun::portmap::client::request`, then `Lease::renew`). A fake gateway on
//! 127.0.0.1:5351 (the protocols' port) answers each request with the next part of the input.
//! A mapping granted is for the asked port and has an external address a peer can use.
//!
//! Input: one byte (bit 0: PCP rather than NAT-PMP; bit 1: copy the request's nonce into a
//! PCP answer, which the fuzzer could never guess), then three answers cut by
//! `p2ptun_fuzz::split`.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use p2ptun::portmap::client::request;
use p2ptun::portmap::gateway::Target;
use p2ptun::portmap::{Protocol, Transport};
use p2ptun_fuzz::{block_on, split};

/// The answers the fake gateway gives next, and whether to copy PCP nonces into them.
struct Script {
    answers: Vec<Vec<u8>>,
    copy_nonce: bool,
}

static SCRIPT: Mutex<Script> = Mutex::new(Script {
    answers: Vec::new(),
    copy_nonce: false,
});

/// Starts the fake gateway once per process.
fn gateway() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let socket = UdpSocket::bind("127.0.0.1:5351").expect("127.0.0.1:5351 is free");
        std::thread::spawn(move || {
            let mut buf = [0u8; 1100];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let mut answer = {
                    let mut script = SCRIPT.lock().unwrap_or_else(|e| e.into_inner());
                    let copy = script.copy_nonce;
                    let next = if script.answers.is_empty() {
                        Vec::new()
                    } else {
                        script.answers.remove(0)
                    };
                    (next, copy)
                };
                // A PCP MAP request's nonce is bytes 24..36; the answer has it at the same
                // place.
                if answer.1 && n >= 36 && answer.0.len() >= 36 {
                    answer.0[24..36].copy_from_slice(&buf[24..36]);
                }
                let _ = socket.send_to(&answer.0, from);
            }
        });
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    gateway();
    let protocol = if flags & 1 == 1 {
        Protocol::Pcp
    } else {
        Protocol::NatPmp
    };
    {
        let mut script = SCRIPT.lock().unwrap_or_else(|e| e.into_inner());
        script.answers = split(rest, 3).into_iter().map(<[u8]>::to_vec).collect();
        script.copy_nonce = flags & 2 == 2;
    }
    let target = Target {
        gateway: Ipv4Addr::LOCALHOST,
        local: Ipv4Addr::LOCALHOST,
    };
    block_on(async {
        let Ok(mut lease) = request(protocol, target, Transport::Udp, 4000).await else {
            return;
        };
        check(&lease.mapping, protocol);
        if lease.renew().await.is_ok() {
            check(&lease.mapping, protocol);
        }
    });
});

fn check(mapping: &p2ptun::portmap::Mapping, protocol: Protocol) {
    assert_eq!(mapping.protocol, protocol);
    assert_eq!(
        mapping.internal,
        SocketAddr::from((Ipv4Addr::LOCALHOST, 4000))
    );
    let SocketAddr::V4(external) = mapping.external else {
        panic!("an IPv6 external address: {}", mapping.external);
    };
    let ip = external.ip();
    assert!(!ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast() && !ip.is_broadcast());
    assert_ne!(external.port(), 0);
}
