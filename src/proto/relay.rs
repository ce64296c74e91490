//! How S relays a session's QUIC packets between its two agents.
//!
//! Each packet of the end-to-end connection travels on the agent's *control* connection to S
//! as one QUIC DATAGRAM frame whose payload is the session ID (8 bytes, big-endian) followed
//! by the packet. S checks that the sender is one of the session's two agents, charges the
//! session's budgets, and sends the same payload as a DATAGRAM on the other agent's control
//! connection. S sees only ciphertext: the packet is end-to-end encrypted between the agents.
//!
//! A packet that does not fit in one DATAGRAM frame (the outer connection's
//! `max_datagram_size()` is smaller than the packet plus 8) is split into *fragments*, each
//! a DATAGRAM of its own: the session ID with its top bit set, a 4-byte packet number chosen
//! by whoever split it, the fragment's index and the fragment count (a byte each), then a
//! slice of the packet. This happens where a path's MTU is under about 1450 bytes (a VPN, or
//! quinn's black-hole detection taking congestion loss for a smaller MTU): an inner packet is
//! at least 1200 bytes, which no DATAGRAM of a 1200-byte outer packet can hold. S forwards
//! fragments as they are and splits whole packets that do not fit toward the receiver; only
//! the receiving agent puts them together again ([`Reassembly`]). A packet put together
//! wrongly (a lost fragment replaced by a stranger's) fails the inner connection's
//! authentication and counts as lost, like any other loss.
//!
//! A payload that fits in no datagram at all (the receiver takes no datagrams, or one would
//! need more than [`MAX_FRAGMENTS`]) goes on a unidirectional stream of its own with the same
//! payload, finished after it. Both S and the agents accept both forms.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before the packet in a relay payload.
pub const HEADER: usize = 8;

/// Bytes before the slice of the packet in a fragment.
pub const FRAGMENT_HEADER: usize = HEADER + 4 + 1 + 1;

/// The largest relay payload carried on a unidirectional stream.
pub const MAX_STREAM_PAYLOAD: usize = HEADER + 65_535;

/// The most fragments one packet is split into. Inner packets are at most about 1400 bytes
/// and any QUIC path carries DATAGRAMs of over 1100, so two is the usual count.
pub const MAX_FRAGMENTS: usize = 8;

/// The bit of the session ID field that marks a fragment. Session IDs never have it.
const FRAGMENT_BIT: u64 = 1 << 63;

/// The bit of a fragment's packet number set when S split the packet, so that S's numbers
/// and the sending agent's never meet in one session.
const SPLIT_BY_RELAY: u32 = 1 << 31;

/// The most bytes of a packet one fragment carries: a datagram of the largest MTU a control
/// connection probes for. Larger pieces are refused, so that what a [`Reassembly`] holds stays
/// small.
pub const MAX_FRAGMENT_DATA: usize = 1452;

/// Partly received packets a [`Reassembly`] keeps before it forgets the oldest.
const MAX_PENDING: usize = 32;

/// Partly received packets of one session a [`Reassembly`] keeps: one session's pieces (a
/// party to it sending junk, say) cannot push out the others'.
const MAX_PENDING_PER_SESSION: usize = 8;

/// Makes any 64-bit number a valid session ID (one without the fragment bit).
pub fn session_id(random: u64) -> u64 {
    random & !FRAGMENT_BIT
}

/// A relay payload: the session ID, then the packet.
pub fn encode(session: u64, packet: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER + packet.len());
    out.put_u64(session_id(session));
    out.extend_from_slice(packet);
    out.freeze()
}

/// What a relay payload carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// A whole packet.
    Packet(Bytes),
    /// One piece of a packet split to fit the path.
    Fragment(Fragment),
}

/// One piece of a packet (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Which packet this is part of, as numbered by whoever split it.
    pub packet: u32,
    /// This piece's place, from 0.
    pub index: u8,
    /// How many pieces the packet has (2 to [`MAX_FRAGMENTS`]).
    pub count: u8,
    /// The piece's bytes.
    pub data: Bytes,
}

