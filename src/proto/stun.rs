//! STUN (RFC 8489) as p2ptun uses it: Binding requests to learn a NAT mapping, the RFC 5780
//! attributes for behaviour tests, and short-term-credential checks between peers.
//!
//! Encoding and decoding are `stun_codec`'s; this module fixes the attribute set and gives the
//! few message shapes p2ptun sends names of their own.

use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use rand::RngCore;
use stun_codec::rfc5389::attributes::{
    ErrorCode, Fingerprint as StunFingerprint, MappedAddress, MessageIntegrity, Software, Username,
    XorMappedAddress,
};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::rfc5780::attributes::{ChangeRequest, OtherAddress, ResponseOrigin};

use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

stun_codec::define_attribute_enums!(
    Attr,
    AttrDecoder,
    AttrEncoder,
    [
        MappedAddress,
        XorMappedAddress,
        Username,
        MessageIntegrity,
        StunFingerprint,
        ErrorCode,
        Software,
        ChangeRequest,
        OtherAddress,
        ResponseOrigin
    ]
);

/// A STUN message with the attributes p2ptun understands.
pub type StunMessage = Message<Attr>;

pub use stun_codec::TransactionId as Tid;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// Why a datagram is not a usable STUN message.
#[derive(Debug, thiserror::Error)]
pub enum StunError {
    /// Not STUN at all, or broken beyond decoding.
    #[error("not a STUN message: {0}")]
    Malformed(String),
    /// Decoded, but an attribute inside is broken.
    #[error("STUN message with a broken attribute")]
    BrokenAttribute,
}

/// Tells STUN apart from QUIC by the first bytes: STUN's two top bits are zero and bytes 4..8
/// are the magic cookie, while every QUIC packet p2ptun sends has its fixed bit (0x40) set
/// (the endpoints are built with `grease_quic_bit(false)`).
pub fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= 20 && packet[0] & 0xc0 == 0 && packet[4..8] == MAGIC_COOKIE
}

/// An RFC 3489 ("classic") Binding request's type; RFC 8489 kept the number.
const CLASSIC_BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
/// An RFC 3489 Binding response's type.
const CLASSIC_BINDING_RESPONSE: [u8; 2] = [0x01, 0x01];
/// The MAPPED-ADDRESS attribute (RFC 3489 §11.2.1, RFC 8489 §14.1).
const MAPPED_ADDRESS: u16 = 0x0001;
/// The CHANGE-REQUEST attribute (RFC 3489 §11.2.4, RFC 5780 §7.2).
const CHANGE_REQUEST: u16 = 0x0003;

/// Whether `packet` has the shape of an RFC 3489 ("classic") Binding request: the type
/// 0x0001, a length that matches the datagram exactly, and no magic cookie (RFC 3489 has
/// none: its transaction ID is 16 bytes long). Only the shape: [`classic_request`] reads it.
///
/// The first byte is 0x00, so such a datagram is never one of p2ptun's QUIC packets, whose
/// fixed bit (0x40) is always set.
pub fn is_classic_request(packet: &[u8]) -> bool {
    packet.len() >= 20
        && packet[..2] == CLASSIC_BINDING_REQUEST
        && usize::from(u16::from_be_bytes([packet[2], packet[3]])) + 20 == packet.len()
        && packet.len().is_multiple_of(4)
        && packet[4..8] != MAGIC_COOKIE
}

/// Whether a datagram is STUN of either generation, RFC 8489 ([`is_stun`]) or an RFC 3489
/// Binding request ([`is_classic_request`]): what the UDP socket takes out of the stream
/// before QUIC sees it. Neither can be a QUIC packet of p2ptun's (see [`is_stun`]).
pub fn is_any_stun(packet: &[u8]) -> bool {
    is_stun(packet) || is_classic_request(packet)
}

/// What S needs to know of an RFC 3489 Binding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassicRequest {
    /// The whole 16-byte transaction ID, echoed in the answer.
    pub tid: [u8; 16],
    /// The CHANGE-REQUEST flags (change IP, change port), when the attribute is there.
    pub change: Option<(bool, bool)>,
    /// Whether the request carries a comprehension-required attribute (type below 0x8000)
    /// other than CHANGE-REQUEST, which a server without it must not answer as if it had
    /// understood (RESPONSE-ADDRESS, USERNAME, MESSAGE-INTEGRITY, ...).
    pub unknown_required: bool,
}

