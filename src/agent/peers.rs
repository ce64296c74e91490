//! The forwarder's side of peer connections: for a name, the one QUIC connection to the agent
//! exposing it, made through S's introduction, the peer's link, and a fingerprint check. All
//! names exposed by one agent share one connection (the stream header names the service).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quinn::Connection;
use tokio::sync::Mutex;

use super::ctx::Ctx;
use super::known::{PinFile, Pinned};
use super::link::{Link, Links};
use super::registration::Registered;
use crate::proto::{ErrorCode, ErrorMsg, Fingerprint, Rendezvous, ALPN_PEER};
use crate::punch::checks;
use crate::tunnel::tls;

/// How long a new local connection waits for a registration with S.
const WAIT_FOR_S: Duration = Duration::from_secs(15);

/// How long a new local connection waits for its name to appear on S. An exposer started at
/// the same moment as the forwarder (a daemon pair booting, a test) registers within a
/// second or two; resetting the local connection at once would fail the first `ssh` for no
/// reason the user can act on.
const WAIT_FOR_NAME: Duration = Duration::from_secs(5);

/// Between two requests for a name S does not know yet.
const NAME_RETRY: Duration = Duration::from_millis(250);

/// A live connection to a peer and the link under it. It lives as long as the connection:
/// a task holds it until the connection closes, so a link never outlives its last user.
struct Live {
    conn: Connection,
    link: Arc<Link>,
}

/// The connection for one name, behind a lock held while it is being made.
type Slot = Arc<Mutex<Weak<Live>>>;

/// Connections to exposers, one per peer and made at most once at a time per name.
#[derive(Clone)]
pub struct Peers {
    ctx: Arc<Ctx>,
    links: Arc<Links>,
    by_name: Arc<Mutex<HashMap<String, Slot>>>,
    by_peer: Arc<std::sync::Mutex<HashMap<Fingerprint, Weak<Live>>>>,
}

impl Peers {
    /// No connections yet; links are made in `links`.
    pub fn new(ctx: Arc<Ctx>, links: Arc<Links>) -> Self {
        Peers {
            ctx,
            links,
            by_name: Arc::default(),
            by_peer: Arc::default(),
        }
    }

    /// The agent these connections belong to.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// The connection to the exposer of `name`, made if there is none alive.
    pub async fn get(&self, name: &str) -> anyhow::Result<Connection> {
        Ok(self.get_link(name).await?.0)
    }

    /// [`Peers::get`], and the link under the connection (which knows its path).
    pub async fn get_link(&self, name: &str) -> anyhow::Result<(Connection, Arc<Link>)> {
        let slot = self
            .by_name
            .lock()
            .await
            .entry(name.to_owned())
            .or_default()
            .clone();
        // Holding the slot makes concurrent local connections wait for one introduction.
        let mut slot = slot.lock().await;
        if let Some(live) = slot.upgrade() {
            if live.conn.close_reason().is_none() {
                return Ok((live.conn.clone(), live.link.clone()));
            }
        }
        let live = self.connect(name).await?;
        *slot = Arc::downgrade(&live);
        Ok((live.conn.clone(), live.link.clone()))
    }

    fn live_to(&self, peer: Fingerprint) -> Option<Arc<Live>> {
        self.by_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .and_then(Weak::upgrade)
            .filter(|l| l.conn.close_reason().is_none())
    }

    /// The current registration with S, waiting up to [`WAIT_FOR_S`] for one.
    async fn registration(&self) -> anyhow::Result<Arc<Registered>> {
        let ctx = &self.ctx;
        let mut registration = ctx.registration.clone();
        let reg = tokio::time::timeout(WAIT_FOR_S, registration.wait_for(|r| r.is_some()))
            .await
            .map_err(|_| {
                anyhow!(
                    "not registered with S at {} (is it running?)",
                    ctx.opts.server
                )
            })?
            .map_err(|_| anyhow!("agent shutting down"))?
            .clone();
        reg.context("not registered with S")
    }

