//! The registration token check. Tokens are compared in constant time, over SHA-256 digests
//! so that not even a token's length leaks through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a token was refused; the messages are what the agent shows its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// S requires a token and none was sent.
    #[error("S requires a token: pass --token or set P2PTUN_TOKEN")]
    Missing,
    /// The token matches none of S's.
    #[error("the token is wrong")]
    Wrong,
}

/// The tokens S accepts, kept as digests.
#[derive(Clone)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

impl Tokens {
    /// Accepts any of `tokens`; with none, registration is open to anyone.
    pub fn new(tokens: &[String]) -> Self {
        Tokens {
            digests: tokens.iter().map(|t| digest(t)).collect(),
        }
    }

    /// Whether anyone may register without a token.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks the token an agent sent.
    pub fn check(&self, presented: Option<&str>) -> Result<(), TokenError> {
        if self.is_open() {
            return Ok(());
        }
        let presented = presented.ok_or(TokenError::Missing)?;
        let theirs = digest(presented);
        // Every configured token is compared, so timing does not tell which one matched.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, ours| {
                acc | ours.ct_eq(&theirs)
            });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(TokenError::Wrong)
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_registration_takes_anything() {
        let tokens = Tokens::new(&[]);
        assert!(tokens.is_open());
        assert_eq!(tokens.check(None), Ok(()));
        assert_eq!(tokens.check(Some("whatever")), Ok(()));
    }

    #[test]
    fn any_configured_token_matches_and_nothing_else() {
        let tokens = Tokens::new(&["alpha".into(), "beta".into()]);
        assert!(!tokens.is_open());
        assert_eq!(tokens.check(Some("alpha")), Ok(()));
        assert_eq!(tokens.check(Some("beta")), Ok(()));
        assert_eq!(tokens.check(Some("alph")), Err(TokenError::Wrong));
        assert_eq!(tokens.check(Some("")), Err(TokenError::Wrong));
        assert_eq!(tokens.check(None), Err(TokenError::Missing));
        assert!(TokenError::Missing.to_string().contains("--token"));
        assert!(!format!("{tokens:?}").contains("alpha"));
    }
}
