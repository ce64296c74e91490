//! Writes the seed corpora, `fuzz/corpus/<target>/`, from real messages: each made by the
//! project's own encoders (control frames, STUN as agents and S make it, relay payloads and
//! their pieces, stream headers, TCP frames and hellos), the example config files, and the
//! gateway answers in the layout miniupnpd 2.3 sends them.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds` (stable is enough); the seeds
//! are committed, so this is only needed when a format changes.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use p2ptun::proto::relay;
use p2ptun::proto::stun::{self, ResponseExtras, Tid};
use p2ptun::proto::{
    write_frame, Candidate, CandidateKind, ClientMsg, Credentials, ErrorCode, ErrorMsg,
    Fingerprint, NatMapping, Rendezvous, ServerInfo, ServerMsg, PROTOCOL_VERSION,
};
use p2ptun::punch::tcp::hello;
use p2ptun::tunnel::header;
use p2ptun_fuzz::{block_on, join};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus");
    control(&dir(&corpus, "control"));
    let stun_seeds = stun_messages();
    let server = dir(&corpus, "stun_server");
    for (name, bytes) in &stun_seeds {
        write(&dir(&corpus, "stun_agent"), name, bytes);
        // The pick byte: the plain IPv4 source, S bound to specific addresses, via Main.
        write(&server, name, &[&[0u8][..], bytes].concat());
    }
    write(
        &server,
        "binding_v6_to_wildcard",
        &[&[1u8 + 6 * 3 + 24][..], &stun_seeds[0].1].concat(),
    );
    relay_payloads(&dir(&corpus, "relay_payload"));
    let headers = dir(&corpus, "stream_header");
    write(&headers, "home", &header::encode("home"));
    write(&headers, "web-1", &header::encode("web-1"));
    write(&headers, "flow", &header::encode_flow("dns"));
    let datagrams = dir(&corpus, "flow_datagram");
    for (id, payload) in [(0u64, &b"dns query"[..]), (4, b""), (16_384, b"x"), (1 << 40, b"y")] {
        let datagram = p2ptun::tunnel::flow::frame(id, payload).expect("a stream ID");
        write(&datagrams, &format!("id-{id}"), &datagram);
    }
    tcp_framing(&dir(&corpus, "tcp_framing"));
    let hellos = dir(&corpus, "tcp_hello");
    let c = creds();
    write(&hellos, "hello", &hello(&c));
    let parts =
        [&c.local_ufrag, &c.local_pwd, &c.remote_ufrag, &c.remote_pwd].map(|s| s.as_bytes());
    write(&hellos, "credentials", &join(&parts));
    natpmp_pcp(&dir(&corpus, "natpmp_pcp"));
    upnp(&dir(&corpus, "upnp"));
    let repo = root.parent().expect("fuzz/ is in the repository");
    let example = fs::read(repo.join("config.example.toml")).expect("config.example.toml");
    write(
        &dir(&corpus, "agent_config"),
        "config.example.toml",
        &example,
    );
    let example = fs::read(repo.join("relay/relay.example.toml")).expect("relay.example.toml");
    write(
        &dir(&corpus, "relay_config"),
        "relay.example.toml",
        &example,
    );
}

fn dir(corpus: &Path, target: &str) -> PathBuf {
    let dir = corpus.join(target);
    fs::create_dir_all(&dir).expect("a corpus directory");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("a seed written");
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("an address")
}

fn creds() -> Credentials {
    Credentials {
        local_ufrag: "Xq3f".into(),
        local_pwd: "9Vb0kzTz2mJc1Lq8rW4yHa".into(),
        remote_ufrag: "pL7e".into(),
        remote_pwd: "Qe6nC2dR8sK0tU5vX1wZ3b".into(),
    }
}

fn candidates() -> Vec<Candidate> {
    vec![
        Candidate {
            kind: CandidateKind::Host,
            addr: addr("192.168.1.20:41000"),
        },
        Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: addr("[2001:db8::20]:41000"),
        },
        Candidate {
            kind: CandidateKind::TcpPortMapped,
            addr: addr("203.0.113.9:41001"),
        },
    ]
}

