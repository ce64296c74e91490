//! Who owns which name: the first identity to claim a name keeps it until it gives it back
//! ([`NameRegistry::release`]) or, on an S with `name_expiry_days`, until it goes unused for
//! that long ([`NameRegistry::expire`]). The claims are kept in `names.json` in the state
//! directory and written before a claim is granted or given up, so a restart of S never
//! opens a window in which another key could take a name.
//!
//! Time is handed in (`now`), never read here, so expiry is tested on simulated time. A
//! name's last use is kept to the second but only rewritten when it is at least
//! [`USE_RESOLUTION`] old: every registration would otherwise rewrite the whole file, and
//! expiry counts in days.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p2ptun::proto::Fingerprint;
use p2ptun::tunnel::identity::write_private;
use serde::{Deserialize, Serialize};

/// The file in the state directory that holds the claims.
pub const NAMES_FILE: &str = "names.json";

/// The most names S keeps claims for; past it, new names are refused. A stranger (on an S
/// without tokens) could otherwise fill S's disk with names it never gives back.
pub const MAX_CLAIMS: usize = 100_000;

/// How stale a name's recorded last use may get before a use rewrites it: the registry is
/// exact to this much, which is nothing next to an expiry counted in days.
pub const USE_RESOLUTION: Duration = Duration::from_secs(3600);

/// How often S records the use of the names exposed right now and looks for expired ones.
/// At most [`USE_RESOLUTION`], so that a name exposed without a break never looks unused.
pub const SWEEP_INTERVAL: Duration = USE_RESOLUTION;

/// Why claims could not be loaded, granted, given up or saved.
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
    /// Nobody holds the name.
    #[error("nobody holds the name '{0}'")]
    Unknown(String),
    /// The owner asked to release a name that one of its registrations exposes now.
    #[error("the name '{0}' is exposed right now by an agent with its key")]
    InUse(String),
}

/// One claim as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claim {
    owner: Fingerprint,
    /// When the owner last registered with the name (or was online with it), in seconds
    /// since the Unix epoch.
    last_used: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsFile {
    version: u32,
    names: BTreeMap<String, Claim>,
}

/// Version 1, written before names could be given back: owners only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsFileV1 {
    #[allow(dead_code)]
    version: u32,
    names: BTreeMap<String, Fingerprint>,
}

/// Only the version, to pick the parser for the rest.
#[derive(Deserialize)]
struct FileVersion {
    version: u32,
}

const FILE_VERSION: u32 = 2;

