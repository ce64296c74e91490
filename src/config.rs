//! The agent's configuration: the TOML file `p2ptun up` reads, the parsing of the address
//! forms both the file and the command line accept, and the defaults.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::agent::{AgentOptions, ExposeSpec, ForwardSpec, Protocol};
use crate::proto::{validate_name, Fingerprint, MAX_NAMES_PER_AGENT};
use crate::tunnel::flow::FlowLimits;

/// The longest idle timeout a UDP service may have: a day.
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 86_400;

/// The most flows a UDP service may allow: each is a QUIC stream, and a peer connection
/// takes 16,384 at once, which its TCP streams share.
pub const MAX_FLOWS: u64 = 8192;

/// S's address when none is given: a relay on this machine, as the README's demo runs it.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7000";

/// The agent's config file (`p2ptun up -c FILE`). See `config.example.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// S as `HOST:PORT`.
    pub server: Option<String>,
    /// The token S requires.
    pub token: Option<String>,
    /// S's expected key fingerprint.
    pub server_fingerprint: Option<Fingerprint>,
    /// Where identity and pins are kept.
    pub state_dir: Option<PathBuf>,
    /// The UDP socket's address.
    pub bind: Option<SocketAddr>,
    /// Port mapping: `"auto"`, `"upnp"`, `"nat-pmp"`, `"pcp"`, `"off"`, or a boolean.
    pub portmap: Option<crate::portmap::Mode>,
    /// Services to expose.
    #[serde(default)]
    pub expose: Vec<ExposeEntry>,
    /// Ports to forward.
    #[serde(default)]
    pub forward: Vec<ForwardEntry>,
}

/// One `[[expose]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeEntry {
    /// The name.
    pub name: String,
    /// `PORT` or `HOST:PORT` of the local service.
    pub local: String,
    /// Fingerprints allowed to use it.
    #[serde(default)]
    pub allow: Vec<Fingerprint>,
    /// `"tcp"` (the default) or `"udp"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// UDP only: seconds without a datagram after which a flow ends.
    pub idle_timeout_secs: Option<u64>,
    /// UDP only: the most flows open at once.
    pub max_flows: Option<u64>,
}

/// One `[[forward]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardEntry {
    /// The name to reach.
    pub name: String,
    /// `PORT` or `IP:PORT` to listen on.
    pub local: String,
    /// `"tcp"` (the default) or `"udp"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// UDP only: seconds without a datagram after which a flow ends.
    pub idle_timeout_secs: Option<u64>,
    /// UDP only: the most flows open at once.
    pub max_flows: Option<u64>,
}

/// Settings that flags and environment variables give, overriding the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--server`.
    pub server: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--server-fingerprint`.
    pub server_fingerprint: Option<Fingerprint>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--bind`.
    pub bind: Option<SocketAddr>,
    /// `--portmap` / `--no-portmap`.
    pub portmap: Option<crate::portmap::Mode>,
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses config text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// The agent options this file describes, with `over` taking precedence.
    pub fn into_options(mut self, over: Overrides) -> anyhow::Result<AgentOptions> {
        let mut exposes = Vec::new();
        for (i, e) in std::mem::take(&mut self.expose).into_iter().enumerate() {
            let at = || format!("expose #{} ('{}')", i + 1, e.name);
            validate_name(&e.name)
                .map_err(anyhow::Error::msg)
                .with_context(at)?;
            if exposes.iter().any(|x: &ExposeSpec| x.name == e.name) {
                bail!("{}: the name is exposed twice", at());
            }
            let local = parse_target(&e.local)
                .map_err(anyhow::Error::msg)
                .with_context(at)?;
            let flows =
                flow_limits(e.protocol, e.idle_timeout_secs, e.max_flows).with_context(at)?;
            exposes.push(ExposeSpec {
                name: e.name,
                local,
                allow: e.allow,
                protocol: e.protocol,
                flows,
            });
        }
        let mut forwards = Vec::new();
        for (i, f) in std::mem::take(&mut self.forward).into_iter().enumerate() {
            let at = || format!("forward #{} ('{}')", i + 1, f.name);
            validate_name(&f.name)
                .map_err(anyhow::Error::msg)
                .with_context(at)?;
            let bind = parse_bind(&f.local)
                .map_err(anyhow::Error::msg)
                .with_context(at)?;
            let flows =
                flow_limits(f.protocol, f.idle_timeout_secs, f.max_flows).with_context(at)?;
            if bind.port() != 0
                && forwards
                    .iter()
                    .any(|x: &ForwardSpec| x.bind == bind && x.protocol == f.protocol)
            {
                bail!("{}: {} {bind} is used by another forward", at(), f.protocol);
            }
            forwards.push(ForwardSpec {
                name: f.name,
                bind,
                protocol: f.protocol,
                flows,
            });
        }
        if exposes.is_empty() && forwards.is_empty() {
            bail!("nothing to do: add at least one [[expose]] or [[forward]] table");
        }
        // Refused here, where the user can act on it: S would refuse the registration, and
        // the agent would keep asking.
        if exposes.len() > MAX_NAMES_PER_AGENT {
            bail!(
                "{} [[expose]] tables: one agent may expose at most {MAX_NAMES_PER_AGENT} \
                 names; run another agent (its own --state-dir) for the rest",
                exposes.len()
            );
        }
        Ok(AgentOptions {
            exposes,
            forwards,
            ..self.connection_options(over)?
        })
    }

    /// The options for talking to S and nothing else (`p2ptun release`, and `p2ptun ping`
    /// when no agent runs): this file's S, token, state and socket, with `over` taking
    /// precedence, and no services.
    pub fn connection_options(self, over: Overrides) -> anyhow::Result<AgentOptions> {
        let server = over
            .server
            .or(self.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        parse_servers(&server).map_err(anyhow::Error::msg)?;
        Ok(AgentOptions {
            server,
            token: over.token.or(self.token),
            server_fingerprint: over.server_fingerprint.or(self.server_fingerprint),
            state_dir: over
                .state_dir
                .or(self.state_dir)
                .unwrap_or_else(default_state_dir),
            bind: over
                .bind
                .or(self.bind)
                .unwrap_or(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)),
            exposes: Vec::new(),
            forwards: Vec::new(),
            portmap: over.portmap.or(self.portmap).unwrap_or_default(),
        })
    }
}

