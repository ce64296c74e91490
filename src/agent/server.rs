//! The agent's control connection to S: connect, check S's key, register, pass on what S
//! pushes (introductions, relay sessions closed), and reconnect with backoff whenever the
//! connection is lost.

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
    read_frame, write_frame, Candidate, CandidateKind, ClientMsg, ErrorCode, ErrorMsg, NatMapping,
    Rendezvous, ServerMsg, PROTOCOL_VERSION,
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
    let mut next: Option<(Dialed, Vec<SocketAddr>)> = None;
    loop {
        let attempt = match next.take() {
            Some((dialed, addrs)) => register_on(&ctx, dialed, &addrs).await,
            None => register(&ctx).await,
        };
        match attempt {
            Ok((reg, mut events)) => {
                backoff.reset();
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
                // UDP that answered STUN at registration is worth trying again at once.
                let first_try = if reg.udp_observed.is_some() {
                    Duration::from_secs(1)
                } else {
                    UDP_RETRY_FIRST
                };
                let back_to_udp = udp_works_again(&ctx, &addrs, first_try);
                tokio::pin!(back_to_udp);
                let why = loop {
                    tokio::select! {
                        frame = read_frame::<ServerMsg, _>(&mut events) => match frame {
                            Ok(Some(ServerMsg::Incoming(rv))) => {
                                let event = ServerEvent::Introduced(Box::new(rv), reg.clone());
                                if pushed.send(event).await.is_err() {
                                    break "agent shutting down".to_owned();
                                }
                            }
                            Ok(Some(ServerMsg::RelayClosed { session, reason })) => {
                                tracing::warn!(session, "S stopped relaying a session: {reason}");
                                let event = ServerEvent::RelayClosed { session };
                                if pushed.send(event).await.is_err() {
                                    break "agent shutting down".to_owned();
                                }
                            }
                            Ok(Some(other)) => tracing::warn!(?other, "unexpected message from S"),
                            Ok(None) => break "S closed the connection".to_owned(),
                            Err(e) => break e.to_string(),
                        },
                        dialed = &mut back_to_udp, if over_tcp => {
                            tracing::info!(
                                server = %dialed.server,
                                "UDP to S works again: moving the control connection from TCP \
                                 to UDP"
                            );
                            next = Some((dialed, addrs.clone()));
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
                tracing::warn!(server = %ctx.opts.server, "lost the connection to S ({why}); reconnecting");
            }
            Err(ControlError::Fatal(e)) => return e,
            Err(ControlError::Retry(e)) => {
                current.send_replace(None);
                let delay = backoff.next_delay();
                tracing::warn!(
                    server = %ctx.opts.server,
                    "cannot register with S: {e:#}; retrying in {:.1}s",
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One attempt: reach S, verify it, register. Returns the registration and the stream on
/// which S pushes introductions.
async fn register(ctx: &Ctx) -> Result<(Registered, quinn::RecvStream), ControlError> {
    let (dialed, addrs) = reach(ctx).await?;
    register_on(ctx, dialed, &addrs).await
}

/// A control connection to S, racing its addresses over UDP and TCP; returns it and all of
/// S's addresses. S is not verified yet.
async fn reach(ctx: &Ctx) -> Result<(Dialed, Vec<SocketAddr>), ControlError> {
    let retry = ControlError::Retry;
    let addrs = dial::resolve(&ctx.opts.server, ctx.families())
        .await
        .map_err(retry)?;
    let config = client_config(ctx)?;
    let attempts = dial::schedule(&addrs, true);
    let dialed = dial::dial(ctx, config, host_part(&ctx.opts.server), &attempts)
        .await
        .map_err(|e| {
            retry(anyhow!(
                "cannot reach S at {} (tried {addrs:?} over UDP and TCP): {e:#}",
                ctx.opts.server
            ))
        })?;
    Ok((dialed, addrs))
}

/// Gives `name` back to S (`p2ptun release`) on a control connection of its own that never
/// registers: registering would replace a running agent of this key at S.
pub async fn release(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let (dialed, _) = reach(ctx).await?;
    verify_server(ctx, &dialed.conn, host_part(&ctx.opts.server))?;
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

/// Registers on a control connection already made; `addrs` are all of S's addresses, for
/// learning this agent's reflexive address in the family the connection does not use.
async fn register_on(
    ctx: &Ctx,
    dialed: Dialed,
    addrs: &[SocketAddr],
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
    verify_server(ctx, &conn, host_part(&ctx.opts.server)).map_err(ControlError::Fatal)?;
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
            names: ctx.expose_names(),
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
        Some(ServerMsg::Registered { observed, .. }) => {
            let observed = crate::path::canonical(observed);
            tracing::info!(
                %server, %observed, ?observed_other, ?nat, over = ?carrier, id = %ctx.identity.fingerprint(),
                "registered with S{}",
                match ctx.expose_names() {
                    names if names.is_empty() => String::new(),
                    names => format!(" exposing {}", names.join(", ")),
                }
            );
            Ok((
                Registered {
                    conn,
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
async fn udp_works_again(ctx: &Ctx, addrs: &[SocketAddr], first: Duration) -> Dialed {
    let mut pause = first;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(UDP_RETRY_CAP);
        let Ok(config) = client_config(ctx) else {
            continue;
        };
        let attempts = dial::schedule(addrs, false);
        match dial::dial(ctx, config, host_part(&ctx.opts.server), &attempts).await {
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

/// Accepts S's key if it matches `--server-fingerprint`, or a CA vouches for it, or it is the
/// key pinned for this server (pinning it on first use).
fn verify_server(ctx: &Ctx, conn: &Connection, host: &str) -> anyhow::Result<()> {
    let seen = tls::peer_fingerprint(conn).context("S presented no usable certificate")?;
    if let Some(expected) = ctx.opts.server_fingerprint {
        if seen != expected {
            conn.close(0u32.into(), b"wrong server key");
            bail!(
                "S at {} presented key {seen}, not the {expected} given with --server-fingerprint",
                ctx.opts.server
            );
        }
        return Ok(());
    }
    if tls::verify_with_system_roots(&tls::peer_certs(conn), host).is_ok() {
        return Ok(());
    }
    let pins = PinFile::new(ctx.opts.state_dir.join("known_servers"));
    match pins.check(&format!("S at {}", ctx.opts.server), &ctx.opts.server, seen) {
        Ok(Pinned::Known) => Ok(()),
        Ok(Pinned::New) => {
            tracing::warn!(
                server = %ctx.opts.server,
                "first connection to this S: pinned its key {seen} in {}",
                pins.path().display()
            );
            Ok(())
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
