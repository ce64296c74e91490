//! Port mapping: asking the gateway (the NAT router in front of this agent) to forward a
//! public port to the agent's UDP socket and TCP punching port, with UPnP IGD, NAT-PMP
//! (RFC 6886) or PCP (RFC 6887).
//!
//! A granted mapping is a candidate of its own (`PortMapped`, `TcpPortMapped`): a peer that
//! sends to it reaches the agent even behind an endpoint-dependent ("hard") NAT, whose
//! server-reflexive port is useless to the peer. This module owns the choice of protocols
//! ([`Mode`]), the lease schedule ([`renew_in`]), what a mapping is ([`Mapping`]), finding
//! the gateway ([`gateway`]), the protocol clients ([`client`], on the `igd-next` and
//! `crab_nat` crates) and the agent's background keeper ([`keeper`]: obtain, renew, delete on
//! exit). Nothing here delays registration or punching: mappings arrive when they arrive.
//!
//! The punch needs no special order for a mapped candidate. The mapping is a DNAT rule for
//! inbound packets only; an endpoint-dependent NAT still gives the agent's own early check to
//! a peer P a random public port, and the peer's later check to the mapped port needs, after
//! DNAT, the reply tuple of that entry. Linux (what miniupnpd runs on) resolves the clash by
//! giving the inbound connection another source port: the agent sees the peer at a port that
//! exists only in the router's conntrack, answers there, and its answers and checks leave
//! from the mapped port to the peer's real one. `tests/portmap.rs` checks exactly this
//! (`the_mapped_host_sending_first_does_not_block_the_mapping`); a NAT that dropped the
//! clashing packet instead would leave only the checks that happen to arrive first.

pub mod client;
pub mod gateway;
pub mod keeper;
pub mod probe;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{Lease, PortmapError};
pub use keeper::Keeper;

/// A port-mapping protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// UPnP Internet Gateway Device (SSDP discovery, then SOAP over HTTP).
    Upnp,
    /// NAT Port Mapping Protocol, RFC 6886 (UDP 5351 on the gateway).
    NatPmp,
    /// Port Control Protocol, RFC 6887 (UDP 5351 on the gateway).
    Pcp,
}

impl Protocol {
    /// Every protocol, in the order [`Mode::Auto`] tries them.
    pub const ALL: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

    /// The name the CLI, config and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Upnp => "upnp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Pcp => "pcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Upnp => "UPnP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Pcp => "PCP",
        })
    }
}

/// Which protocols the agent may use (`--portmap`, config key `portmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// PCP, then NAT-PMP, then UPnP IGD: the first that grants a mapping.
    #[default]
    Auto,
    /// UPnP IGD only.
    Upnp,
    /// NAT-PMP only.
    NatPmp,
    /// PCP only.
    Pcp,
    /// No port mapping.
    Off,
}

impl Mode {
    /// The protocols to try, in order.
    pub fn protocols(self) -> &'static [Protocol] {
        match self {
            Mode::Auto => &Protocol::ALL,
            Mode::Upnp => &[Protocol::Upnp],
            Mode::NatPmp => &[Protocol::NatPmp],
            Mode::Pcp => &[Protocol::Pcp],
            Mode::Off => &[],
        }
    }

    /// Parses the names the CLI and config take (`auto`, `upnp`, `nat-pmp`, `pcp`, `off`).
    pub fn from_name(s: &str) -> Option<Mode> {
        <Mode as clap::ValueEnum>::from_str(s, true).ok()
    }
}

impl<'de> Deserialize<'de> for Mode {
    /// `portmap = "auto" | "upnp" | "nat-pmp" | "pcp" | "off"`, or `true` (auto) / `false`
    /// (off).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Mode::Auto),
            Raw::Bool(false) => Ok(Mode::Off),
            Raw::Name(s) => Mode::from_name(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "'{s}' is not a port-mapping mode: auto, upnp, nat-pmp, pcp or off"
                ))
            }),
        }
    }
}

/// What is mapped: the UDP socket or the TCP punching port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The agent's UDP socket (QUIC and connectivity checks).
    Udp,
    /// The TCP punching port.
    Tcp,
}

/// A mapping the gateway granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Which protocol granted it.
    pub protocol: Protocol,
    /// UDP or TCP.
    pub transport: Transport,
    /// The agent's own address it forwards to.
    pub internal: SocketAddr,
    /// The public address peers send to.
    pub external: SocketAddr,
    /// How long the gateway grants it for, from the last grant or renewal.
    pub lifetime_secs: u32,
}

