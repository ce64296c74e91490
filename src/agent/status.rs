//! The agent's status: what it is connected to, over which path, and how it is doing.
//!
//! A running agent answers `p2ptun status` on its Unix socket ([`super::socket`]) with a
//! [`snapshot`]; [`render`] prints what every agent of a state directory said.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

pub use super::activity::Role;
use super::ctx::{Ctx, Protocol};
use super::link::Links;
use crate::path::PathStatus;
use crate::tunnel::flow::FlowCounts;

/// The status an agent reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The agent's process ID.
    pub pid: u32,
    /// Its fingerprint.
    pub id: String,
    /// S's address.
    pub server: String,
    /// Whether it is registered with S now.
    pub registered: bool,
    /// Its address as S sees it (of the control connection's family).
    pub public: Option<SocketAddr>,
    /// Its reflexive address in the other family (IPv6 when `public` is IPv4, or the other
    /// way round), if S has an address there.
    #[serde(default)]
    pub public_other: Option<SocketAddr>,
    /// What carries the control connection to S: `udp` or `tcp`.
    #[serde(default)]
    pub control_over: Option<String>,
    /// Its peers.
    pub peers: Vec<PeerReport>,
    /// Its services.
    pub services: Vec<ServiceReport>,
    /// The port mappings the gateway granted it (UPnP, NAT-PMP or PCP).
    #[serde(default)]
    pub portmap: Vec<crate::portmap::Mapping>,
}

/// One peer in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerReport {
    /// The peer's fingerprint.
    pub fingerprint: String,
    /// Whether we expose to it or forward to it.
    pub role: Role,
    /// The services the connection carries.
    pub names: Vec<String>,
    /// Whether the QUIC connection is alive.
    pub connected: bool,
    /// The path in use: kind (`direct_udp`), remote address, RTT, time on it.
    pub path: Option<PathStatus>,
    /// Every known path, live or not.
    #[serde(default)]
    pub paths: Vec<PathStatus>,
    /// QUIC's smoothed RTT estimate in milliseconds.
    pub rtt_ms: f64,
    /// Bytes sent to the peer (UDP payloads).
    pub tx_bytes: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Fresh introductions the link asked for (or took) after the first, to get back to a
    /// direct path.
    #[serde(default)]
    pub repunches: u64,
    /// Seconds until the link's next re-punch, while it is not on direct UDP.
    #[serde(default)]
    pub next_repunch_in_secs: Option<u64>,
}

/// One service in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceReport {
    /// The service name.
    pub name: String,
    /// Exposed or forwarded.
    pub role: Role,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// Streams open now (for UDP: flows, each of which is a stream).
    pub open_streams: u64,
    /// Streams since start (for UDP: flows).
    pub total_streams: u64,
    /// Bytes from local TCP clients into the tunnel (finished streams); for UDP, bytes of
    /// the datagrams from the local side.
    pub bytes_in: u64,
    /// Bytes from the tunnel to local TCP clients (finished streams); for UDP, bytes of the
    /// datagrams to the local side.
    pub bytes_out: u64,
    /// A UDP service's datagram counters.
    #[serde(default)]
    pub udp: Option<FlowCounts>,
}

/// A snapshot of `ctx`'s status, with what `links` show of each peer.
pub fn snapshot(ctx: &Ctx, links: &Links) -> Status {
    let registration = ctx.registration.borrow().clone();
    let table = ctx.router.socket().table_read();
    let peers = ctx.activity.peers.lock().unwrap_or_else(|e| e.into_inner());
    let mut peer_reports: Vec<PeerReport> = peers
        .iter()
        .map(|(fp, entry)| {
            let paths = table.status(entry.conn.remote_address());
            let link = links.get(*fp).map(|l| l.view()).unwrap_or_default();
            PeerReport {
                fingerprint: fp.to_string(),
                role: entry.role,
                names: entry.names.iter().cloned().collect(),
                connected: entry.conn.close_reason().is_none(),
                path: paths.as_ref().and_then(|p| p.path.clone()),
                paths: paths.as_ref().map(|p| p.paths.clone()).unwrap_or_default(),
                rtt_ms: entry.conn.rtt().as_secs_f64() * 1000.0,
                tx_bytes: paths.as_ref().map_or(0, |p| p.tx_bytes),
                rx_bytes: paths.as_ref().map_or(0, |p| p.rx_bytes),
                repunches: link.repunches,
                next_repunch_in_secs: link.next_repunch_in,
            }
        })
        .collect();
    peer_reports.sort_by(|a, b| (a.role, &a.names).cmp(&(b.role, &b.names)));
    let mut services: Vec<ServiceReport> = ctx
        .activity
        .services
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|((role, name), c)| ServiceReport {
            name: name.clone(),
            role: *role,
            protocol: Protocol::Tcp,
            open_streams: c.open.load(Ordering::Relaxed),
            total_streams: c.total.load(Ordering::Relaxed),
            bytes_in: c.up.load(Ordering::Relaxed),
            bytes_out: c.down.load(Ordering::Relaxed),
            udp: None,
        })
        .collect();
    services.extend(
        ctx.activity
            .flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((role, name), stats)| {
                let c = stats.counts();
                ServiceReport {
                    name: name.clone(),
                    role: *role,
                    protocol: Protocol::Udp,
                    open_streams: c.open,
                    total_streams: c.total,
                    bytes_in: c.from_local_bytes,
                    bytes_out: c.to_local_bytes,
                    udp: Some(c),
                }
            }),
    );
    Status {
        pid: std::process::id(),
        id: ctx.identity.fingerprint().to_string(),
        // The home among the servers given, once there is one.
        server: registration
            .as_ref()
            .map_or_else(|| ctx.opts.server.clone(), |r| r.name.clone()),
        registered: registration.is_some(),
        public: registration.as_ref().map(|r| r.observed),
        public_other: registration.as_ref().and_then(|r| r.observed_other),
        control_over: registration
            .as_ref()
            .map(|r| if r.over_udp { "udp" } else { "tcp" }.to_owned()),
        peers: peer_reports,
        services,
        portmap: ctx.portmap.borrow().clone(),
    }
}

