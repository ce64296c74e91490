//! The framing of QUIC datagrams on a TCP path (`p2ptun::path::tcp`), as the agent and S run
//! it: the input is what the far end writes before closing. Every frame of two bytes or more
//! reaches the injector whole and in order, pings and pongs (lengths 0 and 1) never do, and
//! a cut-off last frame is dropped.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use p2ptun::path::tcp::spawn_checked;
use p2ptun_fuzz::block_on;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

fuzz_target!(|data: &[u8]| {
    let virt: SocketAddr = "240.0.0.1:1".parse().expect("an address");
    let got = block_on(async {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        // Every frame has a 2-byte length: the queue holds all an input can carry.
        let (injector, mut injected) = mpsc::channel(data.len() / 2 + 1);
        let (_sender, done, _live) = spawn_checked(near, virt, injector);
        far.write_all(data)
            .await
            .expect("the duplex takes the input");
        far.shutdown().await.expect("the duplex closes");
        let _ = done.await;
        let mut got = Vec::new();
        while let Ok(packet) = injected.try_recv() {
            assert_eq!(packet.from, virt);
            got.push(packet.data.to_vec());
        }
        got
    });
    assert_eq!(got, datagrams(data));
});

/// The datagrams in `stream`, read independently of the code under test.
fn datagrams(mut stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while stream.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([stream[0], stream[1]]));
        let Some(body) = stream.get(2..2 + len) else {
            break;
        };
        if len >= 2 {
            out.push(body.to_vec());
        }
        stream = &stream[2 + len..];
    }
    out
}
