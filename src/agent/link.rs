//! One link per peer agent: the single owner of everything that carries traffic to that
//! peer — its relay session through S, every direct UDP path the checks found, TCP
//! connections, birthday-punch sockets — however many services, names or introductions use
//! it. It is the only writer of that peer's rows in the path table, keeps every row under
//! watch (through the checks' liveness events and the channel paths' own), and removes them
//! all when it goes.
//!
//! A link never settles for less than direct UDP: while it is not on it, it asks S for a
//! fresh introduction and punches again on the schedule of [`super::heal`]. Only a link that
//! forwards to a name of the peer can ask (S introduces by name); a link that only exposes
//! follows the forwarder's re-introductions, which come to it as new introductions. The
//! peer's QUIC connections above never notice: their virtual address stays the same.
//!
//! Two agents that expose to and forward to each other share the link (paths, relay,
//! punches, liveness) but not a QUIC connection: each direction is its own connection,
//! because the connection's roles carry the trust decisions — the forwarder (TLS client)
//! checks the key S vouched for and its pin, the exposer (TLS server) applies its `--allow`
//! lists — and a second connection over the same paths costs one handshake and a few KiB.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::ctx::Ctx;
use super::heal::Heal;
use super::paths::{self, ChannelPath, Outcome};
use super::registration::Registered;
use super::relay::{self, RelayPath};
use super::visit::Visits;
use crate::path::PathKind;
use crate::proto::{Fingerprint, Rendezvous};
use crate::punch::checker::Event;
use crate::punch::Punch;

/// How long a link lives without a user after an introduction: the peer's connection is on
/// its way (the exposer's side) or being made.
const LINGER: Duration = Duration::from_secs(30);

/// Most introductions whose checks a link keeps at once; the oldest goes first.
const MAX_PUNCHES: usize = 4;

/// How often the local addresses are looked at for a change of network.
const NETWORK_POLL: Duration = Duration::from_secs(2);

/// What a link shows of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkView {
    /// The path in use.
    pub selected: Option<(PathKind, SocketAddr)>,
    /// Re-punches started (introductions asked for after the first).
    pub repunches: u64,
    /// Seconds until the next re-punch, if one is scheduled.
    pub next_repunch_in: Option<u64>,
    /// Whether an introduction's checks are running.
    pub checking: bool,
}

enum Command {
    Introduce {
        rv: Box<Rendezvous>,
        reg: Arc<Registered>,
        controlling: bool,
        /// Completed once the introduction's relay path is in place and its punches started.
        taken: Option<oneshot::Sender<()>>,
    },
    Name(String),
    RelayClosed(u64),
    /// The attempt failed; `moving`: because the peer is between two S of a cluster.
    AttemptFailed {
        why: String,
        moving: bool,
    },
}

/// The links of this agent, one per peer.
pub struct Links {
    ctx: Arc<Ctx>,
    visits: Arc<Visits>,
    links: Mutex<HashMap<Fingerprint, Weak<Link>>>,
}

impl Links {
    /// No links yet; introductions are asked for through `visits`.
    pub fn new(ctx: Arc<Ctx>, visits: Arc<Visits>) -> Arc<Links> {
        Arc::new(Links {
            ctx,
            visits,
            links: Mutex::default(),
        })
    }

    /// Where introductions are asked for, across the S of a cluster.
    pub fn visits(&self) -> &Arc<Visits> {
        &self.visits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Fingerprint, Weak<Link>>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live link to `peer`, if there is one.
    pub fn get(&self, peer: Fingerprint) -> Option<Arc<Link>> {
        self.lock().get(&peer).and_then(Weak::upgrade)
    }

    /// Hands introduction `rv` (through `reg`) to its peer's link, made if none lives, and
    /// returns once the link has taken it (its relay path, if any, carries packets). `forward`
    /// is the name this agent asked for, when it is the forwarder. The link is kept for a
    /// while even if nobody takes it.
    pub async fn introduce(
        &self,
        rv: Rendezvous,
        reg: Arc<Registered>,
        forward: Option<&str>,
    ) -> Arc<Link> {
        let peer = rv.peer_fingerprint;
        let link = {
            let mut links = self.lock();
            links.retain(|_, w| w.strong_count() > 0);
            match links.get(&peer).and_then(Weak::upgrade) {
                Some(link) => link,
                None => {
                    let link = Arc::new(Link::start(self.ctx.clone(), self.visits.clone(), peer));
                    links.insert(peer, Arc::downgrade(&link));
                    link
                }
            }
        };
        if let Some(name) = forward {
            link.send(Command::Name(name.to_owned()));
        }
        let (taken, done) = oneshot::channel();
        link.send(Command::Introduce {
            rv: Box::new(rv),
            reg,
            controlling: forward.is_some(),
            taken: Some(taken),
        });
        let _ = done.await;
        let keep = link.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            drop(keep);
        });
        link
    }

    /// S stopped relaying `session`: the link using it, if any, lets it go.
    pub fn relay_closed(&self, session: u64) {
        for link in self.lock().values().filter_map(Weak::upgrade) {
            link.send(Command::RelayClosed(session));
        }
    }
}

