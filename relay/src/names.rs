//! Who owns which name: the first identity to claim a name keeps it until it gives it back
//! ([`NameRegistry::release`]) or, on an S with `name_expiry_days`, until it goes unused for
//! that long ([`NameRegistry::expire`]).
//!
//! The claims live in memory and on disk in two files of the state directory: `names.json`
//! (a snapshot) and `names.journal` (one JSON line per change since the snapshot). A change
//! is made in memory and handed to a writer thread, which appends it to the journal and
//! fsyncs; the caller waits for that ([`Saved`]) before it answers, so a name S granted
//! survives a crash and a restart never opens a window in which another key could take it.
//! The writer appends everything handed to it during one fsync with the next one (group
//! commit): registrations claiming new names cost one short append each instead of a
//! rewrite of every claim, and share their fsyncs instead of queueing for one each. When
//! the journal has grown past the size of the snapshot, the writer writes a new snapshot
//! (temporary file, fsync, rename, fsync of the directory) and empties the journal; S also
//! does that at start, after replaying the journal, so the journal never holds more than
//! about one snapshot's worth.
//!
//! A crash can leave the last journal line half written. That change was never answered
//! (its fsync had not returned), so the loader drops it with a warning; an unreadable line
//! with readable ones after it is corruption, and S refuses to start.
//!
//! If the writer fails (a full disk), the change it failed and everything handed to it
//! after are refused, and [`NameRegistry::recover`] cuts the journal back to what was saved
//! and reloads the claims from disk: what is not on disk is not granted, what is still on
//! disk is not given up.
//!
//! Time is handed in (`now`), never read here, so expiry is tested on simulated time. A
//! name's last use is kept to the second but only rewritten when it is at least
//! [`USE_RESOLUTION`] old: expiry counts in days, and every registration would otherwise
//! add a line to the journal.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p2ptun::proto::Fingerprint;
use p2ptun::tunnel::identity::write_private;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The file in the state directory that holds the snapshot of the claims.
pub const NAMES_FILE: &str = "names.json";

/// The file in the state directory that holds the changes since the snapshot, a JSON line
/// each.
pub const JOURNAL_FILE: &str = "names.journal";

/// The most names S keeps claims for; past it, new names are refused. A stranger (on an S
/// without tokens) could otherwise fill S's disk with names it never gives back.
pub const MAX_CLAIMS: usize = 100_000;

/// How stale a name's recorded last use may get before a use rewrites it: the registry is
/// exact to this much, which is nothing next to an expiry counted in days.
pub const USE_RESOLUTION: Duration = Duration::from_secs(3600);

/// How often S records the use of the names exposed right now and looks for expired ones.
/// At most [`USE_RESOLUTION`], so that a name exposed without a break never looks unused.
pub const SWEEP_INTERVAL: Duration = USE_RESOLUTION;

/// The journal is compacted into the snapshot once it holds this many bytes, or more if the
/// snapshot is larger: a snapshot costs about as much as the journal it replaces, so
/// compaction stays a constant share of the writing.
const COMPACT_AT_LEAST: u64 = 1 << 20;

/// About how many bytes one claim takes in the snapshot (a name, a fingerprint, a time and
/// the pretty-printing around them), to size the journal against it without serializing.
const SNAPSHOT_BYTES_PER_CLAIM: u64 = 128;

/// The most changes the writer takes into one append and fsync, so that a burst is written
/// in bounded pieces.
const MAX_BATCH: usize = 4096;

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

/// One line of the journal. Each holds a name's whole new state, so replaying a line again
/// changes nothing: a crash between writing a snapshot and emptying the journal is harmless.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Record {
    /// `name` is held by `owner`, last used at `last_used`.
    Set {
        name: String,
        owner: Fingerprint,
        last_used: u64,
    },
    /// Nobody holds `name`.
    Remove { name: String },
}

impl Record {
    fn apply(self, claims: &mut BTreeMap<String, Claim>) {
        match self {
            Record::Set {
                name,
                owner,
                last_used,
            } => {
                claims.insert(name, Claim { owner, last_used });
            }
            Record::Remove { name } => {
                claims.remove(&name);
            }
        }
    }

