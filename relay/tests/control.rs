//! S in-process on 127.0.0.1 (and on the unspecified address), driven by plain quinn
//! clients: registration, name ownership, tokens, introductions, STUN of both generations on
//! both ports, and garbage that must change nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use p2ptun::proto::{
    read_frame, stun, write_frame, Candidate, CandidateKind, ClientMsg, ErrorCode, ServerMsg,
    ALPN_CONTROL, PROTOCOL_VERSION,
};
use p2ptun::tunnel::{tls, Identity};
use p2ptun_relay::{Relay, RelayConfig};
use quinn::{Connection, RecvStream, SendStream};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const TOKEN: &str = "s3cret";
const WAIT: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    alt: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(state_dir: &Path, tokens: &[&str]) -> RelayConfig {
    RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        stun_alt: Some("127.0.0.1:0".parse().unwrap()),
        state_dir: state_dir.to_owned(),
        tokens: tokens.iter().map(|t| t.to_string()).collect(),
        ..RelayConfig::default()
    }
}

async fn start(state_dir: &Path, tokens: &[&str]) -> Server {
    start_with(config(state_dir, tokens)).await
}

async fn start_with(config: RelayConfig) -> Server {
    let relay = Relay::bind(config).await.expect("bind S");
    let (addr, alt) = (relay.local_addr(), relay.stun_alt_addr());
    assert_ne!(addr.port(), 0);
    assert_ne!(alt.port(), 0);
    Server {
        addr,
        alt,
        task: tokio::spawn(relay.run()),
    }
}

struct Agent {
    identity: Identity,
    _endpoint: quinn::Endpoint,
    conn: Connection,
}

async fn connect(server: SocketAddr, identity: Identity) -> Agent {
    let local = match server {
        SocketAddr::V4(_) => "127.0.0.1:0",
        SocketAddr::V6(_) => "[::1]:0",
    };
    let mut endpoint = quinn::Endpoint::client(local.parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls::client_config(&identity, ALPN_CONTROL).unwrap());
    let conn = timeout(WAIT, endpoint.connect(server, "p2ptun").unwrap())
        .await
        .expect("handshake in time")
        .expect("handshake");
    Agent {
        identity,
        _endpoint: endpoint,
        conn,
    }
}

async fn new_agent(server: SocketAddr) -> Agent {
    connect(server, Identity::ephemeral().unwrap()).await
}

async fn read(recv: &mut RecvStream) -> ServerMsg {
    timeout(WAIT, read_frame::<ServerMsg, _>(recv))
        .await
        .expect("an answer in time")
        .expect("a well-formed answer")
        .expect("an answer before the stream ends")
}

fn host(port: u16) -> Candidate {
    Candidate {
        kind: CandidateKind::Host,
        addr: SocketAddr::from(([10, 0, 0, 1], port)),
    }
}

impl Agent {
    async fn request(&self, msg: &ClientMsg) -> (SendStream, RecvStream, ServerMsg) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        write_frame(&mut send, msg).await.unwrap();
        let answer = read(&mut recv).await;
        (send, recv, answer)
    }

    async fn register(
        &self,
        token: Option<&str>,
        names: &[&str],
    ) -> (SendStream, RecvStream, ServerMsg) {
        self.request(&ClientMsg::Register {
            version: PROTOCOL_VERSION,
            token: token.map(str::to_owned),
            names: names.iter().map(|n| n.to_string()).collect(),
            candidates: vec![host(4000)],
            nat: Default::default(),
        })
        .await
    }

    async fn connect_to(&self, name: &str) -> ServerMsg {
        self.request(&ClientMsg::Connect {
            name: name.into(),
            candidates: vec![host(5000)],
            nat: Default::default(),
        })
        .await
        .2
    }

    fn local(&self) -> SocketAddr {
        self._endpoint.local_addr().unwrap()
    }
}

/// Why S closed `conn` (waiting for it to do so).
async fn closed_reason(conn: &Connection) -> String {
    timeout(WAIT, conn.closed())
        .await
        .expect("S closes the connection")
        .to_string()
}