fn unix_secs(t: SystemTime) -> u64 {
    // A clock before 1970 is broken; treating it as 1970 only makes names look older.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The name→owner table, backed by a file.
#[derive(Debug)]
pub struct NameRegistry {
    path: PathBuf,
    claims: BTreeMap<String, Claim>,
    /// Claims unused for longer than this are given up; `None` keeps them for good.
    expiry: Option<Duration>,
}

impl NameRegistry {
    /// Loads the claims in `state_dir` (none if the file does not exist yet); names unused
    /// for longer than `expiry` are given up by the first [`NameRegistry::expire`] or when
    /// another key claims them.
    ///
    /// A version 1 file, which kept no times, counts every name as used at `now`: a name
    /// is never given up for time that went by before S recorded it.
    pub fn load(
        state_dir: &Path,
        expiry: Option<Duration>,
        now: SystemTime,
    ) -> Result<Self, NamesError> {
        let path = state_dir.join(NAMES_FILE);
        let claims = match std::fs::read(&path) {
            Ok(bytes) => parse(&bytes, unix_secs(now)).map_err(|reason| NamesError::Corrupt {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(NamesError::Io { path, source }),
        };
        Ok(NameRegistry {
            path,
            claims,
            expiry,
        })
    }

    /// The owner of `name`, if anyone claimed it.
    pub fn owner(&self, name: &str) -> Option<Fingerprint> {
        self.claims.get(name).map(|c| c.owner)
    }

    /// When `name`'s owner last used it, as recorded (see [`USE_RESOLUTION`]).
    pub fn last_used(&self, name: &str) -> Option<SystemTime> {
        self.claims
            .get(name)
            .map(|c| UNIX_EPOCH + Duration::from_secs(c.last_used))
    }

    /// Every claim, by name: the name, its owner and when it was last used (Unix seconds,
    /// as recorded; see [`USE_RESOLUTION`]).
    pub fn claims(&self) -> Vec<(String, Fingerprint, u64)> {
        self.claims
            .iter()
            .map(|(name, c)| (name.clone(), c.owner, c.last_used))
            .collect()
    }

    /// How many names are claimed.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// Whether no name is claimed.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    fn expired(&self, claim: &Claim, now: u64) -> bool {
        self.expiry
            .is_some_and(|e| now.saturating_sub(claim.last_used) > e.as_secs())
    }

    fn stale(claim: &Claim, now: u64) -> bool {
        now.saturating_sub(claim.last_used) >= USE_RESOLUTION.as_secs()
    }

    /// Claims every one of `names` for `owner`, used at `now`, or none: fails if any is held
    /// by another identity that has not let it expire. New claims are on disk before this
    /// returns `Ok`, which carries the names taken over from an expired claim.
    pub fn claim(
        &mut self,
        names: &[String],
        owner: Fingerprint,
        now: SystemTime,
    ) -> Result<Vec<String>, NamesError> {
        let now = unix_secs(now);
        // What changes, decided before anything does: the claim is all or nothing.
        let mut write = Vec::new();
        let mut expired = Vec::new();
        let mut new = 0;
        for name in names {
            if write.contains(name) {
                continue;
            }
            match self.claims.get(name) {
                Some(c) if c.owner == owner => {
                    if Self::stale(c, now) {
                        write.push(name.clone());
                    }
                }
                Some(c) if self.expired(c, now) => {
                    expired.push(name.clone());
                    write.push(name.clone());
                }
                Some(_) => return Err(NamesError::Taken(name.clone())),
                None => {
                    new += 1;
                    write.push(name.clone());
                }
            }
        }
        if new > 0 && self.claims.len() + new > MAX_CLAIMS {
            return Err(NamesError::Full);
        }
        if write.is_empty() {
            return Ok(expired);
        }
        let before = self.claims.clone();
        for name in &expired {
            self.log_expiry(name, now, "another key claims it");
        }
        for name in write {
            self.claims.insert(
                name,
                Claim {
                    owner,
                    last_used: now,
                },
            );
        }
        self.save_or_restore(before)?;
        Ok(expired)
    }

    /// Gives `name` back for anyone to claim, on behalf of `owner`: refused if another
    /// identity holds it, if nobody does, or if `exposed` (one of the owner's registrations
    /// exposes it right now). Gone from disk before this returns `Ok`.
    ///
    /// A name exposed right now is refused rather than taken from its registration: the
    /// running agent would go on believing it exposes the name, and claim it again at its
    /// next reconnection, so the release would quietly undo itself. Stopping the agent
    /// first makes the release mean what it says.
    pub fn release(
        &mut self,
        name: &str,
        owner: Fingerprint,
        exposed: bool,
    ) -> Result<(), NamesError> {
        match self.claims.get(name) {
            None => return Err(NamesError::Unknown(name.to_owned())),
            Some(c) if c.owner != owner => return Err(NamesError::Taken(name.to_owned())),
            Some(_) if exposed => return Err(NamesError::InUse(name.to_owned())),
            Some(_) => {}
        }
        let before = self.claims.clone();
        self.claims.remove(name);
        self.save_or_restore(before)
    }

    /// Records that every name `exposed` says is exposed right now is used at `now`, and
    /// gives up the others that went unused for longer than the expiry. Returns the names
    /// given up, each logged.
    pub fn expire(
        &mut self,
        now: SystemTime,
        exposed: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, NamesError> {
        let now = unix_secs(now);
        let mut touched = Vec::new();
        let mut expired = Vec::new();
        for (name, claim) in &self.claims {
            if exposed(name) {
                if Self::stale(claim, now) {
                    touched.push(name.clone());
                }
            } else if self.expired(claim, now) {
                expired.push(name.clone());
            }
        }
        if touched.is_empty() && expired.is_empty() {
            return Ok(expired);
        }
        let before = self.claims.clone();
        for name in &touched {
            if let Some(c) = self.claims.get_mut(name) {
                c.last_used = now;
            }
        }
        for name in &expired {
            self.log_expiry(name, now, "anyone may claim it now");
            self.claims.remove(name);
        }
        self.save_or_restore(before)?;
        Ok(expired)
    }

    fn log_expiry(&self, name: &str, now: u64, what_next: &str) {
        let Some(claim) = self.claims.get(name) else {
            return;
        };
        tracing::info!(
            %name,
            owner = %claim.owner,
            unused_days = now.saturating_sub(claim.last_used) / 86_400,
            "name expired (unused for longer than name_expiry_days); {what_next}"
        );
    }

    /// Saves the claims; if that fails, puts `before` back, as what is not on disk is not
    /// granted (a restart would forget it) and what is still on disk is not given up.
    fn save_or_restore(&mut self, before: BTreeMap<String, Claim>) -> Result<(), NamesError> {
        let saved = self.save();
        if saved.is_err() {
            self.claims = before;
        }
        saved
    }

    fn save(&self) -> Result<(), NamesError> {
        let file = ClaimsFile {
            version: FILE_VERSION,
            names: self.claims.clone(),
        };
        let io_err = |source| NamesError::Io {
            path: self.path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| io_err(e.into()))?;
        write_private(&self.path, &json).map_err(io_err)
    }
}

/// Reads a claims file of any version S has written; `now` stands in for the last use of
/// the names a version 1 file lists.
fn parse(bytes: &[u8], now: u64) -> Result<BTreeMap<String, Claim>, String> {
    let FileVersion { version } = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match version {
        1 => {
            let old: ClaimsFileV1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            Ok(old
                .names
                .into_iter()
                .map(|(name, owner)| {
                    (
                        name,
                        Claim {
                            owner,
                            last_used: now,
                        },
                    )
                })
                .collect())
        }
        FILE_VERSION => {
            let file: ClaimsFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            Ok(file.names)
        }
        other => Err(format!(
            "version {other} where 1 or {FILE_VERSION} was expected; a newer S wrote it?"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Simulated time: `secs` after an arbitrary start.
    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn days(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n * DAY))
    }

    fn nobody(_: &str) -> bool {
        false
    }

    #[test]
    fn the_first_claim_wins_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert!(reg.is_empty());
        reg.claim(&names(&["home", "web"]), fp(1), at(0)).unwrap();
        reg.claim(&names(&["home"]), fp(1), at(0)).unwrap();
        assert!(matches!(
            reg.claim(&names(&["other", "home"]), fp(2), at(0)),
            Err(NamesError::Taken(n)) if n == "home"
        ));
        // All or nothing: 'other' was not claimed by the failed attempt.
        assert_eq!(reg.owner("other"), None);

        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert_eq!(reg.owner("home"), Some(fp(1)));
        assert_eq!(reg.owner("web"), Some(fp(1)));
        assert_eq!(reg.len(), 2);
        assert!(reg.claim(&names(&["web"]), fp(2), at(0)).is_err());
        reg.claim(&names(&["other"]), fp(2), at(0)).unwrap();
        assert_eq!(
            NameRegistry::load(dir.path(), None, at(0))
                .unwrap()
                .owner("other"),
            Some(fp(2))
        );
    }

    #[test]
    fn only_the_owner_releases_and_only_a_name_it_does_not_expose() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        reg.claim(&names(&["home"]), fp(1), at(0)).unwrap();
        assert!(matches!(
            reg.release("home", fp(2), false),
            Err(NamesError::Taken(n)) if n == "home"
        ));
        assert!(matches!(
            reg.release("nope", fp(1), false),
            Err(NamesError::Unknown(n)) if n == "nope"
        ));
        assert!(matches!(
            reg.release("home", fp(1), true),
            Err(NamesError::InUse(n)) if n == "home"
        ));
        assert_eq!(reg.owner("home"), Some(fp(1)));
        reg.release("home", fp(1), false).unwrap();
        assert_eq!(reg.owner("home"), None);
        // Given back on disk too: after a restart another key claims it.
        let mut reg = NameRegistry::load(dir.path(), None, at(1)).unwrap();
        assert_eq!(reg.owner("home"), None);
        reg.claim(&names(&["home"]), fp(2), at(1)).unwrap();
        assert!(matches!(
            reg.release("home", fp(1), false),
            Err(NamesError::Taken(_))
        ));
    }

    #[test]
    fn a_name_unused_past_the_expiry_is_given_up_by_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(30), at(0)).unwrap();
        reg.claim(&names(&["old", "live"]), fp(1), at(0)).unwrap();
        reg.claim(&names(&["young"]), fp(2), at(20 * DAY)).unwrap();
        // Exactly 30 days is not longer than 30 days.
        let exposed = |n: &str| n == "live";
        assert!(reg.expire(at(30 * DAY), exposed).unwrap().is_empty());
        // 'live' is exposed now: the sweep records its use instead of expiring it.
        assert_eq!(reg.last_used("live"), Some(at(30 * DAY)));
        assert_eq!(
            reg.expire(at(30 * DAY + 1), exposed).unwrap(),
            vec!["old".to_string()]
        );
        assert_eq!(reg.owner("old"), None);
        assert_eq!(reg.owner("live"), Some(fp(1)));
        assert_eq!(reg.owner("young"), Some(fp(2)));
        // On disk as well.
        let reg = NameRegistry::load(dir.path(), days(30), at(31 * DAY)).unwrap();
        assert_eq!(reg.owner("old"), None);
        assert_eq!(reg.last_used("live"), Some(at(30 * DAY)));

        // Without an expiry nothing is ever given up, but uses are still recorded (so that
        // an expiry set later counts from real uses).
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert!(reg.expire(at(1000 * DAY), exposed).unwrap().is_empty());
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.last_used("live"), Some(at(1000 * DAY)));
    }

    #[test]
    fn another_key_takes_an_expired_name_at_once_and_only_an_expired_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(7), at(0)).unwrap();
        reg.claim(&names(&["home"]), fp(1), at(0)).unwrap();
        // Its owner registers again on day 5: the clock starts over.
        reg.claim(&names(&["home"]), fp(1), at(5 * DAY)).unwrap();
        assert!(matches!(
            reg.claim(&names(&["home"]), fp(2), at(12 * DAY)),
            Err(NamesError::Taken(_))
        ));
        // No sweep ran; the claim itself finds the name expired.
        let taken = reg
            .claim(&names(&["home", "new"]), fp(2), at(12 * DAY + 1))
            .unwrap();
        assert_eq!(taken, vec!["home".to_string()]);
        assert_eq!(reg.owner("home"), Some(fp(2)));
        assert_eq!(reg.last_used("home"), Some(at(12 * DAY + 1)));
        assert!(matches!(
            reg.claim(&names(&["home"]), fp(1), at(12 * DAY + 2)),
            Err(NamesError::Taken(_))
        ));
    }

    #[test]
    fn a_use_rewrites_the_file_only_when_the_recorded_one_is_an_hour_old() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(1), at(0)).unwrap();
        reg.claim(&names(&["home"]), fp(1), at(0)).unwrap();
        let hour = USE_RESOLUTION.as_secs();
        reg.claim(&names(&["home"]), fp(1), at(hour - 1)).unwrap();
        assert_eq!(reg.last_used("home"), Some(at(0)));
        reg.claim(&names(&["home"]), fp(1), at(hour)).unwrap();
        assert_eq!(reg.last_used("home"), Some(at(hour)));
        // A name exposed without a break is recorded by every sweep, so it never looks
        // unused for more than the sweep interval.
        let mut now = hour;
        for _ in 0..100 {
            now += SWEEP_INTERVAL.as_secs();
            assert!(reg.expire(at(now), |_| true).unwrap().is_empty());
            let gap = at(now)
                .duration_since(reg.last_used("home").unwrap())
                .unwrap();
            assert!(gap <= USE_RESOLUTION, "{gap:?}");
        }
        assert_eq!(reg.owner("home"), Some(fp(1)));
    }

    #[test]
    fn a_version_1_file_is_read_and_its_names_count_as_used_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let owner = fp(7).to_string();
        std::fs::write(
            dir.path().join(NAMES_FILE),
            format!(r#"{{"version":1,"names":{{"home":"{owner}"}}}}"#),
        )
        .unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(1), at(100 * DAY)).unwrap();
        assert_eq!(reg.owner("home"), Some(fp(7)));
        assert_eq!(reg.last_used("home"), Some(at(100 * DAY)));
        assert!(reg.expire(at(101 * DAY), nobody).unwrap().is_empty());
        assert_eq!(reg.expire(at(101 * DAY + 1), nobody).unwrap(), ["home"]);
        // Written back as the current version, which reads back the same.
        reg.claim(&names(&["web"]), fp(7), at(101 * DAY + 2))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join(NAMES_FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        let reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert_eq!(reg.owner("web"), Some(fp(7)));
        assert_eq!(reg.last_used("web"), Some(at(101 * DAY + 2)));
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let load = || NameRegistry::load(dir.path(), None, at(0));
        std::fs::write(dir.path().join(NAMES_FILE), "{not json").unwrap();
        let err = load().unwrap_err().to_string();
        assert!(err.contains(NAMES_FILE), "{err}");
        assert!(err.contains("corrupt"), "{err}");

        for bad in [
            r#"{"version":1,"names":{"home":"SHA256:short"}}"#,
            r#"{"version":2,"names":{"home":{"owner":"SHA256:short","last_used":1}}}"#,
            r#"{"version":2,"names":{"home":"SHA256:short"}}"#,
            r#"{"version":2,"names":{},"extra":1}"#,
        ] {
            std::fs::write(dir.path().join(NAMES_FILE), bad).unwrap();
            assert!(load().is_err(), "{bad}");
        }

        std::fs::write(dir.path().join(NAMES_FILE), r#"{"version":9,"names":{}}"#).unwrap();
        let err = load().unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn a_change_that_cannot_be_saved_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(1), at(0)).unwrap();
        reg.claim(&names(&["home"]), fp(1), at(0)).unwrap();
        // A directory where the file should be makes the rename fail.
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join(NAMES_FILE)).unwrap();
        reg.path = state.join(NAMES_FILE);
        assert!(reg.claim(&names(&["web"]), fp(1), at(0)).is_err());
        assert_eq!(reg.owner("web"), None);
        assert!(reg.release("home", fp(1), false).is_err());
        assert_eq!(reg.owner("home"), Some(fp(1)));
        assert!(reg.expire(at(2 * DAY), nobody).is_err());
        assert_eq!(reg.owner("home"), Some(fp(1)));
    }

    #[test]
    fn claims_stop_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        reg.claims = (0..MAX_CLAIMS)
            .map(|i| {
                (
                    format!("n{i}"),
                    Claim {
                        owner: fp(1),
                        last_used: 0,
                    },
                )
            })
            .collect();
        assert!(matches!(
            reg.claim(&names(&["one-more"]), fp(2), at(0)),
            Err(NamesError::Full)
        ));
        // Names already held are no new claims.
        reg.claim(&names(&["n0"]), fp(1), at(0)).unwrap();
    }
}
