//! The `p2ptun` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_bind, parse_target};
use crate::proto::{validate_name, Fingerprint};

/// Peer-to-peer port forwarding: reach a TCP or UDP service behind NAT, directly.
///
/// On the machine with the service:   p2ptun expose 22 --name home{n}
/// On the machine that wants it:      p2ptun forward home 2222{n}
/// Then:                              ssh -p 2222 localhost
#[derive(Debug, Parser)]
#[command(name = "p2ptun", version, about, long_about = None)]
#[command(after_help = "Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.")]
pub struct Cli {
    /// Options every command shares.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command shares.
#[derive(Debug, Args)]
pub struct Global {
    /// The rendezvous server S, as HOST:PORT [default: 127.0.0.1:7000]. Several S of one
    /// cluster: HOST:PORT,HOST:PORT,... (the nearest that answers becomes the home).
    #[arg(
        long,
        short = 's',
        global = true,
        env = "P2PTUN_SERVER",
        value_name = "HOST:PORT"
    )]
    pub server: Option<String>,

    /// The token S requires, if it requires one.
    #[arg(long, global = true, env = "P2PTUN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// S's key fingerprint (as p2ptun-relay prints it). Without it, S's key is pinned on
    /// first use in STATE_DIR/known_servers.
    #[arg(
        long,
        global = true,
        env = "P2PTUN_SERVER_FINGERPRINT",
        value_name = "SHA256:..."
    )]
    pub server_fingerprint: Option<Fingerprint>,

    /// Where this agent keeps its identity key and pinned keys
    /// [default: $XDG_STATE_HOME/p2ptun or ~/.local/state/p2ptun].
    #[arg(long, global = true, env = "P2PTUN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Local address of the agent's UDP socket. The default, [::]:0, is one dual-stack
    /// socket for IPv4 and IPv6 (IPv4 only on a host without IPv6) [default: [::]:0].
    #[arg(long, global = true, value_name = "IP:PORT")]
    pub bind: Option<SocketAddr>,

    /// Ask the gateway to map the agent's ports: `auto` tries PCP, NAT-PMP, then UPnP IGD;
    /// `upnp`, `nat-pmp` or `pcp` uses only that one; `off` asks nothing. Never done for a
    /// loopback --bind [default: auto].
    #[arg(long, global = true, value_name = "MODE", value_enum)]
    pub portmap: Option<crate::portmap::Mode>,

    /// Same as `--portmap off`.
    #[arg(long, global = true, conflicts_with = "portmap")]
    pub no_portmap: bool,

    /// Threads that carry the agent's traffic. One moves the most through a connection (no
    /// hand-offs between cores); more help a daemon whose many peers transfer at the same
    /// time, at some cost to each.
    #[arg(
        long,
        global = true,
        env = "P2PTUN_THREADS",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub threads: u16,
}