fn control(dir: &Path) {
    let rendezvous = Rendezvous {
        session: relay::session_id(0x1234_5678_9abc_def0),
        name: "home".into(),
        peer_fingerprint: Fingerprint([7; 32]),
        peer_candidates: candidates(),
        credentials: creds(),
        start_in_ms: 120,
        relay: true,
        peer_nat: NatMapping::Sequential { step: 2 },
    };
    let client = [
        (
            "register",
            ClientMsg::Register {
                version: PROTOCOL_VERSION,
                token: Some("s3cret".into()),
                names: vec!["home".into(), "web-1".into()],
                candidates: candidates(),
                nat: NatMapping::Independent,
            },
        ),
        (
            "connect",
            ClientMsg::Connect {
                name: "home".into(),
                candidates: candidates(),
                nat: NatMapping::Random,
            },
        ),
        (
            "update_candidates",
            ClientMsg::UpdateCandidates {
                candidates: candidates(),
            },
        ),
        (
            "update_names",
            ClientMsg::UpdateNames {
                names: vec!["home".into(), "web".into()],
            },
        ),
        (
            "release",
            ClientMsg::Release {
                version: PROTOCOL_VERSION,
                token: Some("s3cret".into()),
                name: "home".into(),
            },
        ),
    ];
    let server = [
        (
            "registered",
            ServerMsg::Registered {
                observed: addr("203.0.113.9:41000"),
                stun_alt: Some(addr("198.51.100.1:7001")),
                members: vec![ServerInfo {
                    addr: "relay2.example.net:7000".into(),
                    fingerprint: Fingerprint([9; 32]),
                }],
            },
        ),
        (
            "elsewhere",
            ServerMsg::Elsewhere {
                name: "home".into(),
                server: ServerInfo {
                    addr: "198.51.100.2:7000".into(),
                    fingerprint: Fingerprint([9; 32]),
                },
            },
        ),
        ("rendezvous", ServerMsg::Rendezvous(rendezvous.clone())),
        ("incoming", ServerMsg::Incoming(rendezvous)),
        (
            "relay_closed",
            ServerMsg::RelayClosed {
                session: 77,
                reason: "over budget".into(),
            },
        ),
        ("candidates_updated", ServerMsg::CandidatesUpdated),
        (
            "released",
            ServerMsg::Released {
                name: "home".into(),
            },
        ),
        (
            "error",
            ServerMsg::Error(ErrorMsg {
                code: ErrorCode::NameTaken,
                message: "the name 'home' belongs to another key".into(),
            }),
        ),
    ];
    let mut all = Vec::new();
    for (name, msg) in &client {
        let mut frame = Vec::new();
        block_on(write_frame(&mut frame, msg)).expect("a frame");
        write(dir, name, &frame);
        all.extend_from_slice(&frame);
    }
    for (name, msg) in &server {
        let mut frame = Vec::new();
        block_on(write_frame(&mut frame, msg)).expect("a frame");
        write(dir, name, &frame);
    }
    write(dir, "stream_of_frames", &all);
}