/// Renders statuses as a human-readable table.
pub fn render(statuses: &[Status]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if statuses.is_empty() {
        out.push_str("no p2ptun agent is running with this state directory\n");
    }
    for s in statuses {
        let _ = writeln!(
            out,
            "agent {} (pid {})  S {}  {}{}",
            s.id,
            s.pid,
            s.server,
            if s.registered {
                "registered"
            } else {
                "NOT registered"
            },
            [s.public, s.public_other]
                .into_iter()
                .flatten()
                .map(|p| format!(", public {p}"))
                .collect::<String>()
                + &s.control_over
                    .as_deref()
                    .map(|c| format!(", over {c}"))
                    .unwrap_or_default()
        );
        for m in &s.portmap {
            let _ = writeln!(
                out,
                "  port mapping ({}, {:?}): {} -> {}, lease {}s",
                m.protocol, m.transport, m.external, m.internal, m.lifetime_secs
            );
        }
        if !s.peers.is_empty() {
            let _ = writeln!(
                out,
                "  {:<8} {:<20} {:<14} {:<24} {:>9} {:>8} {:>12} {:>12}",
                "ROLE", "NAMES", "PATH", "REMOTE", "RTT", "ON PATH", "SENT", "RECEIVED"
            );
        }
        for p in &s.peers {
            let (kind, remote, age) = match &p.path {
                Some(path) => (
                    format!(
                        "{}{}",
                        path.kind,
                        if path.remote.is_ipv6() { " v6" } else { "" }
                    ),
                    path.remote.to_string(),
                    format!("{}s", path.age_secs),
                ),
                None => ("none".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                out,
                "  {:<8} {:<20} {:<14} {:<24} {:>7.2}ms {:>8} {:>12} {:>12}{}",
                match p.role {
                    Role::Expose => "expose",
                    Role::Forward => "forward",
                },
                p.names.join(","),
                kind,
                remote,
                p.rtt_ms,
                age,
                p.tx_bytes,
                p.rx_bytes,
                if p.connected { "" } else { "  (closed)" }
            );
            if let Some(secs) = p.next_repunch_in_secs {
                let _ = writeln!(
                    out,
                    "  {:<8} not on a direct path: re-punch in {secs}s ({} so far)",
                    "", p.repunches
                );
            }
        }
        for svc in &s.services {
            let role = match svc.role {
                Role::Expose => "expose",
                Role::Forward => "forward",
            };
            let Some(udp) = &svc.udp else {
                let _ = writeln!(
                    out,
                    "  service {:<20} {:<7} streams open {:>5}, total {:>7}, bytes in {:>12}, out {:>12}",
                    svc.name, role, svc.open_streams, svc.total_streams, svc.bytes_in, svc.bytes_out
                );
                continue;
            };
            let _ = writeln!(
                out,
                "  service {:<20} {:<7} udp flows open {:>5}, total {:>7}, datagrams in {:>9} ({} B), out {:>9} ({} B)",
                svc.name, role, udp.open, udp.total, udp.from_local, udp.from_local_bytes, udp.to_local, udp.to_local_bytes
            );
            let _ = writeln!(
                out,
                "  {:<36} tunnel sent {:>9}, received {:>9}; dropped in {} too large, {} other; dropped out {}",
                "", udp.to_tunnel, udp.from_tunnel, udp.too_large, udp.dropped_in, udp.dropped_out
            );
        }
    }
    out
}
