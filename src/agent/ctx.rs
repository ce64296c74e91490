//! What every part of a running agent shares: its options, identity, socket, endpoint and
//! registration ([`Ctx`]). Nothing here acts; the modules that do take a `Ctx`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::activity::Activity;
use super::registration::Registered;
use super::relay::RelaySessions;
use crate::proto::{Candidate, CandidateKind, Fingerprint, MAX_CANDIDATES};
use crate::punch::candidates::{host_candidates, interleave, Families};
use crate::punch::StunRouter;
use crate::tunnel::flow::{Demuxes, FlowLimits};
use crate::tunnel::Identity;

/// What a service carries.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP connections, each a QUIC stream.
    #[default]
    Tcp,
    /// UDP datagrams, in flows per client (see [`crate::tunnel::flow`]).
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A local service to expose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeSpec {
    /// The name to expose it under.
    pub name: String,
    /// Where it listens, `HOST:PORT`.
    pub local: String,
    /// Forwarders allowed to use it; empty allows every agent S introduces.
    pub allow: Vec<Fingerprint>,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// How its flows are kept, if it is UDP.
    pub flows: FlowLimits,
}

/// A local port to forward to a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The name to reach.
    pub name: String,
    /// Where to listen locally.
    pub bind: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// How its flows are kept, if it is UDP.
    pub flows: FlowLimits,
}

impl ForwardSpec {
    /// How logs and messages name it: `forward NAME on ADDR` (`udp ADDR` for UDP).
    pub fn label(&self) -> String {
        match self.protocol {
            Protocol::Tcp => format!("forward {} on {}", self.name, self.bind),
            Protocol::Udp => format!("forward {} on udp {}", self.name, self.bind),
        }
    }
}

/// Everything an agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// S as `HOST:PORT`.
    pub server: String,
    /// The token S requires, if any.
    pub token: Option<String>,
    /// S's expected key; without it S's key is pinned on first use.
    pub server_fingerprint: Option<Fingerprint>,
    /// Where the identity and pins are kept.
    pub state_dir: PathBuf,
    /// Where the agent's UDP socket binds.
    pub bind: SocketAddr,
    /// Services to expose at start; [`Ctx::exposes`] holds them once the agent runs.
    pub exposes: Vec<ExposeSpec>,
    /// Ports to forward.
    pub forwards: Vec<ForwardSpec>,
    /// Which port-mapping protocols to ask the gateway with.
    pub portmap: crate::portmap::Mode,
}

/// What every part of a running agent shares.
pub struct Ctx {
    /// The options it runs with (its services are in `exposes` and [`super::services`]).
    pub opts: AgentOptions,
    /// The services exposed now: what the agent started with, replaced when `up` reloads
    /// its file ([`super::services::Services`] is the one writer).
    pub exposes: watch::Sender<Vec<ExposeSpec>>,
    /// Its identity.
    pub identity: Identity,
    /// The quinn endpoint on its socket.
    pub endpoint: quinn::Endpoint,
    /// STUN dispatch on its socket.
    pub router: Arc<StunRouter>,
    /// The current registration with S.
    pub registration: watch::Receiver<Option<Arc<Registered>>>,
    /// What status reports.
    pub activity: Activity,
    /// Sessions whose packets S relays.
    pub relays: Arc<RelaySessions>,
    /// The TCP punching port, if one could be bound.
    pub tcp: Option<Arc<crate::punch::tcp::TcpPunch>>,
    /// The port mappings the gateway granted (empty until, unless, one is).
    pub portmap: watch::Receiver<Vec<crate::portmap::Mapping>>,
    /// The datagram readers of the peer connections that carry UDP flows.
    pub demuxes: Demuxes,
}

/// The most candidates of the agent's own: [`MAX_CANDIDATES`] less room for the addresses S
/// observed, which [`Registered::with_reflexive`] adds (up to four).
pub const LOCAL_CANDIDATES: usize = MAX_CANDIDATES - 4;

impl Ctx {
    /// The exposed service called `name`, now.
    pub fn expose(&self, name: &str) -> Option<ExposeSpec> {
        self.exposes
            .borrow()
            .iter()
            .find(|e| e.name == name)
            .cloned()
    }

    /// The names exposed now.
    pub fn expose_names(&self) -> Vec<String> {
        self.exposes
            .borrow()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// This agent's own candidates: its interfaces with the UDP port and with the TCP port,
    /// and the gateway's port mappings of both.
    ///
    /// At most [`LOCAL_CANDIDATES`]: S refuses a message with more than [`MAX_CANDIDATES`],
    /// and a host with many interfaces (containers, VPNs) must still register. Port
    /// mappings come first (they are reachable from anywhere), then UDP and TCP host
    /// addresses in turn, in the order the system lists its interfaces.
    pub fn local_candidates(&self) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .portmap
            .borrow()
            .iter()
            .map(|m| m.candidate())
            .collect();
        let udp = self
            .router
            .socket()
            .local()
            .map(host_candidates)
            .unwrap_or_default();
        let tcp = self.tcp.as_ref().map_or_else(Vec::new, |tcp| {
            host_candidates(tcp.local())
                .into_iter()
                .map(|c| Candidate {
                    kind: CandidateKind::TcpHost,
                    ..c
                })
                .collect()
        });
        out.extend(interleave(udp, tcp));
        out.truncate(LOCAL_CANDIDATES);
        out
    }

    /// Every candidate of this agent for an introduction through `reg`: its own and the
    /// addresses S observed.
    pub fn candidates(&self, reg: &Registered) -> Vec<Candidate> {
        reg.with_reflexive(self.local_candidates())
    }

    /// The address families the agent's UDP socket reaches.
    pub fn families(&self) -> Families {
        self.router
            .socket()
            .local()
            .map(Families::of)
            .unwrap_or(Families::V4)
    }
}
