//! The agents the load generator plays: each its own key and QUIC control connection to S,
//! registered as `p2ptun` registers (ALPN `p2ptun/1`, the agent's TLS client configuration,
//! `Register` on a first bidirectional stream whose send side stays open), many of them on
//! each UDP socket, the sockets bound to distinct loopback addresses 127.0.x.y so that S's
//! per-source limits see many sources.
//!
//! Nothing here waits without a bound: every exchange with S has a timeout, every phase a
//! deadline, and the per-agent reader ends when its connection closes (the generator closes
//! them all at the end of a scenario, and aborts the readers besides).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2ptun::agent::registration::request;
use p2ptun::proto::relay as wire;
use p2ptun::proto::{
    read_frame, write_frame, Candidate, CandidateKind, ClientMsg, Fingerprint, NatMapping,
    ServerInfo, ServerMsg, ALPN_CONTROL, PROTOCOL_VERSION,
};
use p2ptun::tunnel::{tls, Identity};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// How long one registration (handshake, Retry included, and the Register exchange) may
/// take before it counts as failed.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest relayed payload a real agent sends whole: an inner packet of the peer
/// connection's largest MTU (1,400) and the 8-byte session tag.
const RELAY_PAYLOAD: usize = 1400 + wire::HEADER;
/// The agents' UDP socket buffers (`path::socket`'s SOCKET_BUFFER).
const SOCKET_BUFFER: usize = 4 << 20;
/// Relayed datagrams a sender may have on their way (sent, not yet counted by its exposer):
/// it stands in for the congestion window of the end-to-end connection a real pair would
/// run inside the relay, so that the sender does not push far more than S can deliver.
const RELAY_WINDOW: u64 = 256;
/// How long a sender at its window waits for the exposer's count before it takes the
/// missing half of the window as lost (as a congestion controller would) and goes on.
const RELAY_LOSS_WAIT: Duration = Duration::from_millis(5);

/// One agent's key, made before any phase is timed (key generation is the agent's cost, not
/// S's). Its configuration is the real agent's: `tls::client_config` with ALPN `p2ptun/1`.
pub struct Prepared {
    pub config: quinn::ClientConfig,
}

/// Makes `n` agent keys and client configurations on `threads` threads.
pub fn prepare(n: usize, threads: usize) -> anyhow::Result<Vec<Prepared>> {
    let threads = threads.clamp(1, 8);
    let per = n.div_ceil(threads).max(1);
    // The agent's control-connection transport as it is (keep-alives, idle timeout, no
    // request streams allowed to S, datagram buffers).
    let transport = Arc::new(tls::control_transport_config());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                let transport = Arc::clone(&transport);
                scope.spawn(move || {
                    (0..count)
                        .map(|_| {
                            let identity = Identity::ephemeral()?;
                            let mut config = tls::client_config(&identity, ALPN_CONTROL)?;
                            config.transport_config(Arc::clone(&transport));
                            anyhow::Ok(Prepared { config })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for h in handles {
            let part = h
                .join()
                .map_err(|_| anyhow::anyhow!("a key thread panicked"))??;
            out.extend(part);
        }
        Ok(out)
    })
}

/// The loopback address of source `k`: 127.0.1.1, 127.0.1.2, ... 127.0.1.254, 127.0.2.1, ...
/// (never 127.0.0.x, where S listens, nor .0 and .255).
pub fn source_ip(k: usize) -> Ipv4Addr {
    let a = 1 + k / 254;
    let b = 1 + k % 254;
    Ipv4Addr::new(127, 0, a.min(254) as u8, b as u8)
}

/// One quinn endpoint (one UDP socket) per source address.
pub struct Sources {
    endpoints: Vec<quinn::Endpoint>,
}

impl Sources {
    /// `n` endpoints on `source_ip(0..n)`, each on a port the kernel picks. Call inside the
    /// generator's runtime.
    pub fn bind(n: usize) -> anyhow::Result<Sources> {
        let mut endpoints = Vec::with_capacity(n);
        for k in 0..n {
            let addr = SocketAddr::from((source_ip(k), 0));
            let socket = std::net::UdpSocket::bind(addr)
                .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
            // As the agent's socket (path::socket): 4 MiB each way (as far as
            // net.core.rmem_max allows), so that a burst toward one socket shared by many
            // agents is not dropped by the kernel before quinn reads it.
            let sock = socket2::SockRef::from(&socket);
            let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
            let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
            let mut config = quinn::EndpointConfig::default();
            // As the agent's make_endpoint: S tells STUN from QUIC by the fixed bit.
            config.grease_quic_bit(false);
            let ep = quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))?;
            endpoints.push(ep);
        }
        Ok(Sources { endpoints })
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// The endpoint of agent `id` (agents are dealt round-robin over the sources).
    pub fn of(&self, id: usize) -> &quinn::Endpoint {
        &self.endpoints[id % self.endpoints.len()]
    }

    /// Closes every endpoint and waits (at most `limit`) for the close frames to go out.
    pub async fn close(self, limit: Duration) {
        for ep in &self.endpoints {
            ep.close(0u32.into(), b"load generator done");
        }
        let all = futures_wait_idle(&self.endpoints);
        let _ = tokio::time::timeout(limit, all).await;
    }
}

async fn futures_wait_idle(endpoints: &[quinn::Endpoint]) {
    for ep in endpoints {
        ep.wait_idle().await;
    }
}

/// What S pushed to the registered agents, for the introduction count.
#[derive(Default)]
pub struct Pushed {
    /// Sessions S announced to an exposer (`Incoming`), with when it arrived.
    pub incoming: Mutex<HashMap<u64, Instant>>,
    /// `RelayClosed` messages.
    pub relay_closed: AtomicU64,
}

/// A registered agent: its connection, the registration stream's send side (finishing it
/// would end the registration) and the task reading what S pushes.
pub struct Live {
    pub id: usize,
    pub conn: quinn::Connection,
    _registration: quinn::SendStream,
    reader: JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.reader.abort();
        self.conn.close(0u32.into(), b"load generator done");
    }
}

