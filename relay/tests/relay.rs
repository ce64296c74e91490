//! S in-process on 127.0.0.1 relaying between agents: datagrams, packets split to fit,
//! oversized ones on streams, packets that must not pass, the byte budget, sessions closing
//! when an agent leaves, and agents whose control connection comes over TCP.
//!
//! The agents here are what a real agent is to S: a quinn endpoint on a `PathSocket`, with
//! datagrams enabled and room for relayed packets, over UDP or framed on TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use p2ptun::path::{self, PathKind, PathSocket, Policy};
use p2ptun::proto::relay::{
    decode, encode, fragment, Reassembly, Relayed, FRAGMENT_HEADER, HEADER, MAX_FRAGMENTS,
};
use p2ptun::proto::{
    read_frame, write_frame, CandidateKind, ClientMsg, ErrorCode, Rendezvous, ServerMsg,
    ALPN_CONTROL, PROTOCOL_VERSION,
};
use p2ptun::tunnel::endpoint::make_endpoint;
use p2ptun::tunnel::relayed::{self, NotSent};
use p2ptun::tunnel::{tls, Identity};
use p2ptun_relay::{Relay, RelayConfig};
use quinn::{Connection, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    metrics: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(state_dir: &Path) -> RelayConfig {
    RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        stun_alt: Some("127.0.0.1:0".parse().unwrap()),
        state_dir: state_dir.to_owned(),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        ..RelayConfig::default()
    }
}

async fn start(config: RelayConfig) -> Server {
    let relay = Relay::bind(config).await.expect("bind S");
    Server {
        addr: relay.local_addr(),
        metrics: relay.metrics_addr().expect("metrics bound"),
        task: tokio::spawn(relay.run()),
    }
}

impl Server {
    /// The value of one metric sample, as S renders it now.
    async fn metric(&self, sample: &str) -> u64 {
        let mut s = TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let prefix = format!("p2ptun_relay_{sample} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
            .parse()
            .unwrap()
    }
}

/// A client transport as an agent's control connection has it.
fn client_config(identity: &Identity) -> quinn::ClientConfig {
    let mut config = tls::client_config(identity, ALPN_CONTROL).unwrap();
    config.transport_config(Arc::new(tls::control_transport_config()));
    config
}

struct Agent {
    conn: Connection,
    /// The address S should report: the UDP socket's, or the TCP connection's.
    local: SocketAddr,
    socket: Arc<PathSocket>,
    /// S's virtual address in `socket`'s table, for an agent over TCP.
    tcp_virt: Option<SocketAddr>,
    _endpoint: quinn::Endpoint,
    registration: Option<(SendStream, RecvStream)>,
}

fn agent_socket(s: SocketAddr) -> Arc<PathSocket> {
    let (socket, _stun) =
        PathSocket::bind("127.0.0.1:0".parse().unwrap(), Policy::KnownOnly).unwrap();
    socket.allow(s);
    socket
}

async fn handshake(endpoint: &quinn::Endpoint, to: SocketAddr) -> Connection {
    let id = Identity::ephemeral().unwrap();
    let connecting = endpoint
        .connect_with(client_config(&id), to, "localhost")
        .unwrap();
    timeout(WAIT, connecting)
        .await
        .expect("handshake in time")
        .expect("handshake")
}

/// An agent whose control connection is QUIC over UDP.
async fn udp_agent(s: SocketAddr) -> Agent {
    let socket = agent_socket(s);
    let endpoint = make_endpoint(Arc::clone(&socket), None, None).unwrap();
    let conn = handshake(&endpoint, s).await;
    Agent {
        conn,
        local: socket.local().unwrap(),
        socket,
        tcp_virt: None,
        _endpoint: endpoint,
        registration: None,
    }
}

/// An agent whose UDP is blocked: its control connection is QUIC framed on TCP to S's port.
async fn tcp_agent(s: SocketAddr) -> Agent {
    let socket = agent_socket(s);
    let mut tcp = TcpStream::connect(s).await.unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.write_all(path::tcp::SERVER_PREAMBLE).await.unwrap();
    let virt = socket.table().write().unwrap().anonymous_peer();
    let (tx, _done) = path::tcp::spawn(tcp, virt, socket.injector());
    socket
        .table()
        .write()
        .unwrap()
        .add_channel_path(virt, PathKind::DirectTcp, s, tx, None);
    let endpoint = make_endpoint(Arc::clone(&socket), None, None).unwrap();
    let conn = handshake(&endpoint, virt).await;
    Agent {
        conn,
        local,
        socket,
        tcp_virt: Some(virt),
        _endpoint: endpoint,
        registration: None,
    }
}

async fn read(recv: &mut RecvStream) -> ServerMsg {
    timeout(WAIT, read_frame::<ServerMsg, _>(recv))
        .await
        .expect("a message in time")
        .expect("a well-formed message")
        .expect("a message before the stream ends")
}

impl Agent {
    /// Registers `names`; returns the address S observed.
    async fn register(&mut self, names: &[&str]) -> SocketAddr {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        let msg = ClientMsg::Register {
            version: PROTOCOL_VERSION,
            token: None,
            names: names.iter().map(|n| n.to_string()).collect(),
            candidates: vec![],
            nat: Default::default(),
        };
        write_frame(&mut send, &msg).await.unwrap();
        let observed = match read(&mut recv).await {
            ServerMsg::Registered { observed, .. } => observed,
            other => panic!("expected Registered, got {other:?}"),
        };
        self.registration = Some((send, recv));
        observed
    }

