//! The protocol clients: ask for, renew and delete one mapping with UPnP IGD (`igd-next`),
//! NAT-PMP or PCP (`crab_nat`). Every exchange is bounded by [`PROTOCOL_TIMEOUT`]; the crates
//! parse the gateway's replies and report malformed ones as errors.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol, SearchOptions};

use super::gateway::Target;
use super::{Mapping, Protocol, Transport, LIFETIME, PROTOCOL_TIMEOUT};

/// Why a mapping could not be made, renewed or deleted.
#[derive(Debug, thiserror::Error)]
pub enum PortmapError {
    /// Nothing answered in time.
    #[error("{0}: no answer within {1:?}")]
    Timeout(Protocol, Duration),
    /// No UPnP gateway answered the SSDP search, or its description was unusable.
    #[error("UPnP: {0}")]
    UpnpSearch(#[from] igd_next::SearchError),
    /// The UPnP gateway refused or failed a request.
    #[error("UPnP: {0}")]
    Upnp(String),
    /// NAT-PMP or PCP failed (no answer, a refusal, or a malformed reply).
    #[error("{0}")]
    NatPmpPcp(#[from] crab_nat::MappingFailure),
    /// The gateway answered with an address this agent cannot use.
    #[error("{0}: unusable answer: {1}")]
    Unusable(Protocol, String),
    /// Port 0 cannot be mapped.
    #[error("cannot map port 0")]
    PortZero,
}

/// A granted mapping and what is needed to renew or delete it.
pub struct Lease {
    /// What was granted (the lifetime as of the last grant).
    pub mapping: Mapping,
    handle: Handle,
}

enum Handle {
    Upnp(Gateway<Tokio>),
    NatPmpPcp(PortMapping),
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("mapping", &self.mapping)
            .finish_non_exhaustive()
    }
}

/// NAT-PMP and PCP retransmit (RFC 6886 §3.1 doubles from 250 ms); bounded so that a silent
/// gateway costs well under [`PROTOCOL_TIMEOUT`].
const RETRIES: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_millis(1000)),
};

fn ip_protocol(t: Transport) -> InternetProtocol {
    match t {
        Transport::Udp => InternetProtocol::Udp,
        Transport::Tcp => InternetProtocol::Tcp,
    }
}

fn igd_protocol(t: Transport) -> PortMappingProtocol {
    match t {
        Transport::Udp => PortMappingProtocol::UDP,
        Transport::Tcp => PortMappingProtocol::TCP,
    }
}

/// Asks the gateway of `target` with `protocol` to forward `transport` traffic on a public
/// port (the same number as `port` when the gateway allows) to `target.local:port`.
pub async fn request(
    protocol: Protocol,
    target: Target,
    transport: Transport,
    port: u16,
) -> Result<Lease, PortmapError> {
    let port = NonZeroU16::new(port).ok_or(PortmapError::PortZero)?;
    let work = async {
        match protocol {
            Protocol::Upnp => request_upnp(target, transport, port).await,
            Protocol::NatPmp | Protocol::Pcp => {
                request_nat_pmp_pcp(protocol, target, transport, port).await
            }
        }
    };
    tokio::time::timeout(PROTOCOL_TIMEOUT, work)
        .await
        .map_err(|_| PortmapError::Timeout(protocol, PROTOCOL_TIMEOUT))?
}

fn lifetime_secs() -> u32 {
    u32::try_from(LIFETIME.as_secs()).unwrap_or(u32::MAX)
}

