//! Copying bytes between a local TCP connection and a QUIC stream, both ways at once.
//!
//! Half-close is carried across: TCP EOF finishes the QUIC stream, and the stream's finish
//! shuts down the TCP write side, so protocols that read to EOF and then answer work. A
//! reset on either side resets the other (TCP RST ⇄ QUIC RESET_STREAM/STOP_SENDING), so a
//! failure is never mistaken for a clean end.

use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

const BUF: usize = 64 * 1024;

/// Copies between `tcp` and the stream pair until both directions have ended.
pub async fn splice(mut tcp: TcpStream, mut send: SendStream, mut recv: RecvStream) -> Outcome {
    let _ = tcp.set_nodelay(true);
    let mut copied = Outcome::default();
    let mut up_failure = None;
    let mut down_failure = None;
    let reset = {
        let (mut rd, mut wr) = tcp.split();

        let up = async {
            let mut buf = vec![0u8; BUF];
            loop {
                match rd.read(&mut buf).await {
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
                    Err(_) => {
                        let _ = send.reset(VarInt::from_u32(codes::TCP_RESET));
                        return End::Reset;
                    }
                }
            }
        };

        let down = async {
            loop {
                match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(chunk)) => {
                        if wr.write_all(&chunk.bytes).await.is_err() {
                            let _ = recv.stop(VarInt::from_u32(codes::TCP_RESET));
                            return End::Reset;
                        }
                        copied.down += chunk.bytes.len() as u64;
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
