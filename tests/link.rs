//! One link per peer agent (issue 12): every service between two agents shares it, and its
//! paths heal. Real `p2ptun-relay` (S) and `p2ptun` agents in the NAT lab (see
//! `testkit/src/natlab/mod.rs`), every byte checked by SHA-256 (the service protocol of
//! `testkit/src/support.rs`), paths read from the agents' status sockets.
//!
//! - `two_services_in_one_daemon_share_one_direct_link`: an `up -c` exposer with two
//!   services (behind no NAT) and an `up -c` forwarder with both (behind `easy`): both
//!   carry traffic, the path is direct UDP, and stays so at every sample of 60 s of traffic
//!   on one of them; the forwarder's status lists one peer, for both names.
//! - `hard_forwarder_nat_flush_heals_back_to_direct`: forwarder behind `hard`, exposer behind
//!   `easy`, direct UDP (birthday punch); the forwarder's NAT forgets its state mid-transfer
//!   (`conntrack -F`): no byte lost, the stream goes on, direct UDP again within 10 s.
//! - `udp_between_peers_blocked_20s_comes_back_direct_within_5s`: easy × easy; UDP between
//!   the peers dropped for 20 s while a stream runs: traffic leaves direct UDP and the stream
//!   survives; after the unblock the path is direct UDP within 5 s and the same connection
//!   goes on working.
//! - `relay_session_closed_by_s_is_replaced_when_direct_dies`: S closes the pair's relay
//!   session (a 3 s idle timeout) while the pair is direct; then UDP and TCP between the
//!   peers are cut: the link gets a new relay session and the running stream goes on.
//! - `saturating_transfer_never_declares_the_direct_path_dead`: easy × easy, an unpaced
//!   transfer for 60 s while two threads keep both CPUs busy: the path is direct UDP at every
//!   sample and neither agent logs that a direct path stopped answering.
//!
//! Each test prints its timeline (path changes, events) and the times it measured; a failure
//! shows them with both agents' log lines about paths, and the log tails.
//!
//! Needs root and nftables (and conntrack for the NAT flush); skips otherwise (fails under
//! CI=true). The tests take the lock of `support::heavy`: they measure times.

use p2ptun_testkit as common;

use p2ptun_testkit::support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::natlab;
use natlab::{Lab, Nat, Shaping};
use support::{
    block_peer, describe_path, easy_pair, flush_conntrack, mib, run_heavy, sample_paths,
    service_name, start_relay_with, unblock_peer, CpuHog, Pace, PathView, PathWatch, PeerTraffic,
    Progress, Timeline, Tunnel,
};

const MIB: u64 = 1024 * 1024;

/// How long setup may take: S and the agents up and a first round trip.
const READY: Duration = Duration::from_secs(30);
/// How long an easy pair may take to reach direct UDP.
const TO_DIRECT: Duration = Duration::from_secs(15);
/// How long a pair with a `hard` NAT may take: the checks' 10 s deadline plus margin.
const TO_DIRECT_BIRTHDAY: Duration = Duration::from_secs(20);
/// How often paths are sampled while something happens.
const SAMPLE: Duration = Duration::from_millis(250);
/// The kind status reports for direct UDP.
const DIRECT_UDP: &str = "direct_udp";
/// The agent's words when it gives a path up; the lead's link keeps them.
const PATH_DEATH: &[&str] = &["stopped answering", "went silent"];

fn rx(p: &Progress) -> u64 {
    p.received.load(Ordering::Relaxed)
}

/// The first few of `items`, joined, and how many more there are (a failure message stays
/// readable when every sample of a minute failed).
fn first_few(items: &[String]) -> String {
    const FEW: usize = 8;
    let mut out = items
        .iter()
        .take(FEW)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > FEW {
        out += &format!(", … and {} more", items.len() - FEW);
    }
    out
}

fn is_direct_udp(p: &Option<PathView>) -> bool {
    p.as_ref().is_some_and(|p| p.kind == DIRECT_UDP)
}

/// Everything a failure message needs: the timeline, both agents' path log lines and
/// status, and where the logs are (their tails are printed as the processes drop).
async fn evidence(t: &Tunnel, tl: &Timeline) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        tl.render(),
        t.path_log(),
        t.status_dump().await,
        t.reports()
    )
}

/// Waits for direct UDP, failing with the evidence.
async fn wait_direct(t: &Tunnel, tl: &Timeline, within: Duration, pair: &str) -> PathView {
    match t.wait_path(DIRECT_UDP, within, SAMPLE).await {
        Some((p, at)) => {
            tl.event_at(at, format!("forwarder on {p}"));
            p
        }
        None => panic!(
            "{pair}: the forwarder's path never became direct UDP within {within:?} (now {})\n{}",
            describe_path(&t.forwarder_path().await),
            evidence(t, tl).await
        ),
    }
}

