//! UDP flows over a peer connection: how a UDP service's datagrams ride QUIC DATAGRAM frames
//! (RFC 9221), and the one loop that moves them between a local UDP endpoint and the tunnel.
//!
//! A *flow* is one local client of a forwarded UDP port, keyed by the client's address, and
//! at the exposer one UDP socket of its own toward the service. The forwarder opens a flow
//! with a bidirectional stream whose header is [`super::header::encode_flow`]; the exposer
//! answers with the single byte [`FLOW_OPEN`] once its socket is ready, or resets the stream
//! with one of [`super::header::codes`]. After that the stream carries nothing: it *is* the
//! flow's lifetime. A side ends the flow by finishing its half (its idle timer) or by
//! dropping it, and the other side sees the end and stops too.
//!
//! Each datagram carries the flow stream's ID as a QUIC variable-length integer (RFC 9000
//! §16), then one UDP payload, whole. Stream IDs are unique in a connection and already say
//! which side opened them, so flows need no numbering of their own (HTTP/3 datagrams,
//! RFC 9297, tie datagrams to streams the same way). Datagrams are unreliable and never
//! wait behind a lost packet; a payload larger than the connection can carry in one
//! datagram is dropped and counted, never cut.
//!
//! [`Demux`] reads a connection's datagrams (one reader per connection, whichever side
//! opened it) and hands each to its flow; [`run`] is the loop of one flow; [`FlowStats`]
//! counts what a service's flows did, for status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendDatagramError, SendStream};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The exposer's answer on a flow's stream: the flow is open.
pub const FLOW_OPEN: u8 = 0;

/// Datagrams from the tunnel (or, at the forwarder, from the local client) waiting for one
/// flow's loop; more are dropped and counted, as a full socket buffer would drop them.
pub const FLOW_QUEUE: usize = 256;

/// The most datagrams a flow moves one way before it looks at the other way again.
const DRAIN: usize = 64;

/// The largest UDP payload: what an IPv4 UDP datagram can hold.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// How a UDP service's flows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// A flow with no datagram either way for this long ends (its socket is closed).
    pub idle_timeout: Duration,
    /// The most flows open at once: per forward at the forwarder (more clients' datagrams
    /// are dropped), per service at the exposer (more flows are refused).
    pub max_flows: u64,
}

