//! The `p2ptun-relay` command line, and how its flags override the configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{ConfigError, FileConfig, RelayConfig, TlsFiles, EXPIRY_DAYS};

const CONFIG_HELP: &str = "\
Configuration file keys (TOML; all optional; relay/relay.example.toml documents them):
  listen, stun_alt, state_dir, tls_cert, tls_key, metrics   as the flags of the same name
  tokens = [\"...\"]               as --token, repeated
  max_connections = 10000        QUIC connections in all
  max_pending_handshakes = 1024  QUIC handshakes in progress at once
  handshake_rate_per_ip = 100    handshakes one source may start per second (bursts of twice that)
  max_unregistered_per_ip = 32   connections of one source that have not registered (yet)
  max_agents_per_ip = 5000       registered agents behind one source (a carrier-grade NAT)
  stun_rate_per_ip = 20          STUN answers per second per source (bursts of twice that)
  (a source is an IPv4 address or an IPv6 /64)
  relay_session_bytes = 4294967296   as --relay-session-bytes
  relay_session_rate = 100000000     as --relay-session-rate
  relay_rate_per_ip = 200000000      as --relay-rate-per-ip
  relay_idle_timeout = 600           as --relay-idle-timeout
  name_expiry_days = 365             as --name-expiry-days (default: names never expire)
  etcd = [\"http://...\"]            as --etcd (cluster mode)
  public_addr = \"host:7000\"          as --public-addr
  etcd_user, etcd_password         as --etcd-user, --etcd-password
  etcd_ca, etcd_cert, etcd_key      as --etcd-ca, --etcd-cert, --etcd-key

Logging: RUST_LOG (default: info), e.g. RUST_LOG=p2ptun_relay=debug.";

/// The p2ptun rendezvous server (S).
///
/// Agents register their names here and are introduced to each other so they can connect
/// directly, or relays their encrypted packets when they cannot. One UDP port carries QUIC
/// (the agents' control connections) and STUN; the same port on TCP carries QUIC for agents
/// whose UDP is blocked; a second UDP port answers STUN too, so agents can tell how their
/// NAT maps.
///
/// Flags override the configuration file; the file overrides the defaults.
#[derive(Debug, Parser)]
#[command(
    name = "p2ptun-relay",
    version,
    about,
    long_about,
    after_long_help = CONFIG_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Print completions or man pages instead of running S.
    #[command(subcommand)]
    pub doc: Option<p2ptun::gendoc::DocCommand>,

    /// A TOML configuration file (its keys are listed at the end of --help).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// UDP address for QUIC and STUN, and TCP address for QUIC over TCP; an IPv6 address
    /// accepts IPv4 as well [default: [::]:7000, IPv6 and IPv4; 0.0.0.0:7000 on a host
    /// without IPv6].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// UDP address of the second STUN responder [default: the listen IP, port + 1].
    #[arg(long, value_name = "ADDR")]
    pub stun_alt: Option<SocketAddr>,

    /// Directory for S's identity key and the names agents have claimed
    /// [default: ./p2ptun-relay-state].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// A token agents must present to register; repeat for several. Replaces the file's
    /// `tokens`. Without any, anyone may register.
    #[arg(
        long = "token",
        value_name = "T",
        env = "P2PTUN_RELAY_TOKEN",
        hide_env_values = true
    )]
    pub tokens: Vec<String>,

    /// PEM certificate chain to present instead of S's own self-made certificate.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve Prometheus metrics (/metrics) and a status page (/, /status.json) over HTTP on this
    /// address (e.g. 127.0.0.1:9100; it lists agents and their addresses: keep it private).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Bytes one relayed session may carry in all; 0 switches relaying off
    /// [default: 4294967296].
    #[arg(long, value_name = "BYTES")]
    pub relay_session_bytes: Option<u64>,

    /// Bytes per second one relayed session may carry [default: 100000000].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub relay_session_rate: Option<u64>,

    /// Bytes per second one source may send through the relay, over all its sessions
    /// [default: 200000000].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub relay_rate_per_ip: Option<u64>,

    /// Seconds without a relayed packet after which a session is closed (its agents are
    /// told and ask for a new one when they need it) [default: 600].
    #[arg(long, value_name = "SECS")]
    pub relay_idle_timeout: Option<u64>,

    /// Days a name may go unused (its owner not registered with it) before S gives it up
    /// for any key to claim; checked at start, hourly, and when another key claims it
    /// [default: names never expire].
    #[arg(long, value_name = "DAYS", value_parser = parse_days, allow_hyphen_values = true)]
    pub name_expiry_days: Option<u64>,

    /// Cluster mode: share names (and which S each agent is on) with the other S that use
    /// this etcd: its client URLs, repeated or separated by commas
    /// (http://10.0.0.5:2379,http://10.0.0.6:2379).
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// Cluster mode: the HOST:PORT agents reach this S at [default: --listen, when it is a
    /// specific address].
    #[arg(long, value_name = "HOST:PORT")]
    pub public_addr: Option<String>,

    /// Cluster mode, etcd with authentication on: the etcd user S logs in as (with
    /// --etcd-password).
    #[arg(long, value_name = "USER", env = "P2PTUN_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// The etcd user's password; better given in the environment than on the command line,
    /// where other users of the host can read it.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "P2PTUN_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,

    /// Cluster mode, https:// etcd URLs: the CA (PEM) that signed etcd's certificates
    /// [default: the system's roots].
    #[arg(long, value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,

    /// A client certificate chain (PEM) to present to etcd (its --client-cert-auth), with
    /// --etcd-key.
    #[arg(long, value_name = "PEM", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

