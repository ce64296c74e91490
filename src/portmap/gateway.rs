//! Finding the gateway to ask: the default route's next hop (NAT-PMP and PCP are sent there,
//! RFC 6886 §3) and this host's address toward it (PCP's client address, and where a mapping
//! must point when the agent's socket is bound to the wildcard address).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Where port-mapping requests go and for which local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// This host's address on the gateway's link.
    pub local: Ipv4Addr,
}

/// Why no gateway was found.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The routing table could not be read.
    #[error("cannot read the routing table: {0}")]
    Read(#[from] std::io::Error),
    /// No IPv4 default route with a next hop.
    #[error("no IPv4 default route with a gateway")]
    NoDefaultRoute,
}

/// The gateway of the first IPv4 default route in a Linux `/proc/net/route` table.
///
/// Each line after the header is `Iface Destination Gateway Flags ...`, with addresses as
/// 8 hex digits: the address's bytes read as one number in the host's byte order. Lines that do not parse are skipped: the file is the
/// kernel's, but nothing here may panic on odd input.
pub fn parse_route_table(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    text.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_iface, dest, gw, flags) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let dest = u32::from_str_radix(dest, 16).ok()?;
        let gw = u32::from_str_radix(gw, 16).ok()?;
        let flags = u32::from_str_radix(flags, 16).ok()?;
        let usable = dest == 0 && gw != 0 && flags & RTF_UP != 0 && flags & RTF_GATEWAY != 0;
        // The kernel prints the address's bytes, in memory (network) order, as one native
        // u32: the native bytes of that number are the address.
        usable.then(|| Ipv4Addr::from(gw.to_ne_bytes()))
    })
}

/// The default gateway from `/proc/net/route`.
pub fn default_gateway() -> Result<Ipv4Addr, GatewayError> {
    let text = std::fs::read_to_string("/proc/net/route")?;
    parse_route_table(&text).ok_or(GatewayError::NoDefaultRoute)
}

/// The gateway, and the local address to map for a socket bound at `bound`: its own address
/// if it has one, else the address the kernel would send from toward the gateway (learnt by
/// connecting a UDP socket, which sends nothing).
pub fn target(bound: IpAddr) -> Result<Target, GatewayError> {
    let gateway = default_gateway()?;
    let local = match bound {
        IpAddr::V4(ip) if !ip.is_unspecified() => ip,
        _ => {
            let probe = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
            probe.connect(SocketAddr::from((gateway, crab_nat::GATEWAY_PORT)))?;
            match probe.local_addr()?.ip() {
                IpAddr::V4(ip) => ip,
                IpAddr::V6(_) => return Err(GatewayError::NoDefaultRoute),
            }
        }
    };
    Ok(Target { gateway, local })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0
";

    #[test]
    #[cfg(target_endian = "little")] // The table above is a little-endian host's.
    fn the_default_route_gives_the_gateway() {
        assert_eq!(parse_route_table(TABLE), Some(Ipv4Addr::new(10, 1, 0, 1)));
    }

    #[test]
    fn tables_without_a_default_route_or_with_garbage_give_none() {
        assert_eq!(parse_route_table(""), None);
        assert_eq!(parse_route_table("header only\n"), None);
        assert_eq!(
            parse_route_table("h\neth0 0000010A 00000000 0001\nbad line\neth0 zz yy 3\n"),
            None
        );
        // A default route that is down, or without a gateway flag, does not count.
        assert_eq!(parse_route_table("h\neth0 00000000 0100010A 0002\n"), None);
        assert_eq!(parse_route_table("h\neth0 00000000 0100010A 0001\n"), None);
    }
}
