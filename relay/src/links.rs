//! Control connections carried on TCP: which virtual address stands for which TCP peer.
//!
//! An agent whose UDP is blocked reaches S over TCP ([`crate::tcp`]). Its QUIC packets reach
//! S's endpoint through the [`p2ptun::path::PathSocket`] as if they came from a virtual
//! address (240.0.0.0/4, never routed), so `remote_address()` of such a connection says
//! nothing about the agent. This table says what does: the TCP peer's address (the agent's
//! observed address, its source for limits) and the local address it reached. It also holds
//! the link's share of the connection limits until the QUIC connection takes it over, and
//! lets either side learn when the other has ended.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use p2ptun::path::canonical;
use tokio::sync::Notify;

use crate::limits::ConnSlot;

/// Whether `addr` is a virtual address (240.0.0.0/4), as the path table hands out.
pub fn is_virtual(addr: SocketAddr) -> bool {
    matches!(canonical(addr).ip(), IpAddr::V4(v4) if v4.octets()[0] & 0xf0 == 240)
}

struct Link {
    peer: SocketAddr,
    local: SocketAddr,
    /// The link's connection slot, until its QUIC connection claims it.
    slot: Option<ConnSlot>,
    quic_ended: Arc<Notify>,
    tcp_ended: Arc<Notify>,
}

/// What the TCP side of a link keeps, to learn when the QUIC connection has ended and to
/// tell it when the TCP connection has.
#[derive(Debug)]
pub struct LinkSignals {
    /// Notified once the link's QUIC connection has ended (or failed its handshake).
    pub quic_ended: Arc<Notify>,
    /// To notify when the TCP connection has ended.
    pub tcp_ended: Arc<Notify>,
}

/// A link's QUIC connection: where it really comes from, and how to learn that its TCP
/// connection has ended. Dropping it tells the TCP side that the QUIC connection is over.
#[derive(Debug)]
pub struct TcpLink {
    /// The TCP peer: the agent's address as S sees it.
    pub peer: SocketAddr,
    /// S's address the TCP connection reached.
    pub local: SocketAddr,
    /// Notified once the TCP connection has ended.
    pub tcp_ended: Arc<Notify>,
    quic_ended: Arc<Notify>,
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        // notify_one keeps a permit when nobody waits yet, so the signal is never lost.
        self.quic_ended.notify_one();
    }
}

/// The first QUIC connection on a link takes the link's slot and this description.
#[derive(Debug)]
pub struct Claim {
    /// The connection slot taken when the TCP connection was accepted.
    pub slot: ConnSlot,
    /// The link.
    pub link: TcpLink,
}

/// Every open TCP link, by virtual address.
#[derive(Default)]
pub struct Links {
    links: Mutex<HashMap<SocketAddr, Link>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").field("open", &self.len()).finish()
    }
}

impl Links {
    fn links(&self) -> MutexGuard<'_, HashMap<SocketAddr, Link>> {
        // Every update is one map operation; a panic cannot leave it half done.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a link from `peer` to S's `local` address, carried at virtual address `virt`
    /// and holding `slot`.
    pub fn insert(
        &self,
        virt: SocketAddr,
        peer: SocketAddr,
        local: SocketAddr,
        slot: ConnSlot,
    ) -> LinkSignals {
        let quic_ended = Arc::new(Notify::new());
        let tcp_ended = Arc::new(Notify::new());
        self.links().insert(
            canonical(virt),
            Link {
                peer: canonical(peer),
                local: canonical(local),
                slot: Some(slot),
                quic_ended: Arc::clone(&quic_ended),
                tcp_ended: Arc::clone(&tcp_ended),
            },
        );
        LinkSignals {
            quic_ended,
            tcp_ended,
        }
    }

