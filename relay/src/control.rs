//! One agent's control connection: its registration stream (Register, then S's pushes of
//! Incoming and RelayClosed), its request streams (one Connect, UpdateCandidates, UpdateNames or Release
//! each; Release needs no registration), and the relayed
//! packets it sends (handed to [`crate::forward`]). Everything an agent does wrong is
//! answered on the stream it did it on; only a broken registration stream ends the
//! connection, and nothing here can affect another agent's.
//!
//! The connection may come over UDP or, for an agent whose UDP is blocked, over TCP
//! ([`Carrier`]); everything that needs the agent's address asks the carrier, never the
//! connection's `remote_address()`, which for TCP is only a virtual address.

use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use p2ptun::path::canonical;
use p2ptun::proto::relay as wire;
use p2ptun::proto::{
    read_frame, validate_name, write_frame, Candidate, ClientMsg, ErrorCode, ErrorMsg, Fingerprint,
    FrameError, NatMapping, ServerMsg, PROTOCOL_VERSION,
};
use p2ptun::tunnel::tls::peer_fingerprint;
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cluster::{Cluster, ClusterError};
use crate::forward;
use crate::limits::ConnSlot;
use crate::metrics::Metrics;
use crate::names::NamesError;
use crate::relay::NotOpened;
use crate::rendezvous::{introduce, Side};
pub use crate::shared::Carrier;
use crate::shared::{Agent, Shared, UNREGISTERED};

/// QUIC application close codes S uses; the reason phrase says more.
pub mod close {
    use quinn::VarInt;

    /// S is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The agent broke the protocol (no certificate, misuse of the registration stream).
    pub const PROTOCOL: VarInt = VarInt::from_u32(1);
    /// Registration was refused; the error was also sent on the registration stream.
    pub const REFUSED: VarInt = VarInt::from_u32(2);
    /// A newer connection of the same identity registered.
    pub const REPLACED: VarInt = VarInt::from_u32(3);
    /// The agent closed its registration stream: it is leaving.
    pub const LEFT: VarInt = VarInt::from_u32(4);
    /// The TCP connection carrying the control connection ended.
    pub const LINK_LOST: VarInt = VarInt::from_u32(5);
}

pub use p2ptun::proto::MAX_CANDIDATES;
pub use p2ptun::proto::MAX_NAMES_PER_AGENT;
/// How long an agent may take to send a stream's first message.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to an agent may take before the agent is considered stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long S waits, after refusing a registration, for the agent to read the error and
/// hang up before S closes the connection itself (closing at once could discard the
/// error before the agent has read it).
const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// How long a connection may stay without registering: an unregistered connection is of no
/// use to anyone and holds one of its source's connection slots.
pub const REGISTER_DEADLINE: Duration = Duration::from_secs(15);
/// Introductions queued for an exposer that is slow to take them.
const PUSH_QUEUE: usize = 32;

/// One connection's state, shared by its stream tasks.
struct Session {
    shared: Arc<Shared>,
    conn: Connection,
    carrier: Carrier,
    fingerprint: Fingerprint,
    register_started: AtomicBool,
    registered: Mutex<Option<(u64, Arc<Agent>)>>,
    /// The connection's share of S's limits, which registering moves from the source's
    /// unregistered connections to its agents.
    slot: ConnSlot,
}

