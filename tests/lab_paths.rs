//! p2ptun's paths in the NAT lab: real `p2ptun-relay` (S) and `p2ptun` agents in network
//! namespaces behind kernel NATs (see `testkit/src/natlab/mod.rs`), checked by SHA-256 of every
//! byte and by the path kinds the agents report in their status.
//!
//! - `keepalive_*` (issue 3): with 10 s UDP conntrack timeouts in both NATs, a direct UDP
//!   path survives 60 s without traffic: the same TCP connection and a new one both work
//!   afterwards, and status shows the same direct UDP path all along.
//! - `failover_*` (issue 4): UDP between the two peers is dropped in the middle of paced
//!   transfers; traffic moves to the next path (relay through S, or direct TCP) within 3 s,
//!   no stream is lost, and when UDP passes again traffic returns to direct UDP. A second
//!   variant cuts TCP between the peers as well, so the relay through S must take over.
//! - `relay_first_*` (issue 4): the punch is held up (everything between the peers dropped),
//!   so a large transfer starts through S; once the peers can reach each other the running
//!   punch finds the direct UDP path and the transfer moves to it, intact.
//! - `ping_*` (issue 15): `p2ptun ping`, asking the running forwarder, shows pongs via the
//!   relay while the peers are blocked from each other, then via direct UDP.
//! - `udp_service_*` (issue 15): a UDP echo service through `expose --udp` / `forward
//!   --udp` on three pairs at once, one on each path kind (direct UDP, direct TCP with UDP
//!   between the peers dropped, the relay with UDP and TCP dropped); every echo SHA-checked
//!   and every missing datagram accounted for by the agents' counts.
//! - `relay_sends_packets_in_pieces_*` (issue 5): with only the relay left and S's link MTU
//!   1280, relayed packets no longer fit in one datagram; they go in pieces and arrive intact.
//! - `netcheck_*` (issue 3): `p2ptun netcheck --json` inside a host of every NAT preset
//!   reports the mapping and filtering the preset has.
//!
//! Setup: S listens on 203.0.113.1:7000 with its second STUN address on 203.0.113.2:7001;
//! the exposer runs in host A's namespace with a checked service on 127.0.0.1 there; the
//! forwarder runs in host B's namespace and listens on 127.0.0.1:4000 there; clients connect
//! from inside B's namespace. Each process logs to a file (`RUST_LOG=info,p2ptun=debug`
//! for agents, or `P2PTUN_TEST_LOG`); a failure prints the log tails and keeps the files.
//!
//! Drops between two peers are rules of this file's own nftables table in A's NAT router
//! (see [`support::block_peer`]): `Lab::block(Block::Udp)` would drop UDP to S as well, and
//! with it the control connection that the relay path rides on.
//!
//! Needs root and nftables; skips otherwise (fails under CI=true). The transfer tests take a
//! lock so that they do not share the CPU with each other (timings are measured).

use p2ptun_testkit as common;

use p2ptun_testkit::support;

use std::time::{Duration, Instant};

use common::natlab;
use common::udp::{Accounting, UdpClient, UdpEcho};
use natlab::{Host, Lab, Nat, Shaping};
use support::{
    block_peer, describe_path, easy_pair, heavy, iface_bytes, mib, peer_block_rules, run_heavy,
    runtime, unblock_peer, Conn, Pace, PathView, PathWatch, PeerTraffic, Round, Timeline, Tunnel,
};

const MIB: u64 = 1024 * 1024;

// =============================================================================================
// 1. Keepalive (issue 3)

/// Conntrack UDP timeout in both NATs.
const UDP_TIMEOUT: u32 = 10;
/// How long the forward stays idle.
const IDLE: Duration = Duration::from_secs(60);

#[test]
fn keepalive_direct_udp_survives_60s_idle_with_10s_nat_timeouts() {
    if !natlab::require_root() {
        return;
    }
    runtime().block_on(keepalive());
}

