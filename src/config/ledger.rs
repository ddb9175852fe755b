//! `[ledger]`: where the usage ledger keeps its data on this machine: the
//! journal every metered answer is appended to before it is sent, how
//! often that journal is forced to disk, and the embedded database that is
//! the ledger when there is no Redis.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::Check;
use super::values::HumanDuration;

/// Billing data is worth a file write per answer: without the journal a
/// crash loses what was not yet shipped.
const DEFAULT_JOURNAL: bool = true;
/// Next to the working directory, so the quick start needs no setup; each
/// replica needs its own (the directory is locked).
const DEFAULT_JOURNAL_DIR: &str = "data/journal";
/// What a power loss may cost: the journal is forced to disk this often
/// (a process crash loses nothing either way); ten syncs a second are
/// nothing to a disk.
const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Next to the journal.
const DEFAULT_SQLITE_PATH: &str = "data/ledger.sqlite";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Append every metered answer to the journal before it is sent.
    pub journal: bool,
    /// This replica's journal directory (relative paths: to the working
    /// directory).
    pub journal_dir: PathBuf,
    /// How often appended rows are forced to disk.
    pub fsync_interval: Duration,
    /// The embedded ledger (SQLite), used when there is no Redis.
    pub sqlite_path: PathBuf,
}

/// `[ledger]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLedger {
    journal: Option<bool>,
    journal_dir: Option<String>,
    fsync_interval: Option<HumanDuration>,
    sqlite_path: Option<String>,
}

impl RawLedger {
    pub(crate) fn load(self, c: &mut Check<'_>) -> LedgerConfig {
        let mut path = |key: &str, raw: Option<String>, default: &str| match raw {
            Some(p) if p.is_empty() => {
                c.err(key, "must not be empty");
                PathBuf::from(default)
            }
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(default),
        };
        let journal_dir = path("ledger.journal_dir", self.journal_dir, DEFAULT_JOURNAL_DIR);
        let sqlite_path = path("ledger.sqlite_path", self.sqlite_path, DEFAULT_SQLITE_PATH);
        LedgerConfig {
            journal: self.journal.unwrap_or(DEFAULT_JOURNAL),
            journal_dir,
            fsync_interval: self.fsync_interval.map_or(DEFAULT_FSYNC_INTERVAL, |d| d.0),
            sqlite_path,
        }
    }
}
