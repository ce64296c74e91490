//! `p2ptun netcheck`: what this network does to UDP, found with STUN against S's two
//! addresses (RFC 5780 §4.3 and §4.4). The classification is pure; [`run`] does the probing.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::router::StunRouter;
use crate::proto::{stun, NatMapping};

/// How a NAT chooses the public port for a new destination (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The agent's address is public: no NAT on the way.
    NoNat,
    /// One mapping for all destinations: punchable from anywhere ("easy").
    EndpointIndependent,
    /// A new mapping per destination ("symmetric", "hard").
    EndpointDependent,
    /// Only one of S's addresses answered, so it cannot be compared.
    Unknown,
}

/// Which inbound packets a NAT lets through a mapping (RFC 4787 §5), as far as S's two
/// addresses can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// From anyone ("full cone").
    EndpointIndependent,
    /// Not from another host; whether another port of the same host gets in would need a third
    /// address at S.
    AddressDependent,
    /// Not from another port of the same host ("port-restricted").
    AddressAndPortDependent,
    /// From another port of the same host; whether other hosts get in would need S's
    /// alternate address on a second IP.
    NotPortDependent,
    /// No probe could tell.
    Unknown,
}

/// What netcheck found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// S's IPv4 address probed; `None` when S has none this host knows.
    pub server: Option<SocketAddr>,
    /// Whether S answered STUN at all.
    pub udp: bool,
    /// The address S saw (the public mapping), if UDP works.
    pub public: Option<SocketAddr>,
    /// The mapping S's alternate address saw.
    pub public_alt: Option<SocketAddr>,
    /// S's alternate STUN address, as S named it (RFC 5780 OTHER-ADDRESS).
    pub server_alt: Option<SocketAddr>,
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Which port-mapping protocols the gateway answered, and the public address each mapped
    /// (filled in by the caller; empty when port mapping is off or the socket is loopback).
    pub portmap: Vec<crate::portmap::probe::ProbeResult>,
    /// What IPv6 does here (filled in by the caller; `None` when not probed).
    pub ipv6: Option<Ipv6Report>,
}

impl Report {
    /// The report when S has no IPv4 address this host can use: nothing measured.
    pub fn no_ipv4() -> Report {
        classify(&Observations::default())
    }
}

/// What netcheck found over IPv6. There is no mapping or filtering to classify: IPv6
/// networks seldom translate addresses, and a firewall's filtering is only seen by a peer's
/// check arriving (or not).
#[derive(Debug, Clone, Serialize)]
pub struct Ipv6Report {
    /// This host's IPv6 addresses a peer could reach (no link-local).
    pub addresses: Vec<SocketAddr>,
    /// S's IPv6 address probed; `None` when S has none this host knows.
    pub server: Option<SocketAddr>,
    /// The address S saw over IPv6, if S answered.
    pub public: Option<SocketAddr>,
    /// Whether that address is one of this host's own (no NAT66 on the way).
    pub no_nat: bool,
}

/// Probes S's IPv6 address `server` (if any) from `router`'s socket. `locals` are the
/// socket's own addresses.
pub async fn ipv6(
    router: &StunRouter,
    server: Option<SocketAddr>,
    locals: &[SocketAddr],
) -> Option<Ipv6Report> {
    let addresses: Vec<SocketAddr> = locals.iter().copied().filter(|a| a.is_ipv6()).collect();
    let public = match server {
        Some(server) if !addresses.is_empty() => router
            .binding(server, None, PROBE)
            .await
            .and_then(|r| stun::mapped_address(&r.msg)),
        _ => None,
    };
    Some(Ipv6Report {
        no_nat: public.is_some_and(|p| addresses.contains(&p)),
        addresses,
        server,
        public,
    })
}

impl std::fmt::Display for Ipv6Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.addresses.is_empty(), self.server, self.public) {
            (true, _, _) => writeln!(f, "IPv6:       no address on this host a peer could reach"),
            (false, None, _) => writeln!(
                f,
                "IPv6:       {} address(es) here; S has no IPv6 address this agent knows \
                 (give --server a name with an AAAA record)",
                self.addresses.len()
            ),
            (false, Some(s), None) => {
                writeln!(f, "IPv6:       S did not answer STUN at {s} (blocked?)")
            }
            (false, Some(_), Some(p)) if self.no_nat => {
                writeln!(f, "IPv6:       works, no NAT (public: {p})")
            }
            (false, Some(_), Some(p)) => {
                writeln!(f, "IPv6:       works, through NAT66 (public: {p})")
            }
        }
    }
}