    /// The line as written: JSON and a newline, the newline marking it complete.
    fn line(&self) -> Vec<u8> {
        // A record is strings and numbers; serializing it cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    // A clock before 1970 is broken; treating it as 1970 only makes names look older.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A change made in memory and handed to the journal's writer: waiting on it tells whether
/// it is on disk. Nothing may be answered on the strength of the change before that.
#[must_use = "a change is granted only once it is saved"]
pub struct Saved {
    /// `None` when there was nothing to wait for.
    done: Option<oneshot::Receiver<Result<(), String>>>,
    path: PathBuf,
}

impl Saved {
    /// Waits until the change is on disk. After an error, call [`NameRegistry::recover`]
    /// (off the async workers: it does file I/O under the registry's lock).
    pub async fn wait(self) -> Result<(), NamesError> {
        let Some(done) = self.done else {
            return Ok(());
        };
        Self::outcome(done.await, self.path)
    }

    /// [`Saved::wait`] for a thread that may block (never an async worker).
    pub fn wait_blocking(self) -> Result<(), NamesError> {
        let Some(done) = self.done else {
            return Ok(());
        };
        Self::outcome(done.blocking_recv(), self.path)
    }

    fn outcome(
        answer: Result<Result<(), String>, oneshot::error::RecvError>,
        path: PathBuf,
    ) -> Result<(), NamesError> {
        let why = match answer {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(why)) => why,
            Err(_) => "the journal's writer stopped".to_owned(),
        };
        Err(NamesError::Io {
            path,
            source: std::io::Error::other(why),
        })
    }
}

/// A change to [`NameRegistry::claim`]: the names taken over from expired claims, and the
/// wait for the claim to be on disk.
#[must_use = "a claim is granted only once it is saved"]
pub struct Claimed {
    /// The names another identity held but let expire, given to this one.
    pub expired: Vec<String>,
    /// Wait on this before answering the claimer.
    pub saved: Saved,
}

/// The name→owner table, backed by a snapshot and a journal.
#[derive(Debug)]
pub struct NameRegistry {
    dir: PathBuf,
    claims: BTreeMap<String, Claim>,
    /// Claims unused for longer than this are given up; `None` keeps them for good.
    expiry: Option<Duration>,
    journal: Journal,
}

impl NameRegistry {
    /// Loads the claims in `state_dir` (none if there are no files yet), compacts the
    /// journal into the snapshot and starts the journal's writer; names unused for longer
    /// than `expiry` are given up by the first [`NameRegistry::expire`] or when another key
    /// claims them. Blocks on file I/O.
    ///
    /// A version 1 file, which kept no times, counts every name as used at `now`: a name
    /// is never given up for time that went by before S recorded it.
    pub fn load(
        state_dir: &Path,
        expiry: Option<Duration>,
        now: SystemTime,
    ) -> Result<Self, NamesError> {
        let claims = read_state(state_dir, unix_secs(now))?;
        let io_err = |path: PathBuf| move |source| NamesError::Io { path, source };
        let snapshot = state_dir.join(NAMES_FILE);
        let journal_path = state_dir.join(JOURNAL_FILE);
        // The replayed journal (and a torn last line) go into a new snapshot now, so the
        // writer starts on an empty journal that ends on a whole line.
        save_snapshot(&snapshot, &claims).map_err(io_err(snapshot.clone()))?;
        let file = open_journal(&journal_path).map_err(io_err(journal_path.clone()))?;
        file.set_len(0)
            .and_then(|()| file.sync_all())
            .map_err(io_err(journal_path.clone()))?;
        sync_dir(state_dir).map_err(io_err(state_dir.to_owned()))?;
        Ok(NameRegistry {
            dir: state_dir.to_owned(),
            claims,
            expiry,
            journal: Journal::start(file, journal_path, snapshot),
        })
    }

    /// The owner of `name`, if anyone claimed it.
    pub fn owner(&self, name: &str) -> Option<Fingerprint> {
        self.claims.get(name).map(|c| c.owner)
    }