/// Waits (bounded) for a spawned round and returns the connection and its result.
async fn join_round(
    t: &Tunnel,
    tl: &Timeline,
    task: tokio::task::JoinHandle<(support::Conn, anyhow::Result<support::Round>)>,
    within: Duration,
    what: &str,
) -> (support::Conn, anyhow::Result<support::Round>) {
    match tokio::time::timeout(within, task).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => panic!("{what}: the task failed: {e}\n{}", evidence(t, tl).await),
        Err(_) => panic!(
            "{what}: not done within {within:?}\n{}",
            evidence(t, tl).await
        ),
    }
}

/// Prints the pauses in arriving bytes of `progress` into the timeline; returns the longest.
fn note_gaps(tl: &Timeline, progress: &Progress, label: &str) -> Duration {
    for (end, len) in progress.notable_gaps() {
        tl.event_at(
            end,
            format!(
                "{label}: {:.3} s without arriving bytes ended",
                len.as_secs_f64()
            ),
        );
    }
    progress.longest_gap().0
}

// =============================================================================================
// 1. Two services in one daemon share one direct link

/// Traffic on the first service for this long, with the path sampled every [`HOLD_SAMPLE`].
const HOLD: Duration = Duration::from_secs(60);
const HOLD_SAMPLE: Duration = Duration::from_millis(500);
/// The pace of that traffic, each way.
const HOLD_PACE: u64 = 2 * MIB;

#[test]
fn two_services_in_one_daemon_share_one_direct_link() {
    run_heavy(two_services());
}