impl FlowLimits {
    /// The idle timeout when none is configured: as long as Linux's conntrack keeps a UDP
    /// stream that has seen replies (120 s) would be too long for a forward holding a
    /// socket per client; a minute keeps DNS and game clients alike.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
    /// The flow cap when none is configured.
    pub const DEFAULT_MAX_FLOWS: u64 = 1024;
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            idle_timeout: Self::DEFAULT_IDLE,
            max_flows: Self::DEFAULT_MAX_FLOWS,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framing

/// Bytes a QUIC variable-length integer of `v` takes; `None` above 2^62 - 1.
pub fn varint_len(v: u64) -> Option<usize> {
    match v {
        0..=0x3f => Some(1),
        0x40..=0x3fff => Some(2),
        0x4000..=0x3fff_ffff => Some(4),
        0x4000_0000..=0x3fff_ffff_ffff_ffff => Some(8),
        _ => None,
    }
}

/// A datagram of flow `id` carrying `payload`; `None` if `id` is no QUIC varint (stream IDs
/// always are).
pub fn frame(id: u64, payload: &[u8]) -> Option<Bytes> {
    let len = varint_len(id)?;
    let mut out = BytesMut::with_capacity(len + payload.len());
    match len {
        1 => out.put_u8(id as u8),
        2 => out.put_u16(0x4000 | id as u16),
        4 => out.put_u32(0x8000_0000 | id as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | id),
    }
    out.put_slice(payload);
    Some(out.freeze())
}

/// The flow ID and payload of a datagram; `None` if it is too short for its ID.
pub fn unframe(mut datagram: Bytes) -> Option<(u64, Bytes)> {
    let first = *datagram.first()?;
    let len = 1usize << (first >> 6);
    if datagram.len() < len {
        return None;
    }
    let mut id = u64::from(first & 0x3f);
    for b in &datagram[1..len] {
        id = (id << 8) | u64::from(*b);
    }
    Some((id, datagram.split_off(len)))
}

// ---------------------------------------------------------------------------------------------
// Counters

/// What the flows of one service did, counted as it happens.
#[derive(Debug, Default)]
pub struct FlowStats {
    open: AtomicU64,
    total: AtomicU64,
    from_local: AtomicU64,
    from_local_bytes: AtomicU64,
    to_tunnel: AtomicU64,
    from_tunnel: AtomicU64,
    to_local: AtomicU64,
    to_local_bytes: AtomicU64,
    too_large: AtomicU64,
    dropped_in: AtomicU64,
    dropped_out: AtomicU64,
}

/// A snapshot of [`FlowStats`], as status reports it. Over a loss-free run, the datagrams
/// one agent sent into the tunnel are the ones its peer received from it; the difference is
/// what the path lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowCounts {
    /// Flows open now.
    pub open: u64,
    /// Flows since start.
    pub total: u64,
    /// Datagrams received from local UDP clients (forwarder) or the service (exposer).
    pub from_local: u64,
    /// Their bytes.
    pub from_local_bytes: u64,
    /// Datagrams sent into the tunnel.
    pub to_tunnel: u64,
    /// Datagrams received from the tunnel.
    pub from_tunnel: u64,
    /// Datagrams sent to local clients or the service.
    pub to_local: u64,
    /// Their bytes.
    pub to_local_bytes: u64,
    /// Datagrams from the local side dropped because the tunnel could not carry them whole.
    pub too_large: u64,
    /// Datagrams from the local side dropped for another reason: no flow could be opened,
    /// or more were open than allowed, or a flow's queue was full, or the send failed.
    /// At rest, `from_local` = `to_tunnel` + `too_large` + `dropped_in`.
    pub dropped_in: u64,
    /// Datagrams from the tunnel dropped: a flow's queue was full, or the local send
    /// failed. At rest, `from_tunnel` = `to_local` + `dropped_out`.
    pub dropped_out: u64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl FlowStats {
    /// The counters now.
    pub fn counts(&self) -> FlowCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FlowCounts {
            open: get(&self.open),
            total: get(&self.total),
            from_local: get(&self.from_local),
            from_local_bytes: get(&self.from_local_bytes),
            to_tunnel: get(&self.to_tunnel),
            from_tunnel: get(&self.from_tunnel),
            to_local: get(&self.to_local),
            to_local_bytes: get(&self.to_local_bytes),
            too_large: get(&self.too_large),
            dropped_in: get(&self.dropped_in),
            dropped_out: get(&self.dropped_out),
        }
    }

    /// Counts a new flow as open until the guard is dropped, unless `max` are open already.
    pub fn try_open(self: &Arc<Self>, max: u64) -> Option<OpenFlow> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        if before >= max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        bump(&self.total, 1);
        Some(OpenFlow(self.clone()))
    }

    /// Counts a new flow as open until the guard is dropped, with no cap (the forward caps
    /// its flows by the clients it keeps).
    pub fn open(self: &Arc<Self>) -> OpenFlow {
        bump(&self.open, 1);
        bump(&self.total, 1);
        OpenFlow(self.clone())
    }

    /// Counts `n` datagrams from the local side that were dropped before reaching a flow.
    pub fn dropped_from_local(&self, n: u64, bytes: u64) {
        bump(&self.from_local, n);
        bump(&self.from_local_bytes, bytes);
        bump(&self.dropped_in, n);
    }
}

/// Counts one flow as open until dropped.
#[derive(Debug)]
pub struct OpenFlow(Arc<FlowStats>);

