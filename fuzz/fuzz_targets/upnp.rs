//! UPnP IGD answers: the device description and service description XML and the SOAP
//! answers, read by `igd-next` in the calls the agent makes (`search_gateway`, then
//! `get_external_ip`, `add_port`, `add_any_port`: see `p2ptun::portmap::client`). The
//! agent's own entry searches on the SSDP multicast address, which a fuzz target cannot
//! answer from, so this calls `igd-next` the same way with SSDP pointed at a fake gateway on
//! loopback. Its SSDP answer is fixed (valid, pointing at its HTTP server); its HTTP server
//! answers the N-th request with the N-th part of the input (`p2ptun_fuzz::split`, five
//! parts: description, service description, then the SOAP answers).
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use igd_next::{PortMappingProtocol, SearchOptions};
use libfuzzer_sys::fuzz_target;
use p2ptun_fuzz::{block_on, split};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

fuzz_target!(|data: &[u8]| {
    let answers: Vec<Vec<u8>> = split(data, 5).into_iter().map(<[u8]>::to_vec).collect();
    block_on(run(answers));
});

async fn run(answers: Vec<Vec<u8>>) {
    let http = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let ssdp = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let (http_addr, ssdp_addr) = (
        http.local_addr().expect("bound"),
        ssdp.local_addr().expect("bound"),
    );
    let served = Arc::new(AtomicUsize::new(0));
    let gateway = fake_gateway(http, ssdp, http_addr, answers, Arc::clone(&served));
    let client = async {
        let mut options = SearchOptions::default();
        options.bind_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        options.broadcast_address = ssdp_addr;
        options.timeout = Some(Duration::from_secs(2));
        options.single_search_timeout = Some(Duration::from_secs(2));
        let Ok(gateway) = igd_next::aio::tokio::search_gateway(options).await else {
            return;
        };
        let _ = gateway.get_external_ip().await;
        let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 4000);
        let proto = PortMappingProtocol::UDP;
        if gateway
            .add_port(proto, 4000, local.into(), 3600, "p2ptun")
            .await
            .is_err()
        {
            let _ = gateway
                .add_any_port(proto, local.into(), 3600, "p2ptun")
                .await;
        }
    };
    // A search that dislikes an answer waits for another SSDP answer until its timeout; once
    // the fake gateway has been quiet for a few milliseconds nothing more will come.
    let quiet = async {
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let now = served.load(Ordering::SeqCst);
            if now == last {
                return;
            }
            last = now;
        }
    };
    tokio::select! {
        () = client => {}
        () = quiet => {}
        () = gateway => {}
    }
}

async fn fake_gateway(
    http: TcpListener,
    ssdp: UdpSocket,
    http_addr: SocketAddr,
    answers: Vec<Vec<u8>>,
    served: Arc<AtomicUsize>,
) {
    let mut buf = [0u8; 2048];
    let Ok((_, client)) = ssdp.recv_from(&mut buf).await else {
        return;
    };
    let answer = format!(
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nUSN: uuid:fuzz::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\nSERVER: fuzz UPnP/1.1\r\nLOCATION: http://{http_addr}/rootDesc.xml\r\n\r\n"
    );
    let _ = ssdp.send_to(answer.as_bytes(), client).await;
    served.fetch_add(1, Ordering::SeqCst);
    for body in answers {
        let Ok((mut conn, _)) = http.accept().await else {
            return;
        };
        read_request(&mut conn).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(&body).await;
        let _ = conn.shutdown().await;
        served.fetch_add(1, Ordering::SeqCst);
    }
    std::future::pending::<()>().await;
}

/// Reads an HTTP request's head and the body its Content-Length announces.
async fn read_request(conn: &mut tokio::net::TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = conn.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if got.len() >= end + 4 + length {
            return;
        }
    }
}
