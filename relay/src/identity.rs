//! S's own identity: the certificate it presents to agents, either made by itself once and
//! kept in the state directory (agents pin its fingerprint on first use), or issued by a CA
//! and read from PEM files.

use std::path::{Path, PathBuf};

use p2ptun::proto::Fingerprint;
use p2ptun::tunnel::identity::fingerprint_of_cert;
use p2ptun::tunnel::{Identity, IdentityError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// The file in the state directory that holds S's self-made key.
pub const KEY_FILE: &str = "server-key.pem";

/// Why S's identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ServerIdentityError {
    /// The self-made identity could not be loaded or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The certificate chain S presents, its key, and the fingerprint agents pin.
pub struct ServerIdentity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The fingerprint of the leaf's public key.
    pub fingerprint: Fingerprint,
    /// The self-made identity, when S uses one (it also keys QUIC stateless resets, so
    /// that a restarted S can reset its former self's connections).
    pub own: Option<Identity>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("chain_len", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Loads the CA-issued files if given, else S's self-made key from `state_dir` (made on
    /// first run, so that agents' pins hold across restarts).
    pub fn load(tls: Option<&TlsFiles>, state_dir: &Path) -> Result<Self, ServerIdentityError> {
        match tls {
            Some(files) => Self::from_pem_files(&files.cert, &files.key),
            None => {
                let identity = Identity::load_or_create(&state_dir.join(KEY_FILE))?;
                Ok(ServerIdentity {
                    certs: identity.cert_chain(),
                    key: identity.private_key(),
                    fingerprint: identity.fingerprint(),
                    own: Some(identity),
                })
            }
        }
    }

    /// Reads a PEM certificate chain (leaf first) and the leaf's PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, ServerIdentityError> {
        let pem_err = |path: &Path, reason: String| ServerIdentityError::Pem {
            path: path.to_owned(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e.to_string()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| pem_err(cert, "holds no CERTIFICATE block".into()))?;
        let fingerprint = fingerprint_of_cert(leaf).map_err(|e| pem_err(cert, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| pem_err(key, format!("no usable private key: {e}")))?;
        Ok(ServerIdentity {
            certs,
            key,
            fingerprint,
            own: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_made_identity_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = ServerIdentity::load(None, dir.path()).unwrap();
        let b = ServerIdentity::load(None, dir.path()).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn pem_files_are_read_and_fingerprinted_by_the_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["relay.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let files = TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        };
        let id = ServerIdentity::load(Some(&files), dir.path()).unwrap();
        assert_eq!(id.fingerprint, fingerprint_of_cert(cert.der()).unwrap());

        std::fs::write(&key_path, "junk").unwrap();
        let err = ServerIdentity::load(Some(&files), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("key.pem"), "{err}");
        std::fs::write(&cert_path, "junk").unwrap();
        let err = ServerIdentity::load(Some(&files), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CERTIFICATE"), "{err}");
    }
}
