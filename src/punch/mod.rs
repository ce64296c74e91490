//! Finding a working path to a peer: where the hole punch happens.
//!
//! Both agents learn each other's candidate addresses from S, then, at the moment S named,
//! send each other STUN Binding requests carrying the session's short-term credentials
//! (ICE-style connectivity checks, RFC 8445 §7.2). Outgoing checks open each NAT for the
//! other side's packets; the first check answered proves a path both ways. The schedule and
//! the choice among answered pairs are pure logic ([`checks`]); [`router`] does the I/O.
//! NATs that map per destination need more: [`symmetric`] chooses how (port prediction or a
//! birthday punch), and [`birthday`] runs the symmetric side's many sockets.

pub mod birthday;
pub mod candidates;
pub mod checks;
pub mod monitor;
pub mod netcheck;
pub mod router;
mod session;
pub mod symmetric;
pub mod tcp;
#[cfg(test)]
mod testing;

pub use router::StunRouter;
pub use session::{punch, start_delay, PunchError, Punched};
