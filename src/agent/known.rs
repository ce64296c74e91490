//! Pinned keys, as ssh's known_hosts: `known_servers` pins S's key per server address and
//! `known_peers` pins each exposer's key per server and name. A key seen for the first time
//! is pinned; a different key later is refused until the user removes the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::proto::Fingerprint;
use crate::tunnel::identity::write_private;

/// Why a pin check failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The key differs from the pinned one; the message says which line to delete.
    #[error("{0}")]
    Changed(String),
    /// The pin file is unreadable or malformed.
    #[error("{file}: {reason}")]
    File {
        /// The pin file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What a successful check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// The key matched its pin.
    Known,
    /// No pin existed; the key is pinned now.
    New,
}

/// A pin file: lines of `KEY FINGERPRINT`; `#` starts a comment.
#[derive(Debug)]
pub struct PinFile {
    path: PathBuf,
}

impl PinFile {
    /// The pin file at `path` (it need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PinFile { path: path.into() }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<BTreeMap<String, Fingerprint>, PinError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => {
                return Err(PinError::File {
                    file: self.path.clone(),
                    reason: e.to_string(),
                })
            }
        };
        parse(&text).map_err(|reason| PinError::File {
            file: self.path.clone(),
            reason,
        })
    }

    /// Checks `seen` against the pin for `key`, pinning it if there is none.
    pub fn check(&self, what: &str, key: &str, seen: Fingerprint) -> Result<Pinned, PinError> {
        let mut pins = self.load()?;
        match pins.get(key) {
            Some(pinned) if *pinned == seen => Ok(Pinned::Known),
            Some(pinned) => Err(PinError::Changed(format!(
                "{what} now presents key {seen}, but {file} pins {pinned}. This may be an \
                 attack. If the key was changed on purpose, delete the line starting with \
                 '{key}' from {file}",
                file = self.path.display()
            ))),
            None => {
                pins.insert(key.to_owned(), seen);
                write_private(&self.path, render(&pins).as_bytes()).map_err(|e| {
                    PinError::File {
                        file: self.path.clone(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(Pinned::New)
            }
        }
    }

    /// The pinned key for `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Fingerprint>, PinError> {
        Ok(self.load()?.get(key).copied())
    }
}

fn parse(text: &str) -> Result<BTreeMap<String, Fingerprint>, String> {
    let mut pins = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, fp) = line
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: expected 'KEY FINGERPRINT'", n + 1))?;
        let fp = fp.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        pins.insert(key.trim().to_owned(), fp);
    }
    Ok(pins)
}

fn render(pins: &BTreeMap<String, Fingerprint>) -> String {
    let mut out = String::from("# Pinned p2ptun keys. Delete a line to accept a new key for it.\n");
    for (key, fp) in pins {
        out.push_str(&format!("{key} {fp}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_on_first_use_and_refuses_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinFile::new(dir.path().join("known_peers"));
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        assert_eq!(
            pins.check("exposer of 'home'", "s:7000 home", a).unwrap(),
            Pinned::New
        );
        assert_eq!(
            pins.check("exposer of 'home'", "s:7000 home", a).unwrap(),
            Pinned::Known
        );
        let err = pins
            .check("exposer of 'home'", "s:7000 home", b)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("known_peers") && err.contains("s:7000 home"),
            "{err}"
        );
        assert_eq!(pins.check("other", "s:7000 web", b).unwrap(), Pinned::New);
        assert_eq!(pins.get("s:7000 home").unwrap(), Some(a));
    }

    #[test]
    fn a_malformed_file_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_servers");
        std::fs::write(&path, "# ok\nhost:1 SHA256:nope\n").unwrap();
        let err = PinFile::new(&path).get("x").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
