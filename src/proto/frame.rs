//! Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! JSON because control messages are few and small, and a frame someone captured can be read
//! by eye; the length prefix because a stream has no message boundaries of its own.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side accepts. Control messages are far smaller; the limit keeps a
/// hostile peer from making us allocate.
pub const MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The announced length exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The frame is not a message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub async fn read_frame<T, R>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = reader.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Writes one frame and flushes it.
pub async fn write_frame<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec![1u32, 2, 3]).await.unwrap();
        write_frame(&mut buf, &"x").await.unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame::<Vec<u32>, _>(&mut r).await.unwrap(),
            Some(vec![1, 2, 3])
        );
        assert_eq!(
            read_frame::<String, _>(&mut r).await.unwrap(),
            Some("x".into())
        );
        assert!(read_frame::<String, _>(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_oversized_truncated_and_malformed_frames() {
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame::<String, _>(&mut &huge[..]).await,
            Err(FrameError::TooLarge(_))
        ));
        let cut = [0u8, 0, 0, 10, b'{'];
        assert!(matches!(
            read_frame::<String, _>(&mut &cut[..]).await,
            Err(FrameError::Truncated)
        ));
        let half_len = [0u8, 0];
        assert!(matches!(
            read_frame::<String, _>(&mut &half_len[..]).await,
            Err(FrameError::Truncated)
        ));
        let junk = [0u8, 0, 0, 3, b'a', b'b', b'c'];
        assert!(matches!(
            read_frame::<String, _>(&mut &junk[..]).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
