//! [`PathSocket`]: quinn's socket. One UDP socket per process carries QUIC to S, QUIC to every
//! peer and STUN, so the NAT mapping S observes is the very one peers punch to.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::table::{canonical, PathTable, Route};
use crate::proto::stun;

/// A STUN datagram taken out of the stream before quinn saw it.
#[derive(Debug, Clone)]
pub struct StunPacket {
    /// Who sent it.
    pub from: SocketAddr,
    /// The whole datagram.
    pub data: Bytes,
}

/// A QUIC datagram that arrived on a path other than the UDP socket (framed on TCP, or
/// relayed by S), to be handed to quinn as if it came from `from`.
#[derive(Debug, Clone)]
pub struct Injected {
    /// The peer's virtual address.
    pub from: SocketAddr,
    /// One whole QUIC datagram.
    pub data: Bytes,
}

/// Which QUIC datagrams from addresses that are not a peer's path reach quinn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// All of them: a server (S) that anyone may connect to.
    AcceptAll,
    /// Only those from addresses let in with [`PathSocket::allow`] (an agent lets in S); the
    /// rest are dropped, so strangers cannot reach the agent's QUIC endpoint at all.
    KnownOnly,
}

/// The UDP socket under quinn, with path translation and STUN demultiplexing.
pub struct PathSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    table: RwLock<PathTable>,
    allowed: RwLock<Vec<SocketAddr>>,
    policy: Policy,
    stun_tx: mpsc::Sender<StunPacket>,
    inject_tx: mpsc::Sender<Injected>,
    inject_rx: std::sync::Mutex<mpsc::Receiver<Injected>>,
    ipv6: bool,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket")
            .field("local", &self.io.local_addr().ok())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// How many STUN datagrams may wait for their handler before new ones are dropped.
const STUN_QUEUE: usize = 1024;

/// The kernel buffer asked for each way on the UDP socket. The default (about 208 KiB, some
/// 150 full-size datagrams) overflows whenever the receiving agent is not scheduled for a
/// fraction of a millisecond at full speed, and every overflow is a loss that QUIC's
/// congestion control answers by slowing down: on a busy two-core machine most datagrams of
/// a bulk transfer were dropped so. Linux caps the request at `net.core.rmem_max` /
/// `wmem_max`; the memory is only used while datagrams are queued.
const SOCKET_BUFFER: usize = 4 << 20;

/// Below this receive buffer, a hint to raise `net.core.rmem_max` is logged once.
const SOCKET_BUFFER_HINT: usize = 1 << 20;

/// Asks for [`SOCKET_BUFFER`] each way on `socket`; what the kernel grants is logged.
fn size_buffers(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let (recv, send) = (
        sock.recv_buffer_size().unwrap_or(0),
        sock.send_buffer_size().unwrap_or(0),
    );
    if recv < SOCKET_BUFFER_HINT {
        tracing::info!(
            recv_buffer = recv,
            "small UDP receive buffer: raising net.core.rmem_max (to {SOCKET_BUFFER}) avoids \
             drops at high rates"
        );
    } else {
        tracing::debug!(recv_buffer = recv, send_buffer = send, "UDP socket buffers");
    }
}

/// How many datagrams from TCP and relay paths may wait for quinn; beyond that they are
/// lost, as on a congested link.
const INJECT_QUEUE: usize = 4096;

impl PathSocket {
    /// Binds a UDP socket at `addr`. STUN datagrams that arrive on it come out of the
    /// returned receiver.
    pub fn bind(
        addr: SocketAddr,
        policy: Policy,
    ) -> io::Result<(Arc<Self>, mpsc::Receiver<StunPacket>)> {
        let std = std::net::UdpSocket::bind(addr)?;
        Self::from_std(std, policy)
    }

    /// Wraps an already bound socket.
    pub fn from_std(
        std: std::net::UdpSocket,
        policy: Policy,
    ) -> io::Result<(Arc<Self>, mpsc::Receiver<StunPacket>)> {
        size_buffers(&std);
        let state = UdpSocketState::new(UdpSockRef::from(&std))?;
        std.set_nonblocking(true)?;
        let ipv6 = std.local_addr()?.is_ipv6();
        let io = tokio::net::UdpSocket::from_std(std)?;
        let (stun_tx, stun_rx) = mpsc::channel(STUN_QUEUE);
        let (inject_tx, inject_rx) = mpsc::channel(INJECT_QUEUE);
        let socket = PathSocket {
            io,
            state,
            table: RwLock::new(PathTable::default()),
            allowed: RwLock::new(Vec::new()),
            policy,
            stun_tx,
            inject_tx,
            inject_rx: std::sync::Mutex::new(inject_rx),
            ipv6,
        };
        Ok((Arc::new(socket), stun_rx))
    }

    /// The path table, to add and remove peers' paths.
    pub fn table(&self) -> &RwLock<PathTable> {
        &self.table
    }

    /// Lets QUIC from `addr` through under [`Policy::KnownOnly`] (the address of S).
    pub fn allow(&self, addr: SocketAddr) {
        let addr = canonical(addr);
        let mut allowed = self.allowed.write().unwrap_or_else(|e| e.into_inner());
        if !allowed.contains(&addr) {
            allowed.push(addr);
        }
    }

