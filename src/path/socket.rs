//! [`PathSocket`]: quinn's socket. One UDP socket per process carries QUIC to S, QUIC to every
//! peer and STUN, so the NAT mapping S observes is the very one peers punch to. Also
//! [`ReplySocket`], a plain UDP socket that answers from the address it was asked on (S's
//! second STUN port), and the per-datagram source address and TTL both can send with
//! ([`cmsg`]).

mod cmsg;

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};

use super::batch::{worth_holding, SendBatch};
use super::table::{canonical, PathTable, Route};
use crate::proto::stun;

/// A STUN datagram taken out of the stream before quinn saw it.
#[derive(Debug, Clone)]
pub struct StunPacket {
    /// Who sent it (canonical: an IPv4 sender in its IPv4 form).
    pub from: SocketAddr,
    /// The local IP it was sent to (canonical), where the platform tells (Linux does): on a
    /// socket bound to the unspecified address, which of the host's addresses the sender
    /// used, and so the one to answer from ([`PathSocket::send_from`]).
    pub to: Option<IpAddr>,
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
    /// Datagrams held back to go out in one bigger GSO send (see [`super::batch`]).
    batch: Mutex<SendBatch>,
    /// Wakes the task that sends a held batch nothing else completed; `None` outside a
    /// tokio runtime, where nothing is held.
    flush_needed: Option<Arc<Notify>>,
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
        let runtime = tokio::runtime::Handle::try_current().ok();
        let flush_needed = runtime.as_ref().map(|_| Arc::new(Notify::new()));
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
            batch: Mutex::new(SendBatch::default()),
            flush_needed: flush_needed.clone(),
        };
        let socket = Arc::new(socket);
        if let (Some(runtime), Some(notify)) = (runtime, flush_needed) {
            runtime.spawn(flush_held(Arc::downgrade(&socket), notify));
        }
        Ok((socket, stun_rx))
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

    /// Sends one datagram (STUN) straight to a real address, from `src_ip` (one of the
    /// host's addresses: the one a request came to, [`StunPacket::to`]) so that a host with
    /// several addresses answers from the one it was asked on. `None` lets the kernel choose,
    /// as [`Self::send_to`] does. Errors concern this datagram only: a source address the
    /// kernel refuses leaves the socket as it was.
    pub async fn send_from(
        &self,
        data: &[u8],
        to: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> io::Result<()> {
        let options = cmsg::Options { src_ip, ttl: None };
        send_with(&self.io, data, self.family(to), options).await
    }

    /// Sends one datagram straight to a real address with the IPv4 TTL (also to an IPv4
    /// address on an IPv6 socket) or IPv6 hop limit `ttl`, for this datagram only: a probe
    /// that opens this side's NAT mapping and expires before it reaches the far side's NAT.
    /// Every other send, before, after or at the same time, keeps the socket's TTL.
    ///
    /// Linux only (elsewhere: an Unsupported error); a `ttl` of 0 is an InvalidInput error.
    pub async fn send_with_ttl(&self, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
        let options = cmsg::Options {
            src_ip: None,
            ttl: Some(ttl),
        };
        send_with(&self.io, data, self.family(to), options).await
    }

    /// The address the socket is bound to.
    pub fn local(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Spells `addr` as the socket's family needs it (IPv4-mapped on an IPv6 socket).
    fn family(&self, addr: SocketAddr) -> SocketAddr {
        family(self.ipv6, addr)
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

    fn divert_stun(&self, from: SocketAddr, to: Option<IpAddr>, data: &[u8]) {
        let packet = StunPacket {
            from: canonical(from),
            to: to.map(|ip| ip.to_canonical()),
            data: Bytes::copy_from_slice(data),
        };
        if self.stun_tx.try_send(packet).is_err() {
            tracing::trace!(%from, "STUN queue full, dropping a datagram");
        }
    }

    /// Decides what quinn sees of one received datagram (or GRO batch): STUN is diverted,
    /// a peer's path is replaced by the peer's virtual address, strangers are dropped.
    /// Dropped entries get length 0, which quinn skips.
    ///
    /// STUN is either generation's ([`stun::is_any_stun`]): an RFC 3489 request means
    /// something only to S, and whoever reads the diverted datagrams ignores what it does
    /// not understand.
    fn filter(&self, buf: &[u8], meta: &mut RecvMeta) {
        let data = &buf[..meta.len];
        let stride = meta.stride.max(1);
        if data.len() <= stride {
            if stun::is_any_stun(data) {
                self.divert_stun(meta.addr, meta.dst_ip, data);
                meta.len = 0;
                return;
            }
        } else {
            // A GRO batch: STUN inside it is rare (it needs the same size as its neighbours).
            // Copy such segments out; quinn drops them in place, their fixed bit being 0.
            for seg in data.chunks(stride) {
                if stun::is_any_stun(seg) {
                    self.divert_stun(meta.addr, meta.dst_ip, seg);
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
        Box::pin(Poller {
            socket: self,
            writable: None,
        })
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
        self.send_batched(&out)
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
    /// Sends `t`, or holds it to go out with what follows (see [`super::batch`]). A held
    /// transmit counts as sent for quinn; a batch nothing completes is sent by
    /// [`flush_held`] once the tasks that were ready have run.
    fn send_batched(&self, t: &Transmit) -> io::Result<()> {
        let Some(flush_needed) = &self.flush_needed else {
            return self.send_now(t);
        };
        // Once quinn-udp finds that GSO fails, this is 1: nothing more is held (a batch takes
        // transmits of several datagrams only) and what is held goes out first.
        let max_gso = self.state.max_gso_segments();
        let per_transmit = t.contents.len() / t.segment_size.unwrap_or(usize::MAX).max(1);
        let mut batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        if !batch.is_empty() {
            if batch.push(t, max_gso) {
                if worth_holding(t) && !batch.is_full(max_gso, per_transmit) {
                    return Ok(());
                }
                if self.flush(&mut batch).is_err() {
                    // The socket is full; `t` is held already, the task sends it.
                    flush_needed.notify_one();
                }
                return Ok(());
            }
            // On WouldBlock `t` is not taken: quinn waits until the socket is writable.
            self.flush(&mut batch)?;
        }
        if worth_holding(t) && batch.push(t, max_gso) {
            flush_needed.notify_one();
            return Ok(());
        }
        drop(batch);
        self.send_now(t)
    }

    /// Sends what `batch` holds; on WouldBlock it stays held.
    fn flush(&self, batch: &mut SendBatch) -> io::Result<()> {
        let result = match batch.transmit() {
            Some(t) => self.send_now(&t),
            None => return Ok(()),
        };
        if result.is_ok() {
            batch.clear();
        }
        result
    }

    /// One `sendmsg`. Only WouldBlock is an error: any other failure concerns one peer and
    /// is reported as a loss, since an error here would stop quinn's endpoint driver.
    fn send_now(&self, t: &Transmit) -> io::Result<()> {
        match self
            .io
            .try_io(Interest::WRITABLE, || self.state.send((&self.io).into(), t))
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                tracing::debug!(dest = %t.destination, error = %e, "send failed");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

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

/// Spells `addr` as a socket of this family needs it: IPv4-mapped on an IPv6 socket.
fn family(ipv6_socket: bool, addr: SocketAddr) -> SocketAddr {
    match (ipv6_socket, addr) {
        (true, SocketAddr::V4(v4)) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        _ => addr,
    }
}

/// Sends one datagram with `options` on `io`, waiting while the socket is full.
async fn send_with(
    io: &tokio::net::UdpSocket,
    data: &[u8],
    to: SocketAddr,
    options: cmsg::Options,
) -> io::Result<()> {
    if options == cmsg::Options::default() {
        return io.send_to(data, to).await.map(|_| ());
    }
    io.async_io(Interest::WRITABLE, || cmsg::send(io, data, to, options))
        .await
}

/// Datagrams one [`ReplySocket::recv`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Who sent them (canonical: an IPv4 sender in its IPv4 form).
    pub from: SocketAddr,
    /// The local IP they were sent to (canonical), where the platform tells.
    pub to: Option<IpAddr>,
    /// How many bytes of the buffer hold datagrams.
    pub len: usize,
    /// The size of each datagram: the kernel may join several from one sender into one
    /// receive (GRO), each `stride` bytes long but the last, which may be shorter.
    pub stride: usize,
}

impl Received {
    /// The datagrams in `buf`, which this receive filled.
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        buf[..self.len.min(buf.len())].chunks(self.stride.max(1))
    }
}

/// A plain UDP socket (no QUIC) that tells, for each datagram, which local address it was
/// sent to, and can answer from that address: on a host with several addresses and a socket
/// bound to the unspecified one, an answer from another address than the one asked would
/// not pass the asker's NAT or firewall, and reporting the wrong one would mislead it. S's
/// second STUN port is one (its main port is a [`PathSocket`], which does the same).
#[derive(Debug)]
pub struct ReplySocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    ipv6: bool,
}

impl ReplySocket {
    /// A buffer this large holds whatever one [`Self::recv`] returns: GRO joins datagrams
    /// into at most 64 KiB.
    pub const BUFFER: usize = 64 * 1024;

    /// Wraps an already bound socket (and asks the kernel to tell each datagram's
    /// destination address, which quinn-udp's socket setup does).
    pub fn from_std(std: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&std))?;
        std.set_nonblocking(true)?;
        let ipv6 = std.local_addr()?.is_ipv6();
        Ok(ReplySocket {
            io: tokio::net::UdpSocket::from_std(std)?,
            state,
            ipv6,
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Receives the next datagram (or several joined by GRO; see [`Received`]) into `buf`.
    /// A datagram longer than `buf` is cut short.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            let meta = self
                .io
                .async_io(Interest::READABLE, || {
                    let mut bufs = [IoSliceMut::new(&mut *buf)];
                    let mut meta = [RecvMeta::default()];
                    let n = self.state.recv((&self.io).into(), &mut bufs, &mut meta)?;
                    Ok((n > 0).then_some(meta[0]))
                })
                .await?;
            if let Some(meta) = meta {
                return Ok(Received {
                    from: canonical(meta.addr),
                    to: meta.dst_ip.map(|ip| ip.to_canonical()),
                    len: meta.len,
                    stride: meta.stride,
                });
            }
        }
    }

    /// Sends one datagram to `to` from `src_ip`, as [`PathSocket::send_from`] does.
    pub async fn send_from(
        &self,
        data: &[u8],
        to: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> io::Result<()> {
        let options = cmsg::Options { src_ip, ttl: None };
        send_with(&self.io, data, family(self.ipv6, to), options).await
    }
}

impl Drop for PathSocket {
    fn drop(&mut self) {
        // Lets [`flush_held`] see that the socket is gone and end.
        if let Some(notify) = &self.flush_needed {
            notify.notify_one();
        }
    }
}

/// Sends a batch that nothing else completed: after a transmit started a batch, this task
/// wakes, goes once to the back of the run queue (so the connection that started the batch
/// gets one more turn to add to it), then sends what is held, waiting for the socket to
/// drain if it is full. Ends when the socket is dropped.
///
/// One turn, not more: `tokio::task::yield_now` would wait until no task is ready, which
/// with several busy streams holds datagrams for milliseconds (QUIC reads that delay as a
/// longer round trip).
async fn flush_held(socket: Weak<PathSocket>, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        back_of_the_queue().await;
        loop {
            let Some(live) = socket.upgrade() else {
                return;
            };
            let sent = {
                let mut batch = live.batch.lock().unwrap_or_else(|e| e.into_inner());
                live.flush(&mut batch)
            };
            if sent.is_ok() {
                break;
            }
            if live.io.writable().await.is_err() {
                // Only when the runtime's I/O driver is shutting down.
                return;
            }
        }
    }
}

/// Returns after the tasks already in the run queue had their turn: it wakes itself, which
/// queues it behind them.
async fn back_of_the_queue() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// Waits for the socket to take more, for one quinn connection. Each connection (S's and
/// every peer's) has its own, and each waits on its own `writable()` future: tokio keeps
/// any number of those, whereas `poll_send_ready` keeps one waker per socket, so a second
/// connection's wait would silently replace the first's and leave it stalled until a timer.
struct Poller {
    socket: Arc<PathSocket>,
    writable: Option<Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let writable = this.writable.get_or_insert_with(|| {
            let socket = this.socket.clone();
            Box::pin(async move { socket.io.writable().await })
        });
        let result = writable.as_mut().poll(cx);
        if result.is_ready() {
            self.writable = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` datagrams of `size` bytes, datagram `i` filled with the byte `first + i`.
    fn datagrams(first: u8, count: usize, size: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|i| std::iter::repeat_n(first.wrapping_add(i as u8), size))
            .collect()
    }

    /// A GSO transmit of 1000-byte datagrams to `to`.
    fn transmit(to: SocketAddr, contents: &[u8]) -> Transmit<'_> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: Some(1000),
            src_ip: None,
        }
    }

    /// Sends `t` as quinn would: waiting until the socket is writable first.
    async fn send(socket: &PathSocket, t: &Transmit<'_>) {
        loop {
            socket.io.writable().await.expect("writable");
            match socket.try_send(t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other.expect("send"),
            }
        }
    }

    const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    /// Whether this host can bind `::1`; if not, says the IPv6 half of a test is skipped,
    /// and fails where it must run (CI=true).
    fn ipv6_loopback() -> bool {
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "::1 cannot be bound, and CI=true requires the IPv6 half"
        );
        println!("SKIPPED: no IPv6 on loopback");
        false
    }

    /// A receiving socket that is told each datagram's TTL (IPv4) or hop limit (IPv6).
    fn ttl_receiver(at: &str) -> std::net::UdpSocket {
        let sock = std::net::UdpSocket::bind(at).expect("bind");
        sock.set_read_timeout(Some(WAIT)).expect("timeout");
        let (level, name) = if sock.local_addr().expect("address").is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_RECVTTL)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT)
        };
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, and a pointer to an int with its size, as the option takes.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                level,
                name,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        sock
    }

    /// One datagram from a [`ttl_receiver`]: its bytes, sender and TTL or hop limit.
    fn recv_ttl(sock: &std::net::UdpSocket) -> (Vec<u8>, SocketAddr, Option<i32>) {
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 16];
        let mut name: libc::sockaddr_storage =
            // SAFETY: plain integers; zero is valid.
            unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: plain integers and pointers; zero is valid.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = std::ptr::from_mut(&mut name).cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `hdr` points at a live buffer of the length given.
        let n = unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(sock), &mut hdr, 0) };
        assert!(n >= 0, "recvmsg: {}", io::Error::last_os_error());
        let mut ttl = None;
        // SAFETY: the kernel filled `hdr`'s control buffer with well-formed messages; the
        // CMSG_* macros walk it within msg_controllen, and the TTL messages carry an int.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&hdr);
            while !c.is_null() {
                let kind = ((*c).cmsg_level, (*c).cmsg_type);
                if kind == (libc::IPPROTO_IP, libc::IP_TTL)
                    || kind == (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
                {
                    ttl = Some(std::ptr::read_unaligned(
                        libc::CMSG_DATA(c).cast::<libc::c_int>(),
                    ));
                }
                c = libc::CMSG_NXTHDR(&hdr, c);
            }
        }
        // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into `name`.
        let from = unsafe { socket2::SockAddr::new(name, hdr.msg_namelen) }
            .as_socket()
            .expect("an IP sender");
        (buf[..n as usize].to_vec(), from, ttl)
    }

    #[tokio::test]
    async fn a_low_ttl_is_set_on_one_datagram_only() {
        let mut cases = vec![
            // IPv4; and IPv4-mapped from an IPv6 (dual-stack) socket, which takes IP_TTL.
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("[::]:0", "127.0.0.1:0"),
        ];
        if ipv6_loopback() {
            cases.push(("[::1]:0", "[::1]:0"));
        }
        for (ttl, (from, at)) in (2u8..).zip(cases) {
            let (socket, _stun) = PathSocket::bind(addr(from), Policy::AcceptAll).expect("bind");
            let receiver = ttl_receiver(at);
            let to = receiver.local_addr().expect("address");
            socket.send_with_ttl(b"low", to, ttl).await.expect("send");
            socket.send_to(b"default", to).await.expect("send");
            let (data, _, got) = recv_ttl(&receiver);
            assert_eq!(
                (data.as_slice(), got),
                (&b"low"[..], Some(i32::from(ttl))),
                "{from}"
            );
            let (data, _, got) = recv_ttl(&receiver);
            assert_eq!(data, b"default");
            assert!(
                got.is_some_and(|t| t > 8),
                "{from}: the socket's TTL changed: {got:?}"
            );
            let err = socket.send_with_ttl(b"x", to, 0).await.expect_err("TTL 0");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[tokio::test]
    async fn answers_leave_from_the_address_asked() {
        // The whole of 127.0.0.0/8 is this host's: a socket on 0.0.0.0 is reached at
        // 127.0.0.2 and 127.0.0.3 as at 127.0.0.1, as a host with several addresses is.
        for (bind, src) in [("0.0.0.0:0", "127.0.0.2"), ("[::]:0", "127.0.0.3")] {
            let (socket, _stun) = PathSocket::bind(addr(bind), Policy::AcceptAll).expect("bind");
            let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            receiver.set_read_timeout(Some(WAIT)).expect("timeout");
            let to = receiver.local_addr().expect("address");
            let port = socket.local().expect("address").port();
            let src: IpAddr = src.parse().expect("address");
            socket.send_from(b"a", to, Some(src)).await.expect("send");
            let mut buf = [0u8; 16];
            let (n, from) = receiver.recv_from(&mut buf).expect("recv");
            assert_eq!((&buf[..n], from), (&b"a"[..], SocketAddr::new(src, port)));
            // A source of the other family is refused, and the socket works on.
            let err = socket
                .send_from(b"b", to, Some("::1".parse().expect("address")))
                .await
                .expect_err("an IPv6 source for an IPv4 destination");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            socket.send_from(b"c", to, None).await.expect("send");
            let (n, _) = receiver.recv_from(&mut buf).expect("recv");
            assert_eq!(&buf[..n], b"c");
        }
    }

    /// Drives `socket`'s receive path (as quinn's endpoint would) until a STUN datagram
    /// comes out of `stun`.
    async fn next_stun(socket: &PathSocket, stun: &mut mpsc::Receiver<StunPacket>) -> StunPacket {
        let mut storage = vec![0u8; 65_536];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        let drive = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta));
        let next = async {
            tokio::select! {
                packet = stun.recv() => packet.expect("the socket is open"),
                quic = drive => panic!("a datagram reached QUIC: {quic:?}"),
            }
        };
        tokio::time::timeout(WAIT, next)
            .await
            .expect("STUN diverted in time")
    }

    #[tokio::test]
    async fn diverted_stun_says_which_address_it_was_sent_to() {
        let mut classic = vec![0x00, 0x01, 0x00, 0x00];
        classic.extend_from_slice(&[9; 16]);
        let modern = stun::binding_request(stun::new_tid(), None);
        for bind in ["0.0.0.0:0", "[::]:0"] {
            let (socket, mut rx) = PathSocket::bind(addr(bind), Policy::AcceptAll).expect("bind");
            let port = socket.local().expect("address").port();
            let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let me = client.local_addr().expect("address");
            for (dst, request) in [("127.0.0.1", &modern), ("127.0.0.2", &classic)] {
                let dst: IpAddr = dst.parse().expect("address");
                client
                    .send_to(request, SocketAddr::new(dst, port))
                    .await
                    .expect("send");
                let packet = next_stun(&socket, &mut rx).await;
                assert_eq!(packet.from, me, "{bind}");
                assert_eq!(packet.to, Some(dst), "{bind}");
                assert_eq!(&packet.data[..], &request[..]);
            }
        }
    }

    #[tokio::test]
    async fn a_reply_socket_knows_where_each_datagram_went_and_answers_from_there() {
        let std = std::net::UdpSocket::bind("[::]:0").expect("bind");
        let socket = ReplySocket::from_std(std).expect("wrap");
        let port = socket.local_addr().expect("address").port();
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let me = client.local_addr().expect("address");
        let asked = SocketAddr::new("127.0.0.2".parse().expect("address"), port);
        client.send_to(b"question", asked).await.expect("send");
        let mut buf = vec![0u8; ReplySocket::BUFFER];
        let got = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!((got.from, got.to), (me, Some(asked.ip())));
        assert_eq!(got.datagrams(&buf).collect::<Vec<_>>(), [&b"question"[..]]);
        socket
            .send_from(b"answer", got.from, got.to)
            .await
            .expect("send");
        let mut answer = [0u8; 16];
        let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut answer))
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!((&answer[..n], from), (&b"answer"[..], asked));
    }

    #[tokio::test]
    async fn held_datagrams_all_arrive_in_order_and_a_tail_is_sent_by_the_task() {
        let (socket, _stun) =
            PathSocket::bind("127.0.0.1:0".parse().expect("address"), Policy::AcceptAll)
                .expect("bind");
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let to = receiver.local_addr().expect("address");
        // Four bulk transmits (held and joined), then one ending in a short datagram (sends
        // the batch at once), then one more bulk transmit that nothing completes: the
        // flushing task must send it.
        let mut sent = Vec::new();
        for k in 0..4u8 {
            let data = datagrams(k * 10, 10, 1000);
            send(&socket, &transmit(to, &data)).await;
            sent.extend(data.chunks(1000).map(<[u8]>::to_vec));
        }
        let mut tail = datagrams(40, 2, 1000);
        tail.truncate(1500);
        send(&socket, &transmit(to, &tail)).await;
        sent.extend(tail.chunks(1000).map(<[u8]>::to_vec));
        let last = datagrams(50, 10, 1000);
        send(&socket, &transmit(to, &last)).await;
        sent.extend(last.chunks(1000).map(<[u8]>::to_vec));

        let mut buf = vec![0u8; 65_536];
        for (i, want) in sent.iter().enumerate() {
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), receiver.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("datagram {i} of {} never arrived", sent.len()))
                    .expect("recv");
            assert_eq!(&buf[..n], &want[..], "datagram {i}");
        }
    }
}