/// What the probes returned.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observations {
    /// The mapping seen by S's primary address.
    pub primary: Option<SocketAddr>,
    /// The mapping seen by S's alternate address (from the same socket).
    pub alternate: Option<SocketAddr>,
    /// S's alternate address, if S named one.
    pub other: Option<SocketAddr>,
    /// Whether S's alternate address has another IP than the primary one.
    pub alternate_other_ip: bool,
    /// From a fresh socket that has sent only to the primary address: whether S's answer
    /// from its alternate address (CHANGE-REQUEST) got in. `None` when not probed.
    pub unsolicited_answer_arrived: Option<bool>,
    /// Whether the primary mapping is one of our own interface addresses.
    pub mapped_is_local: bool,
}

/// Classifies the observations.
pub fn classify(o: &Observations) -> Report {
    let Some(primary) = o.primary else {
        return Report {
            server: None,
            udp: false,
            public: None,
            public_alt: None,
            server_alt: o.other,
            mapping: Mapping::Unknown,
            filtering: Filtering::Unknown,
            portmap: Vec::new(),
            ipv6: None,
        };
    };
    let mapping = if o.mapped_is_local {
        Mapping::NoNat
    } else {
        match o.alternate {
            Some(alt) if alt == primary => Mapping::EndpointIndependent,
            Some(_) => Mapping::EndpointDependent,
            None => Mapping::Unknown,
        }
    };
    let filtering = match (o.unsolicited_answer_arrived, o.alternate_other_ip) {
        (None, _) => Filtering::Unknown,
        (Some(true), true) => Filtering::EndpointIndependent,
        (Some(true), false) => Filtering::NotPortDependent,
        (Some(false), true) => Filtering::AddressDependent,
        (Some(false), false) => Filtering::AddressAndPortDependent,
    };
    Report {
        server: None,
        udp: true,
        public: Some(primary),
        public_alt: o.alternate,
        server_alt: o.other,
        mapping,
        filtering,
        portmap: Vec::new(),
        ipv6: None,
    }
}

/// How long one STUN probe waits, retransmits included.
const PROBE: Duration = Duration::from_millis(1500);

/// Probes S's primary STUN address `server` and the alternate address it reports: the
/// mapping through `router`'s socket, the filtering through `fresh`, a socket that has sent
/// nothing yet (S's two addresses are all it has, so the filtering probe must not come from a
/// socket that has already opened its NAT toward the alternate address).
pub async fn run(
    router: &StunRouter,
    fresh: &StunRouter,
    server: SocketAddr,
    locals: &[SocketAddr],
) -> Report {
    let mut o = Observations::default();
    let Some(m) = mappings(router, server).await else {
        return Report {
            server: Some(server),
            ..classify(&o)
        };
    };
    o.primary = m.primary;
    o.mapped_is_local = o.primary.is_some_and(|p| locals.contains(&p));
    o.other = m.other;
    if let Some(alt) = m.other {
        o.alternate_other_ip = alt.ip() != server.ip();
        o.alternate = m.alternate;
        // The fresh socket opens its NAT toward the primary address only, then asks S to
        // answer from the alternate one.
        if fresh.binding(server, None, PROBE).await.is_some() {
            let changed = fresh.binding(server, Some((true, true)), PROBE).await;
            o.unsolicited_answer_arrived = Some(changed.is_some());
        }
    }
    Report {
        server: Some(server),
        ..classify(&o)
    }
}

/// The mappings of one socket toward S's two STUN addresses.
struct Mappings {
    /// Seen by S's main address.
    primary: Option<SocketAddr>,
    /// S's other address (RFC 5780 OTHER-ADDRESS), if it named one.
    other: Option<SocketAddr>,
    /// Seen by S's other address.
    alternate: Option<SocketAddr>,
}

/// Asks S's main address `server`, then the other address it names, where `router`'s socket
/// comes from. `None` when S's main address does not answer.
async fn mappings(router: &StunRouter, server: SocketAddr) -> Option<Mappings> {
    let first = router.binding(server, None, PROBE).await?;
    let other = stun::other_address(&first.msg);
    let alternate = match other {
        Some(alt) => router
            .binding(alt, None, PROBE)
            .await
            .and_then(|r| stun::mapped_address(&r.msg)),
        None => None,
    };
    Some(Mappings {
        primary: stun::mapped_address(&first.msg),
        other,
        alternate,
    })
}

