//! The header that opens every forwarded stream (`p2ptun::tunnel::header`). A header read
//! takes exactly its own bytes, names a valid service, and is what `encode` makes of that
//! name; a valid name encodes to a header that reads back as it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2ptun::proto::validate_name;
use p2ptun::tunnel::header;
use p2ptun_fuzz::block_on;

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut stream = data;
        if let Ok(name) = header::read(&mut stream).await {
            assert!(validate_name(&name).is_ok());
            let used = data.len() - stream.len();
            assert_eq!(header::encode(&name), data[..used]);
        }
        if let Ok(name) = std::str::from_utf8(data) {
            if validate_name(name).is_ok() {
                let bytes = header::encode(name);
                assert_eq!(
                    header::read(&mut &bytes[..]).await.ok().as_deref(),
                    Some(name)
                );
            }
        }
    });
});
