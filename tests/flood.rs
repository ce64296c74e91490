//! S under a flood (issue 16), in the NAT lab: a real `p2ptun-relay` started as the README
//! tells an operator (no address flags; a token, as a public S should have), real agents.
//!
//! `s_keeps_serving_under_a_flood`:
//! 1. A relayed pair (A and B behind `easy` NATs with every packet between them dropped, so
//!    their bytes go through S) moves data, SHA-256 checked, to measure its throughput.
//! 2. For [`FLOOD`], two flooding hosts on the internet send S, all at once: QUIC Initials
//!    from 256 source ports (512 distinct ones, each sent from many ports), STUN requests (the agent's own and bare 20-byte ones), junk
//!    datagrams, TCP connections that say nothing, TCP connections that send the preamble one
//!    byte a second, and registrations with a wrong token (each a full handshake). Every
//!    generator is bounded in rate, count and time (`testkit/src/flood.rs`).
//!    Meanwhile the pair keeps its transfer going, S's CPU time and memory are sampled, and a
//!    new pair of agents (C and D) registers and connects through a name.
//! 3. After it, 1,000 agents register from one address (a host behind one NAT: what a
//!    carrier-grade NAT looks like to S), each with its own key and port.
//!
//! Checked: every byte of both pairs' transfers, the new pair's registration and first round
//! trip, each flood kind's bytes back per byte sent (never above 1), S's memory within a
//! bound, and all 1,000 agents registered and still connected. Printed: every figure (the
//! throughput before and during the flood, S's CPU and memory, the new registration's time,
//! the 1,000 agents' time and S's memory per agent); performance is not asserted.
//!
//! Needs root and nftables; skips otherwise (fails under CI=true).

use p2ptun_testkit as common;

// Only this test floods; the other test binaries need not compile the generators.
use p2ptun_testkit::flood;
use p2ptun_testkit::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::natlab::{self, Lab, Nat, Shaping};
use common::{Place, Relay, RelayOpts};
use flood::{Load, Tally};
use support::{block_peer, run_heavy, Conn, Pace, PeerTraffic, Service, Tunnel};

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(20);
/// The transfer's round size (each way).
const ROUND: u64 = 8 * 1024 * 1024;
/// How long the pair's throughput is measured before the flood.
const BASELINE: Duration = Duration::from_secs(5);
/// The token S requires.
const TOKEN: &str = "flood-test-token";
/// How many agents register from one address.
const AGENTS: usize = 1000;
/// S's memory may not grow past this while flooded (it holds a few hundred connections).
const RSS_BOUND_KIB: u64 = 512 * 1024;

#[test]
fn s_keeps_serving_under_a_flood() {
    run_heavy(flooded());
}

/// Rounds on `conn` until `until`; returns the connection and the MiB/s of the whole.
async fn transfer(mut conn: Conn, seed: u64, until: Instant) -> anyhow::Result<(Conn, f64)> {
    let start = Instant::now();
    let mut moved = 0u64;
    let mut k = 0;
    while Instant::now() < until {
        let round = conn.round(seed + k, ROUND, &Pace::default()).await?;
        moved += round.len;
        k += 1;
    }
    let mib = moved as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64().max(1e-9);
    Ok((conn, mib))
}

/// The flood generators, each with the host it runs on.
fn floods() -> Vec<(&'static str, usize, Load, FloodKind)> {
    let udp = |rate, sockets| Load {
        rate,
        count: u64::from(rate) * FLOOD.as_secs(),
        duration: FLOOD,
        sockets,
    };
    vec![
        ("QUIC Initials", 0, udp(4000, 256), FloodKind::Initials),
        ("STUN (agent's requests)", 0, udp(2000, 64), FloodKind::Stun),
        ("STUN (bare 20-byte)", 0, udp(2000, 64), FloodKind::StunBare),
        ("junk datagrams", 0, udp(4000, 64), FloodKind::Junk),
        ("TCP, silent", 1, udp(200, 400), FloodKind::TcpSilent),
        ("TCP, slow preamble", 1, udp(50, 200), FloodKind::TcpSlow),
        // From the host without TCP connections, whose handshake allowance they would use.
        ("Register, wrong token", 0, udp(40, 16), FloodKind::BadToken),
    ]
}

