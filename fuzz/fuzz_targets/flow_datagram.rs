//! A UDP flow's datagram as it arrives from the peer (`p2ptun::tunnel::flow::unframe`): a
//! flow ID (a QUIC varint) and the payload after it, which is the datagram's tail, whole.
//! What reads back frames again (minimally) to a datagram that reads back the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use p2ptun::tunnel::flow::{frame, unframe, varint_len};

fuzz_target!(|data: &[u8]| {
    let Some((id, payload)) = unframe(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert!(data.ends_with(&payload));
    let len = varint_len(id).expect("a decoded ID fits a varint");
    assert!(len <= data.len() - payload.len());
    let again = frame(id, &payload).expect("a decoded ID frames");
    assert_eq!(unframe(again), Some((id, payload)));
});