/// One S as the agents see it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
}

/// What a wave of registrations did.
#[derive(Default)]
pub struct Wave {
    pub attempted: usize,
    pub ok: usize,
    /// From the wave's start to the last success.
    pub took: Duration,
    /// Failures by kind (the first 80 characters of the reason), with a count each.
    pub failures: BTreeMap<String, usize>,
    /// Not started because the deadline had passed.
    pub not_started: usize,
}

impl Wave {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// Registers the agents `ids` (each with `names(id)` and S `home(id)`), at most `at_once`
/// attempts in flight, none started after `deadline`. No retries: a refusal is a figure.
#[allow(clippy::too_many_arguments)]
pub async fn register_wave(
    prepared: &[Prepared],
    sources: &Sources,
    targets: &[Target],
    ids: Vec<usize>,
    names: impl Fn(usize) -> Vec<String>,
    home: impl Fn(usize) -> usize,
    at_once: usize,
    deadline: Instant,
    pushed: &Arc<Pushed>,
) -> (Vec<Live>, Wave) {
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(at_once.max(1)));
    let mut tasks = JoinSet::new();
    let mut wave = Wave {
        attempted: ids.len(),
        ..Wave::default()
    };
    for id in ids {
        let (config, ep) = (prepared[id].config.clone(), sources.of(id).clone());
        let (h, names) = (home(id), names(id));
        let target = targets[h].clone();
        let (gate, pushed) = (Arc::clone(&gate), Arc::clone(pushed));
        tasks.spawn(async move {
            let Ok(_permit) = gate.acquire_owned().await else {
                return Err("the gate closed".to_owned());
            };
            if Instant::now() >= deadline {
                return Err(String::new());
            }
            let res = tokio::time::timeout(
                REGISTER_TIMEOUT,
                register(&ep, config, &target, names, pushed),
            )
            .await;
            match res {
                Ok(Ok((conn, send, reader))) => Ok(Live {
                    id,
                    conn,
                    _registration: send,
                    reader,
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!(
                    "no registration within {}s",
                    REGISTER_TIMEOUT.as_secs()
                )),
            }
        });
    }
    let mut live = Vec::with_capacity(wave.attempted);
    let mut last_ok = start;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(agent)) => {
                last_ok = Instant::now();
                live.push(agent);
            }
            Ok(Err(e)) if e.is_empty() => wave.not_started += 1,
            Ok(Err(e)) => *wave.failures.entry(kind_of(&e)).or_default() += 1,
            Err(e) => *wave.failures.entry(kind_of(&e.to_string())).or_default() += 1,
        }
    }
    wave.ok = live.len();
    wave.took = last_ok - start;
    (live, wave)
}