    /// Hands the link at `virt` to a QUIC connection arriving from it. `None` if there is no
    /// such link, or a connection has claimed it already: one link carries one connection,
    /// or a single TCP connection could hold many QUIC connections past the limits.
    pub fn claim(&self, virt: SocketAddr) -> Option<Claim> {
        let mut links = self.links();
        let link = links.get_mut(&canonical(virt))?;
        let slot = link.slot.take()?;
        Some(Claim {
            slot,
            link: TcpLink {
                peer: link.peer,
                local: link.local,
                tcp_ended: Arc::clone(&link.tcp_ended),
                quic_ended: Arc::clone(&link.quic_ended),
            },
        })
    }

    /// Whether a QUIC connection has claimed the link at `virt`.
    pub fn is_claimed(&self, virt: SocketAddr) -> bool {
        self.links()
            .get(&canonical(virt))
            .is_some_and(|l| l.slot.is_none())
    }

    /// Forgets the link at `virt` (giving back its slot if no connection took it).
    pub fn remove(&self, virt: SocketAddr) {
        self.links().remove(&canonical(virt));
    }

    /// Links open.
    pub fn len(&self) -> usize {
        self.links().len()
    }

    /// Whether no link is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Limits;
    use crate::limits::{Admission, ConnLimits};

    fn slot(limits: &Arc<ConnLimits>) -> ConnSlot {
        match limits.admit("192.0.2.1".parse().unwrap(), true) {
            Admission::Accept(slot) => slot,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    #[test]
    fn virtual_addresses_are_told_apart() {
        assert!(is_virtual("240.0.0.1:1".parse().unwrap()));
        assert!(is_virtual("[::ffff:240.1.2.3]:1".parse().unwrap()));
        assert!(is_virtual("255.0.0.1:1".parse().unwrap()));
        assert!(!is_virtual("127.0.0.1:7000".parse().unwrap()));
        assert!(!is_virtual("[2001:db8::1]:7000".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_link_is_claimed_once_and_signals_both_ways() {
        let limits = ConnLimits::new(Limits::default());
        let links = Links::default();
        let virt: SocketAddr = "240.0.0.7:1".parse().unwrap();
        let peer: SocketAddr = "198.51.100.4:50000".parse().unwrap();
        let local: SocketAddr = "203.0.113.1:7000".parse().unwrap();
        let signals = links.insert(virt, peer, local, slot(&limits));
        assert_eq!(limits.total(), 1);
        assert!(!links.is_claimed(virt));
        assert!(links.claim("240.0.0.8:1".parse().unwrap()).is_none());

        // The IPv4-mapped spelling of the virtual address finds the same link.
        let claim = links
            .claim("[::ffff:240.0.0.7]:1".parse().unwrap())
            .unwrap();
        assert_eq!((claim.link.peer, claim.link.local), (peer, local));
        assert!(links.is_claimed(virt));
        assert!(
            links.claim(virt).is_none(),
            "a second connection on one link"
        );

        signals.tcp_ended.notify_one();
        tokio::time::timeout(Duration::from_secs(1), claim.link.tcp_ended.notified())
            .await
            .expect("the QUIC side learns the TCP connection ended");
        let Claim { slot, link } = claim;
        drop(link);
        tokio::time::timeout(Duration::from_secs(1), signals.quic_ended.notified())
            .await
            .expect("the TCP side learns the QUIC connection ended");

        // The slot now belongs to the connection, not the link.
        links.remove(virt);
        assert!(links.is_empty());
        assert_eq!(limits.total(), 1);
        drop(slot);
        assert_eq!(limits.total(), 0);
    }

    #[test]
    fn an_unclaimed_link_gives_its_slot_back() {
        let limits = ConnLimits::new(Limits::default());
        let links = Links::default();
        let virt: SocketAddr = "240.0.0.7:1".parse().unwrap();
        let _signals = links.insert(
            virt,
            "198.51.100.4:1".parse().unwrap(),
            "203.0.113.1:7000".parse().unwrap(),
            slot(&limits),
        );
        assert_eq!((links.len(), limits.total()), (1, 1));
        links.remove(virt);
        assert_eq!((links.len(), limits.total()), (0, 0));
    }
}
