//! Gathering this agent's own candidate addresses.

use std::net::{IpAddr, SocketAddr};

use crate::proto::{Candidate, CandidateKind};

/// The host candidates of a socket bound at `local`: every address of every interface (of the
/// socket's family) with the socket's port, or just `local` when it is bound to one address.
///
/// Loopback is left out of a wildcard socket's candidates: offered to a peer on another
/// machine it would make that peer probe its own local ports. Agents on one machine still
/// find each other through their interface addresses, or bind to 127.0.0.1.
pub fn host_candidates(local: SocketAddr) -> Vec<Candidate> {
    let host = |ip: IpAddr| Candidate {
        kind: CandidateKind::Host,
        addr: SocketAddr::new(ip, local.port()),
    };
    if !local.ip().is_unspecified() {
        return vec![host(local.ip())];
    }
    let mut out: Vec<Candidate> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .filter(|ip| ip.is_ipv4() == local.is_ipv4() && !ip.is_loopback())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .map(host)
        .collect();
    out.sort_by_key(|c| c.addr);
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_bound_to_one_address_has_that_candidate_only() {
        let c = host_candidates("10.1.2.3:4000".parse().unwrap());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].addr, "10.1.2.3:4000".parse().unwrap());
    }

    #[test]
    fn a_wildcard_socket_lists_interfaces_with_its_port() {
        let c = host_candidates("0.0.0.0:4000".parse().unwrap());
        assert!(c.iter().all(|c| c.addr.port() == 4000 && c.addr.is_ipv4()));
        assert!(!c.iter().any(|c| c.addr.ip().is_loopback()));
    }
}
