//! `p2ptun netcheck`'s port-mapping probe: asks the gateway with each protocol at once, each
//! for a port of its own (so that the answers cannot collide in the gateway's table), reports
//! which answered and with what public address, and deletes what was granted.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use serde::Serialize;

use super::client::request;
use super::{applies_to, gateway, Mode, Protocol, Transport};

/// What one protocol did.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    /// The protocol.
    pub protocol: Protocol,
    /// Whether the gateway granted a mapping with it.
    pub answered: bool,
    /// The public address it mapped.
    pub external: Option<SocketAddr>,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// How long the answer (or the give-up) took.
    pub ms: u64,
}

/// Probes the protocols of `mode` for a socket bound at `bound` (nothing for a loopback
/// socket or [`Mode::Off`]). Takes at most about [`super::PROTOCOL_TIMEOUT`] twice (the
/// mapping, then its deletion).
pub async fn probe(mode: Mode, bound: IpAddr) -> Vec<ProbeResult> {
    if !applies_to(SocketAddr::new(bound, 0)) {
        return Vec::new();
    }
    let target = gateway::target(bound);
    let runs = mode.protocols().iter().map(|&protocol| {
        let target = target.as_ref().map(|t| *t).map_err(|e| e.to_string());
        async move {
            let started = Instant::now();
            let result = match target {
                Err(e) => Err(e),
                Ok(target) => probe_one(protocol, target).await,
            };
            let ms = started.elapsed().as_millis() as u64;
            match result {
                Ok(external) => ProbeResult {
                    protocol,
                    answered: true,
                    external: Some(external),
                    error: None,
                    ms,
                },
                Err(e) => ProbeResult {
                    protocol,
                    answered: false,
                    external: None,
                    error: Some(e),
                    ms,
                },
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (i, run) in runs.enumerate() {
        tasks.spawn(async move { (i, run.await) });
    }
    let mut out: Vec<(usize, ProbeResult)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(r) = done {
            out.push(r);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

async fn probe_one(protocol: Protocol, target: gateway::Target) -> Result<SocketAddr, String> {
    // A socket of our own holds the port while it is mapped.
    let socket = tokio::net::UdpSocket::bind(SocketAddr::from((target.local, 0)))
        .await
        .map_err(|e| format!("cannot bind a probe socket: {e}"))?;
    let port = socket
        .local_addr()
        .map_err(|e| format!("probe socket: {e}"))?
        .port();
    let lease = request(protocol, target, Transport::Udp, port)
        .await
        .map_err(|e| e.to_string())?;
    let external = lease.mapping.external;
    if let Err(e) = lease.delete().await {
        tracing::warn!(%protocol, %external, "cannot delete the probe's mapping: {e}");
    }
    Ok(external)
}
