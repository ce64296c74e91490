//! UDP services: the forward's socket, whose every client becomes a flow to the exposer, and
//! the exposer's side of each flow, a socket of its own toward the local service. The flows
//! themselves (datagrams, idle timeout, counters) are [`crate::tunnel::flow`]'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;

use super::activity::Role;
use super::ctx::{Ctx, ExposeSpec, ForwardSpec};
use super::peers::Peers;
use crate::proto::Fingerprint;
use crate::tunnel::flow::{self, Flow, FlowStats, LocalEnd, FLOW_OPEN, FLOW_QUEUE};
use crate::tunnel::header::{self, codes};

/// How long opening a flow may take once the connection is there: the exposer's answer.
const FLOW_SETUP: Duration = Duration::from_secs(10);

/// How long a client whose flow could not be opened waits before its next datagram tries
/// again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// How often a forward says again that it drops datagrams for want of a flow.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Reads the forward's socket until the task is aborted (a reload that removes or changes
/// the forward, which ends its flows): each new client address gets a flow of its own, and
/// each datagram goes to its client's flow.
pub async fn forward(peers: Peers, spec: ForwardSpec, socket: Arc<UdpSocket>) {
    let stats = peers.ctx().activity.flow_stats(Role::Forward, &spec.name);
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut buf = vec![0u8; flow::MAX_UDP_PAYLOAD];
    let mut warned: Option<Instant> = None;
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // An ICMP error of an earlier reply (a client gone), or out of memory: the
                // socket itself goes on.
                tracing::debug!(name = %spec.name, "UDP receive failed: {e}");
                if e.kind() != std::io::ErrorKind::ConnectionRefused {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
        };
        let mut payload = Bytes::copy_from_slice(&buf[..n]);
        if let Some(tx) = clients.get(&client) {
            match tx.try_send(payload) {
                Ok(()) => continue,
                Err(TrySendError::Full(p)) => {
                    stats.dropped_from_local(1, p.len() as u64);
                    continue;
                }
                // Its flow ended (idle, or it could not open): a new one.
                Err(TrySendError::Closed(p)) => {
                    clients.remove(&client);
                    payload = p;
                }
            }
        }
        clients.retain(|_, tx| !tx.is_closed());
        if clients.len() as u64 >= spec.flows.max_flows {
            stats.dropped_from_local(1, payload.len() as u64);
            if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                warned = Some(Instant::now());
                tracing::warn!(
                    name = %spec.name,
                    %client,
                    max_flows = spec.flows.max_flows,
                    "dropping datagrams of a new UDP client: {} flows are open, the most this \
                     forward allows (max_flows)",
                    clients.len()
                );
            }
            continue;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        // A new channel has room for its first datagram.
        let _ = tx.try_send(payload);
        clients.insert(client, tx);
        tokio::spawn(forward_flow(
            peers.clone(),
            spec.clone(),
            stats.clone(),
            socket.clone(),
            client,
            rx,
        ));
    }
}

/// Opens a flow to the exposer of `spec.name` for `client` (whose datagrams the forward
/// queues in `rx`; replies go out on `socket`) and runs it.
/// If it cannot be opened, says why, and drops (and counts) the client's datagrams for
/// [`RETRY_AFTER`] before the next datagram may try again: a client that keeps sending to a
/// name nobody serves costs one attempt and one log line per pause, not per datagram.
async fn forward_flow(
    peers: Peers,
    spec: ForwardSpec,
    stats: Arc<FlowStats>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
) {
    match open_flow(&peers, &spec.name).await {
        Ok((conn, peer, send, recv)) => {
            let _open = stats.open();
            peers
                .ctx()
                .activity
                .peer_connected(peer, Role::Forward, &spec.name, &conn);
            let id = u64::from(send.id());
            let from_tunnel = peers.ctx().demuxes.of(&conn).register(id, stats.clone());
            tracing::debug!(name = %spec.name, %client, id, "UDP flow open");
            let flow = Flow {
                conn,
                id,
                rx: from_tunnel,
                stats,
                name: spec.name.clone(),
            };
            let local = LocalEnd::Client {
                socket,
                addr: client,
                rx,
            };
            let ended = flow::run(flow, local, send, recv, spec.flows.idle_timeout).await;
            tracing::debug!(name = %spec.name, %client, id, ?ended, "UDP flow ended");
        }
        Err(e) => {
            tracing::warn!(
                name = %spec.name,
                %client,
                "UDP flow not opened: {e:#}; this client's datagrams are dropped for {RETRY_AFTER:?}"
            );
            let pause = tokio::time::sleep(RETRY_AFTER);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(p) => stats.dropped_from_local(1, p.len() as u64),
                        None => return,
                    },
                    () = &mut pause => break,
                }
            }
            rx.close();
            while let Ok(p) = rx.try_recv() {
                stats.dropped_from_local(1, p.len() as u64);
            }
        }
    }
}

