//! Gathering this agent's own candidate addresses.

use std::net::{IpAddr, SocketAddr};

use crate::proto::{Candidate, CandidateKind};

/// The address families a socket can send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    /// IPv4 (on an IPv6 socket: as IPv4-mapped addresses).
    pub v4: bool,
    /// IPv6.
    pub v6: bool,
}

impl Families {
    /// IPv4 only.
    pub const V4: Families = Families {
        v4: true,
        v6: false,
    };

    /// The families of a socket bound at `local`: an IPv4 socket reaches IPv4; an IPv6
    /// socket bound to the unspecified address is dual-stack (the agent binds it so); one
    /// bound to an IPv6 address reaches IPv6, or IPv4 if the address is IPv4-mapped.
    pub fn of(local: SocketAddr) -> Families {
        match local {
            SocketAddr::V4(_) => Families::V4,
            SocketAddr::V6(v6) if v6.ip().is_unspecified() => Families { v4: true, v6: true },
            SocketAddr::V6(v6) => {
                let mapped = v6.ip().to_ipv4_mapped().is_some();
                Families {
                    v4: mapped,
                    v6: !mapped,
                }
            }
        }
    }

    /// Whether `addr` is of one of these families.
    pub fn allows(self, addr: SocketAddr) -> bool {
        let addr = crate::path::canonical(addr);
        if addr.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// The IPv4 side of a socket bound at `local`: a dual-stack socket's (`[::]:PORT`) is
/// `0.0.0.0:PORT`; any other address is its own. What is IPv4 only (TCP punching, birthday
/// sockets, port mapping) binds there.
pub fn ipv4_side(local: SocketAddr) -> SocketAddr {
    match local {
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, v6.port()))
        }
        other => other,
    }
}

/// Whether `ip` is an IPv6 link-local address: meaningless to a peer, which cannot name
/// the interface it belongs to.
pub fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// Whether `ip` is worth offering a peer on another machine: not loopback, unspecified or
/// multicast, and for IPv6 not link-local (it needs an interface index the peer cannot
/// know) nor IPv4-mapped.
pub fn offerable(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => !is_link_local(ip) && v6.to_ipv4_mapped().is_none(),
    }
}

/// The host candidates of a socket bound at `local`: every address of every interface (of
/// the socket's families, see [`Families::of`]) with the socket's port, or just `local`
/// when it is bound to one address.
///
/// Loopback is left out of a wildcard socket's candidates: offered to a peer on another
/// machine it would make that peer probe its own local ports. Agents on one machine still
/// find each other through their interface addresses, or bind to 127.0.0.1.
///
/// IPv6 privacy (temporary) addresses are offered beside the stable ones: the interface
/// list does not tell them apart, and either reaches this socket. When they rotate, the
/// agent's links see the change of local addresses and check again.
pub fn host_candidates(local: SocketAddr) -> Vec<Candidate> {
    let host = |ip: IpAddr| Candidate {
        kind: CandidateKind::Host,
        addr: SocketAddr::new(ip, local.port()),
    };
    if !local.ip().is_unspecified() {
        return vec![host(local.ip().to_canonical())];
    }
    let families = Families::of(local);
    let mut out: Vec<Candidate> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .filter(|ip| offerable(*ip))
        .map(host)
        .filter(|c| families.allows(c.addr))
        .collect();
    out.sort_by_key(|c| c.addr);
    out.dedup();
    out
}

/// `a` and `b` in turn: a[0], b[0], a[1], b[1], …, then the rest of the longer. How two
/// kinds of address are offered or tried without one kind crowding out the other.
pub fn interleave<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_takes_turns_then_the_rest() {
        assert_eq!(interleave(vec![1, 3, 5, 7], vec![2, 4]), [1, 2, 3, 4, 5, 7]);
        assert_eq!(interleave(Vec::<u8>::new(), vec![9]), [9]);
    }

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

    #[test]
    fn a_dual_stack_socket_lists_both_families_but_no_link_local() {
        let c = host_candidates("[::]:4000".parse().unwrap());
        assert!(c
            .iter()
            .all(|c| c.addr.port() == 4000 && offerable(c.addr.ip())));
        let v4 = host_candidates("0.0.0.0:4000".parse().unwrap());
        assert!(v4.iter().all(|x| c.contains(x)), "{v4:?} within {c:?}");
    }

    #[test]
    fn families_follow_the_bound_address() {
        let of = |a: &str| Families::of(a.parse().unwrap());
        assert_eq!(of("0.0.0.0:1"), Families::V4);
        assert_eq!(of("[::]:1"), Families { v4: true, v6: true });
        assert_eq!(
            of("[2001:db8::1]:1"),
            Families {
                v4: false,
                v6: true
            }
        );
        assert_eq!(of("[::ffff:192.0.2.1]:1"), Families::V4);
        let v4 = Families::V4;
        assert!(v4.allows("[::ffff:192.0.2.1]:1".parse().unwrap()));
        assert!(!v4.allows("[2001:db8::1]:1".parse().unwrap()));
    }

    #[test]
    fn link_local_loopback_and_mapped_are_not_offered() {
        for bad in [
            "fe80::1",
            "::1",
            "127.0.0.1",
            "::ffff:192.0.2.1",
            "ff02::1",
            "::",
        ] {
            assert!(!offerable(bad.parse().unwrap()), "{bad}");
        }
        for good in ["2001:db8::1", "fd00::1", "192.0.2.1", "10.0.0.1"] {
            assert!(offerable(good.parse().unwrap()), "{good}");
        }
    }
}
