//! S's counters and gauges, and the tiny HTTP/1.1 responder on the metrics address: the
//! Prometheus text format (version 0.0.4) on `/metrics`, and the status page
//! ([`crate::status`]) on `/` and `/status.json`. Deliberately minimal: one GET, one answer,
//! close.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use p2ptun::proto::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::limits::Refusal;
use crate::relay::{CloseCause, Dropped};

const CODES: [ErrorCode; 8] = [
    ErrorCode::BadVersion,
    ErrorCode::BadToken,
    ErrorCode::NameTaken,
    ErrorCode::InvalidName,
    ErrorCode::UnknownName,
    ErrorCode::BadRequest,
    ErrorCode::RateLimited,
    ErrorCode::Internal,
];

/// What became of one relayed packet, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Sent on to the other agent.
    Forwarded,
    /// Dropped: a session or source rate was exceeded.
    RateLimited,
    /// Dropped: no such session.
    UnknownSession,
    /// Dropped: the sender is not one of the session's agents.
    NotAParty,
    /// Dropped: the session had used up its byte budget.
    OverBudget,
    /// Dropped: too short to carry a session ID and a packet, a fragment whose index, count
    /// or size make no sense, or a stream that broke.
    Malformed,
    /// Dropped on the way out: too many oversized packets of its session were on streams
    /// already, or the other agent's connection could not take it.
    SendFailed,
}

const OUTCOMES: [RelayOutcome; 7] = [
    RelayOutcome::Forwarded,
    RelayOutcome::RateLimited,
    RelayOutcome::UnknownSession,
    RelayOutcome::NotAParty,
    RelayOutcome::OverBudget,
    RelayOutcome::Malformed,
    RelayOutcome::SendFailed,
];

impl RelayOutcome {
    fn label(self) -> &'static str {
        match self {
            RelayOutcome::Forwarded => "forwarded",
            RelayOutcome::RateLimited => "rate_limited",
            RelayOutcome::UnknownSession => "unknown_session",
            RelayOutcome::NotAParty => "not_a_party",
            RelayOutcome::OverBudget => "over_budget",
            RelayOutcome::Malformed => "malformed",
            RelayOutcome::SendFailed => "send_failed",
        }
    }
}

impl From<Dropped> for RelayOutcome {
    fn from(d: Dropped) -> Self {
        match d {
            Dropped::UnknownSession => RelayOutcome::UnknownSession,
            Dropped::NotAParty => RelayOutcome::NotAParty,
            Dropped::SessionRate | Dropped::SourceRate => RelayOutcome::RateLimited,
        }
    }
}

const CLOSE_CAUSES: [CloseCause; 4] = [
    CloseCause::Budget,
    CloseCause::AgentLeft,
    CloseCause::Idle,
    CloseCause::Evicted,
];

fn code_index(code: ErrorCode) -> usize {
    CODES
        .iter()
        .position(|c| *c == code)
        .unwrap_or(CODES.len() - 1)
}

fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadVersion => "bad_version",
        ErrorCode::BadToken => "bad_token",
        ErrorCode::NameTaken => "name_taken",
        ErrorCode::InvalidName => "invalid_name",
        ErrorCode::UnknownName => "unknown_name",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Internal => "internal",
    }
}

/// Counters S keeps; gauges are read from their owners when rendering.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections established.
    pub connections_total: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    /// QUIC Retries sent.
    pub retries_total: AtomicU64,
    /// Successful registrations.
    pub registrations_total: AtomicU64,
    /// Sessions made (introductions).
    pub sessions_total: AtomicU64,
    /// Names their owners gave back (`p2ptun release`).
    pub names_released_total: AtomicU64,
    /// Names given up after going unused for `name_expiry_days`.
    pub names_expired_total: AtomicU64,
    /// STUN requests answered.
    pub stun_answered_total: AtomicU64,
    /// STUN datagrams dropped for their source's rate.
    pub stun_rate_limited_total: AtomicU64,
    /// Datagrams on a STUN socket that were not Binding requests S answers.
    pub stun_ignored_total: AtomicU64,
    errors: [AtomicU64; 8],
    relay_packets: [AtomicU64; 7],
    relay_closed: [AtomicU64; 4],
    /// Bytes of relay payload sent on to agents.
    pub relay_bytes_total: AtomicU64,
    /// Relayed packets sent on a stream because they did not fit in a datagram.
    pub relay_stream_packets_total: AtomicU64,
    /// Relayed packets S split into pieces to fit the receiver's datagrams.
    pub relay_split_packets_total: AtomicU64,
    /// Relay sessions made.
    pub relay_sessions_total: AtomicU64,
    /// TCP connections that carried a control connection (their preamble was right).
    pub tcp_connections_total: AtomicU64,
    /// TCP connections closed for a wrong or missing preamble.
    pub tcp_bad_preamble_total: AtomicU64,
}

