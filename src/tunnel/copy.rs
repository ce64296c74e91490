//! Copying bytes between a local TCP connection and a QUIC stream, both ways at once.
//!
//! Half-close is carried across: TCP EOF finishes the QUIC stream, and the stream's finish
//! shuts down the TCP write side, so protocols that read to EOF and then answer work. A
//! reset on either side resets the other (TCP RST ⇄ QUIC RESET_STREAM/STOP_SENDING), so a
//! failure is never mistaken for a clean end.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::header::codes;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// EOF was passed on.
    Clean,
    /// The source or the sink failed; the whole connection is to be torn down.
    Reset,
}

/// What [`splice`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes from TCP to QUIC.
    pub up: u64,
    /// Bytes from QUIC to TCP.
    pub down: u64,
    /// Why the peer side failed, if it did (a reset with a reason, a lost connection).
    pub failure: Option<String>,
}

/// The most bytes taken from TCP in one read (and so handed to QUIC in one write).
const READ_MAX: usize = 64 * 1024;

/// The most QUIC chunks (about one packet's payload each) written to TCP in one `writev`.
/// quinn hands a stream whatever arrived since the last read, often a whole GRO batch, so
/// one system call carries tens of kilobytes instead of one packet's worth.
const WRITE_CHUNKS: usize = 32;

/// Copies between `tcp` and the stream pair until both directions have ended.
pub async fn splice(mut tcp: TcpStream, mut send: SendStream, mut recv: RecvStream) -> Outcome {
    let _ = tcp.set_nodelay(true);
    let mut copied = Outcome::default();
    let mut up_failure = None;
    let mut down_failure = None;
    let reset = {
        let (rd, mut wr) = tcp.split();

        let up = async {
            // Allocated when data is there and freed whenever the socket is drained, so an
            // idle connection holds no buffer. It is never zeroed (`try_read_buf` fills the
            // spare capacity): zeroing 64 KiB per connection would put it all in RSS.
            let mut buf: Vec<u8> = Vec::new();
            loop {
                if rd.readable().await.is_err() {
                    let _ = send.reset(VarInt::from_u32(codes::TCP_RESET));
                    return End::Reset;
                }
                if buf.capacity() == 0 {
                    buf.reserve_exact(READ_MAX);
                }
                buf.clear();
                match rd.try_read_buf(&mut buf) {
                    Ok(0) => {
                        let _ = send.finish();
                        return End::Clean;
                    }
                    Ok(n) => {
                        if let Err(e) = send.write_all(&buf[..n]).await {
                            // The peer stopped reading: nobody will take these bytes.
                            up_failure = Some(match e {
                                quinn::WriteError::Stopped(code) => {
                                    codes::describe(code.into_inner()).to_owned()
                                }
                                e => e.to_string(),
                            });
                            return End::Reset;
                        }
                        copied.up += n as u64;
                    }
                    // Readiness was stale: nothing to read after all. Give the buffer back
                    // before waiting, which may take as long as the connection is idle.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buf = Vec::new(),
                    Err(_) => {
                        let _ = send.reset(VarInt::from_u32(codes::TCP_RESET));
                        return End::Reset;
                    }
                }
            }
        };

        let down = async {
            let mut chunks: [Bytes; WRITE_CHUNKS] = Default::default();
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(Some(n)) => {
                        let len: usize = chunks[..n].iter().map(Bytes::len).sum();
                        if write_all_chunks(&mut wr, &mut chunks[..n]).await.is_err() {
                            let _ = recv.stop(VarInt::from_u32(codes::TCP_RESET));
                            return End::Reset;
                        }
                        copied.down += len as u64;
                    }
                    Ok(None) => {
                        let _ = wr.shutdown().await;
                        return End::Clean;
                    }
                    Err(ReadError::Reset(code)) => {
                        down_failure = Some(codes::describe(code.into_inner()).to_owned());
                        return End::Reset;
                    }
                    Err(e) => {
                        down_failure = Some(e.to_string());
                        return End::Reset;
                    }
                }
            }
        };

        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (None, None);
        loop {
            tokio::select! {
                e = &mut up, if up_end.is_none() => up_end = Some(e),
                e = &mut down, if down_end.is_none() => down_end = Some(e),
            }
            if up_end == Some(End::Reset) || down_end == Some(End::Reset) {
                break true;
            }
            if up_end.is_some() && down_end.is_some() {
                break false;
            }
        }
    };
    if reset {
        // Whichever side is still open learns of the failure.
        let _ = send.reset(VarInt::from_u32(codes::TCP_RESET));
        let _ = recv.stop(VarInt::from_u32(codes::TCP_RESET));
        // Linger 0 makes the close an RST instead of a FIN.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    }
    copied.failure = down_failure.or(up_failure);
    copied
}

/// Writes every chunk to `wr` with as few `writev` calls as the socket allows. Each chunk is
/// left empty, so it no longer holds the packet buffer it came from.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while chunks.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); WRITE_CHUNKS];
        let k = (chunks.len() - first).min(WRITE_CHUNKS);
        for (slice, chunk) in slices.iter_mut().zip(&chunks[first..first + k]) {
            *slice = IoSlice::new(chunk);
        }
        let mut written = wr.write_vectored(&slices[..k]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Drop what went out; a partly written chunk keeps its tail for the next call.
        while written > 0 && first < chunks.len() {
            let chunk = &mut chunks[first];
            let step = written.min(chunk.len());
            chunk.advance(step);
            written -= step;
            if chunk.is_empty() {
                // An emptied `Bytes` still pins its buffer; an idle connection keeps none.
                *chunk = Bytes::new();
                first += 1;
            }
        }
    }
}
