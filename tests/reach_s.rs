//! How agents reach S on the networks users are on (issue 13), with S started as an operator
//! starts it: `p2ptun-relay` with no address flags (both families' wildcard, STUN also on
//! the next port). Real S and agents in the NAT lab (`testkit/src/natlab/mod.rs`), bytes checked
//! by SHA-256 (the service of `testkit/src/support.rs`).
//!
//! - `netcheck_against_a_default_s_classifies_mapping`: `p2ptun netcheck --json` behind
//!   `public`, `easy`, `hard` and a dual-stack `easy` with a home router's IPv6: S names its
//!   alternate address (the request's destination with the second port), so the mapping is
//!   classified; asked at its IPv6 address, S sees the host's own address (no NAT66).
//! - `udp_blocked_exposer_registers_and_serves_within_2s`: the exposer's UDP is dropped by its
//!   router; it is registered (over TCP, raced against UDP) within 2 s of its start, and a
//!   forward to it carries a first round trip within 2 s of the forwarder's start.
//! - `control_connection_moves_back_to_udp`: an agent whose UDP was blocked at start is
//!   registered over TCP; once UDP passes again its control connection moves to UDP, while a
//!   stream through the tunnel goes on, intact.
//!
//! Needs root and nftables; skips otherwise (fails under CI=true).

use p2ptun_testkit as common;

use p2ptun_testkit::support;

use std::time::{Duration, Instant};

use common::natlab;
use common::RelayOpts;
use natlab::{Block, Host, Ipv6, Lab, Nat, RouterSpec, Shaping, Stack};
use serde_json::Value;
use support::{kit, run_heavy, Pace, Service, Tunnel};

/// The bound on registering, and on a first round trip through a new forward.
const WITHIN: Duration = Duration::from_secs(2);

/// S started with its defaults in the lab's S namespace.
async fn default_relay(lab: &Lab, files: &common::Lab) -> common::Relay {
    common::Relay::start(files, "relay", RelayOpts::lab_defaults(lab)).await
}

/// `p2ptun netcheck --json --server SERVER` in `host`.
async fn netcheck(host: &Host, server: &str, files: &common::Lab, label: &str) -> Value {
    let mut cmd = host.command(common::agent_bin()).expect("command");
    cmd.args(["netcheck", "--json", "--server", server])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let out = common::run_command(label, cmd, None, common::ONE_SHOT, &files.logs()).await;
    assert!(
        out.status.is_some_and(|s| s.success()),
        "netcheck in {label} failed\n{}",
        out.describe()
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("netcheck in {label}: not JSON ({e})\n{}", out.describe()))
}