/// Values owned elsewhere, read at rendering time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    /// Connections held.
    pub connections: u64,
    /// Handshakes in progress.
    pub handshakes_pending: u64,
    /// Registered agents connected now.
    pub agents_online: u64,
    /// Names held now.
    pub names_claimed: u64,
    /// Relay sessions held.
    pub relay_sessions: u64,
}

impl Metrics {
    /// Adds one to `counter` (one of this struct's public fields).
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// Adds `n` to `counter` (one of this struct's public fields).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a refused connection.
    pub fn refused(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        Self::inc(&self.refused[i]);
    }

    /// Counts an error reported to an agent.
    pub fn error(&self, code: ErrorCode) {
        Self::inc(&self.errors[code_index(code)]);
    }

    /// Counts one relayed packet of `len` payload bytes by what became of it.
    pub fn relayed(&self, outcome: RelayOutcome, len: usize) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        Self::inc(&self.relay_packets[i]);
        if outcome == RelayOutcome::Forwarded {
            self.relay_bytes_total
                .fetch_add(len as u64, Ordering::Relaxed);
        }
    }

    /// Counts a relay session closed for `cause`.
    pub fn relay_closed(&self, cause: CloseCause) {
        let i = CLOSE_CAUSES.iter().position(|c| *c == cause).unwrap_or(0);
        Self::inc(&self.relay_closed[i]);
    }

    /// The value of `counter` (one of this struct's public fields).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Refusals so far, by the label of the limit that refused ([`Refusal::label`]).
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .zip(&self.refused)
            .map(|(r, c)| (r.label(), Self::get(c)))
            .collect()
    }

    /// Relay sessions closed so far, by the label of why ([`CloseCause::label`]).
    pub fn relay_closed_counts(&self) -> Vec<(&'static str, u64)> {
        CLOSE_CAUSES
            .iter()
            .zip(&self.relay_closed)
            .map(|(c, n)| (c.label(), Self::get(n)))
            .collect()
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let get = Self::get;
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP p2ptun_relay_{name} {help}");
            let _ = writeln!(out, "# TYPE p2ptun_relay_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "p2ptun_relay_{name}{labels} {value}");
            }
        };
        metric(
            "connections",
            "gauge",
            "QUIC connections held (established or handshaking).",
            &[("", gauges.connections)],
        );
        metric(
            "handshakes_pending",
            "gauge",
            "QUIC handshakes in progress.",
            &[("", gauges.handshakes_pending)],
        );
        metric(
            "agents_online",
            "gauge",
            "Registered agents connected now.",
            &[("", gauges.agents_online)],
        );
        metric(
            "names_claimed",
            "gauge",
            "Names held by an identity now.",
            &[("", gauges.names_claimed)],
        );
        metric(
            "names_freed_total",
            "counter",
            "Names given up: by their owners, or for going unused for name_expiry_days.",
            &[
                ("{reason=\"released\"}", get(&self.names_released_total)),
                ("{reason=\"expired\"}", get(&self.names_expired_total)),
            ],
        );
        metric(
            "connections_total",
            "counter",
            "QUIC connections established.",
            &[("", get(&self.connections_total))],
        );
        let refused: Vec<(String, u64)> = self
            .refusals()
            .into_iter()
            .map(|(label, n)| (format!("{{limit=\"{label}\"}}"), n))
            .collect();
        let refused: Vec<(&str, u64)> = refused.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "connections_refused_total",
            "counter",
            "Connection attempts (QUIC, TCP) and registrations refused, by the limit that refused them.",
            &refused,
        );
        metric(
            "retries_total",
            "counter",
            "QUIC Retry packets sent to make clients prove their address.",
            &[("", get(&self.retries_total))],
        );
        metric(
            "registrations_total",
            "counter",
            "Successful registrations.",
            &[("", get(&self.registrations_total))],
        );
        metric(
            "sessions_total",
            "counter",
            "Sessions made between two agents.",
            &[("", get(&self.sessions_total))],
        );
        metric(
            "stun_requests_total",
            "counter",
            "STUN datagrams, by what became of them.",
            &[
                ("{result=\"answered\"}", get(&self.stun_answered_total)),
                (
                    "{result=\"rate_limited\"}",
                    get(&self.stun_rate_limited_total),
                ),
                ("{result=\"ignored\"}", get(&self.stun_ignored_total)),
            ],
        );
        metric(
            "relay_sessions",
            "gauge",
            "Relay sessions held.",
            &[("", gauges.relay_sessions)],
        );
        metric(
            "relay_sessions_total",
            "counter",
            "Relay sessions made.",
            &[("", get(&self.relay_sessions_total))],
        );
        let closed: Vec<(String, u64)> = self
            .relay_closed_counts()
            .into_iter()
            .map(|(label, n)| (format!("{{reason=\"{label}\"}}"), n))
            .collect();
        let closed: Vec<(&str, u64)> = closed.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "relay_sessions_closed_total",
            "counter",
            "Relay sessions closed, by why.",
            &closed,
        );
        let packets: Vec<(String, u64)> = OUTCOMES
            .iter()
            .zip(&self.relay_packets)
            .map(|(o, n)| (format!("{{result=\"{}\"}}", o.label()), get(n)))
            .collect();
        let packets: Vec<(&str, u64)> = packets.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "relay_packets_total",
            "counter",
            "Relayed packets, by what became of them (a packet its agent split counts once per piece, one S split once).",
            &packets,
        );
        metric(
            "relay_bytes_total",
            "counter",
            "Relay payload bytes sent on to agents.",
            &[("", get(&self.relay_bytes_total))],
        );
        metric(
            "relay_stream_packets_total",
            "counter",
            "Relayed packets sent on a stream because they did not fit in a datagram.",
            &[("", get(&self.relay_stream_packets_total))],
        );
        metric(
            "relay_split_packets_total",
            "counter",
            "Relayed packets S split into pieces to fit the receiver's datagrams.",
            &[("", get(&self.relay_split_packets_total))],
        );
        metric(
            "tcp_connections_total",
            "counter",
            "TCP connections that carried a control connection.",
            &[("", get(&self.tcp_connections_total))],
        );
        metric(
            "tcp_bad_preamble_total",
            "counter",
            "TCP connections closed for a wrong or missing preamble.",
            &[("", get(&self.tcp_bad_preamble_total))],
        );
        let errors: Vec<(String, u64)> = CODES
            .iter()
            .zip(&self.errors)
            .map(|(code, c)| (format!("{{code=\"{}\"}}", code_label(*code)), get(c)))
            .collect();
        let errors: Vec<(&str, u64)> = errors.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "errors_total",
            "counter",
            "Errors reported to agents, by code.",
            &errors,
        );
        out
    }
}

