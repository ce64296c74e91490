//! Bad input of every kind gets a clear error and disturbs nothing else: wrong tokens, taken
//! names, unknown names, a changed pinned key, an `--allow` that excludes the forwarder,
//! garbage datagrams and malformed control messages at S, bad config files and bad flags, a
//! release by a key that does not hold the name.
//!
//! Run: `cargo test --release --test bad_input`.

use p2ptun_testkit as common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use p2ptun::proto::{
    read_frame, write_frame, ClientMsg, ServerMsg, ALPN_CONTROL, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;

/// How long a refused agent may take to give up.
const GIVE_UP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_prints_one_stable_fingerprint() {
    let lab = Lab::new("id");
    // `id` needs no S.
    let relay_less = lab.agent_at("agent", "127.0.0.1:9");
    let a = relay_less.id().await;
    let b = relay_less.id().await;
    assert_eq!(a, b, "the identity must survive a restart");
    let other = relay_less.clone().renamed(&lab, "other").id().await;
    assert_ne!(a, other, "two state dirs must have two identities");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused_and_the_right_one_works() {
    let lab = Lab::new("token");
    let relay = lab
        .relay(
            "relay",
            RelayOpts {
                tokens: vec!["right-token".into()],
                ..Default::default()
            },
        )
        .await;
    let service = Service::start().await;

    for (label, token) in [("wrong", Some("wrong-token")), ("missing", None)] {
        let agent = lab.agent(label, &relay).with_token(token);
        let p = agent.expose(&service.target(), "home", &[]);
        let st = p
            .wait_exit(GIVE_UP)
            .await
            .unwrap_or_else(|| panic!("an agent with a {label} token should exit\n{}", p.brief()));
        assert!(!st.success(), "{label} token: exit status {st}");
        let log = p.log();
        assert!(
            p.problems()
                .iter()
                .any(|l| l.to_lowercase().contains("token")),
            "{label} token: stderr should say the token is the problem\n{}",
            p.brief()
        );
        assert!(!log.contains("panicked"), "{}", p.brief());
        assert!(
            !log.contains("wrong-token") || label != "wrong",
            "the token itself should not be printed\n{}",
            p.brief()
        );
    }

    // A forwarder with a wrong token is refused too (at start, or at the latest when a
    // connection makes it talk to S).
    let bad_port = free_port();
    let bad_fwd = lab
        .agent("wrong-forwarder", &relay)
        .with_token(Some("nope"))
        .forward("home", bad_port);
    if bad_fwd.wait_exit(Duration::from_secs(3)).await.is_none() {
        let _ = expect_closed(bad_port, Duration::from_secs(5)).await;
    }
    let st = bad_fwd.wait_exit(GIVE_UP).await;
    assert!(
        matches!(st, Some(st) if !st.success()),
        "a forwarder with a wrong token should exit non-zero\n{}",
        bad_fwd.brief()
    );

    // The right token, once by flag and once by P2PTUN_TOKEN, works; S is undisturbed.
    let exposer = lab
        .agent("exposer", &relay)
        .expose(&service.target(), "home", &[]);
    let fwd_agent = lab.agent("forwarder", &relay).with_token(None);
    let port = free_port();
    let mut cmd = fwd_agent.command(&["forward", "home", &port.to_string()]);
    cmd.env("P2PTUN_TOKEN", "right-token");
    let forwarder = Proc::spawn("forwarder", cmd, &lab.logs());
    wait_tunnel(port, &[relay.proc(), &exposer, &forwarder], TUNNEL_READY).await;
    relay.proc().assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_held_by_another_key_is_refused() {
    let lab = Lab::new("name-taken");
    let pair = Kit::new(&lab, "home").ready(Ready::Echo).serve().await;
    let other = Service::start().await;
    let thief = lab
        .agent("thief", pair.relay())
        .expose(&other.target(), "home", &[]);
    let st = thief.wait_exit(GIVE_UP).await.unwrap_or_else(|| {
        panic!(
            "the second exposer of 'home' should exit\n{}",
            thief.brief()
        )
    });
    assert!(!st.success(), "exit status {st}");
    let said = thief.problems().join("\n").to_lowercase();
    assert!(
        said.contains("home")
            && ["taken", "already", "held", "belongs", "another"]
                .iter()
                .any(|w| said.contains(w)),
        "stderr should say that 'home' is taken\n{}",
        thief.brief()
    );
    // The owner's tunnel is undisturbed and still reaches the owner's service.
    transfer_via(pair.port(), Mode::Duplex, (1, 1 << 20), (2, 1 << 20))
        .await
        .expect("the owner's tunnel after the refused claim");
    assert_eq!(other.accepted(), 0, "the thief's service was reached");
    pair.assert_healthy("after a refused claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_releases_a_name_and_then_another_key_exposes_it() {
    let lab = Lab::new("release");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let (first, second) = (Service::start().await, Service::start().await);
    let a = lab.agent("a", &relay);
    let b = lab.agent("b", &relay);

    let exposer = a.expose(&first.target(), "home", &[]);
    exposer
        .wait_log_any(&["registered with S exposing home"], TUNNEL_READY)
        .await
        .unwrap_or_else(|| panic!("A should register 'home'\n{}", exposer.brief()));
    // While A exposes it, even A may not release it.
    a.run(&["release", "home"])
        .await
        .assert_clean_failure(&["home", "exposed right now", "stop"]);
    exposer.interrupt();
    assert!(
        exposer.wait_exit(GIVE_UP).await.is_some(),
        "{}",
        exposer.brief()
    );
    relay
        .proc()
        .wait_log_any(&["agent went offline"], GIVE_UP)
        .await
        .unwrap_or_else(|| panic!("S should see A leave\n{}", relay.proc().brief()));

    // B has a key of its own (without one, `release` says the state dir holds no names).
    b.id().await;
    b.run(&["release", "home"]).await.assert_clean_failure(&[
        "home",
        "another identity",
        "only the key that claimed it",
    ]);
    let released = a.run(&["release", "home"]).await;
    assert_eq!(released.code(), 0, "{}", released.describe());
    assert!(
        released.stdout.contains("released 'home'"),
        "{}",
        released.describe()
    );
    a.run(&["release", "home"])
        .await
        .assert_clean_failure(&["nobody holds the name 'home'"]);

    let exposer_b = b.expose(&second.target(), "home", &[]);
    let port = free_port();
    let forwarder = lab.agent("c", &relay).forward("home", port);
    wait_tunnel(port, &[relay.proc(), &exposer_b, &forwarder], TUNNEL_READY).await;
    assert!(
        second.accepted() > 0,
        "the forward should reach B's service"
    );
    assert_eq!(
        first.accepted(),
        0,
        "A's service was reached after A released 'home'"
    );
    relay.proc().assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_closes_the_connection_and_the_forward_keeps_running() {
    let lab = Lab::new("unknown-name");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let fwd_agent = lab.agent("forwarder", &relay);
    let port = free_port();
    // (With the global flags after the command, as the CLI allows.)
    let forwarder = fwd_agent.spawn_flags_after(&["forward", "nosuch", &port.to_string()]);
    let how = expect_closed(port, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connection to an unknown name: {e:#}\n{}",
                forwarder.brief()
            )
        });
    println!("closed: {how:?}");
    assert!(
        forwarder
            .wait_problem(&["nosuch"], Duration::from_secs(10))
            .await
            .is_some(),
        "the forward's log should name the unknown name\n{}",
        forwarder.brief()
    );
    forwarder.assert_running("a per-connection error must not end the forward");

    // Once someone exposes the name, the same forward works.
    let service = Service::start().await;
    let exposer = lab
        .agent("exposer", &relay)
        .expose(&service.target(), "nosuch", &[]);
    wait_tunnel(port, &[relay.proc(), &exposer, &forwarder], TUNNEL_READY).await;
    forwarder.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pinned_key_is_refused() {
    let lab = Lab::new("changed-pin");
    let pair = Kit::new(&lab, "home").ready(Ready::Echo).serve().await;
    let exposer_fp = pair.expose_agent.id().await;

    // The forwarder pinned the exposer's key in its known_peers.
    pair.forwarder.proc().kill();
    let known = find_file(&pair.forward_agent.state_dir, "known_peers").unwrap_or_else(|| {
        panic!(
            "no known_peers file in the forwarder's state dir {} after a connection",
            pair.forward_agent.state_dir.display()
        )
    });
    let text = std::fs::read_to_string(&known).expect("read known_peers");
    assert!(
        text.contains(&exposer_fp),
        "{} should pin the exposer's key {exposer_fp}:\n{text}",
        known.display()
    );
    // Pretend the pin was made for another key (as if S now vouched for a different one).
    let other_fp = p2ptun::tunnel::Identity::ephemeral()
        .expect("an ephemeral identity")
        .fingerprint()
        .to_string();
    std::fs::write(&known, text.replace(&exposer_fp, &other_fp)).expect("write known_peers");

    let port = free_port();
    let reached_before = pair.service().accepted();
    let forwarder = pair.forward_agent.forward("home", port);
    let how = expect_closed(port, Duration::from_secs(20)).await;
    // Either the forward exits (a fatal error) or it refuses the connection; both must say
    // known_peers is where the old key is pinned.
    assert!(
        forwarder
            .wait_problem(&["known_peers"], Duration::from_secs(20))
            .await
            .is_some(),
        "refusing a changed key should point at known_peers ({how:?})\n{}",
        forwarder.brief()
    );
    if let Some(st) = forwarder.exit_status() {
        assert!(!st.success(), "exit status {st}");
    } else {
        how.expect("a connection to a changed key must be closed");
    }
    assert_eq!(
        pair.service().accepted(),
        reached_before,
        "the service was reached through a changed key"
    );
    forwarder.assert_no_panic();

    // Another forwarder, with no pin, still reaches the exposer.
    let fresh = pair.forward_agent.clone().renamed(&lab, "fresh");
    let port2 = free_port();
    let fwd2 = fresh.forward("home", port2);
    wait_tunnel(
        port2,
        &[pair.relay().proc(), pair.exposer.proc(), &fwd2],
        TUNNEL_READY,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lets_in_only_the_listed_keys() {
    let lab = Lab::new("allow");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let service = Service::start().await;
    let friend = lab.agent("friend", &relay);
    let stranger = lab.agent("stranger", &relay);
    let friend_fp = friend.id().await;
    let exposer = lab
        .agent("exposer", &relay)
        .expose(&service.target(), "home", &[&friend_fp]);

    let sport = free_port();
    let sfwd = stranger.forward("home", sport);
    // The stranger's connections are closed (retry while the exposer registers).
    let mut last = None;
    for _ in 0..20 {
        last = Some(expect_closed(sport, Duration::from_secs(10)).await);
        if sfwd
            .wait_problem(&["allow"], Duration::from_millis(500))
            .await
            .is_some()
        {
            break;
        }
    }
    assert!(
        matches!(last, Some(Ok(_))),
        "a stranger's connection must be closed: {last:?}\n{}",
        reports(&[relay.proc(), &exposer, &sfwd])
    );
    assert!(
        sfwd.problems()
            .iter()
            .any(|l| l.to_lowercase().contains("allow")),
        "the stranger's forward should say it is not allowed\n{}",
        reports(&[&exposer, &sfwd])
    );
    sfwd.assert_running("being refused by --allow is a per-connection error");
    assert_eq!(service.accepted(), 0, "a stranger reached the service");

    let fport = free_port();
    let ffwd = friend.forward("home", fport);
    wait_tunnel(fport, &[relay.proc(), &exposer, &ffwd], TUNNEL_READY).await;
    for p in [relay.proc(), &exposer, &sfwd, &ffwd] {
        p.assert_no_panic();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_the_relay_does_not_disturb_a_transfer() {
    let lab = Lab::new("garbage");
    let pair = Kit::new(&lab, "home").ready(Ready::Echo).serve().await;
    let targets = [pair.relay().addr(), pair.relay().alt_addr()];

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let blaster = tokio::spawn(blast_udp(targets, stop.clone(), sent.clone()));
    let tcp_junk = tokio::spawn(tcp_junk(pair.relay().port(), stop.clone()));

    let len = 64u64 << 20;
    let transfer = tokio::spawn(transfer_via(
        pair.port(),
        Mode::Duplex,
        (0xBAD, len),
        (0xF00D, len),
    ));

    // Malformed control messages while the transfer runs.
    let outcomes = within(
        "the malformed control messages",
        Duration::from_secs(120),
        malformed_control(pair.relay().addr()),
    )
    .await;
    for (case, outcome) in &outcomes {
        println!("control message '{case}': {outcome}");
    }

    let t = within(
        "the transfer under garbage",
        Duration::from_secs(300),
        transfer,
    )
    .await
    .expect("transfer task")
    .unwrap_or_else(|e| panic!("transfer under garbage: {e:#}\n{}", pair.reports()));
    stop.store(true, Ordering::SeqCst);
    blaster.await.expect("blaster");
    tcp_junk.await.expect("tcp junk");
    println!(
        "64 MiB each way in {:.2} s while {} junk datagrams hit S",
        t.elapsed.as_secs_f64(),
        sent.load(Ordering::Relaxed)
    );
    pair.assert_healthy("after the garbage");

    // S still introduces new agents.
    let port = free_port();
    let fwd2 = pair
        .forward_agent
        .clone()
        .renamed(&lab, "late")
        .forward("home", port);
    wait_tunnel(
        port,
        &[pair.relay().proc(), pair.exposer.proc(), &fwd2],
        TUNNEL_READY,
    )
    .await;
    pair.relay().proc().assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_files_are_clear_errors() {
    let lab = Lab::new("bad-config");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let agent = lab.agent("agent", &relay);
    let base = agent.up_config(&[], &[]);
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown-key",
            format!("{base}bogus_option = 1\n[[forward]]\nname = \"a\"\nlocal = \"0\"\n"),
            &["bogus_option"],
        ),
        (
            "unknown-key-in-table",
            format!("{base}[[expose]]\nname = \"a\"\nlocal = \"22\"\nlcoal = \"23\"\n"),
            &["lcoal"],
        ),
        (
            "bad-address",
            format!("{base}[[expose]]\nname = \"a\"\nlocal = \"127.0.0.1:notaport\"\n"),
            &["notaport"],
        ),
        (
            "bad-bind",
            format!("{base}[[forward]]\nname = \"a\"\nlocal = \"99999\"\n"),
            &["99999"],
        ),
        (
            "missing-name",
            format!("{base}[[expose]]\nlocal = \"22\"\n"),
            &["name"],
        ),
        (
            "bad-name",
            format!("{base}[[expose]]\nname = \"Bad Name\"\nlocal = \"22\"\n"),
            &["Bad Name"],
        ),
        (
            "bad-allow",
            format!(
                "{base}[[expose]]\nname = \"a\"\nlocal = \"22\"\nallow = [\"notafingerprint\"]\n"
            ),
            &["SHA256"],
        ),
        ("not-toml", "server = \n[[[".to_string(), &["line"]),
    ];
    for (label, text, needles) in cases {
        let file = lab.write(&format!("{label}.toml"), text);
        let out = run_p2ptun(&lab, &["up", "-c", file.to_str().expect("utf-8 path")]).await;
        println!("{label}: {}", out.stderr.trim());
        out.assert_clean_failure(needles);
    }
    let missing = lab.path().join("no-such-file.toml");
    let out = run_p2ptun(&lab, &["up", "-c", missing.to_str().expect("utf-8 path")]).await;
    out.assert_clean_failure(&["no-such-file.toml"]);
    relay.proc().assert_running("after bad config files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_command_line_values_are_clear_errors() {
    let lab = Lab::new("bad-cli");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let agent = lab.agent("agent", &relay);
    let cases: &[(&[&str], &[&str])] = &[
        (&["forward", "home", "99999"], &["99999"]),
        (&["forward", "home", "localhost:2222"], &["localhost:2222"]),
        (&["expose", "abc", "--name", "x"], &["abc"]),
        (&["expose", "8080", "--name", "Bad Name"], &["Bad Name"]),
        (&["forward", "Bad_Name", "2222"], &["Bad_Name"]),
        (
            &[
                "expose",
                "8080",
                "--name",
                "x",
                "--allow",
                "notafingerprint",
            ],
            &["notafingerprint"],
        ),
        (&["expose", "8080"], &["--name"]),
        (&["frobnicate"], &["frobnicate"]),
    ];
    for (args, needles) in cases {
        let out = agent.run(args).await;
        println!("{args:?}: {}", out.stderr.lines().next().unwrap_or(""));
        out.assert_clean_failure(needles);
    }
    // Bad global flags, before or after the command.
    let state = lab.state_dir("x");
    let state = state.to_str().expect("utf-8 path");
    for (args, needle) in [
        (
            vec![
                "--server",
                "nohost",
                "--state-dir",
                state,
                "forward",
                "a",
                "0",
            ],
            "nohost",
        ),
        (
            vec![
                "forward",
                "a",
                "0",
                "--state-dir",
                state,
                "--server-fingerprint",
                "SHA256:x",
            ],
            "SHA256:x",
        ),
    ] {
        let out = run_p2ptun(&lab, &args).await;
        out.assert_clean_failure(&[needle]);
    }
    relay.proc().assert_running("after bad flags");
}

/// Sends junk datagrams of many kinds to `targets` until `stop` (at most 5 minutes).
async fn blast_udp(targets: [SocketAddr; 2], stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let sock = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the blaster");
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut i: u64 = 0;
    while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
        // About 2000 datagrams a second: a nuisance, not a flood that starves the transfer.
        for _ in 0..4 {
            let packet = junk_datagram(i);
            let _ = sock.send_to(&packet, targets[(i % 2) as usize]).await;
            i += 1;
        }
        sent.store(i, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

fn stun_header(kind: u16, len: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&kind.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    p.extend_from_slice(&random_bytes(12));
    p
}

/// Junk datagram number `i`, cycling through the kinds.
fn junk_datagram(i: u64) -> Vec<u8> {
    match i % 10 {
        // Random bytes of random length.
        0 | 1 => random_bytes(1 + rand::random::<usize>() % 1500),
        // Empty.
        2 => Vec::new(),
        // Huge (the largest UDP payload over IPv4), now and then.
        3 if i % 100 == 3 => random_bytes(65_507),
        3 => random_bytes(1),
        // STUN header that announces more than follows.
        4 => {
            let mut p = stun_header(0x0001, 200);
            p.extend_from_slice(&random_bytes(8));
            p
        }
        // STUN cut inside the header.
        5 => stun_header(0x0001, 0)[..10].to_vec(),
        // STUN Binding request with garbage attributes (a length that fits).
        6 => {
            let attrs = random_bytes(64);
            let mut p = stun_header(0x0001, attrs.len() as u16);
            p.extend_from_slice(&attrs);
            p
        }
        // An unsolicited STUN Binding success response.
        7 => {
            let mut p = stun_header(0x0101, 12);
            p.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0x12, 0x34]);
            p.extend_from_slice(&random_bytes(4));
            p
        }
        // A QUIC long-header packet (Initial of version 1, or an unknown version) of junk.
        8 => {
            let mut p = vec![0xC3];
            let version: u32 = if i % 20 == 8 { 0x1A2A_3A4A } else { 1 };
            p.extend_from_slice(&version.to_be_bytes());
            p.push(8);
            p.extend_from_slice(&random_bytes(8));
            p.push(8);
            p.extend_from_slice(&random_bytes(8));
            let rest = 1200 - p.len();
            p.extend_from_slice(&random_bytes(rest));
            p
        }
        // A QUIC short-header packet for no connection.
        _ => {
            let mut p = vec![0x40 | (rand::random::<u8>() & 0x3F)];
            p.extend_from_slice(&random_bytes(60 + rand::random::<usize>() % 1200));
            p
        }
    }
}

/// Opens TCP connections to S's port (its TLS listener, if it has one) and sends junk.
async fn tcp_junk(port: u16, stop: Arc<AtomicBool>) {
    for i in 0..50u32 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
        )
        .await
        {
            let junk = if i % 2 == 0 {
                random_bytes(64 * 1024)
            } else {
                // A TLS record header announcing a huge handshake message.
                let mut p = vec![0x16, 0x03, 0x01, 0xFF, 0xFF, 0x01, 0xFF, 0xFF, 0xFF];
                p.extend_from_slice(&random_bytes(100));
                p
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&junk)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a control connection to S as a fresh identity.
async fn control_connection(s: SocketAddr) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let id = p2ptun::tunnel::Identity::ephemeral()?;
    let config = p2ptun::tunnel::tls::client_config(&id, ALPN_CONTROL)?;
    let mut ep = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into())?;
    ep.set_default_client_config(config);
    let conn = tokio::time::timeout(Duration::from_secs(10), ep.connect(s, "p2ptun")?)
        .await
        .map_err(|_| anyhow::anyhow!("no QUIC handshake with S within 10 s"))??;
    Ok((ep, conn))
}

fn frame_bytes(msg: &ClientMsg) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("serialise");
    let mut p = (body.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut p = (body.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

/// Sends each malformed first message on a fresh control connection and checks that S
/// answers with an error or closes the stream or connection, promptly, and never accepts it.
async fn malformed_control(s: SocketAddr) -> Vec<(&'static str, String)> {
    let mut too_long = (1_000_000u32).to_be_bytes().to_vec();
    too_long.extend_from_slice(b"{\"type\":");
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(b"{\"type\":\"reg");
    let cases: Vec<(&'static str, Vec<u8>, bool)> = vec![
        ("length over 64 KiB", too_long, false),
        ("invalid JSON", raw_frame(b"{\"type\":\"register\","), false),
        (
            "unknown message type",
            raw_frame(b"{\"type\":\"launch\"}"),
            false,
        ),
        ("binary junk", raw_frame(&random_bytes(300)), false),
        ("truncated frame then FIN", truncated, true),
        (
            "connect before register",
            frame_bytes(&ClientMsg::Connect {
                name: "home".into(),
                candidates: vec![],
                nat: Default::default(),
            }),
            false,
        ),
        (
            "register with another version",
            frame_bytes(&ClientMsg::Register {
                version: PROTOCOL_VERSION + 1000,
                token: None,
                names: vec![],
                candidates: vec![],
                nat: Default::default(),
            }),
            false,
        ),
        (
            "register an invalid name",
            frame_bytes(&ClientMsg::Register {
                version: PROTOCOL_VERSION,
                token: None,
                names: vec!["Bad Name".into()],
                candidates: vec![],
                nat: Default::default(),
            }),
            false,
        ),
        (
            "register a taken name",
            frame_bytes(&ClientMsg::Register {
                version: PROTOCOL_VERSION,
                token: None,
                names: vec!["home".into()],
                candidates: vec![],
                nat: Default::default(),
            }),
            false,
        ),
    ];
    let mut outcomes = Vec::new();
    for (case, bytes, finish) in cases {
        let outcome = one_malformed(s, &bytes, finish)
            .await
            .unwrap_or_else(|e| panic!("malformed control message '{case}': {e:#}"));
        outcomes.push((case, outcome));
    }
    // After all that, a well-formed registration from a fresh key still works.
    let (ep, conn) = control_connection(s).await.expect("connect to S");
    let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
    write_frame(
        &mut send,
        &ClientMsg::Register {
            version: PROTOCOL_VERSION,
            token: None,
            names: vec![],
            candidates: vec![],
            nat: Default::default(),
        },
    )
    .await
    .expect("send Register");
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<ServerMsg, _>(&mut recv),
    )
    .await
    .expect("S answers a Register within 10 s");
    assert!(
        matches!(reply, Ok(Some(ServerMsg::Registered { .. }))),
        "a well-formed Register after the junk: {reply:?}"
    );
    conn.close(0u32.into(), b"bye");
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    outcomes
}

async fn one_malformed(s: SocketAddr, bytes: &[u8], finish: bool) -> anyhow::Result<String> {
    let (ep, conn) = control_connection(s).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    // S may reset the stream or close the connection before we are done writing.
    let wrote = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<ServerMsg, _>(&mut recv),
    )
    .await;
    let outcome = match read {
        Err(_) => anyhow::bail!("S neither answered nor closed within 10 s (write: {wrote:?})"),
        Ok(Ok(Some(ServerMsg::Error(e)))) => format!("error {:?}: {}", e.code, e.message),
        Ok(Ok(Some(other))) => anyhow::bail!("S accepted it and answered {other:?}"),
        Ok(Ok(None)) => "stream finished".to_owned(),
        Ok(Err(e)) => format!("closed: {e}"),
    };
    conn.close(0u32.into(), b"bye");
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    Ok(outcome)
}

/// The first file under `dir` whose name starts with `prefix`.
fn find_file(dir: &std::path::Path, prefix: &str) -> Option<std::path::PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if entry.file_name().to_string_lossy().starts_with(prefix) {
                return Some(p);
            }
        }
    }
    None
}

/// `p2ptun ping` where no agent runs with the state directory starts one of its own for the
/// pings, and every ping comes back; a name nobody exposes is a clear error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_with_an_agent_of_its_own_and_to_a_name_nobody_exposes() {
    let lab = Lab::new("ping");
    let pair = Kit::new(&lab, "home").serve().await;
    let pinger = pair.forward_agent.clone().renamed(&lab, "pinger");

    let out = pinger.run(&["ping", "home", "-c", "3", "-i", "0.2"]).await;
    let context = format!("{}\n{}\n{}", out.cmdline, out.stdout, out.stderr);
    assert_eq!(out.code(), 0, "{context}");
    let pongs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("pong "))
        .collect();
    assert_eq!(pongs.len(), 3, "{context}");
    assert!(
        pongs.iter().all(|l| l.contains("from home (SHA256:")),
        "each pong names the exposer: {context}"
    );
    assert!(
        out.stdout.contains("--- home: 3 sent, 3 answered"),
        "{context}"
    );

    let out = pinger.run(&["ping", "nobody", "-c", "1"]).await;
    let context = format!("{}\n{}\n{}", out.cmdline, out.stdout, out.stderr);
    assert_ne!(out.code(), 0, "{context}");
    assert!(
        out.stderr.contains("'nobody' is not registered on S"),
        "the error says nobody exposes the name: {context}"
    );
    assert!(!out.stderr.contains("panicked"), "{context}");
}
