//! Port mapping against the real daemon: Debian's miniupnpd (nftables backend) on a `hard`
//! NAT router of the lab (endpoint-dependent mapping, port-restricted filtering), with S
//! (`p2ptun-relay --stun-alt`) answering its RFC 5780 STUN test.
//!
//! - `direct_through_each_protocols_mapping`: for UPnP IGD, NAT-PMP and PCP, each forced on
//!   its own (`--portmap upnp|nat-pmp|pcp`; miniupnpd 2.3.1 serves NAT-PMP and PCP together,
//!   so those two are forced on the client side), the exposer behind hard+miniupnpd gets a
//!   mapping, and a forwarder behind `easy` and one behind another `hard` reach it over
//!   direct UDP *at the mapped address* (without the mapping both pairs are relayed). 4 MiB
//!   each way are checked by SHA-256. On SIGINT the exposer deletes its mapping: miniupnpd's
//!   DNAT chain is empty afterwards. `p2ptun netcheck --portmap P` reports the protocol and
//!   the mapped address (and deletes its probe mapping). The six cells run in parallel.
//! - `the_mapped_host_sending_first_does_not_block_the_mapping`: raw sockets, the order the
//!   agents' checks may take: the mapped host sends to the peer first, then the peer's packet
//!   to the mapped port still gets in (Linux gives it another source port to avoid the
//!   conntrack clash) and the answer leaves from the mapped port.
//! - `without_a_daemon_nothing_waits`: behind hard without miniupnpd, `netcheck` returns
//!   with every protocol unanswered within its timeout, and a tunnel (relayed) works at once.
//!
//! Needs root, nftables and miniupnpd-nftables; skips otherwise (fails under CI=true).

use p2ptun_testkit as common;

use p2ptun_testkit::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::natlab;
use natlab::upnpd::{Miniupnpd, Protocols};
use natlab::{Host, Lab, Nat, Router, Shaping};
use serde_json::Value;
use support::{Pace, Tunnel};