/// A handle on the link to one peer. The link lives while a handle does: the last one
/// dropped removes every path of the peer and stops its checks.
pub struct Link {
    peer: Fingerprint,
    virt: SocketAddr,
    ctx: Arc<Ctx>,
    commands: mpsc::UnboundedSender<Command>,
    view: watch::Receiver<LinkView>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        // At once, not when the aborted task is next polled: a new link to the same peer
        // may be made right after this one goes.
        self.ctx
            .router
            .socket()
            .table_write()
            .clear_paths(self.virt);
        tracing::debug!(peer = %self.peer, "link closed");
    }
}

impl Link {
    fn start(ctx: Arc<Ctx>, visits: Arc<Visits>, peer: Fingerprint) -> Link {
        let virt = ctx.router.socket().table_write().peer(peer);
        let (commands, rx) = mpsc::unbounded_channel();
        let (view_tx, view) = watch::channel(LinkView::default());
        let driver = Driver::new(ctx.clone(), visits, peer, virt, commands.clone(), view_tx);
        let task = tokio::spawn(driver.run(rx));
        Link {
            peer,
            virt,
            ctx,
            commands,
            view,
            task,
        }
    }

    fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// The peer's virtual address, which its QUIC connections use.
    pub fn virt(&self) -> SocketAddr {
        self.virt
    }

    /// The peer's identity.
    pub fn peer(&self) -> Fingerprint {
        self.peer
    }

    /// Lets the link ask S for introductions by `name` when it needs a new punch.
    pub fn add_name(&self, name: &str) {
        self.send(Command::Name(name.to_owned()));
    }

    /// What the link shows now.
    pub fn view(&self) -> LinkView {
        self.view.borrow().clone()
    }

    /// Waits until the link has a path, or its checks ended without one (`false`), or
    /// `timeout` passed.
    pub async fn wait_for_path(&self, timeout: Duration) -> bool {
        let mut view = self.view.clone();
        // The first introduction may not have started its checks yet.
        let started = tokio::time::timeout(timeout, async {
            let _ = view.wait_for(|v| v.selected.is_some() || v.checking).await;
            view.wait_for(|v| v.selected.is_some() || !v.checking)
                .await
                .map(|v| v.selected.is_some())
                .unwrap_or(false)
        });
        started.await.unwrap_or(false)
    }
}

/// One introduction's UDP checks.
struct PunchEntry {
    id: u64,
    _punch: Punch,
    /// The path its checks nominated, and whether it answers.
    path: Option<(SocketAddr, bool)>,
}

/// A TCP or birthday path being carried.
struct ChannelEntry {
    kind: PathKind,
    remote: SocketAddr,
}

enum ChannelEvent {
    Live(bool),
    Ended(String),
}

/// A channel the link's task reads, with the sender it hands out.
type Inbox<T> = (mpsc::Sender<T>, mpsc::Receiver<T>);

/// The link's task: all of its state, changed only here.
struct Driver {
    ctx: Arc<Ctx>,
    visits: Arc<Visits>,
    /// The registration with another S of the cluster that the latest introduction came
    /// through, kept while this link lives (see [`super::visit`]).
    visit: Option<Arc<Registered>>,
    peer: Fingerprint,
    virt: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    view: watch::Sender<LinkView>,
    names: BTreeSet<String>,
    relay: Option<RelayPath>,
    relay_gone: Option<oneshot::Receiver<()>>,
    punches: Vec<PunchEntry>,
    /// The introduction whose punch decides when an attempt ends.
    latest: u64,
    channels: HashMap<u64, ChannelEntry>,
    next_id: u64,
    heal: Heal,
    selected: Option<(PathKind, SocketAddr)>,
    udp: Inbox<(u64, Event)>,
    outcomes: Inbox<Outcome>,
    channel_events: Inbox<(u64, ChannelEvent)>,
    observed: Option<SocketAddr>,
    local_addrs: Vec<SocketAddr>,
}

