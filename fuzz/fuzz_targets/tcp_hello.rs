//! The hello that opens a TCP punch (`p2ptun::punch::tcp`). A hello read takes exactly its
//! bytes and never verifies without the session's password; a hello made from any
//! credentials (the input cut into four strings) reads back and proves the session to the
//! other side, whenever its username fits the one-byte length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2ptun::proto::Credentials;
use p2ptun::punch::tcp::{hello, read_hello};
use p2ptun_fuzz::{block_on, split};

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut stream = data;
        if let Ok(theirs) = read_hello(&mut stream).await {
            let used = data.len() - stream.len();
            assert_eq!(used, 8 + 1 + theirs.username.len() + 32);
            let _ = theirs.receiver();
        }

        let text: Vec<String> = split(data, 4)
            .into_iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        let [a, b, c, d] = <[String; 4]>::try_from(text).expect("four parts");
        let ours = Credentials {
            local_ufrag: a,
            local_pwd: b,
            remote_ufrag: c,
            remote_pwd: d,
        };
        let theirs = Credentials {
            local_ufrag: ours.remote_ufrag.clone(),
            local_pwd: ours.remote_pwd.clone(),
            remote_ufrag: ours.local_ufrag.clone(),
            remote_pwd: ours.local_pwd.clone(),
        };
        let bytes = hello(&ours);
        let read = read_hello(&mut &bytes[..]).await;
        if ours.remote_ufrag.len() + 1 + ours.local_ufrag.len() <= 255 {
            let read = read.expect("a hello reads back");
            assert!(read.verify(&theirs), "a hello proves its session");
            if !ours.remote_ufrag.contains(':') {
                assert_eq!(read.receiver(), ours.remote_ufrag);
            }
            let mut wrong = theirs.clone();
            wrong.local_pwd.push('x');
            assert!(
                !read.verify(&wrong),
                "a hello proves nothing with another password"
            );
        }
    });
});