/// Splits a relay payload into the session ID and what it carries; `None` if it is too
/// short, carries nothing, or is a fragment whose numbers make no sense.
pub fn decode(payload: &Bytes) -> Option<(u64, Relayed)> {
    let field = u64::from_be_bytes(payload.get(..HEADER)?.try_into().ok()?);
    let session = session_id(field);
    if field & FRAGMENT_BIT == 0 {
        return (payload.len() > HEADER)
            .then(|| (session, Relayed::Packet(payload.slice(HEADER..))));
    }
    if payload.len() <= FRAGMENT_HEADER {
        return None;
    }
    let packet = u32::from_be_bytes(payload[HEADER..HEADER + 4].try_into().ok()?);
    let (index, count) = (payload[HEADER + 4], payload[HEADER + 5]);
    if !(2..=MAX_FRAGMENTS).contains(&usize::from(count)) || index >= count {
        return None;
    }
    let data = payload.slice(FRAGMENT_HEADER..);
    if data.len() > MAX_FRAGMENT_DATA {
        return None;
    }
    Some((
        session,
        Relayed::Fragment(Fragment {
            packet,
            index,
            count,
            data,
        }),
    ))
}

/// The session a relay payload belongs to, whatever it carries; `None` if it is malformed.
pub fn session_of(payload: &Bytes) -> Option<u64> {
    decode(payload).map(|(session, _)| session)
}

/// The packet number for the `nth` packet split by an agent (`by_relay` false) or by S.
pub fn packet_number(nth: u32, by_relay: bool) -> u32 {
    if by_relay {
        nth | SPLIT_BY_RELAY
    } else {
        nth & !SPLIT_BY_RELAY
    }
}

/// Splits the whole-packet payload `payload` into fragment payloads of at most `max` bytes
/// each, numbered by `number()` (called only if the split can be done). `None` if it is not
/// a whole packet, or `max` is too small to do it in [`MAX_FRAGMENTS`].
pub fn fragment(payload: &Bytes, max: usize, number: impl FnOnce() -> u32) -> Option<Vec<Bytes>> {
    let (session, Relayed::Packet(body)) = decode(payload)? else {
        return None;
    };
    if max <= FRAGMENT_HEADER {
        return None;
    }
    let room = (max - FRAGMENT_HEADER).min(MAX_FRAGMENT_DATA);
    let count = body.len().div_ceil(room).max(2);
    if count > MAX_FRAGMENTS {
        return None;
    }
    let packet = number();
    // Even pieces, so that no fragment is a runt.
    let size = body.len().div_ceil(count);
    let pieces = body.chunks(size).enumerate().map(|(index, piece)| {
        let mut out = BytesMut::with_capacity(FRAGMENT_HEADER + piece.len());
        out.put_u64(session | FRAGMENT_BIT);
        out.put_u32(packet);
        out.put_u8(index as u8);
        out.put_u8(count as u8);
        out.extend_from_slice(piece);
        out.freeze()
    });
    let pieces: Vec<Bytes> = pieces.collect();
    // Only a one-byte packet cannot make two pieces; no QUIC packet is that small.
    (pieces.len() == count).then_some(pieces)
}

/// Puts fragments back together on the receiving agent. It holds at most [`MAX_PENDING`]
/// partial packets; a packet whose other pieces never come is forgotten when newer ones
/// push it out, so lost fragments cost nothing but the packet.
#[derive(Debug, Default)]
pub struct Reassembly {
    pending: VecDeque<Partial>,
}

#[derive(Debug)]
struct Partial {
    session: u64,
    packet: u32,
    pieces: Vec<Option<Bytes>>,
}

impl Reassembly {
    /// Takes one fragment of `session`; returns the packet once all its pieces are in.
    pub fn push(&mut self, session: u64, fragment: Fragment) -> Option<Bytes> {
        let count = usize::from(fragment.count);
        let at = self
            .pending
            .iter()
            .position(|p| p.session == session && p.packet == fragment.packet);
        let at = match at {
            // Same number, other count: a different packet reusing the number.
            Some(at) if self.pending[at].pieces.len() != count => {
                self.pending.remove(at);
                None
            }
            at => at,
        };
        let at = match at {
            Some(at) => at,
            None => {
                self.make_room(session);
                self.pending.push_back(Partial {
                    session,
                    packet: fragment.packet,
                    pieces: vec![None; count],
                });
                self.pending.len() - 1
            }
        };
        let partial = &mut self.pending[at];
        *partial.pieces.get_mut(usize::from(fragment.index))? = Some(fragment.data);
        if partial.pieces.iter().any(Option::is_none) {
            return None;
        }
        let partial = self.pending.remove(at)?;
        let mut out = BytesMut::new();
        for piece in partial.pieces.into_iter().flatten() {
            out.extend_from_slice(&piece);
        }
        Some(out.freeze())
    }

