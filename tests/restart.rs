//! S crashes and comes back: the agents re-register by themselves, and a connection that was
//! already open between them never notices, since its bytes do not pass through S.
//!
//! Run: `cargo test --release --test restart`.

use p2ptun_testkit as common;

use std::time::{Duration, Instant};

use common::*;

/// How long after S is back a new forwarder may take to reach the exposer. An agent whose
/// control connection to the dead S is still open learns of the crash by QUIC's idle timeout
/// (20 s) at worst, then re-registers with a backoff of a few seconds.
const REREGISTER: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_survive_a_relay_restart() {
    let lab = Lab::new("relay-restart");
    let mut pair = Kit::new(&lab, "home").ready(Ready::Echo).serve().await;

    // The agents may start on the relay path and move to a direct one moments later; the
    // point here is a direct connection, so wait for the forwarder to report one.
    assert!(
        pair.forwarder
            .proc()
            .wait_log_any(&["direct"], Duration::from_secs(15))
            .await
            .is_some(),
        "the forwarder never logged a direct path (a line with \"direct\")\n{}",
        pair.forwarder.proc().brief()
    );

    // A connection opened before the crash, pinged every 100 ms in the background.
    let mut conn = EchoConn::open(pair.port())
        .await
        .expect("open the long connection");
    conn.ping(512, Duration::from_secs(10))
        .await
        .expect("first ping");
    let pinger = Pinger::start(conn, 512, Duration::from_millis(100));

    // Crash S; the open connection goes on.
    pair.relay_mut().kill();
    let before = pinger.rounds();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = pinger.rounds();
    assert!(
        pinger.is_alive(),
        "the open connection failed while S was down"
    );
    assert!(
        during >= before + 5,
        "the open connection stalled while S was down ({before} -> {during} round trips)"
    );
    assert_all_running(
        &[pair.exposer.proc(), pair.forwarder.proc()],
        "S was down (agents must wait for it, not exit)",
    );

    // S comes back on the same port with the same state (so `home` still belongs to the
    // exposer's key).
    pair.relay_mut().restart().await;
    let restarted = Instant::now();

    // A new forwarder, which has never met the exposer, reaches it through the new S: the
    // exposer has re-registered.
    let agent2 = pair.forward_agent.clone().renamed(&lab, "forwarder2");
    let port2 = free_port();
    let forwarder2 = agent2.forward("home", port2);
    wait_tunnel(
        port2,
        &[
            pair.relay().proc(),
            pair.exposer.proc(),
            pair.forwarder.proc(),
            &forwarder2,
        ],
        REREGISTER,
    )
    .await;
    println!(
        "a new forwarder reached the exposer {:.1} s after S restarted",
        restarted.elapsed().as_secs_f64()
    );
    // The old forwarder takes new connections too.
    wait_tunnel(
        pair.port(),
        &[
            pair.relay().proc(),
            pair.exposer.proc(),
            pair.forwarder.proc(),
        ],
        REREGISTER,
    )
    .await;
    within(
        "a transfer after the restart",
        Duration::from_secs(60),
        transfer_via(pair.port(), Mode::Duplex, (1, 4 << 20), (2, 4 << 20)),
    )
    .await
    .unwrap_or_else(|e| panic!("transfer after the restart: {e:#}"));

    // The connection from before the crash never broke.
    let conn = pinger.finish().await.unwrap_or_else(|e| {
        panic!(
            "the connection opened before S crashed broke: {e:#}\n{}",
            pair.reports()
        )
    });
    assert!(conn.rounds() > during, "no round trips after the restart");
    conn.close().await.expect("close the long connection");
    pair.assert_healthy("after S restarted");
    forwarder2.assert_no_panic();
}

