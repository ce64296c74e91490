//! The per-peer path table: pure bookkeeping, no I/O, so path choice is unit-tested.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::proto::Fingerprint;

/// How packets reach a peer. Declared in order of preference: when several paths work, the
/// first kind wins, and among paths of one kind the lowest RTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// UDP straight to the peer (same LAN, or through punched NATs).
    DirectUdp,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathKind::DirectUdp => "direct UDP",
        })
    }
}

#[derive(Debug)]
struct Path {
    kind: PathKind,
    remote: SocketAddr,
    rtt: Option<Duration>,
    since: Instant,
}

#[derive(Debug)]
struct Peer {
    fingerprint: Fingerprint,
    paths: Vec<Path>,
    /// Index into `paths` of the one in use.
    selected: Option<usize>,
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
}

impl Peer {
    fn reselect(&mut self) {
        self.selected = self
            .paths
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| (p.kind, p.rtt.unwrap_or(Duration::MAX)))
            .map(|(i, _)| i);
    }
}

/// What status reports about one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's identity.
    pub fingerprint: Fingerprint,
    /// The path in use, if any.
    pub path: Option<PathStatus>,
    /// Every known path.
    pub paths: Vec<PathStatus>,
    /// Bytes sent to the peer (QUIC datagrams, all paths).
    pub tx_bytes: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
}

/// What status reports about one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathStatus {
    /// Its kind.
    pub kind: PathKind,
    /// The peer's address on it.
    pub remote: SocketAddr,
    /// The round-trip time measured when it was checked.
    pub rtt_ms: Option<f64>,
    /// Seconds since it was found.
    pub age_secs: u64,
}

/// Maps virtual peer addresses to real paths and back.
#[derive(Debug, Default)]
pub struct PathTable {
    peers: HashMap<SocketAddr, Peer>,
    by_fingerprint: HashMap<Fingerprint, SocketAddr>,
    by_remote: HashMap<SocketAddr, SocketAddr>,
    next_virtual: u32,
}

/// Virtual addresses are taken from 240.0.0.0/4 ("reserved for future use", never routed),
/// so one can never be confused with a real address.
fn is_virtual(addr: &SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V4(v4) if v4.octets()[0] & 0xf0 == 240)
}