    /// The next message S pushes on the registration stream.
    async fn pushed(&mut self) -> ServerMsg {
        let (_, recv) = self.registration.as_mut().expect("registered");
        read(recv).await
    }

    async fn connect_to(&self, name: &str) -> ServerMsg {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        let msg = ClientMsg::Connect {
            name: name.into(),
            candidates: vec![],
            nat: Default::default(),
        };
        write_frame(&mut send, &msg).await.unwrap();
        read(&mut recv).await
    }

    /// The next relayed payload, however it came (datagram or stream).
    async fn relayed(&self) -> (Bytes, &'static str) {
        timeout(WAIT, async {
            tokio::select! {
                d = self.conn.read_datagram() => (d.unwrap(), "datagram"),
                s = self.conn.accept_uni() => {
                    let data = s.unwrap().read_to_end(70_000).await.unwrap();
                    (Bytes::from(data), "stream")
                }
            }
        })
        .await
        .expect("a relayed packet in time")
    }

    /// Whether a relayed payload arrives within a short while.
    async fn nothing_relayed(&self) -> bool {
        timeout(Duration::from_millis(300), self.relayed())
            .await
            .is_err()
    }

    /// Sends one relay payload as an agent does: as datagrams (split if need be), else on a
    /// stream.
    async fn send_relay(&self, payload: Bytes) {
        // Every split packet is number 1: the tests read each packet whole before the next.
        match relayed::send(&self.conn, payload, || 1) {
            Ok(_) => {}
            Err(NotSent::NeedsStream(payload)) => self.send_on_stream(payload).await,
            Err(e) => panic!("relay payload not sent: {e:?}"),
        }
    }

    /// Sends one relay payload on a stream of its own, which S must accept for any payload.
    async fn send_on_stream(&self, payload: Bytes) {
        let mut send = self.conn.open_uni().await.unwrap();
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
    }