/// STUN as the agent and S send it, and a classic (RFC 3489) client's request.
fn stun_messages() -> Vec<(&'static str, Vec<u8>)> {
    let tid = Tid::new([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let extras = ResponseExtras {
        response_origin: Some(addr("198.51.100.1:7000")),
        other_address: Some(addr("198.51.100.1:7001")),
    };
    let mut classic = vec![0x00, 0x01, 0x00, 0x08];
    classic.extend_from_slice(&[0x5a; 16]);
    classic.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x02]);
    vec![
        ("binding_request", stun::binding_request(tid, None)),
        (
            "binding_request_change",
            stun::binding_request(tid, Some((true, true))),
        ),
        ("binding_indication", stun::binding_indication()),
        (
            "check",
            stun::connectivity_check(tid, "pL7e:Xq3f", "Qe6nC2dR8sK0tU5vX1wZ3b"),
        ),
        (
            "binding_success_v4",
            stun::binding_success(tid, addr("203.0.113.9:41000"), extras, None, 1000),
        ),
        (
            "check_answer_v6",
            stun::binding_success(
                tid,
                addr("[2001:db8::20]:41000"),
                ResponseExtras::default(),
                Some("9Vb0kzTz2mJc1Lq8rW4yHa"),
                1000,
            ),
        ),
        (
            "binding_error_401",
            stun::binding_error(tid, 401, "Unauthorized"),
        ),
        ("classic_request", classic),
        (
            "classic_answer",
            stun::classic_binding_success(&[0x5a; 16], addr("203.0.113.9:41000")),
        ),
    ]
}

fn relay_payloads(dir: &Path) {
    let session = relay::session_id(0x0102_0304_0506_0708);
    let packet: Vec<u8> = (0..1300u32).map(|i| (i % 251) as u8 | 0x40).collect();
    let whole = relay::encode(session, &packet);
    let pieces = relay::fragment(&whole, 1100, || relay::packet_number(1, false)).expect("two");
    let small = relay::encode(session, b"\x40short quic packet");
    write(dir, "packet", &join(&[&small, b""]));
    let mut parts: Vec<&[u8]> = pieces.iter().map(Bytes::as_ref).collect();
    parts.push(b"");
    write(dir, "pieces", &join(&parts));
    let three = relay::fragment(&whole, 600, || relay::packet_number(2, true)).expect("three");
    let mut parts: Vec<&[u8]> = three.iter().rev().map(Bytes::as_ref).collect();
    parts.push(b"");
    write(dir, "pieces_by_s_reversed", &join(&parts));
}

fn tcp_framing(dir: &Path) {
    let mut stream = vec![0, 0]; // a ping
    stream.extend_from_slice(&[0, 1, 0]); // a pong
    let packet = [0x40u8; 48];
    stream.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    stream.extend_from_slice(&packet);
    write(dir, "ping_pong_packet", &stream);
    // What S reads first from an agent, then framed QUIC.
    let mut agent = p2ptun::path::tcp::SERVER_PREAMBLE.to_vec();
    agent.extend_from_slice(&stream);
    write(dir, "preamble_then_frames", &agent);
}

/// NAT-PMP (RFC 6886) and PCP (RFC 6887) answers, byte for byte as miniupnpd 2.3 builds them
/// for the agent's requests (mapping UDP 4000 to public 4000, external 203.0.113.1, epoch
/// 1000 s, lifetime 7200 s). The first byte is the target's flags (bit 0: PCP, bit 1: copy
/// the nonce).
fn natpmp_pcp(dir: &Path) {
    // NAT-PMP: a mapping answer (opcode 1 + 128), then the external address (0 + 128).
    let mapping = [
        0, 129, 0, 0, 0, 0, 0x03, 0xe8, 0x0f, 0xa0, 0x0f, 0xa0, 0, 0, 0x1c, 0x20,
    ];
    let external = [0, 128, 0, 0, 0, 0, 0x03, 0xe8, 203, 0, 113, 1];
    write(
        dir,
        "nat_pmp",
        &[&[0u8][..], &join(&[&mapping, &external, &mapping])].concat(),
    );
    // PCP: a MAP answer (version 2, opcode 1 + 128, result 0, lifetime, epoch, reserved,
    // then the nonce, protocol 17, the ports and the IPv4-mapped external address).
    let mut map = vec![2, 129, 0, 0, 0, 0, 0x1c, 0x20, 0, 0, 0x03, 0xe8];
    map.extend_from_slice(&[0; 12]);
    map.extend_from_slice(&[0; 12]); // the nonce, copied in by the target
    map.extend_from_slice(&[17, 0, 0, 0, 0x0f, 0xa0, 0x0f, 0xa0]);
    map.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 1]);
    write(
        dir,
        "pcp_map",
        &[&[3u8][..], &join(&[&map, &map, &map])].concat(),
    );
    // A refusal: NAT-PMP result 2 (not authorized), PCP result 2 (NOT_AUTHORIZED).
    let refused = [0, 129, 0, 2, 0, 0, 0x03, 0xe8, 0x0f, 0xa0, 0, 0, 0, 0, 0, 0];
    write(
        dir,
        "nat_pmp_refused",
        &[&[0u8][..], &join(&[&refused, b"", b""])].concat(),
    );
}

