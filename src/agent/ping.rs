//! `p2ptun ping`: round trips to the agent that exposes a name, and the path each one took,
//! so a user sees a link move from the relay to a direct path (as `tailscale ping` does).
//!
//! Each ping is a stream of its own on the peer's one connection: the header of
//! [`header::encode_ping`], then the 4-byte sequence number; the exposer sends the bytes back
//! and finishes. Opening a QUIC stream costs no round trip, so a ping's time is the path's
//! round trip plus a pass through each agent's runtime: what a forwarded connection's first
//! byte sees, not only what QUIC's own RTT estimate says.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use quinn::{RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::peers::Peers;
use crate::path::PathKind;
use crate::tunnel::{header, tls};

/// Most bytes a ping stream may carry toward the exposer; more is not a ping.
const MAX_PAYLOAD: usize = 64;

/// How long one ping waits for its answer before it counts as lost.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Most pings one request may ask for.
pub const MAX_COUNT: u32 = 10_000;

/// What one ping asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingRequest {
    /// The name whose exposer to ping.
    pub name: String,
    /// How many pings, 1 to [`MAX_COUNT`].
    pub count: u32,
    /// Between the starts of two pings.
    pub interval_ms: u64,
}

/// What became of one ping, or of the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PingEvent {
    /// An answer.
    Pong {
        /// The ping's number, from 1.
        seq: u32,
        /// The exposer's fingerprint.
        peer: String,
        /// The path the link used when the answer came.
        path: Option<PathKind>,
        /// That path's remote address (S's, for the relay).
        remote: Option<SocketAddr>,
        /// The round trip, in milliseconds.
        rtt_ms: f64,
    },
    /// No answer within [`TIMEOUT`], or the stream failed.
    Lost {
        /// The ping's number.
        seq: u32,
        /// Why.
        reason: String,
    },
    /// The pings could not start (no connection to the name's exposer); nothing follows.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Pings the exposer of `req.name` through `peers`, sending each event to `out`; stops early
/// when `out` is closed (the user went away).
pub async fn run(peers: &Peers, req: &PingRequest, out: mpsc::Sender<PingEvent>) {
    // The first connection may take an introduction and a punch: that is setup, not a ping.
    if let Err(e) = peers.get_link(&req.name).await {
        let _ = out
            .send(PingEvent::Failed {
                reason: format!("cannot reach '{}': {e:#}", req.name),
            })
            .await;
        return;
    }
    let interval = Duration::from_millis(req.interval_ms);
    let mut next = Instant::now();
    for seq in 1..=req.count.min(MAX_COUNT) {
        let event = match tokio::time::timeout(TIMEOUT, once(peers, &req.name, seq)).await {
            Ok(Ok(pong)) => pong,
            Ok(Err(e)) => PingEvent::Lost {
                seq,
                reason: format!("{e:#}"),
            },
            Err(_) => PingEvent::Lost {
                seq,
                reason: format!("no answer within {}s", TIMEOUT.as_secs()),
            },
        };
        if out.send(event).await.is_err() {
            return;
        }
        if seq < req.count {
            next += interval;
            tokio::time::sleep_until(next.max(Instant::now())).await;
        }
    }
}

async fn once(peers: &Peers, name: &str, seq: u32) -> anyhow::Result<PingEvent> {
    let (conn, link) = peers.get_link(name).await?;
    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.context("cannot open a stream")?;
    let mut bytes = header::encode_ping();
    bytes.extend_from_slice(&seq.to_be_bytes());
    send.write_all(&bytes).await.context("cannot send")?;
    send.finish().context("cannot send")?;
    let answer = match recv.read_to_end(MAX_PAYLOAD).await {
        Ok(a) => a,
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            bail!(
                "the exposer refused: {} (an older p2ptun?)",
                header::codes::describe(code.into_inner())
            )
        }
        Err(e) => return Err(e).context("no answer"),
    };
    let rtt = start.elapsed();
    if answer != seq.to_be_bytes() {
        bail!("the answer does not match the ping");
    }
    let selected = link.view().selected;
    Ok(PingEvent::Pong {
        seq,
        peer: tls::peer_fingerprint(&conn)
            .map(|f| f.to_string())
            .unwrap_or_default(),
        path: selected.map(|(kind, _)| kind),
        remote: selected.map(|(_, addr)| addr),
        rtt_ms: rtt.as_secs_f64() * 1000.0,
    })
}