    /// Whether `owner` holds every one of `names`.
    pub fn holds(&self, names: &[String], owner: Fingerprint) -> bool {
        names.iter().all(|n| self.owner(n) == Some(owner))
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
    /// by another identity that has not let it expire. Granted once [`Claimed::saved`] says
    /// so; until then another identity is refused the names all the same.
    ///
    /// A claim that changes nothing still waits for the changes handed to the writer before
    /// it: one of them may be this owner's claim of the same name by another registration,
    /// answered only once it is on disk.
    pub fn claim(
        &mut self,
        names: &[String],
        owner: Fingerprint,
        now: SystemTime,
    ) -> Result<Claimed, NamesError> {
        if names.is_empty() {
            // An agent exposing nothing depends on no claim being saved.
            return Ok(Claimed {
                expired: Vec::new(),
                saved: self.journal.saved(None),
            });
        }
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
        for name in &expired {
            self.log_expiry(name, now, "another key claims it");
        }
        let records = write
            .into_iter()
            .map(|name| Record::Set {
                name,
                owner,
                last_used: now,
            })
            .collect();
        let saved = self.change(records);
        Ok(Claimed { expired, saved })
    }

    /// Gives `name` back for anyone to claim, on behalf of `owner`: refused if another
    /// identity holds it, if nobody does, or if `exposed` (one of the owner's registrations
    /// exposes it right now). Given up once the [`Saved`] says so.
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
    ) -> Result<Saved, NamesError> {
        match self.claims.get(name) {
            None => return Err(NamesError::Unknown(name.to_owned())),
            Some(c) if c.owner != owner => return Err(NamesError::Taken(name.to_owned())),
            Some(_) if exposed => return Err(NamesError::InUse(name.to_owned())),
            Some(_) => {}
        }
        Ok(self.change(vec![Record::Remove {
            name: name.to_owned(),
        }]))
    }

    /// Records that every name `exposed` says is exposed right now is used at `now`, and
    /// gives up the others that went unused for longer than the expiry. Returns the names
    /// given up, each logged, and the wait for the change to be on disk.
    pub fn expire(
        &mut self,
        now: SystemTime,
        exposed: impl Fn(&str) -> bool,
    ) -> (Vec<String>, Saved) {
        let now = unix_secs(now);
        let mut records = Vec::new();
        let mut expired = Vec::new();
        for (name, claim) in &self.claims {
            if exposed(name) {
                if Self::stale(claim, now) {
                    records.push(Record::Set {
                        name: name.clone(),
                        owner: claim.owner,
                        last_used: now,
                    });
                }
            } else if self.expired(claim, now) {
                expired.push(name.clone());
            }
        }
        for name in &expired {
            self.log_expiry(name, now, "anyone may claim it now");
            records.push(Record::Remove { name: name.clone() });
        }
        let saved = self.change(records);
        (expired, saved)
    }

    /// Makes `records` in memory and hands them to the writer (nothing, if there are none,
    /// but the wait for what was handed to it before); compaction is handed over when the
    /// journal has grown past the snapshot.
    fn change(&mut self, records: Vec<Record>) -> Saved {
        let mut lines = Vec::new();
        for record in records {
            lines.extend_from_slice(&record.line());
            record.apply(&mut self.claims);
        }
        let snapshot_size = (self.claims.len() as u64).saturating_mul(SNAPSHOT_BYTES_PER_CLAIM);
        let saved = self.journal.append(lines);
        if self.journal.bytes > snapshot_size.max(COMPACT_AT_LEAST) {
            self.journal.compact(self.claims.clone());
        }
        saved
    }

    /// After a change failed to save: cuts the journal back to what was saved, and reloads
    /// the claims from disk, which drops every change the writer refused. Until this
    /// succeeds every change is refused. Blocks on file I/O (and holds the registry's lock
    /// meanwhile, which is why it is only for the rare failure).
    pub fn recover(&mut self) -> Result<(), NamesError> {
        let reset = self.journal.reset();
        // Reloaded even if the journal could not be cut back: memory then says what is on
        // disk, and the writer goes on refusing changes.
        let claims = read_state(&self.dir, unix_secs(SystemTime::now()))?;
        self.claims = claims;
        reset
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
}

/// What the files in `dir` say: the snapshot, then the journal replayed on it. `now` stands
/// in for the last use of the names a version 1 snapshot lists.
fn read_state(dir: &Path, now: u64) -> Result<BTreeMap<String, Claim>, NamesError> {
    let read = |path: PathBuf| match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path, Vec::new())),
        Err(source) => Err(NamesError::Io { path, source }),
    };
    let (path, snapshot) = read(dir.join(NAMES_FILE))?;
    let mut claims = if snapshot.is_empty() {
        BTreeMap::new()
    } else {
        parse(&snapshot, now).map_err(|reason| NamesError::Corrupt { path, reason })?
    };
    let (path, journal) = read(dir.join(JOURNAL_FILE))?;
    let records = parse_journal(&journal).map_err(|reason| NamesError::Corrupt {
        path: path.clone(),
        reason,
    })?;
    for record in records {
        record.apply(&mut claims);
    }
    Ok(claims)
}

