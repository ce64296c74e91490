//! Hostile and heavy traffic toward S, for `tests/flood.rs`: QUIC Initials from many source
//! ports, STUN at a high rate, junk datagrams, TCP connections that say nothing or say it
//! slowly, registrations with a wrong token, and many honest agents from one address.
//!
//! Each generator runs on the caller's runtime (make it in a lab host's namespace with the
//! kit's `Place::runtime` and every socket is there), is bounded by a count and a
//! deadline and stops by itself, and returns a [`Tally`] of what it sent and what came back,
//! so a test can tell how many bytes S sent per byte it was sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use p2ptun::proto::{
    read_frame, stun, write_frame, ClientMsg, ErrorCode, ServerMsg, ALPN_CONTROL, PROTOCOL_VERSION,
};
use p2ptun::tunnel::{tls, Identity};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinSet;

/// What one generator sent and got back.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tally {
    /// Packets (or connections, for TCP) sent.
    pub sent: u64,
    /// Bytes sent (UDP payloads, or bytes written on TCP).
    pub sent_bytes: u64,
    /// Packets (or TCP reads) that came back.
    pub received: u64,
    /// Bytes that came back.
    pub received_bytes: u64,
}

impl Tally {
    /// Bytes S sent per byte it was sent.
    pub fn ratio(&self) -> f64 {
        self.received_bytes as f64 / self.sent_bytes.max(1) as f64
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} ({} B), got back {} ({} B): {:.3} B out per B in",
            self.sent,
            self.sent_bytes,
            self.received,
            self.received_bytes,
            self.ratio()
        )
    }
}

/// How hard and how long a generator pushes.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Packets (or connections) per second.
    pub rate: u32,
    /// At most this many in all.
    pub count: u64,
    /// And for at most this long.
    pub duration: Duration,
    /// Spread over this many local sockets (source ports).
    pub sockets: usize,
}

/// What a UDP generator sends next: the payload for packet `i`, to be sent from socket
/// `i % sockets`.
type Payload = Box<dyn FnMut(u64) -> Vec<u8> + Send>;

