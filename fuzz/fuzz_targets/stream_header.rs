//! The header that opens every forwarded stream (`p2ptun::tunnel::header`). A header read
//! takes exactly its own bytes and is what the encoder makes of it: a valid service name (of
//! a TCP stream or a UDP flow), or a ping; a valid name encodes to headers that read back as
//! it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2ptun::proto::validate_name;
use p2ptun::tunnel::header::{self, Header};
use p2ptun_fuzz::block_on;

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut stream = data;
        if let Ok(read) = header::read(&mut stream).await {
            let used = data.len() - stream.len();
            let encoded = match &read {
                Header::Service(name) => {
                    assert!(validate_name(name).is_ok());
                    header::encode(name)
                }
                Header::Flow(name) => {
                    assert!(validate_name(name).is_ok());
                    header::encode_flow(name)
                }
                Header::Ping => header::encode_ping(),
            };
            assert_eq!(encoded, data[..used]);
        }
        if let Ok(name) = std::str::from_utf8(data) {
            if validate_name(name).is_ok() {
                let bytes = header::encode(name);
                assert_eq!(
                    header::read(&mut &bytes[..]).await.ok(),
                    Some(Header::Service(name.to_owned()))
                );
                let bytes = header::encode_flow(name);
                assert_eq!(
                    header::read(&mut &bytes[..]).await.ok(),
                    Some(Header::Flow(name.to_owned()))
                );
            }
        }
    });
});