impl Drop for OpenFlow {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Demultiplexing

struct Route {
    tx: mpsc::Sender<Bytes>,
    stats: Arc<FlowStats>,
}

/// The datagram reader of one connection: hands each datagram to the flow its ID names.
#[derive(Default)]
pub struct Demux {
    routes: Mutex<HashMap<u64, Route>>,
    unknown: AtomicU64,
}

impl Demux {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Datagrams that named no open flow (a flow that had just ended, or a malformed one).
    pub fn unknown(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    /// Routes flow `id`'s datagrams to the returned receiver, counting them in `stats`,
    /// until it is dropped.
    pub fn register(self: &Arc<Self>, id: u64, stats: Arc<FlowStats>) -> FlowRx {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        self.routes().insert(id, Route { tx, stats });
        FlowRx {
            rx,
            id,
            demux: self.clone(),
        }
    }

    fn deliver(&self, datagram: Bytes) {
        let Some((id, payload)) = unframe(datagram) else {
            bump(&self.unknown, 1);
            return;
        };
        let routes = self.routes();
        let Some(route) = routes.get(&id) else {
            bump(&self.unknown, 1);
            return;
        };
        bump(&route.stats.from_tunnel, 1);
        if route.tx.try_send(payload).is_err() {
            bump(&route.stats.dropped_out, 1);
        }
    }

    async fn read(self: Arc<Self>, conn: Connection) {
        while let Ok(datagram) = conn.read_datagram().await {
            self.deliver(datagram);
        }
        // The flows' receivers end, and their loops with them.
        self.routes().clear();
    }
}

/// The datagrams of one flow; dropping it forgets the flow.
pub struct FlowRx {
    rx: mpsc::Receiver<Bytes>,
    id: u64,
    demux: Arc<Demux>,
}

impl Drop for FlowRx {
    fn drop(&mut self) {
        self.demux.routes().remove(&self.id);
    }
}

/// Every connection's [`Demux`], started with the first flow on it and ended with the
/// connection.
#[derive(Default)]
pub struct Demuxes(Mutex<HashMap<usize, Weak<Demux>>>);

impl Demuxes {
    /// The demux of `conn`, whose reader is started if none runs.
    pub fn of(&self, conn: &Connection) -> Arc<Demux> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(demux) = all.get(&conn.stable_id()).and_then(Weak::upgrade) {
            return demux;
        }
        all.retain(|_, d| d.strong_count() > 0);
        let demux = Arc::new(Demux::default());
        all.insert(conn.stable_id(), Arc::downgrade(&demux));
        // The reader holds the demux for as long as the connection lives.
        tokio::spawn(demux.clone().read(conn.clone()));
        demux
    }
}

// ---------------------------------------------------------------------------------------------
// One flow

/// The local side of a flow.
pub enum LocalEnd {
    /// A socket of the flow's own, connected to the service (the exposer's side).
    Socket(UdpSocket),
    /// One client of the forward's shared socket (the forwarder's side): its datagrams come
    /// from the forward's queue; replies go to its address.
    Client {
        /// The forward's socket.
        socket: Arc<UdpSocket>,
        /// The client's address.
        addr: SocketAddr,
        /// Its datagrams, read from `socket` by the forward.
        rx: mpsc::Receiver<Bytes>,
    },
}

impl LocalEnd {
    /// The next datagram; `None` once the local side is gone.
    async fn recv(&mut self, buf: &mut [u8]) -> Option<Bytes> {
        match self {
            LocalEnd::Socket(socket) => loop {
                match socket.recv(buf).await {
                    Ok(n) => return Some(Bytes::copy_from_slice(&buf[..n])),
                    // An ICMP port unreachable of an earlier send: the service is not (yet)
                    // listening; the datagram that caused it is lost, the flow goes on.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => {
                        tracing::debug!("the flow's socket failed: {e}");
                        return None;
                    }
                }
            },
            LocalEnd::Client { rx, .. } => rx.recv().await,
        }
    }

    /// A datagram that is waiting already, if any.
    fn try_recv(&mut self, buf: &mut [u8]) -> Option<Bytes> {
        match self {
            LocalEnd::Socket(socket) => socket
                .try_recv(buf)
                .ok()
                .map(|n| Bytes::copy_from_slice(&buf[..n])),
            LocalEnd::Client { rx, .. } => rx.try_recv().ok(),
        }
    }

    async fn send(&self, payload: &[u8]) -> std::io::Result<()> {
        match self {
            LocalEnd::Socket(socket) => socket.send(payload).await.map(drop),
            LocalEnd::Client { socket, addr, .. } => socket.send_to(payload, *addr).await.map(drop),
        }
    }
}