/// `p2ptun up` takes a changed file without a restart (issue 15): while a connection to
/// service A is kept busy, B is added on both agents (by `p2ptun reload`, and by saving the
/// file), changed to another local service (SIGHUP) and removed; a broken file is refused
/// with its error. A's connection never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_services_while_a_connection_goes_on() {
    let lab = Lab::new("reload");
    let relay = lab.relay("relay", RelayOpts::default()).await;
    let (svc_a, svc_b, svc_b2) = (
        Service::start().await,
        Service::start().await,
        Service::start().await,
    );
    let exposer = lab.agent("exposer", &relay);
    let forwarder = lab.agent("forwarder", &relay);
    let (port_a, port_b) = (free_port(), free_port());
    let exposes = |list: &[(&str, &Service)]| -> Vec<UpExpose> {
        list.iter()
            .map(|(name, svc)| UpExpose {
                name: name.to_string(),
                local: svc.target(),
                ..UpExpose::default()
            })
            .collect()
    };
    let forwards = |list: &[(&str, u16)]| -> Vec<UpForward> {
        list.iter()
            .map(|(name, port)| UpForward {
                name: name.to_string(),
                local: port.to_string(),
                ..UpForward::default()
            })
            .collect()
    };
    let write = |agent: &common::Agent, config: String| {
        std::fs::write(agent.config_path(), config).expect("write the config file")
    };
    let exp = exposer.up(&exposes(&[("svc-a", &svc_a)]), &[]);
    let fwd = forwarder.up(&[], &forwards(&[("svc-a", port_a)]));
    let procs = [relay.proc(), &exp, &fwd];
    wait_tunnel(port_a, &procs, TUNNEL_READY).await;

    // A's connection, busy all along.
    let conn = EchoConn::open(port_a).await.expect("open A's connection");
    let busy = Pinger::start(conn, 4096, Duration::from_millis(50));

    // B added: the exposer by `p2ptun reload`, the forwarder by saving its file.
    write(
        &exposer,
        exposer.up_config(&exposes(&[("svc-a", &svc_a), ("svc-b", &svc_b)]), &[]),
    );
    let out = exposer.run(&["reload"]).await;
    assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("reloaded: "), "{}", out.stdout);
    write(
        &forwarder,
        forwarder.up_config(&[], &forwards(&[("svc-a", port_a), ("svc-b", port_b)])),
    );
    wait_tunnel(port_b, &procs, TUNNEL_READY).await;
    assert!(svc_b.accepted() > 0, "B's connections reach B's service");

    // B changed to another local service, by SIGHUP.
    write(
        &exposer,
        exposer.up_config(&exposes(&[("svc-a", &svc_a), ("svc-b", &svc_b2)]), &[]),
    );
    exp.signal(libc::SIGHUP);
    assert!(
        exp.wait_log_any(&["reloaded (SIGHUP)"], Duration::from_secs(10))
            .await
            .is_some(),
        "the exposer logs the reload on SIGHUP\n{}",
        exp.brief()
    );
    echo_once(port_b, Duration::from_secs(10))
        .await
        .expect("B after the change");
    assert!(
        svc_b2.accepted() > 0,
        "B's new connections reach the new service"
    );

    // B removed on the forwarder: its port closes.
    write(
        &forwarder,
        forwarder.up_config(&[], &forwards(&[("svc-a", port_a)])),
    );
    let out = forwarder.run(&["reload"]).await;
    assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
    within(
        "B's port to close once B is removed",
        Duration::from_secs(10),
        async {
            while connect(port_b).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;

    // A broken file: refused, with its error, and nothing changes.
    write(&exposer, "[[expose]\nname = \"svc-a\"\n".to_owned());
    let out = exposer.run(&["reload"]).await;
    assert_ne!(out.code(), 0, "a broken file is refused\n{}", out.stdout);
    assert!(
        out.stderr.contains("is refused") && out.stderr.contains("TOML"),
        "the refusal says what is wrong: {}",
        out.stderr
    );

    let rounds = busy
        .finish()
        .await
        .unwrap_or_else(|e| panic!("A's connection failed during the reloads: {e:#}"))
        .rounds();
    assert!(rounds > 10, "A's connection carried {rounds} rounds");
    for p in procs {
        p.assert_no_panic();
    }
}

// ---------------------------------------------------------------------------------------------
// A cluster of S on etcd (issue 14)

/// Both S's and `extra`'s log tails.
fn cluster_reports(s1: &Relay, s2: &Relay, extra: &[&Proc]) -> String {
    let mut all: Vec<&Proc> = vec![s1.proc(), s2.proc()];
    all.extend_from_slice(extra);
    reports(&all)
}

/// `field` of an agent's status, once it is registered.
async fn registered_field(agent: &Agent, field: &str) -> Option<String> {
    let st = agent_status(&agent.state_dir).await.ok()?;
    let me = st.into_iter().find(|s| s["registered"] == true)?;
    me[field].as_str().map(str::to_owned)
}

/// The S an agent reports as its home, once it is registered.
async fn home_of(agent: &Agent) -> Option<String> {
    registered_field(agent, "server").await
}

/// The fingerprint an agent reports in its status, once it is registered.
async fn registered_id(agent: &Agent) -> Option<String> {
    registered_field(agent, "id").await
}

/// Waits up to `limit` for the agent to be registered; its fingerprint.
async fn wait_registered(agent: &Agent, proc: &Proc, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && proc.is_running() {
        if let Some(id) = registered_id(agent).await {
            return Some(id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Names in a cluster of two S on a real 3-member etcd: two keys claim one name at once
/// through the two S and exactly one wins, and it stays so after both S restart (the loser
/// is refused again through the other S); one etcd member down changes nothing; a forward
/// of the name through the S its exposer is not on is told where it is; with etcd out of
/// reach a new claim is refused with the reason while registered agents stay, and goes
/// through by itself once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_one_key_across_two_s_on_etcd() {
    if !etcd::EtcdCluster::available() {
        skip_or_fail("etcd is not installed (Debian: etcd-server)");
        return;
    }
    const TAKEN: &str = "held by another identity in this S's cluster";
    let lab = Lab::new("cluster-names");
    let mut etcd = etcd::EtcdCluster::start(&lab, 3)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let opts = RelayOpts {
        extra_args: vec!["--etcd".into(), etcd.urls()],
        ..RelayOpts::default()
    };
    let mut s1 = lab.relay("s1", opts.clone()).await;
    let mut s2 = lab.relay("s2", opts).await;
    let svc = Service::start().await;
    let target = svc.target();

    // One name, two keys, two S, at once.
    let (a, b) = (lab.agent("a", &s1), lab.agent("b", &s2));
    let (pa, pb) = (
        a.expose(&target, "contested", &[]),
        b.expose(&target, "contested", &[]),
    );
    let (ida, idb) = tokio::join!(
        wait_registered(&a, &pa, Duration::from_secs(20)),
        wait_registered(&b, &pb, Duration::from_secs(20))
    );
    // (The loser tried through S2 when it is `b`.)
    let (winner, winner_proc, loser_label, loser_proc, loser_on_s1, winner_id) = match (ida, idb) {
        (Some(id), None) => (&a, &pa, "b", &pb, false, id),
        (None, Some(id)) => (&b, &pb, "a", &pa, true, id),
        other => panic!(
            "exactly one of the two keys must hold the name; registered: {other:?}\n{}",
            cluster_reports(&s1, &s2, &[&pa, &pb])
        ),
    };
    loser_proc
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the refused agent did not exit\n{}", loser_proc.report()));
    assert!(loser_proc.log().contains(TAKEN), "{}", loser_proc.report());
    assert_eq!(
        etcd.get("/p2ptun/v1/names/contested").await.expect("etcd"),
        Some(winner_id.clone())
    );

    // Both S restart: the claim stays, and the loser is refused through the other S too.
    s1.restart().await;
    s2.restart().await;
    wait_registered(winner, winner_proc, REREGISTER)
        .await
        .unwrap_or_else(|| {
            panic!(
                "the owner did not register again\n{}",
                cluster_reports(&s1, &s2, &[winner_proc])
            )
        });
    let other_s = if loser_on_s1 { &s2 } else { &s1 };
    let again = lab.agent(loser_label, other_s);
    let again_proc = again.expose(&target, "contested", &[]);
    again_proc
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("the other key was not refused\n{}", again_proc.report()));
    assert!(again_proc.log().contains(TAKEN), "{}", again_proc.report());

    // A forward through the S the exposer is not registered with: that S names the
    // exposer's home, where the forwarder registers too ("visits") and where the
    // introduction and the punch happen.
    let home = home_of(winner)
        .await
        .expect("the owner's status names its home");
    let on_s1 = home == s1.server();
    let fwd = lab.agent("f", if on_s1 { &s2 } else { &s1 });
    let fwd_port = free_port();
    let fwd_proc = fwd.forward("contested", fwd_port);
    let all = |s1: &Relay, s2: &Relay| cluster_reports(s1, s2, &[winner_proc, &fwd_proc]);
    wait_tunnel(
        fwd_port,
        &[s1.proc(), s2.proc(), winner_proc, &fwd_proc],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        fwd_proc.log().contains("visiting S of the cluster"),
        "the forwarder did not register with the exposer's home\n{}",
        all(&s1, &s2)
    );
    within(
        "a transfer across two S",
        Duration::from_secs(60),
        transfer_via(fwd_port, Mode::Duplex, (3, 4 << 20), (4, 4 << 20)),
    )
    .await
    .unwrap_or_else(|e| panic!("transfer across two S: {e:#}\n{}", all(&s1, &s2)));

    // The exposer's home dies under an open connection: the connection, direct, carries
    // on; the exposer moves home to the other S, which its home listed at registration.
    let conn = EchoConn::open(fwd_port)
        .await
        .expect("open the long connection");
    let pinger = Pinger::start(conn, 512, Duration::from_millis(100));
    let killed = Instant::now();
    if on_s1 {
        s1.kill();
    } else {
        s2.kill();
    }
    winner_proc
        .wait_log_any(
            &["moved home to another S of the cluster"],
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|| panic!("the exposer did not move home\n{}", all(&s1, &s2)));
    let moved = killed.elapsed();
    println!(
        "the exposer moved home {:.1} s after its S died",
        moved.as_secs_f64()
    );
    assert!(
        moved < Duration::from_secs(20),
        "the exposer took {moved:?} to move home (8-10 s expected)"
    );
    // New connections are introduced by the new home, where both agents are now.
    wait_tunnel(fwd_port, &[winner_proc, &fwd_proc], Duration::from_secs(30)).await;
    within(
        "a transfer after the exposer moved home",
        Duration::from_secs(60),
        transfer_via(fwd_port, Mode::Duplex, (5, 1 << 20), (6, 1 << 20)),
    )
    .await
    .unwrap_or_else(|e| panic!("transfer after the move: {e:#}\n{}", all(&s1, &s2)));
    let conn = pinger.finish().await.unwrap_or_else(|e| {
        panic!(
            "the connection opened before the exposer's S died broke: {e:#}\n{}",
            all(&s1, &s2)
        )
    });
    assert!(conn.rounds() > 50, "{} round trips", conn.rounds());
    conn.close().await.expect("close the long connection");
    drop(fwd_proc);
    // The dead S back, for what follows.
    if on_s1 {
        s1.restart().await;
    } else {
        s2.restart().await;
    }

    // One of three etcd members down: nothing notices.
    etcd.kill(0);
    let c = lab.agent("c", &s2);
    let c_proc = c.expose(&target, "fresh", &[]);
    wait_registered(&c, &c_proc, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "a claim with one etcd member down\n{}",
                cluster_reports(&s1, &s2, &[&c_proc])
            )
        });

    // etcd out of reach: a new claim is refused with the reason; registered agents stay.
    etcd.kill(1);
    etcd.kill(2);
    let d = lab.agent("d", &s1);
    let d_proc = d.expose(&target, "later", &[]);
    d_proc
        .wait_log_any(&["cannot reach its etcd cluster"], Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no reason given while etcd is down\n{}",
                cluster_reports(&s1, &s2, &[&d_proc])
            )
        });
    assert!(
        registered_id(&c).await.is_some(),
        "c was dropped while etcd was down"
    );
    assert!(
        registered_id(winner).await.is_some(),
        "the owner was dropped while etcd was down"
    );

    // etcd back: the waiting claim goes through by itself.
    for i in 0..3 {
        etcd.restart(i);
    }
    etcd.wait_healthy()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let back = Instant::now();
    wait_registered(&d, &d_proc, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the claim did not go through after etcd came back\n{}\n{}",
                cluster_reports(&s1, &s2, &[&d_proc]),
                etcd.reports()
            )
        });
    println!(
        "the waiting claim went through {:.1} s after etcd answered again",
        back.elapsed().as_secs_f64()
    );
    for p in [s1.proc(), s2.proc(), winner_proc, &c_proc, &d_proc] {
        p.assert_running("at the end");
        p.assert_no_panic();
    }
}

