//! A TCP connection as a path: QUIC datagrams framed on the byte stream.
//!
//! Used for hole-punched TCP between agents and for agents whose UDP cannot reach S. Each
//! datagram is sent as a 2-byte big-endian length and the datagram. QUIC inside keeps its
//! own encryption and loss recovery; TCP only carries it.
//!
//! A TCP connection whose packets are being dropped stays open for minutes, so each end
//! pings every [`PING_INTERVAL`] (a frame of length 0, answered by a frame holding the one
//! byte 0 — no QUIC datagram is that short); a connection that has received nothing for
//! [`DEAD_AFTER`] is reported not live, and live again when frames arrive.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::socket::Injected;

/// What an agent writes first on a TCP connection to S's port, before the framed QUIC: it
/// tells S that this TCP connection carries the agent's control connection.
pub const SERVER_PREAMBLE: &[u8; 8] = b"P2PTQ/1\n";

/// Datagrams waiting to be written before new ones are lost.
const QUEUE: usize = 1024;

/// How often each end pings.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Silence after which the connection is reported not live.
pub const DEAD_AFTER: std::time::Duration = std::time::Duration::from_millis(1500);

/// Runs a framed path over `stream` for the peer at virtual address `virt`: datagrams put
/// into the returned sender are written to the stream; datagrams read from it go to
/// `injector`. The returned receiver yields once, when the connection has ended. The path
/// ends when the sender (every clone of it) is dropped.
pub fn spawn<S>(
    stream: S,
    virt: SocketAddr,
    injector: mpsc::Sender<Injected>,
) -> (
    mpsc::Sender<Bytes>,
    tokio::sync::oneshot::Receiver<std::io::Result<()>>,
)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, done, _live) = spawn_checked(stream, virt, injector);
    (tx, done)
}

/// [`spawn`], also reporting whether the connection is live (see the module doc).
pub fn spawn_checked<S>(
    stream: S,
    virt: SocketAddr,
    injector: mpsc::Sender<Injected>,
) -> (
    mpsc::Sender<Bytes>,
    tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    tokio::sync::watch::Receiver<bool>,
)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (live_tx, live_rx) = tokio::sync::watch::channel(true);
    let (pong_tx, mut pong_rx) = mpsc::channel::<()>(4);
    let last_rx = std::sync::Mutex::new(tokio::time::Instant::now());
    let (mut reader, writer) = tokio::io::split(stream);
    tokio::spawn(async move {
        let mut writer = BufWriter::new(writer);
        let write = async {
            let mut ticker = tokio::time::interval(PING_INTERVAL);
            loop {
                tokio::select! {
                    packet = rx.recv() => {
                        let Some(packet) = packet else { return Ok(()) };
                        write_datagram(&mut writer, &packet).await?;
                        // Batch what is already queued into one write.
                        while let Ok(more) = rx.try_recv() {
                            write_datagram(&mut writer, &more).await?;
                        }
                    }
                    Some(()) = pong_rx.recv() => write_frame(&mut writer, &[0]).await?,
                    _ = ticker.tick() => write_frame(&mut writer, &[]).await?,
                }
                writer.flush().await?;
            }
        };
        let read = async {
            loop {
                let mut len = [0u8; 2];
                reader.read_exact(&mut len).await?;
                let len = usize::from(u16::from_be_bytes(len));
                let mut data = vec![0u8; len];
                reader.read_exact(&mut data).await?;
                *last_rx.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
                live_tx.send_if_modified(|live| !std::mem::replace(live, true));
                match len {
                    0 => {
                        let _ = pong_tx.try_send(());
                        continue;
                    }
                    1 => continue, // a pong
                    _ => {}
                }
                let packet = Injected {
                    from: virt,
                    data: Bytes::from(data),
                };
                if injector.send(packet).await.is_err() {
                    return Ok(());
                }
            }
        };
        // The verdict has a timer of its own: the writer can sit for a long time in a write
        // to a connection whose packets are dropped (its send buffer full), and that is
        // exactly when the path must be reported dead.
        let judge = async {
            let mut ticker = tokio::time::interval(PING_INTERVAL);
            loop {
                ticker.tick().await;
                let silent = last_rx.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                live_tx.send_if_modified(|live| {
                    let now = silent < DEAD_AFTER;
                    std::mem::replace(live, now) != now
                });
            }
        };
        let result: std::io::Result<()> = tokio::select! {
            r = write => r,
            r = read => r,
            never = judge => never,
        };
        let _ = done_tx.send(result);
    });
    (tx, done_rx, live_rx)
}