impl Global {
    /// The port-mapping mode the flags ask for, if they ask.
    pub fn portmap_mode(&self) -> Option<crate::portmap::Mode> {
        if self.no_portmap {
            Some(crate::portmap::Mode::Off)
        } else {
            self.portmap
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Expose a local TCP service (with --udp, a UDP service) under a name.
    Expose {
        /// The service: a port on 127.0.0.1, or HOST:PORT.
        #[arg(value_parser = parse_target, value_name = "PORT | HOST:PORT")]
        local: String,
        /// The service is UDP: each client of the forward becomes a flow of datagrams, and
        /// this side opens a socket toward the service per flow. The forwarder needs --udp
        /// too.
        #[arg(long)]
        udp: bool,
        /// The name forwarders will ask for (lowercase letters, digits, '-').
        #[arg(long, short = 'n', value_parser = parse_name)]
        name: String,
        /// Only let agents with this key fingerprint in (repeatable). Default: anyone S
        /// introduces.
        #[arg(long, value_name = "FINGERPRINT")]
        allow: Vec<Fingerprint>,
    },
    /// Listen on a local port and carry each connection (with --udp, each client's
    /// datagrams) to a name.
    Forward {
        /// The name to reach.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Where to listen: a port on 127.0.0.1, or IP:PORT.
        #[arg(value_parser = parse_bind, value_name = "PORT | BIND:PORT")]
        local: SocketAddr,
        /// Forward UDP: listen on a UDP socket and carry each client's datagrams as QUIC
        /// datagrams (unreliable, never held up by a lost packet) to a UDP service exposed
        /// with --udp.
        #[arg(long)]
        udp: bool,
    },
    /// Run every expose and forward of a config file (see config.example.toml).
    Up {
        /// The config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Make the running `p2ptun up` of this state directory read its config file again.
    ///
    /// Services added, removed or changed start and stop; the others and their connections
    /// go on. A file that cannot be applied (an error in it, a port in use, a name another
    /// key holds) is refused whole, with the reason, and nothing changes. SIGHUP and saving
    /// the file do the same.
    Reload,
    /// Give a name back to S so that another key can claim it.
    ///
    /// Only the key that claimed it can (this --state-dir's), and not while an agent with
    /// that key exposes it: stop that agent first.
    Release {
        /// The name to give back.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Print this agent's identity fingerprint (what `--allow` takes).
    Id,
    /// Show the running agents of this state directory: peers, paths, RTTs, streams.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Round trips to the agent exposing a name, and the path each took.
    ///
    /// Each line names the path (relay, direct UDP, direct TCP), so a link's move from the
    /// relay to a direct path shows. Asks the agent running with this state directory (`p2ptun up`, `forward`, ...), over
    /// its connection to the peer; with none running, starts one for the pings.
    Ping {
        /// The name whose exposer to ping.
        #[arg(value_parser = parse_name)]
        name: String,
        /// How many pings.
        #[arg(short = 'c', long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::agent::ping::MAX_COUNT)))]
        count: u32,
        /// Seconds between pings (at least 0.01).
        #[arg(short = 'i', long, default_value = "1", value_parser = parse_interval, value_name = "SECONDS")]
        interval: std::time::Duration,
    },
    /// Find out what this network's NAT does to UDP, using S's two STUN addresses.
    Netcheck {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Shell completions and man pages.
    #[command(flatten)]
    Doc(crate::gendoc::DocCommand),
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    let min = crate::agent::socket::MIN_PING_INTERVAL;
    if !(min.as_secs_f64()..=3600.0).contains(&secs) {
        return Err(format!(
            "the interval is {} to 3600 seconds, not {s}",
            min.as_secs_f64()
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn parse_name(s: &str) -> Result<String, String> {
    validate_name(s).map(|_| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_are_refused_with_the_value_named() {
        for (args, needle) in [
            (vec!["p2ptun", "forward", "home", "99999"], "99999"),
            (vec!["p2ptun", "expose", "abc", "--name", "x"], "abc"),
            (
                vec!["p2ptun", "expose", "22", "--name", "Bad Name"],
                "Bad Name",
            ),
            (vec!["p2ptun", "release", "a_b"], "a_b"),
            (vec!["p2ptun", "release", "Home"], "Home"),
            (
                vec!["p2ptun", "expose", "22", "--name", "a", "--allow", "xyz"],
                "SHA256",
            ),
            (vec!["p2ptun", "ping", "home", "-c", "0"], "0"),
            (vec!["p2ptun", "ping", "home", "-i", "0.001"], "0.001"),
            (vec!["p2ptun", "ping", "home", "-i", "soon"], "soon"),
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn portmap_flags_parse_and_conflict() {
        use crate::portmap::Mode;
        let mode = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.global.portmap_mode());
        assert_eq!(mode(&["p2ptun", "id"]).unwrap(), None);
        assert_eq!(
            mode(&["p2ptun", "id", "--portmap", "nat-pmp"]).unwrap(),
            Some(Mode::NatPmp)
        );
        assert_eq!(
            mode(&["p2ptun", "--no-portmap", "id"]).unwrap(),
            Some(Mode::Off)
        );
        assert!(mode(&["p2ptun", "id", "--portmap", "upnp", "--no-portmap"]).is_err());
        let err = mode(&["p2ptun", "id", "--portmap", "igd"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("igd"), "{err}");
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let cli =
            Cli::try_parse_from(["p2ptun", "forward", "home", "2222", "--server", "s:1"]).unwrap();
        assert_eq!(cli.global.server.as_deref(), Some("s:1"));
    }
}
