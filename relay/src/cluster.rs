//! S as one member of a cluster that shares an etcd ([`crate::etcd`]): who owns which name
//! cluster-wide, which S each agent is registered with, and which S are up.
//!
//! Keys (under [`PREFIX`]):
//! - `names/NAME` = the owner's fingerprint. Written by a transaction that creates it only
//!   if it is absent, so two S can never hand one name to two keys; no lease (a claim
//!   outlives every S).
//! - `members/FINGERPRINT` = this S's public address and key fingerprint (JSON), under this
//!   S's lease of [`LEASE_TTL`] seconds, which a task renews every [`RENEW_EVERY`].
//! - `presence/FINGERPRINT` = the agent's home S and the names it exposes (JSON), under the
//!   same lease: written when the agent registers, deleted when its connection ends, and
//!   gone with the lease when this S dies.
//!
//! When etcd cannot be reached, S goes on serving the agents registered with it and their
//! sessions. A claim needs etcd, except that an agent may register again with names this S
//! saw confirmed for its key (a reconnect after a blip); other claims are refused with an
//! error that says why, and work again as soon as etcd answers. Lost presence and
//! membership are written again when the lease has to be renewed from scratch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2ptun::proto::{Fingerprint, ServerInfo};
use serde::{Deserialize, Serialize};

use crate::etcd::{Compare, Etcd, EtcdError, Op};

/// Where p2ptun's keys live in etcd.
pub const PREFIX: &str = "/p2ptun/v1/";

/// Seconds the lease of a member and its agents' presence lasts without renewal: an S that
/// dies is gone from the cluster's view this long after.
pub const LEASE_TTL: u64 = 10;

/// How often the lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);

/// How long one call to etcd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a claim or a release through the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Another key holds the name.
    #[error("the name '{0}' is held by another identity in this cluster")]
    Taken(String),
    /// Nobody holds the name.
    #[error("nobody holds the name '{0}' in this cluster")]
    Unknown(String),
    /// The owner's agent exposes it right now (on some S of the cluster).
    #[error("the name '{0}' is exposed right now by an agent with its key")]
    InUse(String),
    /// etcd could not be asked.
    #[error("this S cannot reach its etcd cluster ({0})")]
    Unreachable(EtcdError),
}

impl From<EtcdError> for ClusterError {
    fn from(e: EtcdError) -> Self {
        ClusterError::Unreachable(e)
    }
}

/// One S of the cluster, as `members/` holds it (and as agents are told of it).
pub type Member = ServerInfo;

/// An agent's presence, as `presence/` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The S it is registered with.
    pub home: Member,
    /// The names it exposes.
    pub names: Vec<String>,
}

/// This S's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    etcd: Etcd,
    me: Member,
    /// The current lease, 0 until one is granted.
    lease: Mutex<i64>,
    /// The agents registered here now, to write again under a new lease.
    present: Mutex<HashMap<Fingerprint, Presence>>,
    /// Claims this S saw confirmed by etcd, for reconnects while etcd is out of reach.
    confirmed: Mutex<HashMap<String, Fingerprint>>,
    /// The members as last read from etcd, renewed with the lease: what registering agents
    /// are told, without a call to etcd each.
    members: Mutex<Vec<Member>>,
}

fn name_key(name: &str) -> String {
    format!("{PREFIX}names/{name}")
}

fn member_key(fp: &Fingerprint) -> String {
    format!("{PREFIX}members/{fp}")
}

