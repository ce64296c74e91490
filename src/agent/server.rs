//! The agent's control connection to its home S: pick the home among the servers it knows,
//! connect, check S's key, register, pass on what S pushes (introductions, relay sessions
//! closed), and reconnect with backoff, to the same S or another, whenever the connection is
//! lost.
//!
//! # Several servers
//!
//! `--server` may list several S (`HOST:PORT,HOST:PORT`), and an S of a cluster hands out
//! every member at registration. The home is the S whose QUIC handshake completes first when
//! all are dialled at once: the one with the shortest round trip that answers at all. An
//! agent keeps its home until the connection to it is lost, then races them all again.
//!
//! # Whose keys are trusted
//!
//! A server the user gave is checked as for one S: `--server-fingerprint`, a CA the system
//! trusts, a key the cluster vouched for, or the key pinned for that address on first use.
//! Any other S is trusted only as an S already trusted vouches for it: the member list and
//! the answer naming a name's home S carry each member's key fingerprint (each S writes its
//! own into the cluster's store), and that S must present exactly that key. A member list
//! is as trustworthy as the S that sent it; nothing else is taken on first use. The last
//! list is kept in the state directory ([`MEMBERS_FILE`]), so that a host name whose
//! records are several S of one cluster keeps working after a restart: whichever answers,
//! its key is one the cluster vouched for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quinn::Connection;
use tokio::sync::{mpsc, watch};

use super::backoff::Backoff;
use super::ctx::Ctx;
use super::dial::{self, Carrier, Dialed};
use super::known::{PinFile, Pinned};
use super::registration::{Registered, EXCHANGE_TIMEOUT};
use crate::proto::{
    read_frame, write_frame, Candidate, CandidateKind, ClientMsg, ErrorCode, ErrorMsg, Fingerprint,
    NatMapping, Rendezvous, ServerInfo, ServerMsg, PROTOCOL_VERSION,
};
use crate::tunnel::tls;

/// What S pushes on the registration, passed on to the rest of the agent.
#[derive(Debug)]
pub enum ServerEvent {
    /// S introduces a forwarder to one of this agent's names.
    Introduced(Box<Rendezvous>, Arc<Registered>),
    /// S stopped relaying a session (its budget, its idle time, or the other side left).
    RelayClosed {
        /// The session.
        session: u64,
    },
}

/// One S this agent may register with, and how its key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT`.
    pub addr: String,
    /// The key another S of its cluster vouched for; `None` for a server the user gave.
    pub vouched: Option<Fingerprint>,
    /// For a server the user gave: the keys of the cluster its last home vouched for, any
    /// of which it may present.
    pub cluster: Vec<Fingerprint>,
}

impl From<&ServerInfo> for Target {
    fn from(info: &ServerInfo) -> Target {
        Target {
            addr: info.addr.clone(),
            vouched: Some(info.fingerprint),
            cluster: Vec::new(),
        }
    }
}

/// The servers to choose a home from: those the user gave, then the other members of their
/// cluster that the last home vouched for.
fn targets(ctx: &Ctx, members: &[ServerInfo]) -> Vec<Target> {
    let cluster: Vec<Fingerprint> = members.iter().map(|m| m.fingerprint).collect();
    let mut out: Vec<Target> = crate::config::parse_servers(&ctx.opts.server)
        .unwrap_or_else(|_| vec![ctx.opts.server.clone()])
        .into_iter()
        .map(|addr| Target {
            addr,
            vouched: None,
            cluster: cluster.clone(),
        })
        .collect();
    for m in members {
        if !out.iter().any(|t| t.addr == m.addr) {
            out.push(Target::from(m));
        }
    }
    out
}

/// Where the cluster's members, as the last home listed them, are kept across restarts.
pub const MEMBERS_FILE: &str = "cluster_members.json";

/// What [`MEMBERS_FILE`] holds: the members, and the `--server` they were learnt under.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedMembers {
    server: String,
    members: Vec<ServerInfo>,
}

