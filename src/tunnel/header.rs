//! The header that opens every forwarded stream: which service the stream is for.
//!
//! Layout: the 4 bytes `P2PT`, a kind byte, a length byte, then the service name. Kind 1
//! opens a stream to a TCP service, or with a length of 0 (no valid name is empty) a ping
//! stream (`p2ptun ping`); kind 2 opens a UDP flow to a UDP service (see
//! [`super::flow`]). Agents from before UDP services know only kind 1 (it was their version
//! byte) and refuse kind 2 as a bad header, which the forwarder reports as such.
//! The exposer answers a header it cannot serve by resetting the stream with one of the
//! [`codes`], which the forwarder turns into a message.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::validate_name;

const MAGIC: &[u8; 4] = b"P2PT";
/// The kind byte of a stream to a TCP service or a ping.
const KIND_STREAM: u8 = 1;
/// The kind byte of a UDP flow.
const KIND_FLOW: u8 = 2;

/// Stream reset and stop codes shared by both agents.
pub mod codes {
    /// The local TCP connection was reset (or failed) on the other side.
    pub const TCP_RESET: u32 = 1;
    /// The header named no service the exposer serves.
    pub const UNKNOWN_SERVICE: u32 = 2;
    /// The exposer could not connect to its local service.
    pub const SERVICE_UNAVAILABLE: u32 = 3;
    /// The exposer's allow list does not contain the forwarder.
    pub const NOT_ALLOWED: u32 = 4;
    /// The header was malformed.
    pub const BAD_HEADER: u32 = 5;
    /// The service is UDP and the stream was for TCP, or the other way round.
    pub const WRONG_PROTOCOL: u32 = 6;
    /// The UDP service has as many flows open as the exposer allows.
    pub const TOO_MANY_FLOWS: u32 = 7;

    /// What a code means, for messages.
    pub fn describe(code: u64) -> &'static str {
        match code as u32 {
            TCP_RESET => "the connection was reset on the other side",
            UNKNOWN_SERVICE => "the exposer does not serve this name",
            SERVICE_UNAVAILABLE => "the exposer could not connect to its local service",
            NOT_ALLOWED => "the exposer's --allow list does not include this agent",
            BAD_HEADER => "the exposer did not understand the stream header",
            WRONG_PROTOCOL => {
                "the exposer serves this name over the other protocol (TCP or UDP); check --udp \
                 on both sides"
            }
            TOO_MANY_FLOWS => "the exposer's UDP service has as many flows open as it allows",
            _ => "unknown reason",
        }
    }
}

/// Connection close codes of the peer connection.
pub mod close {
    /// The peer is not allowed to use any service here.
    pub const NOT_ALLOWED: u32 = 0x10;
    /// The peer's identity is not the one S introduced.
    pub const UNEXPECTED_PEER: u32 = 0x11;
    /// The agent is shutting down.
    pub const SHUTDOWN: u32 = 0x12;
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The stream does not start with the magic bytes or has an unknown kind.
    #[error("not a p2ptun stream header (or of a newer kind)")]
    BadMagic,
    /// The name is not valid.
    #[error("bad service name: {0}")]
    BadName(String),
    /// The stream ended or failed first.
    #[error("stream ended before the header was complete: {0}")]
    Io(#[from] std::io::Error),
}

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// The TCP service of this name.
    Service(String),
    /// A UDP flow to the UDP service of this name.
    Flow(String),
    /// A round trip: the exposer sends back what the stream carries (see
    /// [`crate::agent::ping`]).
    Ping,
}

/// The header of a ping stream.
pub fn encode_ping() -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[KIND_STREAM, 0]);
    out
}

/// The header for a stream to TCP service `name`.
pub fn encode(name: &str) -> Vec<u8> {
    encode_kind(KIND_STREAM, name)
}

/// The header for a flow to UDP service `name`.
pub fn encode_flow(name: &str) -> Vec<u8> {
    encode_kind(KIND_FLOW, name)
}

fn encode_kind(kind: u8, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len());
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.push(name.len().min(255) as u8);
    out.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
    out
}

/// Reads a header.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, HeaderError> {
    let mut fixed = [0u8; 6];
    r.read_exact(&mut fixed).await?;
    let kind = fixed[4];
    if &fixed[..4] != MAGIC || !matches!(kind, KIND_STREAM | KIND_FLOW) {
        return Err(HeaderError::BadMagic);
    }
    if fixed[5] == 0 {
        return match kind {
            KIND_STREAM => Ok(Header::Ping),
            _ => Err(HeaderError::BadName("a UDP flow names no service".into())),
        };
    }
    let mut name = vec![0u8; fixed[5] as usize];
    r.read_exact(&mut name).await?;
    let name = String::from_utf8(name).map_err(|_| HeaderError::BadName("not UTF-8".into()))?;
    validate_name(&name).map_err(HeaderError::BadName)?;
    Ok(match kind {
        KIND_FLOW => Header::Flow(name),
        _ => Header::Service(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips() {
        let bytes = encode("home");
        assert_eq!(
            read(&mut &bytes[..]).await.unwrap(),
            Header::Service("home".into())
        );
        let ping = encode_ping();
        assert_eq!(read(&mut &ping[..]).await.unwrap(), Header::Ping);
        let flow = encode_flow("dns");
        assert_eq!(
            read(&mut &flow[..]).await.unwrap(),
            Header::Flow("dns".into())
        );
    }

    #[tokio::test]
    async fn rejects_bad_headers() {
        assert!(matches!(
            read(&mut &b"HTTP/1.1"[..]).await,
            Err(HeaderError::BadMagic)
        ));
        let mut bad = encode("home");
        bad[6] = b'H';
        assert!(matches!(
            read(&mut &bad[..]).await,
            Err(HeaderError::BadName(_))
        ));
        let cut = &encode("home")[..7];
        assert!(matches!(read(&mut &cut[..]).await, Err(HeaderError::Io(_))));
        let mut unknown_kind = encode("home");
        unknown_kind[4] = 3;
        assert!(matches!(
            read(&mut &unknown_kind[..]).await,
            Err(HeaderError::BadMagic)
        ));
        let nameless_flow = &encode_flow("x")[..5];
        let mut nameless_flow = nameless_flow.to_vec();
        nameless_flow.push(0);
        assert!(matches!(
            read(&mut &nameless_flow[..]).await,
            Err(HeaderError::BadName(_))
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Every valid name makes a header that reads back as it, taking exactly its bytes.
            #[test]
            fn every_valid_name_round_trips(name in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", tail in prop::collection::vec(any::<u8>(), 0..8)) {
                let mut bytes = encode(&name);
                let len = bytes.len();
                bytes.extend_from_slice(&tail);
                let mut r = &bytes[..];
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                prop_assert_eq!(rt.block_on(read(&mut r)).unwrap(), Header::Service(name));
                prop_assert_eq!(bytes.len() - r.len(), len);
            }
        }
    }
}