/// Writes a datagram's frame. Lengths 0 and 1 are pings and pongs; no QUIC datagram is that
/// short, so such a "datagram" is dropped rather than mistaken for one.
async fn write_datagram<W: AsyncWrite + Unpin>(w: &mut W, packet: &[u8]) -> std::io::Result<()> {
    if packet.len() < 2 {
        return Ok(());
    }
    write_frame(w, packet).await
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, packet: &[u8]) -> std::io::Result<()> {
    let Ok(len) = u16::try_from(packet.len()) else {
        return Ok(()); // Never happens for QUIC datagrams; a lost datagram if it did.
    };

    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(packet).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_cross_a_stream_with_their_boundaries() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let virt_a: SocketAddr = "240.0.0.1:1".parse().unwrap();
        let virt_b: SocketAddr = "240.0.0.2:1".parse().unwrap();
        let (inj_a, mut got_a) = mpsc::channel(16);
        let (inj_b, mut got_b) = mpsc::channel(16);
        let (to_b, _done_a) = spawn(a, virt_b, inj_a);
        let (to_a, _done_b) = spawn(b, virt_a, inj_b);
        for n in [2usize, 1200, 1452, 65_535] {
            to_b.send(Bytes::from(vec![n as u8; n])).await.unwrap();
        }
        to_a.send(Bytes::from_static(b"back")).await.unwrap();
        for n in [2usize, 1200, 1452, 65_535] {
            let p = got_b.recv().await.unwrap();
            assert_eq!((p.from, p.data.len()), (virt_a, n));
        }
        let p = got_a.recv().await.unwrap();
        assert_eq!((p.from, &p.data[..]), (virt_b, &b"back"[..]));
    }

    #[tokio::test]
    async fn a_silent_connection_is_reported_dead_and_live_again() {
        // The far end is a bare duplex end: it reads our pings but never answers.
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (inj, _rx) = mpsc::channel(16);
        let (_tx, _done, mut live) = spawn_checked(a, "240.0.0.1:1".parse().unwrap(), inj);
        assert!(*live.borrow());
        tokio::time::timeout(DEAD_AFTER * 3, live.changed())
            .await
            .expect("reported dead in time")
            .unwrap();
        assert!(!*live.borrow());
        use tokio::io::AsyncWriteExt;
        b.write_all(&[0, 1, 0]).await.unwrap(); // a pong
        tokio::time::timeout(PING_INTERVAL * 2, live.changed())
            .await
            .expect("live again")
            .unwrap();
        assert!(*live.borrow());
    }

    #[tokio::test]
    async fn the_end_of_the_stream_is_reported() {
        let (a, b) = tokio::io::duplex(1024);
        let (inj, _rx) = mpsc::channel(16);
        let (_tx, done) = spawn(a, "240.0.0.1:1".parse().unwrap(), inj);
        drop(b);
        assert!(done.await.unwrap().is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(32))]

            /// Any datagrams (two bytes or more) cross a framed stream whole and in order.
            #[test]
            fn datagrams_round_trip(packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 2..1500), 0..12)) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let got = rt.block_on(async {
                    let (a, b) = tokio::io::duplex(1 << 16);
                    let virt: SocketAddr = "240.0.0.1:1".parse().unwrap();
                    let (inj, mut rx) = mpsc::channel(16);
                    let (to_b, _done_a) = spawn(a, virt, mpsc::channel(1).0);
                    let (_to_a, _done_b) = spawn(b, virt, inj);
                    for p in &packets {
                        to_b.send(Bytes::from(p.clone())).await.unwrap();
                    }
                    let mut got = Vec::new();
                    for _ in &packets {
                        got.push(rx.recv().await.unwrap().data.to_vec());
                    }
                    got
                });
                prop_assert_eq!(got, packets);
            }
        }
    }
}
