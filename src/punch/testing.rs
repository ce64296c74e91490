//! Fixtures shared by the punch modules' unit tests.

use crate::proto::{Candidate, CandidateKind, Credentials};

/// A candidate of `kind` at `addr` (which must parse).
pub fn cand(kind: CandidateKind, addr: &str) -> Candidate {
    Candidate {
        kind,
        addr: addr.parse().expect("a test address"),
    }
}

/// The credentials of side `local` in a session with side `remote`: the two sides' calls
/// mirror each other.
pub fn creds(local: &str, remote: &str) -> Credentials {
    Credentials {
        local_ufrag: local.into(),
        local_pwd: format!("{local}-password-0123456789"),
        remote_ufrag: remote.into(),
        remote_pwd: format!("{remote}-password-0123456789"),
    }
}