impl Mapping {
    /// The candidate a peer is told about.
    pub fn candidate(&self) -> crate::proto::Candidate {
        use crate::proto::CandidateKind;
        crate::proto::Candidate {
            kind: match self.transport {
                Transport::Udp => CandidateKind::PortMapped,
                Transport::Tcp => CandidateKind::TcpPortMapped,
            },
            addr: self.external,
        }
    }
}

/// The lease asked for. RFC 6886 §3.3 recommends two hours; the gateway may grant less.
pub const LIFETIME: Duration = Duration::from_secs(7200);

/// How long one protocol may take to answer before the next is tried. A gateway on the LAN
/// answers in milliseconds; without one, nothing should wait long.
pub const PROTOCOL_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest time between renewals, whatever lifetime the gateway grants (a gateway granting
/// seconds must not make the agent spin).
pub const MIN_RENEW: Duration = Duration::from_secs(30);

/// When to renew a lease of `lifetime`: at half of it (RFC 6886 §3.3 suggests renewing well
/// before expiry, and half leaves room for a lost request and a retry), never sooner than
/// [`MIN_RENEW`] unless the lease itself is shorter than that.
pub fn renew_in(lifetime: Duration) -> Duration {
    let half = lifetime / 2;
    if half >= MIN_RENEW {
        half
    } else {
        // A very short lease: renew at half anyway, or it lapses; at least a second.
        half.max(Duration::from_secs(1))
    }
}

/// After a failed renewal, when to try again: a quarter of what is left of the lease, at
/// least 5 s, so several tries fit before it lapses.
pub fn retry_in(left: Duration) -> Duration {
    (left / 4).max(Duration::from_secs(5))
}

/// Whether an agent whose socket is bound at `local` should map ports at all.
///
/// Not for a loopback socket: no gateway can forward to it, and asking would send SSDP
/// multicast and NAT-PMP to the machine's real gateway on behalf of a purely local agent
/// (which is what the tests run on the host do). IPv4 only, like the agent's socket.
pub fn applies_to(local: SocketAddr) -> bool {
    local.is_ipv4() && !local.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_list_their_protocols() {
        assert_eq!(Mode::from_name("nat-pmp"), Some(Mode::NatPmp));
        assert_eq!(Mode::from_name("PCP"), Some(Mode::Pcp));
        assert_eq!(Mode::from_name("upnp"), Some(Mode::Upnp));
        assert_eq!(Mode::from_name("nope"), None);
        assert_eq!(Mode::Auto.protocols().len(), 3);
        assert!(Mode::Off.protocols().is_empty());
        assert_eq!(Mode::Pcp.protocols(), &[Protocol::Pcp]);
    }

    #[test]
    fn the_config_takes_names_and_booleans() {
        #[derive(Deserialize)]
        struct C {
            portmap: Mode,
        }
        let m = |s: &str| toml::from_str::<C>(s).map(|c| c.portmap);
        assert_eq!(m("portmap = false").unwrap(), Mode::Off);
        assert_eq!(m("portmap = true").unwrap(), Mode::Auto);
        assert_eq!(m("portmap = \"nat-pmp\"").unwrap(), Mode::NatPmp);
        let err = m("portmap = \"x\"").unwrap_err().to_string();
        assert!(err.contains("not a port-mapping mode"), "{err}");
        assert!(m("portmap = 3").is_err());
    }

    #[test]
    fn leases_are_renewed_at_half_and_never_in_a_spin() {
        let s = Duration::from_secs;
        assert_eq!(renew_in(s(7200)), s(3600));
        assert_eq!(renew_in(s(120)), s(60));
        assert_eq!(renew_in(s(10)), s(5));
        assert_eq!(renew_in(s(0)), s(1));
        assert_eq!(retry_in(s(3600)), s(900));
        assert_eq!(retry_in(s(4)), s(5));
    }

    #[test]
    fn loopback_sockets_are_never_mapped() {
        assert!(!applies_to("127.0.0.1:4000".parse().unwrap()));
        assert!(!applies_to("[::1]:4000".parse().unwrap()));
        assert!(applies_to("0.0.0.0:0".parse().unwrap()));
        assert!(applies_to("10.1.0.2:4000".parse().unwrap()));
    }

    #[test]
    fn mappings_become_candidates_of_their_transport() {
        let m = Mapping {
            protocol: Protocol::Pcp,
            transport: Transport::Tcp,
            internal: "10.1.0.2:4000".parse().unwrap(),
            external: "203.0.113.10:4000".parse().unwrap(),
            lifetime_secs: 7200,
        };
        let c = m.candidate();
        assert!(c.kind.is_tcp());
        assert_eq!(c.addr, m.external);
    }
}