fn expect_error(msg: ServerMsg, code: ErrorCode, text: &str) {
    match msg {
        ServerMsg::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.message.contains(text), "{:?} lacks {text:?}", e.message);
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Sends `request` to `to` and returns the answer and where it came from, if one comes
/// within a second.
async fn ask(sock: &UdpSocket, to: SocketAddr, request: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
    sock.send_to(request, to).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some((from, buf[..n].to_vec()))
}

/// A Binding request to `to`: where the answer came from, and the answer.
async fn stun_ask(
    sock: &UdpSocket,
    to: SocketAddr,
    change: Option<(bool, bool)>,
) -> Option<(SocketAddr, stun::StunMessage)> {
    let tid = stun::new_tid();
    let (from, answer) = ask(sock, to, &stun::binding_request(tid, change)).await?;
    let msg = stun::decode(&answer).ok()?;
    assert_eq!(msg.transaction_id(), tid);
    Some((from, msg))
}

/// A Binding request to `to`: where the answer came from, and the mapping it reports.
async fn stun_query(
    sock: &UdpSocket,
    to: SocketAddr,
    change: Option<(bool, bool)>,
) -> Option<(SocketAddr, SocketAddr)> {
    let (from, msg) = stun_ask(sock, to, change).await?;
    Some((from, stun::mapped_address(&msg)?))
}

/// A classic (RFC 3489) Binding request to `to`, made by hand: where the answer came from,
/// and the MAPPED-ADDRESS it reports (checked to be a success response that echoes the
/// whole 16-byte transaction ID).
async fn classic_query(sock: &UdpSocket, to: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
    let tid: [u8; 16] = rand::random();
    let mut request = vec![0x00, 0x01, 0x00, 0x00];
    request.extend_from_slice(&tid);
    let (from, b) = ask(sock, to, &request).await?;
    assert_eq!(b[..2], [0x01, 0x01], "{b:?}");
    assert_eq!(b[4..20], tid);
    assert_eq!(b[20..22], [0x00, 0x01], "MAPPED-ADDRESS first: {b:?}");
    let port = u16::from_be_bytes([b[26], b[27]]);
    let ip: std::net::IpAddr = match b[25] {
        0x01 => <[u8; 4]>::try_from(&b[28..32]).ok()?.into(),
        _ => <[u8; 16]>::try_from(&b[28..44]).ok()?.into(),
    };
    Some((from, SocketAddr::new(ip, port)))
}

#[tokio::test]
async fn registration_names_tokens_and_introductions() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[TOKEN]).await;

    // A registers and learns where S sees it from.
    let a = new_agent(s.addr).await;
    let (_a_send, mut a_recv, answer) = a.register(Some(TOKEN), &["home"]).await;
    match answer {
        ServerMsg::Registered {
            observed,
            stun_alt,
            members,
        } => {
            assert_eq!(observed, a.local());
            assert_eq!(stun_alt, Some(s.alt));
            assert!(
                members.is_empty(),
                "a standalone S has no cluster: {members:?}"
            );
        }
        other => panic!("expected Registered, got {other:?}"),
    }

    // Another identity cannot take A's name; the connection is closed with the reason.
    let thief = new_agent(s.addr).await;
    let (_, _, answer) = thief.register(Some(TOKEN), &["web", "home"]).await;
    expect_error(answer, ErrorCode::NameTaken, "'home'");
    let reason = closed_reason(&thief.conn).await;
    assert!(reason.contains("another identity"), "{reason}");

    // Tokens.
    let c = new_agent(s.addr).await;
    let (_, _, answer) = c.register(Some("guess"), &[]).await;
    expect_error(answer, ErrorCode::BadToken, "the token is wrong");
    let c = new_agent(s.addr).await;
    let (_, _, answer) = c.register(None, &[]).await;
    expect_error(answer, ErrorCode::BadToken, "requires a token");

    // Versions and names.
    let c = new_agent(s.addr).await;
    let (_, _, answer) = c
        .request(&ClientMsg::Register {
            version: PROTOCOL_VERSION + 1,
            token: Some(TOKEN.into()),
            names: vec![],
            candidates: vec![],
            nat: Default::default(),
        })
        .await;
    expect_error(answer, ErrorCode::BadVersion, "version");
    let c = new_agent(s.addr).await;
    let (_, _, answer) = c.register(Some(TOKEN), &["Bad_Name"]).await;
    expect_error(answer, ErrorCode::InvalidName, "Bad_Name");

    // B forwards: requests before registering, and malformed ones, fail on their stream only.
    let b = new_agent(s.addr).await;
    expect_error(
        b.connect_to("home").await,
        ErrorCode::BadRequest,
        "Register",
    );
    let (mut send, mut recv) = b.conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'])
        .await
        .unwrap();
    expect_error(read(&mut recv).await, ErrorCode::BadRequest, "malformed");
    let (_b_send, _b_recv, answer) = b.register(Some(TOKEN), &[]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
    let (_, _, answer) = b.register(Some(TOKEN), &[]).await;
    expect_error(answer, ErrorCode::BadRequest, "already registered");
    expect_error(
        b.connect_to("nope").await,
        ErrorCode::UnknownName,
        "nobody exposes 'nope' on this server right now",
    );

    // The introduction: both sides hear of each other, with mirrored credentials.
    let to_b = match b.connect_to("home").await {
        ServerMsg::Rendezvous(r) => r,
        other => panic!("expected Rendezvous, got {other:?}"),
    };
    let to_a = match read(&mut a_recv).await {
        ServerMsg::Incoming(r) => r,
        other => panic!("expected Incoming, got {other:?}"),
    };
    assert_eq!(to_a.session, to_b.session);
    assert_eq!((to_a.name.as_str(), to_b.name.as_str()), ("home", "home"));
    assert_eq!(to_b.peer_fingerprint, a.identity.fingerprint());
    assert_eq!(to_a.peer_fingerprint, b.identity.fingerprint());
    let (ca, cb) = (&to_a.credentials, &to_b.credentials);
    assert_eq!(ca.local_ufrag, cb.remote_ufrag);
    assert_eq!(ca.local_pwd, cb.remote_pwd);
    assert_eq!(ca.remote_ufrag, cb.local_ufrag);
    assert_eq!(ca.remote_pwd, cb.local_pwd);
    assert_eq!(
        to_a.peer_candidates,
        vec![
            host(5000),
            Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: b.local()
            }
        ]
    );
    assert!(to_b.peer_candidates.contains(&host(4000)));
    assert!(to_b.peer_candidates.contains(&Candidate {
        kind: CandidateKind::ServerReflexive,
        addr: a.local()
    }));
    assert!(to_a.start_in_ms <= 1000 && to_b.start_in_ms <= 1000);

    // A reconnects with the same key: the new registration replaces the old connection.
    let a2 = connect(s.addr, a.identity).await;
    let (_a2_send, mut a2_recv, answer) = a2.register(Some(TOKEN), &["home"]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
    let reason = closed_reason(&a.conn).await;
    assert!(reason.contains("replaced"), "{reason}");
    assert!(matches!(
        b.connect_to("home").await,
        ServerMsg::Rendezvous(_)
    ));
    assert!(matches!(read(&mut a2_recv).await, ServerMsg::Incoming(_)));

    // When A leaves, its name goes offline but stays A's.
    a2.conn.close(0u32.into(), b"bye");
    let mut offline = false;
    for _ in 0..50 {
        if let ServerMsg::Error(e) = b.connect_to("home").await {
            assert_eq!(e.code, ErrorCode::UnknownName);
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(offline, "'home' should go offline when its agent leaves");
    let thief = new_agent(s.addr).await;
    let (_, _, answer) = thief.register(Some(TOKEN), &["home"]).await;
    expect_error(answer, ErrorCode::NameTaken, "'home'");
}

#[tokio::test]
async fn claims_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let owner = Identity::load_or_create(&dir.path().join("owner.pem")).unwrap();
    let fingerprint_before;
    {
        let s = start(&dir.path().join("s"), &[]).await;
        let a = connect(s.addr, owner).await;
        let (_, _, answer) = a.register(None, &["home"]).await;
        assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
        fingerprint_before = tls::peer_fingerprint(&a.conn);
    }
    let s = start(&dir.path().join("s"), &[]).await;
    let a = new_agent(s.addr).await;
    // S's own key is kept, so agents' pins hold.
    assert_eq!(tls::peer_fingerprint(&a.conn), fingerprint_before);
    let (_, _, answer) = a.register(None, &["home"]).await;
    expect_error(answer, ErrorCode::NameTaken, "'home'");
    let owner = Identity::load_or_create(&dir.path().join("owner.pem")).unwrap();
    let a = connect(s.addr, owner).await;
    let (_, _, answer) = a.register(None, &["home"]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
}

#[tokio::test]
async fn stun_on_both_ports_and_garbage_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &[]);
    // This test sends far more than one source may; the limit has its own test.
    config.limits.stun_rate_per_ip = 100_000;
    let s = start_with(config).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();

    // Garbage of every kind at both ports: nothing answers, nothing breaks.
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0; 1],
        vec![0xff; 1200],
        vec![0xc0; 1200],
        vec![0x40; 50],
    ];
    let mut truncated = stun::binding_request(stun::new_tid(), Some((true, true)));
    truncated.truncate(22);
    junk.push(truncated);
    let mut bad_len = stun::binding_request(stun::new_tid(), None);
    bad_len[3] = 200;
    junk.push(bad_len);
    // Classic requests: one declaring attributes it lacks, one asking for another IP (S has
    // none), one with a comprehension-required attribute S does not know.
    let classic = |attributes: &[u8]| {
        let mut r = vec![0x00, 0x01, 0x00, 0x08];
        r.extend_from_slice(&[5; 16]);
        r.extend_from_slice(attributes);
        r
    };
    junk.push(classic(&[]));
    junk.push(classic(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 4]));
    junk.push(classic(&[0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0]));
    for seed in 0..40u8 {
        let mut j = stun::binding_request(stun::new_tid(), None);
        j.extend((0..40u8).map(|i| i.wrapping_mul(seed) ^ seed));
        junk.push(j);
    }
    for j in &junk {
        for to in [s.addr, s.alt] {
            sock.send_to(j, to).await.unwrap();
        }
    }
    let mut buf = [0u8; 1500];
    if let Ok(Ok((n, from))) = timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await {
        // A datagram that happens to be a valid request would be answered; none of these is.
        panic!("S answered garbage from {from}: {:?}", &buf[..n]);
    }

    // Plain requests are answered by the port asked; CHANGE-REQUEST by the other one.
    assert_eq!(stun_query(&sock, s.addr, None).await, Some((s.addr, me)));
    assert_eq!(stun_query(&sock, s.alt, None).await, Some((s.alt, me)));
    assert_eq!(
        stun_query(&sock, s.addr, Some((false, true))).await,
        Some((s.alt, me))
    );
    assert_eq!(
        stun_query(&sock, s.alt, Some((true, true))).await,
        Some((s.addr, me))
    );

    // QUIC still works after all that.
    let a = new_agent(s.addr).await;
    let (_, _, answer) = a.register(None, &["after-garbage"]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
}