impl Driver {
    fn new(
        ctx: Arc<Ctx>,
        visits: Arc<Visits>,
        peer: Fingerprint,
        virt: SocketAddr,
        commands: mpsc::UnboundedSender<Command>,
        view: watch::Sender<LinkView>,
    ) -> Driver {
        let observed = ctx.registration.borrow().as_ref().map(|r| r.observed);
        let local_addrs = local_addrs(&ctx);
        Driver {
            ctx,
            visits,
            visit: None,
            peer,
            virt,
            commands,
            view,
            names: BTreeSet::new(),
            relay: None,
            relay_gone: None,
            punches: Vec::new(),
            latest: 0,
            channels: HashMap::new(),
            next_id: 0,
            heal: Heal::new(Instant::now().into_std()),
            selected: None,
            udp: mpsc::channel(64),
            outcomes: mpsc::channel(8),
            channel_events: mpsc::channel(16),
            observed,
            local_addrs,
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut registration = self.ctx.registration.clone();
        let mut network = tokio::time::interval(NETWORK_POLL);
        network.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.heal.poll_timeout().map(Instant::from_std);
            let relay_gone = async {
                match self.relay_gone.as_mut() {
                    Some(rx) => {
                        let _ = rx.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => return,
                },
                Some((id, event)) = self.udp.1.recv() => self.on_udp(id, event),
                Some(outcome) = self.outcomes.1.recv() => self.on_outcome(outcome),
                Some((id, event)) = self.channel_events.1.recv() => self.on_channel(id, event),
                () = relay_gone => {
                    self.relay_gone = None;
                    if let Some(relay) = self.relay.take() {
                        tracing::info!(peer = %self.peer, session = relay.session, "the relay session ended with the connection to S");
                        self.drop_relay(relay);
                    }
                }
                changed = registration.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let observed = registration.borrow_and_update().as_ref().map(|r| r.observed);
                    // A new mapping is a new network; a new registration after the old
                    // one's relay session went with it is the first chance of a new one.
                    let moved = observed.is_some() && observed != self.observed;
                    if moved || (observed.is_some() && self.relay.is_none()) {
                        tracing::debug!(peer = %self.peer, ?observed, "registered with S again");
                        self.heal.on_change(Instant::now().into_std());
                    }
                    if observed.is_some() {
                        self.observed = observed;
                    }
                }
                _ = network.tick() => {
                    let now = local_addrs(&self.ctx);
                    if now != self.local_addrs {
                        tracing::info!(peer = %self.peer, "the local network changed; checking paths again");
                        self.local_addrs = now;
                        self.heal.on_change(Instant::now().into_std());
                    }
                }
                _ = sleep_until(wake) => {}
            }
            self.settle();
        }
    }