/// The journal's records. A last line without its newline, or unreadable lines with nothing
/// readable after them, are a write a crash cut short: never fsynced, so never answered;
/// they are dropped with a warning. An unreadable line before a readable one is corruption.
fn parse_journal(bytes: &[u8]) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let mut bad: Option<(usize, String)> = None;
    let mut rest = bytes;
    let mut line_no = 0;
    while !rest.is_empty() {
        line_no += 1;
        let (line, whole) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &rest[..end];
                rest = &rest[end + 1..];
                (line, true)
            }
            None => (std::mem::take(&mut rest), false),
        };
        let parsed = if whole {
            serde_json::from_slice::<Record>(line).map_err(|e| e.to_string())
        } else {
            Err("no newline at its end".to_owned())
        };
        match parsed {
            Ok(record) => {
                if let Some((at, why)) = bad {
                    return Err(format!(
                        "line {at} cannot be read ({why}) but line {line_no} after it can"
                    ));
                }
                records.push(record);
            }
            Err(why) => {
                bad.get_or_insert((line_no, why));
            }
        }
    }
    if let Some((at, why)) = bad {
        tracing::warn!(
            line = at,
            %why,
            "the names journal ends in a write cut short (S stopped while saving a change it \
             had not answered yet); dropping it"
        );
    }
    Ok(records)
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