/// The exposer's side: sends back what the ping stream carried.
pub async fn answer(mut send: SendStream, mut recv: RecvStream) {
    let echo = async {
        let payload = recv.read_to_end(MAX_PAYLOAD).await?;
        send.write_all(&payload).await?;
        send.finish()?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(TIMEOUT, echo).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("ping stream failed: {e:#}"),
        Err(_) => tracing::debug!("ping stream stalled"),
    }
}

/// One line of `p2ptun ping`'s output for `event`, for `name`.
pub fn render(name: &str, event: &PingEvent) -> String {
    match event {
        PingEvent::Pong {
            seq,
            peer,
            path,
            remote,
            rtt_ms,
        } => {
            let via = match (path, remote) {
                (Some(kind), Some(addr)) => format!("{kind} {addr}"),
                _ => "no path".to_owned(),
            };
            format!(
                "pong {seq} from {name} ({}) via {via} in {rtt_ms:.2} ms",
                short(peer)
            )
        }
        PingEvent::Lost { seq, reason } => format!("ping {seq} to {name} lost: {reason}"),
        PingEvent::Failed { reason } => format!("ping {name} failed: {reason}"),
    }
}

/// The closing line: counts, round trips, and the path the last answer took.
pub fn summary(name: &str, events: &[PingEvent]) -> String {
    let rtts: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            PingEvent::Pong { rtt_ms, .. } => Some(*rtt_ms),
            _ => None,
        })
        .collect();
    let sent = events
        .iter()
        .filter(|e| !matches!(e, PingEvent::Failed { .. }))
        .count();
    let mut line = format!("--- {name}: {sent} sent, {} answered", rtts.len());
    if !rtts.is_empty() {
        let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rtts.iter().copied().fold(0.0, f64::max);
        let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
        line += &format!(", rtt min/avg/max {min:.2}/{avg:.2}/{max:.2} ms");
    }
    let first_direct = events.iter().find_map(|e| match e {
        PingEvent::Pong {
            seq,
            path: Some(PathKind::DirectUdp | PathKind::DirectTcp),
            ..
        } => Some(*seq),
        _ => None,
    });
    match first_direct {
        Some(1) => line += ", direct throughout",
        Some(seq) => line += &format!(", direct from ping {seq}"),
        None if !rtts.is_empty() => line += ", never direct",
        None => {}
    }
    line
}

/// The start of a fingerprint, enough to tell peers apart in a line.
fn short(fingerprint: &str) -> &str {
    fingerprint.get(..17).unwrap_or(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pong(seq: u32, path: PathKind, rtt_ms: f64) -> PingEvent {
        PingEvent::Pong {
            seq,
            peer: "SHA256:abcdefghijklmnopqrstuvwxyz".into(),
            path: Some(path),
            remote: Some("203.0.113.7:4000".parse().unwrap()),
            rtt_ms,
        }
    }

    #[test]
    fn a_line_names_the_path_and_the_time() {
        let line = render("home", &pong(3, PathKind::Relay, 12.345));
        assert_eq!(
            line,
            "pong 3 from home (SHA256:abcdefghij) via relay 203.0.113.7:4000 in 12.35 ms"
        );
    }

    #[test]
    fn the_summary_says_when_the_path_went_direct() {
        let events = vec![
            pong(1, PathKind::Relay, 20.0),
            PingEvent::Lost {
                seq: 2,
                reason: "no answer".into(),
            },
            pong(3, PathKind::DirectUdp, 2.0),
        ];
        assert_eq!(
            summary("home", &events),
            "--- home: 3 sent, 2 answered, rtt min/avg/max 2.00/11.00/20.00 ms, direct from ping 3"
        );
        let failed = [PingEvent::Failed { reason: "x".into() }];
        assert_eq!(summary("home", &failed), "--- home: 0 sent, 0 answered");
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        for event in [
            pong(1, PathKind::DirectTcp, 1.0),
            PingEvent::Lost {
                seq: 2,
                reason: "r".into(),
            },
            PingEvent::Failed { reason: "f".into() },
        ] {
            let line = serde_json::to_string(&event).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<PingEvent>(&line).unwrap(), event);
        }
    }
}
