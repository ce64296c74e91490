//! The agent's Unix socket, `agent-PID.sock` in its state directory (owner only): how local
//! commands ask a running agent — `p2ptun status` for its [`Status`], `p2ptun ping` for
//! round trips over its links.
//!
//! A client writes one JSON [`Request`] line and reads the answer until EOF: the status as
//! one JSON document, or one [`PingEvent`] per line. A client that writes nothing and only
//! closes its side (or says nothing for [`REQUEST_WAIT`], as clients before requests did)
//! asks for the status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::ctx::Ctx;
use super::link::Links;
use super::peers::Peers;
use super::ping::{self, PingEvent, PingRequest};
use super::services::Services;
use super::status::{snapshot, Status};

/// How long the agent waits for a request line before it answers with the status.
pub const REQUEST_WAIT: Duration = Duration::from_secs(2);

/// Longest request line.
const MAX_REQUEST: u64 = 4096;

/// How long a client waits for the status.
const STATUS_WAIT: Duration = Duration::from_secs(3);

/// Shortest interval between pings a request may ask for.
pub const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);

/// What a local command asks a running agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The agent's [`Status`].
    Status,
    /// Pings to a name's exposer, answered as they come.
    Ping(PingRequest),
    /// Read the config file again and apply it (`p2ptun up` only).
    Reload,
}

/// The answer to [`Request::Reload`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reloaded {
    /// Applied: what changed.
    Applied(String),
    /// Refused, and the running services are as they were: why.
    Error(String),
}

/// The status socket of this process in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(format!("agent-{}.sock", std::process::id()))
}

/// What the socket's requests are answered from.
#[derive(Clone)]
pub struct Answers {
    /// The agent.
    pub ctx: Arc<Ctx>,
    /// Its links, for the paths in the status.
    pub links: Arc<Links>,
    /// Its connections to exposers, for pings.
    pub peers: Peers,
    /// Its services, to reload.
    pub services: Arc<Services>,
}

/// Answers requests on `path` until the agent stops; removes the socket then.
pub async fn serve(answers: Answers, path: PathBuf) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot create the status socket {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let _cleanup = RemoveOnDrop(path);
    loop {
        let (stream, _) = listener.accept().await?;
        let answers = answers.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(&answers, stream).await {
                tracing::debug!("status socket: {e:#}");
            }
        });
    }
}

async fn answer(answers: &Answers, stream: UnixStream) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST);
    let request = match tokio::time::timeout(REQUEST_WAIT, reader.read_line(&mut line)).await {
        Err(_) => Ok(Request::Status),
        Ok(read) => {
            read.context("reading the request")?;
            parse_request(&line)
        }
    };
    match request {
        Ok(Request::Status) => {
            let body = serde_json::to_vec(&snapshot(&answers.ctx, &answers.links))?;
            write.write_all(&body).await?;
        }
        Ok(Request::Ping(req)) => {
            let (tx, mut rx) = mpsc::channel(16);
            let peers = answers.peers.clone();
            let pinging = tokio::spawn(async move { ping::run(&peers, &req, tx).await });
            while let Some(event) = rx.recv().await {
                let mut line = serde_json::to_vec(&event)?;
                line.push(b'\n');
                if write.write_all(&line).await.is_err() {
                    // The user went away (Ctrl-C): stop pinging.
                    pinging.abort();
                    break;
                }
            }
        }
        Ok(Request::Reload) => {
            let answer = match answers.services.reload().await {
                Ok(change) => {
                    tracing::info!("reloaded (p2ptun reload): {change}");
                    Reloaded::Applied(change.to_string())
                }
                Err(e) => {
                    tracing::warn!(
                        "reload (p2ptun reload) refused, the running services are unchanged: {e:#}"
                    );
                    Reloaded::Error(format!("{e:#}"))
                }
            };
            write.write_all(&serde_json::to_vec(&answer)?).await?;
        }
        Err(e) => {
            let body = serde_json::json!({ "error": format!("{e:#}") });
            write.write_all(body.to_string().as_bytes()).await?;
        }
    }
    write.shutdown().await?;
    Ok(())
}

/// A request line; empty (the client closed its side) asks for the status.
fn parse_request(line: &str) -> anyhow::Result<Request> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Request::Status);
    }
    let request: Request =
        serde_json::from_str(line).with_context(|| format!("malformed request {line:?}"))?;
    if let Request::Ping(p) = &request {
        crate::proto::validate_name(&p.name).map_err(anyhow::Error::msg)?;
        if !(1..=ping::MAX_COUNT).contains(&p.count) {
            bail!("a ping count is 1 to {}, not {}", ping::MAX_COUNT, p.count);
        }
        if Duration::from_millis(p.interval_ms) < MIN_PING_INTERVAL {
            bail!(
                "the interval between pings is at least {} ms, not {}",
                MIN_PING_INTERVAL.as_millis(),
                p.interval_ms
            );
        }
    }
    Ok(request)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The status sockets in `state_dir` (`agent-PID.sock`), of agents running or gone.
