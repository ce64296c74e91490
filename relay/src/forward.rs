//! Moving relayed packets: what arrives on an agent's control connection (datagrams, and
//! unidirectional streams for packets too large for one) is checked by
//! [`crate::relay::Sessions`] and sent on to the session's other agent, and agents are told
//! when a session closes.
//!
//! Nothing here waits for a slow receiver: a datagram is queued without blocking (quinn drops
//! the oldest queued ones when its send buffer is full, which is loss, and QUIC inside
//! recovers). A whole packet too large for the receiver's datagrams is split into pieces
//! ([`p2ptun::tunnel::relayed`]); S never puts pieces together, the receiving agent does. A
//! packet no datagram can carry goes out on a stream from a task of its own, at most
//! [`crate::relay::STREAMS_PER_SESSION`] per session at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2ptun::proto::relay::{self as wire, MAX_STREAM_PAYLOAD};
use p2ptun::proto::ServerMsg;
use p2ptun::tunnel::relayed::{self, NotSent, Sent};
use quinn::{Connection, RecvStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::{Metrics, RelayOutcome};
use crate::relay::{Closed, Verdict};
use crate::shared::{Agent, Shared};

/// How long an agent may take to send one relayed packet on a stream.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sending one packet on a stream may take; later than that it is of no use to the
/// QUIC connection inside, which has long declared it lost.
const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Relays one datagram that agent `from` (its registration number) sent. A packet that must
/// go on as a stream is sent from a task put into `tasks`.
pub fn datagram(shared: &Arc<Shared>, from: u64, payload: Bytes, tasks: &mut JoinSet<()>) {
    let Some((to, streams)) = decide(shared, from, &payload) else {
        return;
    };
    if let Some(payload) = try_datagram(shared, &to, payload) {
        match Arc::clone(&streams).try_acquire_owned() {
            Ok(permit) => {
                let metrics = Arc::clone(&shared.metrics);
                let conn = to.conn().clone();
                tasks.spawn(async move { on_stream(&metrics, &conn, payload, permit).await });
            }
            Err(_) => shared
                .metrics
                .relayed(RelayOutcome::SendFailed, payload.len()),
        }
    }
}

/// Relays the one packet that agent `from` sends on the unidirectional stream `recv`.
pub async fn stream(shared: Arc<Shared>, from: u64, mut recv: RecvStream) {
    let read = tokio::time::timeout(STREAM_READ_TIMEOUT, recv.read_to_end(MAX_STREAM_PAYLOAD));
    let payload = match read.await {
        Ok(Ok(data)) => Bytes::from(data),
        Ok(Err(e)) => {
            tracing::trace!(error = %e, "relay stream not read");
            shared.metrics.relayed(RelayOutcome::Malformed, 0);
            return;
        }
        Err(_) => {
            shared.metrics.relayed(RelayOutcome::Malformed, 0);
            return;
        }
    };
    let Some((to, streams)) = decide(&shared, from, &payload) else {
        return;
    };
    if let Some(payload) = try_datagram(&shared, &to, payload) {
        // This task is the stream's own already; it only needs a permit.
        match streams.try_acquire_owned() {
            Ok(permit) => on_stream(&shared.metrics, to.conn(), payload, permit).await,
            Err(_) => shared
                .metrics
                .relayed(RelayOutcome::SendFailed, payload.len()),
        }
    }
}

/// The session's verdict on a payload, with drops and closes dealt with: `Some` if it is to
/// be sent on.
fn decide(shared: &Shared, from: u64, payload: &Bytes) -> Option<(Arc<Agent>, Arc<Semaphore>)> {
    let Some(session) = wire::session_of(payload) else {
        shared
            .metrics
            .relayed(RelayOutcome::Malformed, payload.len());
        return None;
    };
    let verdict = shared
        .relay()
        .packet(session, from, payload.len(), Instant::now());
    match verdict {
        Verdict::Forward { to, streams } => Some((to, streams)),
        Verdict::Drop(why) => {
            tracing::trace!(session, ?why, "relay packet dropped");
            shared.metrics.relayed(why.into(), payload.len());
            None
        }
        Verdict::Close(closed) => {
            shared
                .metrics
                .relayed(RelayOutcome::OverBudget, payload.len());
            announce(shared, closed);
            None
        }
    }
}

/// Sends `payload` to `to` as datagrams (split if it does not fit in one); gives it back if
/// it must go on a stream instead.
fn try_datagram(shared: &Shared, to: &Agent, payload: Bytes) -> Option<Bytes> {
    let metrics = &shared.metrics;
    let len = payload.len();
    match relayed::send(to.conn(), payload, || shared.next_split()) {
        Ok(sent) => {
            if let Sent::Split(_) = sent {
                Metrics::inc(&metrics.relay_split_packets_total);
            }
            metrics.relayed(RelayOutcome::Forwarded, len);
            None
        }
        Err(NotSent::NeedsStream(payload)) => Some(payload),
        Err(e) => {
            tracing::trace!(error = %e, "relay datagram not sent");
            metrics.relayed(RelayOutcome::SendFailed, len);
            None
        }
    }
}

/// Sends `payload` on a unidirectional stream of its own, holding `_permit` until done.
async fn on_stream(
    metrics: &Metrics,
    conn: &Connection,
    payload: Bytes,
    _permit: OwnedSemaphorePermit,
) {
    let len = payload.len();
    let send = async {
        let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
        send.write_chunk(payload).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())
    };
    match tokio::time::timeout(STREAM_SEND_TIMEOUT, send).await {
        Ok(Ok(())) => {
            metrics.relayed(RelayOutcome::Forwarded, len);
            Metrics::inc(&metrics.relay_stream_packets_total);
        }
        Ok(Err(e)) => {
            tracing::trace!(error = %e, "relay stream not sent");
            metrics.relayed(RelayOutcome::SendFailed, len);
        }
        Err(_) => metrics.relayed(RelayOutcome::SendFailed, len),
    }
}

/// Counts a closed session and tells both its agents, on their registration streams.
pub fn announce(shared: &Shared, closed: Closed<Agent>) {
    shared.metrics.relay_closed(closed.cause);
    tracing::info!(
        session = closed.session,
        reason = %closed.reason,
        "relay session closed"
    );
    let msg = ServerMsg::RelayClosed {
        session: closed.session,
        reason: closed.reason,
    };
    let [a, b] = closed.agents;
    a.push(msg.clone());
    // An agent may have been introduced to itself; it hears of the close once.
    if !Arc::ptr_eq(&a, &b) {
        b.push(msg);
    }
}

/// Closes idle sessions, every [`crate::relay::Sessions::sweep_every`], until the task is
/// dropped.
pub async fn sweep(shared: Arc<Shared>) {
    let every = shared.relay().sweep_every();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let closed = shared.relay().sweep(Instant::now());
        for c in closed {
            announce(&shared, c);
        }
    }
}