/// A day count of at least 1; negative and zero ones get the same message as in the file.
fn parse_days(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(days) if days >= 1 => Ok(days),
        _ => Err(format!("must be {EXPIRY_DAYS}")),
    }
}

impl Cli {
    /// The configuration these flags ask for: the file's (if any), with flags on top.
    /// A [`Cli::doc`] subcommand is not looked at.
    pub fn into_config(self) -> Result<RelayConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut config = file.into_config()?;
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply(self, config: &mut RelayConfig) {
        if let Some(listen) = self.listen {
            config.listen = listen;
            config.ipv4_fallback = false;
        }
        if let Some(alt) = self.stun_alt {
            config.stun_alt = Some(alt);
        }
        if let Some(dir) = self.state_dir {
            config.state_dir = dir;
        }
        if !self.tokens.is_empty() {
            config.tokens = self.tokens;
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls = Some(TlsFiles { cert, key });
        }
        if let Some(metrics) = self.metrics {
            config.metrics = Some(metrics);
        }
        if let Some(bytes) = self.relay_session_bytes {
            config.relay.session_bytes = bytes;
        }
        if let Some(rate) = self.relay_session_rate {
            config.relay.session_rate = rate;
        }
        if let Some(rate) = self.relay_rate_per_ip {
            config.relay.rate_per_ip = rate;
        }
        if let Some(secs) = self.relay_idle_timeout {
            config.relay.idle_timeout = Duration::from_secs(secs);
        }
        if let Some(days) = self.name_expiry_days {
            config.name_expiry_days = Some(days);
        }
        if !self.etcd.is_empty() {
            config.etcd = self.etcd;
        }
        if let Some(addr) = self.public_addr {
            config.public_addr = Some(addr);
        }
        if let Some(user) = self.etcd_user {
            config.etcd_user = Some(user);
        }
        if let Some(password) = self.etcd_password {
            config.etcd_password = Some(password);
        }
        if let Some(ca) = self.etcd_ca {
            config.etcd_ca = Some(ca);
        }
        if let Some(cert) = self.etcd_cert {
            config.etcd_cert = Some(cert);
        }
        if let Some(key) = self.etcd_key {
            config.etcd_key = Some(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7100\"\ntokens = [\"from-file\"]\nmax_connections = 5\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "p2ptun-relay",
            "-c",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7200",
            "--token",
            "a",
            "--token",
            "b",
            "--relay-session-bytes",
            "0",
            "--relay-rate-per-ip",
            "5000",
        ])
        .unwrap();
        let config = cli.into_config().unwrap();
        assert_eq!(config.listen, "127.0.0.1:7200".parse().unwrap());
        assert!(!config.ipv4_fallback);
        assert_eq!(
            config.stun_alt_bind(),
            Some("127.0.0.1:7201".parse().unwrap())
        );
        assert_eq!(config.tokens, vec!["a", "b"]);
        assert_eq!(config.limits.max_connections, 5);
        assert_eq!(config.relay.session_bytes, 0);
        assert_eq!(config.relay.rate_per_ip, 5000);
        assert_eq!(config.relay.session_rate, 100_000_000);
    }

    #[test]
    fn the_relay_idle_timeout_flag_overrides_the_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "relay_idle_timeout = 60\n").unwrap();
        let from_file = Cli::try_parse_from(["p2ptun-relay", "-c", file.to_str().unwrap()])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(from_file.relay.idle_timeout, Duration::from_secs(60));
        let flagged = Cli::try_parse_from([
            "p2ptun-relay",
            "-c",
            file.to_str().unwrap(),
            "--relay-idle-timeout",
            "3",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(flagged.relay.idle_timeout, Duration::from_secs(3));
        assert_eq!(
            Cli::try_parse_from(["p2ptun-relay"])
                .unwrap()
                .into_config()
                .unwrap()
                .relay
                .idle_timeout,
            Duration::from_secs(600)
        );

        let err = Cli::try_parse_from(["p2ptun-relay", "--relay-idle-timeout", "0"])
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`relay_idle_timeout` must be at least 1 (second)"),
            "{err}"
        );
        for bad in ["-1", "10m", "1.5"] {
            let flag = format!("--relay-idle-timeout={bad}");
            let err = Cli::try_parse_from(["p2ptun-relay", flag.as_str()])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("invalid value") && err.contains("--relay-idle-timeout"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_name_expiry_flag_overrides_the_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "name_expiry_days = 30\n").unwrap();
        let config = |args: &[&str]| {
            let mut all = vec!["p2ptun-relay", "-c", file.to_str().unwrap()];
            all.extend(args);
            Cli::try_parse_from(all).map(|c| c.into_config().unwrap().name_expiry_days)
        };
        assert_eq!(config(&[]).unwrap(), Some(30));
        assert_eq!(config(&["--name-expiry-days", "7"]).unwrap(), Some(7));
        for bad in ["0", "-3", "1.5", "never"] {
            let err = config(&["--name-expiry-days", bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--name-expiry-days") && err.contains("at least 1"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn only_the_default_listen_address_falls_back_to_ipv4() {
        let default = Cli::try_parse_from(["p2ptun-relay"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(default.listen, "[::]:7000".parse().unwrap());
        assert!(default.ipv4_fallback);
        let given = Cli::try_parse_from(["p2ptun-relay", "--listen", "[::]:7000"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(given.listen, default.listen);
        assert!(!given.ipv4_fallback);
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        assert!(Cli::try_parse_from(["p2ptun-relay", "--tls-cert", "c.pem"]).is_err());
        let cli =
            Cli::try_parse_from(["p2ptun-relay", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
                .unwrap();
        assert!(cli.into_config().unwrap().tls.is_some());
    }
}
