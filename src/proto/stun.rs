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

/// A plain Binding request, optionally asking the server to answer from its other address
/// and/or port (RFC 5780 CHANGE-REQUEST).
pub fn binding_request(tid: TransactionId, change: Option<(bool, bool)>) -> Vec<u8> {
    let mut msg = StunMessage::new(MessageClass::Request, BINDING, tid);
    if let Some((ip, port)) = change {
        msg.add_attribute(ChangeRequest::new(ip, port));
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
    // Sizes: header 20, address attribute 12 (IPv4) or 24 (IPv6), integrity 24, fingerprint 8.
    let addr_len = |a: SocketAddr| if a.is_ipv4() { 12 } else { 24 };
    let mut size = 20 + addr_len(mapped) + 8 + if password.is_some() { 24 } else { 0 };
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

/// The (change IP, change port) flags of a CHANGE-REQUEST attribute (RFC 5780 §7.2: bits
/// 0x4 and 0x2 of its 32-bit value), read from the raw message.
///
/// Read here rather than through `stun_codec`, whose decoder (0.3) takes the flags from bits
/// 0x2 and 0x1: it would read miniupnpd's "change port" as "change IP" and its "change IP"
/// as no change at all.
pub fn change_request(message: &[u8]) -> Option<(bool, bool)> {
    const CHANGE_REQUEST: u16 = 0x0003;
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
            "OTHER-ADDRESS fits in 3 x 20"
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
}