fn presence_key(fp: &Fingerprint) -> String {
    format!("{PREFIX}presence/{fp}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// This S (`me`) in the cluster of `etcd`: joins it when etcd answers (now, or later in
    /// [`Cluster::run`]) and starts nothing yet.
    pub fn new(etcd: Etcd, me: Member) -> Arc<Cluster> {
        Arc::new(Cluster {
            etcd,
            me,
            lease: Mutex::new(0),
            present: Mutex::default(),
            confirmed: Mutex::default(),
            members: Mutex::default(),
        })
    }

    /// The etcd endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.etcd.endpoints()
    }

    /// This S's lease, a new one if it has none or lost it, with its membership and its
    /// agents' presence written under it.
    async fn join(&self) -> Result<i64, EtcdError> {
        let lease = self.etcd.grant(LEASE_TTL).await?;
        // Known before the agents present now are written: one that arrives from here on
        // writes itself under it, one that arrived before is in the list below.
        *lock(&self.lease) = lease;
        let me = serde_json::to_vec(&self.me).unwrap_or_default();
        let written = async {
            self.etcd
                .put(&member_key(&self.me.fingerprint), &me, Some(lease))
                .await?;
            let present: Vec<(Fingerprint, Presence)> = lock(&self.present)
                .iter()
                .map(|(fp, p)| (*fp, p.clone()))
                .collect();
            for (fp, p) in present {
                let value = serde_json::to_vec(&p).unwrap_or_default();
                self.etcd
                    .put(&presence_key(&fp), &value, Some(lease))
                    .await?;
            }
            Ok(())
        };
        if let Err(e) = written.await {
            // Joined again from scratch next time.
            *lock(&self.lease) = 0;
            return Err(e);
        }
        Ok(lease)
    }

    /// Keeps this S's lease alive until the task is aborted, joining again when it is lost,
    /// and logs when etcd goes out of reach and when it is back.
    pub async fn run(self: Arc<Self>) {
        let mut reachable = None;
        loop {
            let lease = *lock(&self.lease);
            let renewed = if lease == 0 {
                self.join().await.map(|_| ())
            } else {
                match self.etcd.keep_alive(lease).await {
                    Ok(ttl) if ttl > 0 => Ok(()),
                    // Expired while etcd was out of reach: everything under it is gone.
                    Ok(_) => {
                        tracing::warn!("the cluster lease expired; joining again");
                        self.join().await.map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            };
            match (&renewed, reachable) {
                (Ok(()), Some(false) | None) => tracing::info!(
                    member = %self.me.addr,
                    etcd = ?self.etcd.endpoints(),
                    "in the cluster: etcd answers"
                ),
                (Err(e), Some(true) | None) => tracing::warn!(
                    error = %e,
                    "etcd is out of reach: registered agents are served, new name claims are \
                     refused until it answers"
                ),
                _ => {}
            }
            reachable = Some(renewed.is_ok());
            if renewed.is_ok() {
                match self.members().await {
                    Ok(members) => *lock(&self.members) = members,
                    Err(e) => tracing::debug!(error = %e, "members not read"),
                }
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Claims every one of `names` for `owner`, or none.
    pub async fn claim(&self, names: &[String], owner: Fingerprint) -> Result<(), ClusterError> {
        if names.is_empty() {
            return Ok(());
        }
        let owner_bytes = owner.to_string().into_bytes();
        match self.try_claim(names, &owner_bytes).await {
            Err(ClusterError::Unreachable(e)) => {
                let confirmed = lock(&self.confirmed);
                if names.iter().all(|n| confirmed.get(n) == Some(&owner)) {
                    tracing::info!(agent = %owner, ?names, error = %e, "etcd is out of reach; the names were confirmed for this key before");
                    return Ok(());
                }
                Err(ClusterError::Unreachable(e))
            }
            Err(e) => Err(e),
            Ok(()) => {
                let mut confirmed = lock(&self.confirmed);
                for n in names {
                    confirmed.insert(n.clone(), owner);
                }
                Ok(())
            }
        }
    }

    async fn try_claim(&self, names: &[String], owner: &[u8]) -> Result<(), ClusterError> {
        // A race with another S's claim of a new name ends the transaction unapplied: read
        // again, and the other owner shows. Twice is enough for that; more would be a loop.
        for _ in 0..3 {
            let mut compare = Vec::new();
            let mut puts = Vec::new();
            for name in names {
                let key = name_key(name);
                match self.etcd.get(&key).await? {
                    Some(kv) if kv.value != owner => {
                        return Err(ClusterError::Taken(name.clone()));
                    }
                    Some(_) => compare.push(Compare::ValueIs(key, owner.to_vec())),
                    None => {
                        compare.push(Compare::Absent(key.clone()));
                        puts.push(Op::Put {
                            key,
                            value: owner.to_vec(),
                            lease: None,
                        });
                    }
                }
            }
            if puts.is_empty() || self.etcd.txn(&compare, &puts).await? {
                return Ok(());
            }
        }
        Err(ClusterError::Unreachable(EtcdError::Malformed(
            "claims kept changing under the transaction".into(),
        )))
    }

    /// Gives `name` back on behalf of `owner`, unless another key holds it or an agent of
    /// `owner` exposes it right now on any S of the cluster.
    pub async fn release(&self, name: &str, owner: Fingerprint) -> Result<(), ClusterError> {
        let key = name_key(name);
        let owner_bytes = owner.to_string().into_bytes();
        match self.etcd.get(&key).await? {
            None => return Err(ClusterError::Unknown(name.to_owned())),
            Some(kv) if kv.value != owner_bytes => {
                return Err(ClusterError::Taken(name.to_owned()))
            }
            Some(_) => {}
        }
        if let Some(p) = self.presence(&owner).await? {
            if p.names.iter().any(|n| n == name) {
                return Err(ClusterError::InUse(name.to_owned()));
            }
        }
        if !self
            .etcd
            .txn(
                &[Compare::ValueIs(key.clone(), owner_bytes)],
                &[Op::Delete(key)],
            )
            .await?
        {
            return Err(ClusterError::Taken(name.to_owned()));
        }
        lock(&self.confirmed).remove(name);
        Ok(())
    }

    /// Who holds `name`, cluster-wide.
    pub async fn owner(&self, name: &str) -> Result<Option<Fingerprint>, ClusterError> {
        let kv = self.etcd.get(&name_key(name)).await?;
        Ok(kv.and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok()))
    }

    /// Where `agent` is registered, if anywhere.
    pub async fn presence(&self, agent: &Fingerprint) -> Result<Option<Presence>, ClusterError> {
        let kv = self.etcd.get(&presence_key(agent)).await?;
        Ok(kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    /// The S of the cluster that are up.
    pub async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let kvs = self.etcd.get_prefix(&format!("{PREFIX}members/")).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// The members as last read (at most [`RENEW_EVERY`] old while etcd answers), with this
    /// S among them even before the first read.
    pub fn known_members(&self) -> Vec<Member> {
        let mut members = lock(&self.members).clone();
        if !members.contains(&self.me) {
            members.insert(0, self.me.clone());
        }
        members
    }

    /// This S, as the cluster knows it.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Records that `agent` is registered here exposing `names`. Best effort: without etcd
    /// it is written when the lease is renewed from scratch.
    ///
    /// An agent exposing nothing here has no presence: presence only says where a name is
    /// served, and such an agent may be homed on another S and only visiting this one to
    /// reach a name (its presence there must stay).
    pub async fn arrived(&self, agent: Fingerprint, names: Vec<String>) {
        if names.is_empty() {
            self.left(agent).await;
            return;
        }
        let presence = Presence {
            home: self.me.clone(),
            names,
        };
        let value = serde_json::to_vec(&presence).unwrap_or_default();
        lock(&self.present).insert(agent, presence);
        let lease = *lock(&self.lease);
        if lease != 0 {
            if let Err(e) = self
                .etcd
                .put(&presence_key(&agent), &value, Some(lease))
                .await
            {
                tracing::debug!(%agent, error = %e, "presence not written");
            }
        }
    }

    /// Records that `agent` left this S (or exposes nothing here any more). The presence is
    /// deleted only if it is still the one this S wrote: the agent may have moved to another
    /// S already, whose presence must stay.
    pub async fn left(&self, agent: Fingerprint) {
        let Some(mine) = lock(&self.present).remove(&agent) else {
            return;
        };
        let key = presence_key(&agent);
        let written = serde_json::to_vec(&mine).unwrap_or_default();
        let delete = self
            .etcd
            .txn(
                &[Compare::ValueIs(key.clone(), written)],
                &[Op::Delete(key)],
            )
            .await;
        if let Err(e) = delete {
            tracing::debug!(%agent, error = %e, "presence not deleted");
        }
    }

    /// Leaves the cluster (S is stopping): its membership and its agents' presence go at once
    /// rather than when the lease runs out.
    pub async fn leave(&self) {
        let lease = std::mem::take(&mut *lock(&self.lease));
        if lease != 0 {
            let _ = self.etcd.revoke(lease).await;
        }
    }
}