/// The members kept in the state directory; none if there is no file, it cannot be read,
/// or it was learnt under another `--server` (a user who points the agent elsewhere means
/// it: the old cluster must not keep racing for its home).
fn load_members(ctx: &Ctx) -> Vec<ServerInfo> {
    let path = ctx.opts.state_dir.join(MEMBERS_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return Vec::new();
    };
    match serde_json::from_slice::<SavedMembers>(&bytes) {
        Ok(saved) if saved.server == ctx.opts.server => saved.members,
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            Vec::new()
        }
    }
}

/// Keeps `members` in the state directory (written aside, then renamed over the old list).
fn save_members(ctx: &Ctx, members: &[ServerInfo]) {
    let path = ctx.opts.state_dir.join(MEMBERS_FILE);
    let tmp = path.with_extension("json.tmp");
    let saved = SavedMembers {
        server: ctx.opts.server.clone(),
        members: members.to_vec(),
    };
    let written = serde_json::to_vec_pretty(&saved)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&tmp, json))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(
            "cannot keep the cluster's members in {}: {e}",
            path.display()
        );
    }
}

/// Why a registration attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Retrying cannot help; the user must change something.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// Worth another try after a pause.
    #[error("{0:#}")]
    Retry(anyhow::Error),
}

/// What this agent registers with (and sends again when its port mappings change): its own
/// candidates, its TCP port's reflexive address, and the UDP reflexive addresses STUN found
/// beside the one S observes (which S adds).
fn registration_candidates(
    ctx: &Ctx,
    tcp_observed: Option<SocketAddr>,
    udp_reflexive: impl IntoIterator<Item = SocketAddr>,
) -> Vec<Candidate> {
    ctx.local_candidates()
        .into_iter()
        .chain(tcp_observed.map(|addr| Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr,
        }))
        .chain(udp_reflexive.into_iter().map(|addr| Candidate {
            kind: CandidateKind::ServerReflexive,
            addr,
        }))
        .collect()
}