const MIB: u64 = 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs each job on a thread of its own (with its own runtime and lab) and fails with every
/// failure's message once all have ended.
fn in_parallel(jobs: Vec<(String, Box<dyn FnOnce() -> String + Send>)>) {
    let results: Vec<(String, std::thread::Result<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(name, job)| {
                let h = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn_scoped(s, job)
                    .expect("thread");
                (name, h)
            })
            .collect();
        handles.into_iter().map(|(n, h)| (n, h.join())).collect()
    });
    let mut failed = Vec::new();
    for (name, r) in results {
        match r {
            Ok(summary) => println!("{name}: {summary}"),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{name}: {msg}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

/// S's address, where miniupnpd's STUN test goes.
fn stun() -> SocketAddr {
    natlab::S_LISTEN.parse().expect("S address")
}

/// Starts miniupnpd on `r` (blocking for the few seconds of its STUN test).
fn start_daemon(lab: &Lab, r: &Router, which: Protocols) -> Miniupnpd {
    lab.start_miniupnpd(r, which, stun())
        .unwrap_or_else(|e| panic!("miniupnpd: {e}"))
}

/// `p2ptun netcheck --json --portmap MODE` in `host`: the report and how long it took.
async fn netcheck(host: &Host, files: &common::Lab, mode: &str) -> (Value, Duration) {
    let mut cmd = host.command(common::agent_bin()).expect("command");
    cmd.args(["netcheck", "--json", "--server", natlab::S_LISTEN])
        .args(["--portmap", mode])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let label = format!("netcheck-{mode}");
    let out = common::run_command(&label, cmd, None, common::ONE_SHOT, &files.logs()).await;
    let took = started.elapsed();
    assert_eq!(out.code(), 0, "netcheck failed\n{}", out.describe());
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("netcheck printed no JSON ({e})\n{}", out.describe()));
    (v, took)
}

/// The first UDP mapping in the status of the agent of `state_dir`.
async fn udp_mapping(state_dir: &std::path::Path) -> Option<SocketAddr> {
    let st = support::status(state_dir).await.ok()?;
    st.iter()
        .flat_map(|s| s["portmap"].as_array().cloned().unwrap_or_default())
        .find(|m| m["transport"] == "udp")
        .and_then(|m| m["external"].as_str()?.parse().ok())
}

/// One cell: exposer behind hard+miniupnpd forcing `mode`, forwarder behind `peer`.
async fn mapped_cell(
    mode: &'static str,
    which: Protocols,
    peer: Nat,
    netcheck_too: bool,
) -> String {
    let lab = Lab::new().expect("lab");
    let r = lab.add_router(Nat::Hard, Shaping::none()).expect("router");
    let a = lab.add_host_behind(&r).expect("host a");
    let b = lab.add_host(peer, Shaping::none()).expect("host b");
    let files = common::Lab::new(&format!("portmap-{mode}-hard-x-{peer}"));
    let relay = support::start_relay(&lab, &files).await;
    let daemon = tokio::task::block_in_place(|| start_daemon(&lab, &r, which));
    let public_ip = r.public_ip();
    let mut notes = Vec::new();

    if netcheck_too {
        let (report, took) = netcheck(&a, &files, mode).await;
        let p = &report["portmap"][0];
        assert_eq!(
            p["protocol"],
            mode,
            "netcheck: {report:#}\n{}",
            daemon.log()
        );
        assert_eq!(
            p["answered"],
            true,
            "netcheck: {report:#}\n{}",
            daemon.log()
        );
        let ext: SocketAddr = p["external"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("netcheck: no mapped address: {report:#}"));
        assert_eq!(ext.ip(), public_ip, "netcheck: {report:#}");
        let rules = daemon.mapping_rules().expect("nft");
        assert!(
            rules.is_empty(),
            "netcheck left its probe mapping: {rules:?}"
        );
        notes.push(format!(
            "netcheck {mode} mapped {ext} in {} ms (whole netcheck {:.2} s)",
            p["ms"],
            took.as_secs_f64()
        ));
    }

    let tunnel = Tunnel::start_with(
        &a,
        &b,
        files,
        relay,
        &["--portmap", mode],
        &["--portmap", "off"],
    )
    .await;
    let started = Instant::now();
    let mapped = loop {
        if let Some(m) = udp_mapping(&tunnel.expose_agent.state_dir).await {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the exposer got no {mode} mapping within 10 s\n{}\n{}",
            daemon.log(),
            tunnel.reports()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let to_mapping = started.elapsed();
    assert_eq!(
        mapped.ip(),
        public_ip,
        "mapped to an address not the router's"
    );
    // The TCP punching port is mapped with the same protocol, right after the UDP port.
    let st = support::status(&tunnel.expose_agent.state_dir)
        .await
        .unwrap_or_default();
    let kinds: Vec<String> = st
        .iter()
        .flat_map(|s| s["portmap"].as_array().cloned().unwrap_or_default())
        .map(|m| {
            format!(
                "{}/{}",
                m["protocol"].as_str().unwrap_or("?"),
                m["transport"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert!(
        kinds.contains(&format!("{mode}/udp")) && kinds.contains(&format!("{mode}/tcp")),
        "the exposer's mappings are {kinds:?}, not {mode}'s UDP and TCP ones"
    );
    let rules = daemon.mapping_rules().expect("nft");
    assert!(
        rules
            .iter()
            .any(|r| r.contains(&format!("dport {}", mapped.port()))),
        "no DNAT rule for {mapped} in miniupnpd's chain: {rules:?}"
    );
    // The mapping reaches S as an update right after it is granted (one exchange in the lab).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    tunnel.wait_ready(Duration::from_secs(20)).await;
    let ready = t0.elapsed();
    let Some((path, at)) = tunnel
        .wait_path(
            "direct_udp",
            Duration::from_secs(15),
            Duration::from_millis(20),
        )
        .await
    else {
        panic!(
            "hard({mode})×{peer}: no direct UDP path; forwarder's peer: {:?}\n{}\n{}",
            tunnel.forwarder_peer().await,
            lab.nft_ruleset(&a),
            tunnel.reports()
        );
    };
    let to_direct = at - t0;
    assert_eq!(
        path.remote,
        mapped.to_string(),
        "the direct path does not go through the mapping"
    );

    let mut c = tunnel.connect();
    let round = c
        .round(0x9047_0001, 4 * MIB, &Pace::default())
        .await
        .unwrap_or_else(|e| panic!("transfer: {e:#}\n{}", tunnel.reports()));
    c.close().await.expect("close");
    let after = tunnel.forwarder_path().await.map(|p| p.kind);
    assert_eq!(after.as_deref(), Some("direct_udp"), "left the direct path");

    // A clean exit deletes the mapping.
    tunnel.exposer.proc().interrupt();
    let status = tunnel
        .exposer
        .proc()
        .wait_exit(Duration::from_secs(5))
        .await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the exposer did not exit cleanly on SIGINT: {status:?}\n{}",
        tunnel.reports()
    );
    let left = daemon.mapping_rules().expect("nft");
    assert!(
        left.is_empty(),
        "mapping not deleted on exit: {left:?}\n{}\n{}",
        daemon.log(),
        tunnel.reports()
    );

    notes.push(format!(
        "mapping {mapped} after {} ms; tunnel ready {:.2} s; direct UDP via the mapping {:.2} s \
         after the first connection; 4 MiB each way in {:.2} s, SHA-256 ok; deleted on SIGINT",
        to_mapping.as_millis(),
        ready.as_secs_f64(),
        to_direct.as_secs_f64(),
        round.elapsed.as_secs_f64()
    ));
    notes.join("; ")
}

#[test]
fn direct_through_each_protocols_mapping() {
    if !natlab::require_root() {
        return;
    }
    let mut jobs: Vec<(String, Box<dyn FnOnce() -> String + Send>)> = Vec::new();
    for (mode, which) in [
        ("upnp", Protocols::UPNP),
        ("nat-pmp", Protocols::NATPMP_PCP),
        ("pcp", Protocols::NATPMP_PCP),
    ] {
        for peer in [Nat::Easy, Nat::Hard] {
            let netcheck_too = peer == Nat::Easy;
            jobs.push((
                format!("hard({mode})×{peer}"),
                Box::new(move || runtime().block_on(mapped_cell(mode, which, peer, netcheck_too))),
            ));
        }
    }
    in_parallel(jobs);
}

#[test]
fn without_a_daemon_nothing_waits() {
    if !natlab::require_root() {
        return;
    }
    runtime().block_on(async {
        let lab = Lab::new().expect("lab");
        let a = lab.add_host(Nat::Hard, Shaping::none()).expect("host a");
        let b = lab.add_host(Nat::Easy, Shaping::none()).expect("host b");
        let files = common::Lab::new("portmap-no-daemon");
        let relay = support::start_relay(&lab, &files).await;

        let (report, took) = netcheck(&a, &files, "auto").await;
        let probes = report["portmap"].as_array().cloned().unwrap_or_default();
        assert_eq!(probes.len(), 3, "{report:#}");
        for p in &probes {
            assert_eq!(p["answered"], false, "{report:#}");
            let ms = p["ms"].as_u64().unwrap_or(u64::MAX);
            // Each protocol gives up within its 2 s timeout (the crate's own error, or ours).
            assert!(ms <= 2_500, "{} waited {ms} ms: {report:#}", p["protocol"]);
        }
        let summary: Vec<String> = probes
            .iter()
            .map(|p| format!("{} gave up after {} ms", p["protocol"], p["ms"]))
            .collect();

        // Both agents try every protocol (auto); nothing waits for them.
        let tunnel = Tunnel::start_with(&a, &b, files, relay, &[], &[]).await;
        let t0 = Instant::now();
        tunnel.wait_ready(Duration::from_secs(10)).await;
        let ready = t0.elapsed();
        let mut c = tunnel.connect();
        c.round(0x9047_0002, MIB, &Pace::default())
            .await
            .unwrap_or_else(|e| panic!("transfer: {e:#}\n{}", tunnel.reports()));
        c.close().await.expect("close");
        assert!(
            tunnel
                .exposer
                .proc()
                .wait_log_any(&["no port mapping"], Duration::from_secs(10))
                .await
                .is_some(),
            "the exposer never gave up on port mapping\n{}",
            tunnel.reports()
        );
        println!(
            "no daemon: netcheck {:.2} s ({}); tunnel ready {:.2} s after start, 1 MiB each way \
             SHA-256 ok",
            took.as_secs_f64(),
            summary.join(", "),
            ready.as_secs_f64()
        );
    });
}

/// What the kernel does when a host behind `hard`+miniupnpd sends to a peer *before* the
/// peer's packet to the mapped port arrives (the order the two agents' checks may take):
/// the mapped host's early packet gets a conntrack entry with a random public port, whose
/// reply tuple is the one the peer's packet to the mapping needs after DNAT.
#[test]
fn the_mapped_host_sending_first_does_not_block_the_mapping() {
    if !natlab::require_root() {
        return;
    }
    runtime().block_on(async {
        use p2ptun::portmap::{client, gateway::Target, Protocol, Transport};
        let lab = Lab::new().expect("lab");
        let r = lab.add_router(Nat::Hard, Shaping::none()).expect("router");
        let a = lab.add_host_behind(&r).expect("host a");
        let e = lab.add_host(Nat::Easy, Shaping::none()).expect("host e");
        let files = common::Lab::new("portmap-order");
        let _relay = support::start_relay(&lab, &files).await;
        let daemon = tokio::task::block_in_place(|| start_daemon(&lab, &r, Protocols::NATPMP_PCP));
        let wait = Duration::from_millis(500);

        let sa = a.udp_bind("0.0.0.0:0".parse().unwrap()).expect("a socket");
        let se = e.udp_bind("0.0.0.0:0".parse().unwrap()).expect("e socket");
        sa.set_read_timeout(Some(wait)).unwrap();
        se.set_read_timeout(Some(wait)).unwrap();
        let pe = natlab::stun::binding(&se, stun(), wait, 3)
            .expect("stun")
            .expect("e's mapping");
        let target = Target {
            gateway: r.lan_gateway(),
            local: a.ip(),
        };
        let port = sa.local_addr().unwrap().port();
        let lease = a.run_in(|| {
            runtime().block_on(client::request(Protocol::Pcp, target, Transport::Udp, port))
        });
        let mapped = lease.expect("PCP mapping").mapping.external;

        // a sends first (E's NAT drops it: e never sent to that random port).
        sa.send_to(b"early", pe).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // e sends to the mapping; a must get it, and its answer must come from the mapping.
        se.send_to(b"to-mapping", mapped).unwrap();
        let mut buf = [0u8; 64];
        let got = sa.recv_from(&mut buf);
        let ct = std::process::Command::new("ip")
            .args(["netns", "exec", r.ns(), "conntrack", "-L", "-p", "udp"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let (n, from) = got.unwrap_or_else(|err| {
            panic!(
                "the peer's packet to the mapping {mapped} was lost ({err}); conntrack:\n{ct}\n{}",
                daemon.log()
            )
        });
        assert_eq!(&buf[..n], b"to-mapping");
        sa.send_to(b"answer", from).unwrap();
        let (n, answer_from) = se
            .recv_from(&mut buf)
            .unwrap_or_else(|err| panic!("the answer was lost ({err}); conntrack:\n{ct}"));
        assert_eq!(&buf[..n], b"answer");
        println!(
            "a sent to {pe} first; e's packet to {mapped} reached a from {from}; a's answer \
             reached e from {answer_from}\nconntrack:\n{ct}"
        );
        assert_eq!(
            answer_from, mapped,
            "the answer did not come from the mapping"
        );
    });
}