async fn two_services() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let a = lab.add_host(Nat::Public, Shaping::none()).expect("host A");
    let b = lab.add_host(Nat::Easy, Shaping::none()).expect("host B");
    let t = Tunnel::start_daemons(&lab, &a, &b, "link-two-services", 2).await;
    tl.event(format!(
        "S and both `up -c` daemons registered: exposer {} (public, services {} and {}), \
         forwarder {} behind easy {}",
        a.ip(),
        service_name(0),
        service_name(1),
        b.ip(),
        b.public_ip()
    ));
    let mut watch = PathWatch::new();

    // Both services carry traffic.
    for i in 0..2 {
        t.wait_ready_on(i, READY).await;
        let mut c = t.connect_service(i);
        let r = match c.round(0x2500 + i as u64, MIB, &Pace::default()).await {
            Ok(r) => r,
            Err(e) => panic!(
                "round on {}: {e:#}\n{}",
                service_name(i),
                evidence(&t, &tl).await
            ),
        };
        c.close().await.expect("close");
        tl.event(format!(
            "{}: 1 MiB each way intact in {:.3} s",
            service_name(i),
            r.elapsed.as_secs_f64()
        ));
        watch.sample(&t, &tl).await;
    }
    let direct = wait_direct(&t, &tl, TO_DIRECT, "public x easy").await;
    let peers = t.forwarder_peers().await;
    tl.event(format!(
        "forwarder's status lists {} peer(s): {}",
        peers.len(),
        peers
            .iter()
            .map(|p| format!("{} for {}", p["fingerprint"], p["names"]))
            .collect::<Vec<_>>()
            .join("; ")
    ));

    // Traffic on the first service for HOLD; the second one stays idle.
    let seed = 0x2600;
    let pace = Pace::new(HOLD_PACE);
    t.service().set_pace(seed, pace.clone());
    let conn = t.connect_service(0);
    let progress = conn.progress.clone();
    let len = HOLD_PACE * (HOLD.as_secs() + 5);
    let task = conn.spawn_round(seed, len, pace.clone());
    let hold_start = Instant::now();
    tl.event(format!(
        "traffic on {}: {} MiB each way at {} MiB/s; path sampled every {:?} for {:?}",
        service_name(0),
        len / MIB,
        HOLD_PACE / MIB,
        HOLD_SAMPLE,
        HOLD
    ));
    let mut samples = 0u32;
    let mut off_direct = Vec::new();
    let mut unanswered = 0u32;
    let mut peer_counts = std::collections::BTreeMap::new();
    let mut k = 0u32;
    while hold_start.elapsed() < HOLD {
        k += 1;
        tokio::time::sleep_until((hold_start + HOLD_SAMPLE * k).into()).await;
        t.assert_healthy("traffic on one service");
        samples += 1;
        let p = watch.sample(&t, &tl).await;
        let n = t.forwarder_peers().await.len();
        *peer_counts.entry(n).or_insert(0u32) += 1;
        if n == 0 {
            unanswered += 1;
        }
        if !is_direct_udp(&p) {
            off_direct.push(format!(
                "{:.1} s: {}",
                hold_start.elapsed().as_secs_f64(),
                describe_path(&p)
            ));
        }
    }
    tl.event(format!(
        "{samples} samples over {:?}: {} not on direct UDP; peers listed per sample: {peer_counts:?}; \
         {:.1} MiB arrived",
        HOLD,
        off_direct.len(),
        mib(rx(&progress))
    ));
    pace.set(0);
    let (conn, result) = join_round(&t, &tl, task, Duration::from_secs(60), "the long round").await;
    let longest = note_gaps(&tl, &progress, "main");
    if let Err(e) = &result {
        panic!(
            "the transfer on {} failed: {e:#}\n{}",
            service_name(0),
            evidence(&t, &tl).await
        );
    }
    conn.close().await.expect("close the long connection");

    // The second service still works after its sibling's traffic.
    let mut c = t.connect_service(1);
    if let Err(e) = c.round(0x2700, MIB, &Pace::default()).await {
        panic!(
            "round on {} after the hold: {e:#}\n{}",
            service_name(1),
            evidence(&t, &tl).await
        );
    }
    c.close().await.expect("close");
    let path = watch.sample(&t, &tl).await;
    let peers = t.forwarder_peers().await;
    let exposer_peers = t.exposer_peers().await;
    let s_intros = t.relay().proc().lines_with(&["introduced"]);
    println!("{}", tl.render());
    println!("two services, one daemon each:");
    println!("  direct UDP before the hold: {direct}");
    println!(
        "  {samples} samples in {:?}: {} off direct UDP{}",
        HOLD,
        off_direct.len(),
        if off_direct.is_empty() {
            String::new()
        } else {
            format!(" (first: {})", off_direct[0])
        }
    );
    println!(
        "  longest pause in arriving bytes: {:.3} s",
        longest.as_secs_f64()
    );
    println!(
        "  forwarder's status: {} peer(s); exposer's: {}; S introduced the pair {} time(s)",
        peers.len(),
        exposer_peers.len(),
        s_intros.len()
    );
    println!("  test took {:.1} s", test_start.elapsed().as_secs_f64());

    t.assert_healthy("after the hold");
    assert!(
        off_direct.is_empty(),
        "the forwarder's path left direct UDP during {HOLD:?} of traffic on one of two services \
         ({} of {samples} samples): {}\n{}",
        off_direct.len(),
        first_few(&off_direct),
        evidence(&t, &tl).await
    );
    assert!(
        is_direct_udp(&path),
        "after the hold the forwarder's path is {}\n{}",
        describe_path(&path),
        evidence(&t, &tl).await
    );
    assert_eq!(
        peers.len(),
        1,
        "the forwarder's status must list exactly one peer for the exposer's two services: {}\n{}",
        serde_json::to_string(&peers).unwrap_or_default(),
        evidence(&t, &tl).await
    );
    let names: Vec<String> = peers[0]["names"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        names,
        vec![service_name(0), service_name(1)],
        "the one peer carries both names"
    );
    assert!(
        unanswered <= samples / 10,
        "{unanswered} of {samples} status samples listed no peer"
    );
    for i in 0..2 {
        assert!(
            t.service_at(i).errors().is_empty(),
            "service {} errors: {:?}",
            service_name(i),
            t.service_at(i).errors()
        );
    }
}

// =============================================================================================
// 2. The forwarder's hard NAT loses its state mid-transfer

/// The bound on getting back to direct UDP after the flush.
const HEAL_LIMIT: Duration = Duration::from_secs(10);
/// How long the path is watched after the flush (past the limit, for the timeline).
const FLUSH_WATCH: Duration = Duration::from_secs(15);
/// The transfer: this much each way at this pace (unpaced once the watch is over).
const FLUSH_LEN: u64 = 64 * MIB;
const FLUSH_PACE: u64 = 2 * MIB;

/// Whether `conntrack` runs here; else skips (fails under CI=true).
fn require_conntrack() -> bool {
    let ok = Command::new("conntrack")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        common::skip_or_fail("conntrack (the conntrack package) is not installed");
    }
    ok
}

#[test]
fn hard_forwarder_nat_flush_heals_back_to_direct() {
    run_heavy(async {
        // After the lab's own check (inside run_heavy), which names what is missing first.
        if require_conntrack() {
            nat_flush().await;
        }
    });
}

