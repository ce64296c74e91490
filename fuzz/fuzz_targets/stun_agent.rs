//! STUN as the agent reads it (`p2ptun::proto::stun`): the datagram classifiers, the raw
//! CHANGE-REQUEST and classic-request readers, and `decode` with every accessor the agent
//! uses. A decoded message must encode to bytes that decode to the same message, and
//! encoding that again must give the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2ptun::proto::stun;

fuzz_target!(|data: &[u8]| {
    let modern = stun::is_stun(data);
    let classic = stun::is_classic_request(data);
    assert!(
        !(modern && classic),
        "one datagram, two generations of STUN"
    );
    assert_eq!(stun::is_any_stun(data), modern || classic);
    if let Some(request) = stun::classic_request(data) {
        assert!(classic);
        assert_eq!(request.tid[..], data[4..20]);
    }
    let _ = stun::change_request(data);

    let Ok(msg) = stun::decode(data) else {
        return;
    };
    let _ = (
        stun::is_binding_request(&msg),
        stun::is_binding_success(&msg),
        stun::username(&msg),
        stun::mapped_address(&msg),
        stun::other_address(&msg),
        stun::response_origin(&msg),
        stun::has_valid_integrity(&msg, "pw"),
    );
    let bytes = stun::encode(msg.clone());
    assert!(!bytes.is_empty(), "a decoded message encodes");
    let again = stun::decode(&bytes).expect("an encoded message decodes");
    assert_eq!(again.transaction_id(), msg.transaction_id());
    assert_eq!(again.class(), msg.class());
    assert_eq!(again.method(), msg.method());
    assert_eq!(stun::mapped_address(&again), stun::mapped_address(&msg));
    assert_eq!(stun::username(&again), stun::username(&msg));
    assert_eq!(stun::encode(again), bytes);
});