#[tokio::test]
async fn s_on_the_unspecified_address_reports_and_answers_from_the_address_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &[]);
    // As S's default does: the unspecified address, the alternate socket beside it.
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.stun_alt = None;
    config.limits.stun_rate_per_ip = 100_000;
    let s = start_with(config).await;
    assert!(s.addr.ip().is_unspecified() && s.alt.ip().is_unspecified());
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();

    // 127.0.0.1 and 127.0.0.2 are both this host's, as a host with two addresses has.
    for host in ["127.0.0.1", "127.0.0.2"] {
        let host: std::net::IpAddr = host.parse().unwrap();
        let (main, alt) = (
            SocketAddr::new(host, s.addr.port()),
            SocketAddr::new(host, s.alt.port()),
        );
        // A 28-byte request (CHANGE-REQUEST asking nothing) has room for both addresses.
        let (from, msg) = stun_ask(&sock, main, Some((false, false))).await.unwrap();
        assert_eq!(from, main);
        assert_eq!(stun::mapped_address(&msg), Some(me));
        assert_eq!(stun::response_origin(&msg), Some(main));
        assert_eq!(
            stun::other_address(&msg),
            Some(alt),
            "OTHER-ADDRESS at {host}"
        );
        // Change port: the answer comes from the alternate port of the address asked.
        let (from, msg) = stun_ask(&sock, main, Some((false, true))).await.unwrap();
        assert_eq!(from, alt);
        assert_eq!(stun::response_origin(&msg), Some(alt));
        // And the other way round.
        let (from, msg) = stun_ask(&sock, alt, Some((false, false))).await.unwrap();
        assert_eq!((from, stun::other_address(&msg)), (alt, Some(main)));
        assert_eq!(
            stun_query(&sock, alt, Some((true, true))).await,
            Some((main, me))
        );
        // Classic clients, on both ports.
        assert_eq!(classic_query(&sock, main).await, Some((main, me)));
        assert_eq!(classic_query(&sock, alt).await, Some((alt, me)));
    }

    // An agent is told the alternate port at the address its packets reached.
    let a = new_agent(SocketAddr::new([127, 0, 0, 1].into(), s.addr.port())).await;
    let (_, _, answer) = a.register(None, &["wildcard"]).await;
    match answer {
        ServerMsg::Registered {
            observed, stun_alt, ..
        } => {
            assert_eq!(observed, a.local());
            assert_eq!(
                stun_alt,
                Some(SocketAddr::new([127, 0, 0, 1].into(), s.alt.port()))
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Whether this host can bind `::1`; if not, says the IPv6 half of a test is skipped, and
/// fails where it must run (CI=true).
fn ipv6_loopback() -> bool {
    if std::net::UdpSocket::bind("[::1]:0").is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "::1 cannot be bound, and CI=true requires the IPv6 half"
    );
    println!("SKIPPED: no IPv6 on loopback");
    false
}

#[tokio::test]
async fn the_default_listen_address_serves_ipv4_and_ipv6_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &[]);
    // The default, on free ports.
    let default = RelayConfig::default();
    config.listen = SocketAddr::new(default.listen.ip(), 0);
    config.ipv4_fallback = default.ipv4_fallback;
    config.stun_alt = None;
    config.limits.stun_rate_per_ip = 100_000;
    let s = start_with(config).await;
    let mut clients = vec!["127.0.0.1"];
    if ipv6_loopback() {
        assert_eq!(s.addr.ip(), default.listen.ip(), "one dual-stack socket");
        clients.push("::1");
    }
    for host in clients {
        let host: std::net::IpAddr = host.parse().unwrap();
        let (main, alt) = (
            SocketAddr::new(host, s.addr.port()),
            SocketAddr::new(host, s.alt.port()),
        );
        let sock = UdpSocket::bind(SocketAddr::new(host, 0)).await.unwrap();
        // Every address in the client's own family: an IPv4 client's mapping, S's addresses
        // and the answer's source are IPv4, never IPv4-mapped.
        let me = sock.local_addr().unwrap();
        let (from, msg) = stun_ask(&sock, main, Some((false, false))).await.unwrap();
        assert_eq!(from, main);
        assert_eq!(stun::mapped_address(&msg), Some(me));
        assert_eq!(stun::other_address(&msg), Some(alt));
        assert_eq!(
            stun_query(&sock, main, Some((false, true))).await,
            Some((alt, me))
        );
        assert_eq!(classic_query(&sock, alt).await, Some((alt, me)));
        // QUIC: an agent registers and is told where S sees it and the alternate port.
        let a = new_agent(main).await;
        let (_, _, answer) = a.register(None, &[]).await;
        match answer {
            ServerMsg::Registered {
                observed, stun_alt, ..
            } => {
                assert_eq!(observed, a.local(), "{host}");
                assert_eq!(stun_alt, Some(alt), "{host}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn stun_is_rate_limited_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &[]);
    config.limits.stun_rate_per_ip = 1;
    let s = start_with(config).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A burst of twice the rate passes, then nothing until tokens refill; classic requests
    // take from the same allowance.
    assert!(classic_query(&sock, s.addr).await.is_some());
    assert!(stun_query(&sock, s.alt, None).await.is_some());
    assert!(stun_query(&sock, s.addr, None).await.is_none());
}

#[tokio::test]
async fn unregistered_connections_per_source_are_limited_and_agents_by_their_own_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &[]);
    config.limits.max_unregistered_per_ip = 2;
    config.limits.max_agents_per_ip = 2;
    let s = start_with(config).await;
    let a = new_agent(s.addr).await;
    let b = new_agent(s.addr).await;
    // A third unregistered connection from 127.0.0.1 is refused at the handshake.
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let id = Identity::ephemeral().unwrap();
    endpoint.set_default_client_config(tls::client_config(&id, ALPN_CONTROL).unwrap());
    let third = timeout(WAIT, endpoint.connect(s.addr, "p2ptun").unwrap())
        .await
        .expect("an answer in time");
    assert!(
        third.is_err(),
        "a third unregistered connection should be refused"
    );
    // Registered agents are not unregistered connections: once `a` registers, there is
    // room for another connection from the same address.
    let (_a_send, _a_recv, answer) = a.register(None, &[]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
    let c = new_agent(s.addr).await;
    let (_c_send, _c_recv, answer) = c.register(None, &[]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
    // Two agents are this address's share: a third registration is refused, saying why.
    let (_, _, answer) = b.register(None, &["held-back"]).await;
    match answer {
        ServerMsg::Error(e) => {
            assert_eq!(e.code, ErrorCode::RateLimited);
            assert!(e.message.contains("max_agents_per_ip"), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // The refused agent claimed no name: another key may take it.
    let d = new_agent(s.addr).await;
    c.conn.close(0u32.into(), b"bye");
    c._endpoint.wait_idle().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_d_send, _d_recv, answer) = d.register(None, &["held-back"]).await;
    assert!(matches!(answer, ServerMsg::Registered { .. }), "{answer:?}");
}
