//! Introductions across the S of a cluster. A forwarder asks its home S for a name; when the
//! exposer is homed on another S, the answer names that S, and the introduction, the punch
//! and any relaying happen there, since only the exposer's home can reach it. The forwarder
//! then registers with that S too, exposing nothing ("visiting"), and keeps the registration
//! for as long as a link introduced through it lives: each link holds the [`Registered`] it
//! was introduced through, and [`Visits`] only remembers them weakly.
//!
//! When a visited S stops answering, the exposer homed there moves to another S within
//! seconds, but until the cluster's record of it expires other S still name the dead one.
//! Dialling it would cost a whole handshake timeout and make the link's next attempt too
//! late for its relayed peer connection; for [`LOST_GRACE`] after its registration timed
//! out, an answer naming it fails at once, and the link asks again on its usual schedule.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::{mpsc, Mutex};

use super::ctx::Ctx;
use super::registration::{Introduction, Registered};
use super::server::{self, ServerEvent, Target};
use crate::proto::{read_frame, Fingerprint, Rendezvous, ServerInfo, ServerMsg};

/// How long an S whose visit timed out counts as gone: longer than the cluster takes to
/// forget it (its etcd lease, 10 s), shorter than a relayed peer connection's patience.
pub const LOST_GRACE: Duration = Duration::from_secs(12);

/// Why an introduction across S failed for now: the exposer is moving between S, and asking
/// again in a moment is worth it.
#[derive(Debug, thiserror::Error)]
pub enum Moving {
    /// The exposer's home, as the cluster names it, stopped answering or cannot be reached.
    #[error("S at {addr} stopped answering {ago:.1} s ago; its agents are moving to other S")]
    Lost {
        /// That S.
        addr: String,
        /// Seconds since it was seen gone.
        ago: f64,
    },
    /// The S named as the exposer's home names yet another one.
    #[error("S at {named} says '{name}' is exposed through S at {next}, not itself")]
    Moved {
        /// The name asked for.
        name: String,
        /// The S the home named.
        named: String,
        /// The S that one named.
        next: String,
    },
}

/// The registrations with S other than the home, one per S while something uses it.
pub struct Visits {
    ctx: Arc<Ctx>,
    /// Where what a visited S pushes goes (relay sessions it closed).
    pushed: mpsc::Sender<ServerEvent>,
    /// Held while a registration is being made, so that concurrent asks share one.
    open: Mutex<HashMap<Fingerprint, Weak<Registered>>>,
    /// S whose visit timed out, and when that was first seen.
    lost: std::sync::Mutex<HashMap<Fingerprint, Instant>>,
}

impl Visits {
    /// None yet; what visited S push goes to `pushed`.
    pub fn new(ctx: Arc<Ctx>, pushed: mpsc::Sender<ServerEvent>) -> Arc<Visits> {
        Arc::new(Visits {
            ctx,
            pushed,
            open: Mutex::default(),
            lost: std::sync::Mutex::default(),
        })
    }

    /// The introduction to the exposer of `name`, asked of `home`, or of the S that `home`
    /// answers is the exposer's home; with the registration it was made through.
    pub async fn introduce(
        &self,
        home: Arc<Registered>,
        name: &str,
    ) -> anyhow::Result<(Rendezvous, Arc<Registered>)> {
        let ctx = &self.ctx;
        let server = match home.connect(name, ctx.candidates(&home)).await? {
            Introduction::Here(rv) => return Ok((rv, home)),
            Introduction::Elsewhere(server) => server,
        };
        if server.fingerprint == home.fingerprint {
            bail!("S at {} named itself as the home of '{name}'", home.name);
        }
        let there = self.to(&server).await?;
        match there.connect(name, ctx.candidates(&there)).await? {
            Introduction::Here(rv) => Ok((rv, there)),
            // The exposer moved between the two answers; the next attempt asks again.
            Introduction::Elsewhere(next) => Err(Moving::Moved {
                name: name.to_owned(),
                named: server.addr,
                next: next.addr,
            }
            .into()),
        }
    }

    /// The registration with `server`, made if none lives.
    async fn to(&self, server: &ServerInfo) -> anyhow::Result<Arc<Registered>> {
        // The agent may have moved home to that very S meanwhile: a second registration of
        // this key there would replace the home one.
        let home = self.ctx.registration.borrow().clone();
        if let Some(home) = home.filter(|h| h.fingerprint == server.fingerprint) {
            return Ok(home);
        }
        let mut open = self.open.lock().await;
        open.retain(|_, reg| reg.strong_count() > 0);
        if let Some(reg) = open.get(&server.fingerprint).and_then(Weak::upgrade) {
            match reg.conn.close_reason() {
                None => return Ok(reg),
                Some(quinn::ConnectionError::TimedOut) => self.note_lost(server.fingerprint),
                Some(_) => {}
            }
        }
        if let Some(ago) = self.lost_since(server.fingerprint) {
            return Err(Moving::Lost {
                addr: server.addr.clone(),
                ago: ago.as_secs_f64(),
            }
            .into());
        }
        let ctx = &self.ctx;
        let registered = server::register(ctx, &[Target::from(server)], Vec::new(), true).await;
        let (mut reg, events) = match registered {
            Ok(registered) => registered,
            Err(e) => {
                // Not dialled again for a while: the next forward would wait as long.
                self.note_lost(server.fingerprint);
                return Err(anyhow::Error::from(e).context(format!(
                    "the exposer is registered with S at {}, which this agent cannot register \
                     with",
                    server.addr
                )));
            }
        };
        let pump = tokio::spawn(super::relay::pump(
            ctx.relays.clone(),
            ctx.router.socket().injector(),
            reg.conn.clone(),
        ));
        let reader = tokio::spawn(read_pushed(events, reg.name.clone(), self.pushed.clone()));
        reg.tasks = vec![pump.abort_handle(), reader.abort_handle()];
        let reg = Arc::new(reg);
        open.insert(server.fingerprint, Arc::downgrade(&reg));
        Ok(reg)
    }
}

impl Visits {
    fn lost(&self) -> std::sync::MutexGuard<'_, HashMap<Fingerprint, Instant>> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_lost(&self, server: Fingerprint) {
        self.lost().entry(server).or_insert_with(Instant::now);
    }

    /// How long ago `server` was seen gone, within [`LOST_GRACE`].
    fn lost_since(&self, server: Fingerprint) -> Option<Duration> {
        let mut lost = self.lost();
        lost.retain(|_, at| at.elapsed() < LOST_GRACE);
        lost.get(&server).map(Instant::elapsed)
    }
}

/// Passes on what a visited S pushes until its registration ends.
async fn read_pushed(
    mut events: quinn::RecvStream,
    server: String,
    pushed: mpsc::Sender<ServerEvent>,
) {
    loop {
        match read_frame::<ServerMsg, _>(&mut events).await {
            Ok(Some(msg)) => {
                if server::pass_on(msg, None, &pushed).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%server, "the visit's registration ended: {e}");
                return;
            }
        }
    }
}
