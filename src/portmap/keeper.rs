//! The agent's port mappings over its lifetime: obtained in the background when it starts,
//! renewed before they lapse, deleted when it exits cleanly. The current mappings are
//! published on a watch channel, from which the agent builds its candidates.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::{request, Lease};
use super::{applies_to, gateway, renew_in, retry_in, Mapping, Mode, Transport};

/// After no protocol granted a mapping (or every lease was lost), how long until the next
/// try: gateways rarely change their mind, and every try costs a little traffic on the LAN.
pub const RETRY_DISCOVERY: Duration = Duration::from_secs(300);

/// The running keeper; [`Keeper::shutdown`] deletes its mappings.
pub struct Keeper {
    mappings: watch::Receiver<Vec<Mapping>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Starts keeping mappings of the UDP socket at `udp` (and of the TCP punching port at
    /// `tcp`) as `mode` allows. Does nothing for [`Mode::Off`] or a loopback socket (see
    /// [`applies_to`]). Returns at once.
    pub fn start(mode: Mode, udp: SocketAddr, tcp: Option<SocketAddr>) -> Keeper {
        let (tx, mappings) = watch::channel(Vec::new());
        let (stop, stop_rx) = watch::channel(false);
        let task = (mode != Mode::Off && applies_to(udp))
            .then(|| tokio::spawn(run(mode, udp, tcp, tx, stop_rx)));
        if task.is_none() {
            tracing::debug!(?mode, %udp, "no port mapping (turned off, or a loopback socket)");
        }
        Keeper {
            mappings,
            stop,
            task,
        }
    }

    /// The mappings as they change.
    pub fn mappings(&self) -> watch::Receiver<Vec<Mapping>> {
        self.mappings.clone()
    }

    /// Stops renewing and deletes the mappings on the gateway, waiting at most `within`.
    pub async fn shutdown(mut self, within: Duration) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(within, task).await.is_err() {
                tracing::warn!("port mappings not confirmed deleted within {within:?}; they lapse on their own");
            }
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // Without a clean shutdown the leases lapse on the gateway by themselves.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One lease and its schedule.
struct Held {
    lease: Lease,
    renew_at: Instant,
    expires_at: Instant,
}

impl Held {
    fn new(lease: Lease) -> Held {
        let now = Instant::now();
        let lifetime = Duration::from_secs(lease.mapping.lifetime_secs.into());
        Held {
            renew_at: now + renew_in(lifetime),
            expires_at: now + lifetime,
            lease,
        }
    }
}

async fn run(
    mode: Mode,
    udp: SocketAddr,
    tcp: Option<SocketAddr>,
    tx: watch::Sender<Vec<Mapping>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let held = tokio::select! {
            held = obtain(mode, udp, tcp) => held,
            _ = stop.changed() => return,
        };
        if !held.is_empty() {
            let publish = |held: &[Held]| {
                tx.send_replace(held.iter().map(|h| h.lease.mapping).collect());
            };
            publish(&held);
            let stopping = keep(held, &publish, &mut stop).await;
            tx.send_replace(Vec::new());
            if stopping {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DISCOVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Tries the protocols of `mode` in turn until one maps the UDP port; maps the TCP port with
/// the same one. Tried one after another, not at once: NAT-PMP, PCP and UPnP on one gateway
/// often share one table, and two protocols granting the same port would make deleting one
/// delete the other's.
async fn obtain(mode: Mode, udp: SocketAddr, tcp: Option<SocketAddr>) -> Vec<Held> {
    let target = match gateway::target(udp.ip()) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!("no port mapping: {e}");
            return Vec::new();
        }
    };
    let mut failures = Vec::new();
    for &protocol in mode.protocols() {
        let started = Instant::now();
        match request(protocol, target, Transport::Udp, udp.port()).await {
            Ok(lease) => {
                tracing::info!(
                    %protocol, external = %lease.mapping.external, internal = %lease.mapping.internal,
                    lifetime_s = lease.mapping.lifetime_secs,
                    ms = started.elapsed().as_millis() as u64,
                    "the gateway mapped the UDP port"
                );
                let mut held = vec![Held::new(lease)];
                if let Some(tcp) = tcp {
                    match request(protocol, target, Transport::Tcp, tcp.port()).await {
                        Ok(lease) => {
                            tracing::info!(%protocol, external = %lease.mapping.external, "the gateway mapped the TCP punching port");
                            held.push(Held::new(lease));
                        }
                        Err(e) => tracing::debug!(%protocol, "no TCP port mapping: {e}"),
                    }
                }
                return held;
            }
            Err(e) => {
                tracing::debug!(%protocol, gateway = %target.gateway, "no port mapping: {e}");
                failures.push(e.to_string());
            }
        }
    }
    tracing::info!(gateway = %target.gateway, "no port mapping: {}", failures.join("; "));
    Vec::new()
}

/// Renews the leases until all are lost (returns false) or `stop` fires (deletes them and
/// returns true).
async fn keep(
    mut held: Vec<Held>,
    publish: &impl Fn(&[Held]),
    stop: &mut watch::Receiver<bool>,
) -> bool {
    while !held.is_empty() {
        let next = held
            .iter()
            .map(|h| h.renew_at)
            .min()
            .unwrap_or_else(Instant::now);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => {
                delete_all(held).await;
                return true;
            }
        }
        let now = Instant::now();
        let mut changed = false;
        let mut kept = Vec::with_capacity(held.len());
        for mut h in held {
            if h.renew_at > now {
                kept.push(h);
                continue;
            }
            let before = h.lease.mapping;
            match h.lease.renew().await {
                Ok(()) => {
                    changed |= h.lease.mapping != before;
                    kept.push(Held::new(h.lease));
                }
                Err(e) if h.expires_at > Instant::now() => {
                    let left = h.expires_at - Instant::now();
                    tracing::warn!(external = %before.external, "cannot renew the port mapping ({e}); retrying");
                    h.renew_at = Instant::now() + retry_in(left);
                    kept.push(h);
                }
                Err(e) => {
                    tracing::warn!(external = %before.external, "the port mapping lapsed: {e}");
                    changed = true;
                }
            }
        }
        held = kept;
        if changed {
            publish(&held);
        }
    }
    false
}

async fn delete_all(held: Vec<Held>) {
    let mut tasks = tokio::task::JoinSet::new();
    for h in held {
        tasks.spawn(async move {
            let external = h.lease.mapping.external;
            match h.lease.delete().await {
                Ok(()) => tracing::info!(%external, "deleted the port mapping"),
                Err(e) => tracing::warn!(%external, "cannot delete the port mapping: {e}"),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