/// Reads an RFC 3489 Binding request; `None` unless [`is_classic_request`] holds and every
/// attribute fits exactly within the declared length (a CHANGE-REQUEST's value being 4 bytes).
pub fn classic_request(packet: &[u8]) -> Option<ClassicRequest> {
    if !is_classic_request(packet) {
        return None;
    }
    let tid: [u8; 16] = packet.get(4..20)?.try_into().ok()?;
    let mut request = ClassicRequest {
        tid,
        change: None,
        unknown_required: false,
    };
    let mut at = 20;
    while at < packet.len() {
        let header = packet.get(at..at + 4)?;
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        // RFC 3489's attributes are all multiples of 4 bytes long; padding as RFC 8489
        // does accepts both.
        let value = packet.get(at + 4..at + 4 + len)?;
        match kind {
            CHANGE_REQUEST => {
                let flags = u32::from_be_bytes(value.try_into().ok()?);
                request.change = Some((flags & 0x4 != 0, flags & 0x2 != 0));
            }
            k if k < 0x8000 => request.unknown_required = true,
            _ => {}
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    (at == packet.len()).then_some(request)
}

/// An RFC 3489 Binding success response to the request with `tid`: MAPPED-ADDRESS (not
/// XOR-MAPPED-ADDRESS, which a classic client does not know) and the request's whole
/// transaction ID, as RFC 8489 §12.2 asks of a server answering a classic client. An
/// IPv4-mapped `mapped` is reported in its IPv4 form; IPv6 uses family 0x02 as RFC 8489
/// defines it (RFC 3489 knew only IPv4). 32 bytes for IPv4, 44 for IPv6.
pub fn classic_binding_success(tid: &[u8; 16], mapped: SocketAddr) -> Vec<u8> {
    let ip = mapped.ip().to_canonical();
    let (family, address): (u8, Vec<u8>) = match ip {
        std::net::IpAddr::V4(v4) => (0x01, v4.octets().to_vec()),
        std::net::IpAddr::V6(v6) => (0x02, v6.octets().to_vec()),
    };
    let value_len = 4 + address.len();
    let mut out = Vec::with_capacity(20 + 4 + value_len);
    out.extend_from_slice(&CLASSIC_BINDING_RESPONSE);
    out.extend_from_slice(&(4 + value_len as u16).to_be_bytes());
    out.extend_from_slice(tid);
    out.extend_from_slice(&MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(value_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, family]);
    out.extend_from_slice(&mapped.port().to_be_bytes());
    out.extend_from_slice(&address);
    out
}

/// A fresh random transaction ID.
pub fn new_tid() -> TransactionId {
    let mut id = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut id);
    TransactionId::new(id)
}

/// Decodes a datagram.
pub fn decode(packet: &[u8]) -> Result<StunMessage, StunError> {
    let decoded = MessageDecoder::<Attr>::new()
        .decode_from_bytes(packet)
        .map_err(|e| StunError::Malformed(format!("{:?}", e.kind())))?;
    decoded.map_err(|_| StunError::BrokenAttribute)
}

/// Encodes a message. Only fails on messages this module could not have built.
pub fn encode(msg: StunMessage) -> Vec<u8> {
    MessageEncoder::new()
        .encode_into_bytes(msg)
        .unwrap_or_default()
}

/// The size of the fullest Binding success answer S sends: the header, three IPv6
/// addresses (mapped, RESPONSE-ORIGIN, OTHER-ADDRESS) and FINGERPRINT.
pub const FULL_ANSWER_LEN: usize = 20 + 3 * 24 + 8;

/// What the padding of [`binding_request`] says it is.
const SOFTWARE_NAME: &str = "p2ptun";

/// The size of the smallest complete Binding success answer to a request from `mapped`:
/// the header, the mapped address and FINGERPRINT.
pub fn minimal_answer_len(mapped: SocketAddr) -> usize {
    20 + addr_len(mapped) + 8
}

/// The size of an address attribute: 12 bytes for IPv4, 24 for IPv6.
fn addr_len(addr: SocketAddr) -> usize {
    if addr.is_ipv4() {
        12
    } else {
        24
    }
}

/// A Binding request, optionally asking the server to answer from its other address and/or
/// port (RFC 5780 CHANGE-REQUEST), [`FULL_ANSWER_LEN`] bytes long.
///
/// S answers no more bytes than a request has, beyond the smallest complete answer, so that
/// nobody can use it to multiply traffic toward a forged source; a request has to be as
/// large as the answer it wants (with OTHER-ADDRESS, which the NAT tests need). The room is
/// filled by SOFTWARE rather than RFC 5780's PADDING: SOFTWARE is comprehension-optional,
/// so every STUN server ignores it, where PADDING would get a 420 from many.
pub fn binding_request(tid: TransactionId, change: Option<(bool, bool)>) -> Vec<u8> {
    let mut msg = StunMessage::new(MessageClass::Request, BINDING, tid);
    let mut used = 20;
    if let Some((ip, port)) = change {
        msg.add_attribute(ChangeRequest::new(ip, port));
        used += 8;
    }
    // The attribute's own header takes 4 bytes; the rest (a multiple of 4) is the value.
    let room = FULL_ANSWER_LEN.saturating_sub(used + 4);
    if let Ok(software) = Software::new(format!("{SOFTWARE_NAME:<room$}")) {
        msg.add_attribute(software);
    }
    encode(msg)
}

/// A Binding indication (RFC 8489 §3.2): a STUN message nobody answers, sent only to make a
/// NAT create or keep a mapping.
pub fn binding_indication() -> Vec<u8> {
    encode(StunMessage::new(
        MessageClass::Indication,
        BINDING,
        new_tid(),
    ))
}

/// A connectivity check (RFC 8445 §7.2.2): a Binding request with USERNAME, keyed by the
/// receiver's password, with a FINGERPRINT.
pub fn connectivity_check(tid: TransactionId, username: &str, password: &str) -> Vec<u8> {
    let mut msg = StunMessage::new(MessageClass::Request, BINDING, tid);
    if let Ok(user) = Username::new(username.to_owned()) {
        msg.add_attribute(user);
    }
    seal(msg, Some(password))
}

/// What a Binding success response reports besides the mapped address.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResponseExtras {
    /// RFC 5780 RESPONSE-ORIGIN: the address the response is sent from.
    pub response_origin: Option<SocketAddr>,
    /// RFC 5780 OTHER-ADDRESS: where the server answers CHANGE-REQUEST from.
    pub other_address: Option<SocketAddr>,
}

