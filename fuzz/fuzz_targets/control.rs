//! Control messages and their framing: `read_frame` over a stream of frames, and the JSON of
//! `ClientMsg` / `ServerMsg`. Whatever decodes must encode and decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2ptun::proto::{read_frame, write_frame, ClientMsg, FrameError, ServerMsg, MAX_FRAME};
use p2ptun_fuzz::block_on;
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    json_round_trip::<ClientMsg>(data);
    json_round_trip::<ServerMsg>(data);
    block_on(frames::<ClientMsg>(data));
    block_on(frames::<ServerMsg>(data));
});

fn json_round_trip<T>(body: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(msg) = serde_json::from_slice::<T>(body) else {
        return;
    };
    let again = serde_json::to_vec(&msg).expect("a decoded message encodes");
    let back: T = serde_json::from_slice(&again).expect("an encoded message decodes");
    assert_eq!(back, msg);
}

/// Reads frames until the stream ends or one fails; each frame read takes exactly its length
/// prefix and body off the stream, and writes back as a frame that reads the same.
async fn frames<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut stream = data;
    loop {
        let before = stream.len();
        match read_frame::<T, _>(&mut stream).await {
            Ok(Some(msg)) => {
                let used = before - stream.len();
                assert!(
                    (4..=4 + MAX_FRAME).contains(&used),
                    "{used} bytes for one frame"
                );
                let mut out = Vec::new();
                match write_frame(&mut out, &msg).await {
                    Ok(()) => {
                        let back = read_frame::<T, _>(&mut &out[..]).await;
                        assert_eq!(back.expect("a written frame reads").as_ref(), Some(&msg));
                    }
                    // Defaults filled in on decoding (`nat`) can make the encoding longer
                    // than the frame it came in: refused on writing, as it must be.
                    Err(FrameError::TooLarge(n)) => assert!(n > MAX_FRAME),
                    Err(e) => panic!("writing a decoded message failed: {e}"),
                }
            }
            Ok(None) => {
                assert_eq!(before, 0, "a clean end only between frames");
                return;
            }
            Err(_) => return,
        }
    }
}