/// Writes the snapshot whole (temporary file, fsync, rename) and makes the rename durable,
/// so that the journal may be emptied after.
fn save_snapshot(path: &Path, claims: &BTreeMap<String, Claim>) -> std::io::Result<()> {
    let file = ClaimsFile {
        version: FILE_VERSION,
        names: claims.clone(),
    };
    let json = serde_json::to_vec_pretty(&file)?;
    write_private(path, &json)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

fn open_journal(path: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true).read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// Makes a rename or a new file in `dir` durable (a no-op where directories cannot be
/// opened to sync).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// What the registry hands the writer thread, in order.
enum Job {
    /// Lines to append (none: only wait for what came before), answered once fsynced.
    Append {
        lines: Vec<u8>,
        seq: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The claims after every change handed over before: the new snapshot.
    Compact(BTreeMap<String, Claim>),
    /// Cut the journal back to what was saved and take changes again (after a failure).
    Reset {
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Tests: write to this file from now on (one that fails, to see what a failure does).
    #[cfg(test)]
    Swap(File),
}

/// The registry's end of the journal's writer thread, which ends when this is dropped.
#[derive(Debug)]
struct Journal {
    jobs: mpsc::Sender<Job>,
    /// Number of the last [`Job::Append`] with lines handed over.
    seq: u64,
    /// Number of the last one on disk with everything before it; equal to `seq` when there
    /// is nothing to wait for.
    durable: Arc<AtomicU64>,
    /// Bytes handed over since the last compaction.
    bytes: u64,
    path: PathBuf,
}

impl Journal {
    fn start(file: File, path: PathBuf, snapshot: PathBuf) -> Journal {
        let (jobs, rx) = mpsc::channel();
        let durable = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            file,
            len: 0,
            poisoned: false,
            last_seq: 0,
            durable: Arc::clone(&durable),
            snapshot,
        };
        let spawned = std::thread::Builder::new()
            .name("names-journal".into())
            .spawn(move || writer.run(rx));
        if let Err(e) = spawned {
            // Every change is then refused (the jobs' answers are dropped): S goes on
            // serving the names it has.
            tracing::error!(error = %e, "cannot start the names journal's writer");
        }
        Journal {
            jobs,
            seq: 0,
            durable,
            bytes: 0,
            path,
        }
    }

    fn saved(&self, done: Option<oneshot::Receiver<Result<(), String>>>) -> Saved {
        Saved {
            done,
            path: self.path.clone(),
        }
    }

    /// Hands `lines` over; with none, the wait for what was handed over before.
    fn append(&mut self, lines: Vec<u8>) -> Saved {
        if lines.is_empty() && self.durable.load(Ordering::Acquire) == self.seq {
            return self.saved(None);
        }
        if !lines.is_empty() {
            self.seq += 1;
            self.bytes += lines.len() as u64;
        }
        let (done, rx) = oneshot::channel();
        let job = Job::Append {
            lines,
            seq: self.seq,
            done,
        };
        // A writer that is gone drops the job and with it `done`: the wait then fails.
        let _ = self.jobs.send(job);
        self.saved(Some(rx))
    }

    fn compact(&mut self, claims: BTreeMap<String, Claim>) {
        self.bytes = 0;
        let _ = self.jobs.send(Job::Compact(claims));
    }

    fn reset(&mut self) -> Result<(), NamesError> {
        let (done, rx) = oneshot::channel();
        let _ = self.jobs.send(Job::Reset { done });
        Saved::outcome(rx.blocking_recv(), self.path.clone())
    }
}

/// The journal's writer thread: appends, fsyncs, answers.
struct Writer {
    file: File,
    /// The journal's length as far as it is saved.
    len: u64,
    /// A write failed: every change is refused until [`Job::Reset`].
    poisoned: bool,
    /// The highest [`Job::Append`] number seen.
    last_seq: u64,
    durable: Arc<AtomicU64>,
    snapshot: PathBuf,
}

impl Writer {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        // Ends when the registry (the only sender) is dropped.
        while let Ok(first) = jobs.recv() {
            // Everything handed over while the last fsync ran goes into this one.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let mut lines = Vec::new();
            let mut waiting = Vec::new();
            for job in batch {
                match job {
                    Job::Append {
                        lines: l,
                        seq,
                        done,
                    } => {
                        lines.extend_from_slice(&l);
                        self.last_seq = self.last_seq.max(seq);
                        waiting.push(done);
                    }
                    other => {
                        // Compaction and reset apply to the journal with everything
                        // before them written.
                        self.flush(&mut lines, &mut waiting);
                        self.other(other);
                    }
                }
            }
            self.flush(&mut lines, &mut waiting);
        }
    }

    fn flush(
        &mut self,
        lines: &mut Vec<u8>,
        waiting: &mut Vec<oneshot::Sender<Result<(), String>>>,
    ) {
        if waiting.is_empty() {
            return;
        }
        let outcome = if self.poisoned {
            Err("an earlier change could not be saved; S is recovering".to_owned())
        } else if lines.is_empty() {
            Ok(())
        } else {
            match self
                .file
                .write_all(lines)
                .and_then(|()| self.file.sync_data())
            {
                Ok(()) => {
                    self.len += lines.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot save name claims to the journal");
                    self.poisoned = true;
                    Err(e.to_string())
                }
            }
        };
        if outcome.is_ok() {
            self.durable.store(self.last_seq, Ordering::Release);
        }
        lines.clear();
        for done in waiting.drain(..) {
            let _ = done.send(outcome.clone());
        }
    }

    fn other(&mut self, job: Job) {
        match job {
            Job::Append { .. } => {}
            Job::Compact(claims) => {
                if self.poisoned {
                    // The claims include changes that were refused; the next reload
                    // drops them, and a later compaction covers what is saved.
                    return;
                }
                let emptied = save_snapshot(&self.snapshot, &claims)
                    .and_then(|()| self.file.set_len(0))
                    .and_then(|()| self.file.sync_all());
                match emptied {
                    Ok(()) => self.len = 0,
                    // The journal still replays onto either snapshot: nothing is lost, it
                    // only stays longer.
                    Err(e) => tracing::warn!(error = %e, "cannot compact the names journal"),
                }
            }
            Job::Reset { done } => {
                let cut = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_all());
                let outcome = match cut {
                    Ok(()) => {
                        self.poisoned = false;
                        // Every change handed over so far is saved or refused, and the
                        // registry reloads from disk before handing over more.
                        self.durable.store(self.last_seq, Ordering::Release);
                        Ok(())
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot cut the names journal back after a failed write; new names are refused until S restarts");
                        Err(e.to_string())
                    }
                };
                let _ = done.send(outcome);
            }
            #[cfg(test)]
            Job::Swap(file) => self.file = file,
        }
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

    /// A claim, waited for until saved.
    fn claim(
        reg: &mut NameRegistry,
        names: &[String],
        owner: Fingerprint,
        now: SystemTime,
    ) -> Result<Vec<String>, NamesError> {
        let claimed = reg.claim(names, owner, now)?;
        claimed.saved.wait_blocking()?;
        Ok(claimed.expired)
    }

    fn release(
        reg: &mut NameRegistry,
        name: &str,
        owner: Fingerprint,
        exposed: bool,
    ) -> Result<(), NamesError> {
        reg.release(name, owner, exposed)?.wait_blocking()
    }

    fn expire(
        reg: &mut NameRegistry,
        now: SystemTime,
        exposed: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, NamesError> {
        let (expired, saved) = reg.expire(now, exposed);
        saved.wait_blocking()?;
        Ok(expired)
    }

    #[test]
    fn the_first_claim_wins_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert!(reg.is_empty());
        claim(&mut reg, &names(&["home", "web"]), fp(1), at(0)).unwrap();
        claim(&mut reg, &names(&["home"]), fp(1), at(0)).unwrap();
        assert!(matches!(
            claim(&mut reg, &names(&["other", "home"]), fp(2), at(0)),
            Err(NamesError::Taken(n)) if n == "home"
        ));
        // All or nothing: 'other' was not claimed by the failed attempt.
        assert_eq!(reg.owner("other"), None);

        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert_eq!(reg.owner("home"), Some(fp(1)));
        assert_eq!(reg.owner("web"), Some(fp(1)));
        assert_eq!(reg.len(), 2);
        assert!(claim(&mut reg, &names(&["web"]), fp(2), at(0)).is_err());
        claim(&mut reg, &names(&["other"]), fp(2), at(0)).unwrap();
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
        claim(&mut reg, &names(&["home"]), fp(1), at(0)).unwrap();
        assert!(matches!(
            release(&mut reg, "home", fp(2), false),
            Err(NamesError::Taken(n)) if n == "home"
        ));
        assert!(matches!(
            release(&mut reg, "nope", fp(1), false),
            Err(NamesError::Unknown(n)) if n == "nope"
        ));
        assert!(matches!(
            release(&mut reg, "home", fp(1), true),
            Err(NamesError::InUse(n)) if n == "home"
        ));
        assert_eq!(reg.owner("home"), Some(fp(1)));
        release(&mut reg, "home", fp(1), false).unwrap();
        assert_eq!(reg.owner("home"), None);
        // Given back on disk too: after a restart another key claims it.
        let mut reg = NameRegistry::load(dir.path(), None, at(1)).unwrap();
        assert_eq!(reg.owner("home"), None);
        claim(&mut reg, &names(&["home"]), fp(2), at(1)).unwrap();
        assert!(matches!(
            release(&mut reg, "home", fp(1), false),
            Err(NamesError::Taken(_))
        ));
    }

    #[test]
    fn a_name_unused_past_the_expiry_is_given_up_by_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(30), at(0)).unwrap();
        claim(&mut reg, &names(&["old", "live"]), fp(1), at(0)).unwrap();
        claim(&mut reg, &names(&["young"]), fp(2), at(20 * DAY)).unwrap();
        // Exactly 30 days is not longer than 30 days.
        let exposed = |n: &str| n == "live";
        assert!(expire(&mut reg, at(30 * DAY), exposed).unwrap().is_empty());
        // 'live' is exposed now: the sweep records its use instead of expiring it.
        assert_eq!(reg.last_used("live"), Some(at(30 * DAY)));
        assert_eq!(
            expire(&mut reg, at(30 * DAY + 1), exposed).unwrap(),
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
        assert!(expire(&mut reg, at(1000 * DAY), exposed)
            .unwrap()
            .is_empty());
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.last_used("live"), Some(at(1000 * DAY)));
    }

    #[test]
    fn another_key_takes_an_expired_name_at_once_and_only_an_expired_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(7), at(0)).unwrap();
        claim(&mut reg, &names(&["home"]), fp(1), at(0)).unwrap();
        // Its owner registers again on day 5: the clock starts over.
        claim(&mut reg, &names(&["home"]), fp(1), at(5 * DAY)).unwrap();
        assert!(matches!(
            claim(&mut reg, &names(&["home"]), fp(2), at(12 * DAY)),
            Err(NamesError::Taken(_))
        ));
        // No sweep ran; the claim itself finds the name expired.
        let taken = claim(&mut reg, &names(&["home", "new"]), fp(2), at(12 * DAY + 1)).unwrap();
        assert_eq!(taken, vec!["home".to_string()]);
        assert_eq!(reg.owner("home"), Some(fp(2)));
        assert_eq!(reg.last_used("home"), Some(at(12 * DAY + 1)));
        assert!(matches!(
            claim(&mut reg, &names(&["home"]), fp(1), at(12 * DAY + 2)),
            Err(NamesError::Taken(_))
        ));
    }

    #[test]
    fn a_use_rewrites_the_file_only_when_the_recorded_one_is_an_hour_old() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(1), at(0)).unwrap();
        claim(&mut reg, &names(&["home"]), fp(1), at(0)).unwrap();
        let hour = USE_RESOLUTION.as_secs();
        claim(&mut reg, &names(&["home"]), fp(1), at(hour - 1)).unwrap();
        assert_eq!(reg.last_used("home"), Some(at(0)));
        claim(&mut reg, &names(&["home"]), fp(1), at(hour)).unwrap();
        assert_eq!(reg.last_used("home"), Some(at(hour)));
        // A name exposed without a break is recorded by every sweep, so it never looks
        // unused for more than the sweep interval.
        let mut now = hour;
        for _ in 0..100 {
            now += SWEEP_INTERVAL.as_secs();
            assert!(expire(&mut reg, at(now), |_| true).unwrap().is_empty());
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
        assert!(expire(&mut reg, at(101 * DAY), nobody).unwrap().is_empty());
        assert_eq!(
            expire(&mut reg, at(101 * DAY + 1), nobody).unwrap(),
            ["home"]
        );
        // Written back as the current version, which reads back the same.
        claim(&mut reg, &names(&["web"]), fp(7), at(101 * DAY + 2)).unwrap();
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
        claim(&mut reg, &names(&["home"]), fp(1), at(0)).unwrap();
        // The writer gets a handle it cannot write (nor cut back): a disk that fails.
        let journal = dir.path().join(JOURNAL_FILE);
        let swap = |reg: &NameRegistry, file| reg.journal.jobs.send(Job::Swap(file)).unwrap();
        swap(&reg, File::open(&journal).unwrap());
        assert!(claim(&mut reg, &names(&["web"]), fp(1), at(0)).is_err());
        // Until recovered, even a claim that changes nothing is refused: it cannot be sure
        // that what came before it is saved.
        assert!(claim(&mut reg, &names(&["home"]), fp(1), at(0)).is_err());
        // The journal cannot be cut back either, but memory is reloaded from disk.
        assert!(reg.recover().is_err());
        assert_eq!(reg.owner("web"), None);
        assert!(release(&mut reg, "home", fp(1), false).is_err());
        let _ = reg.recover();
        assert_eq!(reg.owner("home"), Some(fp(1)));
        assert!(expire(&mut reg, at(2 * DAY), nobody).is_err());
        let _ = reg.recover();
        assert_eq!(reg.owner("home"), Some(fp(1)));

        // A disk that works again: recovery lets changes through.
        swap(&reg, open_journal(&journal).unwrap());
        reg.recover().unwrap();
        claim(&mut reg, &names(&["web"]), fp(1), at(0)).unwrap();
        let reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        assert_eq!(reg.claims().len(), 2);
        assert_eq!(reg.owner("web"), Some(fp(1)));
    }

    #[test]
    fn a_claim_answered_is_in_the_journal_and_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        claim(&mut reg, &names(&["home"]), fp(1), at(0)).unwrap();
        // Read as a restart after a crash would, with the registry still running (so
        // nothing was written on the way out).
        let on_disk = read_state(dir.path(), 0).unwrap();
        assert_eq!(on_disk.get("home").map(|c| c.owner), Some(fp(1)));
        let journal = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(journal.lines().count(), 1, "{journal}");
        assert!(journal.contains("\"home\""), "{journal}");
        // Released: gone from disk as well.
        release(&mut reg, "home", fp(1), false).unwrap();
        assert!(read_state(dir.path(), 0).unwrap().is_empty());
        drop(reg);
    }

    #[test]
    fn claims_handed_over_together_are_saved_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        // Registrations of many agents at once: each waits only for its own claim, and the
        // writer fsyncs them in a few batches.
        let mut pending: Vec<Saved> = (0..500u32)
            .map(|i| {
                let owner = fp((i % 200) as u8);
                reg.claim(&[format!("n{i}")], owner, at(0)).unwrap().saved
            })
            .collect();
        // A claim that changes nothing waits for the claims on their way (one may be its
        // own from another registration; see a_change_that_cannot_be_saved_is_not_made for
        // what that wait says when they fail); an agent exposing nothing waits for nobody.
        pending.push(reg.claim(&names(&["n0"]), fp(0), at(0)).unwrap().saved);
        let none = reg.claim(&[], fp(1), at(0)).unwrap();
        assert!(none.saved.done.is_none());
        for saved in pending {
            saved.wait_blocking().unwrap();
        }
        let on_disk = read_state(dir.path(), 0).unwrap();
        assert_eq!(on_disk.len(), 500);
        assert_eq!(on_disk.get("n201").map(|c| c.owner), Some(fp(1)));
    }

    #[test]
    fn a_torn_last_journal_line_is_dropped_and_a_torn_middle_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
        claim(&mut reg, &names(&["home", "web"]), fp(1), at(0)).unwrap();
        drop(reg);
        let journal = dir.path().join(JOURNAL_FILE);
        let whole = std::fs::read(&journal).unwrap();
        let line = Record::Set {
            name: "torn".into(),
            owner: fp(2),
            last_used: 0,
        }
        .line();
        // S stopped in the middle of a write: part of a line, or garbage to the end.
        for tail in [&line[..line.len() - 1], &line[..20], b"\0\0\0\0\n\0\0"] {
            std::fs::write(&journal, [&whole[..], tail].concat()).unwrap();
            let reg = NameRegistry::load(dir.path(), None, at(0)).unwrap();
            assert_eq!(reg.len(), 2);
            assert_eq!(reg.owner("torn"), None);
            // Loading compacted: the snapshot has the names, the journal is empty.
            assert_eq!(std::fs::read(&journal).unwrap(), b"");
        }
        // An unreadable line with a readable one after it is no torn write.
        std::fs::write(&journal, [&line[..20], b"\n", &line[..]].concat()).unwrap();
        let err = NameRegistry::load(dir.path(), None, at(0)).unwrap_err();
        assert!(matches!(err, NamesError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(JOURNAL_FILE), "{err}");
    }

    #[test]
    fn the_journal_is_compacted_and_a_reload_gives_the_same_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = NameRegistry::load(dir.path(), days(30), at(0)).unwrap();
        let all: Vec<String> = (0..2000).map(|i| format!("name-{i}")).collect();
        claim(&mut reg, &all, fp(1), at(0)).unwrap();
        release(&mut reg, "name-7", fp(1), false).unwrap();
        // Every hour each name's use is recorded again: a journal line each, until the
        // journal outgrows the snapshot and is compacted into it.
        let hour = USE_RESOLUTION.as_secs();
        let journal = dir.path().join(JOURNAL_FILE);
        let mut compacted = false;
        let mut last_len = 0;
        for round in 1..=12 {
            assert!(expire(&mut reg, at(round * hour), |n| n != "name-9")
                .unwrap()
                .is_empty());
            let len = std::fs::metadata(&journal).unwrap().len();
            compacted |= len < last_len;
            last_len = len;
        }
        assert!(compacted);
        let snapshot = std::fs::read_to_string(dir.path().join(NAMES_FILE)).unwrap();
        assert!(snapshot.contains("\"version\": 2"), "{snapshot}");
        assert!(snapshot.contains("name-1999"));
        let reloaded = NameRegistry::load(dir.path(), days(30), at(0)).unwrap();
        assert_eq!(reloaded.claims(), reg.claims());
        assert_eq!(reloaded.len(), 1999);
        assert_eq!(reloaded.last_used("name-9"), Some(at(0)));
        assert_eq!(reloaded.last_used("name-8"), Some(at(12 * hour)));
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
            claim(&mut reg, &names(&["one-more"]), fp(2), at(0)),
            Err(NamesError::Full)
        ));
        // Names already held are no new claims.
        claim(&mut reg, &names(&["n0"]), fp(1), at(0)).unwrap();
    }
}
