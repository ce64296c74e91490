//! Who owns which name: the first identity to claim a name keeps it for good. The claims are
//! kept in `names.json` in the state directory and written before a claim is granted, so a
//! restart of S never opens a window in which another key could take a name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use p2ptun::proto::Fingerprint;
use p2ptun::tunnel::identity::write_private;
use serde::{Deserialize, Serialize};

/// The file in the state directory that holds the claims.
pub const NAMES_FILE: &str = "names.json";

/// The most names S keeps claims for; past it, new names are refused. Claims are never
/// given up, so without a bound a stranger (on an S without tokens) could fill S's disk.
pub const MAX_CLAIMS: usize = 100_000;

/// Why claims could not be loaded, granted or saved.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The claims file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file exists but cannot be trusted; S refuses to start rather than forget owners.
    #[error(
        "{path} is corrupt ({reason}); fix it or restore it from a backup (deleting it frees \
         every name for anyone to take)"
    )]
    Corrupt {
        /// The claims file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A name belongs to another identity.
    #[error("the name '{0}' is held by another identity")]
    Taken(String),
    /// S holds [`MAX_CLAIMS`] names already.
    #[error("S keeps no more than {MAX_CLAIMS} names and holds that many already")]
    Full,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsFile {
    version: u32,
    names: BTreeMap<String, Fingerprint>,
}

const FILE_VERSION: u32 = 1;

/// The name→owner table, backed by a file.
#[derive(Debug)]
pub struct NameRegistry {
    path: PathBuf,
    owners: BTreeMap<String, Fingerprint>,
}

impl NameRegistry {
    /// Loads the claims in `state_dir` (none if the file does not exist yet).
    pub fn load(state_dir: &Path) -> Result<Self, NamesError> {
        let path = state_dir.join(NAMES_FILE);
        let owners = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: ClaimsFile =
                    serde_json::from_slice(&bytes).map_err(|e| NamesError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.version != FILE_VERSION {
                    return Err(NamesError::Corrupt {
                        path,
                        reason: format!(
                            "version {} where {FILE_VERSION} was expected",
                            file.version
                        ),
                    });
                }
                file.names
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(NamesError::Io { path, source }),
        };
        Ok(NameRegistry { path, owners })
    }

    /// The owner of `name`, if anyone claimed it.
    pub fn owner(&self, name: &str) -> Option<Fingerprint> {
        self.owners.get(name).copied()
    }

    /// How many names are claimed.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether no name is claimed.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Claims every one of `names` for `owner`, or none: fails if any is held by another
    /// identity. New claims are on disk before this returns `Ok`.
    pub fn claim(&mut self, names: &[String], owner: Fingerprint) -> Result<(), NamesError> {
        let mut new = Vec::new();
        for name in names {
            match self.owners.get(name) {
                Some(fp) if *fp == owner => {}
                Some(_) => return Err(NamesError::Taken(name.clone())),
                None if !new.contains(name) => new.push(name.clone()),
                None => {}
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        if self.owners.len() + new.len() > MAX_CLAIMS {
            return Err(NamesError::Full);
        }
        for name in &new {
            self.owners.insert(name.clone(), owner);
        }
        if let Err(e) = self.save() {
            // Not on disk means not granted: a restart would forget it.
            for name in &new {
                self.owners.remove(name);
            }
            return Err(e);
        }
        Ok(())
    }

    fn save(&self) -> Result<(), NamesError> {
        let file = ClaimsFile {
            version: FILE_VERSION,
            names: self.owners.clone(),
        };
        let io_err = |source| NamesError::Io {
            path: self.path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| io_err(e.into()))?;
        write_private(&self.path, &json).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_first_claim_wins_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path()).unwrap();
        assert!(reg.is_empty());
        reg.claim(&names(&["home", "web"]), fp(1)).unwrap();
        reg.claim(&names(&["home"]), fp(1)).unwrap();
        assert!(matches!(
            reg.claim(&names(&["other", "home"]), fp(2)),
            Err(NamesError::Taken(n)) if n == "home"
        ));
        // All or nothing: 'other' was not claimed by the failed attempt.
        assert_eq!(reg.owner("other"), None);

        let mut reg = NameRegistry::load(dir.path()).unwrap();
        assert_eq!(reg.owner("home"), Some(fp(1)));
        assert_eq!(reg.owner("web"), Some(fp(1)));
        assert_eq!(reg.len(), 2);
        assert!(reg.claim(&names(&["web"]), fp(2)).is_err());
        reg.claim(&names(&["other"]), fp(2)).unwrap();
        assert_eq!(
            NameRegistry::load(dir.path()).unwrap().owner("other"),
            Some(fp(2))
        );
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NAMES_FILE), "{not json").unwrap();
        let err = NameRegistry::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(NAMES_FILE), "{err}");
        assert!(err.contains("corrupt"), "{err}");

        std::fs::write(
            dir.path().join(NAMES_FILE),
            r#"{"version":1,"names":{"home":"SHA256:short"}}"#,
        )
        .unwrap();
        assert!(NameRegistry::load(dir.path()).is_err());

        std::fs::write(dir.path().join(NAMES_FILE), r#"{"version":9,"names":{}}"#).unwrap();
        let err = NameRegistry::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn a_claim_that_cannot_be_saved_is_not_granted() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be makes the rename fail.
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join(NAMES_FILE)).unwrap();
        let mut reg = NameRegistry {
            path: state.join(NAMES_FILE),
            owners: BTreeMap::new(),
        };
        assert!(reg.claim(&names(&["home"]), fp(1)).is_err());
        assert_eq!(reg.owner("home"), None);
    }
}
