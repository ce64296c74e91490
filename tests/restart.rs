//! S crashes and comes back: the agents re-register by themselves, and a connection that was
//! already open between them never notices, since its bytes do not pass through S.
//!
//! Run: `cargo test --release --test restart`.

use p2ptun_testkit as common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let pinger = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(180);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                conn.ping(512, Duration::from_secs(10))
                    .await
                    .map_err(|e| e.context(format!("ping {}", conn.rounds())))?;
                rounds.store(conn.rounds(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(conn)
        })
    };

    // Crash S; the open connection goes on.
    pair.relay_mut().kill();
    let before = rounds.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = rounds.load(Ordering::SeqCst);
    assert!(
        !pinger.is_finished(),
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
    stop.store(true, Ordering::SeqCst);
    let conn = within("the pinger to stop", Duration::from_secs(30), pinger)
        .await
        .expect("pinger task")
        .unwrap_or_else(|e| {
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