/// A failure's kind, for counting: the start of its text (the reasons name no agent, so one
/// kind counts once).
fn kind_of(e: &str) -> String {
    e.chars().take(100).collect()
}

/// One agent's registration, as `agent::server::register_on` does it; returns the
/// connection, the open registration stream and the task reading S's pushes.
async fn register(
    ep: &quinn::Endpoint,
    config: quinn::ClientConfig,
    target: &Target,
    names: Vec<String>,
    pushed: Arc<Pushed>,
) -> Result<(quinn::Connection, quinn::SendStream, JoinHandle<()>), String> {
    let connecting = ep
        .connect_with(config, target.addr, "p2ptun")
        .map_err(|e| format!("connect: {e}"))?;
    let conn = connecting.await.map_err(|e| format!("handshake: {e}"))?;
    // The agent checks S's key before it sends anything; so does the generator.
    if tls::peer_fingerprint(&conn) != Some(target.fingerprint) {
        conn.close(0u32.into(), b"wrong server key");
        return Err("S presented another key than the one expected".to_owned());
    }
    let local = ep.local_addr().map_err(|e| format!("local address: {e}"))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("open stream: {e}"))?;
    let msg = ClientMsg::Register {
        version: PROTOCOL_VERSION,
        token: None,
        names,
        candidates: vec![Candidate {
            kind: CandidateKind::Host,
            addr: local,
        }],
        nat: NatMapping::Unknown,
    };
    write_frame(&mut send, &msg)
        .await
        .map_err(|e| format!("send Register: {e}"))?;
    match read_frame::<ServerMsg, _>(&mut recv).await {
        Ok(Some(ServerMsg::Registered { .. })) => {}
        Ok(Some(ServerMsg::Error(e))) => {
            return Err(format!("refused ({:?}): {}", e.code, e.message))
        }
        Ok(Some(other)) => return Err(format!("unexpected answer {other:?}")),
        Ok(None) => return Err("S closed the registration stream".to_owned()),
        Err(e) => return Err(format!("reading the answer: {e}")),
    }
    let reader = tokio::spawn(read_pushes(recv, pushed));
    Ok((conn, send, reader))
}