    /// The next packet relayed to this agent, put together from pieces if it was split, with
    /// how it came and in how many pieces.
    async fn relayed_packet(&self) -> (Bytes, &'static str, usize) {
        let mut pieces = Reassembly::default();
        for n in 1..=MAX_FRAGMENTS {
            let (payload, how) = self.relayed().await;
            match decode(&payload).expect("a well-formed relay payload") {
                (_, Relayed::Packet(_)) => return (payload, how, n),
                (session, Relayed::Fragment(piece)) => {
                    if let Some(packet) = pieces.push(session, piece) {
                        return (encode(session, &packet), how, n);
                    }
                }
            }
        }
        panic!("more pieces than a packet has")
    }
}

/// A registers `x`, B connects to it; returns both sides' Rendezvous (A's, B's).
async fn introduce(a: &mut Agent, b: &Agent) -> (Rendezvous, Rendezvous) {
    let to_b = match b.connect_to("x").await {
        ServerMsg::Rendezvous(r) => r,
        other => panic!("expected Rendezvous, got {other:?}"),
    };
    let to_a = match a.pushed().await {
        ServerMsg::Incoming(r) => r,
        other => panic!("expected Incoming, got {other:?}"),
    };
    assert_eq!(to_a.session, to_b.session);
    (to_a, to_b)
}

#[tokio::test]
async fn packets_are_relayed_between_the_two_agents_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path())).await;
    let mut a = udp_agent(s.addr).await;
    let mut b = udp_agent(s.addr).await;
    a.register(&["x"]).await;
    b.register(&[]).await;
    let (to_a, to_b) = introduce(&mut a, &b).await;
    assert!(to_a.relay && to_b.relay, "S relays this session");
    let session = to_b.session;
    assert_eq!(s.metric("relay_sessions").await, 1);

    // The control connections start at QUIC's smallest MTU and find room for a full-size
    // inner packet plus the header within a few round trips.
    for agent in [&a, &b] {
        let found = timeout(WAIT, async {
            while agent.conn.max_datagram_size().unwrap_or(0) < 1300 + 8 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(
            found.await.is_ok(),
            "only {:?} bytes fit in a datagram",
            agent.conn.max_datagram_size()
        );
    }

    // Both ways, exactly the payload that was sent.
    let hello = encode(session, b"hello from b");
    b.send_relay(hello.clone()).await;
    assert_eq!(a.relayed().await, (hello, "datagram"));
    let big = encode(session, &[0xab; 1300]);
    a.send_relay(big.clone()).await;
    assert_eq!(b.relayed().await, (big, "datagram"));

    // A packet too large for one datagram is split by its sender, and S passes the pieces.
    let split = encode(session, &[3; 3000]);
    b.send_relay(split.clone()).await;
    assert_eq!(a.relayed_packet().await, (split, "datagram", 3));
    // One that comes whole on a stream (as any may) S splits itself to fit the receiver.
    let whole = encode(session, &[5; 2000]);
    b.send_on_stream(whole.clone()).await;
    assert_eq!(a.relayed_packet().await, (whole, "datagram", 2));
    assert_eq!(s.metric("relay_split_packets_total").await, 1);
    // One too large for any number of pieces goes on a stream, and arrives on one.
    let huge = encode(session, &[7; 20_000]);
    b.send_relay(huge.clone()).await;
    assert_eq!(a.relayed_packet().await, (huge, "stream", 1));
    assert_eq!(s.metric("relay_stream_packets_total").await, 1);

    // An unknown session, a third agent using the session, and a runt: none passes. The
    // packet after them is the next thing A receives.
    b.send_relay(encode(session ^ 1, b"wrong session")).await;
    let mut c = udp_agent(s.addr).await;
    c.register(&[]).await;
    c.send_relay(encode(session, b"from a stranger")).await;
    b.conn
        .send_datagram(Bytes::from_static(&[1, 2, 3]))
        .unwrap();
    // A piece of the right session that claims to be piece 5 of 2.
    let mut bad_piece = fragment(&encode(session, &[9; 1300]), 1000, || 1).unwrap()[0].to_vec();
    bad_piece[HEADER + 4] = 5;
    b.conn.send_datagram(Bytes::from(bad_piece)).unwrap();
    assert!(a.nothing_relayed().await);
    let after = encode(session, b"after");
    b.send_relay(after.clone()).await;
    assert_eq!(a.relayed().await.0, after);
    assert!(b.nothing_relayed().await && c.nothing_relayed().await);

    assert_eq!(
        s.metric("relay_packets_total{result=\"unknown_session\"}")
            .await,
        1
    );
    assert_eq!(
        s.metric("relay_packets_total{result=\"not_a_party\"}")
            .await,
        1
    );
    assert_eq!(
        s.metric("relay_packets_total{result=\"malformed\"}").await,
        2
    );
    assert_eq!(
        s.metric("relay_packets_total{result=\"forwarded\"}").await,
        // Hello, big, 3 pieces, one whole split by S, huge, after.
        8
    );
    // S counts what it received: the pieces of the split packet with their headers.
    let pieces = 3 * FRAGMENT_HEADER + 3000;
    let bytes = [12usize, 1300, 2000, 20_000, 5]
        .iter()
        .map(|n| n + 8)
        .sum::<usize>()
        + pieces;
    assert_eq!(s.metric("relay_bytes_total").await, bytes as u64);
}

#[tokio::test]
async fn a_session_over_its_byte_budget_is_closed_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.relay.session_bytes = 5000;
    let s = start(config).await;
    let mut a = udp_agent(s.addr).await;
    let mut b = udp_agent(s.addr).await;
    a.register(&["x"]).await;
    b.register(&[]).await;
    let (_, to_b) = introduce(&mut a, &b).await;
    let session = to_b.session;

    // Five payloads of 1000 bytes use the budget up exactly; all pass.
    for i in 0..5u8 {
        let payload = encode(session, &[i; 992]);
        b.send_relay(payload.clone()).await;
        assert_eq!(a.relayed().await.0, payload);
    }
    // The next byte is over: the session is closed, and both agents are told why.
    b.send_relay(encode(session, b"one too many")).await;
    for agent in [&mut a, &mut b] {
        match agent.pushed().await {
            ServerMsg::RelayClosed {
                session: closed,
                reason,
            } => {
                assert_eq!(closed, session);
                assert_eq!(reason, "relay budget of 5000 bytes used up");
            }
            other => panic!("expected RelayClosed, got {other:?}"),
        }
    }
    assert!(a.nothing_relayed().await);
    b.send_relay(encode(session, b"after the close")).await;
    assert!(a.nothing_relayed().await);
    assert_eq!(s.metric("relay_sessions").await, 0);
    assert_eq!(
        s.metric("relay_sessions_closed_total{reason=\"budget\"}")
            .await,
        1
    );
    // The agents themselves are still connected and can be introduced again.
    let (to_a, to_b) = introduce(&mut a, &b).await;
    assert!(to_a.relay && to_b.relay && to_b.session != session);
}