/// The flow settings of a service of `protocol`: the defaults, or what the file says (which
/// only a UDP service may say).
fn flow_limits(
    protocol: Protocol,
    idle_timeout_secs: Option<u64>,
    max_flows: Option<u64>,
) -> anyhow::Result<FlowLimits> {
    if protocol == Protocol::Tcp {
        for (key, set) in [
            ("idle_timeout_secs", idle_timeout_secs.is_some()),
            ("max_flows", max_flows.is_some()),
        ] {
            if set {
                bail!("{key} applies to UDP services only; add protocol = \"udp\" or remove it");
            }
        }
    }
    let mut limits = FlowLimits::default();
    if let Some(secs) = idle_timeout_secs {
        if !(1..=MAX_IDLE_TIMEOUT_SECS).contains(&secs) {
            bail!("idle_timeout_secs = {secs}: give 1 to {MAX_IDLE_TIMEOUT_SECS} seconds");
        }
        limits.idle_timeout = std::time::Duration::from_secs(secs);
    }
    if let Some(max) = max_flows {
        if !(1..=MAX_FLOWS).contains(&max) {
            bail!("max_flows = {max}: give 1 to {MAX_FLOWS}");
        }
        limits.max_flows = max;
    }
    Ok(limits)
}

/// Where state lives by default: `$XDG_STATE_HOME/p2ptun`, else `~/.local/state/p2ptun`, else
/// `.p2ptun` in the working directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("p2ptun");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/p2ptun");
    }
    PathBuf::from(".p2ptun")
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("'{s}' is not a port number (1-65535) in {what}"))
}

/// A local service address: `PORT` (on 127.0.0.1) or `HOST:PORT`.
pub fn parse_target(s: &str) -> Result<String, String> {
    let s = s.trim();
    let what = "a local service address (PORT or HOST:PORT)";
    if !s.contains(':') {
        let port = parse_port(s, what)?;
        if port == 0 {
            return Err(format!("port 0 is not a service port in {what}"));
        }
        return Ok(format!("127.0.0.1:{port}"));
    }
    parse_server(s).map(|_| s.to_owned())
}

/// One or more `HOST:PORT` addresses of S, separated by commas (the S of one cluster); each
/// checked as [`parse_server`] checks it.
pub fn parse_servers(s: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if list.is_empty() {
        return Err(format!(
            "'{s}' names no server; expected HOST:PORT[,HOST:PORT...]"
        ));
    }
    for addr in &list {
        parse_server(addr)?;
    }
    Ok(list)
}

