//! The services an agent runs, and changes to them: the names it exposes (which S lists it
//! under, kept in [`Ctx::exposes`]) and one listener task per forward (a TCP listener, or
//! for UDP a socket).
//!
//! `p2ptun up` reloads its file through here — on SIGHUP, when the file changes, or on
//! `p2ptun reload` — and a new set is applied whole or not at all: every new port is bound
//! and S has accepted the new names before anything running changes, so a port in use, a
//! name another key holds or a broken file leaves the running set as it was. What did not
//! change keeps running, and no stream ends: streams already carried are tasks of their own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::ctx::{AgentOptions, Ctx, ExposeSpec, ForwardSpec, Protocol};
use super::forward;
use super::peers::Peers;
use super::udp;

/// How often the config file is looked at for a change.
const FILE_POLL: Duration = Duration::from_secs(2);

/// How a config file becomes options (the caller's parser, with its flags on top).
type ReadOptions = dyn Fn(&Path) -> anyhow::Result<AgentOptions> + Send + Sync;

/// Where `up` read its services, to read them again.
#[derive(Clone)]
pub struct Source {
    /// The config file.
    pub path: PathBuf,
    read: Arc<ReadOptions>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source").field("path", &self.path).finish()
    }
}

impl Source {
    /// The file at `path`, read into options by `read` (which applies the command line's
    /// flags on top: `p2ptun up` passes the config file's own parser).
    pub fn new(
        path: PathBuf,
        read: impl Fn(&Path) -> anyhow::Result<AgentOptions> + Send + Sync + 'static,
    ) -> Source {
        Source {
            path,
            read: Arc::new(read),
        }
    }

    /// The options the file describes now.
    pub fn read(&self) -> anyhow::Result<AgentOptions> {
        (self.read)(&self.path)
    }
}

/// What a forward listens with. Shared so that a reload that changes only a forward's name
/// or settings keeps its port open throughout.
#[derive(Clone)]
pub enum Listener {
    /// A TCP forward's listener.
    Tcp(Arc<TcpListener>),
    /// A UDP forward's socket.
    Udp(Arc<UdpSocket>),
}

impl Listener {
    /// Binds what `spec` listens with: a port in use is an error naming the forward.
    pub async fn bind(spec: &ForwardSpec) -> anyhow::Result<Listener> {
        let bound = match spec.protocol {
            Protocol::Tcp => TcpListener::bind(spec.bind)
                .await
                .map(|l| Listener::Tcp(Arc::new(l))),
            Protocol::Udp => UdpSocket::bind(spec.bind)
                .await
                .map(|s| Listener::Udp(Arc::new(s))),
        };
        bound.with_context(|| format!("cannot listen on {} for {}", spec.bind, spec.label()))
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(s) => s.local_addr(),
        }
    }
}

struct Forward {
    spec: ForwardSpec,
    listener: Listener,
    task: JoinHandle<()>,
}

/// The running services of one agent.
pub struct Services {
    ctx: Arc<Ctx>,
    peers: Peers,
    source: Option<Source>,
    /// Also what makes changes one at a time.
    forwards: Mutex<Vec<Forward>>,
}