#[tokio::test]
async fn an_agent_leaving_closes_its_relay_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path())).await;
    let mut a = udp_agent(s.addr).await;
    let mut b = udp_agent(s.addr).await;
    a.register(&["x"]).await;
    b.register(&[]).await;
    let (_, to_b) = introduce(&mut a, &b).await;
    b.conn.close(0u32.into(), b"bye");
    match a.pushed().await {
        ServerMsg::RelayClosed { session, reason } => {
            assert_eq!(session, to_b.session);
            assert!(reason.contains("connection to S ended"), "{reason}");
        }
        other => panic!("expected RelayClosed, got {other:?}"),
    }
    assert_eq!(s.metric("relay_sessions").await, 0);
}

#[tokio::test]
async fn relaying_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.relay.session_bytes = 0;
    let s = start(config).await;
    let mut a = udp_agent(s.addr).await;
    let mut b = udp_agent(s.addr).await;
    a.register(&["x"]).await;
    b.register(&[]).await;
    let (to_a, to_b) = introduce(&mut a, &b).await;
    assert!(!to_a.relay && !to_b.relay);
    b.send_relay(encode(to_b.session, b"no relay")).await;
    assert!(a.nothing_relayed().await);
}

#[tokio::test]
async fn an_agent_over_tcp_is_seen_at_its_tcp_address_and_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path())).await;
    let mut a = tcp_agent(s.addr).await;
    let observed = a.register(&["x"]).await;
    assert_eq!(observed, a.local, "S reports the TCP peer address");
    assert_eq!(
        observed.ip(),
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );

    let mut b = udp_agent(s.addr).await;
    assert_eq!(b.register(&[]).await, b.local);
    let (to_a, to_b) = introduce(&mut a, &b).await;
    assert!(to_a.relay && to_b.relay);
    // Each side's server-reflexive candidate is its real address, not a virtual one.
    let srflx = |r: &Rendezvous| {
        r.peer_candidates
            .iter()
            .filter(|c| c.kind == CandidateKind::ServerReflexive)
            .map(|c| c.addr)
            .collect::<Vec<_>>()
    };
    assert_eq!(srflx(&to_b), vec![a.local]);
    assert_eq!(srflx(&to_a), vec![b.local]);

    let session = to_b.session;
    for size in [20usize, 1300, 3000] {
        let to_tcp = encode(session, &vec![1; size]);
        b.send_relay(to_tcp.clone()).await;
        assert_eq!(
            a.relayed_packet().await.0,
            to_tcp,
            "{size} bytes to the TCP agent"
        );
        let from_tcp = encode(session, &vec![2; size]);
        a.send_relay(from_tcp.clone()).await;
        assert_eq!(
            b.relayed_packet().await.0,
            from_tcp,
            "{size} bytes from the TCP agent"
        );
    }
    assert_eq!(s.metric("tcp_connections_total").await, 1);

    // A's TCP connection ends: S closes its control connection at once (not at the idle
    // timeout), so its name goes offline and its sessions close.
    let virt = a.tcp_virt.unwrap();
    a.socket.table().write().unwrap().remove_peer(virt);
    match b.pushed().await {
        ServerMsg::RelayClosed {
            session: closed, ..
        } => assert_eq!(closed, session),
        other => panic!("expected RelayClosed, got {other:?}"),
    }
    match b.connect_to("x").await {
        ServerMsg::Error(e) => assert_eq!(e.code, ErrorCode::UnknownName),
        other => panic!("expected UnknownName, got {other:?}"),
    }
}

