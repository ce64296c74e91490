//! An agent's (or S's) long-lived identity: a key pair made on first run and kept in the state
//! directory with owner-only permissions, and the self-signed certificate that carries it into
//! TLS handshakes. Its [`Fingerprint`] is what peers pin.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use sha2::{Digest, Sha256};

use crate::proto::Fingerprint;

/// Why an identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The key file exists but is not a PEM private key.
    #[error("{path} is not a valid private key ({reason}); move it away to make a new identity")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Making the certificate failed.
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("cannot read a certificate: {0}")]
    BadCertificate(String),
}

/// A key pair and its self-signed certificate.
pub struct Identity {
    key: PrivatePkcs8KeyDer<'static>,
    cert: CertificateDer<'static>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the key at `path`, or makes one there (mode 0600, in a directory made 0700) if
    /// there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io_err = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let key = match fs::read_to_string(path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| IdentityError::BadKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate()?;
                write_private(path, key.serialize_pem().as_bytes()).map_err(io_err)?;
                tracing::info!(path = %path.display(), "made a new identity key");
                key
            }
            Err(e) => return Err(io_err(e)),
        };
        Self::from_key(key)
    }

    /// A fresh identity kept only in memory.
    pub fn ephemeral() -> Result<Self, IdentityError> {
        Self::from_key(KeyPair::generate()?)
    }

    fn from_key(key: KeyPair) -> Result<Self, IdentityError> {
        // The certificate is made anew on every start; only the key is identity.
        let cert = CertificateParams::new(vec!["p2ptun".to_owned()])?.self_signed(&key)?;
        let cert = cert.der().clone();
        let fingerprint = fingerprint_of_cert(&cert)?;
        Ok(Identity {
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert,
            fingerprint,
        })
    }

    /// The fingerprint peers know this identity by.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The certificate chain to present (one self-signed certificate).
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    /// A secret for `label`, derived from the private key: stable across restarts, and
    /// useless for recovering the key.
    pub fn derive_secret(&self, label: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(label);
        h.update(self.key.secret_pkcs8_der());
        h.finalize().into()
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The fingerprint of the public key inside a DER certificate.
pub fn fingerprint_of_cert(cert: &CertificateDer<'_>) -> Result<Fingerprint, IdentityError> {
    let anchor = webpki::anchor_from_trusted_cert(cert)
        .map_err(|e| IdentityError::BadCertificate(format!("{e:?}")))?;
    Ok(Fingerprint::of_spki(&anchor.subject_public_key_info))
}

/// Writes a secret file readable by its owner only, atomically (temp file, then rename).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// Makes a directory (and its parents) that only its owner may enter.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_a_restart_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/identity.pem");
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(
            a.fingerprint(),
            Identity::ephemeral().unwrap().fingerprint()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        fs::write(&path, "not a key").unwrap();
        let err = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid private key"), "{err}");
    }
}