pub fn sockets(state_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(state_dir)
        .with_context(|| format!("cannot read the state directory {}", state_dir.display()))?;
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("agent-") && n.ends_with(".sock"))
        })
        .collect())
}

/// Sends `request` to the agent at `path`, or `None` if no agent listens there any more (its
/// socket is then removed).
async fn send(path: &Path, request: &Request) -> anyhow::Result<Option<UnixStream>> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {}", path.display())),
    };
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    Ok(Some(stream))
}

/// Reads the status of every agent running with `state_dir`. Sockets of agents that are
/// gone are removed.
pub async fn query(state_dir: &Path) -> anyhow::Result<Vec<Status>> {
    let mut out = Vec::new();
    for path in sockets(state_dir)? {
        let read = async {
            let Some(mut s) = send(&path, &Request::Status).await? else {
                return Ok(None);
            };
            let mut body = Vec::new();
            s.read_to_end(&mut body).await?;
            anyhow::Ok(Some(body))
        };
        match tokio::time::timeout(STATUS_WAIT, read).await {
            Ok(Ok(Some(body))) => out.push(
                serde_json::from_slice(&body)
                    .with_context(|| format!("malformed status from {}", path.display()))?,
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!("{}: {e:#}", path.display()),
            Err(_) => tracing::warn!("{}: no answer", path.display()),
        }
    }
    Ok(out)
}

/// Asks the agent running with `state_dir` to ping, sending its events to `out` as they
/// come; `false` if no agent runs there.
pub async fn ping(
    state_dir: &Path,
    req: &PingRequest,
    out: mpsc::Sender<PingEvent>,
) -> anyhow::Result<bool> {
    let request = Request::Ping(req.clone());
    let mut stream = None;
    for path in sockets(state_dir)? {
        if let Some(s) = send(&path, &request).await? {
            stream = Some(s);
            break;
        }
    }
    let Some(stream) = stream else {
        return Ok(false);
    };
    let mut lines = BufReader::new(stream).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .context("reading the agent's answer")?
    {
        let event: PingEvent = match serde_json::from_str(&line) {
            Ok(e) => e,
            Err(_) => {
                // The agent refused the request ({"error": ...}), or is older than `ping`.
                let why = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| {
                        "the running agent does not know `ping` (restart it to upgrade)".into()
                    });
                bail!("the running agent refused: {why}");
            }
        };
        if out.send(event).await.is_err() {
            break;
        }
    }
    Ok(true)
}

/// Asks the agent running with `state_dir` to reload its config file: what changed, or an
/// error saying why nothing did.
pub async fn reload(state_dir: &Path) -> anyhow::Result<String> {
    for path in sockets(state_dir)? {
        let Some(mut stream) = send(&path, &Request::Reload).await? else {
            continue;
        };
        let mut body = Vec::new();
        stream
            .read_to_end(&mut body)
            .await
            .context("reading the agent's answer")?;
        return match serde_json::from_slice::<Reloaded>(&body) {
            Ok(Reloaded::Applied(change)) => Ok(change),
            Ok(Reloaded::Error(why)) => bail!("{why}"),
            Err(_) => bail!(
                "the running agent does not know `reload` (restart it to upgrade): {}",
                String::from_utf8_lossy(&body)
            ),
        };
    }
    bail!(
        "no p2ptun agent is running with the state directory {} (see `p2ptun status`)",
        state_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_what_is_wrong() {
        assert_eq!(parse_request("").unwrap(), Request::Status);
        assert_eq!(
            parse_request("{\"request\":\"status\"}\n").unwrap(),
            Request::Status
        );
        let ping = Request::Ping(PingRequest {
            name: "home".into(),
            count: 3,
            interval_ms: 500,
        });
        let line = serde_json::to_string(&ping).unwrap();
        assert_eq!(parse_request(&line).unwrap(), ping);
        for (line, needle) in [
            ("{\"request\":\"reboot\"}", "malformed request"),
            ("not json", "malformed request"),
            (
                "{\"request\":\"ping\",\"name\":\"home\",\"count\":0,\"interval_ms\":500}",
                "not 0",
            ),
            (
                "{\"request\":\"ping\",\"name\":\"home\",\"count\":1,\"interval_ms\":1}",
                "not 1",
            ),
            (
                "{\"request\":\"ping\",\"name\":\"Bad Name\",\"count\":1,\"interval_ms\":100}",
                "name",
            ),
        ] {
            let err = format!("{:#}", parse_request(line).unwrap_err());
            assert!(err.contains(needle), "{line}: {err}");
        }
    }
}