async fn nat_flush() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let a = lab.add_host(Nat::Easy, Shaping::none()).expect("host A");
    let b = lab.add_host(Nat::Hard, Shaping::none()).expect("host B");
    let t = Tunnel::start(&lab, &a, &b, "link-nat-flush").await;
    tl.event(format!(
        "S and agents up: exposer {} behind easy {}, forwarder {} behind hard {}",
        a.ip(),
        a.public_ip(),
        b.ip(),
        b.public_ip()
    ));
    t.wait_ready(READY).await;
    let before = wait_direct(&t, &tl, TO_DIRECT_BIRTHDAY, "easy x hard").await;
    let mut watch = PathWatch::new();
    watch.sample(&t, &tl).await;

    let seed = 0xF1A5;
    let pace = Pace::new(FLUSH_PACE);
    t.service().set_pace(seed, pace.clone());
    let conn = t.connect();
    let progress = conn.progress.clone();
    let task = conn.spawn_round(seed, FLUSH_LEN, pace.clone());
    tl.event(format!(
        "transfer: {} MiB each way at {} MiB/s",
        FLUSH_LEN / MIB,
        FLUSH_PACE / MIB
    ));
    // Flowing on direct UDP first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = watch.sample(&t, &tl).await;
        if rx(&progress) >= 4 * MIB && is_direct_udp(&p) {
            break;
        }
        if Instant::now() >= deadline || task.is_finished() {
            panic!(
                "the transfer did not flow on direct UDP (received {:.1} MiB, path {})\n{}",
                mib(rx(&progress)),
                describe_path(&p),
                evidence(&t, &tl).await
            );
        }
        tokio::time::sleep(SAMPLE).await;
    }

    // The exposer's view of the forwarder before the flush: the forwarder's NAT port, which
    // the flush makes useless (its next packets leave from a new random port).
    let old_remote = sample_paths(&t)
        .await
        .1
        .filter(|p| p.kind == DIRECT_UDP)
        .map(|p| p.remote)
        .unwrap_or_else(|| panic!("the exposer is not on direct UDP before the flush"));
    flush_conntrack(&lab, &b);
    let t_flush = Instant::now();
    let rx_flush = rx(&progress);
    tl.event_at(
        t_flush,
        format!(
            "FLUSH: conntrack -F in the forwarder's hard NAT ({:.1} MiB received so far)",
            mib(rx_flush)
        ),
    );
    // Healed: both agents on direct UDP, the exposer to the forwarder's new NAT port (so a
    // return faster than the samples is seen too, and a stale path is not taken for one).
    let mut t_off: Option<Instant> = None;
    let mut t_back: Option<Instant> = None;
    while t_flush.elapsed() < FLUSH_WATCH && !task.is_finished() {
        watch.sample(&t, &tl).await;
        let (f, e) = sample_paths(&t).await;
        let now = Instant::now();
        if !is_direct_udp(&f) && t_off.is_none() {
            t_off = Some(now);
        }
        let healed = is_direct_udp(&f)
            && e.as_ref()
                .is_some_and(|e| e.kind == DIRECT_UDP && e.remote != old_remote);
        match (healed, t_back) {
            (true, None) => t_back = Some(now),
            // Off again after coming back: the earlier return did not hold.
            (false, Some(_)) => t_back = None,
            _ => {}
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let exposer_after = sample_paths(&t).await.1;
    tl.event(format!(
        "watch over: {:.1} MiB arrived since the flush; exposer now on {}",
        mib(rx(&progress) - rx_flush),
        describe_path(&exposer_after)
    ));
    pace.set(0);
    let (conn, result) = join_round(&t, &tl, task, Duration::from_secs(120), "the transfer").await;
    let longest = note_gaps(&tl, &progress, "transfer");
    let done = result.as_ref().map(|r| r.elapsed);
    let closed = if result.is_ok() {
        Some(conn.close().await)
    } else {
        None
    };

    let since = |x: Option<Instant>| {
        x.map(|x| format!("{:.2} s", (x - t_flush).as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    };
    println!("{}", tl.render());
    println!("hard forwarder, NAT state flushed mid-transfer:");
    println!("  direct UDP before: {before}; the exposer's path to the forwarder {old_remote}");
    println!("  flush -> the forwarder off direct UDP: {}", since(t_off));
    println!(
        "  flush -> both on direct UDP again, through the new NAT port: {} (limit {HEAL_LIMIT:?})",
        since(t_back)
    );
    println!(
        "  longest pause in arriving bytes: {:.3} s",
        longest.as_secs_f64()
    );
    match &done {
        Ok(d) => println!(
            "  {} MiB each way intact in {:.1} s",
            FLUSH_LEN / MIB,
            d.as_secs_f64()
        ),
        Err(e) => println!("  transfer FAILED: {e:#}"),
    }
    println!("  test took {:.1} s", test_start.elapsed().as_secs_f64());

    t.assert_healthy("after the flush");
    if let Err(e) = &result {
        panic!(
            "the transfer across the NAT flush failed (a byte lost or the stream ended): {e:#}\n{}",
            evidence(&t, &tl).await
        );
    }
    if let Some(Err(e)) = closed {
        panic!("the connection did not close cleanly: {e:#}");
    }
    let Some(back) = t_back else {
        panic!(
            "the pair was not back on direct UDP through the forwarder's new NAT port (the \
             exposer's path to it was {old_remote} before the flush) within {FLUSH_WATCH:?} \
             of the flush; the forwarder left direct UDP {} after it\n{}",
            since(t_off),
            evidence(&t, &tl).await
        );
    };
    assert!(
        back - t_flush <= HEAL_LIMIT,
        "back on direct UDP only {:.2} s after the flush (limit {HEAL_LIMIT:?})\n{}",
        (back - t_flush).as_secs_f64(),
        evidence(&t, &tl).await
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 3. UDP between the peers blocked for 20 s

/// How long UDP between the peers stays blocked.
const UDP_BLOCK: Duration = Duration::from_secs(20);
/// The bound on the return to direct UDP after the unblock, and how long it is watched.
const BACK_LIMIT: Duration = Duration::from_secs(5);
const BACK_WATCH: Duration = Duration::from_secs(10);
/// The stream: this pace each way, long enough to span the block and the return.
const BLOCK_PACE: u64 = 2 * MIB;

#[test]
fn udp_between_peers_blocked_20s_comes_back_direct_within_5s() {
    run_heavy(udp_block());
}

async fn udp_block() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    let t = Tunnel::start(&lab, &a, &b, "link-udp-block").await;
    tl.event(format!(
        "S and agents up: A {} behind {}, B {} behind {}",
        a.ip(),
        a.public_ip(),
        b.ip(),
        b.public_ip()
    ));
    t.wait_ready(READY).await;
    let before = wait_direct(&t, &tl, TO_DIRECT, "easy x easy").await;
    let mut watch = PathWatch::new();
    watch.sample(&t, &tl).await;

    let seed = 0xB10C;
    let pace = Pace::new(BLOCK_PACE);
    t.service().set_pace(seed, pace.clone());
    let conn = t.connect();
    let progress = conn.progress.clone();
    let len = BLOCK_PACE * (UDP_BLOCK + BACK_WATCH).as_secs() + 8 * MIB;
    let task = conn.spawn_round(seed, len, pace.clone());
    tl.event(format!(
        "stream: {} MiB each way at {} MiB/s",
        len / MIB,
        BLOCK_PACE / MIB
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx(&progress) < 2 * MIB {
        assert!(
            Instant::now() < deadline && !task.is_finished(),
            "the stream did not flow\n{}",
            evidence(&t, &tl).await
        );
        tokio::time::sleep(SAMPLE).await;
    }

    block_peer(&lab, &a, b.public_ip(), PeerTraffic::Udp);
    let t_block = Instant::now();
    tl.event_at(
        t_block,
        format!(
            "BLOCK: UDP between {} and {} dropped for {UDP_BLOCK:?}",
            a.public_ip(),
            b.public_ip()
        ),
    );
    let mut t_off: Option<Instant> = None;
    let mut direct_while_blocked = Vec::new();
    let rx_block = rx(&progress);
    while t_block.elapsed() < UDP_BLOCK && !task.is_finished() {
        let p = watch.sample(&t, &tl).await;
        if is_direct_udp(&p) {
            if t_off.is_some() {
                direct_while_blocked.push(format!("{:.2} s", tl.at(Instant::now())));
            }
        } else if t_off.is_none() {
            t_off = Some(Instant::now());
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let rx_blocked = rx(&progress) - rx_block;
    tl.event(format!(
        "{:.1} MiB arrived while UDP was blocked",
        mib(rx_blocked)
    ));

    unblock_peer(&lab, &a);
    let t_unblock = Instant::now();
    tl.event_at(t_unblock, "UNBLOCK");
    let t_back = watch
        .wait_kind(&t, &tl, DIRECT_UDP, BACK_WATCH, SAMPLE)
        .await;
    if let Some(back) = t_back {
        tl.event_at(
            back,
            format!(
                "BACK on direct UDP {:.2} s after the unblock",
                (back - t_unblock).as_secs_f64()
            ),
        );
    }
    pace.set(0);
    let (mut conn, result) =
        join_round(&t, &tl, task, Duration::from_secs(120), "the stream").await;
    let longest = note_gaps(&tl, &progress, "stream");
    // The same connection once more, after everything.
    let again = match &result {
        Ok(_) => Some(conn.round(seed + 1, 4 * MIB, &Pace::default()).await),
        Err(_) => None,
    };
    let peers = t.forwarder_peers().await;

    let since = |from: Instant, x: Option<Instant>| {
        x.map(|x| format!("{:.2} s", (x - from).as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    };
    println!("{}", tl.render());
    println!("UDP between the peers blocked for {UDP_BLOCK:?}:");
    println!("  direct UDP before: {before}");
    println!("  block -> off direct UDP: {}", since(t_block, t_off));
    println!(
        "  unblock -> direct UDP: {} (limit {BACK_LIMIT:?})",
        since(t_unblock, t_back)
    );
    println!(
        "  {:.1} MiB arrived during the block; longest pause in arriving bytes {:.3} s",
        mib(rx_blocked),
        longest.as_secs_f64()
    );
    println!("  forwarder's status lists {} peer(s)", peers.len());
    println!("  test took {:.1} s", test_start.elapsed().as_secs_f64());

    t.assert_healthy("after the block");
    if let Err(e) = &result {
        panic!(
            "the stream did not survive the block: {e:#}\n{}",
            evidence(&t, &tl).await
        );
    }
    if let Some(Err(e)) = &again {
        panic!(
            "the same connection failed after the unblock: {e:#}\n{}",
            evidence(&t, &tl).await
        );
    }
    conn.close().await.expect("close the stream's connection");
    assert!(
        t_off.is_some(),
        "the forwarder never left direct UDP while UDP between the peers was blocked\n{}",
        evidence(&t, &tl).await
    );
    assert!(
        direct_while_blocked.is_empty(),
        "status claimed direct UDP again while UDP was still blocked, at {direct_while_blocked:?}"
    );
    assert!(
        rx_blocked >= MIB,
        "only {:.2} MiB arrived in {UDP_BLOCK:?} of blocked UDP",
        mib(rx_blocked)
    );
    let Some(back) = t_back else {
        panic!(
            "not back on direct UDP within {BACK_WATCH:?} of the unblock\n{}",
            evidence(&t, &tl).await
        );
    };
    assert!(
        back - t_unblock <= BACK_LIMIT,
        "back on direct UDP only {:.2} s after the unblock (limit {BACK_LIMIT:?})\n{}",
        (back - t_unblock).as_secs_f64(),
        evidence(&t, &tl).await
    );
    assert_eq!(
        peers.len(),
        1,
        "the forwarder's status must list one peer: {}",
        serde_json::to_string(&peers).unwrap_or_default()
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 4. S closes the relay session while direct; then the direct path dies

/// S's relay idle timeout in this test: short, so S closes the unused session soon.
const RELAY_IDLE: Duration = Duration::from_secs(3);
/// How long S and the agents may take to close and report it (the timeout, S's sweep a
/// quarter of it later, and margin).
const CLOSE_WAIT: Duration = Duration::from_secs(20);
/// How long the relay may take to carry the stream after the cut, and how much must arrive.
const RELAY_WAIT: Duration = Duration::from_secs(15);
const RELAY_PACE: u64 = MIB;
const RELAY_LEN: u64 = 48 * MIB;

#[test]
fn relay_session_closed_by_s_is_replaced_when_direct_dies() {
    run_heavy(relay_replaced());
}

async fn relay_replaced() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    let files = common::Lab::new("link-relay-replaced");
    let idle = RELAY_IDLE.as_secs().to_string();
    let relay = start_relay_with(&lab, &files, &["--relay-idle-timeout", &idle]).await;
    let t = Tunnel::start_with(&a, &b, files, relay, &[], &[]).await;
    tl.event(format!(
        "S (relay idle timeout {RELAY_IDLE:?}) and agents up: A {} behind {}, B {} behind {}",
        a.ip(),
        a.public_ip(),
        b.ip(),
        b.public_ip()
    ));
    t.wait_ready(READY).await;
    wait_direct(&t, &tl, TO_DIRECT, "easy x easy").await;
    let mut watch = PathWatch::new();
    watch.sample(&t, &tl).await;

    let seed = 0x5E55;
    let pace = Pace::new(RELAY_PACE);
    t.service().set_pace(seed, pace.clone());
    let conn = t.connect();
    let progress = conn.progress.clone();
    let task = conn.spawn_round(seed, RELAY_LEN, pace.clone());
    tl.event(format!(
        "stream: {} MiB each way at {} MiB/s",
        RELAY_LEN / MIB,
        RELAY_PACE / MIB
    ));

    // S closes the idle relay session and tells both agents.
    let closed_at_s = t
        .relay()
        .proc()
        .wait_log_any(&["relay session closed"], CLOSE_WAIT)
        .await;
    let told = t
        .forwarder
        .proc()
        .wait_log_any(&["S stopped relaying a session"], Duration::from_secs(5))
        .await;
    tl.event(format!(
        "S: {}; forwarder told: {}",
        t.relay()
            .proc()
            .lines_with(&["relay session closed"])
            .first()
            .map(String::as_str)
            .unwrap_or("(no \"relay session closed\" line)"),
        told.is_some()
    ));
    if closed_at_s.is_none() || told.is_none() {
        panic!(
            "S did not close the idle relay session within {CLOSE_WAIT:?} of the stream's \
             start, or the forwarder was not told (S closed: {}, forwarder told: {}): with \
             the pair on direct UDP nothing should cross the relay session\n{}",
            closed_at_s.is_some(),
            told.is_some(),
            evidence(&t, &tl).await
        );
    }
    let p = watch.sample(&t, &tl).await;
    assert!(
        is_direct_udp(&p) && !task.is_finished(),
        "the pair left direct UDP (now {}) or the stream ended before the cut\n{}",
        describe_path(&p),
        evidence(&t, &tl).await
    );
    let intros_before = t.relay().proc().lines_with(&["introduced"]).len();

    block_peer(&lab, &a, b.public_ip(), PeerTraffic::UdpAndTcp);
    let t_cut = Instant::now();
    let rx_cut = rx(&progress);
    tl.event_at(
        t_cut,
        format!(
            "CUT: UDP and TCP between {} and {} dropped ({:.1} MiB received so far)",
            a.public_ip(),
            b.public_ip(),
            mib(rx_cut)
        ),
    );
    let mut t_relay: Option<Instant> = None;
    while t_cut.elapsed() < RELAY_WAIT && !task.is_finished() {
        let p = watch.sample(&t, &tl).await;
        if t_relay.is_none() && p.as_ref().is_some_and(|p| p.kind == "relay") {
            t_relay = Some(Instant::now());
        }
        // On the relay and moving: enough seen.
        if t_relay.is_some() && rx(&progress) >= rx_cut + 2 * RELAY_PACE {
            break;
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let rx_relay = rx(&progress) - rx_cut;
    tl.event(format!("{:.1} MiB arrived since the cut", mib(rx_relay)));
    pace.set(0);
    let (conn, result) = join_round(&t, &tl, task, Duration::from_secs(120), "the stream").await;
    let longest = note_gaps(&tl, &progress, "stream");
    let intros = t.relay().proc().lines_with(&["introduced"]);

    println!("{}", tl.render());
    println!("relay session closed by S, then the direct path cut:");
    println!(
        "  cut -> relay: {}",
        t_relay
            .map(|x| format!("{:.2} s", (x - t_cut).as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    );
    println!(
        "  {:.1} MiB arrived after the cut; longest pause {:.3} s",
        mib(rx_relay),
        longest.as_secs_f64()
    );
    println!(
        "  S's introductions: {} before the cut, {} in all:",
        intros_before,
        intros.len()
    );
    for l in &intros {
        println!("    {l}");
    }
    println!("  test took {:.1} s", test_start.elapsed().as_secs_f64());

    t.assert_healthy("after the cut");
    if let Err(e) = &result {
        panic!(
            "the stream ended or lost bytes after the direct path died with S's relay session \
             closed: {e:#}\n{}",
            evidence(&t, &tl).await
        );
    }
    conn.close().await.expect("close the stream's connection");
    assert!(
        t_relay.is_some(),
        "the forwarder never reported the relay path within {RELAY_WAIT:?} of the cut\n{}",
        evidence(&t, &tl).await
    );
    assert!(
        rx_relay >= 2 * RELAY_PACE,
        "only {:.2} MiB arrived on the relay",
        mib(rx_relay)
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}

// =============================================================================================
// 5. A saturating transfer on busy CPUs

/// How long the unpaced transfer runs, and the CPU hog with it.
const SATURATE: Duration = Duration::from_secs(60);
const SATURATE_SAMPLE: Duration = Duration::from_millis(500);
/// Bytes each way per round (rounds follow each other on one connection).
const SATURATE_ROUND: u64 = 64 * MIB;
/// Threads spinning meanwhile: one per core of the project's 2-core machines.
const HOG_THREADS: usize = 2;

#[test]
fn saturating_transfer_never_declares_the_direct_path_dead() {
    run_heavy(saturate());
}

async fn saturate() {
    let test_start = Instant::now();
    let tl = Timeline::new();
    let lab = Lab::new().expect("lab");
    let (a, b) = easy_pair(&lab);
    let t = Tunnel::start(&lab, &a, &b, "link-saturate").await;
    t.wait_ready(READY).await;
    let before = wait_direct(&t, &tl, TO_DIRECT, "easy x easy").await;
    let mut watch = PathWatch::new();
    watch.sample(&t, &tl).await;

    let hog = CpuHog::start(HOG_THREADS, SATURATE + Duration::from_secs(30));
    let mut conn = t.connect();
    let progress = conn.progress.clone();
    let start = Instant::now();
    tl.event_at(
        start,
        format!(
            "{HOG_THREADS} CPU hog threads and an unpaced transfer for {SATURATE:?} \
             ({} MiB rounds each way)",
            SATURATE_ROUND / MIB
        ),
    );
    let task = tokio::spawn(async move {
        let mut rounds = 0u64;
        while start.elapsed() < SATURATE {
            conn.round(0x5A70 + rounds, SATURATE_ROUND, &Pace::default())
                .await?;
            rounds += 1;
        }
        conn.close().await?;
        anyhow::Ok(rounds)
    });
    let mut samples = 0u32;
    let mut off_direct = Vec::new();
    let mut exposer_off = 0u32;
    let mut unanswered = 0u32;
    let mut k = 0u32;
    while start.elapsed() < SATURATE && !task.is_finished() {
        k += 1;
        tokio::time::sleep_until((start + SATURATE_SAMPLE * k).into()).await;
        samples += 1;
        let (f, e) = watch.sample_both(&t, &tl).await;
        // The exposer's side is checked through its log (below); counted here for the
        // summary.
        if e.is_some() && !is_direct_udp(&e) {
            exposer_off += 1;
        }
        if f.is_none() {
            // The status socket did not answer in time, or listed no path: not a verdict on
            // the path, but counted.
            unanswered += 1;
        } else if !is_direct_udp(&f) {
            off_direct.push(format!(
                "{:.1} s: {}",
                start.elapsed().as_secs_f64(),
                describe_path(&f)
            ));
        }
    }
    let spins = hog.stop();
    tl.event(format!(
        "CPU hog stopped (work rounds per thread: {spins:?})"
    ));
    let result = match tokio::time::timeout(Duration::from_secs(120), task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow::anyhow!("task: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "the last round did not end within 120 s of the deadline"
        )),
    };
    let moved = rx(&progress);
    let elapsed = start.elapsed();
    let longest = note_gaps(&tl, &progress, "transfer");
    let after = watch.sample(&t, &tl).await;
    let deaths: Vec<String> = [t.forwarder.proc(), t.exposer.proc()]
        .iter()
        .flat_map(|p| {
            p.lines_with(PATH_DEATH)
                .into_iter()
                .map(move |l| format!("{}: {l}", p.label))
        })
        .collect();

    println!("{}", tl.render());
    println!("saturating transfer with busy CPUs:");
    println!("  direct UDP before: {before}");
    println!(
        "  {:.0} MiB each way in {:.1} s ({:.1} MiB/s); longest pause in arriving bytes {:.3} s",
        mib(moved),
        elapsed.as_secs_f64(),
        mib(moved) / elapsed.as_secs_f64(),
        longest.as_secs_f64()
    );
    println!(
        "  {samples} path samples: the forwarder {} off direct UDP, {unanswered} unanswered; \
         the exposer {exposer_off} off direct UDP",
        off_direct.len()
    );
    println!("  path-death log lines: {}", deaths.len());
    for d in &deaths {
        println!("    {d}");
    }
    println!("  test took {:.1} s", test_start.elapsed().as_secs_f64());

    t.assert_healthy("after the saturating transfer");
    match &result {
        Ok(rounds) => println!("  {rounds} rounds intact"),
        Err(e) => panic!(
            "the saturating transfer failed: {e:#}\n{}",
            evidence(&t, &tl).await
        ),
    }
    assert!(
        deaths.is_empty(),
        "a working direct path was declared dead under load:\n{}\n{}",
        deaths.join("\n"),
        evidence(&t, &tl).await
    );
    assert!(
        off_direct.is_empty(),
        "the forwarder's path left direct UDP under load ({} of {samples} samples): {}\n{}",
        off_direct.len(),
        first_few(&off_direct),
        evidence(&t, &tl).await
    );
    assert!(
        is_direct_udp(&after),
        "after the transfer the forwarder's path is {}",
        describe_path(&after)
    );
    assert!(
        unanswered <= samples / 10,
        "{unanswered} of {samples} status samples went unanswered under load"
    );
    assert!(
        t.service().errors().is_empty(),
        "service errors: {:?}",
        t.service().errors()
    );
}