/// The connection to the exposer of `name`, its key and a flow stream it accepted.
async fn open_flow(
    peers: &Peers,
    name: &str,
) -> anyhow::Result<(Connection, Fingerprint, SendStream, RecvStream)> {
    let conn = peers.get(name).await?;
    let peer = crate::tunnel::tls::peer_fingerprint(&conn)
        .context("the exposer's connection has no key")?;
    let (mut send, mut recv) = conn.open_bi().await.context("cannot open a stream")?;
    send.write_all(&header::encode_flow(name))
        .await
        .context("cannot send the flow header")?;
    let mut answer = [0u8; 1];
    match tokio::time::timeout(FLOW_SETUP, recv.read_exact(&mut answer)).await {
        Ok(Ok(())) if answer[0] == FLOW_OPEN => Ok((conn, peer, send, recv)),
        Ok(Ok(())) => bail!("the exposer answered the flow with {}", answer[0]),
        Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)))) => {
            let why = codes::describe(code.into_inner());
            if code.into_inner() == u64::from(codes::BAD_HEADER) {
                bail!("the exposer refused: {why} (a p2ptun from before UDP services?)")
            }
            bail!("the exposer refused: {why}")
        }
        Ok(Err(e)) => bail!("no answer from the exposer: {e}"),
        Err(_) => bail!("no answer from the exposer within {FLOW_SETUP:?}"),
    }
}

/// Serves a flow the forwarder `peer` opened on `conn` for `spec` (a UDP service it may
/// use): a socket of its own toward the service, unless the service has its most flows
/// open.
pub async fn expose_flow(
    ctx: &Ctx,
    conn: &Connection,
    peer: Fingerprint,
    spec: ExposeSpec,
    mut send: SendStream,
    recv: RecvStream,
) {
    let name = spec.name.clone();
    let stats = ctx.activity.flow_stats(Role::Expose, &name);
    let Some(_open) = stats.try_open(spec.flows.max_flows) else {
        tracing::warn!(%peer, %name, max_flows = spec.flows.max_flows, "refusing a UDP flow: the service has the most flows open it allows (max_flows)");
        let _ = send.reset(VarInt::from_u32(codes::TOO_MANY_FLOWS));
        return;
    };
    let socket = match service_socket(&spec.local).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%name, local = %spec.local, "cannot open a UDP flow to the local service: {e:#}");
            let _ = send.reset(VarInt::from_u32(codes::SERVICE_UNAVAILABLE));
            return;
        }
    };
    ctx.activity.peer_connected(peer, Role::Expose, &name, conn);
    let id = u64::from(send.id());
    let rx = ctx.demuxes.of(conn).register(id, stats.clone());
    if send.write_all(&[FLOW_OPEN]).await.is_err() {
        return;
    }
    tracing::debug!(%peer, %name, id, "UDP flow open");
    let flow = Flow {
        conn: conn.clone(),
        id,
        rx,
        stats,
        name: name.clone(),
    };
    let ended = flow::run(
        flow,
        LocalEnd::Socket(socket),
        send,
        recv,
        spec.flows.idle_timeout,
    )
    .await;
    tracing::debug!(%peer, %name, id, ?ended, "UDP flow ended");
}

/// A UDP socket connected to `target` (`HOST:PORT`), so that it takes datagrams from the
/// service alone.
async fn service_socket(target: &str) -> anyhow::Result<UdpSocket> {
    let mut last = None;
    let addrs = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("cannot resolve {target}"))?;
    for addr in addrs {
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(any).await?;
        match socket.connect(addr).await {
            Ok(()) => return Ok(socket),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("cannot reach {target}")),
        None => bail!("{target} resolves to no address"),
    }
}