/// Counts what arrives on `sockets` until `stop`.
fn count_replies(
    sockets: &[Arc<UdpSocket>],
    stop: &Arc<AtomicBool>,
) -> Arc<(AtomicU64, AtomicU64)> {
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    for socket in sockets {
        let (socket, stop, counts) = (Arc::clone(socket), Arc::clone(stop), Arc::clone(&counts));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                let got = tokio::time::timeout(Duration::from_millis(100), socket.recv(&mut buf));
                if let Ok(Ok(n)) = got.await {
                    counts.0.fetch_add(1, Ordering::Relaxed);
                    counts.1.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
    }
    counts
}

/// Sends `make`'s payloads to `to` under `load`, counting what comes back (for up to
/// `linger` after the last packet: late answers count too).
async fn udp_flood(to: SocketAddr, load: Load, mut make: Payload) -> anyhow::Result<Tally> {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let mut sockets = Vec::with_capacity(load.sockets);
    for _ in 0..load.sockets.max(1) {
        let s = UdpSocket::bind(bind)
            .await
            .context("binding a flood socket")?;
        s.connect(to).await.context("connecting a flood socket")?;
        sockets.push(Arc::new(s));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let counts = count_replies(&sockets, &stop);
    let mut tally = Tally::default();
    let start = Instant::now();
    // Paced in 10 ms ticks: bursts the size of one tick, which is how a sender at full
    // speed looks after any queue.
    let per_tick = (u64::from(load.rate) / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    'ticks: while start.elapsed() < load.duration {
        tick.tick().await;
        for _ in 0..per_tick {
            if tally.sent >= load.count || start.elapsed() >= load.duration {
                break 'ticks;
            }
            let payload = make(tally.sent);
            let socket = &sockets[(tally.sent % sockets.len() as u64) as usize];
            // A full socket buffer drops the packet, as a real link would.
            if socket.try_send(&payload).is_ok() {
                tally.sent_bytes += payload.len() as u64;
            }
            tally.sent += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    tally.received = counts.0.load(Ordering::Relaxed);
    tally.received_bytes = counts.1.load(Ordering::Relaxed);
    Ok(tally)
}

/// Genuine QUIC Initial packets (a new connection's first datagram, 1200 bytes), never
/// followed up. 512 are made ahead (building one costs a TLS ClientHello, far more than
/// sending it) and each is sent from every socket in turn. quinn knows a pending attempt by
/// its connection ID alone, so a copy that arrives while S still holds the first is taken
/// as part of that attempt; copies arriving after S has answered are new attempts.
pub async fn initials(to: SocketAddr, load: Load) -> anyhow::Result<Tally> {
    const MADE: usize = 512;
    let identity = Identity::ephemeral()?;
    let config = tls::client_config(&identity, ALPN_CONTROL)?;
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    let mut made = Vec::with_capacity(MADE);
    for _ in 0..MADE {
        let (_, mut conn) = endpoint.connect(now, config.clone(), to, "p2ptun")?;
        let mut buf = Vec::with_capacity(1500);
        if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            buf.truncate(t.segment_size.unwrap_or(t.size));
            made.push(buf);
        }
    }
    if made.is_empty() {
        bail!("quinn made no Initial packet");
    }
    let make: Payload =
        Box::new(move |i| made[(i as usize / load.sockets.max(1)) % made.len()].clone());
    udp_flood(to, load, make).await
}

/// STUN Binding requests: the agent's own (as large as the fullest answer), or bare 20-byte
/// ones (`bare`), which get the smallest complete answer.
pub async fn stun(to: SocketAddr, load: Load, bare: bool) -> anyhow::Result<Tally> {
    let make: Payload = Box::new(move |_| {
        let request = stun::binding_request(stun::new_tid(), None);
        if bare {
            // The header alone, its length field saying "no attributes".
            let mut header = request[..20].to_vec();
            header[2..4].copy_from_slice(&[0, 0]);
            header
        } else {
            request
        }
    });
    udp_flood(to, load, make).await
}

/// Random datagrams of random sizes up to 1200 bytes: QUIC-looking first bytes, STUN-looking
/// ones, and anything else.
pub async fn junk(to: SocketAddr, load: Load) -> anyhow::Result<Tally> {
    let make: Payload = Box::new(|_| {
        let len = rand::random::<usize>() % 1200 + 1;
        (0..len).map(|_| rand::random::<u8>()).collect()
    });
    udp_flood(to, load, make).await
}

/// TCP connections to S that send nothing (`slow: false`) or S's preamble one byte a second
/// (`slow: true`), each held until S closes it or the deadline; `load.sockets` of them open
/// at once at most.
pub async fn tcp(to: SocketAddr, load: Load, slow: bool) -> anyhow::Result<Tally> {
    let sent = Arc::new(AtomicU64::new(0));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let received_bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut open = JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(load.rate.max(1)));
    let mut made = 0u64;
    while made < load.count && Instant::now() < deadline {
        while open.len() >= load.sockets.max(1) {
            open.join_next().await;
        }
        made += 1;
        let counters = (
            Arc::clone(&sent),
            Arc::clone(&sent_bytes),
            Arc::clone(&received),
            Arc::clone(&received_bytes),
        );
        open.spawn(async move {
            let (sent, sent_bytes, received, received_bytes) = counters;
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Ok(mut tcp)) = tokio::time::timeout(left, TcpStream::connect(to)).await else {
                return;
            };
            sent.fetch_add(1, Ordering::Relaxed);
            let preamble = p2ptun::path::tcp::SERVER_PREAMBLE;
            let mut buf = [0u8; 4096];
            let mut written = 0;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                let wait = if slow {
                    left.min(Duration::from_secs(1))
                } else {
                    left
                };
                tokio::select! {
                    read = tcp.readable() => {
                        if read.is_err() {
                            return;
                        }
                        match tcp.try_read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                received.fetch_add(1, Ordering::Relaxed);
                                received_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return,
                        }
                    }
                    () = tokio::time::sleep(wait) => {
                        if slow && written < preamble.len() {
                            if tcp.write_all(&preamble[written..=written]).await.is_err() {
                                return;
                            }
                            written += 1;
                            sent_bytes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        tokio::time::sleep(gap).await;
    }
    while open.join_next().await.is_some() {}
    Ok(Tally {
        sent: sent.load(Ordering::Relaxed),
        sent_bytes: sent_bytes.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        received_bytes: received_bytes.load(Ordering::Relaxed),
    })
}

/// Opens a control connection to S from a new UDP port with a new key.
async fn control_connection(
    to: SocketAddr,
    identity: &Identity,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(tls::client_config(identity, ALPN_CONTROL)?);
    let conn = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(to, "p2ptun")?)
        .await
        .context("no handshake within 10 s")??;
    Ok((endpoint, conn))
}

/// Sends Register on `conn` and returns S's answer, with the registration stream (S keeps
/// the agent registered while it is open).
async fn register(
    conn: &quinn::Connection,
    token: Option<&str>,
    names: Vec<String>,
) -> anyhow::Result<(ServerMsg, quinn::SendStream, quinn::RecvStream)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let msg = ClientMsg::Register {
        version: PROTOCOL_VERSION,
        token: token.map(str::to_owned),
        names,
        candidates: Vec::new(),
        nat: Default::default(),
    };
    write_frame(&mut send, &msg).await?;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<ServerMsg, _>(&mut recv),
    )
    .await
    .context("no answer to Register within 10 s")??
    .context("S ended the stream without an answer")?;
    Ok((answer, send, recv))
}

/// Registrations with a wrong token, each on a new connection (a full handshake) from a new
/// port; `load.sockets` at once at most. `sent` counts attempts, `received` the ones S
/// answered "wrong token" (the others were refused at the handshake by a limit); bytes are
/// QUIC's own count of UDP payloads, of both kinds of attempt.
pub async fn bad_tokens(to: SocketAddr, load: Load) -> anyhow::Result<Tally> {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut tally = Tally::default();
    let gap = Duration::from_secs_f64(1.0 / f64::from(load.rate.max(1)));
    let mut made = 0u64;
    let add = |tally: &mut Tally, t: Option<Tally>| {
        if let Some(t) = t {
            tally.sent += t.sent;
            tally.sent_bytes += t.sent_bytes;
            tally.received += t.received;
            tally.received_bytes += t.received_bytes;
        }
    };
    while made < load.count && start.elapsed() < load.duration {
        while tasks.len() >= load.sockets.max(1) {
            if let Some(Ok(t)) = tasks.join_next().await {
                add(&mut tally, t);
            }
        }
        made += 1;
        tasks.spawn(async move {
            let identity = Identity::ephemeral().ok()?;
            let (endpoint, conn) = match control_connection(to, &identity).await {
                Ok(connected) => connected,
                Err(_) => {
                    return Some(Tally {
                        sent: 1,
                        ..Tally::default()
                    })
                }
            };
            let answer = register(&conn, Some("not-the-token"), vec!["stolen".into()]).await;
            let refused = matches!(
                answer,
                Ok((ServerMsg::Error(ref e), _, _)) if e.code == ErrorCode::BadToken
            );
            conn.close(0u32.into(), b"");
            endpoint.wait_idle().await;
            let stats = conn.stats();
            Some(Tally {
                sent: 1,
                sent_bytes: stats.udp_tx.bytes,
                received: u64::from(refused),
                received_bytes: stats.udp_rx.bytes,
            })
        });
        tokio::time::sleep(gap).await;
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(t) = done {
            add(&mut tally, t);
        }
    }
    Ok(tally)
}

/// Many honest agents registered from one address.
pub struct Agents {
    /// Their connections (the endpoint, connection and registration stream of each); S
    /// keeps each registered while it is held.
    held: Vec<(
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    )>,
    /// How long until the last one was registered.
    pub took: Duration,
    /// Attempts S refused (a refused handshake, or a registration answered with an error)
    /// and that were tried again.
    pub refusals: u64,
}

impl Agents {
    /// How many are registered.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether S holds each of them still (none was closed).
    pub fn all_alive(&self) -> bool {
        self.held
            .iter()
            .all(|(_, c, _, _)| c.close_reason().is_none())
    }
}

/// Registers `count` agents, each with its own key and UDP port, `at_once` attempts in
/// flight; a refused attempt is tried again after a backoff (0.5 s doubling to 8 s, as an
/// agent would) until `deadline` has passed.
pub async fn agents(
    to: SocketAddr,
    token: Option<&str>,
    count: usize,
    at_once: usize,
    deadline: Duration,
) -> anyhow::Result<Agents> {
    let start = Instant::now();
    let token = token.map(str::to_owned);
    let refusals = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let mut held = Vec::with_capacity(count);
    let mut started = 0;
    let mut failures = Vec::new();
    while held.len() + failures.len() < count {
        while started < count && tasks.len() < at_once.max(1) {
            started += 1;
            let (token, refusals) = (token.clone(), Arc::clone(&refusals));
            tasks.spawn(async move {
                let identity = Identity::ephemeral()?;
                let mut backoff = Duration::from_millis(500);
                loop {
                    let attempt = async {
                        let (endpoint, conn) = control_connection(to, &identity).await?;
                        match register(&conn, token.as_deref(), Vec::new()).await? {
                            (ServerMsg::Registered { .. }, send, recv) => {
                                anyhow::Ok((endpoint, conn, send, recv))
                            }
                            (other, _, _) => bail!("S answered {other:?}"),
                        }
                    };
                    match attempt.await {
                        Ok(agent) => return anyhow::Ok(agent),
                        Err(e) if start.elapsed() + backoff < deadline => {
                            tracing::debug!(error = %e, "an agent is refused; trying again");
                            refusals.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(8));
                        }
                        Err(e) => return Err(e.context("still refused at the deadline")),
                    }
                }
            });
        }
        match tasks.join_next().await {
            Some(Ok(Ok(agent))) => held.push(agent),
            Some(Ok(Err(e))) => failures.push(format!("{e:#}")),
            Some(Err(e)) => failures.push(e.to_string()),
            None => break,
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {count} agents did not register within {deadline:?}; the first: {}",
            failures.len(),
            failures[0]
        );
    }
    Ok(Agents {
        held,
        took: start.elapsed(),
        refusals: refusals.load(Ordering::Relaxed),
    })
}
