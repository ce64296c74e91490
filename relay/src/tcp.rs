//! QUIC over TCP, for agents whose UDP is blocked: S's TCP listener on its UDP port number.
//!
//! An agent connects, writes [`SERVER_PREAMBLE`], and then sends the same QUIC control
//! connection it would send over UDP, each packet framed on the stream
//! ([`p2ptun::path::tcp`]). S gives the TCP connection a virtual address in its
//! [`PathSocket`]'s table, so its one QUIC endpoint serves these agents exactly like the
//! others; [`crate::links`] remembers the real address behind each virtual one.
//!
//! A TCP connection is admitted under the same connection limits as a QUIC one (by its
//! peer's address), and its slot passes to the QUIC connection it carries. It is closed when
//! its preamble is wrong or late, when no QUIC connection starts on it in time, and shortly
//! after its QUIC connection ends (long enough for S's close to go out on it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use p2ptun::path::tcp::{spawn, SERVER_PREAMBLE};
use p2ptun::path::{canonical, PathKind, PathSocket};
use p2ptun::proto::stun;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::limits::{Admission, ConnLimits, ConnSlot};
use crate::links::Links;
use crate::metrics::Metrics;

/// How long a new TCP connection may take to send the preamble.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after the preamble a QUIC connection must have started on the link.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TCP connection outlives its QUIC connection, so that S's CONNECTION_CLOSE
/// reaches the agent instead of a bare TCP close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the listener needs of S.
#[derive(Debug, Clone)]
pub struct TcpFront {
    /// S's socket, whose table gets a virtual address per link.
    pub socket: Arc<PathSocket>,
    /// The links open.
    pub links: Arc<Links>,
    /// The connection limits, shared with QUIC over UDP.
    pub limits: Arc<ConnLimits>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl TcpFront {
    /// Accepts TCP connections on `listener` until the task is dropped (which also drops
    /// every link).
    pub async fn serve(self, listener: TcpListener) {
        let mut links = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.admit(&mut links, stream, canonical(peer)),
                    Err(e) => {
                        // Mostly out of file descriptors: wait rather than spin.
                        tracing::debug!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = links.join_next() => {}
            }
        }
    }

    fn admit(&self, links: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
        // The TCP handshake proved the address already; a Retry has no meaning here.
        match self.limits.admit(peer.ip(), true) {
            Admission::Accept(slot) => {
                links.spawn(self.clone().link(stream, peer, slot));
            }
            Admission::Refuse(why) => {
                self.metrics.refused(why);
                tracing::debug!(%peer, limit = why.label(), "refusing a TCP connection");
            }
            Admission::Retry => {}
        }
    }

    async fn link(self, mut stream: TcpStream, peer: SocketAddr, slot: ConnSlot) {
        let local = match stream.local_addr() {
            Ok(local) => canonical(local),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TCP connection gone at once");
                return;
            }
        };
        // QUIC paces and acknowledges its own packets; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        let mut preamble = [0u8; SERVER_PREAMBLE.len()];
        let read = tokio::time::timeout(PREAMBLE_TIMEOUT, stream.read_exact(&mut preamble));
        let read_ok = matches!(read.await, Ok(Ok(_)));
        if read_ok && looks_like_stun(&preamble) {
            // STUN over TCP (RFC 8489 §6.2.2): how an agent learns the NAT mapping of its TCP
            // punching port. One Binding request, one answer, then the connection closes.
            answer_stun_over_tcp(&mut stream, preamble, peer).await;
            return;
        }
        if !read_ok || &preamble != SERVER_PREAMBLE {
            Metrics::inc(&self.metrics.tcp_bad_preamble_total);
            tracing::debug!(%peer, "closing a TCP connection without the p2ptun preamble");
            return;
        }
        Metrics::inc(&self.metrics.tcp_connections_total);

        let virt = self
            .socket
            .table()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .anonymous_peer();
        let signals = self.links.insert(virt, peer, local, slot);
        let (sender, mut tcp_done) = spawn(stream, virt, self.socket.injector());
        self.socket
            .table()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add_channel_path(virt, PathKind::DirectTcp, peer, sender, None);
        tracing::debug!(%peer, %virt, "QUIC over TCP");

        let deadline = tokio::time::sleep(CLAIM_TIMEOUT);
        let mut deadline = std::pin::pin!(deadline);
        let mut waiting_for_quic = true;
        loop {
            tokio::select! {
                ended = &mut tcp_done => {
                    let how = match ended {
                        Ok(Err(e)) => e.to_string(),
                        _ => "closed".into(),
                    };
                    tracing::debug!(%peer, %virt, %how, "TCP connection ended");
                    break;
                }
                () = signals.quic_ended.notified() => {
                    tokio::time::sleep(CLOSE_GRACE).await;
                    break;
                }
                () = &mut deadline, if waiting_for_quic => {
                    waiting_for_quic = false;
                    if !self.links.is_claimed(virt) {
                        tracing::debug!(%peer, "no QUIC connection on a TCP connection in time");
                        break;
                    }
                }
            }
        }
        signals.tcp_ended.notify_one();
        self.links.remove(virt);
        // Dropping the path drops the last sender to the framing task, which then closes
        // the TCP connection.
        self.socket
            .table()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove_peer(virt);
    }
}

/// Whether the first 8 bytes of a TCP connection start a STUN message: the two top bits of
/// the type are zero and bytes 4..8 are the magic cookie.
fn looks_like_stun(first: &[u8; 8]) -> bool {
    first[0] & 0xc0 == 0 && first[4..8] == [0x21, 0x12, 0xa4, 0x42]
}

/// Reads the rest of a STUN Binding request whose first 8 bytes are `first` and answers it
/// with the TCP peer's address. Anything malformed or larger than a Binding request needs is
/// dropped with the connection.
async fn answer_stun_over_tcp(stream: &mut TcpStream, first: [u8; 8], peer: SocketAddr) {
    use tokio::io::AsyncWriteExt;
    const MAX_ATTRIBUTES: usize = 512;
    let attributes = usize::from(u16::from_be_bytes([first[2], first[3]]));
    if attributes > MAX_ATTRIBUTES {
        return;
    }
    let mut request = first.to_vec();
    request.resize(20 + attributes, 0);
    let rest = tokio::time::timeout(PREAMBLE_TIMEOUT, stream.read_exact(&mut request[8..]));
    if !matches!(rest.await, Ok(Ok(_))) {
        return;
    }
    let Ok(msg) = stun::decode(&request) else {
        return;
    };
    if !stun::is_binding_request(&msg) {
        return;
    }
    let reply = stun::binding_success(
        msg.transaction_id(),
        canonical(peer),
        stun::ResponseExtras::default(),
        None,
        usize::MAX,
    );
    let _ = tokio::time::timeout(PREAMBLE_TIMEOUT, stream.write_all(&reply)).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod stun_tests {
    use super::*;

    #[tokio::test]
    async fn a_binding_request_over_tcp_learns_the_tcp_mapping() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            let mut first = [0u8; 8];
            s.read_exact(&mut first).await.unwrap();
            assert!(looks_like_stun(&first));
            answer_stun_over_tcp(&mut s, first, peer).await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let me = c.local_addr().unwrap();
        let tid = stun::new_tid();
        c.write_all(&stun::binding_request(tid, None))
            .await
            .unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        let msg = stun::decode(&reply).unwrap();
        assert_eq!(msg.transaction_id(), tid);
        assert_eq!(stun::mapped_address(&msg), Some(me));
        server.await.unwrap();
        assert!(!looks_like_stun(SERVER_PREAMBLE));
    }
}