/// A Binding success response telling the requester where it was seen from.
///
/// `budget` caps the response's size (S passes a multiple of the request's size so it never
/// amplifies); optional attributes are left out when they would exceed it.
pub fn binding_success(
    tid: TransactionId,
    mapped: SocketAddr,
    extras: ResponseExtras,
    password: Option<&str>,
    budget: usize,
) -> Vec<u8> {
    let mut msg = StunMessage::new(MessageClass::SuccessResponse, BINDING, tid);
    msg.add_attribute(XorMappedAddress::new(mapped));
    // Integrity takes 24 bytes.
    let mut size = minimal_answer_len(mapped) + if password.is_some() { 24 } else { 0 };
    // OTHER-ADDRESS first: a client's behaviour tests need it, RESPONSE-ORIGIN is only
    // informative, and a small request's budget has room for one of them.
    for (attr, addr) in [(1u8, extras.other_address), (0u8, extras.response_origin)] {
        let Some(addr) = addr else { continue };
        if size + addr_len(addr) > budget {
            continue;
        }
        size += addr_len(addr);
        match attr {
            0 => msg.add_attribute(ResponseOrigin::new(addr)),
            _ => msg.add_attribute(OtherAddress::new(addr)),
        }
    }
    seal(msg, password)
}

/// A Binding error response (used for checks that fail integrity: 401).
pub fn binding_error(tid: TransactionId, code: u16, reason: &str) -> Vec<u8> {
    let mut msg = StunMessage::new(MessageClass::ErrorResponse, BINDING, tid);
    if let Ok(err) = ErrorCode::new(code, reason.to_owned()) {
        msg.add_attribute(err);
    }
    seal(msg, None)
}

/// Adds MESSAGE-INTEGRITY (when keyed) and FINGERPRINT, which must come last, and encodes.
fn seal(mut msg: StunMessage, password: Option<&str>) -> Vec<u8> {
    if let Some(pwd) = password {
        if let Ok(mi) = MessageIntegrity::new_short_term_credential(&msg, pwd) {
            msg.add_attribute(mi);
        }
    }
    if let Ok(fp) = StunFingerprint::new(&msg) {
        msg.add_attribute(fp);
    }
    encode(msg)
}

/// Whether `msg` is a Binding request.
pub fn is_binding_request(msg: &StunMessage) -> bool {
    msg.method() == BINDING && msg.class() == MessageClass::Request
}