impl Session {
    fn registered(&self) -> Option<(u64, Arc<Agent>)> {
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// This connection's relay party number.
    fn party_id(&self) -> u64 {
        self.registered().map_or(UNREGISTERED, |(r, _)| r)
    }

    fn remote(&self) -> SocketAddr {
        self.carrier.remote(&self.conn)
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorMsg {
    ErrorMsg {
        code,
        message: message.into(),
    }
}

/// The address to tell an agent for S's alternate STUN socket, bound at `alt`.
///
/// A socket bound to a specific address is reported as it is. One bound to the unspecified
/// address has no address of its own, so S reports the address the agent's packets reached
/// (`local_ip`) with the alternate port: both sockets are on the same host, so what reached
/// one reaches the other. Without that address (no packet info on this platform) S reports
/// nothing rather than guess. Behind a 1:1 NAT in front of S the reported IP is S's private
/// one; bind `stun_alt` to S's public address there, if the host has it.
pub fn stun_alt_for(alt: SocketAddr, local_ip: Option<IpAddr>) -> Option<SocketAddr> {
    let alt = canonical(alt);
    if !alt.ip().is_unspecified() {
        return Some(alt);
    }
    local_ip.map(|ip| SocketAddr::new(ip.to_canonical(), alt.port()))
}

/// Serves one established connection, carried by `carrier` and admitted under `slot`, until
/// it ends.
pub async fn serve(shared: Arc<Shared>, conn: Connection, carrier: Carrier, slot: ConnSlot) {
    let Some(fingerprint) = peer_fingerprint(&conn) else {
        conn.close(close::PROTOCOL, b"no usable client certificate");
        return;
    };
    let session = Arc::new(Session {
        shared,
        conn: conn.clone(),
        carrier,
        fingerprint,
        register_started: AtomicBool::new(false),
        registered: Mutex::new(None),
        slot,
    });
    let remote = session.remote();
    tracing::debug!(%remote, agent = %fingerprint, "agent connected");
    let mut streams = JoinSet::new();
    let deadline = tokio::time::sleep(REGISTER_DEADLINE);
    let mut deadline = pin!(deadline);
    let mut deadline_armed = true;
    let reason = loop {
        tokio::select! {
            () = &mut deadline, if deadline_armed => {
                deadline_armed = false;
                if session.registered().is_none() {
                    conn.close(close::PROTOCOL, b"no registration within 15 s");
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(handle_stream(Arc::clone(&session), send, recv));
                }
                Err(e) => break e,
            },
            datagram = conn.read_datagram() => match datagram {
                Ok(payload) => {
                    forward::datagram(&session.shared, session.party_id(), payload, &mut streams);
                }
                Err(e) => break e,
            },
            accepted = conn.accept_uni() => match accepted {
                Ok(recv) => {
                    let shared = Arc::clone(&session.shared);
                    streams.spawn(forward::stream(shared, session.party_id(), recv));
                }
                Err(e) => break e,
            },
            Some(done) = streams.join_next() => {
                if let Err(e) = done {
                    tracing::error!(agent = %fingerprint, error = %e, "stream task failed");
                }
            }
        }
    };
    streams.abort_all();
    if let Some((registration, _)) = session.registered() {
        let gone = session
            .shared
            .directory()
            .remove(&fingerprint, registration);
        if gone {
            tracing::info!(%remote, agent = %fingerprint, %reason, "agent went offline");
            if let Some(cluster) = &session.shared.cluster {
                cluster.left(fingerprint).await;
            }
        }
        let closed = session.shared.relay().remove_party(registration);
        for c in closed {
            forward::announce(&session.shared, c);
        }
    } else {
        tracing::debug!(%remote, agent = %fingerprint, %reason, "connection ended");
    }
}

async fn handle_stream(session: Arc<Session>, mut send: SendStream, mut recv: RecvStream) {
    let first = tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<ClientMsg, _>(&mut recv));
    let msg = match first.await {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return,
        Ok(Err(FrameError::Malformed(e))) => {
            let err = error(ErrorCode::BadRequest, format!("malformed request: {e}"));
            reply_error(&session, &mut send, err).await;
            return;
        }
        Ok(Err(FrameError::TooLarge(n))) => {
            let err = error(
                ErrorCode::BadRequest,
                format!("a request of {n} bytes is larger than S accepts"),
            );
            reply_error(&session, &mut send, err).await;
            return;
        }
        // The stream broke; there is nobody to answer.
        Ok(Err(_)) => return,
        Err(_) => {
            let err = error(ErrorCode::BadRequest, "no request within 10 s");
            reply_error(&session, &mut send, err).await;
            return;
        }
    };
    match msg {
        ClientMsg::Register {
            version,
            token,
            names,
            candidates,
            nat,
        } => {
            if session.register_started.swap(true, Ordering::SeqCst) {
                let err = error(
                    ErrorCode::BadRequest,
                    "already registered on this connection; Register is sent once",
                );
                reply_error(&session, &mut send, err).await;
                return;
            }
            // In a cluster the names are claimed in etcd first (a network round trip, so
            // outside every lock); `register` then only lists them.
            let claimed = match cluster_claim(&session, version, token.as_deref(), &names).await {
                Ok(claimed) => claimed,
                Err(err) => return refuse_registration(&session, send, err).await,
            };
            let request = RegisterRequest {
                version,
                token,
                names,
                candidates,
                nat,
            };
            match register(&session, request).await {
                Ok((registration, push_rx, observed)) => {
                    if let (Some(cluster), Some(names)) = (&session.shared.cluster, claimed) {
                        cluster.arrived(session.fingerprint, names).await;
                    }
                    registered_stream(&session, send, recv, push_rx, observed, registration).await
                }
                Err(err) => refuse_registration(&session, send, err).await,
            }
        }
        ClientMsg::Connect {
            name,
            candidates,
            nat,
        } => {
            let answer = match connect(&session, &name, candidates, nat).await {
                Ok(Introduction::Here(rendezvous)) => ServerMsg::Rendezvous(rendezvous),
                Ok(Introduction::Elsewhere(server)) => {
                    tracing::debug!(agent = %session.fingerprint, %name, server = %server.addr, "the name is exposed on another S");
                    ServerMsg::Elsewhere { name, server }
                }
                Err(err) => {
                    session.shared.metrics.error(err.code);
                    tracing::debug!(agent = %session.fingerprint, %name, error = %err, "connect refused");
                    ServerMsg::Error(err)
                }
            };
            let _ = write_and_finish(&mut send, &answer).await;
        }
        ClientMsg::UpdateNames { names } => {
            // Unregistered, `update_names` refuses it; nothing may be claimed for it.
            let claimed = match session.registered() {
                Some(_) => cluster_claim(&session, PROTOCOL_VERSION, None, &names).await,
                None => Ok(None),
            };
            let updated = match claimed {
                Ok(_) => update_names(&session, names).await,
                Err(e) => Err(e),
            };
            let answer = match updated {
                Ok(names) => {
                    tracing::info!(agent = %session.fingerprint, ?names, "names updated");
                    if let Some(cluster) = &session.shared.cluster {
                        cluster.arrived(session.fingerprint, names).await;
                    }
                    ServerMsg::NamesUpdated
                }
                Err(err) => {
                    session.shared.metrics.error(err.code);
                    ServerMsg::Error(err)
                }
            };
            let _ = write_and_finish(&mut send, &answer).await;
        }
        ClientMsg::UpdateCandidates { candidates } => {
            let answer = match update_candidates(&session, candidates) {
                Ok(()) => ServerMsg::CandidatesUpdated,
                Err(err) => {
                    session.shared.metrics.error(err.code);
                    ServerMsg::Error(err)
                }
            };
            let _ = write_and_finish(&mut send, &answer).await;
        }
        ClientMsg::Release {
            version,
            token,
            name,
        } => {
            let released = match &session.shared.cluster {
                Some(cluster) => {
                    cluster_release(&session, cluster, version, token.as_deref(), &name).await
                }
                None => release(&session, version, token.as_deref(), &name).await,
            };
            let answer = match released {
                Ok(()) => ServerMsg::Released { name },
                Err(err) => {
                    session.shared.metrics.error(err.code);
                    tracing::info!(
                        agent = %session.fingerprint,
                        %name,
                        code = ?err.code,
                        error = %err,
                        "release refused"
                    );
                    ServerMsg::Error(err)
                }
            };
            let _ = write_and_finish(&mut send, &answer).await;
        }
    }
}

/// Gives `name` back on behalf of this connection's key, which must hold it and must not be
/// exposing it right now (see [`crate::names::NameRegistry::release`] for why).
async fn release(
    session: &Session,
    version: u32,
    token: Option<&str>,
    name: &str,
) -> Result<(), ErrorMsg> {
    check_version_and_token(session, version, token)?;
    validate_name(name).map_err(|e| error(ErrorCode::InvalidName, e))?;
    let shared = &session.shared;
    let released = {
        let mut names = shared.names();
        // Under the names lock, as a registration lists its agent under it after checking
        // that its key still holds the names: either the registration is listed (and the
        // name is exposed) or it finds the name released and is refused.
        let exposed = shared
            .directory()
            .exposing(name)
            .is_some_and(|agent| agent.fingerprint == session.fingerprint);
        names.release(name, session.fingerprint, exposed)
    };
    let released = match released {
        Ok(saved) => shared.names_saved(saved).await,
        Err(e) => Err(e),
    };
    released.map_err(|e| match e {
        NamesError::Unknown(_) => error(
            ErrorCode::UnknownName,
            format!("nobody holds the name '{name}' on this server; there is nothing to release"),
        ),
        NamesError::Taken(_) => error(
            ErrorCode::NameTaken,
            format!(
                "the name '{name}' is held by another identity on this server; only the key \
                     that claimed it can release it (run `p2ptun release` with that agent's \
                     --state-dir)"
            ),
        ),
        NamesError::InUse(_) => error(
            ErrorCode::BadRequest,
            format!(
                "the name '{name}' is exposed right now by an agent with this key; stop \
                     that agent (or take '{name}' out of its config), then release it"
            ),
        ),
        other => {
            tracing::error!(error = %other, "cannot save a released name");
            error(ErrorCode::Internal, "S could not save the release")
        }
    })?;
    Metrics::inc(&shared.metrics.names_released_total);
    tracing::info!(agent = %session.fingerprint, %name, "name released by its owner");
    Ok(())
}

/// In cluster mode, claims `names` for this connection's key in etcd, after checking what
/// must come first (version, token, the names themselves); the names claimed. Nothing to do
/// (`None`) for a standalone S.
async fn cluster_claim(
    session: &Session,
    version: u32,
    token: Option<&str>,
    names: &[String],
) -> Result<Option<Vec<String>>, ErrorMsg> {
    let Some(cluster) = &session.shared.cluster else {
        return Ok(None);
    };
    if session.registered().is_none() {
        check_version_and_token(session, version, token)?;
    }
    let names = checked_names(names.to_vec())?;
    cluster
        .claim(&names, session.fingerprint)
        .await
        .map_err(|e| cluster_error(&e, "claim"))?;
    Ok(Some(names))
}

/// [`release`] for an S in a cluster: the claim is given back in etcd.
async fn cluster_release(
    session: &Session,
    cluster: &Cluster,
    version: u32,
    token: Option<&str>,
    name: &str,
) -> Result<(), ErrorMsg> {
    check_version_and_token(session, version, token)?;
    validate_name(name).map_err(|e| error(ErrorCode::InvalidName, e))?;
    cluster
        .release(name, session.fingerprint)
        .await
        .map_err(|e| cluster_error(&e, "release"))?;
    Metrics::inc(&session.shared.metrics.names_released_total);
    tracing::info!(agent = %session.fingerprint, %name, "name released by its owner (cluster)");
    Ok(())
}

/// What an agent is told when the cluster refused or could not be asked.
fn cluster_error(e: &ClusterError, what: &str) -> ErrorMsg {
    match e {
        ClusterError::Taken(name) => error(
            ErrorCode::NameTaken,
            format!(
                "the name '{name}' is held by another identity in this S's cluster; choose \
                 another name, or run with the key that claimed it"
            ),
        ),
        ClusterError::Unknown(name) => error(
            ErrorCode::UnknownName,
            format!(
                "nobody holds the name '{name}' in this S's cluster; there is nothing to release"
            ),
        ),
        ClusterError::InUse(name) => error(
            ErrorCode::BadRequest,
            format!(
                "the name '{name}' is exposed right now by an agent with this key (on some S \
                 of the cluster); stop that agent, then release it"
            ),
        ),
        ClusterError::Unreachable(why) => {
            tracing::warn!(error = %why, "a name {what} waits for etcd");
            error(
                ErrorCode::Internal,
                format!(
                    "S cannot reach its etcd cluster to {what} names ({why}); agents already \
                     registered are served, and this works again once etcd answers"
                ),
            )
        }
    }
}

/// The S of the cluster whose agent exposes `name`, if another one's does.
async fn elsewhere(
    cluster: &Cluster,
    name: &str,
) -> Result<Option<p2ptun::proto::ServerInfo>, ClusterError> {
    let Some(owner) = cluster.owner(name).await? else {
        return Ok(None);
    };
    let Some(presence) = cluster.presence(&owner).await? else {
        return Ok(None);
    };
    // A presence naming this S is one its agent left a moment ago.
    Ok((presence.names.iter().any(|n| n == name)
        && presence.home.fingerprint != cluster.me().fingerprint)
        .then_some(presence.home))
}

/// What S answers a forwarder's request for a name.
enum Introduction {
    /// The exposer is registered here: the introduction.
    Here(p2ptun::proto::Rendezvous),
    /// It is registered with another S of the cluster, which introduces it.
    Elsewhere(p2ptun::proto::ServerInfo),
}

/// Replaces the registered agent's candidates (a port mapping it got after registering).
fn update_candidates(session: &Session, candidates: Vec<Candidate>) -> Result<(), ErrorMsg> {
    let Some((_, me)) = session.registered() else {
        return Err(error(
            ErrorCode::BadRequest,
            "UpdateCandidates before Register: register first and wait for Registered",
        ));
    };
    check_candidates(&candidates)?;
    tracing::debug!(agent = %me.fingerprint, n = candidates.len(), "candidates updated");
    *me.candidates.lock().unwrap_or_else(|e| e.into_inner()) = candidates;
    Ok(())
}

struct RegisterRequest {
    version: u32,
    token: Option<String>,
    names: Vec<String>,
    candidates: Vec<Candidate>,
    nat: NatMapping,
}

/// Checks what every request that may come before registering carries.
fn check_version_and_token(
    session: &Session,
    version: u32,
    token: Option<&str>,
) -> Result<(), ErrorMsg> {
    if version != PROTOCOL_VERSION {
        return Err(error(
            ErrorCode::BadVersion,
            format!(
                "this S speaks protocol version {PROTOCOL_VERSION} and the agent speaks \
                 version {version}; upgrade the older of the two"
            ),
        ));
    }
    session
        .shared
        .tokens
        .check(token)
        .map_err(|e| error(ErrorCode::BadToken, e.to_string()))
}

/// `names` without repeats, each valid, at most [`MAX_NAMES_PER_AGENT`].
fn checked_names(raw: Vec<String>) -> Result<Vec<String>, ErrorMsg> {
    let mut names: Vec<String> = Vec::with_capacity(raw.len());
    for name in raw {
        validate_name(&name).map_err(|e| error(ErrorCode::InvalidName, e))?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.len() > MAX_NAMES_PER_AGENT {
        return Err(error(
            ErrorCode::BadRequest,
            format!(
                "{} names in one registration; an agent may expose at most {MAX_NAMES_PER_AGENT}",
                names.len()
            ),
        ));
    }
    Ok(names)
}

/// Claims `names` for this connection's key, and waits until the claim is on disk. The
/// caller lists the agent after, under the names lock, if [`still_holds`] says so.
async fn claim(session: &Session, names: &[String]) -> Result<(), ErrorMsg> {
    let claimed = session
        .shared
        .names()
        .claim(names, session.fingerprint, SystemTime::now());
    let claimed = match claimed {
        Ok(claimed) => claimed,
        Err(e) => return Err(claim_error(e)),
    };
    session
        .shared
        .names_saved(claimed.saved)
        .await
        .map_err(claim_error)?;
    Metrics::add(
        &session.shared.metrics.names_expired_total,
        claimed.expired.len() as u64,
    );
    Ok(())
}

fn claim_error(e: NamesError) -> ErrorMsg {
    match e {
        NamesError::Taken(name) => error(
            ErrorCode::NameTaken,
            format!(
                "the name '{name}' is held by another identity on this server; choose \
                 another name, or run with the key that claimed it"
            ),
        ),
        NamesError::Full => error(ErrorCode::RateLimited, e.to_string()),
        other => {
            tracing::error!(error = %other, "cannot save a name claim");
            error(ErrorCode::Internal, "S could not save the name claim")
        }
    }
}

/// Whether this connection's key still holds `names` (checked under the names lock, with
/// the listing that follows): a Release of this key may have given one back while the
/// claim was being saved, and a registration listed with it would expose a name nobody
/// holds.
fn still_holds(
    session: &Session,
    claims: &crate::names::NameRegistry,
    names: &[String],
) -> Result<(), ErrorMsg> {
    if session.shared.cluster.is_some() || claims.holds(names, session.fingerprint) {
        return Ok(());
    }
    Err(error(
        ErrorCode::BadRequest,
        "one of the names was released while this registration claimed it; register again",
    ))
}

/// A registered agent's new set of names (a reloaded `p2ptun up`).
async fn update_names(session: &Session, names: Vec<String>) -> Result<Vec<String>, ErrorMsg> {
    let Some((registration, _)) = session.registered() else {
        return Err(error(
            ErrorCode::BadRequest,
            "UpdateNames before Register: register first and wait for Registered",
        ));
    };
    let names = checked_names(names)?;
    if session.shared.cluster.is_none() {
        claim(session, &names).await?;
    }
    let claims = session.shared.names();
    still_holds(session, &claims, &names)?;
    let listed =
        session
            .shared
            .directory()
            .set_names(&session.fingerprint, registration, names.clone());
    drop(claims);
    if !listed {
        return Err(error(
            ErrorCode::BadRequest,
            "this connection's registration was replaced; send UpdateNames on the new one",
        ));
    }
    Ok(names)
}

/// Checks a registration and puts the agent online.
async fn register(
    session: &Session,
    req: RegisterRequest,
) -> Result<(u64, mpsc::Receiver<ServerMsg>, SocketAddr), ErrorMsg> {
    check_version_and_token(session, req.version, req.token.as_deref())?;
    let names = checked_names(req.names)?;
    check_candidates(&req.candidates)?;
    // Before the names are claimed: an agent S cannot take must not hold names either.
    session.slot.register().map_err(|why| {
        session.shared.metrics.refused(why);
        error(
            ErrorCode::RateLimited,
            format!(
                "S serves as many agents from this address as it may (`{}`); try another \
                 S, or ask its operator to raise the limit",
                why.label()
            ),
        )
    })?;
    let fingerprint = session.fingerprint;
    if session.shared.cluster.is_none() {
        claim(session, &names).await?;
    }
    // Held until the agent is listed: a Release of this key sees both or neither.
    let claims = session.shared.names();
    still_holds(session, &claims, &names)?;

    let (push, push_rx) = mpsc::channel(PUSH_QUEUE);
    let registration = session.shared.next_registration();
    let agent = Arc::new(Agent {
        fingerprint,
        registration,
        candidates: Mutex::new(req.candidates),
        nat: req.nat,
        conn: session.conn.clone(),
        carrier: session.carrier,
        push,
    });
    *session.registered.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((registration, Arc::clone(&agent)));
    let replaced =
        session
            .shared
            .directory()
            .insert(fingerprint, registration, names.clone(), agent);
    drop(claims);
    if let Some(old) = replaced {
        old.conn.close(
            close::REPLACED,
            b"replaced by a newer connection of the same identity",
        );
    }
    Metrics::inc(&session.shared.metrics.registrations_total);
    let observed = session.remote();
    let via = match session.carrier {
        Carrier::Udp => "UDP",
        Carrier::Tcp { .. } => "TCP",
    };
    tracing::info!(agent = %fingerprint, %observed, via, ?names, "agent registered");
    Ok((registration, push_rx, observed))
}

fn check_candidates(candidates: &[Candidate]) -> Result<(), ErrorMsg> {
    if candidates.len() > MAX_CANDIDATES {
        return Err(error(
            ErrorCode::BadRequest,
            format!(
                "{} candidates; at most {MAX_CANDIDATES} are accepted",
                candidates.len()
            ),
        ));
    }
    Ok(())
}

/// Answers Registered, then relays pushes to the agent until the stream or connection ends.
async fn registered_stream(
    session: &Session,
    mut send: SendStream,
    mut recv: RecvStream,
    mut push_rx: mpsc::Receiver<ServerMsg>,
    observed: SocketAddr,
    registration: u64,
) {
    let conn = &session.conn;
    let registered = ServerMsg::Registered {
        observed,
        stun_alt: stun_alt_for(session.shared.stun_alt, session.carrier.local_ip(conn)),
        members: session
            .shared
            .cluster
            .as_ref()
            .map(|c| c.known_members())
            .unwrap_or_default(),
    };
    if let Err(e) = timed_write(&mut send, &registered).await {
        conn.close(
            close::PROTOCOL,
            format!("cannot answer Register: {e}").as_bytes(),
        );
        return;
    }
    // One read for the whole life of the stream: the agent sends nothing more on it, so
    // whatever completes this read ends the registration.
    let mut next = pin!(read_frame::<ClientMsg, _>(&mut recv));
    loop {
        tokio::select! {
            read = &mut next => {
                let reason = match read {
                    Ok(None) => {
                        conn.close(close::LEFT, b"registration stream finished");
                        return;
                    }
                    Ok(Some(_)) => {
                        let err = error(
                            ErrorCode::BadRequest,
                            "the registration stream carries only Register; open a new \
                             stream for each request",
                        );
                        session.shared.metrics.error(err.code);
                        let _ = timed_write(&mut send, &ServerMsg::Error(err.clone())).await;
                        err.message
                    }
                    Err(e) => format!("registration stream: {e}"),
                };
                tracing::debug!(agent = %session.fingerprint, registration, %reason, "closing");
                conn.close(close::PROTOCOL, reason.as_bytes());
                return;
            }
            Some(msg) = push_rx.recv() => {
                if let Err(e) = timed_write(&mut send, &msg).await {
                    let reason = format!("cannot deliver to the agent: {e}");
                    conn.close(close::PROTOCOL, reason.as_bytes());
                    return;
                }
            }
        }
    }
}

/// Sends a registration refusal, gives the agent a moment to read it, and closes.
async fn refuse_registration(session: &Session, mut send: SendStream, err: ErrorMsg) {
    session.shared.metrics.error(err.code);
    tracing::info!(
        agent = %session.fingerprint,
        remote = %session.remote(),
        code = ?err.code,
        error = %err,
        "registration refused"
    );
    let _ = write_and_finish(&mut send, &ServerMsg::Error(err.clone())).await;
    let _ = tokio::time::timeout(REFUSAL_GRACE, session.conn.closed()).await;
    session.conn.close(close::REFUSED, err.message.as_bytes());
}

/// Introduces the asking agent to the one exposing `name`.
async fn connect(
    session: &Session,
    name: &str,
    candidates: Vec<Candidate>,
    nat: NatMapping,
) -> Result<Introduction, ErrorMsg> {
    let Some((_, me)) = session.registered() else {
        return Err(error(
            ErrorCode::BadRequest,
            "Connect before Register: register first and wait for Registered",
        ));
    };
    validate_name(name).map_err(|e| error(ErrorCode::InvalidName, e))?;
    check_candidates(&candidates)?;
    let unknown = || {
        error(
            ErrorCode::UnknownName,
            format!("nobody exposes '{name}' on this server right now"),
        )
    };
    let exposer = session.shared.directory().exposing(name);
    let Some(exposer) = exposer else {
        return match &session.shared.cluster {
            Some(cluster) => match elsewhere(cluster, name).await {
                Ok(Some(home)) => Ok(Introduction::Elsewhere(home)),
                Ok(None) => Err(unknown()),
                Err(e) => Err(cluster_error(&e, "look up")),
            },
            None => Err(unknown()),
        };
    };
    let forwarder = Side {
        fingerprint: me.fingerprint,
        candidates: &candidates,
        observed: session.remote(),
        rtt: session.conn.rtt(),
        nat,
    };
    let exposer_candidates = exposer
        .candidates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let exposer_side = Side {
        fingerprint: exposer.fingerprint,
        candidates: &exposer_candidates,
        observed: exposer.remote(),
        rtt: exposer.conn.rtt(),
        nat: exposer.nat,
    };
    // The relay session exists before either side hears of it: each may send through S as
    // soon as its message arrives.
    let (session_id, relay) = open_relay(&session.shared, &me, &exposer);
    let intro = introduce(session_id, name, forwarder, exposer_side, relay);
    let refused = match exposer.push.try_send(ServerMsg::Incoming(intro.to_exposer)) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(_)) => Some(error(
            ErrorCode::RateLimited,
            format!(
                "the agent exposing '{name}' has too many introductions waiting; try again \
                 shortly"
            ),
        )),
        Err(mpsc::error::TrySendError::Closed(_)) => Some(unknown()),
    };
    if let Some(err) = refused {
        if relay {
            session.shared.relay().forget(session_id);
        }
        return Err(err);
    }
    Metrics::inc(&session.shared.metrics.sessions_total);
    tracing::info!(
        session = session_id,
        %name,
        forwarder = %me.fingerprint,
        exposer = %exposer.fingerprint,
        relay,
        "introduced"
    );
    Ok(Introduction::Here(intro.to_forwarder))
}

/// Draws a session ID and makes its relay session, if S relays. Returns the ID and whether
/// the session is relayed.
fn open_relay(shared: &Shared, forwarder: &Arc<Agent>, exposer: &Arc<Agent>) -> (u64, bool) {
    loop {
        let id = wire::session_id(rand::random());
        let opened = shared
            .relay()
            .open(id, forwarder.party(), exposer.party(), Instant::now());
        match opened {
            Ok(evicted) => {
                Metrics::inc(&shared.metrics.relay_sessions_total);
                if let Some(closed) = evicted {
                    forward::announce(shared, closed);
                }
                return (id, true);
            }
            Err(NotOpened::Exists) => continue,
            Err(why @ (NotOpened::Disabled | NotOpened::Full)) => {
                if why == NotOpened::Full {
                    tracing::warn!("relay sessions are at their limit; introducing without relay");
                }
                return (id, false);
            }
        }
    }
}

async fn reply_error(session: &Session, send: &mut SendStream, err: ErrorMsg) {
    session.shared.metrics.error(err.code);
    tracing::debug!(agent = %session.fingerprint, code = ?err.code, error = %err, "bad request");
    let _ = write_and_finish(send, &ServerMsg::Error(err)).await;
}

async fn timed_write(send: &mut SendStream, msg: &ServerMsg) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(send, msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the agent stopped reading".into()),
    }
}

async fn write_and_finish(send: &mut SendStream, msg: &ServerMsg) -> Result<(), String> {
    timed_write(send, msg).await?;
    send.finish().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alternate_stun_address_is_reported_from_the_agents_view() {
        let specific: SocketAddr = "203.0.113.1:7001".parse().unwrap();
        assert_eq!(stun_alt_for(specific, None), Some(specific));
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        assert_eq!(
            stun_alt_for(any, Some("198.51.100.5".parse().unwrap())),
            Some("198.51.100.5:7001".parse().unwrap())
        );
        let any6: SocketAddr = "[::]:7001".parse().unwrap();
        assert_eq!(
            stun_alt_for(any6, Some("::ffff:198.51.100.5".parse().unwrap())),
            Some("198.51.100.5:7001".parse().unwrap())
        );
        assert_eq!(stun_alt_for(any, None), None);
    }
}