/// S reaches an etcd over TLS with a client certificate (`--etcd-ca`, `--etcd-cert`,
/// `--etcd-key`; etcd takes no client without one) and logs in to it, its authentication
/// on, as a user allowed under `/p2ptun/` only (`--etcd-user`, `--etcd-password`); with a
/// wrong password, claims are refused with a reason that names the login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_logs_in_to_an_etcd_over_tls_with_authentication() {
    if !etcd::EtcdCluster::available() {
        skip_or_fail("etcd is not installed (Debian: etcd-server)");
        return;
    }
    let lab = Lab::new("cluster-auth");
    let mut etcd = etcd::EtcdCluster::start_tls(&lab, 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let tls = etcd.tls().expect("TLS files").clone();
    etcd.enable_auth("p2ptun", "pw-of-p2ptun")
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", etcd.reports()));
    let login = |password: &str| RelayOpts {
        extra_args: vec![
            "--etcd".into(),
            etcd.urls(),
            "--etcd-user".into(),
            "p2ptun".into(),
            "--etcd-password".into(),
            password.into(),
            "--etcd-ca".into(),
            tls.ca.display().to_string(),
            "--etcd-cert".into(),
            tls.client_cert.display().to_string(),
            "--etcd-key".into(),
            tls.client_key.display().to_string(),
        ],
        ..RelayOpts::default()
    };
    let s = lab.relay("s", login("pw-of-p2ptun")).await;
    let svc = Service::start().await;
    let a = lab.agent("a", &s);
    let pa = a.expose(&svc.target(), "guarded", &[]);
    let id = wait_registered(&a, &pa, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no registration through a logged-in S\n{}",
                reports(&[s.proc(), &pa])
            )
        });
    assert_eq!(
        etcd.get("/p2ptun/v1/names/guarded").await.expect("etcd"),
        Some(id)
    );

    let wrong = lab.relay("wrong", login("not-the-password")).await;
    let b = lab.agent("b", &wrong);
    let pb = b.expose(&svc.target(), "refused", &[]);
    pb.wait_log_any(&["logging in as 'p2ptun'"], Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the refusal does not name the login\n{}",
                reports(&[wrong.proc(), &pb])
            )
        });
    assert_eq!(
        etcd.get("/p2ptun/v1/names/refused").await.expect("etcd"),
        None
    );
    for p in [s.proc(), wrong.proc(), &pa, &pb] {
        p.assert_no_panic();
    }
}
