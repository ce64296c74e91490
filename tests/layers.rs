//! The layers under the agent, put together on loopback without S: two PathSockets punch to
//! each other with the real check code, then a QUIC connection between virtual addresses
//! carries a TCP connection spliced onto a stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use p2ptun::path::{PathSocket, Policy};
use p2ptun::proto::{Candidate, CandidateKind, Credentials, Rendezvous, ALPN_PEER};
use p2ptun::punch::symmetric::Strategy::Ordinary;
use p2ptun::punch::{find, Punch, StunRouter};
use p2ptun::tunnel::{copy, endpoint, header, tls, Identity};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Side {
    id: Identity,
    router: Arc<StunRouter>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

fn side() -> Side {
    let id = Identity::ephemeral().expect("identity");
    let (socket, rx) =
        PathSocket::bind("127.0.0.1:0".parse().unwrap(), Policy::KnownOnly).expect("bind");
    let addr = socket.local().expect("local");
    let router = StunRouter::start(socket.clone(), rx);
    let server = tls::server_config(id.cert_chain(), id.private_key(), ALPN_PEER).expect("tls");
    let endpoint = endpoint::make_endpoint(socket, Some(server), Some(&id)).expect("endpoint");
    Side {
        id,
        router,
        endpoint,
        addr,
    }
}

fn creds(a: &str, b: &str) -> Credentials {
    Credentials {
        local_ufrag: a.into(),
        local_pwd: format!("{a}-password-0123456789"),
        remote_ufrag: b.into(),
        remote_pwd: format!("{b}-password-0123456789"),
    }
}

fn rendezvous(peer: &Side, creds: Credentials) -> Rendezvous {
    Rendezvous {
        session: 1,
        name: "svc".into(),
        peer_fingerprint: peer.id.fingerprint(),
        peer_candidates: vec![
            // An address nobody answers on comes first, to prove the others are still tried.
            Candidate {
                kind: CandidateKind::Host,
                addr: "127.0.0.1:9".parse().unwrap(),
            },
            Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: peer.addr,
            },
        ],
        credentials: creds,
        start_in_ms: 0,
        relay: false,
        peer_nat: Default::default(),
    }
}

/// The virtual address `at` knows `peer` by.
fn virt_of(at: &Side, peer: &Side) -> SocketAddr {
    at.router.socket().table_write().peer(peer.id.fingerprint())
}

/// Punches both ways, installs each side's path to the other (as the agent's link would),
/// and returns each side's virtual address for the other, with the punches that keep the
/// paths watched.
async fn connect_pair(a: &Side, b: &Side) -> (SocketAddr, SocketAddr, Punch, Punch) {
    let (va, vb) = (virt_of(a, b), virt_of(b, a));
    let (rv_a, rv_b) = (
        rendezvous(b, creds("aaaa", "bbbb")),
        rendezvous(a, creds("bbbb", "aaaa")),
    );
    let (ra, rb) = tokio::join!(
        find(&a.router, &rv_a, &Ordinary),
        find(&b.router, &rv_b, &Ordinary)
    );
    let (pa, remote_a, rtt_a) = ra.expect("a punched");
    let (pb, remote_b, rtt_b) = rb.expect("b punched");
    assert_eq!(remote_a, b.addr);
    assert_eq!(remote_b, a.addr);
    a.router
        .socket()
        .table_write()
        .add_udp_path(va, remote_a, Some(rtt_a));
    b.router
        .socket()
        .table_write()
        .add_udp_path(vb, remote_b, Some(rtt_b));
    (va, vb, pa, pb)
}