/// How the NAT in front of `router`'s socket picks ports, for the punch (see
/// [`super::symmetric`]): the two mappings toward S's addresses compared. `locals` are the
/// socket's own addresses; a mapping equal to one of them means there is no NAT.
pub async fn nat_mapping(
    router: &StunRouter,
    server: SocketAddr,
    locals: &[SocketAddr],
) -> NatMapping {
    let Some(Mappings {
        primary: Some(primary),
        alternate,
        ..
    }) = mappings(router, server).await
    else {
        return NatMapping::Unknown;
    };
    super::symmetric::classify(primary, alternate, locals.contains(&primary))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server.is_none() {
            writeln!(f, "IPv4:       S has no IPv4 address this agent knows")?;
            return match &self.ipv6 {
                Some(v6) => write!(f, "{v6}"),
                None => Ok(()),
            };
        }
        if !self.udp {
            writeln!(f, "UDP:        blocked (S did not answer STUN over IPv4)")?;
            return match &self.ipv6 {
                Some(v6) => write!(f, "{v6}"),
                None => Ok(()),
            };
        }
        writeln!(f, "UDP:        works")?;
        if let Some(p) = self.public {
            writeln!(f, "public:     {p}")?;
        }
        let mapping: std::borrow::Cow<str> = match self.mapping {
            Mapping::NoNat => "none (this address is public)".into(),
            Mapping::EndpointIndependent => {
                "endpoint-independent (same port for every destination: punchable)".into()
            }
            Mapping::EndpointDependent => {
                "endpoint-dependent (a new port per destination: a 'symmetric' NAT)".into()
            }
            Mapping::Unknown => match self.server_alt {
                Some(alt) => format!("unknown (S's alternate address {alt} did not answer)").into(),
                None => "unknown (S named no alternate STUN address to compare with)".into(),
            },
        };
        writeln!(f, "mapping:    {mapping}")?;
        let filtering = match self.filtering {
            Filtering::EndpointIndependent => {
                "endpoint-independent (anyone may send in: 'full cone')"
            }
            Filtering::AddressDependent => "address-dependent or stricter (only hosts we sent to)",
            Filtering::AddressAndPortDependent => {
                "address-and-port-dependent (only the exact address we sent to)"
            }
            Filtering::NotPortDependent => {
                "not port-dependent (other ports of a host we sent to get in)"
            }
            Filtering::Unknown => "unknown",
        };
        writeln!(f, "filtering:  {filtering}")?;
        if let Some(v6) = &self.ipv6 {
            write!(f, "{v6}")?;
        }
        for p in &self.portmap {
            match (p.answered, p.external, &p.error) {
                (true, Some(ext), _) => writeln!(
                    f,
                    "{:<11} mapped {ext} ({} ms)",
                    format!("{}:", p.protocol),
                    p.ms
                )?,
                (_, _, err) => writeln!(
                    f,
                    "{:<11} no ({})",
                    format!("{}:", p.protocol),
                    err.as_deref().unwrap_or("no answer")
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn classifies_the_rfc_5780_outcomes() {
        let base = Observations {
            primary: addr("203.0.113.9:4000"),
            alternate: addr("203.0.113.9:4000"),
            alternate_other_ip: true,
            unsolicited_answer_arrived: Some(false),
            ..Default::default()
        };
        let r = classify(&base);
        assert_eq!(
            (r.mapping, r.filtering),
            (Mapping::EndpointIndependent, Filtering::AddressDependent)
        );

        let cone = Observations {
            unsolicited_answer_arrived: Some(true),
            ..base
        };
        assert_eq!(classify(&cone).filtering, Filtering::EndpointIndependent);

        let one_ip = Observations {
            alternate_other_ip: false,
            ..base
        };
        assert_eq!(
            classify(&one_ip).filtering,
            Filtering::AddressAndPortDependent
        );
        let one_ip_open = Observations {
            unsolicited_answer_arrived: Some(true),
            ..one_ip
        };
        assert_eq!(
            classify(&one_ip_open).filtering,
            Filtering::NotPortDependent
        );

        let hard = Observations {
            alternate: addr("203.0.113.9:5123"),
            ..base
        };
        assert_eq!(classify(&hard).mapping, Mapping::EndpointDependent);

        let public = Observations {
            mapped_is_local: true,
            ..base
        };
        assert_eq!(classify(&public).mapping, Mapping::NoNat);

        let unprobed = Observations {
            unsolicited_answer_arrived: None,
            alternate: None,
            ..base
        };
        let r = classify(&unprobed);
        assert_eq!(
            (r.mapping, r.filtering),
            (Mapping::Unknown, Filtering::Unknown)
        );

        // What `run` reports when S's IPv4 address does not answer, and when S has none.
        let blocked = Report {
            server: Some("203.0.113.1:7000".parse().unwrap()),
            ..classify(&Observations::default())
        };
        assert!(!blocked.udp);
        assert!(blocked.to_string().contains("blocked"));
        let no_ipv4 = Report::no_ipv4().to_string();
        assert!(no_ipv4.contains("no IPv4 address"), "{no_ipv4}");
    }
}
