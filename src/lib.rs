//! p2ptun: a peer-to-peer port-forwarding tunnel.
//!
//! One agent exposes a local TCP service under a name; another binds a local port and carries
//! each of its connections, as one stream of a single end-to-end QUIC connection, to that
//! service. The rendezvous server S (crate `p2ptun-relay`) introduces the two agents and tells
//! them where to send; the agents then talk directly. The layers, bottom up:
//!
//! - [`proto`]: wire messages shared with S, their framing, fingerprints and the STUN codec use.
//! - [`path`]: [`path::PathSocket`], the one UDP socket under quinn, and the per-peer path table.
//! - [`punch`]: candidate gathering and connectivity checks that find a working path.
//! - [`portmap`]: port mappings on the gateway (UPnP IGD, NAT-PMP, PCP) as candidates.
//! - [`tunnel`]: identities, TLS, the QUIC endpoint, stream headers and byte copying.
//! - [`agent`]: `expose`, `forward` and `up` orchestration, reconnects and status.
//!
//! Beside them, [`cli`] is the agent's command line and [`gendoc`] the completions and man
//! pages both binaries generate from theirs.

pub mod agent;
pub mod cli;
pub mod config;
pub mod gendoc;
pub mod path;
pub mod portmap;
pub mod proto;
pub mod punch;
pub mod tunnel;