/// What a reload changed, by service.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    /// Services started (`expose NAME`, `forward NAME on ADDR`).
    pub added: Vec<String>,
    /// Services stopped.
    pub removed: Vec<String>,
    /// Services whose settings changed.
    pub changed: Vec<String>,
    /// Settings in the file that only a restart applies.
    pub need_restart: Vec<&'static str>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (what, list) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} {}", list.join(", ")));
            }
        }
        if parts.is_empty() {
            parts.push("no service changed".to_owned());
        }
        if !self.need_restart.is_empty() {
            parts.push(format!(
                "not applied until a restart: {}",
                self.need_restart.join(", ")
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

impl Services {
    /// Starts a listener task for each of `listeners` (bound by the caller, so that a port
    /// in use fails the start); the exposes are `ctx`'s.
    pub fn start(
        ctx: Arc<Ctx>,
        peers: Peers,
        listeners: Vec<(ForwardSpec, Listener)>,
        source: Option<Source>,
    ) -> Arc<Services> {
        let forwards = listeners
            .into_iter()
            .map(|(spec, listener)| {
                tracing::info!(name = %spec.name, protocol = %spec.protocol, local = ?listener.local_addr().ok(), "forwarding");
                spawn_forward(&peers, spec, listener)
            })
            .collect();
        Arc::new(Services {
            ctx,
            peers,
            source,
            forwards: Mutex::new(forwards),
        })
    }

    /// Reads the file again and applies it; an error (and nothing changed) if the file is
    /// broken or cannot be applied, or if the agent was not started from a file.
    pub async fn reload(&self) -> anyhow::Result<Change> {
        let source = self.source.as_ref().context(
            "this agent was not started from a config file (`p2ptun up -c FILE`); restart it \
             with the new flags instead",
        )?;
        let new = source
            .read()
            .with_context(|| format!("the new {} is refused", source.path.display()))?;
        let mut change = self
            .apply(new.exposes.clone(), new.forwards.clone())
            .await
            .with_context(|| format!("the new {} is refused", source.path.display()))?;
        change.need_restart = restart_only(&self.ctx.opts, &new);
        Ok(change)
    }

    /// Makes `exposes` and `forwards` the running set, all or nothing.
    pub async fn apply(
        &self,
        exposes: Vec<ExposeSpec>,
        forwards: Vec<ForwardSpec>,
    ) -> anyhow::Result<Change> {
        let mut running = self.forwards.lock().await;
        let mut change = Change::default();

        // First what can fail: the new ports, then S's word on the new names.
        let mut listeners = Vec::with_capacity(forwards.len());
        for spec in &forwards {
            let listener = match matching(&running, spec) {
                Some(i) => running[i].listener.clone(),
                None => Listener::bind(spec).await?,
            };
            listeners.push(listener);
        }
        let old_exposes = self.ctx.exposes.borrow().clone();
        let names: Vec<String> = exposes.iter().map(|e| e.name.clone()).collect();
        let old_names: Vec<String> = old_exposes.iter().map(|e| e.name.clone()).collect();
        if names != old_names {
            // Not registered now: the next registration carries the new names.
            let registration = self.ctx.registration.borrow().clone();
            if let Some(reg) = registration {
                reg.update_names(names.clone())
                    .await
                    .context("S refused the new names")?;
            }
        }

        // Then the changes, which cannot fail.
        for e in &exposes {
            match old_exposes.iter().find(|o| o.name == e.name) {
                None => change.added.push(format!("expose {}", e.name)),
                Some(o) if o != e => change.changed.push(format!("expose {}", e.name)),
                Some(_) => {}
            }
        }
        for o in &old_exposes {
            if !exposes.iter().any(|e| e.name == o.name) {
                change.removed.push(format!("expose {}", o.name));
            }
        }
        self.ctx.exposes.send_replace(exposes);

        let mut next = Vec::with_capacity(forwards.len());
        for (spec, listener) in forwards.into_iter().zip(listeners) {
            let label = spec.label();
            match matching(&running, &spec) {
                Some(i) if running[i].spec == spec => {
                    next.push(running.swap_remove(i));
                    continue;
                }
                Some(i) => {
                    running.swap_remove(i).task.abort();
                    change.changed.push(label);
                }
                None => change.added.push(label),
            }
            next.push(spawn_forward(&self.peers, spec, listener));
        }
        for gone in running.drain(..) {
            gone.task.abort();
            change.removed.push(gone.spec.label());
        }
        *running = next;
        Ok(change)
    }

    /// Stops every listener (the agent is stopping).
    pub async fn stop(&self) {
        for f in self.forwards.lock().await.iter() {
            f.task.abort();
        }
    }

    /// Reloads on SIGHUP and when the file changes, logging what each reload did, until the
    /// task is aborted. Nothing to do for an agent not started from a file.
    pub async fn watch(self: Arc<Self>) {
        let Some(path) = self.source.as_ref().map(|s| s.path.clone()) else {
            return;
        };
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("no reload on SIGHUP: {e}");
                None
            }
        };
        let mut seen = stamp(&path);
        let mut poll = tokio::time::interval(FILE_POLL);
        loop {
            let why = tokio::select! {
                Some(()) = async { hangup.as_mut()?.recv().await } => "SIGHUP",
                _ = poll.tick() => {
                    let now = stamp(&path);
                    // A file being replaced is missing for a moment: wait for the new one.
                    if now.is_none() || now == seen {
                        continue;
                    }
                    seen = now;
                    "the file changed"
                }
            };
            match self.reload().await {
                Ok(change) => tracing::info!(file = %path.display(), "reloaded ({why}): {change}"),
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    "reload ({why}) refused, the running services are unchanged: {e:#}"
                ),
            }
        }
    }
}