/// Folds IPv4-mapped IPv6 addresses to IPv4, so one host has one spelling.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl PathTable {
    /// The virtual address of the peer with `fingerprint`, made on first use.
    pub fn peer(&mut self, fingerprint: Fingerprint) -> SocketAddr {
        if let Some(virt) = self.by_fingerprint.get(&fingerprint) {
            return *virt;
        }
        self.next_virtual = self.next_virtual.wrapping_add(1);
        let n = self.next_virtual;
        let ip = Ipv4Addr::new(240, (n >> 16) as u8, (n >> 8) as u8, n as u8);
        let virt = SocketAddr::new(ip.into(), 1);
        self.peers.insert(
            virt,
            Peer {
                fingerprint,
                paths: Vec::new(),
                selected: None,
                tx_bytes: AtomicU64::new(0),
                rx_bytes: AtomicU64::new(0),
            },
        );
        self.by_fingerprint.insert(fingerprint, virt);
        virt
    }

    /// Records a working path to the peer at `virt` (or refreshes its RTT) and reselects the
    /// best. A remote address belongs to one peer only: a newer claim takes it over.
    pub fn add_path(
        &mut self,
        virt: SocketAddr,
        kind: PathKind,
        remote: SocketAddr,
        rtt: Option<Duration>,
    ) {
        let remote = canonical(remote);
        if let Some(old) = self.by_remote.insert(remote, virt) {
            if old != virt {
                self.remove_path(old, remote);
            }
        }
        let Some(peer) = self.peers.get_mut(&virt) else {
            self.by_remote.remove(&remote);
            return;
        };
        match peer
            .paths
            .iter_mut()
            .find(|p| p.kind == kind && p.remote == remote)
        {
            Some(path) => path.rtt = rtt.or(path.rtt),
            None => peer.paths.push(Path {
                kind,
                remote,
                rtt,
                since: Instant::now(),
            }),
        }
        peer.reselect();
    }

    /// Forgets one path of a peer.
    pub fn remove_path(&mut self, virt: SocketAddr, remote: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&virt) {
            peer.paths.retain(|p| p.remote != remote);
            peer.reselect();
        }
        if self.by_remote.get(&remote) == Some(&virt) {
            self.by_remote.remove(&remote);
        }
    }

    /// Forgets a peer and all its paths.
    pub fn remove_peer(&mut self, virt: SocketAddr) {
        if let Some(peer) = self.peers.remove(&virt) {
            self.by_fingerprint.remove(&peer.fingerprint);
            for p in peer.paths {
                self.by_remote.remove(&p.remote);
            }
        }
    }

    /// Where a datagram for `dest` goes: `Some` real address for a virtual peer with a path,
    /// `None` for a virtual peer without one (the datagram is lost), and `dest` itself for a
    /// real address.
    pub fn route_out(&self, dest: SocketAddr, len: usize) -> Option<SocketAddr> {
        let dest = canonical(dest);
        if !is_virtual(&dest) {
            return Some(dest);
        }
        let peer = self.peers.get(&dest)?;
        let path = &peer.paths[peer.selected?];
        peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Some(path.remote)
    }

    /// The virtual address of the peer that a datagram from `src` belongs to, if any.
    pub fn route_in(&self, src: SocketAddr, len: usize) -> Option<SocketAddr> {
        let virt = self.by_remote.get(&canonical(src))?;
        if let Some(peer) = self.peers.get(virt) {
            peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        Some(*virt)
    }

    /// The identity of the peer at virtual address `virt`.
    pub fn fingerprint_of(&self, virt: SocketAddr) -> Option<Fingerprint> {
        self.peers.get(&canonical(virt)).map(|p| p.fingerprint)
    }

    /// The status of the peer at `virt`.
    pub fn status(&self, virt: SocketAddr) -> Option<PeerStatus> {
        let peer = self.peers.get(&canonical(virt))?;
        let now = Instant::now();
        let describe = |p: &Path| PathStatus {
            kind: p.kind,
            remote: p.remote,
            rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
            age_secs: now.duration_since(p.since).as_secs(),
        };
        Some(PeerStatus {
            fingerprint: peer.fingerprint,
            path: peer.selected.map(|i| describe(&peer.paths[i])),
            paths: peer.paths.iter().map(describe).collect(),
            tx_bytes: peer.tx_bytes.load(Ordering::Relaxed),
            rx_bytes: peer.rx_bytes.load(Ordering::Relaxed),
        })
    }

    /// The status of every peer.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        self.peers.keys().filter_map(|v| self.status(*v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn virtual_addresses_are_stable_and_distinct() {
        let mut t = PathTable::default();
        let a = t.peer(Fingerprint([1; 32]));
        let b = t.peer(Fingerprint([2; 32]));
        assert_ne!(a, b);
        assert_eq!(t.peer(Fingerprint([1; 32])), a);
        assert!(is_virtual(&a) && is_virtual(&b));
    }

    #[test]
    fn routes_both_ways_and_drops_without_a_path() {
        let mut t = PathTable::default();
        let v = t.peer(Fingerprint([1; 32]));
        assert_eq!(t.route_out(v, 100), None);
        let real = addr("198.51.100.4:5000");
        assert_eq!(t.route_out(real, 10), Some(real));
        t.add_path(v, PathKind::DirectUdp, real, None);
        assert_eq!(t.route_out(v, 100), Some(real));
        assert_eq!(t.route_in(real, 50), Some(v));
        assert_eq!(t.route_in(addr("[::ffff:198.51.100.4]:5000"), 50), Some(v));
        assert_eq!(t.route_in(addr("198.51.100.4:5001"), 50), None);
        let st = t.status(v).unwrap();
        assert_eq!((st.tx_bytes, st.rx_bytes), (100, 100));
    }

    #[test]
    fn prefers_the_lowest_rtt_and_falls_back_when_a_path_goes() {
        let mut t = PathTable::default();
        let v = t.peer(Fingerprint([1; 32]));
        let slow = addr("198.51.100.4:5000");
        let fast = addr("127.0.0.1:5000");
        t.add_path(
            v,
            PathKind::DirectUdp,
            slow,
            Some(Duration::from_millis(40)),
        );
        t.add_path(v, PathKind::DirectUdp, fast, Some(Duration::from_millis(1)));
        assert_eq!(t.route_out(v, 1), Some(fast));
        t.remove_path(v, fast);
        assert_eq!(t.route_out(v, 1), Some(slow));
        assert_eq!(t.route_in(fast, 1), None);
    }

    #[test]
    fn a_remote_address_belongs_to_one_peer() {
        let mut t = PathTable::default();
        let a = t.peer(Fingerprint([1; 32]));
        let b = t.peer(Fingerprint([2; 32]));
        let shared = addr("198.51.100.4:5000");
        t.add_path(a, PathKind::DirectUdp, shared, None);
        t.add_path(b, PathKind::DirectUdp, shared, None);
        assert_eq!(t.route_in(shared, 1), Some(b));
        assert_eq!(t.route_out(a, 1), None);
        t.remove_peer(b);
        assert_eq!(t.route_in(shared, 1), None);
        assert_eq!(t.fingerprint_of(b), None);
    }
}
