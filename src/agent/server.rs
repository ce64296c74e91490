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
/// candidates and its TCP port's reflexive address. S adds the UDP one it observes.
fn registration_candidates(ctx: &Ctx, tcp_observed: Option<SocketAddr>) -> Vec<Candidate> {
    ctx.local_candidates()
        .into_iter()
        .chain(tcp_observed.map(|addr| Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr,
        }))
        .collect()
}

/// Sends S this agent's candidates again whenever its port mappings change, for as long as
/// `reg` lives (the task is aborted with it). `sent` is what the registration carried.
async fn update_candidates(ctx: Arc<Ctx>, reg: Arc<Registered>, mut sent: Vec<Candidate>) {
    let mut mappings = ctx.portmap.clone();
    loop {
        let now = registration_candidates(&ctx, reg.tcp_observed);
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
    loop {
        match register(&ctx).await {
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
                let why = loop {
                    match read_frame::<ServerMsg, _>(&mut events).await {
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
                    }
                };
                current.send_replace(None);
                pump.abort();
                updates.abort();
                let why = reg
                    .conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or(why);
                tracing::warn!(server = %ctx.opts.server, "lost the connection to S ({why}); reconnecting");
            }
            Err(ControlError::Fatal(e)) => return e,
            Err(ControlError::Retry(e)) => {
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

/// One attempt: connect, verify S, register. Returns the registration and the stream on which
/// S pushes introductions.
async fn register(ctx: &Ctx) -> Result<(Registered, quinn::RecvStream), ControlError> {
    let retry = ControlError::Retry;
    let server = resolve(&ctx.opts.server, ctx.ipv4()).await.map_err(retry)?;
    ctx.router.socket().allow(server);
    let host = host_part(&ctx.opts.server);
    let config = tls::client_config(&ctx.identity, crate::proto::ALPN_CONTROL)
        .map_err(|e| ControlError::Fatal(e.into()))?;
    let mut over_udp = true;
    let conn = match connect_udp(ctx, config.clone(), server, host).await {
        Ok(conn) => conn,
        Err(udp_err) => {
            over_udp = false;
            // UDP may be blocked on this network: the same QUIC connection also runs framed
            // on TCP to S's port.
            tracing::debug!(%server, "no QUIC over UDP ({udp_err:#}); trying TCP");
            connect_tcp(ctx, config, server, host)
                .await
                .map_err(|tcp_err| {
                    retry(anyhow!(
                        "cannot reach S at {server}: over UDP: {udp_err:#}; over TCP: {tcp_err:#}"
                    ))
                })?
        }
    };
    verify_server(ctx, &conn, host).map_err(ControlError::Fatal)?;
    let tcp_observed = async {
        match &ctx.tcp {
            Some(tcp) => tcp.reflexive(server).await,
            None => None,
        }
    };
    // How the NAT maps decides how peers punch to us (see punch::symmetric); it takes two
    // STUN round trips, done while the TCP mapping is learnt.
    let nat = async {
        if !over_udp {
            return NatMapping::Unknown;
        }
        let locals: Vec<SocketAddr> = ctx.local_candidates().iter().map(|c| c.addr).collect();
        crate::punch::netcheck::nat_mapping(&ctx.router, server, &locals).await
    };
    let (tcp_observed, nat) = tokio::join!(tcp_observed, nat);

    let registered_with = registration_candidates(ctx, tcp_observed);
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let msg = ClientMsg::Register {
            version: PROTOCOL_VERSION,
            token: ctx.opts.token.clone(),
            names: ctx.opts.exposes.iter().map(|e| e.name.clone()).collect(),
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
                %server, %observed, ?nat, id = %ctx.identity.fingerprint(),
                "registered with S{}",
                if ctx.opts.exposes.is_empty() { String::new() } else {
                    format!(" exposing {}", ctx.opts.exposes.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", "))
                }
            );
            Ok((
                Registered {
                    conn,
                    server,
                    observed,
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

/// How long a QUIC handshake with S over UDP may take before TCP is tried.
const UDP_HANDSHAKE: Duration = Duration::from_secs(4);

async fn connect_udp(
    ctx: &Ctx,
    config: quinn::ClientConfig,
    server: SocketAddr,
    host: &str,
) -> anyhow::Result<Connection> {
    let connecting = ctx
        .endpoint
        .connect_with(config, server, host)
        .map_err(|e| anyhow!("cannot connect to {server}: {e}"))?;
    tokio::time::timeout(UDP_HANDSHAKE, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {}s", UDP_HANDSHAKE.as_secs()))?
        .map_err(|e| anyhow!("QUIC handshake failed: {e}"))
}

/// The control connection framed on TCP to S's port: S gets a virtual address in the path
/// table whose only path is the TCP connection, and quinn connects to that.
async fn connect_tcp(
    ctx: &Ctx,
    config: quinn::ClientConfig,
    server: SocketAddr,
    host: &str,
) -> anyhow::Result<Connection> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::time::timeout(EXCHANGE_TIMEOUT, tokio::net::TcpStream::connect(server))
        .await
        .map_err(|_| anyhow!("TCP connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(crate::path::tcp::SERVER_PREAMBLE).await?;
    let socket = ctx.router.socket().clone();
    let virt = socket.table_write().anonymous_peer();
    let (tx, done) = crate::path::tcp::spawn(tcp, virt, socket.injector());
    socket
        .table_write()
        .add_channel_path(virt, crate::path::PathKind::DirectTcp, server, tx, None);
    tokio::spawn(async move {
        let _ = done.await;
        socket.table_write().remove_peer(virt);
    });
    let connecting = ctx
        .endpoint
        .connect_with(config, virt, host)
        .map_err(|e| anyhow!("cannot connect: {e}"))?;
    let conn = tokio::time::timeout(EXCHANGE_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no QUIC answer over TCP"))?
        .map_err(|e| anyhow!("QUIC handshake over TCP failed: {e}"))?;
    tracing::info!(%server, "connected to S over TCP (UDP gets no answer on this network)");
    Ok(conn)
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

/// Resolves `HOST:PORT` to an address of the socket's family.
pub async fn resolve(server: &str, ipv4: bool) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve '{server}'"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4() == ipv4)
        .copied()
        .ok_or_else(|| {
            anyhow!(
                "'{server}' has no {} address",
                if ipv4 { "IPv4" } else { "IPv6" }
            )
        })
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