    /// Partly received packets held now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Forgets the oldest partial packet of `session` if it has its fill, else the oldest of
    /// all if the whole is full.
    fn make_room(&mut self, session: u64) {
        let own = self.pending.iter().filter(|p| p.session == session).count();
        if own >= MAX_PENDING_PER_SESSION {
            if let Some(at) = self.pending.iter().position(|p| p.session == session) {
                self.pending.remove(at);
            }
        } else if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragments_of(session: u64, packet: &[u8], number: u32, max: usize) -> Vec<Fragment> {
        fragment(&encode(session, packet), max, || number)
            .expect("splits")
            .iter()
            .map(|p| match decode(p) {
                Some((s, Relayed::Fragment(f))) if s == session => f,
                other => panic!("not a fragment of {session}: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn payloads_round_trip_and_short_ones_are_refused() {
        let p = encode(0x0102_0304_0506_0708, b"quic");
        assert_eq!(&p[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (session, packet) = decode(&p).unwrap();
        assert_eq!(session, 0x0102_0304_0506_0708);
        assert_eq!(packet, Relayed::Packet(Bytes::from_static(b"quic")));
        assert!(decode(&Bytes::from_static(&[0; 8])).is_none());
        assert!(decode(&Bytes::from_static(&[0; 3])).is_none());
    }

    #[test]
    fn session_ids_never_look_like_fragments() {
        assert_eq!(session_id(u64::MAX), u64::MAX >> 1);
        let (session, what) = decode(&encode(u64::MAX, b"x")).unwrap();
        assert_eq!(session, u64::MAX >> 1);
        assert!(matches!(what, Relayed::Packet(_)));
    }

    #[test]
    fn a_packet_split_to_fit_comes_back_whole_in_any_order() {
        let packet: Vec<u8> = (0..1400u32).map(|i| (i % 251) as u8).collect();
        let pieces = fragment(&encode(7, &packet), 1100, || 1).unwrap();
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.len() <= 1100));
        assert!(pieces.iter().all(|p| session_of(p) == Some(7)));

        let frags = fragments_of(7, &packet, 1, 1100);
        let mut r = Reassembly::default();
        assert_eq!(r.push(7, frags[1].clone()), None);
        assert_eq!(r.push(7, frags[0].clone()).as_deref(), Some(&packet[..]));
        assert_eq!(r.pending(), 0);

        // More pieces where the room is smaller; the last piece is no runt.
        let frags = fragments_of(7, &packet, 2, 300);
        assert_eq!(frags.len(), 5);
        assert!(frags.iter().all(|f| f.data.len() >= 250));
        let mut out = None;
        for f in frags.into_iter().rev() {
            out = r.push(7, f);
        }
        assert_eq!(out.as_deref(), Some(&packet[..]));
    }

    #[test]
    fn splitting_refuses_what_it_cannot_do() {
        let whole = encode(7, &[1; 1400]);
        assert!(fragment(&whole, FRAGMENT_HEADER, || 1).is_none(), "no room");
        assert!(
            fragment(&whole, 100, || 1).is_none(),
            "more than MAX_FRAGMENTS"
        );
        assert!(fragment(&encode(7, &[1]), 1000, || 1).is_none(), "one byte");
        let piece = fragment(&whole, 1000, || 1).unwrap().remove(0);
        assert!(fragment(&piece, 500, || 2).is_none(), "already a fragment");
    }

    #[test]
    fn pieces_that_do_not_fit_their_packet_are_refused() {
        let mut r = Reassembly::default();
        let stray = Fragment {
            packet: 1,
            index: 5,
            count: 2,
            data: Bytes::from_static(b"x"),
        };
        assert_eq!(r.push(1, stray), None);
        // A fragment larger than any datagram of a control connection is malformed.
        let mut big = BytesMut::from(&fragment(&encode(7, &[1; 1400]), 1000, || 1).unwrap()[0][..]);
        big.extend_from_slice(&[0; MAX_FRAGMENT_DATA]);
        assert!(decode(&big.freeze()).is_none());
        // A packet that cannot be split takes no number.
        let mut numbered = false;
        assert!(fragment(&encode(7, &[1; 1400]), 100, || {
            numbered = true;
            1
        })
        .is_none());
        assert!(!numbered);
    }

    #[test]
    fn agents_and_s_number_their_pieces_apart() {
        assert_ne!(packet_number(5, false), packet_number(5, true));
        assert_eq!(packet_number(u32::MAX, false), u32::MAX >> 1);
        assert_eq!(packet_number(0, true), 1 << 31);
    }

    #[test]
    fn malformed_fragments_are_refused() {
        let good = fragment(&encode(7, &[1; 1400]), 1000, || 9)
            .unwrap()
            .remove(0);
        let with = |at: usize, byte: u8| {
            let mut b = BytesMut::from(&good[..]);
            b[at] = byte;
            decode(&b.freeze())
        };
        assert!(with(HEADER + 5, 1).is_none(), "count 1");
        assert!(
            with(HEADER + 5, MAX_FRAGMENTS as u8 + 1).is_none(),
            "count too high"
        );
        assert!(with(HEADER + 4, 2).is_none(), "index past count");
        assert!(decode(&good.slice(..FRAGMENT_HEADER)).is_none(), "no data");
    }

    #[test]
    fn sessions_and_numbers_keep_packets_apart_and_lost_pieces_are_forgotten() {
        let (a, b) = (vec![0xaa; 1300], vec![0xbb; 1300]);
        let mut r = Reassembly::default();
        let fa = fragments_of(1, &a, 5, 800);
        let fb = fragments_of(2, &b, 5, 800);
        assert_eq!(r.push(1, fa[0].clone()), None);
        assert_eq!(r.push(2, fb[0].clone()), None);
        assert_eq!(r.push(2, fb[1].clone()).as_deref(), Some(&b[..]));
        assert_eq!(r.push(1, fa[1].clone()).as_deref(), Some(&a[..]));

        // One session's packets that never complete take at most its share of places, so a
        // packet of another session half in survives them.
        let fb = fragments_of(2, &b, 6, 800);
        assert_eq!(r.push(2, fb[0].clone()), None);
        for n in 0..100 {
            assert_eq!(r.push(1, fragments_of(1, &a, n, 800).remove(0)), None);
        }
        assert_eq!(r.pending(), MAX_PENDING_PER_SESSION + 1);
        assert_eq!(r.push(2, fb[1].clone()).as_deref(), Some(&b[..]));
        // All sessions together take at most MAX_PENDING.
        for session in 100..200 {
            assert_eq!(
                r.push(session, fragments_of(session, &a, 1, 800).remove(0)),
                None
            );
        }
        assert_eq!(r.pending(), MAX_PENDING);
        // A duplicate piece does not complete a packet by itself.
        let f = fragments_of(3, &a, 1, 800);
        assert_eq!(r.push(3, f[0].clone()), None);
        assert_eq!(r.push(3, f[0].clone()), None);
        assert_eq!(r.push(3, f[1].clone()).as_deref(), Some(&a[..]));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// A whole packet's payload decodes to its session and packet.
            #[test]
            fn payloads_round_trip(session in any::<u64>(), packet in prop::collection::vec(any::<u8>(), 1..1500)) {
                let p = encode(session, &packet);
                prop_assert_eq!(decode(&p), Some((session_id(session), Relayed::Packet(Bytes::from(packet)))));
            }

            /// A split packet's pieces fit, decode as pieces, and reassemble to exactly it in
            /// any order.
            #[test]
            fn pieces_reassemble_in_any_order(
                session in any::<u64>(),
                packet in prop::collection::vec(any::<u8>(), 2..3000),
                max in (FRAGMENT_HEADER + 1)..1500,
                number in any::<u32>(),
                seed in any::<u64>(),
            ) {
                let Some(pieces) = fragment(&encode(session, &packet), max, || number) else {
                    // Only when it cannot be done in MAX_FRAGMENTS.
                    let room = (max - FRAGMENT_HEADER).min(MAX_FRAGMENT_DATA);
                    prop_assert!(packet.len().div_ceil(room) > MAX_FRAGMENTS);
                    return Ok(());
                };
                let mut order: Vec<usize> = (0..pieces.len()).collect();
                // A permutation from the seed (Fisher-Yates with a small LCG).
                let mut s = seed;
                for i in (1..order.len()).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    order.swap(i, (s >> 33) as usize % (i + 1));
                }
                let mut r = Reassembly::default();
                let mut out = None;
                for &i in &order {
                    prop_assert!(pieces[i].len() <= max);
                    let Some((s, Relayed::Fragment(f))) = decode(&pieces[i]) else {
                        return Err(TestCaseError::fail("a piece does not decode"));
                    };
                    prop_assert_eq!(s, session_id(session));
                    prop_assert!(out.is_none());
                    out = r.push(s, f);
                }
                prop_assert_eq!(out.as_deref(), Some(&packet[..]));
                prop_assert_eq!(r.pending(), 0);
            }
        }
    }
}