#[test]
fn netcheck_against_a_default_s_classifies_mapping() {
    run_heavy(async {
        let lab = Lab::new().expect("lab");
        let files = common::Lab::new("reach-netcheck");
        let public = lab.add_host(Nat::Public, Shaping::none()).expect("public");
        let easy = lab.add_host(Nat::Easy, Shaping::none()).expect("easy");
        let hard = lab.add_host(Nat::Hard, Shaping::none()).expect("hard");
        let router = lab
            .add_router_with(RouterSpec {
                ipv6: Ipv6::Firewall,
                ..RouterSpec::new(Nat::Easy)
            })
            .expect("dual-stack router");
        let dual = lab
            .add_host_behind_with(&router, Stack::Dual)
            .expect("dual-stack host");
        let relay = default_relay(&lab, &files).await;

        let alt = format!("{}:7001", natlab::S_ADDRS[0]);
        let mut failures = Vec::new();
        for (host, label, mapping) in [
            (&public, "public", "no-nat"),
            (&easy, "easy", "endpoint-independent"),
            (&hard, "hard", "endpoint-dependent"),
            (&dual, "easy+ipv6", "endpoint-independent"),
        ] {
            let v = netcheck(host, natlab::S_LISTEN, &files, &format!("netcheck-{label}")).await;
            println!("{label}: {v}");
            if v["mapping"] != mapping {
                failures.push(format!(
                    "{label}: mapping {}, expected {mapping}",
                    v["mapping"]
                ));
            }
            if v["server_alt"] != alt.as_str() {
                failures.push(format!(
                    "{label}: S named {} as its alternate address, expected {alt}",
                    v["server_alt"]
                ));
            }
        }
        // Over IPv6 S sees the host's own address: no NAT66, a firewall at most. (S's IPv6
        // address is given: an IPv4 literal names no IPv6 address, a host name would.)
        let v = netcheck(&dual, natlab::S_LISTEN6, &files, "netcheck-ipv6").await;
        println!("easy+ipv6 over IPv6: {v}");
        if !v["server"].is_null() {
            failures.push(format!(
                "an IPv6 S has no IPv4 address, yet netcheck says {v}"
            ));
        }
        let v6 = v["ipv6"].clone();
        let own = dual.ip6().expect("an IPv6 address").to_string();
        let public6 = v6["public"].as_str().unwrap_or_default();
        if v6["no_nat"] != true || !public6.contains(&own) {
            failures.push(format!(
                "easy+ipv6: IPv6 report {v6}, expected {own} and no NAT"
            ));
        }
        relay.proc().assert_running("after the netchecks");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

#[test]
fn udp_blocked_exposer_registers_and_serves_within_2s() {
    run_heavy(async {
        let lab = Lab::new().expect("lab");
        let a = lab.add_host(Nat::UdpBlocked, Shaping::none()).expect("A");
        let b = lab.add_host(Nat::Easy, Shaping::none()).expect("B");
        let files = common::Lab::new("reach-udp-blocked");
        let t = kit(&a, &b, &files)
            .relay_opts(RelayOpts::lab_defaults(&lab))
            .start(vec![Service::start(&a)])
            .await;
        let registered = t.exposer_registered_in;
        t.wait_ready(Duration::from_secs(20)).await;
        let served = t.forwarder_started.elapsed();
        println!(
            "udp-blocked exposer registered in {:.2} s; first round trip {:.2} s after the \
             forwarder started",
            registered.as_secs_f64(),
            served.as_secs_f64()
        );
        let status = t.exposer_peers().await;
        assert!(
            registered <= WITHIN,
            "the exposer took {registered:?} to register\n{}",
            t.reports()
        );
        assert!(
            served <= WITHIN,
            "the first round trip took {served:?} from the forwarder's start; peers: \
             {status:?}\n{}",
            t.reports()
        );
        t.assert_healthy("after the first round trip");
    });
}

/// What carries `state_dir`'s agent's control connection, as its status says.
async fn control_over(state_dir: &std::path::Path) -> Option<String> {
    common::agent_status(state_dir)
        .await
        .ok()?
        .first()?
        .get("control_over")?
        .as_str()
        .map(str::to_owned)
}

#[test]
fn control_connection_moves_back_to_udp() {
    run_heavy(async {
        let lab = Lab::new().expect("lab");
        let (a, b) = support::easy_pair(&lab);
        lab.block(&a, Block::Udp).expect("block A's UDP");
        let files = common::Lab::new("reach-back-to-udp");
        let t: Tunnel = kit(&a, &b, &files)
            .relay_opts(RelayOpts::lab_defaults(&lab))
            .start(vec![Service::start(&a)])
            .await;
        t.wait_ready(Duration::from_secs(20)).await;
        let dir = &t.expose_agent.state_dir;
        assert_eq!(
            control_over(dir).await.as_deref(),
            Some("tcp"),
            "with UDP blocked the exposer should be on TCP\n{}",
            t.reports()
        );

        // A stream that lives through the move: rounds of 256 KiB, paced, SHA-checked.
        let mut conn = t.connect();
        let pace = Pace::new(2 << 20);
        conn.round(1, 256 << 10, &pace)
            .await
            .unwrap_or_else(|e| panic!("first round: {e:#}\n{}", t.reports()));
        lab.unblock(&a).expect("unblock A");
        let unblocked = Instant::now();
        let mut rounds = 1;
        let moved = loop {
            conn.round(100 + rounds, 256 << 10, &pace)
                .await
                .unwrap_or_else(|e| {
                    panic!("round {rounds} after the unblock: {e:#}\n{}", t.reports())
                });
            rounds += 1;
            if control_over(dir).await.as_deref() == Some("udp") {
                break unblocked.elapsed();
            }
            // The agent tries UDP again 15 s after registering over TCP.
            assert!(
                unblocked.elapsed() < Duration::from_secs(40),
                "the control connection stayed on TCP for 40 s after UDP came back\n{}",
                t.reports()
            );
        };
        for i in 0..4 {
            conn.round(1000 + i, 256 << 10, &pace)
                .await
                .unwrap_or_else(|e| panic!("round after the move: {e:#}\n{}", t.reports()));
        }
        conn.close().await.expect("the stream ends cleanly");
        println!(
            "control connection back on UDP {:.1} s after the unblock; {} rounds on one stream \
             meanwhile",
            moved.as_secs_f64(),
            rounds + 4
        );
        assert!(
            t.exposer
                .proc()
                .log()
                .contains("moving the control connection from TCP to UDP"),
            "{}",
            t.reports()
        );
        t.assert_healthy("after the move to UDP");
    });
}