async fn request_nat_pmp_pcp(
    protocol: Protocol,
    target: Target,
    transport: Transport,
    port: NonZeroU16,
) -> Result<Lease, PortmapError> {
    let gateway = crab_nat::GatewayAddress::IpV4(target.gateway);
    let options = PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(lifetime_secs()),
        timeout_config: Some(RETRIES),
    };
    let proto = ip_protocol(transport);
    let (mapping, external_ip) = if protocol == Protocol::Pcp {
        let base =
            crab_nat::pcp::BaseMapRequest::new(gateway, IpAddr::V4(target.local), proto, port);
        let m = crab_nat::pcp::port_mapping(base, None, None, options)
            .await
            .map_err(crab_nat::MappingFailure::from)?;
        let ip = match m.mapping_type() {
            PortMappingType::Pcp { external_ip, .. } => external_ip,
            PortMappingType::NatPmp => {
                return Err(PortmapError::Unusable(protocol, "a NAT-PMP answer".into()))
            }
        };
        (m, ip)
    } else {
        // NAT-PMP's mapping answer has no address: a second request asks for it (§3.2).
        let m = crab_nat::natpmp::port_mapping(gateway, proto, port, options)
            .await
            .map_err(crab_nat::MappingFailure::from)?;
        let ip = crab_nat::natpmp::external_address(gateway, Some(RETRIES))
            .await
            .map_err(crab_nat::MappingFailure::from)?;
        (m, IpAddr::V4(ip))
    };
    usable_lifetime(protocol, mapping.lifetime())?;
    let external = usable_external(protocol, external_ip, mapping.external_port().get())?;
    Ok(Lease {
        mapping: Mapping {
            protocol,
            transport,
            internal: SocketAddr::from((target.local, port.get())),
            external,
            lifetime_secs: mapping.lifetime(),
        },
        handle: Handle::NatPmpPcp(mapping),
    })
}

/// A NAT-PMP or PCP grant of 0 seconds is no mapping (RFC 6886 §3.3 and RFC 6887 §15 use
/// lifetime 0 for deletion), and renewing one would ask the gateway to delete it: crab_nat
/// panics on that in debug builds and sends a deletion otherwise. Found by the `natpmp_pcp`
/// fuzz target.
fn usable_lifetime(protocol: Protocol, lifetime_secs: u32) -> Result<(), PortmapError> {
    if lifetime_secs == 0 {
        return Err(PortmapError::Unusable(protocol, "a lifetime of 0 s".into()));
    }
    Ok(())
}

/// An external address a peer can send to: IPv4, not unspecified, not loopback or
/// multicast (a confused or hostile gateway must not make peers probe odd places).
fn usable_external(protocol: Protocol, ip: IpAddr, port: u16) -> Result<SocketAddr, PortmapError> {
    match ip {
        IpAddr::V4(v4)
            if !v4.is_unspecified()
                && !v4.is_loopback()
                && !v4.is_multicast()
                && !v4.is_broadcast()
                && port != 0 =>
        {
            Ok(SocketAddr::from((v4, port)))
        }
        other => Err(PortmapError::Unusable(
            protocol,
            format!("external address {other}:{port}"),
        )),
    }
}

async fn request_upnp(
    target: Target,
    transport: Transport,
    port: NonZeroU16,
) -> Result<Lease, PortmapError> {
    // SSDP from the address the mapping is for, so the search leaves on the gateway's link.
    let mut options = SearchOptions::default();
    options.bind_addr = SocketAddr::from((target.local, 0));
    options.timeout = Some(PROTOCOL_TIMEOUT);
    options.single_search_timeout = Some(PROTOCOL_TIMEOUT);
    let gateway = igd_next::aio::tokio::search_gateway(options).await?;
    let ip = gateway
        .get_external_ip()
        .await
        .map_err(|e| PortmapError::Upnp(format!("no external address: {e}")))?;
    let local = SocketAddr::V4(SocketAddrV4::new(target.local, port.get()));
    let proto = igd_protocol(transport);
    let lease = lifetime_secs();
    // The same public port as the local one first (what peers and people expect), any port
    // if that one is taken.
    let external_port = match gateway
        .add_port(proto, port.get(), local, lease, DESCRIPTION)
        .await
    {
        Ok(()) => port.get(),
        Err(first) => gateway
            .add_any_port(proto, local, lease, DESCRIPTION)
            .await
            .map_err(|e| PortmapError::Upnp(format!("{first}; then {e}")))?,
    };
    let external = usable_external(Protocol::Upnp, ip, external_port)?;
    Ok(Lease {
        mapping: Mapping {
            protocol: Protocol::Upnp,
            transport,
            internal: local,
            external,
            lifetime_secs: lease,
        },
        handle: Handle::Upnp(gateway),
    })
}

/// What the gateway shows as the mapping's owner.
const DESCRIPTION: &str = "p2ptun";

