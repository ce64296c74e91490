use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The SHA-256 of an identity's public key (its DER SubjectPublicKeyInfo).
///
/// Written as OpenSSH writes key fingerprints, `SHA256:` and unpadded base64, so that people
/// who compare ssh host keys already know how to read it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

/// Why a string is not a fingerprint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    /// The `SHA256:` prefix is missing.
    #[error("a fingerprint starts with 'SHA256:' (as printed by `p2ptun id`)")]
    MissingPrefix,
    /// The part after the prefix is not 43 characters of base64 for 32 bytes.
    #[error("the part after 'SHA256:' must be 43 characters of base64 (32 bytes)")]
    BadDigest,
}

impl Fingerprint {
    /// The fingerprint of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(spki_der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digest = s
            .trim()
            .strip_prefix("SHA256:")
            .ok_or(FingerprintError::MissingPrefix)?;
        let bytes = STANDARD_NO_PAD
            .decode(digest)
            .map_err(|_| FingerprintError::BadDigest)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| FingerprintError::BadDigest)?;
        Ok(Fingerprint(bytes))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let fp = Fingerprint::of_spki(b"some key");
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:"));
        assert_eq!(text.len(), 7 + 43);
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
    }

    #[test]
    fn rejects_malformed_text() {
        assert_eq!(
            "abc".parse::<Fingerprint>(),
            Err(FingerprintError::MissingPrefix)
        );
        assert_eq!(
            "SHA256:abc".parse::<Fingerprint>(),
            Err(FingerprintError::BadDigest)
        );
        assert_eq!(
            "SHA256:!!!!".parse::<Fingerprint>(),
            Err(FingerprintError::BadDigest)
        );
    }
}
