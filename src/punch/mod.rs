//! Finding a working path to a peer: where the hole punch happens.
//!
//! Both agents learn each other's candidate addresses from S, then, at the moment S named,
//! send each other STUN Binding requests carrying the session's short-term credentials
//! (ICE-style connectivity checks, RFC 8445 §7.2). Outgoing checks open each NAT for the
//! other side's packets; the first check answered proves a path both ways. Everything the
//! checks decide — pacing, retransmits, nomination, the chosen path's liveness — is a state
//! machine without I/O ([`checker`], with the plan in [`checks`]); [`session`] drives it on
//! the socket and [`router`] dispatches STUN. Nothing here writes the path table: the owner
//! of a peer's paths (the agent's link) installs what the checks report.
//! NATs that map per destination need more: [`symmetric`] chooses how (port prediction or a
//! birthday punch), and [`birthday`] runs the symmetric side's many sockets.

pub mod birthday;
pub mod candidates;
pub mod checker;
pub mod checks;
pub mod netcheck;
pub mod router;
mod session;
pub mod symmetric;
pub mod tcp;
#[cfg(test)]
mod testing;

pub use router::StunRouter;
pub use session::{find, start, start_delay, Punch, PunchError};
