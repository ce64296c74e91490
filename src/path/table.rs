//! The per-peer path table: pure bookkeeping, no I/O, so path choice is unit-tested.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::proto::Fingerprint;

/// How packets reach a peer. Declared in order of preference: when several paths work, the
/// first kind wins, and among paths of one kind the lowest RTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// UDP straight to the peer (same LAN, or through punched NATs).
    DirectUdp,
    /// A TCP connection straight to the peer (hole-punched), QUIC packets framed on it.
    DirectTcp,
    /// Through S, which cannot read the packets.
    Relay,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathKind::DirectUdp => "direct UDP",
            PathKind::DirectTcp => "direct TCP",
            PathKind::Relay => "relay",
        })
    }
}

/// Where a path's datagrams go.
#[derive(Debug)]
pub enum Sink {
    /// Out of the UDP socket, to the path's remote address.
    Udp,
    /// Into a channel drained by the task that owns the path (a TCP connection, or the
    /// control connection to S for the relay path). A full channel loses the datagram.
    Channel(mpsc::Sender<Bytes>),
}

/// What to do with one outgoing datagram.
#[derive(Debug)]
pub enum Route<'a> {
    /// Send it from the UDP socket to this address.
    Udp(SocketAddr),
    /// Hand it to this channel.
    Channel(&'a mpsc::Sender<Bytes>),
    /// No usable path: the datagram is lost (QUIC retransmits once there is one).
    Lost,
}

#[derive(Debug)]
struct Path {
    kind: PathKind,
    remote: SocketAddr,
    sink: Sink,
    rtt: Option<Duration>,
    since: Instant,
    live: bool,
}

#[derive(Debug)]
struct Peer {
    fingerprint: Option<Fingerprint>,
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
            .filter(|(_, p)| p.live)
            .min_by_key(|(_, p)| (p.kind, p.rtt.unwrap_or(Duration::MAX)))
            .map(|(i, _)| i);
    }

    fn selected_path(&self) -> Option<&Path> {
        self.selected.and_then(|i| self.paths.get(i))
    }
}