#[derive(Debug, Clone, Copy)]
enum FloodKind {
    Initials,
    Stun,
    StunBare,
    Junk,
    TcpSilent,
    TcpSlow,
    BadToken,
}

async fn run_flood(kind: FloodKind, s: SocketAddr, load: Load) -> anyhow::Result<Tally> {
    match kind {
        FloodKind::Initials => flood::initials(s, load).await,
        FloodKind::Stun => flood::stun(s, load, false).await,
        FloodKind::StunBare => flood::stun(s, load, true).await,
        FloodKind::Junk => flood::junk(s, load).await,
        FloodKind::TcpSilent => flood::tcp(s, load, false).await,
        FloodKind::TcpSlow => flood::tcp(s, load, true).await,
        FloodKind::BadToken => flood::bad_tokens(s, load).await,
    }
}

async fn flooded() {
    let lab = Lab::new().expect("lab");
    let (a, b) = (
        lab.add_host(Nat::Easy, Shaping::none()).expect("host A"),
        lab.add_host(Nat::Easy, Shaping::none()).expect("host B"),
    );
    let (c, d) = (
        lab.add_host(Nat::Easy, Shaping::none()).expect("host C"),
        lab.add_host(Nat::Easy, Shaping::none()).expect("host D"),
    );
    let flooders = [
        lab.add_host(Nat::Public, Shaping::none())
            .expect("flooding host 1"),
        lab.add_host(Nat::Public, Shaping::none())
            .expect("flooding host 2"),
    ];
    let crowd = lab
        .add_host(Nat::Easy, Shaping::none())
        .expect("the crowd's host");
    let s: SocketAddr = natlab::S_LISTEN.parse().expect("S's address");

    let files = common::Lab::new("flood");
    let relay = Relay::start(
        &files,
        "relay",
        RelayOpts {
            tokens: vec![TOKEN.to_owned()],
            ..RelayOpts::lab_defaults(&lab)
        },
    )
    .await;

    // No direct path of any kind between A and B: their bytes go through S.
    block_peer(&lab, &a, b.public_ip(), PeerTraffic::UdpAndTcp);
    block_peer(&lab, &b, a.public_ip(), PeerTraffic::UdpAndTcp);
    let t = Tunnel::start_with(&a, &b, files, relay, &[], &[]).await;
    t.wait_ready(Duration::from_secs(30)).await;
    let path = t.forwarder_path().await;
    assert!(
        path.as_ref().is_some_and(|p| p.kind == "relay"),
        "the pair should be relayed, but its path is {}",
        support::describe_path(&path)
    );

    // S's CPU seconds and resident KiB, from the kit's reading of /proc.
    let s_proc = t.relay().proc();
    let cpu = || s_proc.cpu_secs().unwrap_or(0.0);
    let rss = || s_proc.rss_kib().unwrap_or(0);
    let idle_rss = rss();
    let (conn, before) = transfer(t.connect(), 0xF100, Instant::now() + BASELINE)
        .await
        .unwrap_or_else(|e| panic!("the transfer before the flood: {e:#}\n{}", t.reports()));
    println!("relayed pair before the flood: {before:.1} MiB/s");

    // The flood, with the transfer, S's usage and a new pair at the same time.
    let runtimes: Vec<_> = flooders
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Place::from(h)
                .runtime(&format!("flood-{i}"), 1)
                .expect("a runtime in the flooding host")
        })
        .collect();
    let flood_start = Instant::now();
    let cpu_before = cpu();
    let handles: Vec<_> = floods()
        .into_iter()
        .map(|(what, host, load, kind)| (what, runtimes[host].spawn(run_flood(kind, s, load))))
        .collect();
    let during = tokio::spawn(transfer(conn, 0xF200, flood_start + FLOOD));

    let mut peak_rss = idle_rss;
    let sampler = async {
        let mut peak = 0;
        while flood_start.elapsed() < FLOOD {
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak = peak.max(rss());
        }
        peak
    };
    let late_files = common::Lab::new("flood-late");
    let late = async {
        // Let the flood build up first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Another name than the pair's: names belong to the key that claimed them first.
        let late = common::Kit::new(&late_files, "late")
            .on_hosts(&c, &d)
            .forward_ports(support::FORWARD_PORT)
            .ready(common::Ready::Registered)
            .labels("late-exposer", "late-forwarder")
            .server(t.relay())
            .start(vec![Service::start(&c)])
            .await;
        late.wait_ready(Duration::from_secs(30)).await;
        let mut conn = late.connect();
        let round = conn
            .round(0xF300, 1024 * 1024, &Pace::default())
            .await
            .unwrap_or_else(|e| panic!("the new pair's round: {e:#}\n{}", late.reports()));
        conn.close()
            .await
            .expect("the new pair's connection closes");
        (late.exposer_registered_in, round)
    };
    let (peak, (registered_in, late_round)) = tokio::join!(sampler, late);
    peak_rss = peak_rss.max(peak);

    let (conn, during_mib) = during
        .await
        .expect("transfer task")
        .unwrap_or_else(|e| panic!("the transfer during the flood: {e:#}\n{}", t.reports()));
    let cpu_flood = (cpu() - cpu_before).max(0.0);
    let flood_secs = flood_start.elapsed().as_secs_f64();
    let mut tallies = Vec::new();
    for (what, handle) in handles {
        let tally = handle
            .await
            .expect("flood task")
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        tallies.push((what, tally));
    }
    for rt in runtimes {
        rt.shutdown_background();
    }
    conn.close().await.expect("the pair's connection closes");

    println!("relayed pair during the flood: {during_mib:.1} MiB/s (before: {before:.1})");
    println!(
        "S during the flood: {:.2} CPU-s in {flood_secs:.1} s ({:.0}% of one core), \
         resident memory {} MiB idle, {} MiB at most",
        cpu_flood,
        100.0 * cpu_flood / flood_secs,
        idle_rss / 1024,
        peak_rss / 1024
    );
    println!(
        "a new agent registered in {:.0} ms during the flood; its pair's first 1 MiB round \
         took {:.0} ms",
        registered_in.as_secs_f64() * 1e3,
        late_round.elapsed.as_secs_f64() * 1e3
    );
    println!("{:<26} what it sent and what came back", "flood");
    for (what, tally) in &tallies {
        println!("{what:<26} {tally}");
    }
    for (what, tally) in &tallies {
        assert!(tally.sent > 0, "{what}: nothing was sent");
        assert!(
            tally.ratio() <= 1.0,
            "{what}: S sent {:.3} bytes per byte it received ({tally})",
            tally.ratio()
        );
    }
    assert!(
        peak_rss <= RSS_BOUND_KIB,
        "S grew to {} MiB under the flood (bound {} MiB)",
        peak_rss / 1024,
        RSS_BOUND_KIB / 1024
    );
    t.assert_healthy("after the flood");

    // A thousand agents behind one address.
    let before_crowd = rss();
    let crowd_rt = Place::from(&crowd)
        .runtime("crowd", 2)
        .expect("a runtime in the crowd's host");
    let agents = crowd_rt
        .spawn(flood::agents(
            s,
            Some(TOKEN),
            AGENTS,
            64,
            Duration::from_secs(120),
        ))
        .await
        .expect("crowd task")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", t.reports()));
    let with_crowd = rss();
    assert_eq!(agents.len(), AGENTS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(agents.all_alive(), "S closed some of the {AGENTS} agents");
    println!(
        "{AGENTS} agents from one address registered in {:.1} s ({:.0}/s), {} attempts \
         refused and retried; S's memory {} MiB -> {} MiB ({:.1} KiB per agent)",
        agents.took.as_secs_f64(),
        AGENTS as f64 / agents.took.as_secs_f64(),
        agents.refusals,
        before_crowd / 1024,
        with_crowd / 1024,
        with_crowd.saturating_sub(before_crowd) as f64 / AGENTS as f64
    );
    drop(agents);
    crowd_rt.shutdown_background();
    t.assert_healthy("after the crowd");
}