/// Whether `msg` is a Binding success response.
pub fn is_binding_success(msg: &StunMessage) -> bool {
    msg.method() == BINDING && msg.class() == MessageClass::SuccessResponse
}

/// The USERNAME of a message, if any.
pub fn username(msg: &StunMessage) -> Option<&str> {
    msg.get_attribute::<Username>().map(|u| u.name())
}

/// Whether `msg` carries MESSAGE-INTEGRITY that is valid for `password`.
pub fn has_valid_integrity(msg: &StunMessage, password: &str) -> bool {
    msg.get_attribute::<MessageIntegrity>()
        .is_some_and(|mi| mi.check_short_term_credential(password).is_ok())
}

/// The (XOR-)MAPPED-ADDRESS of a response.
pub fn mapped_address(msg: &StunMessage) -> Option<SocketAddr> {
    msg.get_attribute::<XorMappedAddress>()
        .map(|a| a.address())
        .or_else(|| msg.get_attribute::<MappedAddress>().map(|a| a.address()))
}

/// The RFC 5780 OTHER-ADDRESS of a response.
pub fn other_address(msg: &StunMessage) -> Option<SocketAddr> {
    msg.get_attribute::<OtherAddress>().map(|a| a.address())
}

/// The RFC 5780 RESPONSE-ORIGIN of a response.
pub fn response_origin(msg: &StunMessage) -> Option<SocketAddr> {
    msg.get_attribute::<ResponseOrigin>().map(|a| a.address())
}

