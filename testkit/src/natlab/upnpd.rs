//! A real port-mapping daemon on a lab router: Debian's miniupnpd (2.3.1, nftables backend,
//! package `miniupnpd-nftables`) with UPnP IGD and/or NAT-PMP+PCP.
//!
//! What it needs in a namespace (see shared/notes/lab-facts.md): its chains in `table inet
//! filter` (`miniupnpd` on a forward filter hook, `prerouting_miniupnpd` and
//! `postrouting_miniupnpd` on nat hooks), jumped to from base chains of this table; the
//! router's own packets not masqueraded (the lab's rules translate LAN sources only); and a
//! STUN server answering RFC 5780 CHANGE-REQUEST (S with `--stun-alt`), because the lab's
//! external address is TEST-NET and miniupnpd only serves a reserved external address once
//! its STUN test shows the router reachable. `Lab::start_miniupnpd` opens the lab's own
//! tables for that (its port forwards, S's answers to the router).
//!
//! miniupnpd 2.3.1 has one switch for NAT-PMP and PCP (`enable_natpmp`): both answer on UDP
//! 5351, so a test that wants only one of them forces it on the client side.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns;

/// Where Debian installs it.
pub const BINARY: &str = "/usr/sbin/miniupnpd";

/// The HTTP port of its UPnP description and control URLs.
pub const HTTP_PORT: u16 = 5000;

/// How long its start (STUN test included) may take.
const START: Duration = Duration::from_secs(10);

/// Which protocols to enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    /// UPnP IGD (SSDP on the LAN, SOAP on [`HTTP_PORT`]).
    pub upnp: bool,
    /// NAT-PMP and PCP (UDP 5351).
    pub natpmp_pcp: bool,
}

impl Protocols {
    /// UPnP IGD only.
    pub const UPNP: Protocols = Protocols {
        upnp: true,
        natpmp_pcp: false,
    };
    /// NAT-PMP and PCP only.
    pub const NATPMP_PCP: Protocols = Protocols {
        upnp: false,
        natpmp_pcp: true,
    };
}

/// The nftables skeleton miniupnpd writes into: its three chains and the base chains that
/// jump to them. The forward policy is accept: the lab's own table does the filtering.
pub const CHAINS: &str = "table inet filter {
  chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
";

/// A running miniupnpd; killed on drop.
pub struct Miniupnpd {
    ns: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Miniupnpd {
    /// Writes a config for the router `ns` (LAN `lan_net`), creates the chains, starts the
    /// daemon and waits until it serves what `which` enables.
    pub fn start(
        ns: &str,
        lan_net: &str,
        which: Protocols,
        stun: SocketAddr,
    ) -> io::Result<Miniupnpd> {
        netns::nft(ns, CHAINS)?;
        let dir = tempfile::Builder::new().prefix("natlab-upnpd").tempdir()?;
        let yes = |b: bool| if b { "yes" } else { "no" };
        let config = format!(
            "ext_ifname=wan
listening_ip=lan
http_port={HTTP_PORT}
enable_upnp={}
enable_natpmp={}
secure_mode=yes
system_uptime=yes
notify_interval=60
clean_ruleset_interval=0
ext_perform_stun=yes
ext_stun_host={}
ext_stun_port={}
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
allow 1024-65535 {lan_net} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
",
            yes(which.upnp),
            yes(which.natpmp_pcp),
            stun.ip(),
            stun.port()
        );
        let conf = dir.path().join("miniupnpd.conf");
        std::fs::write(&conf, config)?;
        let log = std::fs::File::create(dir.path().join("miniupnpd.log"))?;
        let mut cmd = Command::new(BINARY);
        cmd.arg("-d")
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(dir.path().join("miniupnpd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        netns::prepare(&mut cmd, ns)?;
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {BINARY} (apt-get install miniupnpd-nftables): {e}"),
            )
        })?;
        let mut d = Miniupnpd {
            ns: ns.to_owned(),
            child,
            dir,
        };
        d.wait_ready(which)?;
        Ok(d)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("miniupnpd.log")).unwrap_or_default()
    }

    /// The rules miniupnpd added for its mappings (the DNAT rules in
    /// `prerouting_miniupnpd`), one per line.
    pub fn mapping_rules(&self) -> io::Result<Vec<String>> {
        let out = netns::command(&self.ns, "nft")?
            .args(["list", "chain", "inet", "filter", "prerouting_miniupnpd"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("dnat"))
            .map(str::to_owned)
            .collect())
    }

    /// The directory with its config and log.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn wait_ready(&mut self, which: Protocols) -> io::Result<()> {
        let deadline = Instant::now() + START;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "miniupnpd exited ({status}) while starting:\n{}",
                    self.log()
                )));
            }
            let log = self.log();
            // Its STUN test decides: "Port forwarding is now enabled" (or "... disabled",
            // when it concludes the router is behind a restrictive NAT).
            if log.contains("Port forwarding is now disabled") {
                return Err(io::Error::other(format!(
                    "miniupnpd will not forward ports (its STUN test failed):\n{log}"
                )));
            }
            let listening = [
                (which.upnp, "HTTP listening on port"),
                (which.natpmp_pcp, "Listening for NAT-PMP/PCP"),
            ]
            .iter()
            .all(|(needed, needle)| !needed || log.contains(needle));
            if listening && log.contains("Port forwarding is now enabled") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "miniupnpd not ready within {START:?}:\n{log}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
