//! What S shares between all control connections: the registered agents as the directory
//! and the relay sessions hold them ([`Agent`]), and the state every connection reads and
//! writes ([`Shared`]). The control connections ([`crate::control`]) fill it in; relaying
//! ([`crate::forward`]) reads it. Neither imports the other for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use p2ptun::path::canonical;
use p2ptun::proto::relay as wire;
use p2ptun::proto::{Candidate, Fingerprint, NatMapping, ServerMsg};
use quinn::Connection;
use tokio::sync::mpsc;

use crate::cluster::Cluster;
use crate::config::RelayBudgets;
use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::names::{NameRegistry, NamesError, Saved};
use crate::relay::{Party, Sessions};
use crate::token::Tokens;

/// The relay party number of a connection that has not registered: registration numbers
/// start at 1, so it is nobody's, and its packets are dropped as not a session's.
pub const UNREGISTERED: u64 = 0;

/// How an agent's control connection reaches S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// QUIC over UDP: the connection's own remote address is the agent's.
    Udp,
    /// QUIC framed on a TCP connection; the QUIC connection only sees a virtual address.
    Tcp {
        /// The TCP peer: the agent's address as S sees it.
        peer: SocketAddr,
        /// S's address the TCP connection reached.
        local: SocketAddr,
    },
}

impl Carrier {
    /// Where the agent's packets come from, as S sees it: the agent's server-reflexive
    /// address, and its source for limits. Read anew each time for UDP, where the
    /// connection migrates when the agent's NAT mapping changes.
    pub fn remote(self, conn: &Connection) -> SocketAddr {
        match self {
            Carrier::Udp => canonical(conn.remote_address()),
            Carrier::Tcp { peer, .. } => peer,
        }
    }

    /// S's address the agent's packets reach, when known (canonical: an IPv4 address that
    /// reached the dual-stack socket in its IPv4 form).
    pub fn local_ip(self, conn: &Connection) -> Option<IpAddr> {
        match self {
            Carrier::Udp => conn.local_ip().map(|ip| ip.to_canonical()),
            Carrier::Tcp { local, .. } => Some(local.ip()),
        }
    }
}

/// What S shares between all connections.
#[derive(Debug)]
pub struct Shared {
    /// The tokens agents must show.
    pub tokens: Tokens,
    /// Who owns which name.
    pub names: Mutex<NameRegistry>,
    /// Who is online.
    pub directory: Mutex<Directory<Agent>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where the alternate STUN socket is bound.
    pub stun_alt: SocketAddr,
    /// The relay sessions.
    pub relay: Mutex<Sessions<Agent>>,
    /// The cluster this S is a member of, if any: then names are claimed there, not in
    /// `names`.
    pub cluster: Option<Arc<Cluster>>,
    next_registration: AtomicU64,
    /// Counts the relayed packets S split (their fragments' packet numbers).
    splits: AtomicU32,
}

impl Shared {
    /// State for an S with these parts.
    pub fn new(
        tokens: Tokens,
        names: NameRegistry,
        metrics: Arc<Metrics>,
        stun_alt: SocketAddr,
        budgets: RelayBudgets,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Shared {
            tokens,
            names: Mutex::new(names),
            directory: Mutex::new(Directory::default()),
            metrics,
            stun_alt,
            relay: Mutex::new(Sessions::new(budgets)),
            cluster,
            next_registration: AtomicU64::new(UNREGISTERED + 1),
            splits: AtomicU32::new(0),
        }
    }

    /// A new registration number (relay party number), never [`UNREGISTERED`].
    pub fn next_registration(&self) -> u64 {
        self.next_registration.fetch_add(1, Ordering::Relaxed)
    }

    /// The packet number for the next relayed packet S splits.
    pub fn next_split(&self) -> u32 {
        wire::packet_number(self.splits.fetch_add(1, Ordering::Relaxed), true)
    }

    /// The relay sessions (the lock is never held across an await).
    pub fn relay(&self) -> MutexGuard<'_, Sessions<Agent>> {
        self.relay.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The online agents (the lock is never held across an await).
    pub fn directory(&self) -> MutexGuard<'_, Directory<Agent>> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who owns which name (the lock is never held across an await). Whoever holds both
    /// takes this one first, then [`Shared::directory`]'s.
    pub(crate) fn names(&self) -> MutexGuard<'_, NameRegistry> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the use of every name exposed now and gives up the names unused for longer
    /// than the expiry ([`NameRegistry::expire`]), at `now`.
    ///
    /// The exposed names are read before the registry is locked, not under it: a name
    /// registered in between was recorded as used by its claim, so it cannot expire.
    pub async fn sweep_names(self: &Arc<Self>, now: SystemTime) {
        let exposed = self.directory().names();
        let (expired, saved) = self.names().expire(now, |name| exposed.contains(name));
        match self.names_saved(saved).await {
            Ok(()) => Metrics::add(&self.metrics.names_expired_total, expired.len() as u64),
            Err(e) => tracing::error!(
                error = %e,
                "cannot save the names' last uses and expiries; trying again at the next sweep"
            ),
        }
    }

    /// Waits until a change to the names is on disk. If it could not be saved, the
    /// registry is put back to what is on disk ([`NameRegistry::recover`], on a thread that
    /// may block) before the error is returned: what is not saved is not granted.
    pub(crate) async fn names_saved(self: &Arc<Self>, saved: Saved) -> Result<(), NamesError> {
        let failed = match saved.wait().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let shared = Arc::clone(self);
        let recovered = tokio::task::spawn_blocking(move || shared.names().recover()).await;
        match recovered {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot recover the name registry"),
            Err(e) => tracing::error!(error = %e, "the name registry's recovery failed"),
        }
        Err(failed)
    }
}

/// A registered agent, as the directory and the relay sessions keep it.
#[derive(Debug)]
pub struct Agent {
    /// Its identity.
    pub(crate) fingerprint: Fingerprint,
    /// Its registration number (its relay party number).
    pub(crate) registration: u64,
    /// What the agent registered with, or sent later (`UpdateCandidates`).
    pub(crate) candidates: Mutex<Vec<Candidate>>,
    /// How its NAT maps, as it reported.
    pub(crate) nat: NatMapping,
    pub(crate) conn: Connection,
    pub(crate) carrier: Carrier,
    pub(crate) push: mpsc::Sender<ServerMsg>,
}

/// How long a push may wait for room in a full queue before it is given up.
const PUSH_WAIT: Duration = Duration::from_secs(10);

impl Agent {
    /// The agent's control connection.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The agent's address as S sees it.
    pub fn remote(&self) -> SocketAddr {
        self.carrier.remote(&self.conn)
    }

    /// Queues `msg` for the agent's registration stream. Never waits: when the queue is
    /// full, a task waits for room a while (an agent that reads nothing for that long is
    /// disconnected by its stream's write timeout anyway).
    pub fn push(&self, msg: ServerMsg) {
        match self.push.try_send(msg) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let push = self.push.clone();
                tokio::spawn(async move {
                    let _ = push.send_timeout(msg, PUSH_WAIT).await;
                });
            }
        }
    }

    /// The agent as a party of relay sessions.
    pub(crate) fn party(self: &Arc<Self>) -> Party<Agent> {
        Party {
            id: self.registration,
            ip: self.remote().ip(),
            agent: Arc::clone(self),
        }
    }
}
