//! End-to-end tunnel tests: S and two agents on 127.0.0.1, every byte checked by SHA-256.
//! Most run inside the test process (the kit's `Kit::in_process`): what is tested there is
//! the tunnel, not the command line. The UDP services' tests start `p2ptun expose --udp` and
//! `p2ptun forward --udp` (or `up` files) as a user would; the DNS one needs dnsmasq and
//! dig (Debian's dnsmasq-base and bind9-dnsutils) and says SKIPPED without them (fails
//! under CI=true).
//!
//! Run: `cargo test --release --test tunnel` (debug works too, only slower).

use p2ptun_testkit as common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::udp::{Accounting, EchoRound, UdpClient, UdpEcho};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_through_one_connection() {
    let lab = Lab::new("big-transfer");
    let pair = Kit::new(&lab, "home")
        .in_process()
        .ready(Ready::Echo)
        .serve()
        .await;
    let len = 64 * MIB;
    let t = within(
        "64 MiB each way through one connection",
        Duration::from_secs(300),
        transfer_via(pair.port(), Mode::Duplex, (0xA11CE, len), (0xB0B, len)),
    )
    .await
    .unwrap_or_else(|e| panic!("64 MiB each way: {e:#}\n{}", pair.reports()));
    println!(
        "64 MiB each way at once in {:.2} s ({:.1} MiB/s each way)",
        t.elapsed.as_secs_f64(),
        t.mib_per_s()
    );
    pair.assert_healthy("after the 64 MiB transfer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_and_one_stalled_reader() {
    const STALL_SEED: u64 = 0x5747_1100;
    // More than every buffer on the way can hold (two TCP sockets that may autotune to tens of
    // MiB, the QUIC stream window), so the service's writer must block.
    const STALL_LEN: u64 = 128 * MIB;
    const CONNS: u64 = 199;
    const EACH: u64 = 256 * 1024;

    let lab = Lab::new("many-connections");
    let pair = Kit::new(&lab, "many")
        .in_process()
        .ready(Ready::Echo)
        .serve()
        .await;

    // The stalled connection: it asks for 128 MiB and never reads. A small receive buffer
    // keeps the client's socket from swallowing much.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let mut stalled = sock
        .connect(([127, 0, 0, 1], pair.port()).into())
        .await
        .expect("connect the stalled connection");
    stalled
        .write_all(&header(Mode::Duplex, STALL_SEED, STALL_LEN))
        .await
        .expect("send the stalled connection's header");
    stalled.shutdown().await.expect("shutdown write");
    let prog = pair.service().progress(STALL_SEED);
    let plateau = within(
        "the stalled connection's writer to block",
        Duration::from_secs(60),
        async {
            loop {
                let a = prog.sent.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let b = prog.sent.load(Ordering::Relaxed);
                assert!(
                    !prog.done.load(Ordering::SeqCst),
                    "all {STALL_LEN} bytes for a client that reads nothing were taken: something \
                     buffers without bound"
                );
                if a == b && b > 0 {
                    return b;
                }
            }
        },
    )
    .await;
    println!(
        "the stalled connection holds {:.1} MiB in buffers",
        plateau as f64 / MIB as f64
    );

    // 199 others at once, each with its own data both ways.
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..CONNS {
        let port = pair.port();
        set.spawn(async move {
            let r = transfer_via(port, Mode::Duplex, (1000 + i, EACH), (5000 + i, EACH)).await;
            (i, r)
        });
    }
    let mut failures = Vec::new();
    let mut ok = 0;
    let all = within(
        "199 concurrent connections beside a stalled one",
        Duration::from_secs(120),
        async {
            while let Some(joined) = set.join_next().await {
                match joined {
                    Ok((_, Ok(_))) => ok += 1,
                    Ok((i, Err(e))) => failures.push(format!("connection {i}: {e:#}")),
                    Err(e) => failures.push(format!("task: {e}")),
                }
            }
        },
    );
    all.await;
    assert!(
        failures.is_empty(),
        "{} of {CONNS} connections failed, e.g.:\n{}\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n"),
        pair.reports()
    );
    assert_eq!(ok, CONNS);
    println!(
        "{CONNS} connections x 256 KiB each way in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // The stalled one is still stalled: its writer has not finished.
    let now = prog.sent.load(Ordering::Relaxed);
    assert!(
        now < STALL_LEN && !prog.done.load(Ordering::SeqCst),
        "the stalled connection should still be blocked (sent {now} of {STALL_LEN})"
    );

    // Reading it now gets every byte, intact.
    let (mut r, _w) = stalled.into_split();
    let (got, trailer) = within(
        "draining the stalled connection",
        Duration::from_secs(180),
        async {
            let got = hash_exact(&mut r, STALL_LEN).await?;
            let mut trailer = [0u8; 64];
            r.read_exact(&mut trailer).await?;
            anyhow::Ok((got, trailer))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("draining the stalled connection: {e:#}\n{}", pair.reports()));
    assert_eq!(
        hex(&got),
        hex(&trailer[..32]),
        "the stalled connection's bytes differ from what the service sent"
    );
    pair.assert_healthy("after the concurrent connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_carried_both_ways() {
    let lab = Lab::new("half-close");
    let pair = Kit::new(&lab, "half")
        .in_process()
        .ready(Ready::Echo)
        .serve()
        .await;

    // The client finishes its side first; the service reads to EOF and only then answers
    // with 1 MiB and its digest of what it read.
    within(
        "request, FIN, then the reply",
        Duration::from_secs(60),
        transfer_via(pair.port(), Mode::Reply, (11, MIB), (12, MIB)),
    )
    .await
    .unwrap_or_else(|e| panic!("reply after FIN: {e:#}\n{}", pair.reports()));
    // The same with an empty request (as `sha256sum < /dev/null` would be).
    within(
        "empty request, FIN, then the reply",
        Duration::from_secs(60),
        transfer_via(pair.port(), Mode::Reply, (13, 0), (14, MIB)),
    )
    .await
    .unwrap_or_else(|e| panic!("reply after bare FIN: {e:#}\n{}", pair.reports()));

    // The service finishes its side first; the client still sends 1 MiB after seeing EOF.
    let mut s = connect(pair.port()).await.expect("connect");
    s.write_all(&header(Mode::Sink, 15, 0))
        .await
        .expect("header");
    let mut b = [0u8; 1];
    let n = within(
        "the service's FIN to arrive",
        Duration::from_secs(10),
        s.read(&mut b),
    )
    .await
    .expect("read the service's EOF");
    assert_eq!(n, 0, "expected EOF from a service that shut its write side");
    let (mut r, mut w) = s.into_split();
    let sent = within(
        "sending after the peer's FIN",
        Duration::from_secs(60),
        send_data(&mut w, 15, MIB, None),
    )
    .await
    .expect("send after the service's FIN");
    w.shutdown().await.expect("shutdown");
    let prog = pair.service().progress(15);
    within(
        "the service to receive everything after its FIN",
        Duration::from_secs(30),
        async {
            while !prog.done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert_eq!(
        prog.received_digest.lock().expect("lock").map(|d| hex(&d)),
        Some(hex(&sent)),
        "the service received other bytes than were sent after its FIN"
    );
    // And the connection then ends for the client too.
    let n = within(
        "the connection to end",
        Duration::from_secs(10),
        r.read(&mut b),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0);
    pair.assert_healthy("after the half-closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_local_service_ends_only_its_stream() {
    let lab = Lab::new("refused-service");
    let service = Service::start().await;
    let dead_port = free_port(); // nothing listens there
                                 // Two names in each agent: "live" for the service, "live-2" for the dead port.
    let t = Kit::new(&lab, "live")
        .in_process()
        .ready(Ready::Echo)
        .start(vec![service.target(), format!("127.0.0.1:{dead_port}")])
        .await;
    let (lport, dport) = (t.ports[0], t.ports[1]);
    let procs = t.parts();

    // A connection to the live service stays open throughout.
    let mut live = EchoConn::open(lport).await.expect("open a live connection");
    live.ping(1000, Duration::from_secs(10))
        .await
        .expect("live echo");
    for round in 0..3u64 {
        let start = Instant::now();
        let how = expect_closed(dport, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "round {round}: a connection to a refused service: {e:#}\n{}",
                    reports(&procs)
                )
            });
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "round {round}: closing a connection to a refused service took {took:?} ({how:?})"
        );
        live.ping(1000, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the open live connection: {e:#}"));
        within(
            "a new live connection",
            Duration::from_secs(60),
            transfer_via(lport, Mode::Duplex, (100 + round, MIB), (200 + round, MIB)),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "round {round}: the other name after a refused stream: {e:#}\n{}",
                reports(&procs)
            )
        });
    }
    live.close().await.expect("close the live connection");
    t.assert_healthy("after refused streams");
}

/// Two agents that each expose a service and forward to the other's (the link module doc
/// says what they share: one link, one connection per direction). Both directions carry
/// bytes, and each agent lists the other as one peer. Processes, since `up -c` is the
/// deployment this is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_that_expose_and_forward_to_each_other() {
    let lab = Lab::new("mutual");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let (on_a, on_b) = (Service::start().await, Service::start().await);
    let (to_a, to_b) = (free_port(), free_port());
    let (a, b) = (lab.agent("a", &relay), lab.agent("b", &relay));
    let expose = |name: &str, svc: &Service| UpExpose {
        name: name.into(),
        local: format!("127.0.0.1:{}", svc.port()),
        ..UpExpose::default()
    };
    let forward = |name: &str, port: u16| UpForward {
        name: name.into(),
        local: format!("127.0.0.1:{port}"),
        ..UpForward::default()
    };
    let a_proc = a.up(&[expose("on-a", &on_a)], &[forward("on-b", to_b)]);
    let b_proc = b.up(&[expose("on-b", &on_b)], &[forward("on-a", to_a)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in [to_a, to_b] {
        loop {
            match echo_once(port, Duration::from_secs(5)).await {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => panic!(
                    "no echo through port {port}: {e:#}\n{}",
                    reports(&[relay.proc(), &a_proc, &b_proc])
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    for (agent, label) in [(&a, "a"), (&b, "b")] {
        let status = agent_status(&agent.state_dir).await.expect("status");
        let peers = status[0]["peers"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            peers.len(),
            1,
            "{label} lists {} peers: {peers:?}",
            peers.len()
        );
    }
    for p in [&a_proc, &b_proc] {
        p.assert_running("after both directions worked");
        p.assert_no_panic();
    }
}

/// S's status page (`GET /` on its metrics address), as a real browser renders it: a headless
/// Chromium loads it while a tunnel is up that has carried bytes, and its DOM must show the
/// exposer (fingerprint and name) and the relay session S opened for the introduction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_tunnel_in_a_browser() {
    if !installed("chromium", "--version") {
        skip_or_fail("chromium not installed");
        return;
    }
    let lab = Lab::new("status-page");
    let metrics_port = free_port();
    let pair = Kit::new(&lab, "home")
        .in_process()
        .relay_opts(RelayOpts {
            extra_args: vec!["--metrics".into(), format!("127.0.0.1:{metrics_port}")],
            ..RelayOpts::default()
        })
        .ready(Ready::Echo)
        .serve()
        .await;
    // The agents' connection starts on the relay (S opens the session before either agent
    // hears of the other) and moves to a direct path once one is confirmed, so on loopback
    // too its handshake and first packets go through S: the session's count is not zero.
    transfer_via(pair.port(), Mode::Duplex, (1, MIB), (2, MIB))
        .await
        .unwrap_or_else(|e| panic!("transfer: {e:#}\n{}", pair.reports()));
    let fingerprint = |dir: &std::path::Path| {
        p2ptun::tunnel::identity::Identity::load_or_create(&p2ptun::agent::identity_path(dir))
            .expect("the agent's identity")
            .fingerprint()
            .to_string()
    };
    let exposer = fingerprint(&pair.expose_agent.state_dir);
    let forwarder = fingerprint(&pair.forward_agent.state_dir);

    let started = Instant::now();
    let mut chromium = tokio::process::Command::new("chromium");
    chromium
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            lab.path().join("chromium").display()
        ))
        .args(["--dump-dom", &format!("http://127.0.0.1:{metrics_port}/")])
        .kill_on_drop(true);
    let out = within(
        "chromium to dump the page",
        Duration::from_secs(60),
        chromium.output(),
    )
    .await
    .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    println!(
        "chromium dumped the page in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let context = || {
        format!(
            "chromium's DOM:\n{dom}\nits stderr:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            pair.reports()
        )
    };
    assert!(out.status.success(), "chromium failed\n{}", context());
    for needle in [
        "p2ptun S: status".to_string(),
        format!("<code>{exposer}</code>"),
        format!("<td>{}</td>", pair.name()),
        "<span class=\"live\">live</span>".to_string(),
        "Relay sessions (1)".to_string(),
        format!("<td><code>{forwarder}</code></td><td><code>{exposer}</code>"),
    ] {
        assert!(
            dom.contains(&needle),
            "{needle:?} is not on the page\n{}",
            context()
        );
    }
    // The session's bytes, as the page shows them (`data-bytes`), and S's total.
    let relayed: u64 = dom
        .split("data-bytes=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count on the page\n{}", context()));
    println!("the page shows {relayed} bytes relayed for the session");
    assert!(relayed > 0, "nothing relayed\n{}", context());
    pair.assert_healthy("after the status page was read");
}

// ---------------------------------------------------------------------------------------------
// UDP services

/// A UDP echo service through `expose --udp` and `forward --udp`: three clients at once
/// (three flows), 2,000 datagrams each, every echo checked by SHA-256, and every datagram
/// that did not come back accounted for by the two agents' counts. A datagram larger than
/// the tunnel carries is dropped whole, counted and logged, and the flow goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_through_the_tunnel_every_datagram_accounted_for() {
    const PER_CLIENT: u64 = 2000;
    let lab = Lab::new("udp-echo");
    let here = Place::here();
    let t = Kit::new(&lab, "echo")
        .udp()
        .start(vec![UdpEcho::start(&here)])
        .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            UdpClient::open(&here, t.port())
                .await
                .expect("a UDP client"),
        );
    }
    let mut total = EchoRound::default();
    for c in &clients {
        let hello = c
            .wait_echo(TUNNEL_READY)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports()));
        total = total + hello;
    }
    let started = Instant::now();
    let (a, b, c) = tokio::join!(
        clients[0].round(0x0DA7_0000, PER_CLIENT, 1000, 32, Duration::from_secs(2)),
        clients[1].round(0x1DA7_0000, PER_CLIENT, 1000, 32, Duration::from_secs(2)),
        clients[2].round(0x2DA7_0000, PER_CLIENT, 1000, 32, Duration::from_secs(2)),
    );
    let rounds: Vec<EchoRound> = [a, b, c]
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports())))
        .collect();
    println!(
        "3 x {PER_CLIENT} datagrams of 1000 bytes echoed in {:.2} s: {rounds:?}",
        started.elapsed().as_secs_f64()
    );
    for r in &rounds {
        assert_eq!((r.corrupt, r.duplicate), (0, 0), "{r:?}\n{}", t.reports());
        // Loopback loses nothing by itself; a few go while the path moves from the relay to
        // a direct one at the start, or to full socket buffers on a busy machine, and the
        // accounting below must name where.
        assert!(
            r.received * 100 >= r.sent * 95,
            "{r:?}: more than 5% lost\n{}",
            t.reports()
        );
        total = total + *r;
    }

    // Larger than any path's datagram (the end-to-end MTU is at most 1400 bytes).
    clients[0].send(&[0x55; 1500]).await.expect("send");
    total.sent += 1;
    assert_eq!(clients[0].recv(Duration::from_millis(500)).await, None);
    t.forwarder
        .proc()
        .wait_log_any(
            &["dropping a UDP datagram of 1500 bytes"],
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("no log line for the datagram too large\n{}", t.reports()));
    let after = clients[0].wait_echo(Duration::from_secs(5)).await;
    total = total
        + after.unwrap_or_else(|e| panic!("the flow stopped after the large datagram: {e:#}"));

    // The counts at rest: everything sent has been delivered or dropped by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = Accounting::read(
        &t.forward_agent.state_dir,
        &t.expose_agent.state_dir,
        t.name(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports()));
    let svc = t.service();
    let losses = counts
        .follow(total.sent, svc.received(), svc.echoed(), total.received)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports()));
    println!(
        "{} of {} datagrams did not come back: {losses:?}",
        total.lost(),
        total.sent
    );
    assert!(
        losses.contains(&("forwarder dropped (too large)", 1)),
        "the 1,500-byte datagram is not the one too large: {losses:?}\n{counts:#?}"
    );
    assert_eq!(
        (counts.forwarder.open, counts.forwarder.total),
        (3, 3),
        "{counts:#?}"
    );
    assert_eq!(
        (counts.exposer.open, counts.exposer.total),
        (3, 3),
        "{counts:#?}"
    );
    t.assert_healthy("after the UDP rounds");
}

