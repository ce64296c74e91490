//! How S relays a session's QUIC packets between its two agents.
//!
//! Each packet of the end-to-end connection travels on the agent's *control* connection to S
//! as one QUIC DATAGRAM frame whose payload is the session ID (8 bytes, big-endian) followed
//! by the packet. S checks that the sender is one of the session's two agents, charges the
//! session's budgets, and sends the same payload as a DATAGRAM on the other agent's control
//! connection. S sees only ciphertext: the packet is end-to-end encrypted between the agents.
//!
//! A packet that does not fit in a DATAGRAM frame (the outer connection's
//! `max_datagram_size()` is smaller than the packet plus 8) is not dropped: it goes on a
//! unidirectional stream of its own with the same payload, finished after it. Both S and the
//! agents accept both forms.

/// Bytes before the packet in a relay payload.
pub const HEADER: usize = 8;

/// The largest relay payload carried on a unidirectional stream.
pub const MAX_STREAM_PAYLOAD: usize = HEADER + 65_535;

/// A relay payload: the session ID, then the packet.
pub fn encode(session: u64, packet: &[u8]) -> bytes::Bytes {
    let mut out = bytes::BytesMut::with_capacity(HEADER + packet.len());
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(packet);
    out.freeze()
}

/// Splits a relay payload into the session ID and the packet; `None` if it is too short or
/// carries an empty packet.
pub fn decode(payload: &bytes::Bytes) -> Option<(u64, bytes::Bytes)> {
    if payload.len() <= HEADER {
        return None;
    }
    let session = u64::from_be_bytes(payload[..HEADER].try_into().ok()?);
    Some((session, payload.slice(HEADER..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_short_ones_are_refused() {
        let p = encode(0x0102_0304_0506_0708, b"quic");
        assert_eq!(&p[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (session, packet) = decode(&p).unwrap();
        assert_eq!(session, 0x0102_0304_0506_0708);
        assert_eq!(&packet[..], b"quic");
        assert!(decode(&bytes::Bytes::from_static(&[0; 8])).is_none());
        assert!(decode(&bytes::Bytes::from_static(&[0; 3])).is_none());
    }
}
