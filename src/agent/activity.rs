//! What the agent's parts record as they work, for status to report: each peer's live
//! connection and the services it carries, each TCP service's stream counters and each UDP
//! service's flow counters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::proto::Fingerprint;
use crate::tunnel::flow::FlowStats;

/// Live facts the agent's parts record for status.
#[derive(Debug, Default)]
pub struct Activity {
    pub(super) peers: Mutex<HashMap<Fingerprint, PeerEntry>>,
    pub(super) services: Mutex<BTreeMap<(Role, String), Arc<Counters>>>,
    pub(super) flows: Mutex<BTreeMap<(Role, String), Arc<FlowStats>>>,
}

#[derive(Debug)]
pub(super) struct PeerEntry {
    pub(super) role: Role,
    pub(super) names: BTreeSet<String>,
    pub(super) conn: quinn::Connection,
}

/// Which side of a connection or service this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This agent exposes the service; the peer forwards to it.
    Expose,
    /// This agent forwards to the service; the peer exposes it.
    Forward,
}

/// Stream counters of one service.
#[derive(Debug, Default)]
pub struct Counters {
    pub(super) open: AtomicU64,
    pub(super) total: AtomicU64,
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
}

/// Counts one stream as open until dropped.
pub struct StreamGuard(Arc<Counters>);

impl StreamGuard {
    /// Adds the bytes a finished stream moved.
    pub fn moved(&self, up: u64, down: u64) {
        self.0.up.fetch_add(up, Ordering::Relaxed);
        self.0.down.fetch_add(down, Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// Records a live connection to `peer` for service `name`.
    pub fn peer_connected(
        &self,
        peer: Fingerprint,
        role: Role,
        name: &str,
        conn: &quinn::Connection,
    ) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = peers.entry(peer).or_insert_with(|| PeerEntry {
            role,
            names: BTreeSet::new(),
            conn: conn.clone(),
        });
        if entry.conn.stable_id() != conn.stable_id() {
            entry.conn = conn.clone();
        }
        entry.names.insert(name.to_owned());
    }

    /// Counts a new stream of service `name`.
    pub fn stream_opened(&self, role: Role, name: &str) -> StreamGuard {
        let counters = self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((role, name.to_owned()))
            .or_default()
            .clone();
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.total.fetch_add(1, Ordering::Relaxed);
        StreamGuard(counters)
    }

    /// The flow counters of UDP service `name`.
    pub fn flow_stats(&self, role: Role, name: &str) -> Arc<FlowStats> {
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((role, name.to_owned()))
            .or_default()
            .clone()
    }
}
