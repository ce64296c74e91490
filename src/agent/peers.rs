//! The forwarder's side of peer connections: for a name, the one QUIC connection to the agent
//! exposing it, made through S's introduction, a punch, and a fingerprint check.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use quinn::Connection;
use tokio::sync::Mutex;

use super::known::{PinFile, Pinned};
use super::{paths, relay, Ctx};
use crate::proto::{Fingerprint, ALPN_PEER};
use crate::tunnel::tls;

/// How long a new local connection waits for a registration with S.
const WAIT_FOR_S: std::time::Duration = std::time::Duration::from_secs(15);

/// A live connection to a peer, with the direct paths (once punched) it may use.
struct Live {
    conn: Connection,
    _direct: paths::Held,
}

/// The connection for one name, behind a lock held while it is being made.
type Slot = Arc<Mutex<Option<Arc<Live>>>>;

/// Connections to exposers, one per peer and made at most once at a time per name.
#[derive(Clone)]
pub struct Peers {
    ctx: Arc<Ctx>,
    by_name: Arc<Mutex<HashMap<String, Slot>>>,
    by_peer: Arc<std::sync::Mutex<HashMap<Fingerprint, std::sync::Weak<Live>>>>,
}

impl Peers {
    /// An empty set of connections.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Peers {
            ctx,
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
        let slot = self
            .by_name
            .lock()
            .await
            .entry(name.to_owned())
            .or_default()
            .clone();
        // Holding the slot makes concurrent local connections wait for one introduction.
        let mut slot = slot.lock().await;
        if let Some(live) = slot.as_ref() {
            if live.conn.close_reason().is_none() {
                return Ok(live.conn.clone());
            }
        }
        let live = self.connect(name).await?;
        let conn = live.conn.clone();
        *slot = Some(live);
        Ok(conn)
    }

    async fn connect(&self, name: &str) -> anyhow::Result<Arc<Live>> {
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
            .clone()
            .context("not registered with S")?;
        let rv = reg
            .connect(name, reg.candidates(ctx))
            .await
            .with_context(|| format!("S cannot introduce '{name}'"))?;
        let peer = rv.peer_fingerprint;

        // The pin is checked before anything is sent to the peer.
        let pins = PinFile::new(ctx.opts.state_dir.join("known_peers"));
        let pin_key = format!("{} {name}", ctx.opts.server);
        let pinned = pins.check(&format!("the exposer of '{name}'"), &pin_key, peer)?;

        // Another name of the same peer may already have a connection.
        let existing = self
            .by_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .and_then(|w| w.upgrade());
        if let Some(live) = existing.filter(|l| l.conn.close_reason().is_none()) {
            return Ok(live);
        }

        let virt = ctx.router.socket().table_write().peer(peer);
        // With a relay, traffic starts through S at once and moves to the direct path when
        // the punch finds one; without, the punch must succeed first.
        if rv.relay {
            relay::open(ctx, &reg, rv.session, virt);
        }
        let mut outcomes = paths::start(ctx, &rv, virt, true);
        let mut found = Vec::new();
        if !rv.relay {
            // No relay: a direct path must exist before QUIC can start.
            let mut failures = Vec::new();
            while found.is_empty() {
                match outcomes.recv().await {
                    Some(Ok(path)) => found.push(path),
                    Some(Err(e)) => failures.push(e),
                    None => bail!("{}", failures.join("; ")),
                }
            }
        }
        let config = tls::client_config(&ctx.identity, ALPN_PEER)?;
        let conn = ctx
            .endpoint
            .connect_with(config, virt, "p2ptun-peer")?
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
        let path = ctx.router.socket().table_read().selected(virt);
        let (kind, remote) = path
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
        let direct = paths::keep(outcomes, format!("forward '{name}'"));
        direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(found);
        let live = Arc::new(Live {
            conn,
            _direct: direct,
        });
        self.by_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, Arc::downgrade(&live));
        Ok(live)
    }
}