/// Reads what S pushes on a registration stream until it ends (the connection closes).
async fn read_pushes(mut recv: quinn::RecvStream, pushed: Arc<Pushed>) {
    loop {
        match read_frame::<ServerMsg, _>(&mut recv).await {
            Ok(Some(ServerMsg::Incoming(rv))) => {
                let mut map = pushed.incoming.lock().unwrap_or_else(|e| e.into_inner());
                map.insert(rv.session, Instant::now());
            }
            Ok(Some(ServerMsg::RelayClosed { .. })) => {
                pushed.relay_closed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Introductions

/// What a run of introductions did.
#[derive(Default)]
pub struct Intros {
    pub asked: usize,
    /// Answered `Rendezvous` and the exposer got `Incoming` for the same session.
    pub completed: usize,
    /// Of those, the ones answered by the forwarder's home S.
    pub completed_here: usize,
    /// Of those, the ones answered by the S that the home named (`Elsewhere`).
    pub completed_across: usize,
    /// Answered `Rendezvous`, but no `Incoming` reached the exposer within the grace time.
    pub half: usize,
    /// `Elsewhere` answers from the forwarders' home S.
    pub elsewhere: usize,
    /// Registrations with the S an `Elsewhere` named (one per forwarder, reused), made.
    pub visits: usize,
    /// Their registration times, summed.
    pub visit_time: Duration,
    /// S's error answers by kind (code and the start of the message), with a count each.
    pub errors: BTreeMap<String, usize>,
    /// Requests that failed on the way (timeouts, broken connections, failed visits).
    pub failed: BTreeMap<String, usize>,
    /// Not started because the deadline had passed.
    pub not_started: usize,
    /// From the first request to the last completion.
    pub took: Duration,
    /// From the first request to the last completion answered by the home S.
    pub took_here: Duration,
    /// From the first request to the last completion answered by another S.
    pub took_across: Duration,
    /// From the first request to the last answer of any kind.
    pub answered_in: Duration,
    /// Answers of any kind (completed, half, errors).
    pub answered: usize,
    /// One example of each error kind, whole.
    pub examples: BTreeMap<String, String>,
}

impl Intros {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.took.as_secs_f64().max(1e-9)
    }

    /// Completed introductions answered by the forwarder's home S, per second.
    pub fn rate_here(&self) -> f64 {
        self.completed_here as f64 / self.took_here.as_secs_f64().max(1e-9)
    }

    /// Completed introductions across S (an `Elsewhere`, then the other S), per second.
    pub fn rate_across(&self) -> f64 {
        self.completed_across as f64 / self.took_across.as_secs_f64().max(1e-9)
    }

    pub fn answer_rate(&self) -> f64 {
        self.answered as f64 / self.answered_in.as_secs_f64().max(1e-9)
    }

    /// The mean time a visit's registration took, in milliseconds.
    pub fn visit_ms(&self) -> Option<f64> {
        (self.visits > 0).then(|| self.visit_time.as_secs_f64() * 1000.0 / self.visits as f64)
    }
}

/// A forwarder as the introductions use it: its registration with its home S, and what it
/// needs to register with another S the way the agent visits one (`agent::visit`): its key
/// and its socket.
pub struct Forwarder {
    pub id: usize,
    pub conn: quinn::Connection,
    pub config: quinn::ClientConfig,
    pub ep: quinn::Endpoint,
    /// Its registration with the S an `Elsewhere` named, made at the first one and kept,
    /// as the agent keeps it while a link uses it. Locked while it is made, so that two
    /// introductions at once share one (the agent's `Visits::to` does the same).
    visit: tokio::sync::Mutex<Option<(Fingerprint, Live)>>,
}

impl Forwarder {
    pub fn new(
        id: usize,
        conn: quinn::Connection,
        config: quinn::ClientConfig,
        ep: quinn::Endpoint,
    ) -> Forwarder {
        Forwarder {
            id,
            conn,
            config,
            ep,
            visit: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection to `server` (named by the home S's `Elsewhere`), registered with no
    /// names, made if there is none, and how long making it took. Only S the generator
    /// started are visited: `server` must be one of `known`, at a loopback address.
    async fn visit(
        &self,
        server: &ServerInfo,
        known: &[Target],
        pushed: &Arc<Pushed>,
    ) -> Result<(quinn::Connection, Option<Duration>), String> {
        let mut visit = self.visit.lock().await;
        if let Some((fp, live)) = &*visit {
            if *fp == server.fingerprint && live.conn.close_reason().is_none() {
                return Ok((live.conn.clone(), None));
            }
        }
        let addr: SocketAddr = server
            .addr
            .parse()
            .map_err(|_| format!("S named an address that is no IP:port: {}", server.addr))?;
        if !addr.ip().is_loopback()
            || !known
                .iter()
                .any(|t| t.addr == addr && t.fingerprint == server.fingerprint)
        {
            return Err(format!(
                "S named an S the generator did not start: {} {}",
                server.addr, server.fingerprint
            ));
        }
        let target = Target {
            addr,
            fingerprint: server.fingerprint,
        };
        let start = Instant::now();
        let registered = tokio::time::timeout(
            REGISTER_TIMEOUT,
            register(
                &self.ep,
                self.config.clone(),
                &target,
                Vec::new(),
                Arc::clone(pushed),
            ),
        )
        .await
        .map_err(|_| format!("no registration within {}s", REGISTER_TIMEOUT.as_secs()))??;
        let took = start.elapsed();
        let (conn, send, reader) = registered;
        *visit = Some((
            server.fingerprint,
            Live {
                id: self.id,
                conn: conn.clone(),
                _registration: send,
                reader,
            },
        ));
        Ok((conn, Some(took)))
    }
}

/// An error message with what names one case taken out (quoted names, parenthesised
/// addresses) and cut at its first `;`, so that one kind of answer counts once.
fn error_kind(message: &str) -> String {
    let mut out = String::new();
    let (mut quoted, mut paren) = (false, false);
    for c in message.chars() {
        match c {
            '\'' => {
                if !quoted {
                    out.push_str("NAME");
                }
                quoted = !quoted;
            }
            '(' if !quoted => {
                paren = true;
                out.push_str("(…)");
            }
            ')' if paren => paren = false,
            ';' if !quoted && !paren => break,
            c if !quoted && !paren => out.push(c),
            _ => {}
        }
    }
    out.trim().to_owned()
}

/// The candidates a forwarder sends with `Connect`: its host address.
fn host_candidates(conn: &quinn::Connection) -> Vec<Candidate> {
    conn.local_ip()
        .map(|ip| Candidate {
            kind: CandidateKind::Host,
            addr: SocketAddr::new(ip, 0),
        })
        .into_iter()
        .collect()
}

/// How one introduction went.
struct Asked {
    answer: Result<ServerMsg, String>,
    at: Instant,
    name: String,
    /// The home S answered `Elsewhere`; `answer` is the other S's.
    across: bool,
    /// A visit was made for it, taking this long.
    visit: Option<Duration>,
}

/// Asks S, `count` times in all, to introduce forwarder to exposer for `pairs` in turn
/// (the forwarder's `Connect` for the exposer's name), at most `at_once` in flight, none
/// started after `deadline`. An `Elsewhere` answer is followed as the agent follows it: the
/// forwarder registers with the S named (once, checking that S presents the fingerprint
/// vouched for; it must be one of `known`) and asks again there. Completed introductions
/// are those whose exposer heard of the session too (within `grace` after the last answer).
pub async fn introduce(
    pairs: &[(Arc<Forwarder>, String)],
    known: &[Target],
    count: usize,
    at_once: usize,
    deadline: Instant,
    grace: Duration,
    pushed: &Arc<Pushed>,
) -> Intros {
    let mut out = Intros {
        asked: count,
        ..Intros::default()
    };
    if pairs.is_empty() {
        out.not_started = count;
        return out;
    }
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(at_once.max(1)));
    let known: Arc<[Target]> = known.into();
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let (fwd, name) = pairs[i % pairs.len()].clone();
        let (gate, known, pushed) = (Arc::clone(&gate), Arc::clone(&known), Arc::clone(pushed));
        tasks.spawn(async move {
            let Ok(_permit) = gate.acquire_owned().await else {
                return None;
            };
            if Instant::now() >= deadline {
                return None;
            }
            let connect = |conn: &quinn::Connection| ClientMsg::Connect {
                name: name.clone(),
                candidates: host_candidates(conn),
                nat: NatMapping::Unknown,
            };
            // `request` bounds the exchange (agent::registration::EXCHANGE_TIMEOUT).
            let answer = request(&fwd.conn, &connect(&fwd.conn))
                .await
                .map_err(|e| format!("{e:#}"));
            let (answer, across, visit) = match answer {
                Ok(ServerMsg::Elsewhere { name: n, server }) if n == name => {
                    match fwd.visit(&server, &known, &pushed).await {
                        Ok((there, took)) => {
                            let answer = request(&there, &connect(&there))
                                .await
                                .map_err(|e| format!("{e:#}"));
                            (answer, true, took)
                        }
                        Err(e) => (Err(format!("visit: {e}")), true, None),
                    }
                }
                other => (other, false, None),
            };
            Some(Asked {
                answer,
                at: Instant::now(),
                name,
                across,
                visit,
            })
        });
    }
    let mut sessions = Vec::new();
    let mut last_answer = start;
    while let Some(done) = tasks.join_next().await {
        let Ok(Some(asked)) = done else {
            out.not_started += 1;
            continue;
        };
        let Asked {
            answer,
            at,
            name,
            across,
            visit,
        } = asked;
        out.elsewhere += usize::from(across);
        if let Some(took) = visit {
            out.visits += 1;
            out.visit_time += took;
        }
        match answer {
            Ok(ServerMsg::Rendezvous(rv)) if rv.name == name => {
                last_answer = last_answer.max(at);
                sessions.push((rv.session, at, across));
            }
            Ok(ServerMsg::Error(e)) => {
                last_answer = last_answer.max(at);
                out.answered += 1;
                let kind = format!("{:?}: {}", e.code, error_kind(&e.message));
                out.examples.entry(kind.clone()).or_insert(e.message);
                *out.errors.entry(kind).or_default() += 1;
            }
            Ok(other) => {
                *out.failed
                    .entry(kind_of(&format!("unexpected answer {other:?}")))
                    .or_default() += 1
            }
            Err(e) => *out.failed.entry(kind_of(&e)).or_default() += 1,
        }
    }
    // The exposers' pushes may trail the forwarders' answers by a moment.
    let grace_end = Instant::now() + grace;
    loop {
        let done = {
            let map = pushed.incoming.lock().unwrap_or_else(|e| e.into_inner());
            // Completions and the last one's time, by whether they came across S.
            let mut done = [(0, start); 2];
            for (s, at, across) in &sessions {
                if let Some(pushed_at) = map.get(s) {
                    let d = &mut done[usize::from(*across)];
                    d.0 += 1;
                    d.1 = d.1.max(*at).max(*pushed_at);
                }
            }
            done
        };
        let [(here, last_here), (across, last_across)] = done;
        out.completed = here + across;
        out.completed_here = here;
        out.completed_across = across;
        out.half = sessions.len() - out.completed;
        out.took = last_here.max(last_across) - start;
        out.took_here = last_here - start;
        out.took_across = last_across - start;
        if out.half == 0 || Instant::now() >= grace_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.answered += sessions.len();
    out.answered_in = last_answer - start;
    out
}

// ---------------------------------------------------------------------------------------------
// Relaying

/// What a relay run did.
#[derive(Default, Debug)]
pub struct Relayed {
    pub sessions: usize,
    pub sent_bytes: u64,
    pub sent_datagrams: u64,
    pub received_bytes: u64,
    pub received_datagrams: u64,
    /// How long the senders sent.
    pub took: Duration,
    /// Payload size used (session tag included).
    pub payload: usize,
    /// Why sessions could not be set up or stopped early.
    pub problems: Vec<String>,
}

/// Opens a relay session for each of `pairs` (forwarder, exposer, exposer's name) with a
/// fresh introduction, then has every forwarder send full-size relayed datagrams tagged
/// with its session for `time` (at most `max_bytes` per session), as fast as its control
/// connection's congestion control lets it, while each exposer counts what S delivers.
pub async fn relay(
    pairs: &[(quinn::Connection, quinn::Connection, String)],
    time: Duration,
    max_bytes: u64,
) -> Relayed {
    let mut out = Relayed::default();
    let mut sessions = Vec::new();
    for (fwd, exp, name) in pairs {
        let msg = ClientMsg::Connect {
            name: name.clone(),
            candidates: host_candidates(fwd),
            nat: NatMapping::Unknown,
        };
        match request(fwd, &msg).await {
            Ok(ServerMsg::Rendezvous(rv)) if rv.relay => {
                sessions.push((fwd.clone(), exp.clone(), rv.session))
            }
            Ok(ServerMsg::Rendezvous(_)) => out
                .problems
                .push(format!("S introduced {name} without relaying")),
            Ok(other) => out.problems.push(format!(
                "Connect {name}: {}",
                kind_of(&format!("{other:?}"))
            )),
            Err(e) => out.problems.push(format!("Connect {name}: {e:#}")),
        }
    }
    out.sessions = sessions.len();
    if sessions.is_empty() {
        return out;
    }
    let received_bytes = Arc::new(AtomicU64::new(0));
    let received_datagrams = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let send_end = start + time;
    // Receivers stop a moment after the senders, to count what is still on its way.
    let recv_end = send_end + Duration::from_millis(300);
    let mut receivers = JoinSet::new();
    let mut senders = JoinSet::new();
    let payload_len = Arc::new(AtomicU64::new(RELAY_PAYLOAD as u64));
    for (fwd, exp, session) in sessions {
        let (rb, rd) = (Arc::clone(&received_bytes), Arc::clone(&received_datagrams));
        // This session's count at its exposer, and a wake-up for its sender.
        let got = Arc::new((AtomicU64::new(0), tokio::sync::Notify::new()));
        let got2 = Arc::clone(&got);
        receivers.spawn(async move {
            let until = tokio::time::Instant::from_std(recv_end);
            loop {
                tokio::select! {
                    d = exp.read_datagram() => match d {
                        Ok(d) if wire::session_of(&d) == Some(session) => {
                            rb.fetch_add(d.len() as u64, Ordering::Relaxed);
                            rd.fetch_add(1, Ordering::Relaxed);
                            got2.0.fetch_add(1, Ordering::Relaxed);
                            got2.1.notify_one();
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    () = tokio::time::sleep_until(until) => return,
                }
            }
        });
        let payload_len = Arc::clone(&payload_len);
        senders.spawn(async move {
            // As large as a real agent's relayed packet, and no larger than the control
            // connection carries whole (the agent would split it; S would forward the pieces).
            let size = fwd
                .max_datagram_size()
                .unwrap_or(0)
                .clamp(wire::HEADER + 1, RELAY_PAYLOAD);
            payload_len.fetch_min(size as u64, Ordering::Relaxed);
            let packet = vec![0x5a; size - wire::HEADER];
            let mut payload: Bytes = wire::encode(session, &packet);
            let (mut bytes, mut datagrams) = (0u64, 0u64);
            let until = tokio::time::Instant::from_std(send_end);
            let mut why = None;
            // Datagrams taken as lost after waiting at the window.
            let mut written_off = 0u64;
            while bytes < max_bytes && Instant::now() < send_end {
                let on_the_way = datagrams
                    .saturating_sub(got.0.load(Ordering::Relaxed))
                    .saturating_sub(written_off);
                if on_the_way >= RELAY_WINDOW {
                    let woke = tokio::time::timeout(RELAY_LOSS_WAIT, got.1.notified()).await;
                    if woke.is_err() {
                        written_off += on_the_way / 2;
                    }
                    continue;
                }
                // Waits for room in the send buffer instead of dropping the oldest datagram:
                // the sender goes as fast as its connection's congestion control allows.
                let sent = tokio::time::timeout_at(until, fwd.send_datagram_wait(payload.clone()));
                match sent.await {
                    Ok(Ok(())) => {
                        bytes += payload.len() as u64;
                        datagrams += 1;
                    }
                    // quinn took a loss for a black hole and lowered the connection's MTU:
                    // smaller datagrams from now on (the agent would split its packets, and
                    // S would forward the pieces). Said once, as a note.
                    Ok(Err(quinn::SendDatagramError::TooLarge)) => {
                        let max = fwd.max_datagram_size().unwrap_or(0);
                        if max <= wire::HEADER {
                            why = Some("the control connection takes no datagrams".to_owned());
                            break;
                        }
                        payload_len.fetch_min(max as u64, Ordering::Relaxed);
                        payload = wire::encode(session, &packet[..max - wire::HEADER]);
                        why.get_or_insert_with(|| {
                            format!("a control connection's datagrams shrank to {max} B")
                        });
                    }
                    Ok(Err(e)) => {
                        why = Some(format!("sending: {e}"));
                        break;
                    }
                    Err(_) => break,
                }
            }
            (bytes, datagrams, why)
        });
    }
    while let Some(done) = senders.join_next().await {
        match done {
            Ok((b, d, why)) => {
                out.sent_bytes += b;
                out.sent_datagrams += d;
                out.problems.extend(why);
            }
            Err(e) => out.problems.push(format!("a sender failed: {e}")),
        }
    }
    out.took = start.elapsed();
    while receivers.join_next().await.is_some() {}
    out.received_bytes = received_bytes.load(Ordering::Relaxed);
    out.received_datagrams = received_datagrams.load(Ordering::Relaxed);
    out.payload = payload_len.load(Ordering::Relaxed) as usize;
    out
}
