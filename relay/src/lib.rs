//! p2ptun-relay: the rendezvous server S of p2ptun.
//!
//! Agents connect over QUIC (ALPN `p2ptun/1`), prove their identity key in the handshake,
//! register the names they expose and ask to be introduced to the agent behind a name; S
//! answers each side with the other's fingerprint, candidate addresses, short-term
//! credentials and a common start time, and the agents then punch a direct path. The same
//! UDP port answers STUN, and a second port does too, so agents can learn how their NAT maps.
//!
//! The parts, each in its own module:
//!
//! - [`config`] and [`cli`]: what S is told, from a TOML file and flags.
//! - [`server`]: [`Relay`], binding the sockets and admitting connections.
//! - [`control`]: one agent's control connection (Register, Connect, pushes).
//! - [`names`]: who owns which name, kept on disk; [`directory`]: who is online.
//! - [`rendezvous`]: the introduction of two agents (credentials, start time).
//! - [`stun`] and [`stun_server`]: STUN answers and the sockets that carry them.
//! - [`limits`], [`ratelimit`], [`token`]: what a stranger may make S spend, and who may
//!   register.
//! - [`identity`]: the certificate S presents; [`metrics`]: Prometheus counters over HTTP.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod control;
pub mod directory;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod names;
pub mod ratelimit;
pub mod rendezvous;
pub mod server;
pub mod stun;
pub mod stun_server;
pub mod token;

pub use config::{Limits, RelayConfig};
pub use server::{run, Relay, RelayError};