/// A real DNS server behind `expose --udp`: dnsmasq on 127.0.0.1 answers `dig` through
/// `forward --udp`, with its answer for the name it holds and NXDOMAIN for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_answers_dig_through_a_udp_forward() {
    if !installed("dnsmasq", "--version") || !installed("dig", "-v") {
        skip_or_fail("dnsmasq and dig are not installed (Debian: dnsmasq-base, bind9-dnsutils)");
        return;
    }
    let lab = Lab::new("udp-dns");
    let dns_port = free_port();
    let mut dnsmasq = Command::new("dnsmasq");
    dnsmasq.args([
        "--keep-in-foreground",
        "--log-facility=-",
        "--log-queries",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--pid-file=",
        "--address=/printer.p2ptun.test/203.0.113.7",
        "--address=/p2ptun.test/",
        &format!("--port={dns_port}"),
    ]);
    if is_root() {
        // Its default user (`dnsmasq`) comes with Debian's full package, not dnsmasq-base.
        dnsmasq.args(["--user=nobody", "--group=nogroup"]);
    }
    let dns = Proc::spawn("dnsmasq", dnsmasq, &lab.logs());
    let t = Kit::new(&lab, "dns")
        .udp()
        .start(vec![format!("127.0.0.1:{dns_port}")])
        .await;
    let dig = |name: &'static str| {
        let mut cmd = Command::new("dig");
        cmd.args([
            "@127.0.0.1",
            "-p",
            &t.port().to_string(),
            "+tries=1",
            "+time=5",
            name,
            "A",
        ]);
        cmd
    };
    // The first query opens the flow (and the peer connection); dig waits 5 s for it.
    let mut answer = None;
    let deadline = Instant::now() + TUNNEL_READY;
    while answer.is_none() && Instant::now() < deadline {
        let out = run_command(
            "dig",
            dig("printer.p2ptun.test"),
            None,
            Duration::from_secs(10),
            &lab.logs(),
        )
        .await;
        if out.code() == 0 && out.stdout.contains("status: NOERROR") {
            answer = Some(out.stdout);
        }
    }
    let answer = answer.unwrap_or_else(|| {
        panic!(
            "no answer to dig through the tunnel\n{}\n{}",
            dns.report(),
            t.reports()
        )
    });
    assert!(
        answer.contains("printer.p2ptun.test.\t0\tIN\tA\t203.0.113.7")
            || answer
                .lines()
                .any(|l| l.starts_with("printer.p2ptun.test.") && l.ends_with("203.0.113.7")),
        "dig's answer lacks the A record:\n{answer}"
    );
    let other = run_command(
        "dig",
        dig("scanner.p2ptun.test"),
        None,
        Duration::from_secs(10),
        &lab.logs(),
    )
    .await;
    assert!(
        other.stdout.contains("status: NXDOMAIN"),
        "dig of a name dnsmasq does not hold:\n{}",
        other.describe()
    );
    dns.assert_running("after the queries");
    assert!(
        dns.log()
            .contains("query[A] printer.p2ptun.test from 127.0.0.1"),
        "dnsmasq did not log the query\n{}",
        dns.report()
    );
    t.assert_healthy("after dig");
}