    /// Where TCP and relay paths hand the QUIC datagrams they receive.
    pub fn injector(&self) -> mpsc::Sender<Injected> {
        self.inject_tx.clone()
    }

    /// Sends one datagram (STUN) straight to a real address.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        self.io.send_to(data, self.family(to)).await.map(|_| ())
    }

    /// The address the socket is bound to.
    pub fn local(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Spells `addr` as the socket's family needs it (IPv4-mapped on an IPv6 socket).
    fn family(&self, addr: SocketAddr) -> SocketAddr {
        match (self.ipv6, addr) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        }
    }

    /// The path table, to read. A panic elsewhere while holding the lock leaves consistent
    /// data behind (every update is a few map operations), so poisoning is ignored.
    pub fn table_read(&self) -> std::sync::RwLockReadGuard<'_, PathTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The path table, to change (poisoning ignored, as for [`Self::table_read`]).
    pub fn table_write(&self) -> std::sync::RwLockWriteGuard<'_, PathTable> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    fn divert_stun(&self, from: SocketAddr, data: &[u8]) {
        let packet = StunPacket {
            from: canonical(from),
            data: Bytes::copy_from_slice(data),
        };
        if self.stun_tx.try_send(packet).is_err() {
            tracing::trace!(%from, "STUN queue full, dropping a datagram");
        }
    }

    /// Decides what quinn sees of one received datagram (or GRO batch): STUN is diverted,
    /// a peer's path is replaced by the peer's virtual address, strangers are dropped.
    /// Dropped entries get length 0, which quinn skips.
    fn filter(&self, buf: &[u8], meta: &mut RecvMeta) {
        let data = &buf[..meta.len];
        let stride = meta.stride.max(1);
        if data.len() <= stride {
            if stun::is_stun(data) {
                self.divert_stun(meta.addr, data);
                meta.len = 0;
                return;
            }
        } else {
            // A GRO batch: STUN inside it is rare (it needs the same size as its neighbours).
            // Copy such segments out; quinn drops them in place, their fixed bit being 0.
            for seg in data.chunks(stride) {
                if stun::is_stun(seg) {
                    self.divert_stun(meta.addr, seg);
                }
            }
        }
        if super::table::is_virtual(&canonical(meta.addr)) {
            // Virtual addresses exist only inside this process; one on the wire is spoofed.
            meta.len = 0;
            return;
        }
        if let Some(virt) = self.table_read().route_in(meta.addr, meta.len) {
            meta.addr = self.family(virt);
            return;
        }
        let allowed = self.policy == Policy::AcceptAll
            || self
                .allowed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&canonical(meta.addr));
        if !allowed {
            tracing::trace!(from = %meta.addr, "dropping QUIC from an unknown address");
            meta.len = 0;
        }
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller(self))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let table = self.table_read();
        let dest = match table.route_out(transmit.destination, transmit.contents.len()) {
            Route::Udp(dest) => dest,
            Route::Channel(tx) => {
                // One message per QUIC datagram: a GSO batch is split at its segment size.
                let size = transmit
                    .segment_size
                    .unwrap_or(transmit.contents.len())
                    .max(1);
                for packet in transmit.contents.chunks(size) {
                    if tx.try_send(Bytes::copy_from_slice(packet)).is_err() {
                        tracing::trace!("path queue full, datagram lost");
                    }
                }
                return Ok(());
            }
            // A peer without a working path: the datagram is lost, and QUIC's loss recovery
            // resends it once a path exists.
            Route::Lost => return Ok(()),
        };
        drop(table);
        let out = Transmit {
            destination: self.family(dest),
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        match self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), &out)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                // Reported as a loss: an error here would stop quinn's endpoint driver.
                tracing::debug!(%dest, error = %e, "send failed");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Some(n) = self.poll_injected(cx, bufs, meta) {
            return Poll::Ready(Ok(n));
        }
        self.poll_udp(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

impl PathSocket {
    /// Moves datagrams that arrived on TCP and relay paths into quinn's buffers, if any wait.
    fn poll_injected(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Option<usize> {
        let mut rx = self.inject_rx.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Poll::Ready(Some(packet)) = rx.poll_recv(cx) else {
                break;
            };
            if packet.data.len() > bufs[n].len() {
                continue;
            }
            bufs[n][..packet.data.len()].copy_from_slice(&packet.data);
            self.table_read().count_in(packet.from, packet.data.len());
            meta[n] = RecvMeta {
                addr: self.family(packet.from),
                len: packet.data.len(),
                stride: packet.data.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        (n > 0).then_some(n)
    }

    fn poll_udp(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let res = self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            });
            match res {
                Ok(n) => {
                    for (buf, meta) in bufs.iter().zip(meta.iter_mut()).take(n) {
                        self.filter(buf, meta);
                    }
                    if meta[..n].iter().any(|m| m.len > 0) {
                        return Poll::Ready(Ok(n));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP errors reported on the socket concern one peer, not the socket.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::HostUnreachable
                            | io::ErrorKind::NetworkUnreachable
                    ) =>
                {
                    tracing::trace!(error = %e, "ignoring ICMP error on the UDP socket");
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[derive(Debug)]
struct Poller(Arc<PathSocket>);

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}
