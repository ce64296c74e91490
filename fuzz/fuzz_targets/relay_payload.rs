//! Relay payloads (`p2ptun::proto::relay`) and the agent's reassembly of their pieces. The
//! input is a sequence of payloads, each with a 2-byte length. A whole packet re-encodes to
//! its payload, and splits into pieces that reassemble to exactly it in any order; pieces fed
//! to one `Reassembly` never give out more bytes than went in, and it holds a bounded number
//! of partial packets.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use p2ptun::proto::relay::{
    self, Reassembly, Relayed, FRAGMENT_HEADER, MAX_FRAGMENTS, MAX_FRAGMENT_DATA,
};
use p2ptun_fuzz::records;

/// What `Reassembly` may hold at once (its `MAX_PENDING`).
const MAX_PENDING: usize = 32;

fuzz_target!(|data: &[u8]| {
    let mut reassembly = Reassembly::default();
    let (mut bytes_in, mut bytes_out) = (0usize, 0usize);
    for (nth, record) in records(data).into_iter().enumerate() {
        let payload = Bytes::copy_from_slice(record);
        let decoded = relay::decode(&payload);
        assert_eq!(
            relay::session_of(&payload),
            decoded.as_ref().map(|(s, _)| *s)
        );
        match decoded {
            None => {}
            Some((session, Relayed::Packet(packet))) => {
                assert_eq!(relay::encode(session, &packet), payload);
                split_and_reassemble(session, &packet, nth as u32);
            }
            Some((session, Relayed::Fragment(piece))) => {
                assert!(relay::session_id(session) == session);
                assert!((2..=MAX_FRAGMENTS).contains(&usize::from(piece.count)));
                assert!(piece.index < piece.count);
                assert!(!piece.data.is_empty() && piece.data.len() <= MAX_FRAGMENT_DATA);
                bytes_in += piece.data.len();
                if let Some(packet) = reassembly.push(session, piece) {
                    bytes_out += packet.len();
                }
                assert!(bytes_out <= bytes_in, "{bytes_out} bytes out of {bytes_in}");
                assert!(reassembly.pending() <= MAX_PENDING);
            }
        }
    }
});

/// Splits `packet` of `session` to fit datagrams of a size its first byte picks, and puts the
/// pieces back together, last first.
fn split_and_reassemble(session: u64, packet: &Bytes, number: u32) {
    let max = FRAGMENT_HEADER + 1 + usize::from(packet[0]) * 8;
    let whole = relay::encode(session, packet);
    let Some(pieces) = relay::fragment(&whole, max, || number) else {
        return;
    };
    assert!((2..=MAX_FRAGMENTS).contains(&pieces.len()));
    let mut reassembly = Reassembly::default();
    let mut out = None;
    for (i, piece) in pieces.iter().rev().enumerate() {
        assert!(
            piece.len() <= max,
            "a piece of {} bytes for {max}",
            piece.len()
        );
        let Some((s, Relayed::Fragment(f))) = relay::decode(piece) else {
            panic!("a piece that does not decode as one");
        };
        assert_eq!(s, session);
        assert!(out.is_none(), "a packet out before its last piece ({i})");
        out = reassembly.push(s, f);
    }
    assert_eq!(out.as_ref(), Some(packet));
    assert_eq!(reassembly.pending(), 0);
}