async fn keepalive() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    for h in [&a, &b] {
        lab.set_udp_timeout(h, UDP_TIMEOUT)
            .expect("set_udp_timeout");
        let router = lab.router_of(h).expect("router");
        let v = natlab::netns::read_sysctl(router.ns(), "net.netfilter.nf_conntrack_udp_timeout")
            .expect("read sysctl");
        assert_eq!(
            v.trim(),
            UDP_TIMEOUT.to_string(),
            "conntrack timeout in {}",
            router.ns()
        );
    }
    tl.event(format!(
        "lab: A {} (public {}), B {} (public {}), UDP conntrack timeout {UDP_TIMEOUT} s in both NATs",
        a.ip(),
        a.public_ip(),
        b.ip(),
        b.public_ip()
    ));
    let t = Tunnel::start(&lab, &a, &b, "lab-keepalive").await;
    tl.event("S and both agents up and registered");
    t.wait_ready(Duration::from_secs(30)).await;
    let Some((path, _)) = t
        .wait_path(
            "direct_udp",
            Duration::from_secs(15),
            Duration::from_millis(250),
        )
        .await
    else {
        panic!(
            "the forwarder's path never became direct_udp (easy x easy must punch)\n{}\n{}",
            t.status_dump().await,
            t.reports()
        );
    };
    tl.event(format!("forwarder's path: {path}"));

    let mut conn = t.connect();
    let r1 = conn
        .round(0x1111, MIB, &Pace::default())
        .await
        .unwrap_or_else(|e| panic!("round 1: {e:#}\n{}", t.reports()));
    tl.event(format!(
        "round 1 on connection 1: 1 MiB each way intact in {:.3} s",
        r1.elapsed.as_secs_f64()
    ));
    let before = t.forwarder_path().await;
    let before_exposer = t.exposer_peer().await.as_ref().and_then(PathView::of);
    tl.event(format!(
        "before idle: forwarder {}, exposer {}",
        describe_path(&before),
        describe_path(&before_exposer)
    ));
    let before = before.expect("a path before the idle time");
    assert_eq!(before.kind, "direct_udp", "path kind before the idle time");

    // Idle: nothing crosses the tunnel; status is read once a second (that is local).
    tl.event(format!("idle for {} s", IDLE.as_secs()));
    let idle_end = Instant::now() + IDLE;
    let mut off_path = Vec::new();
    let mut samples = 0;
    while Instant::now() < idle_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        t.assert_healthy("idle");
        samples += 1;
        let p = t.forwarder_path().await;
        let same = p
            .as_ref()
            .is_some_and(|p| p.kind == "direct_udp" && p.remote == before.remote);
        if !same {
            let what = format!(
                "idle sample {samples}: forwarder path {}",
                describe_path(&p)
            );
            tl.event(&what);
            off_path.push(what);
        }
    }
    tl.event(format!("idle over ({samples} status samples)"));

    let r2 = conn
        .round(0x2222, MIB, &Pace::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "round 2 on the same connection after the idle time: {e:#}\n{}",
                t.reports()
            )
        });
    tl.event(format!(
        "round 2 on the SAME connection: 1 MiB each way intact in {:.3} s",
        r2.elapsed.as_secs_f64()
    ));
    let mut conn2 = t.connect();
    let r3 = conn2
        .round(0x3333, MIB, &Pace::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "round on a new connection after the idle time: {e:#}\n{}",
                t.reports()
            )
        });
    tl.event(format!(
        "round on a NEW connection: 1 MiB each way intact in {:.3} s",
        r3.elapsed.as_secs_f64()
    ));
    conn.close().await.expect("close connection 1");
    conn2.close().await.expect("close connection 2");

    let after = t.forwarder_path().await;
    let after_exposer = t.exposer_peer().await.as_ref().and_then(PathView::of);
    tl.event(format!(
        "after idle: forwarder {}, exposer {}",
        describe_path(&after),
        describe_path(&after_exposer)
    ));
    let cli = t.status_cli().await;
    let cli_path = cli
        .iter()
        .find_map(|s| s["peers"].as_array().and_then(|p| p.first().cloned()))
        .as_ref()
        .and_then(PathView::of);
    tl.event(format!(
        "`p2ptun status --json`: forwarder {}",
        describe_path(&cli_path)
    ));
    t.assert_healthy("after the keepalive rounds");
    println!("{}", tl.render());
    println!(
        "keepalive: rounds {:.1} / {:.1} / {:.1} MiB/s; test took {:.1} s",
        r1.mib_per_s(),
        r2.mib_per_s(),
        r3.mib_per_s(),
        test_start.elapsed().as_secs_f64()
    );

    let after = after.expect("a path after the idle time");
    assert_eq!(after.kind, "direct_udp", "path kind after the idle time");
    assert_eq!(
        after.remote, before.remote,
        "the direct UDP path changed its remote over the idle time"
    );
    assert!(
        off_path.is_empty(),
        "the forwarder left the direct UDP path {} during the idle time:\n{}\n{}",
        before.remote,
        off_path.join("\n"),
        tl.render()
    );
    let cli_path = cli_path.expect("the CLI's status shows the path");
    assert_eq!(
        (cli_path.kind.as_str(), cli_path.remote.as_str()),
        ("direct_udp", before.remote.as_str()),
        "`p2ptun status --json` disagrees"
    );
    assert_eq!(
        after_exposer.map(|p| p.kind),
        Some("direct_udp".to_owned()),
        "the exposer's path after the idle time"
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 2. Failover (issue 4)

/// The long transfer: this much each way through one connection, at this pace.
const FAILOVER_MAIN: u64 = 64 * MIB;
const FAILOVER_MAIN_PACE: u64 = 4 * MIB;
/// Four more connections, this much each way, at this pace each.
const FAILOVER_SIDE: u64 = 8 * MIB;
const FAILOVER_SIDE_PACE: u64 = MIB / 2;
const FAILOVER_SIDES: u64 = 4;
/// How long UDP stays blocked after traffic left the direct UDP path.
const FAILOVER_HOLD: Duration = Duration::from_secs(4);
/// The bound on the switch, and the test's bound on the pause in arriving bytes.
const SWITCH_LIMIT: Duration = Duration::from_secs(3);
const GAP_LIMIT: Duration = Duration::from_secs(5);
const SAMPLE: Duration = Duration::from_millis(250);

#[test]
fn failover_direct_udp_to_next_path_and_back_without_losing_streams() {
    run_heavy(failover(PeerTraffic::Udp));
}

/// As above, but TCP between the peers is cut too, so the only path left is the relay
/// through S (a direct TCP path, if the TCP punch made one, goes silent as well).
#[test]
fn failover_to_relay_when_udp_and_tcp_between_peers_are_cut() {
    run_heavy(failover(PeerTraffic::UdpAndTcp));
}

async fn failover(cut: PeerTraffic) {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    let label = match cut {
        PeerTraffic::Udp => "lab-failover-udp",
        PeerTraffic::UdpAndTcp => "lab-failover-all",
    };
    let t = Tunnel::start(&lab, &a, &b, label).await;
    tl.event(format!(
        "S and agents up: A {} behind {}, B {} behind {}",
        a.ip(),
        a.public_ip(),
        b.ip(),
        b.public_ip()
    ));
    t.wait_ready(Duration::from_secs(30)).await;
    let mut watch = PathWatch::new();
    let Some((udp_path, _)) = t
        .wait_path("direct_udp", Duration::from_secs(15), SAMPLE)
        .await
    else {
        panic!(
            "never on direct_udp (easy x easy)\n{}\n{}",
            t.status_dump().await,
            t.reports()
        );
    };
    watch.sample(&t, &tl).await;
    if let Some(peer) = t.forwarder_peer().await {
        let all = PathView::all(&peer);
        if !all.is_empty() {
            tl.event(format!(
                "forwarder's known paths: {}",
                all.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }

    // The transfers: one long one and four more, all paced so that they span the block and
    // the unblock.
    let mut tasks = Vec::new();
    let mut progress = Vec::new();
    let specs: Vec<(String, u64, u64, u64)> =
        std::iter::once(("main".to_owned(), 0xF000, FAILOVER_MAIN, FAILOVER_MAIN_PACE))
            .chain((1..=FAILOVER_SIDES).map(|i| {
                (
                    format!("side{i}"),
                    0xF000 + i,
                    FAILOVER_SIDE,
                    FAILOVER_SIDE_PACE,
                )
            }))
            .collect();
    let transfers_start = Instant::now();
    for (label, seed, len, rate) in &specs {
        let pace = Pace::new(*rate);
        t.service().set_pace(*seed, pace.clone());
        let mut conn: Conn = t.connect();
        progress.push((label.clone(), conn.progress.clone()));
        let (seed, len) = (*seed, *len);
        tasks.push((
            label.clone(),
            tokio::spawn(async move {
                let r = conn.round(seed, len, &pace).await?;
                conn.close().await?;
                anyhow::Ok(r)
            }),
        ));
    }
    tl.event(format!(
        "transfers started: main {} MiB each way at {} MiB/s, {FAILOVER_SIDES} x {} MiB each way at {} MiB/s",
        FAILOVER_MAIN / MIB,
        FAILOVER_MAIN_PACE / MIB,
        FAILOVER_SIDE / MIB,
        FAILOVER_SIDE_PACE as f64 / MIB as f64
    ));
    let main = progress[0].1.clone();

    // Flowing on direct UDP?
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = watch.sample(&t, &tl).await;
        let flowing = main.received.load(std::sync::atomic::Ordering::Relaxed) >= 2 * MIB;
        if flowing && p.as_ref().is_some_and(|p| p.kind == "direct_udp") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the transfer did not flow on direct_udp within 20 s (received {:.1} MiB, path {})\n{}",
            mib(main.received.load(std::sync::atomic::Ordering::Relaxed)),
            describe_path(&p),
            t.reports()
        );
        tokio::time::sleep(SAMPLE).await;
    }
    tl.event(format!(
        "flowing on direct_udp {}: main received {:.1} MiB",
        udp_path.remote,
        mib(main.received.load(std::sync::atomic::Ordering::Relaxed))
    ));

    // Block UDP between the peers (only between them: S stays reachable).
    let s_host = lab.s();
    let s_bytes_block = iface_bytes(&s_host, "eth0");
    block_peer(&lab, &a, b.public_ip(), cut);
    let t_block = Instant::now();
    tl.event_at(
        t_block,
        format!(
            "BLOCK: {} between {} and {} dropped in A's NAT",
            match cut {
                PeerTraffic::Udp => "UDP",
                PeerTraffic::UdpAndTcp => "UDP and TCP",
            },
            a.public_ip(),
            b.public_ip()
        ),
    );
    let mut switched: Option<(Instant, PathView)> = None;
    let deadline = t_block + Duration::from_secs(10);
    while Instant::now() < deadline {
        let p = watch.sample(&t, &tl).await;
        if let Some(p) = p.filter(|p| p.kind != "direct_udp") {
            switched = Some((Instant::now(), p));
            break;
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let Some((t_switch, next)) = switched else {
        panic!(
            "10 s after UDP between the peers was blocked the forwarder still reports direct_udp (or no path)\n{}\n{}\n{}",
            tl.render(),
            t.status_dump().await,
            t.reports()
        );
    };
    let switch_after = t_switch - t_block;
    tl.event_at(
        t_switch,
        format!(
            "SWITCHED to {} {} after {:.2} s",
            next.kind,
            next.remote,
            switch_after.as_secs_f64()
        ),
    );

    // Hold the block; traffic must go on over the next path.
    let rx_at_switch = main.received.load(std::sync::atomic::Ordering::Relaxed);
    let hold_end = Instant::now() + FAILOVER_HOLD;
    let mut off_next = Vec::new();
    // Where traffic settles: with UDP and TCP cut, the TCP path may carry it for the moment
    // its pings take to go silent before the relay takes over; what counts is where it
    // settles and how soon.
    let allowed: &[&str] = match cut {
        PeerTraffic::Udp => &["relay", "direct_tcp"],
        PeerTraffic::UdpAndTcp => &["relay"],
    };
    let mut settled = allowed
        .contains(&next.kind.as_str())
        .then(|| (next.kind.clone(), t_switch));
    let mut last_kind = next.kind.clone();
    while Instant::now() < hold_end {
        tokio::time::sleep(SAMPLE).await;
        let p = watch.sample(&t, &tl).await;
        if let Some(p) = &p {
            last_kind = p.kind.clone();
            if settled.is_none() && allowed.contains(&p.kind.as_str()) {
                settled = Some((p.kind.clone(), Instant::now()));
            }
        }
        if p.as_ref().map(|p| p.kind.as_str()) == Some("direct_udp") {
            off_next.push(format!(
                "{:.2} s: direct_udp while blocked",
                tl.at(Instant::now())
            ));
        }
    }
    let rx_on_next = main.received.load(std::sync::atomic::Ordering::Relaxed) - rx_at_switch;
    let s_bytes_blocked = iface_bytes(&s_host, "eth0");
    tl.event(format!(
        "on {} for {:.1} s: main received {:.1} MiB more; S's eth0 rx {:.1} MiB, tx {:.1} MiB since the block",
        next.kind,
        FAILOVER_HOLD.as_secs_f64(),
        mib(rx_on_next),
        mib(s_bytes_blocked.0 - s_bytes_block.0),
        mib(s_bytes_blocked.1 - s_bytes_block.1)
    ));
    println!(
        "peer block rules with counters:\n{}",
        peer_block_rules(&lab, &a)
    );

    unblock_peer(&lab, &a);
    let t_unblock = Instant::now();
    tl.event_at(t_unblock, "UNBLOCK");
    let back = watch
        .wait_kind(&t, &tl, "direct_udp", Duration::from_secs(10), SAMPLE)
        .await;
    if let Some(t_back) = back {
        tl.event_at(
            t_back,
            format!(
                "BACK on direct_udp {:.2} s after the unblock",
                (t_back - t_unblock).as_secs_f64()
            ),
        );
    }
    let s_bytes_unblock = iface_bytes(&s_host, "eth0");

    // Every transfer to its end.
    let deadline = Instant::now() + Duration::from_secs(240);
    while tasks.iter().any(|(_, h)| !h.is_finished()) {
        if Instant::now() >= deadline {
            panic!(
                "transfers not done 240 s after the unblock: {}\n{}\n{}",
                progress
                    .iter()
                    .map(|(l, p)| format!(
                        "{l}: sent {:.1} MiB, received {:.1} MiB",
                        mib(p.sent.load(std::sync::atomic::Ordering::Relaxed)),
                        mib(p.received.load(std::sync::atomic::Ordering::Relaxed))
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                tl.render(),
                t.reports()
            );
        }
        watch.sample(&t, &tl).await;
        tokio::time::sleep(SAMPLE).await;
    }
    let mut results: Vec<(String, anyhow::Result<Round>)> = Vec::new();
    for (label, h) in tasks {
        let r = h
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("task: {e}")));
        results.push((label, r));
    }
    let t_done = Instant::now();
    tl.event_at(t_done, "all transfers ended");
    let s_bytes_end = iface_bytes(&s_host, "eth0");

    // Gaps in arriving bytes, per connection.
    let mut gap_lines = Vec::new();
    let mut worst = Duration::ZERO;
    for (label, p) in &progress {
        let (g, end) = p.longest_gap();
        worst = worst.max(g);
        gap_lines.push(format!(
            "{label}: longest pause in arriving bytes {:.3} s{}",
            g.as_secs_f64(),
            end.map(|e| format!(" (ended at {:.2} s)", tl.at(e)))
                .unwrap_or_default()
        ));
        for (end, len) in p.notable_gaps() {
            tl.event_at(
                end,
                format!(
                    "{label}: {:.3} s without arriving bytes ended",
                    len.as_secs_f64()
                ),
            );
        }
    }
    println!("{}", tl.render());
    println!("failover summary:");
    println!(
        "  switch away from direct_udp: {:.2} s after the block (limit {:.0} s), to {} {}",
        switch_after.as_secs_f64(),
        SWITCH_LIMIT.as_secs_f64(),
        next.kind,
        next.remote
    );
    println!(
        "  back on direct_udp: {}",
        back.map(|t| format!("{:.2} s after the unblock", (t - t_unblock).as_secs_f64()))
            .unwrap_or_else(|| "NOT within 10 s".into())
    );
    for l in &gap_lines {
        println!("  {l}");
    }
    for (label, r) in &results {
        match r {
            Ok(r) => println!(
                "  {label}: {} MiB each way intact in {:.2} s",
                r.len / MIB,
                r.elapsed.as_secs_f64()
            ),
            Err(e) => println!("  {label}: FAILED: {e:#}"),
        }
    }
    println!(
        "  S eth0 rx/tx MiB: blocked phase {:.1}/{:.1}, from unblock to end {:.1}/{:.1}",
        mib(s_bytes_blocked.0 - s_bytes_block.0),
        mib(s_bytes_blocked.1 - s_bytes_block.1),
        mib(s_bytes_end.0 - s_bytes_unblock.0),
        mib(s_bytes_end.1 - s_bytes_unblock.1)
    );
    println!(
        "  service: {} connections accepted, {} rounds served",
        t.service().accepted(),
        t.service().rounds()
    );
    println!(
        "  transfers took {:.1} s; test took {:.1} s",
        (t_done - transfers_start).as_secs_f64(),
        test_start.elapsed().as_secs_f64()
    );

    t.assert_healthy("after the failover transfers");
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(l, r)| r.as_ref().err().map(|e| format!("{l}: {e:#}")))
        .collect();
    assert!(
        failed.is_empty(),
        "transfers failed:\n{}\n{}",
        failed.join("\n"),
        t.reports()
    );
    assert!(
        switch_after <= SWITCH_LIMIT,
        "traffic left the blocked direct UDP path only after {:.2} s (limit {:.0} s)",
        switch_after.as_secs_f64(),
        SWITCH_LIMIT.as_secs_f64()
    );
    let Some((settled_kind, settled_at)) = settled else {
        panic!("with {cut:?} cut between the peers traffic never reached one of {allowed:?}")
    };
    assert_eq!(
        last_kind, settled_kind,
        "with {cut:?} cut, traffic left {settled_kind} again while the block held"
    );
    let settle_after = settled_at - t_block;
    println!(
        "  settled on {settled_kind} {:.2} s after the block",
        settle_after.as_secs_f64()
    );
    assert!(
        settle_after <= SWITCH_LIMIT,
        "traffic reached {settled_kind} only {:.2} s after the block (limit {:.0} s)",
        settle_after.as_secs_f64(),
        SWITCH_LIMIT.as_secs_f64()
    );
    if settled_kind == "relay" {
        let through_s = s_bytes_blocked.0 - s_bytes_block.0;
        assert!(
            through_s >= rx_on_next,
            "on the relay, S's interface received only {:.1} MiB while {:.1} MiB arrived at the client",
            mib(through_s),
            mib(rx_on_next)
        );
    }
    assert!(
        off_next.is_empty(),
        "status claimed direct_udp while UDP was blocked: {off_next:?}"
    );
    assert!(
        rx_on_next >= MIB,
        "only {:.2} MiB arrived in {:.0} s on {} (paced at {} MiB/s)",
        mib(rx_on_next),
        FAILOVER_HOLD.as_secs_f64(),
        next.kind,
        FAILOVER_MAIN_PACE / MIB
    );
    assert!(
        back.is_some(),
        "traffic did not return to direct_udp within 10 s of the unblock\n{}",
        t.status_dump().await
    );
    assert!(
        worst < GAP_LIMIT,
        "the longest pause in arriving bytes was {:.3} s (limit {:.0} s)",
        worst.as_secs_f64(),
        GAP_LIMIT.as_secs_f64()
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 3. Relay first, then direct (issue 4)

/// Each way through one connection: 256 MiB in release builds, 64 MiB in debug builds.
const RELAY_FIRST_LEN: u64 = if cfg!(debug_assertions) {
    64 * MIB
} else {
    256 * MIB
};
/// The pace while on the relay (so that the transfer is far from done when the punch gets
/// through); unpaced once on direct UDP.
const RELAY_FIRST_PACE: u64 = 8 * MIB;
/// When the block between the peers is lifted, after the first connection.
const RELAY_FIRST_UNBLOCK: Duration = Duration::from_millis(2500);

#[test]
fn relay_first_then_direct_udp_mid_transfer() {
    run_heavy(relay_first());
}

async fn relay_first() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    // Before anything starts: nothing passes between the peers, so the first punch cannot
    // succeed until the unblock, and no direct TCP path forms either.
    block_peer(&lab, &a, b.public_ip(), PeerTraffic::UdpAndTcp);
    tl.event(format!(
        "BLOCK: UDP and TCP between {} and {} dropped in A's NAT",
        a.public_ip(),
        b.public_ip()
    ));
    let t = Tunnel::start(&lab, &a, &b, "lab-relay-first").await;
    tl.event("S and agents up and registered");

    let s_host = lab.s();
    let seed = 0xAB00;
    let pace = Pace::new(RELAY_FIRST_PACE);
    t.service().set_pace(seed, pace.clone());
    let s0 = iface_bytes(&s_host, "eth0");
    let mut conn = t.connect();
    let t_first = Instant::now();
    tl.event_at(
        t_first,
        format!(
            "first connection: {} MiB each way, paced at {} MiB/s while on the relay",
            RELAY_FIRST_LEN / MIB,
            RELAY_FIRST_PACE / MIB
        ),
    );
    let prog = conn.progress.clone();
    let task = {
        let pace = pace.clone();
        tokio::spawn(async move {
            let r = conn.round(seed, RELAY_FIRST_LEN, &pace).await?;
            conn.close().await?;
            anyhow::Ok(r)
        })
    };
    let rx = || prog.received.load(std::sync::atomic::Ordering::Relaxed);
    let tx = || prog.sent.load(std::sync::atomic::Ordering::Relaxed);

    // On the relay while blocked.
    let mut watch = PathWatch::new();
    let mut saw_relay = false;
    let mut direct_while_blocked = Vec::new();
    while Instant::now() < t_first + RELAY_FIRST_UNBLOCK {
        let p = watch.sample(&t, &tl).await;
        match p.as_ref().map(|p| p.kind.as_str()) {
            Some("relay") => saw_relay = true,
            Some(other) => direct_while_blocked.push(other.to_owned()),
            None => {}
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let s1 = iface_bytes(&s_host, "eth0");
    let (rx_relay, tx_relay) = (rx(), tx());
    tl.event(format!(
        "before the unblock: received {:.1} MiB, sent {:.1} MiB; S's eth0 rx {:.1} MiB, tx {:.1} MiB since the first connection",
        mib(rx_relay),
        mib(tx_relay),
        mib(s1.0 - s0.0),
        mib(s1.1 - s0.1)
    ));

    unblock_peer(&lab, &a);
    let t_unblock = Instant::now();
    tl.event_at(
        t_unblock,
        format!(
            "UNBLOCK ({:.2} s after the first connection)",
            (t_unblock - t_first).as_secs_f64()
        ),
    );
    // The running punch (10 s from its start) must get through now.
    let mut direct: Option<Instant> = None;
    let deadline = t_first + Duration::from_secs(14);
    while Instant::now() < deadline && !task.is_finished() {
        let p = watch.sample(&t, &tl).await;
        if p.as_ref().is_some_and(|p| p.kind == "direct_udp") {
            direct = Some(Instant::now());
            break;
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let (rx_switch, tx_switch) = (rx(), tx());
    let s2 = iface_bytes(&s_host, "eth0");
    if let Some(td) = direct {
        tl.event_at(
            td,
            format!(
                "on direct_udp {:.2} s after the unblock, {:.1} MiB received by then; pace lifted",
                (td - t_unblock).as_secs_f64(),
                mib(rx_switch)
            ),
        );
        pace.set(0);
    } else {
        tl.event("NOT on direct_udp 14 s after the first connection; pace lifted anyway");
        pace.set(0);
    }

    let deadline = Instant::now() + Duration::from_secs(300);
    while !task.is_finished() {
        if Instant::now() >= deadline {
            panic!(
                "transfer not done 300 s after the switch: received {:.1} MiB, sent {:.1} MiB\n{}\n{}",
                mib(rx()),
                mib(tx()),
                tl.render(),
                t.reports()
            );
        }
        watch.sample(&t, &tl).await;
        tokio::time::sleep(SAMPLE).await;
    }
    let result = task
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("task: {e}")));
    let t_done = Instant::now();
    tl.event_at(t_done, "transfer ended");
    let s3 = iface_bytes(&s_host, "eth0");
    for (end, len) in prog.notable_gaps() {
        tl.event_at(
            end,
            format!("{:.3} s without arriving bytes ended", len.as_secs_f64()),
        );
    }
    let log = t.forwarder.proc().log();
    let found_line = log
        .lines()
        .find(|l| l.contains("found direct UDP"))
        .map(str::to_owned);
    let exposer_found = t
        .exposer
        .proc()
        .log()
        .lines()
        .find(|l| l.contains("found direct UDP"))
        .map(str::to_owned);
    let moved_direct = (RELAY_FIRST_LEN - rx_switch) + (RELAY_FIRST_LEN - tx_switch);
    let s_direct = (s3.0 - s2.0) + (s3.1 - s2.1);
    let (gap, gap_end) = prog.longest_gap();

    println!("{}", tl.render());
    println!("relay-first summary:");
    println!(
        "  on the relay before the unblock: {} (samples that were not relay: {direct_while_blocked:?})",
        saw_relay
    );
    println!(
        "  through S before the unblock: S eth0 rx {:.1} MiB, tx {:.1} MiB; client received {:.1} MiB, sent {:.1} MiB",
        mib(s1.0 - s0.0),
        mib(s1.1 - s0.1),
        mib(rx_relay),
        mib(tx_relay)
    );
    println!(
        "  switch to direct_udp: {}",
        direct
            .map(|d| format!("{:.2} s after the unblock", (d - t_unblock).as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    );
    println!(
        "  after the switch: {:.1} MiB moved (both ways) while S's eth0 moved {:.2} MiB (rx+tx)",
        mib(moved_direct),
        mib(s_direct)
    );
    println!(
        "  longest pause in arriving bytes: {:.3} s{}",
        gap.as_secs_f64(),
        gap_end
            .map(|e| format!(" (ended at {:.2} s)", tl.at(e)))
            .unwrap_or_default()
    );
    println!(
        "  forwarder log: {}",
        found_line
            .as_deref()
            .unwrap_or("(no 'found direct UDP' line)")
    );
    println!(
        "  exposer log: {}",
        exposer_found
            .as_deref()
            .unwrap_or("(no 'found direct UDP' line)")
    );
    match &result {
        Ok(r) => println!(
            "  {} MiB each way intact (SHA-256) in {:.2} s",
            r.len / MIB,
            r.elapsed.as_secs_f64()
        ),
        Err(e) => println!("  transfer FAILED: {e:#}"),
    }
    println!("  test took {:.1} s", test_start.elapsed().as_secs_f64());

    t.assert_healthy("after the relay-first transfer");
    if let Err(e) = &result {
        panic!("the transfer failed: {e:#}\n{}", t.reports());
    }
    assert!(
        saw_relay,
        "the forwarder never reported the relay path while the peers could not reach each other \
         (S relays by default){}\n{}",
        if direct_while_blocked.is_empty() {
            String::new()
        } else {
            format!("; it reported {direct_while_blocked:?}")
        },
        t.reports()
    );
    assert!(
        direct_while_blocked.is_empty(),
        "a direct path was reported while everything between the peers was dropped: {direct_while_blocked:?}"
    );
    assert!(
        rx_relay >= MIB && tx_relay >= MIB,
        "little flowed through the relay before the unblock: received {:.2} MiB, sent {:.2} MiB",
        mib(rx_relay),
        mib(tx_relay)
    );
    // What arrived at the client crossed S (there was no other way); what the client sent
    // may still sit in buffers on its way.
    assert!(
        s1.0 - s0.0 >= rx_relay,
        "S's interface received {:.1} MiB, less than the {:.1} MiB that arrived at the client: not through S?",
        mib(s1.0 - s0.0),
        mib(rx_relay)
    );
    let Some(td) = direct else {
        panic!(
            "the forwarder never switched to direct_udp after the unblock\n{}\n{}",
            t.status_dump().await,
            t.reports()
        );
    };
    assert!(
        td - t_unblock < Duration::from_secs(10),
        "the switch came {:.2} s after the unblock",
        (td - t_unblock).as_secs_f64()
    );
    assert!(
        found_line.is_some(),
        "the forwarder's log has no 'found direct UDP' line\n{}",
        t.forwarder.proc().report()
    );
    assert!(
        moved_direct > 0 && s_direct < moved_direct / 10,
        "after the switch S still moved {:.1} MiB for {:.1} MiB of tunnel traffic: traffic did not leave the relay",
        mib(s_direct),
        mib(moved_direct)
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 3a. `p2ptun ping` shows the move from the relay to the direct path (issue 15)

/// Pings and their interval: long enough for the punch that the unblock lets through, or
/// the re-punch after it.
const PING_COUNT: &str = "30";
const PING_INTERVAL: &str = "0.5";

/// `p2ptun ping NAME`, run as a user would beside the running forwarder (same state dir),
/// asks that agent: while nothing passes between the peers the pongs come via the relay,
/// and after the unblock via direct UDP, every ping answered.
#[test]
fn ping_shows_the_relay_then_the_direct_path() {
    run_heavy(ping_relay_then_direct());
}

async fn ping_relay_then_direct() {
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    block_peer(&lab, &a, b.public_ip(), PeerTraffic::UdpAndTcp);
    let t = Tunnel::start(&lab, &a, &b, "lab-ping").await;
    let logs = t.files.as_ref().expect("the tunnel holds its files").logs();
    let cmd = t
        .forward_agent
        .command(&["ping", t.name(), "-c", PING_COUNT, "-i", PING_INTERVAL]);
    let ping = tokio::spawn(async move {
        common::run_command("ping", cmd, None, Duration::from_secs(60), &logs).await
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    support::unblock_peer(&lab, &a);
    let out = ping.await.expect("the ping task");
    let context = format!("{}\n{}\n{}", out.cmdline, out.stdout, out.stderr);
    assert_eq!(out.code(), 0, "ping failed: {context}\n{}", t.reports());
    let pongs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("pong "))
        .collect();
    assert_eq!(
        pongs.len().to_string(),
        PING_COUNT,
        "every ping answered: {context}"
    );
    let first_direct = pongs
        .iter()
        .position(|l| l.contains(" via direct UDP "))
        .unwrap_or_else(|| panic!("no pong via direct UDP after the unblock: {context}"));
    assert!(
        first_direct > 0
            && pongs[..first_direct]
                .iter()
                .all(|l| l.contains(" via relay ")),
        "the pongs before the first direct one went via the relay: {context}"
    );
    assert!(
        pongs[first_direct..]
            .iter()
            .all(|l| l.contains(" via direct UDP ")),
        "once direct, the link stays direct: {context}"
    );
    let summary = out.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains(&format!("direct from ping {}", first_direct + 1)),
        "the summary names the move: {context}"
    );
    println!("{}", out.stdout);
}

// =============================================================================================
// 3a. UDP services over every path kind (issue 15)

/// Datagrams echoed over each path kind.
const UDP_COUNT: u64 = 1000;

/// A UDP echo service behind `expose --udp`, reached through `forward --udp`, over each kind
/// of path at once: three easy × easy pairs with one S, the first with nothing blocked
/// (direct UDP), the second with UDP between the peers dropped (direct TCP), the third with
/// UDP and TCP between them dropped (the relay). On each, once the forwarder reports that
/// path, 1,000 datagrams of 1,000 bytes go through with every echo SHA-checked, and every
/// one missing is accounted for by the agents' counts.
#[test]
fn udp_service_echoes_over_direct_udp_direct_tcp_and_the_relay() {
    run_heavy(udp_over_each_path());
}

async fn udp_over_each_path() {
    let lab = Lab::new().expect("lab");
    let files = common::Lab::new("lab-udp-paths");
    let relay = support::start_relay(&lab, &files).await;
    let mut pairs = Vec::new();
    for (kind, block) in [
        ("direct_udp", None),
        ("direct_tcp", Some(PeerTraffic::Udp)),
        ("relay", Some(PeerTraffic::UdpAndTcp)),
    ] {
        let (a, b) = easy_pair(&lab);
        if let Some(what) = block {
            block_peer(&lab, &a, b.public_ip(), what);
        }
        pairs.push((kind, a, b));
    }
    let (udp, tcp, relayed) = tokio::join!(
        udp_on_path(&files, &relay, &pairs[0]),
        udp_on_path(&files, &relay, &pairs[1]),
        udp_on_path(&files, &relay, &pairs[2]),
    );
    for summary in [udp, tcp, relayed] {
        println!("{summary}");
    }
}

/// Echoes [`UDP_COUNT`] datagrams through a UDP tunnel from `pair`'s B to its A once the
/// forwarder is on the pair's path kind; a summary of what happened.
async fn udp_on_path(
    files: &common::Lab,
    relay: &common::Relay,
    pair: &(&str, Host, Host),
) -> String {
    let (kind, a, b) = pair;
    let (here, there) = (common::Place::from(a), common::Place::from(b));
    let label = kind.replace('_', "-");
    let t = support::kit(a, b, files)
        .named(&format!("echo-{label}"))
        .server(relay)
        .labels(&format!("exposer-{label}"), &format!("forwarder-{label}"))
        .udp()
        .start(vec![UdpEcho::start(&here)])
        .await;
    let client = UdpClient::open(&there, support::FORWARD_PORT)
        .await
        .expect("a UDP client in B");
    let hello = client
        .wait_echo(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e:#}\n{}", t.reports()));
    let Some((path, at)) = t.wait_path(kind, Duration::from_secs(30), SAMPLE).await else {
        panic!(
            "{kind}: the forwarder never reported {kind}\n{}\n{}",
            t.status_dump().await,
            t.reports()
        );
    };
    let started = Instant::now();
    let round = client
        .round(0x0DA7_A000, UDP_COUNT, 1000, 16, Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e:#}\n{}", t.reports()));
    let took = started.elapsed();
    assert_eq!(
        (round.corrupt, round.duplicate),
        (0, 0),
        "{kind}: {round:?}"
    );
    assert!(
        round.received * 100 >= round.sent * 95,
        "{kind}: more than 5% lost: {round:?}\n{}",
        t.reports()
    );
    let after = t.forwarder_path().await;
    assert_eq!(
        after.as_ref().map(|p| p.kind.as_str()),
        Some(*kind),
        "{kind}: the path changed during the round: {}",
        describe_path(&after)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = hello + round;
    let counts = Accounting::read(
        &t.forward_agent.state_dir,
        &t.expose_agent.state_dir,
        t.name(),
    )
    .await
    .unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    let svc = t.service();
    let losses = counts
        .follow(total.sent, svc.received(), svc.echoed(), total.received)
        .unwrap_or_else(|e| panic!("{kind}: {e:#}\n{}", t.reports()));
    t.assert_healthy(kind);
    format!(
        "{kind} ({}, {:.1} s after the forwarder started): {} of {} echoed in {:.2} s; \
         missing: {losses:?}",
        path.remote,
        at.duration_since(t.forwarder_started).as_secs_f64(),
        total.received,
        total.sent,
        took.as_secs_f64()
    )
}

// =============================================================================================
// 3b. The relay over a path too small for whole relayed packets

/// Bytes each way through the relay when S's link is small.
const SMALL_MTU_LEN: u64 = 32 * MIB;
/// S's link MTU: a UDP payload of at most 1252 bytes, below the 1452 the control connection
/// probes for, and too small for a datagram holding a whole inner packet (1200 bytes and up)
/// and the relay header.
const SMALL_MTU: u16 = 1280;

/// With only the relay left and a link to S that silently drops packets over 1280 bytes (as
/// a VPN or tunnel on the way would), the agents' control connections find no room for whole
/// relayed packets and send them in pieces: the transfer arrives intact, on the relay.
#[test]
fn relay_sends_packets_in_pieces_where_the_path_to_s_is_small() {
    run_heavy(small_mtu_relay());
}

async fn small_mtu_relay() {
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    block_peer(&lab, &a, b.public_ip(), PeerTraffic::UdpAndTcp);
    let status = lab
        .s()
        .command("ip")
        .expect("ip in S's namespace")
        .args(["link", "set", "dev", "eth0", "mtu", &SMALL_MTU.to_string()])
        .status()
        .expect("ip link set");
    assert!(status.success(), "setting S's MTU failed: {status}");

    let t = Tunnel::start(&lab, &a, &b, "lab-relay-small-mtu").await;
    t.wait_ready(Duration::from_secs(30)).await;
    let seed = 0x5A11;
    let pace = Pace::new(0);
    t.service().set_pace(seed, pace.clone());
    let mut conn = t.connect();
    let conn_progress = conn.progress.clone();
    let round = conn
        .round(seed, SMALL_MTU_LEN, &pace)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports()));
    conn.close()
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports()));
    eprintln!(
        "relay with S's MTU {SMALL_MTU}: {} MiB each way at {:.1} MiB/s; longest pause {:?}",
        SMALL_MTU_LEN / MIB,
        round.mib_per_s(),
        conn_progress.longest_gap().0
    );

    let path = t.forwarder_path().await;
    assert_eq!(
        path.as_ref().map(|p| p.kind.as_str()),
        Some("relay"),
        "the forwarder's path: {}\n{}",
        describe_path(&path),
        t.reports()
    );
    let pieces = "relayed packets are sent in pieces";
    for agent in [t.forwarder.proc(), t.exposer.proc()] {
        assert!(
            agent.log().contains(pieces),
            "no \"{pieces}\" in a log: relayed packets went whole or on streams\n{}",
            t.reports()
        );
    }
    t.assert_healthy("after the transfer");
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 4. netcheck in the lab (issue 3)

#[test]
fn netcheck_reports_each_presets_mapping_and_filtering() {
    if !natlab::require_root() {
        return;
    }
    runtime().block_on(netcheck());
}

/// What `p2ptun netcheck --json` must say behind `nat`: (udp, mapping, filtering).
///
/// S's alternate address has another IP, so "address-dependent" means "address-dependent
/// or stricter" (the answer from S's other IP did not get in); the lab's easy and hard NATs
/// are address-and-port-dependent, which this probe cannot tell apart from restricted.
fn expected_netcheck(nat: Nat) -> (bool, &'static str, &'static str) {
    match nat {
        Nat::Public => (true, "no-nat", "endpoint-independent"),
        Nat::FullCone => (true, "endpoint-independent", "endpoint-independent"),
        Nat::Easy | Nat::Restricted | Nat::Double => {
            (true, "endpoint-independent", "address-dependent")
        }
        Nat::Hard => (true, "endpoint-dependent", "address-dependent"),
        Nat::UdpBlocked | Nat::TcpToSOnly => (false, "unknown", "unknown"),
    }
}

async fn netcheck() {
    let test_start = Instant::now();
    let lab = Lab::new().expect("lab");
    let presets = Nat::ALL;
    let hosts: Vec<Host> = presets
        .iter()
        .map(|&n| lab.add_host(n, Shaping::none()).expect("host"))
        .collect();
    let files = common::Lab::new("lab-netcheck");
    let relay = support::start_relay(&lab, &files).await;

    let mut runs = tokio::task::JoinSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let mut cmd = h.command(common::agent_bin()).expect("command");
        cmd.args(["netcheck", "--json", "--server", natlab::S_LISTEN])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let logs = files.logs();
        let label = format!("netcheck-{}", h.nat());
        runs.spawn(async move {
            (
                i,
                common::run_command(&label, cmd, None, common::ONE_SHOT, &logs).await,
            )
        });
    }
    let mut outputs: Vec<Option<common::RunOutput>> = (0..hosts.len()).map(|_| None).collect();
    while let Some(done) = runs.join_next().await {
        let (i, out) = done.expect("netcheck task");
        outputs[i] = Some(out);
    }

    let mut table = String::from(
        "\npreset         | udp   | mapping              | filtering            | public (expected IP)\n",
    );
    table += "---------------+-------+----------------------+----------------------+---------------------------\n";
    let mut failures = Vec::new();
    for (h, out) in hosts.iter().zip(outputs) {
        let out = out.expect("every netcheck ran");
        let nat = h.nat();
        if out.status.map(|s| s.success()) != Some(true) {
            failures.push(format!("{nat}: netcheck failed\n{}", out.describe()));
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(&out.stdout) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{nat}: not JSON ({e})\n{}", out.describe()));
                continue;
            }
        };
        let udp = v["udp"].as_bool();
        let mapping = v["mapping"].as_str().unwrap_or("?");
        let filtering = v["filtering"].as_str().unwrap_or("?");
        let public = v["public"].as_str().unwrap_or("-");
        table += &format!(
            "{:<14} | {:<5} | {:<20} | {:<20} | {} ({})\n",
            nat.name(),
            udp.map(|u| u.to_string()).unwrap_or("?".into()),
            mapping,
            filtering,
            public,
            h.public_ip()
        );
        let (e_udp, e_map, e_filter) = expected_netcheck(nat);
        if udp != Some(e_udp) || mapping != e_map || filtering != e_filter {
            failures.push(format!(
                "{nat}: expected udp {e_udp}, mapping {e_map}, filtering {e_filter}; got {}\nrules:\n{}",
                out.stdout.trim(),
                lab.nft_ruleset(h)
            ));
        }
        if e_udp {
            let ip_ok = public
                .rsplit_once(':')
                .is_some_and(|(ip, _)| ip == h.public_ip().to_string());
            if !ip_ok {
                failures.push(format!(
                    "{nat}: public address {public}, expected on {}",
                    h.public_ip()
                ));
            }
        }
    }
    println!("{table}");
    println!(
        "netcheck test took {:.1} s",
        test_start.elapsed().as_secs_f64()
    );
    relay.proc().assert_running("after the netchecks");
    assert!(
        failures.is_empty(),
        "{table}\n{}\n{}",
        failures.join("\n\n"),
        relay.proc().report()
    );
}

// =============================================================================================
// 6. Symmetric NATs (issue 6): port prediction and the birthday punch

/// How long a pair may take to reach direct UDP: the checks' 10 s deadline plus margin.
const TO_DIRECT: Duration = Duration::from_secs(14);

/// Bytes each way through a pair once it is direct.
const SYMMETRIC_LEN: u64 = 2 * MIB;

/// Pairs with a `hard` NAT (`masquerade random`) against NATs that keep one port: the
/// birthday punch must make them direct (the time it takes is printed); hard × hard must stay
/// on the relay because the agents know it cannot work, not because they gave up.
#[test]
fn symmetric_nat_pairs_go_direct_by_birthday_punch_or_know_they_cannot() {
    if !natlab::require_root() {
        return;
    }
    let _heavy = heavy();
    let rt = runtime();
    let mut report = Vec::new();
    for (exposer, forwarder) in [
        (Nat::Easy, Nat::Hard),
        (Nat::Hard, Nat::Easy),
        (Nat::Restricted, Nat::Hard),
        (Nat::Hard, Nat::Double),
    ] {
        let took = rt.block_on(symmetric_direct(exposer, forwarder));
        report.push(format!(
            "{exposer} x {forwarder}: direct UDP after {took:.2} s"
        ));
    }
    rt.block_on(symmetric_impossible());
    report.push("hard x hard: relay, known impossible".into());
    println!("{}", report.join("\n"));
}

/// Runs one pair to a direct UDP path and returns the seconds from the forwarder's start.
async fn symmetric_direct(exposer: Nat, forwarder: Nat) -> f64 {
    let lab = Lab::new().expect("lab");
    let a = lab.add_host(exposer, Shaping::none()).expect("host A");
    let b = lab.add_host(forwarder, Shaping::none()).expect("host B");
    let pair = format!("{exposer} x {forwarder}");
    let t = Tunnel::start(&lab, &a, &b, "symmetric").await;
    let started = Instant::now();
    t.wait_ready(Duration::from_secs(20)).await;
    let Some((path, seen)) = t
        .wait_path("direct_udp", TO_DIRECT, Duration::from_millis(100))
        .await
    else {
        panic!(
            "{pair}: no direct UDP path within {TO_DIRECT:?} (now {})\n{}\n{}",
            describe_path(&t.forwarder_path().await),
            t.status_dump().await,
            t.reports()
        );
    };
    let took = seen.duration_since(started).as_secs_f64();
    println!("{pair}: direct UDP to {} after {took:.2} s", path.remote);
    // The hard side's log says which technique won.
    let hard_log = if exposer == Nat::Hard {
        t.exposer.proc().log()
    } else {
        t.forwarder.proc().log()
    };
    let by_birthday = hard_log.contains("birthday punch: the peer reached one of our sockets");
    println!("{pair}: birthday punch won: {by_birthday}");

    // Bytes over the direct path, checked, with S seeing almost none of them.
    let s = lab.s();
    let before = iface_bytes(&s, "eth0").0;
    let mut c = t.connect();
    c.round(0x5EED_6000, SYMMETRIC_LEN, &Pace::default())
        .await
        .unwrap_or_else(|e| panic!("{pair}: transfer failed: {e:#}\n{}", t.reports()));
    c.close().await.expect("clean close");
    let through_s = iface_bytes(&s, "eth0").0 - before;
    assert!(
        through_s < SYMMETRIC_LEN / 4,
        "{pair}: S received {:.2} MiB during a {} MiB transfer on a direct path\n{}",
        mib(through_s),
        SYMMETRIC_LEN / MIB,
        t.reports()
    );

    // The sockets that lost are closed: the hard agent holds few descriptors once the punch
    // is over (it held about 256 more during it).
    let hard = if exposer == Nat::Hard {
        t.exposer.proc()
    } else {
        t.forwarder.proc()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds = hard.fds().unwrap_or(0);
    assert!(
        fds < 64,
        "{pair}: the hard side still holds {fds} descriptors after the punch"
    );
    t.assert_healthy(&pair);
    took
}

/// hard × hard: both agents see that neither can be reached directly and say so; traffic
/// stays on the relay and arrives intact.
async fn symmetric_impossible() {
    let lab = Lab::new().expect("lab");
    let a = lab.add_host(Nat::Hard, Shaping::none()).expect("host A");
    let b = lab.add_host(Nat::Hard, Shaping::none()).expect("host B");
    let t = Tunnel::start(&lab, &a, &b, "symmetric-hard").await;
    t.wait_ready(Duration::from_secs(20)).await;
    let mut c = t.connect();
    c.round(0x5EED_6100, SYMMETRIC_LEN, &Pace::default())
        .await
        .unwrap_or_else(|e| panic!("hard x hard: transfer failed: {e:#}\n{}", t.reports()));
    c.close().await.expect("clean close");
    let path = t.forwarder_path().await;
    assert_eq!(
        path.as_ref().map(|p| p.kind.as_str()),
        Some("relay"),
        "hard x hard: expected the relay, got {}\n{}",
        describe_path(&path),
        t.reports()
    );
    for (label, log) in [
        ("exposer", t.exposer.proc().log()),
        ("forwarder", t.forwarder.proc().log()),
    ] {
        assert!(
            log.contains("no direct UDP path can be punched"),
            "hard x hard: the {label} did not recognise the pair as impossible\n{}",
            t.reports()
        );
        assert!(
            !log.contains("birthday punch"),
            "hard x hard: the {label} tried a birthday punch\n{}",
            t.reports()
        );
    }
    t.assert_healthy("hard x hard");
}

// =============================================================================================
// 9. Two S of a cluster (issue 14)

/// Each transfer across the cluster's relay: long enough at its pace to span S2's death and
/// the move to S1 (about 10 s of silence, then the new relay session).
const CLUSTER_LEN: u64 = 24 * MIB;
/// Their pace.
const CLUSTER_PACE: u64 = MIB;
/// Transfers running at once.
const CLUSTER_TRANSFERS: u64 = 3;

/// Two S of one cluster in S's namespace, with a real 3-member etcd beside them; the exposer
/// homed on S2, the forwarder on S1, and nothing passes between the peers. The forwarder
/// registers with S2 as well ("visits"), and S2 relays. Then S2 dies mid-transfer: the
/// exposer moves home to S1 (which S2 listed at registration), the link gets a relay session
/// on S1, and every transfer that was running ends whole (SHA-256 each way).
#[test]
fn relay_across_two_s_then_onto_the_other_when_one_dies() {
    run_heavy(cluster_relay());
}

async fn cluster_relay() {
    use common::etcd::EtcdCluster;
    if !EtcdCluster::available() {
        common::skip_or_fail("etcd is not installed (Debian: etcd-server)");
        return;
    }
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    block_peer(&lab, &a, b.public_ip(), PeerTraffic::UdpAndTcp);
    let files = common::Lab::new("lab-cluster-relay");
    let etcd = EtcdCluster::start_in(&files, common::Place::netns(lab.s_ns()), 3)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let member = |listen: &str, alt: &str| common::RelayOpts {
        addrs: Some((
            listen.parse().expect("an address"),
            alt.parse().expect("an address"),
        )),
        extra_args: vec!["--etcd".into(), etcd.urls()],
        ..common::RelayOpts::lab(&lab)
    };
    let s1 = common::Relay::start(&files, "s1", member(natlab::S_LISTEN, natlab::S_ALT)).await;
    let mut s2 =
        common::Relay::start(&files, "s2", member("203.0.113.1:7100", "203.0.113.2:7101")).await;
    let (s1_addr, s2_addr) = (s1.addr().to_string(), s2.addr().to_string());
    let t = support::kit(&a, &b, &files)
        .relay(s1)
        .servers(Some(&s2_addr), None)
        .start(vec![support::Service::start(&a)])
        .await;
    tl.event("etcd, S1, S2 and the agents up; the exposer on S2, the forwarder on S1");
    let reports =
        |t: &Tunnel, s2: &common::Relay| format!("{}\n{}", t.reports(), s2.proc().report());
    t.wait_ready(Duration::from_secs(30)).await;
    let via = |p: &Option<PathView>, s: &str| {
        p.as_ref()
            .is_some_and(|p| p.kind == "relay" && p.remote == s)
    };
    let mut watch = PathWatch::new();
    let first = watch.sample(&t, &tl).await;
    assert!(
        via(&first, &s2_addr),
        "the first path is not S2's relay ({s2_addr}): {}\n{}",
        describe_path(&first),
        reports(&t, &s2)
    );
    assert!(
        t.forwarder
            .proc()
            .log()
            .contains("visiting S of the cluster"),
        "the forwarder did not register with the exposer's home\n{}",
        reports(&t, &s2)
    );

    let mut tasks = Vec::new();
    for i in 0..CLUSTER_TRANSFERS {
        let seed = 0xC100 + i;
        let pace = Pace::new(CLUSTER_PACE);
        t.service().set_pace(seed, pace.clone());
        let mut conn = t.connect();
        tasks.push(tokio::spawn(async move {
            let r = conn.round(seed, CLUSTER_LEN, &pace).await?;
            conn.close().await?;
            anyhow::Ok(r)
        }));
    }
    tl.event(format!(
        "{CLUSTER_TRANSFERS} transfers of {} MiB each way at {} MiB/s",
        CLUSTER_LEN / MIB,
        CLUSTER_PACE / MIB
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    s2.kill();
    let killed = Instant::now();
    tl.event_at(killed, "S2 KILLED");
    let moved = watch
        .wait_until(&t, &tl, Duration::from_secs(40), SAMPLE, |p| {
            via(p, &s1_addr)
        })
        .await;
    let Some(moved) = moved else {
        panic!(
            "the link never got a relay session on S1 after S2 died\n{}\n{}\n{}",
            tl.render(),
            t.status_dump().await,
            reports(&t, &s2)
        );
    };
    let mut rounds: Vec<Round> = Vec::new();
    for task in tasks {
        let round = common::within(
            "a transfer across S2's death",
            Duration::from_secs(90),
            task,
        )
        .await
        .expect("the transfer's task");
        rounds.push(round.unwrap_or_else(|e| {
            panic!(
                "a transfer failed: {e:#}\n{}\n{}",
                tl.render(),
                reports(&t, &s2)
            )
        }));
    }
    assert!(
        t.exposer
            .proc()
            .log()
            .contains("moved home to another S of the cluster"),
        "the exposer did not move home\n{}",
        reports(&t, &s2)
    );
    println!("{}", tl.render());
    println!(
        "relayed through S1 {:.1} s after S2 died; {} transfers of {} MiB each way ended whole ({:.1} MiB/s the slowest)",
        (moved - killed).as_secs_f64(),
        rounds.len(),
        CLUSTER_LEN / MIB,
        rounds.iter().map(Round::mib_per_s).fold(f64::INFINITY, f64::min)
    );
    t.assert_healthy("after S2 died");
}