#[tokio::test]
async fn tcp_without_the_preamble_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path())).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("S closes in time");
    assert!(matches!(n, Ok(0) | Err(_)), "S answered {n:?}");
    assert_eq!(s.metric("tcp_bad_preamble_total").await, 1);
    // A proper agent still gets in.
    let mut a = tcp_agent(s.addr).await;
    a.register(&[]).await;
}

#[tokio::test]
async fn tcp_connections_count_against_the_per_source_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.max_unregistered_per_ip = 1;
    let s = start(config).await;
    let mut a = udp_agent(s.addr).await;
    // 127.0.0.1 holds its one unregistered connection: a TCP connection from it is closed
    // at once.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(path::tcp::SERVER_PREAMBLE).await.unwrap();
    let mut buf = [0u8; 64];
    let n = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("S closes in time");
    assert!(matches!(n, Ok(0) | Err(_)), "S answered {n:?}");
    assert_eq!(
        s.metric("connections_refused_total{limit=\"max_unregistered_per_ip\"}")
            .await,
        1
    );
    // Registered, `a` leaves room for the TCP connection.
    a.register(&[]).await;
    let mut b = tcp_agent(s.addr).await;
    b.register(&[]).await;
}

#[tokio::test]
async fn packets_over_the_session_rate_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // The lowest rate: only the burst (one largest packet, 65 543 bytes) passes.
    config.relay.session_rate = 1;
    let s = start(config).await;
    let mut a = udp_agent(s.addr).await;
    let mut b = udp_agent(s.addr).await;
    a.register(&["x"]).await;
    b.register(&[]).await;
    let (_, to_b) = introduce(&mut a, &b).await;
    for i in 0..100u8 {
        b.send_relay(encode(to_b.session, &[i; 992])).await;
    }
    let mut seen = (0, 0);
    for _ in 0..50 {
        seen = (
            s.metric("relay_packets_total{result=\"forwarded\"}").await,
            s.metric("relay_packets_total{result=\"rate_limited\"}")
                .await,
        );
        if seen.0 + seen.1 == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, (65, 35), "(forwarded, rate limited)");
}