/// What status reports about one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's identity, if known (S's anonymous TCP clients have none).
    pub fingerprint: Option<Fingerprint>,
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
    /// Whether its last checks were answered.
    pub live: bool,
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
pub(crate) fn is_virtual(addr: &SocketAddr) -> bool {
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
        let virt = self.new_peer(Some(fingerprint));
        self.by_fingerprint.insert(fingerprint, virt);
        virt
    }

    /// A new virtual address for a peer whose identity is not known yet (a client of S
    /// that arrives over TCP).
    pub fn anonymous_peer(&mut self) -> SocketAddr {
        self.new_peer(None)
    }

    fn new_peer(&mut self, fingerprint: Option<Fingerprint>) -> SocketAddr {
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
        virt
    }

    /// Records a working direct UDP path to the peer at `virt` (or refreshes its RTT and
    /// marks it live) and reselects the best. A remote address belongs to one peer only: a
    /// newer claim takes it over.
    pub fn add_udp_path(&mut self, virt: SocketAddr, remote: SocketAddr, rtt: Option<Duration>) {
        let remote = canonical(remote);
        if let Some(old) = self.by_remote.insert(remote, virt) {
            if old != virt {
                self.remove_path(old, PathKind::DirectUdp, remote);
            }
        }
        if !self.peers.contains_key(&virt) {
            self.by_remote.remove(&remote);
            return;
        }
        self.upsert(virt, PathKind::DirectUdp, remote, Sink::Udp, rtt);
    }

    /// Records a path whose datagrams go into `sink` (TCP or relay); `remote` is what status
    /// shows (the peer's TCP address, or S's address).
    pub fn add_channel_path(
        &mut self,
        virt: SocketAddr,
        kind: PathKind,
        remote: SocketAddr,
        sink: mpsc::Sender<Bytes>,
        rtt: Option<Duration>,
    ) {
        self.upsert(virt, kind, canonical(remote), Sink::Channel(sink), rtt);
    }

    fn upsert(
        &mut self,
        virt: SocketAddr,
        kind: PathKind,
        remote: SocketAddr,
        sink: Sink,
        rtt: Option<Duration>,
    ) {
        let Some(peer) = self.peers.get_mut(&virt) else {
            return;
        };
        match peer
            .paths
            .iter_mut()
            .find(|p| p.kind == kind && p.remote == remote)
        {
            Some(path) => {
                path.rtt = rtt.or(path.rtt);
                path.sink = sink;
                if !path.live {
                    path.live = true;
                    path.since = Instant::now();
                }
            }
            None => peer.paths.push(Path {
                kind,
                remote,
                sink,
                rtt,
                since: Instant::now(),
                live: true,
            }),
        }
        peer.reselect();
    }

    /// Marks a path dead (its checks go unanswered) or live again, and reselects. Returns
    /// whether the peer's selected path changed.
    pub fn set_live(
        &mut self,
        virt: SocketAddr,
        kind: PathKind,
        remote: SocketAddr,
        live: bool,
    ) -> bool {
        let remote = canonical(remote);
        let Some(peer) = self.peers.get_mut(&virt) else {
            return false;
        };
        let before = peer.selected_path().map(|p| (p.kind, p.remote));
        if let Some(path) = peer
            .paths
            .iter_mut()
            .find(|p| p.kind == kind && p.remote == remote)
        {
            if path.live != live {
                path.live = live;
                path.since = Instant::now();
            }
        }
        peer.reselect();
        before != peer.selected_path().map(|p| (p.kind, p.remote))
    }

    /// Forgets one path of a peer.
    pub fn remove_path(&mut self, virt: SocketAddr, kind: PathKind, remote: SocketAddr) {
        let remote = canonical(remote);
        if let Some(peer) = self.peers.get_mut(&virt) {
            peer.paths
                .retain(|p| !(p.kind == kind && p.remote == remote));
            peer.reselect();
        }
        if kind == PathKind::DirectUdp && self.by_remote.get(&remote) == Some(&virt) {
            self.by_remote.remove(&remote);
        }
    }

    /// Forgets every path of a peer, keeping its virtual address.
    pub fn clear_paths(&mut self, virt: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&virt) {
            for p in peer.paths.drain(..) {
                if p.kind == PathKind::DirectUdp && self.by_remote.get(&p.remote) == Some(&virt) {
                    self.by_remote.remove(&p.remote);
                }
            }
            peer.selected = None;
        }
    }

    /// The path the peer at `virt` uses now: kind and remote address.
    pub fn selected(&self, virt: SocketAddr) -> Option<(PathKind, SocketAddr)> {
        let peer = self.peers.get(&canonical(virt))?;
        peer.selected_path().map(|p| (p.kind, p.remote))
    }

    /// Forgets a peer and all its paths.
    pub fn remove_peer(&mut self, virt: SocketAddr) {
        if let Some(peer) = self.peers.remove(&virt) {
            if let Some(fp) = peer.fingerprint {
                self.by_fingerprint.remove(&fp);
            }
            for p in peer.paths {
                if p.kind == PathKind::DirectUdp && self.by_remote.get(&p.remote) == Some(&virt) {
                    self.by_remote.remove(&p.remote);
                }
            }
        }
    }

    /// Where a datagram for `dest` goes: a virtual peer's selected path, or `dest` itself
    /// when it is a real address.
    pub fn route_out(&self, dest: SocketAddr, len: usize) -> Route<'_> {
        let dest = canonical(dest);
        if !is_virtual(&dest) {
            return Route::Udp(dest);
        }
        let Some(peer) = self.peers.get(&dest) else {
            return Route::Lost;
        };
        let Some(path) = peer.selected_path() else {
            return Route::Lost;
        };
        peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        match &path.sink {
            Sink::Udp => Route::Udp(path.remote),
            Sink::Channel(tx) => Route::Channel(tx),
        }
    }

    /// Counts `len` bytes received from the peer at `virt` on a channel path.
    pub fn count_in(&self, virt: SocketAddr, len: usize) {
        if let Some(peer) = self.peers.get(&virt) {
            peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
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
        self.peers.get(&canonical(virt)).and_then(|p| p.fingerprint)
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
            live: p.live,
        };
        Some(PeerStatus {
            fingerprint: peer.fingerprint,
            path: peer.selected_path().map(describe),
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

    fn udp(route: Route<'_>) -> Option<SocketAddr> {
        match route {
            Route::Udp(a) => Some(a),
            _ => None,
        }
    }

    #[test]
    fn virtual_addresses_are_stable_and_distinct() {
        let mut t = PathTable::default();
        let a = t.peer(Fingerprint([1; 32]));
        let b = t.peer(Fingerprint([2; 32]));
        let c = t.anonymous_peer();
        assert!(a != b && b != c && a != c);
        assert_eq!(t.peer(Fingerprint([1; 32])), a);
        assert!(is_virtual(&a) && is_virtual(&b) && is_virtual(&c));
        assert_eq!(t.fingerprint_of(c), None);
    }

    #[test]
    fn routes_both_ways_and_drops_without_a_path() {
        let mut t = PathTable::default();
        let v = t.peer(Fingerprint([1; 32]));
        assert!(matches!(t.route_out(v, 100), Route::Lost));
        let real = addr("198.51.100.4:5000");
        assert_eq!(udp(t.route_out(real, 10)), Some(real));
        t.add_udp_path(v, real, None);
        assert_eq!(udp(t.route_out(v, 100)), Some(real));
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
        t.add_udp_path(v, slow, Some(Duration::from_millis(40)));
        t.add_udp_path(v, fast, Some(Duration::from_millis(1)));
        assert_eq!(udp(t.route_out(v, 1)), Some(fast));
        t.remove_path(v, PathKind::DirectUdp, fast);
        assert_eq!(udp(t.route_out(v, 1)), Some(slow));
        assert_eq!(t.route_in(fast, 1), None);
    }

    #[test]
    fn kinds_rank_direct_udp_then_tcp_then_relay_and_dead_paths_are_skipped() {
        let mut t = PathTable::default();
        let v = t.peer(Fingerprint([1; 32]));
        let s = addr("203.0.113.1:7000");
        let (relay_tx, _relay_rx) = mpsc::channel(1);
        t.add_channel_path(
            v,
            PathKind::Relay,
            s,
            relay_tx,
            Some(Duration::from_millis(5)),
        );
        assert_eq!(t.selected(v), Some((PathKind::Relay, s)));
        let peer_tcp = addr("198.51.100.4:6000");
        let (tcp_tx, _tcp_rx) = mpsc::channel(1);
        t.add_channel_path(
            v,
            PathKind::DirectTcp,
            peer_tcp,
            tcp_tx,
            Some(Duration::from_millis(50)),
        );
        assert_eq!(t.selected(v), Some((PathKind::DirectTcp, peer_tcp)));
        let peer_udp = addr("198.51.100.4:5000");
        t.add_udp_path(v, peer_udp, Some(Duration::from_millis(60)));
        assert_eq!(t.selected(v), Some((PathKind::DirectUdp, peer_udp)));
        assert!(t.set_live(v, PathKind::DirectUdp, peer_udp, false));
        assert_eq!(t.selected(v), Some((PathKind::DirectTcp, peer_tcp)));
        assert!(matches!(t.route_out(v, 1), Route::Channel(_)));
        assert!(
            !t.status(v)
                .unwrap()
                .paths
                .iter()
                .find(|p| p.kind == PathKind::DirectUdp)
                .unwrap()
                .live
        );
        assert!(t.set_live(v, PathKind::DirectUdp, peer_udp, true));
        assert_eq!(t.selected(v), Some((PathKind::DirectUdp, peer_udp)));
        assert!(!t.set_live(v, PathKind::DirectUdp, peer_udp, true));
    }

    #[test]
    fn a_remote_address_belongs_to_one_peer() {
        let mut t = PathTable::default();
        let a = t.peer(Fingerprint([1; 32]));
        let b = t.peer(Fingerprint([2; 32]));
        let shared = addr("198.51.100.4:5000");
        t.add_udp_path(a, shared, None);
        t.add_udp_path(b, shared, None);
        assert_eq!(t.route_in(shared, 1), Some(b));
        assert!(matches!(t.route_out(a, 1), Route::Lost));
        t.remove_peer(b);
        assert_eq!(t.route_in(shared, 1), None);
        assert_eq!(t.fingerprint_of(b), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A path to add: its kind, RTT in ms (none when unmeasured) and whether it ends up
        /// live. Each gets an address of its own.
        fn paths() -> impl Strategy<Value = Vec<(PathKind, Option<u64>, bool)>> {
            let kind = prop_oneof![
                Just(PathKind::DirectUdp),
                Just(PathKind::DirectTcp),
                Just(PathKind::Relay)
            ];
            prop::collection::vec((kind, prop::option::of(0u64..500), any::<bool>()), 0..8)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Whatever the order paths come and go in, the selected one is live, and it is
            /// the best by kind (direct UDP, direct TCP, relay) and then by RTT.
            #[test]
            fn the_selected_path_is_the_best_live_one(
                (paths, order) in paths().prop_flat_map(|p| {
                    let n = p.len();
                    (Just(p), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
                })
            ) {
                let mut t = PathTable::default();
                let v = t.peer(Fingerprint([1; 32]));
                let mut keep = Vec::new();
                let remote = |i: usize| SocketAddr::from(([198, 51, 100, 4], 5000 + i as u16));
                for &i in &order {
                    let (kind, rtt, _) = paths[i];
                    let rtt = rtt.map(Duration::from_millis);
                    if kind == PathKind::DirectUdp {
                        t.add_udp_path(v, remote(i), rtt);
                    } else {
                        let (tx, rx) = mpsc::channel(1);
                        keep.push(rx);
                        t.add_channel_path(v, kind, remote(i), tx, rtt);
                    }
                }
                for &i in order.iter().rev() {
                    t.set_live(v, paths[i].0, remote(i), paths[i].2);
                }
                let rank = |i: usize| (paths[i].0, paths[i].1.map_or(Duration::MAX, Duration::from_millis));
                let best = (0..paths.len()).filter(|&i| paths[i].2).map(rank).min();
                let chosen = t.selected(v);
                prop_assert_eq!(chosen.is_some(), best.is_some());
                if let Some((kind, remote_addr)) = chosen {
                    let i = usize::from(remote_addr.port() - 5000);
                    prop_assert!(paths[i].2, "a dead path was chosen");
                    prop_assert_eq!(kind, paths[i].0);
                    prop_assert_eq!(Some(rank(i)), best);
                }
            }
        }
    }
}