/// An open flow: its connection, its stream's ID, its datagrams from the tunnel and its
/// service's counters.
pub struct Flow {
    /// The peer connection.
    pub conn: Connection,
    /// The flow's ID: its stream's.
    pub id: u64,
    /// Its datagrams from the tunnel.
    pub rx: FlowRx,
    /// Its service's counters.
    pub stats: Arc<FlowStats>,
    /// Its service's name, for logs.
    pub name: String,
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Nothing moved for the idle timeout.
    Idle,
    /// The other side ended it (its idle timer, a reload that removed the service, or the
    /// agent stopping).
    ByPeer,
    /// The local side is gone (its socket failed, or the forward stopped).
    LocalGone,
    /// The connection is gone.
    ConnectionLost,
}

/// Moves `flow`'s datagrams between `local` and the tunnel until one side ends it or nothing
/// moves for `idle`; its stream halves are `send` and `recv`.
pub async fn run(
    mut flow: Flow,
    mut local: LocalEnd,
    mut send: SendStream,
    mut recv: RecvStream,
    idle: Duration,
) -> Ended {
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
    let mut probe = [0u8; 1];
    let mut warned_too_large = false;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            from_tunnel = flow.rx.rx.recv() => {
                let Some(payload) = from_tunnel else {
                    return Ended::ConnectionLost;
                };
                last = Instant::now();
                to_local(&flow, &local, &payload).await;
                // What else waits goes out in the same turn: one wake-up per burst, not per
                // datagram, which is what a busy flow's throughput is made of.
                for _ in 1..DRAIN {
                    let Ok(payload) = flow.rx.rx.try_recv() else { break };
                    to_local(&flow, &local, &payload).await;
                }
            }
            from_local = local.recv(&mut buf) => {
                let Some(payload) = from_local else {
                    return Ended::LocalGone;
                };
                last = Instant::now();
                let mut next = Some(payload);
                let mut moved = 0;
                while let Some(payload) = next.take() {
                    bump(&flow.stats.from_local, 1);
                    bump(&flow.stats.from_local_bytes, payload.len() as u64);
                    if let Err(ended) = to_tunnel(&flow, &payload, &mut warned_too_large).await {
                        return ended;
                    }
                    moved += 1;
                    if moved < DRAIN {
                        next = local.try_recv(&mut buf);
                    }
                }
            }
            // Nothing comes on the stream after the header and its answer: anything that does
            // (its end, a reset, the connection's loss) ends the flow.
            _ = recv.read(&mut probe) => {
                let _ = send.finish();
                return Ended::ByPeer;
            }
            () = tokio::time::sleep_until(last + idle) => {
                let _ = send.finish();
                return Ended::Idle;
            }
        }
    }
}

/// Sends `payload` from the tunnel to `flow`'s local side, counting it as delivered or
/// dropped.
async fn to_local(flow: &Flow, local: &LocalEnd, payload: &[u8]) {
    match local.send(payload).await {
        Ok(()) => {
            bump(&flow.stats.to_local, 1);
            bump(&flow.stats.to_local_bytes, payload.len() as u64);
        }
        Err(e) => {
            bump(&flow.stats.dropped_out, 1);
            tracing::debug!(name = %flow.name, "cannot send a datagram to the local side: {e}");
        }
    }
}

