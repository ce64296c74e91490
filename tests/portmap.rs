//! Port mapping against the real daemon: miniupnpd on a NAT router in the lab.
#[path = "natlab/mod.rs"]
mod natlab;

mod common;

#[path = "lab_paths/support.rs"]
#[allow(dead_code)]
mod support;

use std::time::Duration;

use natlab::upnpd::Protocols;
use natlab::{Lab, Nat, Shaping};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn explore() {
    if !natlab::require_root() {
        return;
    }
    runtime().block_on(async {
        let lab = Lab::new().expect("lab");
        let r = lab.add_router(Nat::Hard, Shaping::none()).expect("router");
        let h = lab.add_host_behind(&r).expect("host");
        let files = common::Lab::new("portmap-explore");
        let _relay = support::start_relay(&lab, &files).await;
        let d = lab.start_miniupnpd(&r, Protocols { upnp: true, natpmp_pcp: true }, support::S_LISTEN.parse().unwrap());
        match &d { Ok(d) => println!("LOG:\n{}", d.log()), Err(e) => println!("ERR {e}") }
        for mode in ["pcp", "nat-pmp", "upnp"] {
            let mut cmd = h.command(common::agent_bin()).unwrap();
            cmd.args(["netcheck", "--json", "--server", support::S_LISTEN, "--portmap", mode]).env("RUST_LOG", "debug");
            let out = common::run_command(mode, cmd, None, common::ONE_SHOT, &files.logs()).await;
            println!("{mode}: {}", out.describe());
        }
        if let Ok(d) = &d { println!("LOG2:\n{}\nRULES {:?}", d.log(), d.mapping_rules()); }
        println!("{}", lab.nft_ruleset(&h));
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