    /// After any change: the selected path, its log line, the heal schedule and the view.
    fn settle(&mut self) {
        let now = Instant::now().into_std();
        let selected = self.ctx.router.socket().table_read().selected(self.virt);
        if selected != self.selected {
            match selected {
                Some((kind, remote)) => {
                    tracing::info!(peer = %self.peer, %remote, "path to the peer is now {kind}")
                }
                None => tracing::warn!(peer = %self.peer, "no path to the peer for now"),
            }
            self.selected = selected;
            self.heal
                .on_path(matches!(selected, Some((PathKind::DirectUdp, _))), now);
        }
        if self.heal.poll(now) {
            self.repunch(now);
        }
        let view = LinkView {
            selected,
            repunches: self.heal.attempts(),
            next_repunch_in: self
                .heal
                .next_attempt()
                .filter(|_| !self.names.is_empty())
                .map(|t| t.saturating_duration_since(now).as_secs()),
            checking: self
                .punches
                .iter()
                .any(|p| p.id == self.latest && p.path.is_none()),
        };
        self.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    /// Asks S for a fresh introduction through one of the names this link forwards to.
    fn repunch(&mut self, now: std::time::Instant) {
        let reg = self.ctx.registration.borrow().clone();
        let (Some(name), Some(reg)) = (self.names.iter().next().cloned(), reg) else {
            // Nothing to ask with (an exposing-only link: the forwarder asks), or no S now
            // (a new registration is a change that brings the next attempt).
            self.heal.skip(now);
            return;
        };
        self.heal.on_attempt_started(now);
        tracing::info!(peer = %self.peer, %name, attempt = self.heal.attempts(), "not on a direct UDP path: asking S for a fresh introduction");
        let visits = self.visits.clone();
        let commands = self.commands.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            let command = match visits.introduce(reg, &name).await {
                Ok((rv, reg)) if rv.peer_fingerprint == peer => Command::Introduce {
                    rv: Box::new(rv),
                    reg,
                    controlling: true,
                    taken: None,
                },
                Ok((rv, _)) => Command::AttemptFailed {
                    moving: false,
                    why: format!(
                        "'{name}' is now exposed by {}, not by this peer",
                        rv.peer_fingerprint
                    ),
                },
                Err(e) => Command::AttemptFailed {
                    moving: e.is::<super::visit::Moving>(),
                    why: format!("{e:#}"),
                },
            };
            let _ = commands.send(command);
        });
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Introduce {
                rv,
                reg,
                controlling,
                taken,
            } => {
                let relayed = rv.relay;
                self.introduce(*rv, &reg, controlling);
                // A visited S is needed while its relay session is the link's: until an
                // introduction through another S brings a relay session of its own.
                if reg.visiting || relayed {
                    self.visit = reg.visiting.then_some(reg);
                }
                if let Some(taken) = taken {
                    let _ = taken.send(());
                }
            }
            Command::Name(name) => {
                self.names.insert(name);
            }
            Command::RelayClosed(session) => {
                if self.relay.as_ref().is_some_and(|r| r.session == session) {
                    if let Some(relay) = self.relay.take() {
                        self.drop_relay(relay);
                    }
                }
            }
            Command::AttemptFailed { why, moving } => {
                tracing::warn!(peer = %self.peer, "no fresh introduction: {why}");
                let now = Instant::now().into_std();
                if moving {
                    self.heal.on_attempt_moving(now);
                } else {
                    self.heal.on_attempt_done(now);
                }
            }
        }
    }

    /// Takes an introduction: its relay session replaces the one in use, and its punches
    /// start beside the checks of earlier ones (which keep their paths until these find
    /// better).
    fn introduce(&mut self, rv: Rendezvous, reg: &Registered, controlling: bool) {
        if rv.peer_fingerprint != self.peer {
            return;
        }
        let now = Instant::now().into_std();
        if rv.relay {
            let (path, gone) = relay::open(
                &self.ctx.relays,
                &reg.conn,
                reg.server,
                rv.session,
                self.virt,
            );
            let mut table = self.ctx.router.socket().table_write();
            if let Some(old) = &self.relay {
                if old.server != path.server {
                    table.remove_path(self.virt, PathKind::Relay, old.server);
                }
            }
            table.add_channel_path(
                self.virt,
                PathKind::Relay,
                path.server,
                path.sink.clone(),
                None,
            );
            drop(table);
            self.relay = Some(path);
            self.relay_gone = Some(gone);
        }
        self.next_id += 1;
        let id = self.next_id;
        let punch = paths::start(
            &self.ctx,
            &rv,
            self.virt,
            controlling,
            id,
            self.udp.0.clone(),
            self.outcomes.0.clone(),
        );
        self.punches.push(PunchEntry {
            id,
            _punch: punch,
            path: None,
        });
        self.latest = id;
        if !self.heal.in_flight() {
            // An introduction this link did not ask for (the peer's, or a new name's): its
            // punch is an attempt too.
            self.heal.on_attempt_started(now);
        }
        while self.punches.len() > MAX_PUNCHES {
            let oldest = self.punches.remove(0);
            if let Some((remote, _)) = oldest.path {
                self.release(remote);
            }
        }
        tracing::debug!(peer = %self.peer, session = rv.session, relay = rv.relay, "introduction: checking paths");
    }

    fn on_udp(&mut self, id: u64, event: Event) {
        let now = Instant::now().into_std();
        let Some(i) = self.punches.iter().position(|p| p.id == id) else {
            return;
        };
        let latest = id == self.latest;
        match event {
            Event::Found { remote, rtt } => {
                self.punches[i].path = Some((remote, true));
                self.table_add_udp(remote, rtt);
                tracing::info!(peer = %self.peer, %remote, rtt_ms = format_args!("{:.2}", ms(rtt)), "found direct UDP path");
                // Older checks of the same path are redundant now.
                self.punches
                    .retain(|p| p.id >= id || p.path.map(|(r, _)| r) != Some(remote));
                if latest {
                    self.heal.on_attempt_done(now);
                }
            }
            Event::Rtt { remote, rtt } => self.table_add_udp(remote, rtt),
            Event::Revived { remote, rtt } => {
                self.punches[i].path = Some((remote, true));
                self.table_add_udp(remote, rtt);
                tracing::info!(peer = %self.peer, %remote, "direct UDP path answers again");
            }
            Event::Dead { remote } => {
                self.punches[i].path = Some((remote, false));
                if !self.claimed_live(remote) {
                    self.ctx.router.socket().table_write().set_live(
                        self.virt,
                        PathKind::DirectUdp,
                        remote,
                        false,
                    );
                    tracing::warn!(peer = %self.peer, %remote, "direct UDP path stopped answering");
                }
            }
            Event::Moved { from } => {
                self.punches[i].path = None;
                self.release(from);
            }
            Event::Failed { tried } => {
                self.punches.remove(i);
                tracing::info!(peer = %self.peer, "{}", crate::punch::PunchError::NoPath { tried });
                if latest {
                    self.heal.on_attempt_done(now);
                }
            }
            Event::Expired { remote } => {
                self.punches.remove(i);
                self.release(remote);
            }
        }
    }

    fn table_add_udp(&self, remote: SocketAddr, rtt: Duration) {
        self.ctx
            .router
            .socket()
            .table_write()
            .add_udp_path(self.virt, remote, Some(rtt));
    }

    /// Whether any introduction's checks hold `remote` as a live path.
    fn claimed_live(&self, remote: SocketAddr) -> bool {
        self.punches.iter().any(|p| p.path == Some((remote, true)))
    }

    /// Removes the row of `remote` unless another introduction's checks still hold it.
    fn release(&mut self, remote: SocketAddr) {
        if !self
            .punches
            .iter()
            .any(|p| p.path.map(|(r, _)| r) == Some(remote))
        {
            self.ctx.router.socket().table_write().remove_path(
                self.virt,
                PathKind::DirectUdp,
                remote,
            );
        }
    }

    fn on_outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Found(path) => self.install(path),
            Outcome::Failed(why) => tracing::info!(peer = %self.peer, "{why}"),
        }
    }

    /// Carries a TCP or birthday path: installs it and follows its liveness and its end.
    fn install(&mut self, path: ChannelPath) {
        let ChannelPath {
            kind,
            remote,
            sink,
            mut live,
            done,
        } = path;
        tracing::info!(peer = %self.peer, %remote, "found {kind} path");
        // A new path to the same place replaces the old one, whose end is then not ours.
        self.channels
            .retain(|_, c| !(c.kind == kind && c.remote == remote));
        self.next_id += 1;
        let id = self.next_id;
        self.channels.insert(id, ChannelEntry { kind, remote });
        self.ctx
            .router
            .socket()
            .table_write()
            .add_channel_path(self.virt, kind, remote, sink, None);
        let events = self.channel_events.0.clone();
        tokio::spawn(async move {
            let mut done = done;
            let why = loop {
                tokio::select! {
                    changed = live.changed() => {
                        if changed.is_err() {
                            break (&mut done).await.map_or_else(|_| "closed".to_owned(), describe_end);
                        }
                        let now = *live.borrow_and_update();
                        if events.send((id, ChannelEvent::Live(now))).await.is_err() {
                            return;
                        }
                    }
                    ended = &mut done => break ended.map_or_else(|_| "closed".to_owned(), describe_end),
                }
            };
            let _ = events.send((id, ChannelEvent::Ended(why))).await;
        });
    }

    fn on_channel(&mut self, id: u64, event: ChannelEvent) {
        let Some(entry) = self.channels.get(&id) else {
            return;
        };
        let (kind, remote) = (entry.kind, entry.remote);
        let mut table = self.ctx.router.socket().table_write();
        match event {
            ChannelEvent::Live(live) => {
                table.set_live(self.virt, kind, remote, live);
                drop(table);
                if live {
                    tracing::info!(peer = %self.peer, %remote, "{kind} path answers again");
                } else {
                    tracing::warn!(peer = %self.peer, %remote, "{kind} path stopped answering");
                }
            }
            ChannelEvent::Ended(why) => {
                table.remove_path(self.virt, kind, remote);
                drop(table);
                self.channels.remove(&id);
                tracing::debug!(peer = %self.peer, %remote, "{kind} path ended: {why}");
            }
        }
    }

    fn drop_relay(&mut self, relay: RelayPath) {
        self.ctx.router.socket().table_write().remove_path(
            self.virt,
            PathKind::Relay,
            relay.server,
        );
        // With no relay, a dead direct path would leave nothing: look again now.
        self.heal.on_change(Instant::now().into_std());
    }
}

fn describe_end(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "closed".to_owned(),
        Err(e) => e.to_string(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// This agent's own addresses (interfaces and port mappings), sorted: a change is a new
/// network.
fn local_addrs(ctx: &Ctx) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = ctx.local_candidates().into_iter().map(|c| c.addr).collect();
    addrs.sort();
    addrs
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