#[tokio::test]
async fn punch_then_quic_then_a_spliced_tcp_connection_with_half_close() {
    let (a, b) = (side(), side());
    let (b_virt_at_a, _, _ka, _kb) = connect_pair(&a, &b).await;

    // b serves: a local "service" that reads to EOF, then answers with the digest and 1 MiB.
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = service.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&Sha256::digest(&got)).await.unwrap();
        s.write_all(&vec![7u8; 1 << 20]).await.unwrap();
    });
    let b_end = b.endpoint.clone();
    tokio::spawn(async move {
        let conn = b_end.accept().await.unwrap().await.unwrap();
        let (send, mut recv) = conn.accept_bi().await.unwrap();
        assert_eq!(
            header::read(&mut recv).await.unwrap(),
            header::Header::Service("svc".into())
        );
        let tcp = TcpStream::connect(service_addr).await.unwrap();
        copy::splice(tcp, send, recv).await;
        // A finished stream's data is still in flight: dropping the connection would lose it.
        conn.closed().await;
    });

    // a forwards: a local listener whose connection goes onto a stream.
    let conn = a
        .endpoint
        .connect_with(
            tls::client_config(&a.id, ALPN_PEER).unwrap(),
            b_virt_at_a,
            "p2ptun-peer",
        )
        .unwrap()
        .await
        .expect("QUIC over the punched path");
    assert_eq!(tls::peer_fingerprint(&conn), Some(b.id.fingerprint()));
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_addr = local.local_addr().unwrap();
    let keep = conn.clone();
    tokio::spawn(async move {
        let (tcp, _) = local.accept().await.unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&header::encode("svc")).await.unwrap();
        copy::splice(tcp, send, recv).await;
    });

    let mut client = TcpStream::connect(local_addr).await.unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    client.write_all(&payload).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(reply.len(), 32 + (1 << 20));
    assert_eq!(&reply[..32], Sha256::digest(&payload).as_slice());
    assert!(reply[32..].iter().all(|b| *b == 7));

    drop(keep);
    let status = a
        .router
        .socket()
        .table()
        .read()
        .unwrap()
        .status(b_virt_at_a)
        .unwrap();
    assert!(status.tx_bytes > 3_000_000, "{status:?}");
}

#[tokio::test]
async fn checks_with_wrong_credentials_find_no_path() {
    let (a, b) = (side(), side());
    let vb = virt_of(&b, &a);
    let mut wrong = creds("bbbb", "aaaa");
    wrong.local_pwd = "not-the-password-a-expects".into();
    let rv_a = rendezvous(&b, creds("aaaa", "bbbb"));
    let a_run = find(&a.router, &rv_a, &Ordinary);
    // b answers with a password a does not expect: a must not accept the answers.
    let b_session = b.router.open_session(&wrong);
    let started = std::time::Instant::now();
    let err = a_run.await.err().expect("no path with wrong credentials");
    assert!(err.to_string().contains("no direct path"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(b_session);
    assert!(b
        .router
        .socket()
        .table()
        .read()
        .unwrap()
        .status(vb)
        .unwrap()
        .path
        .is_none());
}

#[tokio::test]
async fn a_reset_on_one_side_resets_the_other() {
    let (a, b) = (side(), side());
    let (b_virt_at_a, _, _ka, _kb) = connect_pair(&a, &b).await;
    let b_end = b.endpoint.clone();
    tokio::spawn(async move {
        let conn = b_end.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        header::read(&mut recv).await.unwrap();
        // The "local service" is refused: reset the stream as the exposer does.
        send.reset(quinn::VarInt::from_u32(header::codes::SERVICE_UNAVAILABLE))
            .unwrap();
        let _ = recv.stop(quinn::VarInt::from_u32(header::codes::SERVICE_UNAVAILABLE));
        conn.closed().await;
    });
    let conn = a
        .endpoint
        .connect_with(
            tls::client_config(&a.id, ALPN_PEER).unwrap(),
            b_virt_at_a,
            "p2ptun-peer",
        )
        .unwrap()
        .await
        .unwrap();
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_addr = local.local_addr().unwrap();
    let forward = tokio::spawn(async move {
        let (tcp, _) = local.accept().await.unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&header::encode("svc")).await.unwrap();
        copy::splice(tcp, send, recv).await
    });
    let mut client = TcpStream::connect(local_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
    let outcome = forward.await.unwrap();
    let why = outcome.failure.expect("a failure is reported");
    assert!(why.contains("local service"), "{why}");
}