/// A UDP service's flows as `up` files set them: the forward allows two flows (a third
/// client's datagrams are dropped, counted and logged), the exposer ends flows idle for 2 s
/// (and the forwarder's end with them, which frees room for the third client), and a TCP
/// forward of the UDP name, and a UDP forward of a TCP name, are refused with a message
/// naming the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_end_when_idle_and_are_capped() {
    let lab = Lab::new("udp-flows");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let here = Place::here();
    let echo = UdpEcho::start(&here);
    let web = Service::start().await;
    let (udp_port, tcp_port, web_port) = (free_port(), free_port(), free_port());
    let exposer = lab.agent("exposer", &relay).up(
        &[
            UpExpose {
                name: "echo".into(),
                local: echo.target(),
                udp: true,
                extra: "idle_timeout_secs = 2\n".into(),
                ..UpExpose::default()
            },
            UpExpose {
                name: "web".into(),
                local: web.target(),
                ..UpExpose::default()
            },
        ],
        &[],
    );
    let forward_agent = lab.agent("forwarder", &relay);
    let forwarder = forward_agent.up(
        &[],
        &[
            UpForward {
                name: "echo".into(),
                local: format!("127.0.0.1:{udp_port}"),
                udp: true,
                extra: "max_flows = 2\n".into(),
            },
            UpForward {
                name: "echo".into(),
                local: format!("127.0.0.1:{tcp_port}"),
                ..UpForward::default()
            },
            UpForward {
                name: "web".into(),
                local: format!("127.0.0.1:{web_port}"),
                udp: true,
                ..UpForward::default()
            },
        ],
    );
    let procs = [relay.proc(), &exposer, &forwarder];
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            UdpClient::open(&here, udp_port)
                .await
                .expect("a UDP client"),
        );
    }
    for c in &clients[..2] {
        c.wait_echo(TUNNEL_READY)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", reports(&procs)));
    }

    // A third client while two flows are open: nothing comes back.
    for _ in 0..3 {
        clients[2].send(b"let me in").await.expect("send");
    }
    assert_eq!(clients[2].recv(Duration::from_millis(500)).await, None);
    forwarder
        .wait_log_any(
            &["dropping datagrams of a new UDP client"],
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("no log line for the flow cap\n{}", reports(&procs)));
    let counts = common::udp::flow_counts(&forward_agent.state_dir, "forward", "echo")
        .await
        .expect("the forwarder's UDP counts");
    assert_eq!((counts.open, counts.dropped_in), (2, 3), "{counts:?}");
    let status = forward_agent.run(&["status"]).await;
    let line = status
        .stdout
        .lines()
        .find(|l| l.contains("service echo") && l.contains("udp flows open"))
        .unwrap_or_else(|| {
            panic!(
                "`p2ptun status` shows no UDP service\n{}",
                status.describe()
            )
        });
    assert!(line.contains("udp flows open     2"), "{line}");
    assert!(
        status.stdout.contains("dropped in 0 too large, 3 other"),
        "{}",
        status.stdout
    );
    println!("{}", status.stdout);

    // Quiet for the exposer's idle timeout: both sides end the flows.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut open = (u64::MAX, u64::MAX);
    while open != (0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let count = |dir, role| async move {
            common::udp::flow_counts(dir, role, "echo")
                .await
                .map_or(u64::MAX, |c| c.open)
        };
        open = (
            count(&forward_agent.state_dir, "forward").await,
            count(&lab.state_dir("exposer"), "expose").await,
        );
    }
    assert_eq!(
        open,
        (0, 0),
        "flows still open (forwarder, exposer) 10 s after the last datagram\n{}",
        reports(&procs)
    );
    // Room again: the third client gets a flow.
    clients[2]
        .wait_echo(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the third client after the idle flows ended: {e:#}"));

    // A TCP forward of the UDP name.
    let closed = expect_closed(tcp_port, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", reports(&procs)));
    println!("the TCP connection to the UDP name: {closed:?}");
    forwarder
        .wait_log_any(
            &["serves this name over the other protocol"],
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("no message about the protocol\n{}", reports(&procs)));
    // A UDP forward of the TCP name: refused, said once, and the client's next datagrams
    // are dropped for a moment rather than each trying again.
    let stray = UdpClient::open(&here, web_port)
        .await
        .expect("a UDP client");
    for _ in 0..5 {
        stray.send(b"GET / HTTP/1.0").await.expect("send");
    }
    assert_eq!(stray.recv(Duration::from_millis(500)).await, None);
    let refused = forwarder
        .wait_log_any(
            &["UDP flow not opened: the exposer refused: the exposer serves this name over the other protocol"],
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("no message about the UDP forward of a TCP name\n{}", reports(&procs)));
    println!("{refused}");
    assert_eq!(
        forwarder.lines_with(&["UDP flow not opened"]).len(),
        1,
        "one attempt for the five datagrams\n{}",
        reports(&procs)
    );
    for p in procs {
        p.assert_running("after the flow tests");
        p.assert_no_panic();
    }
}
