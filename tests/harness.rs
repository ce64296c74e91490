//! Checks of the test harness itself, without p2ptun in between: the service protocol, the
//! digests, the stall detection and the helpers. If these fail, the other tests' failures say
//! nothing about p2ptun.

use p2ptun_testkit as common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn data_is_deterministic_and_independent_of_chunking() {
    let len = 3 * CHUNK as u64 + 1234;
    let mut whole = Vec::new();
    let mut gen = DataGen::new(7, len);
    while let Some(c) = gen.next_chunk() {
        whole.extend_from_slice(c);
    }
    assert_eq!(whole.len() as u64, len);
    let digest: [u8; 32] = Sha256::digest(&whole).into();
    assert_eq!(digest, data_digest(7, len));
    // A shorter stream is a prefix of a longer one.
    let mut short = Vec::new();
    let mut gen = DataGen::new(7, 1000);
    while let Some(c) = gen.next_chunk() {
        short.extend_from_slice(c);
    }
    assert_eq!(&whole[..1000], &short[..]);
    assert_ne!(data_digest(7, len), data_digest(8, len));
}

#[test]
fn helpers_parse_what_programs_print() {
    assert_eq!(
        strip_ansi("\u{1b}[2mts\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m hi"),
        "ts  INFO hi"
    );
    let fp = format!("SHA256:{}", "A".repeat(43));
    assert_eq!(
        find_fingerprint(&format!("key SHA256:short then {fp}, ok")),
        Some(fp.clone())
    );
    assert!(is_fingerprint(&fp));
    assert!(!is_fingerprint(&format!("{fp}x")));
    assert!(!is_fingerprint("SHA256:abc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_checks_both_directions() {
    let svc = Service::start().await;
    let port = svc.port();
    echo_once(port, Duration::from_secs(5)).await.expect("echo");
    let t = transfer_via(port, Mode::Duplex, (1, 4 << 20), (2, 3 << 20))
        .await
        .expect("duplex");
    assert_eq!((t.up, t.down), (4 << 20, 3 << 20));
    transfer_via(port, Mode::Reply, (3, 1 << 20), (4, 2 << 20))
        .await
        .expect("reply");
    transfer_via(port, Mode::Duplex, (5, 0), (6, 0))
        .await
        .expect("empty duplex");
    // The service keys its progress by the seed in the header (its own data's seed).
    assert_eq!(
        *svc.progress(4).received_digest.lock().expect("lock"),
        Some(data_digest(3, 1 << 20))
    );

    // Sink: the service's EOF arrives first, our bytes still go through.
    let mut s = connect(port).await.expect("connect");
    s.write_all(&header(Mode::Sink, 9, 0))
        .await
        .expect("header");
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.expect("read EOF"), 0);
    let (mut r, mut w) = s.into_split();
    let sent = send_data(&mut w, 9, 1 << 20, None).await.expect("send");
    w.shutdown().await.expect("shutdown");
    drop(r.read(&mut b).await);
    let prog = svc.progress(9);
    within("the sink to finish", Duration::from_secs(10), async {
        while !prog.done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(*prog.received_digest.lock().expect("lock"), Some(sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_byte_is_detected() {
    // A proxy that flips one bit in the service's data must make `transfer` fail.
    let svc = Service::start().await;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let pport = proxy.local_addr().expect("addr").port();
    let target = svc.addr();
    tokio::spawn(async move {
        let (client, _) = proxy.accept().await.expect("accept");
        let server = tokio::net::TcpStream::connect(target)
            .await
            .expect("connect");
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
            let _ = sw.shutdown().await;
        });
        let mut buf = vec![0u8; 4096];
        let mut flipped = false;
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !flipped && n > 100 {
                buf[100] ^= 1;
                flipped = true;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
        let _ = up.await;
    });
    let err = transfer_via(pport, Mode::Duplex, (1, 1 << 20), (2, 1 << 20))
        .await
        .expect_err("a flipped bit must be noticed");
    assert!(format!("{err:#}").contains("differ"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_closed_connections_are_told_apart() {
    // A listener that accepts and closes at once.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    expect_closed(port, Duration::from_secs(5))
        .await
        .expect("closed");
    // A service that answers is not "closed".
    let svc = Service::start().await;
    assert!(expect_closed(svc.port(), Duration::from_secs(2))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_stalls_the_writer() {
    // The same stall detection the tunnel test uses, on a direct connection.
    let svc = Service::start().await;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(64 * 1024).expect("rcvbuf");
    let mut s = sock.connect(svc.addr()).await.expect("connect");
    s.write_all(&header(Mode::Duplex, 77, 256 << 20))
        .await
        .expect("header");
    s.shutdown().await.expect("shutdown");
    let prog = svc.progress(77);
    let plateau = within("the writer to stall", Duration::from_secs(20), async {
        loop {
            let a = prog.sent.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let b = prog.sent.load(Ordering::Relaxed);
            if a == b && b > 0 {
                return b;
            }
        }
    })
    .await;
    assert!(plateau < 256 << 20, "nothing stalled");
    assert!(!prog.done.load(Ordering::SeqCst));
}