/// A `HOST:PORT` address (names are resolved later).
pub fn parse_server(s: &str) -> Result<(), String> {
    let what = "HOST:PORT";
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not {what}"))?;
    if host.is_empty() {
        return Err(format!("'{s}' has no host; expected {what}"));
    }
    if parse_port(port, what)? == 0 {
        return Err(format!("'{s}' has port 0; expected {what}"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_err()
        && !bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("'{host}' is not a host name or IP address"));
    }
    Ok(())
}

/// A local listening address: `PORT` (on 127.0.0.1) or `IP:PORT`. Port 0 picks a free port.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let what = "a local listen address (PORT or IP:PORT)";
    if !s.contains(':') {
        let port = parse_port(s, what)?;
        return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    }
    s.parse().map_err(|_| format!("'{s}' is not {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_forms() {
        assert_eq!(parse_target("22").unwrap(), "127.0.0.1:22");
        assert_eq!(parse_target("example.lan:22").unwrap(), "example.lan:22");
        assert_eq!(parse_target("[::1]:22").unwrap(), "[::1]:22");
        for bad in ["", "0", "99999", "abc", "host:", ":22", "a b:22", "host:0"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_bind("2222").unwrap(),
            "127.0.0.1:2222".parse().unwrap()
        );
        assert_eq!(
            parse_bind("0.0.0.0:2222").unwrap(),
            "0.0.0.0:2222".parse().unwrap()
        );
        for bad in ["99999", "localhost:22", "x"] {
            assert!(parse_bind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn several_servers_are_a_comma_list_each_checked() {
        assert_eq!(
            parse_servers("s1.example.net:7000, [2001:db8::1]:7000,").unwrap(),
            ["s1.example.net:7000", "[2001:db8::1]:7000"]
        );
        assert_eq!(parse_servers("127.0.0.1:7000").unwrap(), ["127.0.0.1:7000"]);
        let err = parse_servers("s1.example.net:7000,s2.example.net").unwrap_err();
        assert!(err.contains("'s2.example.net' is not HOST:PORT"), "{err}");
        assert!(parse_servers(" , ")
            .unwrap_err()
            .contains("names no server"));
    }

    #[test]
    fn a_full_file_parses_and_flags_win() {
        let text = r#"
            server = "relay.example.com:7000"
            token = "t1"
            [[expose]]
            name = "home"
            local = "22"
            [[forward]]
            name = "web"
            local = "0.0.0.0:8080"
        "#;
        let over = Overrides {
            token: Some("t2".into()),
            ..Default::default()
        };
        let opts = ConfigFile::parse(text).unwrap().into_options(over).unwrap();
        assert_eq!(opts.server, "relay.example.com:7000");
        assert_eq!(opts.token.as_deref(), Some("t2"));
        assert_eq!(opts.exposes[0].local, "127.0.0.1:22");
        assert_eq!(opts.forwards[0].bind, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(opts.forwards[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn udp_services_take_flow_settings() {
        let text = r#"
            [[expose]]
            name = "dns"
            local = "53"
            protocol = "udp"
            idle_timeout_secs = 5
            [[forward]]
            name = "dns"
            local = "5353"
            protocol = "udp"
            max_flows = 10
            [[forward]]
            name = "web"
            local = "5353"
        "#;
        let opts = ConfigFile::parse(text)
            .unwrap()
            .into_options(Overrides::default())
            .unwrap();
        assert_eq!(opts.exposes[0].protocol, Protocol::Udp);
        assert_eq!(
            opts.exposes[0].flows.idle_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(
            opts.exposes[0].flows.max_flows,
            FlowLimits::DEFAULT_MAX_FLOWS
        );
        assert_eq!(opts.forwards[0].flows.max_flows, 10);
        // TCP and UDP on one port number are two forwards.
        assert_eq!(opts.forwards[1].protocol, Protocol::Tcp);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            (
                "servr = \"x:1\"\n[[forward]]\nname=\"a\"\nlocal=\"1\"",
                "servr",
            ),
            (
                "[[expose]]\nname = \"Bad Name\"\nlocal = \"22\"",
                "lowercase",
            ),
            ("[[expose]]\nlocal = \"22\"", "name"),
            ("[[forward]]\nname = \"a\"\nlocal = \"99999\"", "99999"),
            (
                "[[expose]]\nname=\"a\"\nlocal=\"22\"\nallow=[\"nope\"]",
                "SHA256",
            ),
            ("", "nothing to do"),
            (
                "[[expose]]\nname=\"a\"\nlocal=\"1\"\n[[expose]]\nname=\"a\"\nlocal=\"2\"",
                "twice",
            ),
            (
                "server = \"nohost\"\n[[forward]]\nname=\"a\"\nlocal=\"1\"",
                "nohost",
            ),
            (
                "[[forward]]\nname=\"a\"\nlocal=\"1\"\nprotocol=\"sctp\"",
                "sctp",
            ),
            (
                "[[forward]]\nname=\"a\"\nlocal=\"1\"\nmax_flows=3",
                "UDP services only",
            ),
            (
                "[[expose]]\nname=\"a\"\nlocal=\"1\"\nprotocol=\"udp\"\nidle_timeout_secs=0",
                "idle_timeout_secs = 0",
            ),
            (
                "[[forward]]\nname=\"a\"\nlocal=\"1\"\nprotocol=\"udp\"\nmax_flows=100000",
                "max_flows = 100000",
            ),
            (
                "[[forward]]\nname=\"a\"\nlocal=\"1\"\nprotocol=\"udp\"\n\
                 [[forward]]\nname=\"b\"\nlocal=\"1\"\nprotocol=\"udp\"",
                "udp 127.0.0.1:1 is used by another forward",
            ),
        ];
        let too_many: String = (0..=MAX_NAMES_PER_AGENT)
            .map(|i| format!("[[expose]]\nname=\"s{i}\"\nlocal=\"{}\"\n", 1000 + i))
            .collect();
        let cases = cases
            .into_iter()
            .chain([(too_many.as_str(), "at most 64 names")]);
        for (text, needle) in cases {
            let err = ConfigFile::parse(text)
                .and_then(|c| c.into_options(Overrides::default()))
                .unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }
}