/// Sends S this agent's candidates again whenever its port mappings change, for as long as
/// `reg` lives (the task is aborted with it). `sent` is what the registration carried.
async fn update_candidates(ctx: Arc<Ctx>, reg: Arc<Registered>, mut sent: Vec<Candidate>) {
    let mut mappings = ctx.portmap.clone();
    loop {
        let now = registration_candidates(
            &ctx,
            reg.tcp_observed,
            reg.observed_other.into_iter().chain(reg.udp_observed),
        );
        if now != sent {
            match reg.update_candidates(now.clone()).await {
                Ok(()) => {
                    tracing::debug!(n = now.len(), "sent S the new candidates (port mapping)");
                    sent = now;
                }
                // An older S, or a broken connection (then a new registration follows).
                Err(e) => tracing::warn!("cannot send S the port-mapped candidates: {e:#}"),
            }
        }
        if mappings.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps this agent registered with S for as long as it runs: publishes each registration in
/// `current` (and `None` while there is none) and passes what S pushes into `pushed`.
/// Returns only on an error retrying cannot fix.
pub async fn run(
    ctx: Arc<Ctx>,
    current: watch::Sender<Option<Arc<Registered>>>,
    pushed: mpsc::Sender<ServerEvent>,
) -> anyhow::Error {
    let mut backoff = Backoff::default();
    // A control connection made over UDP while registered over TCP, to register on next.
    let mut next: Option<(Dialed, Vec<SocketAddr>, Target)> = None;
    // The members of the home's cluster, as it last vouched for them.
    let mut members = load_members(&ctx);
    let mut lost: Option<String> = None;
    loop {
        let names = ctx.expose_names();
        let attempt = match next.take() {
            Some((dialed, addrs, target)) => {
                register_on(&ctx, dialed, &addrs, &target, names, false).await
            }
            None => register(&ctx, &targets(&ctx, &members), names, false).await,
        };
        match attempt {
            Ok((reg, mut events)) => {
                backoff.reset();
                if let Some(old) = lost.take() {
                    if old != reg.name {
                        tracing::info!(from = %old, to = %reg.name, "moved home to another S of the cluster");
                    }
                }
                // A standalone S lists none: then there is no cluster to remember.
                let mut listed = reg.members.clone();
                listed.sort_by(|a, b| a.addr.cmp(&b.addr));
                if listed != members {
                    members = listed;
                    save_members(&ctx, &members);
                }
                let reg = Arc::new(reg);
                current.send_replace(Some(reg.clone()));
                let pump = tokio::spawn(super::relay::pump(
                    ctx.relays.clone(),
                    ctx.router.socket().injector(),
                    reg.conn.clone(),
                ));
                let updates = tokio::spawn(update_candidates(
                    ctx.clone(),
                    reg.clone(),
                    reg.registered_with.clone(),
                ));
                let over_tcp = !reg.over_udp;
                let addrs = reg.server_addrs.clone();
                let target = targets(&ctx, &members)
                    .into_iter()
                    .find(|t| t.addr == reg.name)
                    .unwrap_or_else(|| {
                        Target::from(&ServerInfo {
                            addr: reg.name.clone(),
                            fingerprint: reg.fingerprint,
                        })
                    });
                // UDP that answered STUN at registration is worth trying again at once.
                let first_try = if reg.udp_observed.is_some() {
                    Duration::from_secs(1)
                } else {
                    UDP_RETRY_FIRST
                };
                let back_to_udp = udp_works_again(&ctx, &addrs, &reg.name, first_try);
                tokio::pin!(back_to_udp);
                let why = loop {
                    tokio::select! {
                        frame = read_frame::<ServerMsg, _>(&mut events) => match frame {
                            Ok(Some(msg)) => {
                                if let Err(why) = pass_on(msg, Some(&reg), &pushed).await {
                                    break why;
                                }
                            }
                            Ok(None) => break "S closed the connection".to_owned(),
                            Err(e) => break e.to_string(),
                        },
                        dialed = &mut back_to_udp, if over_tcp => {
                            tracing::info!(
                                server = %dialed.server,
                                "UDP to S works again: moving the control connection from TCP \
                                 to UDP"
                            );
                            next = Some((dialed, addrs.clone(), target.clone()));
                            break String::new();
                        }
                    }
                };
                pump.abort();
                updates.abort();
                if next.is_some() {
                    // The registration over UDP replaces this one at S, which then ends it;
                    // the old one stays published until the new one is, so requests made
                    // meanwhile still have a connection.
                    continue;
                }
                current.send_replace(None);
                let why = reg
                    .conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or(why);
                tracing::warn!(server = %reg.name, "lost the connection to S ({why}); reconnecting");
                lost = Some(reg.name.clone());
            }
            Err(ControlError::Fatal(e)) => return e,
            Err(ControlError::Retry(e)) => {
                current.send_replace(None);
                let delay = backoff.next_delay();
                tracing::warn!(
                    "cannot register with S: {e:#}; retrying in {:.1}s",
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What S pushes on registration `home` (`None`: a visit, which exposes nothing), passed on
/// to `pushed`; `Err` says why to stop reading.
pub(super) async fn pass_on(
    msg: ServerMsg,
    home: Option<&Arc<Registered>>,
    pushed: &mpsc::Sender<ServerEvent>,
) -> Result<(), String> {
    let event = match (msg, home) {
        (ServerMsg::Incoming(rv), Some(reg)) => ServerEvent::Introduced(Box::new(rv), reg.clone()),
        (ServerMsg::RelayClosed { session, reason }, _) => {
            tracing::warn!(session, "S stopped relaying a session: {reason}");
            ServerEvent::RelayClosed { session }
        }
        (other, _) => {
            tracing::warn!(?other, "unexpected message from S");
            return Ok(());
        }
    };
    pushed
        .send(event)
        .await
        .map_err(|_| "agent shutting down".to_owned())
}

/// One attempt: reach one of `targets` (the first to answer), verify it, register exposing
/// `names` (`visiting`: only to reach a name there). Returns the registration and the stream
/// on which S pushes introductions.
pub(super) async fn register(
    ctx: &Ctx,
    targets: &[Target],
    names: Vec<String>,
    visiting: bool,
) -> Result<(Registered, quinn::RecvStream), ControlError> {
    let (dialed, addrs, target) = reach(ctx, targets).await?;
    register_on(ctx, dialed, &addrs, &target, names, visiting).await
}

/// A control connection to the first of `targets` to answer with a key this agent trusts,
/// racing each one's addresses over UDP and TCP; returns it, all of that S's addresses, and
/// which one it is. An S with a key it does not trust loses the race rather than ending it;
/// only when every one does is that the user's to fix.
async fn reach(
    ctx: &Ctx,
    targets: &[Target],
) -> Result<(Dialed, Vec<SocketAddr>, Target), ControlError> {
    let config = client_config(ctx)?;
    let rejected = std::sync::atomic::AtomicUsize::new(0);
    let rejected = &rejected;
    // The members an S lists are bounded only by its frame; dialling hundreds at once
    // would be a flood of our own.
    let racers = targets.iter().take(MAX_RACED).map(|target| {
        let config = config.clone();
        Box::pin(async move {
            let addrs = dial::resolve(&target.addr, ctx.families()).await?;
            let attempts = dial::schedule(&addrs, true);
            let dialed = dial::dial(ctx, config, host_part(&target.addr), &attempts)
                .await
                .map_err(|e| {
                    anyhow!(
                        "cannot reach S at {} (tried {addrs:?} over UDP and TCP): {e:#}",
                        target.addr
                    )
                })?;
            if let Err(e) = verify_server(ctx, &dialed.conn, target) {
                rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
            anyhow::Ok((dialed, addrs, target.clone()))
        }) as dial::Racer<'_, _>
    });
    let racers: Vec<_> = racers.collect();
    let raced = racers.len();
    dial::first_ok(racers).await.map_err(|errors| {
        let why = anyhow!("{}", errors.join("; "));
        if rejected.load(std::sync::atomic::Ordering::Relaxed) == raced {
            ControlError::Fatal(why)
        } else {
            ControlError::Retry(why)
        }
    })
}

/// The most servers raced at once for a home.
const MAX_RACED: usize = 32;

/// Gives `name` back to S (`p2ptun release`) on a control connection of its own that never
/// registers: registering would replace a running agent of this key at S.
pub async fn release(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let (dialed, _, _) = reach(ctx, &targets(ctx, &load_members(ctx))).await?;
    let msg = ClientMsg::Release {
        version: PROTOCOL_VERSION,
        token: ctx.opts.token.clone(),
        name: name.to_owned(),
    };
    let answer = super::registration::request(&dialed.conn, &msg).await;
    dialed.conn.close(0u32.into(), b"done");
    match answer.with_context(|| format!("cannot release '{name}'"))? {
        ServerMsg::Released { name: n } if n == name => Ok(()),
        ServerMsg::Error(e) => Err(release_refused(name, e)),
        other => bail!("S answered the release of '{name}' with {other:?}"),
    }
}

/// S's refusal of a release, with what the user can do about it.
fn release_refused(name: &str, e: ErrorMsg) -> anyhow::Error {
    match e.code {
        ErrorCode::BadToken => {
            anyhow!("S refused the token: {e} (pass the right one with --token or P2PTUN_TOKEN)")
        }
        // An S that predates releasing cannot read the request at all.
        ErrorCode::BadRequest if e.message.contains("unknown variant") => anyhow!(
            "this S does not know how to release names (it is older than this agent); \
             upgrade S to release '{name}'"
        ),
        _ => anyhow!("S refused to release '{name}': {e}"),
    }
}

fn client_config(ctx: &Ctx) -> Result<quinn::ClientConfig, ControlError> {
    tls::client_config(&ctx.identity, crate::proto::ALPN_CONTROL)
        .map_err(|e| ControlError::Fatal(e.into()))
}

/// Registers on a control connection to `target` already made, exposing `names`; `addrs` are
/// all of S's addresses, for learning this agent's reflexive address in the family the
/// connection does not use.
async fn register_on(
    ctx: &Ctx,
    dialed: Dialed,
    addrs: &[SocketAddr],
    target: &Target,
    names: Vec<String>,
    visiting: bool,
) -> Result<(Registered, quinn::RecvStream), ControlError> {
    let retry = ControlError::Retry;
    let Dialed {
        conn,
        server,
        carrier,
    } = dialed;
    if carrier == Carrier::Tcp {
        tracing::info!(%server, "connected to S over TCP (UDP gets no answer on this network)");
    }
    let fingerprint = verify_server(ctx, &conn, target).map_err(ControlError::Fatal)?;
    // Over TCP, the address S observes is the TCP connection's mapping, not the UDP socket's
    // that peers punch to. UDP may work after all (the race goes to TCP when a lossy link
    // drops the first QUIC packets): one STUN round trip over UDP, bounded by a few of the
    // RTTs just measured, finds the UDP mapping then and costs a blocked network little.
    let udp_observed = if carrier == Carrier::Tcp {
        let wait = (conn.rtt() * 3).clamp(UDP_PROBE_MIN, UDP_PROBE_MAX);
        ctx.router
            .binding(server, None, wait)
            .await
            .and_then(|r| crate::proto::stun::mapped_address(&r.msg))
            .map(crate::path::canonical)
    } else {
        None
    };
    let udp_works = carrier == Carrier::Udp || udp_observed.is_some();
    let tcp_observed = async {
        match &ctx.tcp {
            // The TCP punching port is IPv4 (see Agent::start).
            Some(tcp) => match addrs.iter().find(|a| a.is_ipv4()) {
                Some(v4) => tcp.reflexive(*v4).await,
                None => None,
            },
            None => None,
        }
    };
    // How the NAT maps decides how peers punch to us (see punch::symmetric); it takes two
    // STUN round trips to S over IPv4, done while the TCP mapping is learnt.
    let nat = async {
        let Some(v4) = addrs.iter().find(|a| a.is_ipv4()) else {
            return NatMapping::Unknown;
        };
        if !udp_works {
            return NatMapping::Unknown;
        }
        let locals: Vec<SocketAddr> = ctx.local_candidates().iter().map(|c| c.addr).collect();
        crate::punch::netcheck::nat_mapping(&ctx.router, *v4, &locals).await
    };
    // S sees the control connection's family; a STUN Binding to S's address of the other
    // family (when S has one) finds this agent's reflexive address there too.
    let other_family = async {
        if !udp_works {
            return None;
        }
        let other = addrs.iter().find(|a| a.is_ipv4() != server.is_ipv4())?;
        let response = ctx.router.binding(*other, None, OTHER_FAMILY_PROBE).await?;
        crate::proto::stun::mapped_address(&response.msg).map(crate::path::canonical)
    };
    let (tcp_observed, nat, observed_other) = tokio::join!(tcp_observed, nat, other_family);

    let registered_with = registration_candidates(
        ctx,
        tcp_observed,
        observed_other.into_iter().chain(udp_observed),
    );
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let msg = ClientMsg::Register {
            version: PROTOCOL_VERSION,
            token: ctx.opts.token.clone(),
            names: names.clone(),
            candidates: registered_with.clone(),
            nat,
        };
        write_frame(&mut send, &msg).await?;
        // The send side stays open: closing it would end the registration.
        let reply = read_frame::<ServerMsg, _>(&mut recv).await?;
        Ok::<_, anyhow::Error>((send, recv, reply))
    };
    let (send, recv, reply) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| retry(anyhow!("S did not answer the registration")))?
        .map_err(|e| retry(e.context("registration failed")))?;
    match reply {
        Some(ServerMsg::Registered {
            observed, members, ..
        }) => {
            let observed = crate::path::canonical(observed);
            if visiting {
                tracing::info!(%server, name = %target.addr, %observed, over = ?carrier, "visiting S of the cluster");
            } else {
                tracing::info!(
                    %server, name = %target.addr, %observed, ?observed_other, ?nat, over = ?carrier,
                    id = %ctx.identity.fingerprint(), members = members.len(),
                    "registered with S{}",
                    match names.is_empty() {
                        true => String::new(),
                        false => format!(" exposing {}", names.join(", ")),
                    }
                );
            }
            Ok((
                Registered {
                    conn,
                    name: target.addr.clone(),
                    fingerprint,
                    visiting,
                    members,
                    server,
                    server_addrs: addrs.to_vec(),
                    over_udp: carrier == Carrier::Udp,
                    observed,
                    observed_other,
                    udp_observed,
                    tcp_observed,
                    nat,
                    registered_with,
                    _registration: send,
                    tasks: Vec::new(),
                },
                recv,
            ))
        }
        Some(ServerMsg::Error(e)) => Err(classify(e)),
        Some(other) => Err(retry(anyhow!("S answered the registration with {other:?}"))),
        None => Err(retry(anyhow!(
            "S closed the registration: {}",
            conn.close_reason()
                .map(|r| r.to_string())
                .unwrap_or_default()
        ))),
    }
}

/// The bounds of the STUN round trip over UDP of an agent registered over TCP.
const UDP_PROBE_MIN: Duration = Duration::from_millis(200);
/// See [`UDP_PROBE_MIN`].
const UDP_PROBE_MAX: Duration = Duration::from_secs(1);

/// How long the STUN Binding to S's address of the other family may take.
const OTHER_FAMILY_PROBE: Duration = Duration::from_millis(1500);

/// How often an agent registered over TCP tries UDP to S again: first after
/// [`UDP_RETRY_FIRST`] (after 1 s when STUN over UDP answered at registration), doubling up
/// to [`UDP_RETRY_CAP`]. A network that blocked UDP at
/// start (a captive portal, a hotel firewall) often stops doing so later; each try costs
/// one QUIC handshake attempt.
const UDP_RETRY_FIRST: Duration = Duration::from_secs(15);
/// The longest pause between two tries of UDP.
const UDP_RETRY_CAP: Duration = Duration::from_secs(300);

/// Waits until a QUIC handshake with one of `addrs` over UDP succeeds, trying now and then;
/// never returns while UDP stays blocked.
async fn udp_works_again(ctx: &Ctx, addrs: &[SocketAddr], host: &str, first: Duration) -> Dialed {
    let mut pause = first;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(UDP_RETRY_CAP);
        let Ok(config) = client_config(ctx) else {
            continue;
        };
        let attempts = dial::schedule(addrs, false);
        match dial::dial(ctx, config, host_part(host), &attempts).await {
            Ok(dialed) => return dialed,
            Err(e) => tracing::debug!("UDP to S still fails: {e:#}"),
        }
    }
}

fn classify(e: ErrorMsg) -> ControlError {
    match e.code {
        ErrorCode::BadToken => ControlError::Fatal(anyhow!(
            "S refused the token: {e} (pass the right one with --token or P2PTUN_TOKEN)"
        )),
        ErrorCode::NameTaken | ErrorCode::InvalidName | ErrorCode::BadVersion => {
            ControlError::Fatal(anyhow!("S refused the registration: {e}"))
        }
        _ => ControlError::Retry(anyhow!("S refused the registration: {e}")),
    }
}

/// Checks the key of S at `target` (see the module's doc): the key its cluster vouched for;
/// for a server the user gave, `--server-fingerprint`, a CA, or the key pinned for it
/// (pinned on first use). Returns the key.
fn verify_server(ctx: &Ctx, conn: &Connection, target: &Target) -> anyhow::Result<Fingerprint> {
    let seen = tls::peer_fingerprint(conn).context("S presented no usable certificate")?;
    let addr = &target.addr;
    if let Some(vouched) = target.vouched {
        if seen != vouched {
            conn.close(0u32.into(), b"wrong server key");
            bail!("S at {addr} presented key {seen}, not the {vouched} its cluster vouched for");
        }
        return Ok(seen);
    }
    if let Some(expected) = ctx.opts.server_fingerprint {
        if seen != expected {
            conn.close(0u32.into(), b"wrong server key");
            bail!(
                "S at {addr} presented key {seen}, not the {expected} given with --server-fingerprint"
            );
        }
        return Ok(seen);
    }
    if tls::verify_with_system_roots(&tls::peer_certs(conn), host_part(addr)).is_ok() {
        return Ok(seen);
    }
    if target.cluster.contains(&seen) {
        return Ok(seen);
    }
    let pins = PinFile::new(ctx.opts.state_dir.join("known_servers"));
    match pins.check(&format!("S at {addr}"), addr, seen) {
        Ok(Pinned::Known) => Ok(seen),
        Ok(Pinned::New) => {
            tracing::warn!(
                server = %addr,
                "first connection to this S: pinned its key {seen} in {}",
                pins.path().display()
            );
            Ok(seen)
        }
        Err(e) => {
            conn.close(0u32.into(), b"server key changed");
            Err(e.into())
        }
    }
}

/// The host part of `HOST:PORT` (without IPv6 brackets), for TLS server names.
fn host_part(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_strips_port_and_brackets() {
        assert_eq!(host_part("relay.example.com:7000"), "relay.example.com");
        assert_eq!(host_part("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_part("[::1]:7000"), "::1");
    }
}