    /// S's introduction to the exposer of `name`, asking again for up to [`WAIT_FOR_NAME`]
    /// while S answers that nobody exposes it.
    async fn introduction(&self, name: &str) -> anyhow::Result<(Rendezvous, Arc<Registered>)> {
        let ctx = &self.ctx;
        let give_up = tokio::time::Instant::now() + WAIT_FOR_NAME;
        loop {
            let home = self.registration().await?;
            match self.links.visits().introduce(home, name).await {
                Ok(found) => return Ok(found),
                Err(e) if unknown_name(&e) || e.is::<super::visit::Moving>() => {
                    if tokio::time::Instant::now() + NAME_RETRY > give_up {
                        // S's own words: in a cluster they say which S has the name.
                        tracing::warn!(
                            %name,
                            server = %ctx.opts.server,
                            "'{name}' is not registered on S: {e} (waited {}s)",
                            WAIT_FOR_NAME.as_secs()
                        );
                        bail!(
                            "'{name}' is not registered on S at {}: {e} (is the exposing agent \
                             running, with the same S or one of its cluster?)",
                            ctx.opts.server
                        );
                    }
                    tracing::debug!(%name, "S does not know the name yet; asking again");
                    tokio::time::sleep(NAME_RETRY).await;
                }
                Err(e) => return Err(e.context(format!("S cannot introduce '{name}'"))),
            }
        }
    }

    async fn connect(&self, name: &str) -> anyhow::Result<Arc<Live>> {
        let ctx = &self.ctx;
        let (rv, reg) = self.introduction(name).await?;
        let peer = rv.peer_fingerprint;

        // The pin is checked before anything is sent to the peer.
        let pins = PinFile::new(ctx.opts.state_dir.join("known_peers"));
        let pin_key = format!("{} {name}", ctx.opts.server);
        let pinned = pins.check(&format!("the exposer of '{name}'"), &pin_key, peer)?;

        let relayed = rv.relay;
        // The link takes the introduction whatever happens next: another name of the same
        // peer may already have a connection, and the new punch only adds paths to it.
        let link = self.links.introduce(rv, reg, Some(name)).await;
        if let Some(live) = self.live_to(peer) {
            return Ok(live);
        }
        if !relayed {
            // No relay: a direct path must exist before QUIC can start.
            let wait = checks::DEADLINE + Duration::from_secs(3);
            if !link.wait_for_path(wait).await {
                bail!(
                    "no path to the exposer of '{name}': S does not relay for this pair and no \
                     direct path was found (see the log for each punch)"
                );
            }
        }
        let config = tls::client_config(&ctx.identity, ALPN_PEER)?;
        let conn = ctx
            .endpoint
            .connect_with(config, link.virt(), "p2ptun-peer")?
            .await
            .with_context(|| format!("QUIC handshake with the exposer of '{name}' failed"))?;
        let seen = tls::peer_fingerprint(&conn);
        if seen != Some(peer) {
            conn.close(
                crate::tunnel::header::close::UNEXPECTED_PEER.into(),
                b"unexpected key",
            );
            bail!(
                "the exposer of '{name}' presented key {} but S introduced {peer}",
                seen.map(|f| f.to_string())
                    .unwrap_or_else(|| "(none)".into())
            );
        }
        if pinned == Pinned::New {
            tracing::info!(%name, %peer, "pinned the exposer's key in {}", pins.path().display());
        }
        let (kind, remote) = link
            .view()
            .selected
            .map(|(k, a)| (k.to_string(), a.to_string()))
            .unwrap_or_else(|| ("no path".into(), "-".into()));
        tracing::info!(
            %name,
            %peer,
            path = %kind,
            %remote,
            rtt_ms = format_args!("{:.2}", conn.rtt().as_secs_f64() * 1000.0),
            "connected to peer via {kind}"
        );
        let live = Arc::new(Live { conn, link });
        self.by_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, Arc::downgrade(&live));
        let held = live.clone();
        tokio::spawn(async move {
            held.conn.closed().await;
            tracing::debug!(peer = %held.link.peer(), "connection to the peer closed");
        });
        Ok(live)
    }
}

/// Whether S answered that nobody exposes the name asked for.
fn unknown_name(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ErrorMsg>()
        .is_some_and(|m| m.code == ErrorCode::UnknownName)
}
