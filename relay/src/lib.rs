//! p2ptun-relay: the rendezvous server S of p2ptun.
//!
//! Agents connect over QUIC (ALPN `p2ptun/1`), prove their identity key in the handshake,
//! register the names they expose and ask to be introduced to the agent behind a name; S
//! answers each side with the other's fingerprint, candidate addresses, short-term
//! credentials and a common start time, and the agents then punch a direct path. The same
//! UDP port answers STUN, and a second port does too, so agents can learn how their NAT maps.
//! When the agents cannot reach each other directly, S relays their end-to-end encrypted
//! packets, within budgets; and agents whose UDP is blocked reach S over TCP on the same
//! port number.
//!
//! The parts, each in its own module:
//!
//! - [`config`] and [`cli`]: what S is told, from a TOML file and flags.
//! - [`server`]: [`Relay`], binding the sockets and admitting connections.
//! - [`control`]: one agent's control connection (Register, Connect, pushes).
//! - [`names`]: who owns which name, kept on disk; [`directory`]: who is online;
//!   [`cluster`] (on [`etcd`]): names, members and presence shared by the S of a cluster.
//! - [`rendezvous`]: the introduction of two agents (credentials, start time).
//! - [`relay`]: relay sessions and their budgets; [`forward`]: moving relayed packets.
//! - [`tcp`]: QUIC over TCP for agents whose UDP is blocked; [`links`]: the real address
//!   behind each such connection.
//! - [`stun`] and [`stun_server`]: STUN answers and the sockets that carry them.
//! - [`limits`], [`ratelimit`], [`token`]: what a stranger may make S spend, and who may
//!   register.
//! - [`identity`]: the certificate S presents; [`metrics`]: Prometheus counters over HTTP;
//!   [`status`]: the status page beside them.

#![warn(missing_docs)]

pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod directory;
pub mod etcd;
pub mod forward;
pub mod identity;
pub mod limits;
pub mod links;
pub mod metrics;
pub mod names;
pub mod ratelimit;
pub mod relay;
pub mod rendezvous;
pub mod server;
pub mod shared;
pub mod status;
pub mod stun;
pub mod stun_server;
pub mod tcp;
pub mod token;

pub use config::{Limits, RelayBudgets, RelayConfig};
pub use server::{run, Relay, RelayError};