/// A UPnP IGD description as miniupnpd serves it (rootDesc.xml, trimmed to the WAN
/// connection device), the WANIPConnection service description, and the SOAP answers to
/// GetExternalIPAddress and AddPortMapping.
fn upnp(dir: &Path) {
    let root = br#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>1</minor></specVersion><device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType><friendlyName>MiniUPnPd</friendlyName><manufacturer>MiniUPnP</manufacturer><modelName>MiniUPnPd</modelName><UDN>uuid:00000000-0000-0000-0000-000000000000</UDN><serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType><serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId><SCPDURL>/L3F.xml</SCPDURL><controlURL>/ctl/L3F</controlURL><eventSubURL>/evt/L3F</eventSubURL></service></serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType><friendlyName>WANDevice</friendlyName><UDN>uuid:00000000-0000-0000-0000-000000000001</UDN><serviceList><service><serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType><serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId><SCPDURL>/WANCfg.xml</SCPDURL><controlURL>/ctl/CmnIfCfg</controlURL><eventSubURL>/evt/CmnIfCfg</eventSubURL></service></serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType><friendlyName>WANConnectionDevice</friendlyName><UDN>uuid:00000000-0000-0000-0000-000000000002</UDN><serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SCPDURL>/WANIPCn.xml</SCPDURL><controlURL>/ctl/IPConn</controlURL><eventSubURL>/evt/IPConn</eventSubURL></service></serviceList></device></deviceList></device></deviceList><presentationURL>http://192.168.1.1/</presentationURL></device></root>"#;
    let scpd = br#"<?xml version="1.0"?>
<scpd xmlns="urn:schemas-upnp-org:service-1-0"><specVersion><major>1</major><minor>0</minor></specVersion><actionList><action><name>GetExternalIPAddress</name><argumentList><argument><name>NewExternalIPAddress</name><direction>out</direction><relatedStateVariable>ExternalIPAddress</relatedStateVariable></argument></argumentList></action><action><name>AddPortMapping</name><argumentList><argument><name>NewRemoteHost</name><direction>in</direction><relatedStateVariable>RemoteHost</relatedStateVariable></argument><argument><name>NewExternalPort</name><direction>in</direction><relatedStateVariable>ExternalPort</relatedStateVariable></argument><argument><name>NewProtocol</name><direction>in</direction><relatedStateVariable>PortMappingProtocol</relatedStateVariable></argument><argument><name>NewInternalPort</name><direction>in</direction><relatedStateVariable>InternalPort</relatedStateVariable></argument><argument><name>NewInternalClient</name><direction>in</direction><relatedStateVariable>InternalClient</relatedStateVariable></argument><argument><name>NewEnabled</name><direction>in</direction><relatedStateVariable>PortMappingEnabled</relatedStateVariable></argument><argument><name>NewPortMappingDescription</name><direction>in</direction><relatedStateVariable>PortMappingDescription</relatedStateVariable></argument><argument><name>NewLeaseDuration</name><direction>in</direction><relatedStateVariable>PortMappingLeaseDuration</relatedStateVariable></argument></argumentList></action></actionList></scpd>"#;
    let ip = br#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewExternalIPAddress>203.0.113.1</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>"#;
    let added = br#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:AddPortMappingResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"/></s:Body></s:Envelope>"#;
    write(dir, "miniupnpd", &join(&[root, scpd, ip, added, b""]));
}