/// The longest request head read; anything longer is answered 431 and closed.
const MAX_HEAD: usize = 4096;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapers served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;

/// What a request on the metrics address asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `GET /metrics`: the Prometheus exposition.
    Metrics,
    /// `GET /`: the status page, HTML.
    Status,
    /// `GET /status.json`: what the status page shows, as JSON.
    StatusJson,
}

impl Page {
    fn content_type(self) -> &'static str {
        match self {
            Page::Metrics => "text/plain; version=0.0.4; charset=utf-8",
            Page::Status => "text/html; charset=utf-8",
            Page::StatusJson => "application/json",
        }
    }
}

/// Renders a page; called once per request, so every answer is a fresh snapshot.
type Render = dyn Fn(Page) -> String + Send + Sync;

/// Serves `render(page)` on `listener` until the task is dropped.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn(Page) -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = respond(stream, &*render).await {
                tracing::debug!(%peer, error = %e, "metrics request failed");
            }
        });
    }
}

async fn respond(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let (status, content_type, body) = match head {
        None => (
            "431 Request Header Fields Too Large",
            "text/plain",
            String::new(),
        ),
        Some(head) => route(&head, render),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line ending the request head; `None` if it is too long.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(head))
}

fn route(head: &[u8], render: &Render) -> (&'static str, &'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let page = match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => match target.split('?').next() {
            Some("/metrics") => Page::Metrics,
            Some("/") => Page::Status,
            Some("/status.json") => Page::StatusJson,
            _ => {
                return (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics, / or /status.json\n".into(),
                )
            }
        },
        _ => return ("405 Method Not Allowed", "text/plain", String::new()),
    };
    ("200 OK", page.content_type(), render(page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_metric() {
        let m = Metrics::default();
        Metrics::inc(&m.sessions_total);
        m.error(ErrorCode::NameTaken);
        m.refused(Refusal::Unregistered);
        let text = m.render(Gauges {
            connections: 3,
            ..Gauges::default()
        });
        assert!(text.contains("p2ptun_relay_connections 3\n"), "{text}");
        assert!(text.contains("p2ptun_relay_sessions_total 1\n"), "{text}");
        assert!(text.contains("p2ptun_relay_errors_total{code=\"name_taken\"} 1\n"));
        assert!(text.contains("p2ptun_relay_errors_total{code=\"internal\"} 0\n"));
        assert!(text.contains(
            "p2ptun_relay_connections_refused_total{limit=\"max_unregistered_per_ip\"} 1"
        ));
        assert!(text.contains("# TYPE p2ptun_relay_stun_requests_total counter"));
        Metrics::inc(&m.names_expired_total);
        let text = m.render(Gauges::default());
        assert!(text.contains("p2ptun_relay_names_freed_total{reason=\"expired\"} 1\n"));
        assert!(text.contains("p2ptun_relay_names_freed_total{reason=\"released\"} 0\n"));
        m.relayed(RelayOutcome::Forwarded, 1200);
        m.relayed(Dropped::SourceRate.into(), 1200);
        m.relay_closed(CloseCause::Idle);
        let text = m.render(Gauges {
            relay_sessions: 2,
            ..Gauges::default()
        });
        assert!(text.contains("p2ptun_relay_relay_sessions 2\n"), "{text}");
        assert!(
            text.contains("p2ptun_relay_relay_bytes_total 1200\n"),
            "{text}"
        );
        assert!(text.contains("p2ptun_relay_relay_packets_total{result=\"forwarded\"} 1\n"));
        assert!(text.contains("p2ptun_relay_relay_packets_total{result=\"rate_limited\"} 1\n"));
        assert!(text.contains("p2ptun_relay_relay_sessions_closed_total{reason=\"idle\"} 1\n"));
    }

    #[tokio::test]
    async fn it_answers_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, |page| match page {
            Page::Metrics => "x_total 1\n".to_string(),
            Page::Status => "<p>page</p>".to_string(),
            Page::StatusJson => "{}".to_string(),
        }));
        for (request, expect) in [
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK"),
            ("GET / HTTP/1.1\r\n\r\n", "text/html"),
            ("GET /status.json?x=1 HTTP/1.1\r\n\r\n", "application/json"),
            ("GET /nope HTTP/1.1\r\n\r\n", "404"),
            ("POST /metrics HTTP/1.1\r\n\r\n", "405"),
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {expect}"))
                    || answer.contains(&format!("Content-Type: {expect}")),
                "{answer}"
            );
            if expect == "200 OK" {
                assert!(answer.contains("version=0.0.4"));
                assert!(answer.ends_with("x_total 1\n"));
            }
        }
        server.abort();
    }
}