/// The running forward `spec` takes the place of: the same one, or one on the same port of
/// the same protocol (a port chosen by the system, 0, is never the same port).
fn matching(running: &[Forward], spec: &ForwardSpec) -> Option<usize> {
    running.iter().position(|f| f.spec == *spec).or_else(|| {
        running.iter().position(|f| {
            spec.bind.port() != 0 && f.spec.bind == spec.bind && f.spec.protocol == spec.protocol
        })
    })
}

fn spawn_forward(peers: &Peers, spec: ForwardSpec, listener: Listener) -> Forward {
    let task = match &listener {
        Listener::Tcp(l) => tokio::spawn(forward::serve(peers.clone(), spec.clone(), l.clone())),
        Listener::Udp(s) => tokio::spawn(udp::forward(peers.clone(), spec.clone(), s.clone())),
    };
    Forward {
        spec,
        listener,
        task,
    }
}

/// The file's modification time and length: a change of either is an edit.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The settings of `new` that differ from `running` and that a running agent cannot take
/// on (its socket, identity and S are made once).
fn restart_only(running: &AgentOptions, new: &AgentOptions) -> Vec<&'static str> {
    let mut out = Vec::new();
    if running.server != new.server {
        out.push("server");
    }
    if running.token != new.token {
        out.push("token");
    }
    if running.server_fingerprint != new.server_fingerprint {
        out.push("server_fingerprint");
    }
    if running.state_dir != new.state_dir {
        out.push("state_dir");
    }
    if running.bind != new.bind {
        out.push("bind");
    }
    if running.portmap != new.portmap {
        out.push("portmap");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reads_as_a_sentence() {
        assert_eq!(Change::default().to_string(), "no service changed");
        let change = Change {
            added: vec!["expose web".into(), "forward web on 127.0.0.1:4001".into()],
            removed: vec!["expose old".into()],
            changed: vec![],
            need_restart: vec!["server"],
        };
        assert_eq!(
            change.to_string(),
            "added expose web, forward web on 127.0.0.1:4001; removed expose old; not \
             applied until a restart: server"
        );
    }

    #[test]
    fn settings_a_running_agent_cannot_take_are_named() {
        let base = AgentOptions {
            server: "127.0.0.1:7000".into(),
            token: None,
            server_fingerprint: None,
            state_dir: PathBuf::from("/tmp/p2ptun-test"),
            bind: "[::]:0".parse().unwrap(),
            exposes: Vec::new(),
            forwards: Vec::new(),
            portmap: crate::portmap::Mode::default(),
        };
        assert!(restart_only(&base, &base.clone()).is_empty());
        let moved = AgentOptions {
            server: "203.0.113.9:7000".into(),
            portmap: crate::portmap::Mode::Off,
            ..base.clone()
        };
        assert_eq!(restart_only(&base, &moved), ["server", "portmap"]);
    }
}