/// The (change IP, change port) flags of a CHANGE-REQUEST attribute (RFC 5780 §7.2: bits
/// 0x4 and 0x2 of its 32-bit value), read from the raw message.
///
/// Read here rather than through `stun_codec`, whose decoder (0.3) takes the flags from bits
/// 0x2 and 0x1: it would read miniupnpd's "change port" as "change IP" and its "change IP"
/// as no change at all.
pub fn change_request(message: &[u8]) -> Option<(bool, bool)> {
    let declared = usize::from(u16::from_be_bytes([*message.get(2)?, *message.get(3)?]));
    let end = message.len().min(20 + declared);
    let mut at = 20;
    while at + 4 <= end {
        let kind = u16::from_be_bytes([message[at], message[at + 1]]);
        let len = usize::from(u16::from_be_bytes([message[at + 2], message[at + 3]]));
        let value = message.get(at + 4..at + 4 + len)?;
        if kind == CHANGE_REQUEST {
            let flags = u32::from_be_bytes(value.try_into().ok()?);
            return Some((flags & 0x4 != 0, flags & 0x2 != 0));
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_round_trip_reports_mapping() {
        let tid = new_tid();
        let req = binding_request(tid, None);
        assert!(is_stun(&req));
        let msg = decode(&req).unwrap();
        assert!(is_binding_request(&msg));
        assert_eq!(msg.transaction_id(), tid);

        let mapped: SocketAddr = "203.0.113.7:4242".parse().unwrap();
        let extras = ResponseExtras {
            response_origin: Some("203.0.113.1:7000".parse().unwrap()),
            other_address: Some("203.0.113.2:7001".parse().unwrap()),
        };
        let resp = binding_success(tid, mapped, extras, None, 1000);
        let msg = decode(&resp).unwrap();
        assert!(is_binding_success(&msg));
        assert_eq!(mapped_address(&msg), Some(mapped));
        assert_eq!(other_address(&msg), extras.other_address);
    }

    #[test]
    fn change_request_survives_encoding_and_raw_decoding() {
        for flags in [(false, false), (true, false), (false, true), (true, true)] {
            let req = binding_request(new_tid(), Some(flags));
            assert_eq!(change_request(&req), Some(flags));
        }
        assert_eq!(change_request(&binding_request(new_tid(), None)), None);
    }

    #[test]
    fn responses_respect_the_size_budget() {
        let tid = new_tid();
        let extras = ResponseExtras {
            response_origin: Some("203.0.113.1:7000".parse().unwrap()),
            other_address: Some("203.0.113.2:7001".parse().unwrap()),
        };
        let mapped = "203.0.113.7:4242".parse().unwrap();
        let small = binding_success(tid, mapped, extras, None, 60);
        assert!(small.len() <= 60, "{}", small.len());
        let small = decode(&small).unwrap();
        assert_eq!(mapped_address(&small), Some(mapped));
        assert_eq!(
            other_address(&small),
            extras.other_address,
            "OTHER-ADDRESS fits in 60 bytes"
        );
    }

    #[test]
    fn checks_verify_only_with_the_right_password() {
        let tid = new_tid();
        let check = connectivity_check(tid, "remote:local", "pw-of-remote");
        let msg = decode(&check).unwrap();
        assert_eq!(username(&msg), Some("remote:local"));
        assert!(has_valid_integrity(&msg, "pw-of-remote"));
        assert!(!has_valid_integrity(&msg, "another"));

        let mut tampered = check.clone();
        let n = tampered.len();
        tampered[n - 30] ^= 1; // inside the HMAC
                               // Either FINGERPRINT catches it first, or the integrity check must.
        if let Ok(msg) = decode(&tampered) {
            assert!(!has_valid_integrity(&msg, "pw-of-remote"));
        }
    }

    /// A classic (RFC 3489) Binding request, by hand: type 0x0001, length, a 16-byte
    /// transaction ID, then `attributes`.
    fn classic(tid: [u8; 16], attributes: &[u8]) -> Vec<u8> {
        let mut r = vec![0x00, 0x01];
        r.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        r.extend_from_slice(&tid);
        r.extend_from_slice(attributes);
        r
    }

    const TID: [u8; 16] = [
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e,
        0x1f,
    ];

    #[test]
    fn classic_requests_are_recognised_and_read() {
        let bare = classic(TID, &[]);
        assert!(is_classic_request(&bare) && is_any_stun(&bare) && !is_stun(&bare));
        assert_eq!(
            classic_request(&bare),
            Some(ClassicRequest {
                tid: TID,
                change: None,
                unknown_required: false
            })
        );
        let change = classic(TID, &[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x06]);
        let read = classic_request(&change).unwrap();
        assert_eq!(read.change, Some((true, true)));
        assert!(!read.unknown_required);
        // RESPONSE-ADDRESS (0x0002) is comprehension-required; SOFTWARE (0x8022) is not.
        let response_address = classic(TID, &[0x00, 0x02, 0x00, 0x08, 0, 1, 0, 9, 1, 2, 3, 4]);
        assert!(classic_request(&response_address).unwrap().unknown_required);
        let software = classic(TID, &[0x80, 0x22, 0x00, 0x03, b'a', b'b', b'c', 0]);
        assert!(!classic_request(&software).unwrap().unknown_required);
        // A modern request is not classic, and a classic one does not pass for modern.
        let modern = binding_request(new_tid(), None);
        assert!(!is_classic_request(&modern) && is_any_stun(&modern));
        assert!(decode(&bare).is_err());
    }

    #[test]
    fn malformed_classic_requests_are_refused() {
        let good = classic(TID, &[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x02]);
        // Truncated anywhere, or with bytes after the declared length.
        for n in 0..good.len() {
            assert!(classic_request(&good[..n]).is_none(), "truncated to {n}");
        }
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(classic_request(&long).is_none());
        // A declared length that is not the datagram's, or not a multiple of 4.
        let mut bad_len = good.clone();
        bad_len[3] = 4;
        assert!(classic_request(&bad_len).is_none());
        let mut odd = classic(TID, &[0x80, 0x22, 0x00, 0x01, b'a']);
        assert!(classic_request(&odd).is_none());
        odd.extend_from_slice(&[0; 3]);
        odd[3] = 8;
        assert!(classic_request(&odd).is_some());
        // An attribute running past the end; a CHANGE-REQUEST of the wrong size.
        assert!(classic_request(&classic(TID, &[0x00, 0x03, 0x00, 0x08, 0, 0, 0, 0])).is_none());
        assert!(classic_request(&classic(TID, &[0x00, 0x03, 0x00, 0x00])).is_none());
        // Another type (a classic response), or QUIC's first bytes: not a request.
        let mut response = good.clone();
        response[0] = 0x01;
        assert!(!is_classic_request(&response));
        for first in [0x40u8, 0x80, 0xc0] {
            let mut quic = good.clone();
            quic[0] |= first;
            assert!(!is_any_stun(&quic));
        }
        for seed in 0u8..=255 {
            let junk: Vec<u8> = (0..40u8)
                .map(|i| {
                    if i < 2 {
                        [0, 1][usize::from(i)]
                    } else {
                        i.wrapping_mul(seed) ^ seed
                    }
                })
                .collect();
            let _ = classic_request(&junk); // must not panic
        }
    }

    #[test]
    fn classic_answers_carry_mapped_address_and_the_whole_transaction_id() {
        let v4: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let answer = classic_binding_success(&TID, v4);
        let mut want = vec![0x01, 0x01, 0x00, 0x0c];
        want.extend_from_slice(&TID);
        want.extend_from_slice(&[0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x9c, 0x40]);
        want.extend_from_slice(&[198, 51, 100, 7]);
        assert_eq!(answer, want);
        // IPv4-mapped is answered in the IPv4 form.
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().unwrap();
        assert_eq!(classic_binding_success(&TID, mapped), want);

        let v6: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let answer = classic_binding_success(&TID, v6);
        let mut want = vec![0x01, 0x01, 0x00, 0x18];
        want.extend_from_slice(&TID);
        want.extend_from_slice(&[0x00, 0x01, 0x00, 0x14, 0x00, 0x02, 0x9c, 0x40]);
        want.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(answer, want);
        // Both are no larger than the smallest complete modern answer, which S allows any
        // request.
        assert!(answer.len() <= minimal_answer_len(v6));
    }

    #[test]
    fn garbage_is_not_stun_and_does_not_decode() {
        assert!(!is_stun(&[0x40; 40]));
        assert!(!is_stun(&[0u8; 10]));
        let mut fake = binding_request(new_tid(), None);
        fake.truncate(19);
        assert!(decode(&fake).is_err());
        let mut bad_len = binding_request(new_tid(), None);
        bad_len[3] = 200;
        assert!(decode(&bad_len).is_err());
        for seed in 0u8..50 {
            let junk: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let _ = decode(&junk); // must not panic
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn addr() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
                (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Requests and answers decode to what they were made of, and re-encode to the
            /// same bytes.
            #[test]
            fn binding_messages_round_trip(
                tid in any::<[u8; 12]>(),
                change in prop::option::of(any::<(bool, bool)>()),
                mapped in addr(),
                origin in prop::option::of(addr()),
                other in prop::option::of(addr()),
                password in prop::option::of("[ -~]{1,20}"),
            ) {
                let tid = TransactionId::new(tid);
                let req = binding_request(tid, change);
                let msg = decode(&req).unwrap();
                prop_assert!(is_binding_request(&msg));
                prop_assert_eq!(msg.transaction_id(), tid);
                prop_assert_eq!(change_request(&req), change);
                // stun_codec reads CHANGE-REQUEST's flags from the wrong bits (see
                // `change_request`), so only a request without it re-encodes to itself.
                if change.is_none() {
                    prop_assert_eq!(encode(msg), req);
                }

                let extras = ResponseExtras { response_origin: origin, other_address: other };
                let resp = binding_success(tid, mapped, extras, password.as_deref(), 1000);
                let msg = decode(&resp).unwrap();
                prop_assert!(is_binding_success(&msg));
                prop_assert_eq!(mapped_address(&msg), Some(mapped));
                prop_assert_eq!(other_address(&msg), other);
                prop_assert_eq!(response_origin(&msg), origin);
                if let Some(pwd) = &password {
                    prop_assert!(has_valid_integrity(&msg, pwd));
                }
                prop_assert_eq!(encode(msg), resp);
            }

            /// A check carries its username and verifies with its password only.
            #[test]
            fn checks_round_trip(tid in any::<[u8; 12]>(), user in "[a-zA-Z0-9+/]{1,32}:[a-zA-Z0-9+/]{1,32}", pwd in "[ -~]{1,40}") {
                let check = connectivity_check(TransactionId::new(tid), &user, &pwd);
                let msg = decode(&check).unwrap();
                prop_assert_eq!(username(&msg), Some(user.as_str()));
                prop_assert!(has_valid_integrity(&msg, &pwd));
                let wrong = format!("{pwd}x");
                prop_assert!(!has_valid_integrity(&msg, &wrong));
            }

            /// A classic request made by hand is read back with its ID and flags.
            #[test]
            fn classic_requests_round_trip(tid in any::<[u8; 16]>(), change in prop::option::of(any::<(bool, bool)>())) {
                prop_assume!(tid[..4] != MAGIC_COOKIE);
                let attributes = change.map_or(Vec::new(), |(ip, port)| {
                    vec![0, 3, 0, 4, 0, 0, 0, u8::from(ip) << 2 | u8::from(port) << 1]
                });
                let request = classic(tid, &attributes);
                let read = classic_request(&request).unwrap();
                prop_assert_eq!(read.tid, tid);
                prop_assert_eq!(read.change, change);
                prop_assert!(!read.unknown_required);
            }
        }
    }
}
