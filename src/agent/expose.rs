//! `expose`: handing S's introductions to the forwarders' links, accepting the forwarder's
//! connection, and serving each of its streams from the local service the header names (a
//! UDP service's flows are [`super::udp`]'s).

use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::net::TcpStream;

use super::activity::Role;
use super::ctx::{Ctx, Protocol};
use super::link::Links;
use super::registration::Registered;
use crate::proto::{Fingerprint, Rendezvous};
use crate::tunnel::header::{self, close, codes, Header};
use crate::tunnel::{copy, tls};

/// How long a stream may take to name its service, and the local service to accept.
const STREAM_SETUP: Duration = Duration::from_secs(10);

/// The exposing side of an agent.
#[derive(Clone)]
pub struct Exposer {
    ctx: Arc<Ctx>,
    links: Arc<Links>,
}

impl Exposer {
    /// The exposer of the services in `ctx`'s options, with the agent's links.
    pub fn new(ctx: Arc<Ctx>, links: Arc<Links>) -> Self {
        Exposer { ctx, links }
    }

    /// Hands an introduction S pushed to the forwarder's link, which punches toward it (and
    /// opens the relay session at once, if S relays).
    pub async fn introduced(&self, rv: Rendezvous, reg: Arc<Registered>) {
        if self.ctx.expose(&rv.name).is_none() {
            tracing::warn!(name = %rv.name, "S introduced a forwarder for a name not exposed here");
            return;
        }
        tracing::info!(name = %rv.name, peer = %rv.peer_fingerprint, "forwarder introduced; checking paths");
        self.links.introduce(rv, reg, None).await;
    }

    /// Accepts forwarders' QUIC connections and serves their streams.
    pub async fn accept_connections(self) {
        while let Some(incoming) = self.ctx.endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => this.serve_connection(conn).await,
                    Err(e) => tracing::debug!("incoming connection failed: {e}"),
                }
            });
        }
    }

    async fn serve_connection(&self, conn: Connection) {
        let virt = conn.remote_address();
        let expected = self.ctx.router.socket().table_read().fingerprint_of(virt);
        let Some(peer) = tls::peer_fingerprint(&conn).filter(|seen| Some(*seen) == expected) else {
            tracing::warn!(remote = %virt, "refusing a connection from a key S did not introduce");
            conn.close(close::UNEXPECTED_PEER.into(), b"not introduced by S");
            return;
        };
        let allowed = self
            .ctx
            .exposes
            .borrow()
            .iter()
            .any(|e| e.allow.is_empty() || e.allow.contains(&peer));
        if !allowed {
            tracing::warn!(%peer, "refusing a forwarder that is not in any --allow list");
            let reason = format!("this agent's key {peer} is not in the exposer's --allow list");
            conn.close(close::NOT_ALLOWED.into(), reason.as_bytes());
            return;
        }
        tracing::info!(%peer, "forwarder connected");
        // The link lives at least as long as the connection it carries.
        let _link = self.links.get(peer);
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let this = self.clone();
                    let conn = conn.clone();
                    tokio::spawn(async move { this.serve_stream(&conn, peer, send, recv).await });
                }
                Err(e) => {
                    tracing::info!(%peer, "forwarder disconnected: {e}");
                    break;
                }
            }
        }
    }

    async fn serve_stream(
        &self,
        conn: &Connection,
        peer: Fingerprint,
        mut send: SendStream,
        mut recv: RecvStream,
    ) {
        let refuse = |send: &mut SendStream, recv: &mut RecvStream, code: u32| {
            let _ = send.reset(VarInt::from_u32(code));
            let _ = recv.stop(VarInt::from_u32(code));
        };
        let (name, protocol) =
            match tokio::time::timeout(STREAM_SETUP, header::read(&mut recv)).await {
                Ok(Ok(Header::Service(name))) => (name, Protocol::Tcp),
                Ok(Ok(Header::Flow(name))) => (name, Protocol::Udp),
                // Any peer let in may ping: the connection's --allow check has passed.
                Ok(Ok(Header::Ping)) => return super::ping::answer(send, recv).await,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "bad stream header: {e}");
                    return refuse(&mut send, &mut recv, codes::BAD_HEADER);
                }
                Err(_) => return refuse(&mut send, &mut recv, codes::BAD_HEADER),
            };
        let Some(spec) = self.ctx.expose(&name) else {
            tracing::warn!(%peer, %name, "stream for a name not exposed here");
            return refuse(&mut send, &mut recv, codes::UNKNOWN_SERVICE);
        };
        if !spec.allow.is_empty() && !spec.allow.contains(&peer) {
            tracing::warn!(%peer, %name, "forwarder not in this name's --allow list");
            return refuse(&mut send, &mut recv, codes::NOT_ALLOWED);
        }
        if spec.protocol != protocol {
            tracing::warn!(%peer, %name, "a {protocol} stream for a {} service (one side lacks --udp?)", spec.protocol);
            return refuse(&mut send, &mut recv, codes::WRONG_PROTOCOL);
        }
        if protocol == Protocol::Udp {
            return super::udp::expose_flow(&self.ctx, conn, peer, spec, send, recv).await;
        }
        let activity = &self.ctx.activity;
        activity.peer_connected(peer, Role::Expose, &name, conn);
        let guard = activity.stream_opened(Role::Expose, &name);
        let tcp = match tokio::time::timeout(STREAM_SETUP, TcpStream::connect(&spec.local)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                tracing::warn!(%name, local = %spec.local, "cannot reach the local service: {e}");
                return refuse(&mut send, &mut recv, codes::SERVICE_UNAVAILABLE);
            }
            Err(_) => {
                tracing::warn!(%name, local = %spec.local, "the local service did not accept in time");
                return refuse(&mut send, &mut recv, codes::SERVICE_UNAVAILABLE);
            }
        };
        let outcome = copy::splice(tcp, send, recv).await;
        // Seen from this side, "in" is what the forwarder sent, which went up from the local
        // service's point of view as "down".
        guard.moved(outcome.down, outcome.up);
        tracing::debug!(%name, up = outcome.up, down = outcome.down, failure = ?outcome.failure, "stream done");
    }
}