impl Lease {
    /// Renews the mapping for another lifetime. The external address may change (a gateway
    /// that rebooted gives what it has); the caller republishes it.
    pub async fn renew(&mut self) -> Result<(), PortmapError> {
        let protocol = self.mapping.protocol;
        let work = async {
            match &mut self.handle {
                Handle::Upnp(gateway) => {
                    let local = self.mapping.internal;
                    gateway
                        .add_port(
                            igd_protocol(self.mapping.transport),
                            self.mapping.external.port(),
                            local,
                            lifetime_secs(),
                            DESCRIPTION,
                        )
                        .await
                        .map_err(|e| PortmapError::Upnp(e.to_string()))?;
                    self.mapping.lifetime_secs = lifetime_secs();
                }
                Handle::NatPmpPcp(m) => {
                    m.timeout_config = RETRIES;
                    m.renew().await?;
                    usable_lifetime(protocol, m.lifetime())?;
                    self.mapping.lifetime_secs = m.lifetime();
                    self.mapping.external =
                        SocketAddr::new(self.mapping.external.ip(), m.external_port().get());
                }
            }
            Ok(())
        };
        tokio::time::timeout(PROTOCOL_TIMEOUT, work)
            .await
            .map_err(|_| PortmapError::Timeout(protocol, PROTOCOL_TIMEOUT))?
    }

    /// Deletes the mapping on the gateway.
    pub async fn delete(self) -> Result<(), PortmapError> {
        let protocol = self.mapping.protocol;
        let work = async {
            match self.handle {
                Handle::Upnp(gateway) => gateway
                    .remove_port(
                        igd_protocol(self.mapping.transport),
                        self.mapping.external.port(),
                    )
                    .await
                    .map_err(|e| PortmapError::Upnp(e.to_string())),
                Handle::NatPmpPcp(m) => m.try_drop().await.map_err(|(e, _)| e.into()),
            }
        };
        tokio::time::timeout(PROTOCOL_TIMEOUT, work)
            .await
            .map_err(|_| PortmapError::Timeout(protocol, PROTOCOL_TIMEOUT))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_external_addresses_are_refused() {
        let ok = usable_external(Protocol::Pcp, "203.0.113.10".parse().unwrap(), 4000);
        assert_eq!(ok.unwrap(), "203.0.113.10:4000".parse().unwrap());
        for (ip, port) in [
            ("0.0.0.0", 4000),
            ("127.0.0.1", 4000),
            ("224.0.0.1", 4000),
            ("255.255.255.255", 4000),
            ("203.0.113.10", 0),
            ("2001:db8::1", 4000),
        ] {
            assert!(
                usable_external(Protocol::Upnp, ip.parse().unwrap(), port).is_err(),
                "{ip}:{port}"
            );
        }
    }

    /// The `natpmp_pcp` fuzz target's find: a PCP gateway granting 0 seconds made the renewal
    /// panic inside crab_nat (a deletion request). Such a grant is refused up front. A fake
    /// gateway on 127.0.0.1:5351 (PCP's port) answers the MAP request.
    #[tokio::test]
    async fn a_grant_of_zero_seconds_is_refused() {
        let Ok(gateway) = tokio::net::UdpSocket::bind("127.0.0.1:5351").await else {
            eprintln!("SKIPPED: 127.0.0.1:5351 is taken");
            return;
        };
        let answer = tokio::spawn(async move {
            let mut req = [0u8; 1100];
            let (n, from) = gateway.recv_from(&mut req).await.unwrap();
            assert!(n >= 60, "a PCP MAP request");
            // Version 2, MAP answer, success, lifetime 0, epoch 1000; the request's nonce;
            // UDP 4000 -> 4000 on 203.0.113.1.
            let mut map = vec![2, 129, 0, 0, 0, 0, 0, 0, 0, 0, 0x03, 0xe8];
            map.extend_from_slice(&[0; 12]);
            map.extend_from_slice(&req[24..36]);
            map.extend_from_slice(&[17, 0, 0, 0, 0x0f, 0xa0, 0x0f, 0xa0]);
            map.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 1]);
            gateway.send_to(&map, from).await.unwrap();
        });
        let target = Target {
            gateway: std::net::Ipv4Addr::LOCALHOST,
            local: std::net::Ipv4Addr::LOCALHOST,
        };
        let got = request(Protocol::Pcp, target, Transport::Udp, 4000).await;
        answer.await.unwrap();
        assert!(
            matches!(got, Err(PortmapError::Unusable(Protocol::Pcp, ref why)) if why.contains("lifetime")),
            "{got:?}"
        );
    }
}