/// Sends `payload` of `flow` into the tunnel, waiting while the connection's datagram buffer
/// is full; counts it as sent, too large or dropped.
async fn to_tunnel(flow: &Flow, payload: &[u8], warned: &mut bool) -> Result<(), Ended> {
    let stats = &flow.stats;
    let room = flow
        .conn
        .max_datagram_size()
        .unwrap_or(0)
        .saturating_sub(varint_len(flow.id).unwrap_or(8));
    if payload.len() > room {
        bump(&stats.too_large, 1);
        // Once per flow at warn: an application that sends such datagrams sends many.
        if !*warned {
            *warned = true;
            tracing::warn!(
                name = %flow.name,
                size = payload.len(),
                room,
                "dropping a UDP datagram of {} bytes: the tunnel carries at most {room} bytes \
                 per datagram on its path now; lower the application's packet size (its MTU). \
                 Further ones of this flow are counted in status",
                payload.len()
            );
        } else {
            tracing::debug!(name = %flow.name, size = payload.len(), room, "dropping a UDP datagram that is too large");
        }
        return Ok(());
    }
    let Some(datagram) = frame(flow.id, payload) else {
        bump(&stats.dropped_in, 1);
        return Ok(());
    };
    match flow.conn.send_datagram_wait(datagram).await {
        Ok(()) => {
            bump(&stats.to_tunnel, 1);
            Ok(())
        }
        Err(SendDatagramError::ConnectionLost(_)) => {
            bump(&stats.dropped_in, 1);
            Err(Ended::ConnectionLost)
        }
        // The path's MTU shrank between the check and the send.
        Err(SendDatagramError::TooLarge) => {
            bump(&stats.too_large, 1);
            Ok(())
        }
        Err(e) => {
            bump(&stats.dropped_in, 1);
            tracing::debug!(name = %flow.name, "cannot send a datagram into the tunnel: {e}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_take_the_sizes_rfc_9000_gives() {
        // RFC 9000 §A.1's examples.
        let cases: [(u64, &[u8]); 4] = [
            (
                151_288_809_941_952_652,
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            ),
            (494_878_333, &[0x9d, 0x7f, 0x3e, 0x7d]),
            (15_293, &[0x7b, 0xbd]),
            (37, &[0x25]),
        ];
        for (id, bytes) in cases {
            let datagram = frame(id, b"x").unwrap();
            assert_eq!(&datagram[..bytes.len()], bytes, "{id}");
            assert_eq!(varint_len(id), Some(bytes.len()));
            assert_eq!(unframe(datagram), Some((id, Bytes::from_static(b"x"))));
        }
        assert_eq!(varint_len(1 << 62), None);
        assert_eq!(frame(1 << 62, b""), None);
    }

    #[test]
    fn short_or_empty_datagrams_name_no_flow() {
        assert_eq!(unframe(Bytes::new()), None);
        assert_eq!(unframe(Bytes::from_static(&[0x40])), None);
        assert_eq!(unframe(Bytes::from_static(&[0xc0, 0, 0])), None);
        // An ID alone is an empty payload, which UDP allows.
        assert_eq!(unframe(Bytes::from_static(&[4])), Some((4, Bytes::new())));
    }

    #[test]
    fn the_cap_counts_open_flows() {
        let stats = Arc::new(FlowStats::default());
        let a = stats.try_open(2).unwrap();
        let _b = stats.try_open(2).unwrap();
        assert!(stats.try_open(2).is_none());
        drop(a);
        let _c = stats.try_open(2).unwrap();
        let counts = stats.counts();
        assert_eq!((counts.open, counts.total), (2, 3));
    }

    #[test]
    fn datagrams_go_to_their_flow_and_the_rest_are_counted() {
        let demux = Arc::new(Demux::default());
        let stats = Arc::new(FlowStats::default());
        let mut flow = demux.register(8, stats.clone());
        demux.deliver(frame(8, b"hello").unwrap());
        demux.deliver(frame(12, b"stranger").unwrap());
        demux.deliver(Bytes::from_static(&[0x80]));
        assert_eq!(flow.rx.try_recv().unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(demux.unknown(), 2);
        for _ in 0..FLOW_QUEUE + 3 {
            demux.deliver(frame(8, b"x").unwrap());
        }
        let counts = stats.counts();
        assert_eq!(counts.from_tunnel, 1 + FLOW_QUEUE as u64 + 3);
        assert_eq!(counts.dropped_out, 3);
        drop(flow);
        demux.deliver(frame(8, b"late").unwrap());
        assert_eq!(demux.unknown(), 3);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Every ID a stream can have frames and reads back with its payload whole.
            #[test]
            fn frames_round_trip(id in 0u64..(1 << 62), payload in prop::collection::vec(any::<u8>(), 0..64)) {
                let datagram = frame(id, &payload).unwrap();
                prop_assert_eq!(datagram.len(), varint_len(id).unwrap() + payload.len());
                prop_assert_eq!(unframe(datagram), Some((id, Bytes::from(payload))));
            }

            /// No input makes unframe panic.
            #[test]
            fn unframe_takes_anything(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
                let _ = unframe(Bytes::from(bytes));
            }
        }
    }
}
