//! The local journal: every metered answer is appended to it before its
//! response is sent, and the ledger is shipped from it.
//!
//! `ledger.journal_dir` holds:
//!
//! - `lock`: held with an exclusive OS file lock (`flock`) for as long as a
//!   process uses the directory, so two processes never share a journal; it
//!   holds the owner's pid, for the error message of the second one.
//! - `<run>-<seq>.jnl`: segments. A *run* is one process's journal from its
//!   start (a new run also begins when the journal switches between disk and
//!   memory); its rows are numbered 1, 2, … across its segments, and `seq`
//!   (0, 1, …) orders the segments. A row's id is (run, number): the ledger
//!   keeps, per run, tenant and day, the highest number applied, which makes
//!   shipping idempotent (see [`super`]).
//!
//! A row is one text line, `<row> v3 <ms> <day> <cache> <flags> <model> <n>
//! <items×n> <units×n> <computed×n> <tenant> <fnv1a32>` (`v3` the format's
//! version; `ms` when it was journaled, milliseconds since 1970-01-01 UTC,
//! the usage event's `time` ([`super::events`]); days since 1970-01-01;
//! cache `hit`, `miss` or `unknown`; flags:
//! 1 = the units are upstream's usage, 2 = upstream's usage disagreed with
//! the gateway's; `n` counts per figure, one per modality in
//! [`Modality::ALL`] order, so a modality added later reads back), its
//! checksum over everything before it, so a torn or damaged line is
//! recognised and skipped (and counted), never misread.
//!
//! Lines of earlier versions are still read, so a journal left by an older
//! gateway ships after an upgrade: `v2` (the same without `<ms>`), and the
//! one before it (no version marker, no model: `<row> <day> <cache> <flags>
//! <items×3> <units×3> <computed×3> <tenant> <fnv1a32>`, or ×4 with video),
//! as model [`LEGACY_MODEL`]. Their rows' time is the start of their day.
//! (A gateway older than `v3` reads a `v3` line as damaged: do not
//! downgrade over a journal that is not empty.)
//!
//! Appending is one `write(2)` of one line (`O_APPEND`) under a mutex: when
//! the response is sent the row is in the OS page cache, so a crash of the
//! process loses nothing. A background thread forces written segments to
//! disk (`fdatasync`) every `ledger.fsync_interval`: what a power loss or a
//! kernel crash may lose. No request waits for a disk flush.
//!
//! When an append fails (disk full, I/O error) that row and the ones after
//! it are kept in memory under a new run and shipped from there; the failure
//! is counted (`embedgate_journal_errors_total{op="append"}`), logged, shown
//! in `/readyz`, and a new segment is tried every few seconds. With
//! `ledger.journal = false` the rows are in memory from the start.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::LedgerConfig;
use crate::date::Day;
use crate::metering::{CacheStatus, Reconciled, LEGACY_MODEL};
use crate::metrics::Metrics;
use crate::request::{Counts, Modality};

/// A segment this large is closed and a new one started, so shipped rows
/// can be deleted while traffic goes on.
pub(crate) const ROTATE_BYTES: u64 = 4 << 20;
/// How often a journal that failed is tried again on disk.
const REOPEN_EVERY: Duration = Duration::from_secs(5);
const LOCK_FILE: &str = "lock";
const SEGMENT_SUFFIX: &str = ".jnl";
/// The line format's version marker (the second field of a line).
const FORMAT: &str = "v3";
/// The format before rows had a time.
const FORMAT_V2: &str = "v2";
const MS_PER_DAY: u64 = 86_400_000;

/// One metered answer, as the journal and the ledger keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) tenant: Arc<str>,
    /// The model called: 1-64 bytes of `[A-Za-z0-9._-]` (the ledger checks
    /// it before a row is made: [`crate::metering::valid_model_name`]).
    pub(crate) model: Arc<str>,
    pub(crate) day: Day,
    pub(crate) cache: CacheStatus,
    /// The record: items and units per modality.
    pub(crate) items: Counts,
    pub(crate) units: Counts,
    /// The gateway's own units per modality.
    pub(crate) computed: Counts,
    /// `units` are upstream's usage block.
    pub(crate) upstream: bool,
    /// Upstream's usage disagreed with the gateway's, or was missing.
    pub(crate) mismatch: bool,
    /// When it was journaled, ms since 1970-01-01 UTC (rows of formats
    /// before `v3`: the start of their day).
    pub(crate) at_ms: u64,
}

/// Now, in ms since 1970-01-01 UTC.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Entry {
    pub(crate) fn new(
        tenant: &Arc<str>,
        model: &str,
        day: Day,
        cache: CacheStatus,
        r: &Reconciled,
    ) -> Entry {
        Entry {
            tenant: tenant.clone(),
            model: Arc::from(model),
            day,
            cache,
            items: r.record.items,
            units: r.record.units,
            computed: r.computed.units,
            upstream: r.upstream,
            mismatch: r.mismatch,
            at_ms: now_ms(),
        }
    }

    /// The line after its row number, up to and including the space
    /// before the checksum.
    fn encode_body(&self, out: &mut String) {
        // By hand (no `fmt`): this runs for every metered answer.
        let mut num = itoa::Buffer::new();
        let flags = u8::from(self.upstream) | (u8::from(self.mismatch) << 1);
        out.push(' ');
        out.push_str(FORMAT);
        for field in [
            num.format(self.at_ms),
            itoa::Buffer::new().format(self.day.days()),
            self.cache.as_str(),
            itoa::Buffer::new().format(flags),
            &self.model,
            itoa::Buffer::new().format(Modality::ALL.len()),
        ] {
            out.push(' ');
            out.push_str(field);
        }
        for counts in [&self.items, &self.units, &self.computed] {
            for m in Modality::ALL {
                out.push(' ');
                out.push_str(num.format(counts.get(m)));
            }
        }
        out.push(' ');
        out.push_str(&self.tenant);
        out.push(' ');
    }
}

#[cfg(test)]
impl Entry {
    pub(crate) fn encode_body_for_test(&self, out: &mut String) {
        self.encode_body(out);
    }
}

/// The whole line of `row_and_body` (the row number and the body).
#[cfg(test)]
pub(crate) fn line_for_test(row_and_body: &str) -> String {
    let sum = fnv1a(row_and_body.as_bytes());
    format!("{row_and_body}{sum:08x}\n")
}

/// FNV-1a, 32 bits: enough to tell a torn or damaged line from a good one.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The whole line of row `row`, newline included, after what `out` holds.
fn push_line(row: u64, body: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let start = out.len();
    out.extend_from_slice(itoa::Buffer::new().format(row).as_bytes());
    out.extend_from_slice(body.as_bytes());
    let sum = fnv1a(&out[start..]);
    for shift in (0..8).rev() {
        out.push(HEX[((sum >> (shift * 4)) & 0xf) as usize]);
    }
    out.push(b'\n');
}

/// One line without its newline; `None` when it is not a whole, intact row.
pub(crate) fn decode_line(line: &[u8]) -> Option<(u64, Entry)> {
    let text = std::str::from_utf8(line).ok()?;
    let (head, sum) = text.rsplit_once(' ')?;
    if sum.len() != 8 || u32::from_str_radix(sum, 16).ok()? != fnv1a(&line[..=head.len()]) {
        return None;
    }
    // At most 20 fields (a `v3` line with four modalities); no allocation.
    let mut all = [""; 24];
    let mut n = 0;
    for f in head.split(' ') {
        *all.get_mut(n)? = f;
        n += 1;
    }
    let fields = &all[..n];
    let (&row, rest) = fields.split_first()?;
    let row = row.parse().ok()?;
    let entry = match rest.split_first() {
        Some((&FORMAT, rest)) => {
            let (at, rest) = rest.split_first()?;
            let mut e = decode_v2(rest)?;
            e.at_ms = at.parse().ok()?;
            e
        }
        Some((&FORMAT_V2, rest)) => decode_v2(rest)?,
        _ => decode_v1(rest)?,
    };
    Some((row, entry))
}

/// Counts in [`Modality::ALL`] order, `n` of them per figure.
fn decode_counts<'a>(n: usize, f: &mut impl Iterator<Item = &'a str>) -> Option<[Counts; 3]> {
    if n > Modality::ALL.len() {
        return None;
    }
    let mut counts = [Counts::default(); 3];
    for c in &mut counts {
        for m in &Modality::ALL[..n] {
            c.set(*m, f.next()?.parse().ok()?);
        }
    }
    Some(counts)
}

fn entry(
    tenant: &str,
    model: &str,
    day: Day,
    cache: CacheStatus,
    flags: u8,
    [items, units, computed]: [Counts; 3],
) -> Option<Entry> {
    if tenant.is_empty() || flags > 3 || !crate::metering::valid_model_name(model) {
        return None;
    }
    Some(Entry {
        tenant: interned(&LAST_TENANT, tenant),
        model: interned(&LAST_MODEL, model),
        day,
        cache,
        items,
        units,
        computed,
        upstream: flags & 1 != 0,
        mismatch: flags & 2 != 0,
        at_ms: u64::try_from(day.days())
            .unwrap_or(0)
            .saturating_mul(MS_PER_DAY),
    })
}

thread_local! {
    /// The last tenant and model decoded on this thread: rows of a
    /// journal mostly repeat them, and then share one allocation.
    static LAST_TENANT: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    static LAST_MODEL: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
}

fn interned(
    last: &'static std::thread::LocalKey<std::cell::RefCell<Option<Arc<str>>>>,
    s: &str,
) -> Arc<str> {
    last.with(|cell| {
        let mut last = cell.borrow_mut();
        match &*last {
            Some(a) if &**a == s => a.clone(),
            _ => {
                let a: Arc<str> = Arc::from(s);
                *last = Some(a.clone());
                a
            }
        }
    })
}

/// `<day> <cache> <flags> <model> <n> <items×n> <units×n> <computed×n>
/// <tenant>` (`v2`, and `v3` after its `<ms>`).
fn decode_v2(f: &[&str]) -> Option<Entry> {
    let mut f = f.iter().copied();
    let day = Day::from_days(f.next()?.parse().ok()?);
    let cache = CacheStatus::row_from_name(f.next()?)?;
    let flags: u8 = f.next()?.parse().ok()?;
    let model = f.next()?;
    let n: usize = f.next()?.parse().ok()?;
    let counts = decode_counts(n, &mut f)?;
    let tenant = f.next()?;
    if f.next().is_some() {
        return None;
    }
    entry(tenant, model, day, cache, flags, counts)
}

/// The format before the ledger had a model: `<day> <cache> <flags>
/// <items×n> <units×n> <computed×n> <tenant>`, `n` 3 (text, image, audio)
/// or 4 (and video); its rows are [`LEGACY_MODEL`]'s.
fn decode_v1(f: &[&str]) -> Option<Entry> {
    let n = match f.len() {
        13 => 3,
        16 => 4,
        _ => return None,
    };
    let mut f = f.iter().copied();
    let day = Day::from_days(f.next()?.parse().ok()?);
    let cache = CacheStatus::row_from_name(f.next()?)?;
    let flags: u8 = f.next()?.parse().ok()?;
    let counts = decode_counts(n, &mut f)?;
    let tenant = f.next()?;
    entry(tenant, LEGACY_MODEL, day, cache, flags, counts)
}

/// What the journal did since the shipper last asked, in order.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A new segment of `run`; the run's earlier segments get no more rows.
    Segment { run: Arc<str>, path: PathBuf },
    /// Rows of `run` written to its current segment, numbered from
    /// `first`: the shipper takes them from here, so this process never
    /// reads its own segments back (they are read only as leftovers of a
    /// process that ended before shipping them).
    Rows {
        run: Arc<str>,
        first: u64,
        entries: Vec<Entry>,
    },
    /// Rows of a run kept in memory.
    Memory { run: Arc<str>, bytes: Vec<u8> },
    /// `run` gets no more rows.
    Ended { run: Arc<str> },
}

/// A row's batch ([`Journal::append_batched`]).
pub(crate) struct Batch {
    pub(crate) number: u64,
    /// The row opened it: its caller writes it.
    pub(crate) opened: bool,
}

/// Segments of a run left by an earlier process.
#[derive(Debug)]
pub(crate) struct Leftover {
    pub(crate) run: Arc<str>,
    /// In `seq` order.
    pub(crate) segments: Vec<(u32, PathBuf)>,
}

enum Target {
    File(Arc<File>),
    Memory(Vec<u8>),
}

struct Writer {
    run: Arc<str>,
    next_row: u64,
    /// The current segment's number in its run.
    seq: u32,
    target: Target,
    segment_bytes: u64,
    events: Vec<Event>,
    /// Segments left since the last fsync, still to be forced to disk.
    unsynced: Vec<Arc<File>>,
    /// Rows appended to the current segment since the last fsync.
    dirty: bool,
    /// The disk failed: rows go to memory until a new segment opens.
    failing: bool,
    last_reopen: Instant,
    /// The lines being written, reused.
    line: Vec<u8>,
    /// Rows appended to the open batch, not written yet (their bodies: a
    /// row's number is given when it is written).
    pending: Vec<String>,
    /// The same rows, for the shipper once they are in a segment.
    pending_entries: Vec<Entry>,
}

/// This process's journal.
pub(crate) struct Journal {
    /// `None`: `ledger.journal = false`, rows in memory only.
    dir: Option<PathBuf>,
    writer: Mutex<Writer>,
    /// Batches written so far (changed with the writer's lock held); the
    /// open one is number `written`.
    written: AtomicU64,
    batch_written: Notify,
    metrics: Arc<Metrics>,
    /// The directory's lock, held for the life of the process.
    _lock: Option<File>,
}

fn new_run() -> Arc<str> {
    Arc::from(uuid::Uuid::new_v4().simple().to_string())
}

impl Journal {
    /// Opens (creating it if need be) and locks the journal directory,
    /// lists what earlier processes left in it, starts a segment and the
    /// fsync thread. Errors say what to fix.
    pub(crate) fn open(
        config: &LedgerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Journal>, Vec<Leftover>), String> {
        let run = new_run();
        if !config.journal {
            let journal = Journal {
                dir: None,
                writer: Mutex::new(Writer::new(run, Target::Memory(Vec::new()))),
                written: AtomicU64::new(0),
                batch_written: Notify::new(),
                metrics,
                _lock: None,
            };
            return Ok((Arc::new(journal), Vec::new()));
        }
        let dir = config.journal_dir.clone();
        let shown = dir.display();
        fs::create_dir_all(&dir)
            .map_err(|e| format!("ledger.journal_dir {shown}: cannot create it: {e}"))?;
        let lock = lock_dir(&dir)?;
        let leftovers = leftovers(&dir)
            .map_err(|e| format!("ledger.journal_dir {shown}: cannot list it: {e}"))?;
        let (file, path) = create_segment(&dir, &run, 0)
            .map_err(|e| format!("ledger.journal_dir {shown}: cannot create a segment: {e}"))?;
        let mut writer = Writer::new(run.clone(), Target::File(Arc::new(file)));
        writer.events.push(Event::Segment { run, path });
        let journal = Arc::new(Journal {
            dir: Some(dir),
            writer: Mutex::new(writer),
            written: AtomicU64::new(0),
            batch_written: Notify::new(),
            metrics,
            _lock: Some(lock),
        });
        let weak = Arc::downgrade(&journal);
        let interval = config.fsync_interval;
        std::thread::Builder::new()
            .name("journal-fsync".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                match weak.upgrade() {
                    Some(j) => j.sync(),
                    None => return,
                }
            })
            .map_err(|e| format!("cannot start the journal's fsync thread: {e}"))?;
        Ok((journal, leftovers))
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one row: one `write(2)` into the OS page cache (with the
    /// open batch's rows), never a disk flush. Returns when the row is in
    /// the journal (or, when the disk fails, in memory).
    pub(crate) fn append(&self, entry: Entry) {
        let mut body = String::with_capacity(96);
        entry.encode_body(&mut body);
        let mut w = self.writer();
        w.pending.push(body);
        w.pending_entries.push(entry);
        self.write_pending(&mut w);
    }

    /// Adds one row to the open batch, to be written with the others by
    /// one `write(2)`: the caller then waits with [`Journal::written`]
    /// until its batch is, or writes the batch itself ([`Journal::flush`])
    /// if it opened it (`Batch::opened`). Without a journal file the row
    /// is kept in memory at once.
    pub(crate) fn append_batched(&self, entry: Entry) -> Batch {
        let mut body = String::with_capacity(96);
        entry.encode_body(&mut body);
        let mut w = self.writer();
        w.pending_entries.push(entry);
        if matches!(w.target, Target::Memory(_)) {
            w.pending.push(body);
            self.write_pending(&mut w);
            return Batch {
                number: self.written.load(Ordering::Relaxed) - 1,
                opened: false,
            };
        }
        let opened = w.pending.is_empty();
        w.pending.push(body);
        Batch {
            number: self.written.load(Ordering::Relaxed),
            opened,
        }
    }

    /// Writes the open batch, if it has rows.
    pub(crate) fn flush(&self) {
        let mut w = self.writer();
        self.write_pending(&mut w);
    }

    /// Returns once batch `number` is written.
    pub(crate) async fn written(&self, number: u64) {
        loop {
            let notified = self.batch_written.notified();
            tokio::pin!(notified);
            // Registered before looking: a batch written in between wakes it.
            notified.as_mut().enable();
            if self.written.load(Ordering::Acquire) > number {
                return;
            }
            notified.await;
        }
    }

    /// Writes the open batch's rows (numbered now, in order) with one
    /// `write(2)`, and wakes the requests waiting for it. With the lock.
    fn write_pending(&self, w: &mut Writer) {
        if w.pending.is_empty() {
            return;
        }
        let bodies = std::mem::take(&mut w.pending);
        let mut entries = std::mem::take(&mut w.pending_entries);
        let first = w.next_row;
        w.number_lines(&bodies);
        let failed = match &mut w.target {
            // Rows in memory reach the shipper as lines, as they would
            // from a segment (usage events read the same bytes).
            Target::Memory(buf) => {
                buf.extend_from_slice(&w.line);
                None
            }
            Target::File(file) => match write_counted(file, &w.line) {
                Ok(()) => {
                    w.segment_bytes += w.line.len() as u64;
                    w.dirty = true;
                    None
                }
                Err(failed) => Some(failed),
            },
        };
        if failed.is_none() && matches!(w.target, Target::File(_)) {
            w.hand_over(first, entries);
        } else if let Some((e, done)) = failed {
            // Rows written whole before the failure are in the failed run;
            // the rest (a torn one is skipped if the segment is ever read
            // as a leftover) go on.
            let whole = w.line[..done].iter().filter(|&&c| c == b'\n').count();
            if whole > 0 {
                entries.truncate(whole);
                w.hand_over(first, entries);
            }
            self.metrics
                .journal_errors
                .with_label_values(&["append"])
                .inc();
            tracing::error!(
                error = %e,
                "journal append failed; metered answers are kept in memory until the journal can be written again"
            );
            // A new run in memory; the failed file's run ends here (a torn
            // line at its end is skipped when it is read).
            let old = std::mem::replace(&mut w.target, Target::Memory(Vec::new()));
            if let Target::File(f) = old {
                w.unsynced.push(f);
            }
            let ended = std::mem::replace(&mut w.run, new_run());
            w.events.push(Event::Ended { run: ended });
            w.next_row = 1;
            w.seq = 0;
            w.segment_bytes = 0;
            w.failing = true;
            w.last_reopen = Instant::now();
            w.number_lines(&bodies[whole..]);
            if let Target::Memory(buf) = &mut w.target {
                buf.extend_from_slice(&w.line);
            }
        }
        self.written.fetch_add(1, Ordering::Release);
        self.batch_written.notify_waiters();
    }

    /// What happened since the last call, rows kept in memory included.
    pub(crate) fn poll(&self) -> Vec<Event> {
        let mut w = self.writer();
        self.write_pending(&mut w);
        let run = w.run.clone();
        if let Target::Memory(buf) = &mut w.target {
            if !buf.is_empty() {
                let bytes = std::mem::take(buf);
                w.events.push(Event::Memory { run, bytes });
            }
        }
        std::mem::take(&mut w.events)
    }

    /// [`Journal::maintain`] has file work to do.
    pub(crate) fn maintenance_due(&self) -> bool {
        self.dir.is_some() && {
            let w = self.writer();
            w.rotate_due() || w.reopen_due()
        }
    }

    /// Housekeeping between shipments (blocking file work): starts a new
    /// segment once the current one is large, and tries the disk again
    /// after a failure.
    pub(crate) fn maintain(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let (run, seq, rotate, reopen) = {
            let w = self.writer();
            (w.run.clone(), w.seq, w.rotate_due(), w.reopen_due())
        };
        if rotate {
            match create_segment(dir, &run, seq + 1) {
                Ok((file, path)) => {
                    let mut w = self.writer();
                    self.write_pending(&mut w);
                    if w.run == run && w.seq == seq && !w.failing {
                        let old = std::mem::replace(&mut w.target, Target::File(Arc::new(file)));
                        if let Target::File(f) = old {
                            w.unsynced.push(f);
                        }
                        w.seq = seq + 1;
                        w.segment_bytes = 0;
                        w.events.push(Event::Segment { run, path });
                    } else {
                        drop(w);
                        let _ = fs::remove_file(&path);
                    }
                }
                Err(e) => {
                    self.metrics
                        .journal_errors
                        .with_label_values(&["rotate"])
                        .inc();
                    tracing::warn!(error = %e, "cannot start a new journal segment; appending to the current one");
                }
            }
        }
        if reopen {
            let run = new_run();
            match create_segment(dir, &run, 0) {
                Ok((file, path)) => {
                    let mut w = self.writer();
                    self.write_pending(&mut w);
                    let old_run = std::mem::replace(&mut w.run, run.clone());
                    let old = std::mem::replace(&mut w.target, Target::File(Arc::new(file)));
                    if let Target::Memory(bytes) = old {
                        if !bytes.is_empty() {
                            w.events.push(Event::Memory {
                                run: old_run.clone(),
                                bytes,
                            });
                        }
                    }
                    w.events.push(Event::Ended { run: old_run });
                    w.events.push(Event::Segment { run, path });
                    w.next_row = 1;
                    w.seq = 0;
                    w.segment_bytes = 0;
                    w.failing = false;
                    tracing::info!("journal writable again");
                }
                Err(e) => {
                    self.writer().last_reopen = Instant::now();
                    tracing::warn!(error = %e, "journal still not writable");
                }
            }
        }
    }

    /// Forces what was appended to disk (the fsync thread, and shutdown).
    pub(crate) fn sync(&self) {
        let files = {
            let mut w = self.writer();
            self.write_pending(&mut w);
            let mut files = std::mem::take(&mut w.unsynced);
            if w.dirty {
                if let Target::File(f) = &w.target {
                    files.push(f.clone());
                }
                w.dirty = false;
            }
            files
        };
        for f in files {
            if let Err(e) = f.sync_data() {
                self.metrics
                    .journal_errors
                    .with_label_values(&["fsync"])
                    .inc();
                tracing::error!(error = %e, "journal fsync failed");
            }
        }
    }

    /// Ends the run on disk (shutdown, once everything is shipped): rows
    /// after this are kept in memory, and the run's segments can be
    /// deleted once read.
    pub(crate) fn seal(&self) {
        let mut w = self.writer();
        self.write_pending(&mut w);
        if let Target::File(f) = std::mem::replace(&mut w.target, Target::Memory(Vec::new())) {
            w.unsynced.push(f);
            let ended = std::mem::replace(&mut w.run, new_run());
            w.events.push(Event::Ended { run: ended });
            w.next_row = 1;
            w.seq = 0;
            w.segment_bytes = 0;
        }
    }

    /// `off` (`ledger.journal = false`), `memory` (the disk failed; rows
    /// are in memory) or `ok`.
    pub(crate) fn status(&self) -> &'static str {
        if self.dir.is_none() {
            "off"
        } else if self.writer().failing {
            "memory"
        } else {
            "ok"
        }
    }

    /// The current segment is full: the next `maintain` rotates.
    #[cfg(test)]
    pub(crate) fn fill_segment_for_test(&self) {
        self.writer().segment_bytes = ROTATE_BYTES;
    }

    /// The run rows are appended to now.
    #[cfg(test)]
    pub(crate) fn current_run(&self) -> Arc<str> {
        self.writer().run.clone()
    }
}

impl Writer {
    /// Rows of the current run written to its segment, numbered from
    /// `first`, for the shipper ([`Event::Rows`]).
    fn hand_over(&mut self, first: u64, entries: Vec<Entry>) {
        let run = self.run.clone();
        self.events.push(Event::Rows {
            run,
            first,
            entries,
        });
    }

    fn rotate_due(&self) -> bool {
        !self.failing && self.segment_bytes >= ROTATE_BYTES
    }

    fn reopen_due(&self) -> bool {
        self.failing && self.last_reopen.elapsed() >= REOPEN_EVERY
    }

    /// `line` holds the rows of `bodies`, numbered from `next_row` on.
    fn number_lines(&mut self, bodies: &[String]) {
        self.line.clear();
        for body in bodies {
            push_line(self.next_row, body, &mut self.line);
            self.next_row += 1;
        }
    }

    fn new(run: Arc<str>, target: Target) -> Writer {
        Writer {
            run,
            next_row: 1,
            seq: 0,
            target,
            segment_bytes: 0,
            events: Vec::new(),
            unsynced: Vec::new(),
            dirty: false,
            failing: false,
            last_reopen: Instant::now(),
            line: Vec::with_capacity(160),
            pending: Vec::new(),
            pending_entries: Vec::new(),
        }
    }
}

/// `write_all`, which on failure also tells how many bytes went out.
fn write_counted(file: &File, mut bytes: &[u8]) -> Result<(), (io::Error, usize)> {
    let total = bytes.len();
    let mut f = file;
    while !bytes.is_empty() {
        match f.write(bytes) {
            Ok(0) => {
                return Err((
                    io::Error::from(io::ErrorKind::WriteZero),
                    total - bytes.len(),
                ))
            }
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, total - bytes.len())),
        }
    }
    Ok(())
}

/// Takes the directory's lock, or says who holds it.
fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("ledger.journal_dir: cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let holder = if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            return Err(format!(
                "ledger.journal_dir {} is in use by another embedgate process{holder}; each replica needs a journal directory of its own",
                dir.display()
            ));
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(format!(
                "ledger.journal_dir: cannot lock {}: {e}",
                path.display()
            ))
        }
    }
    let _ = file.set_len(0);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// Segments left in `dir` by a gateway that is not running (its lock is
/// free): rows it may not have shipped. `None` when there are none, or a
/// gateway holds the directory.
pub(crate) fn unshipped_segments(dir: &Path) -> Option<usize> {
    let n: usize = leftovers(dir).ok()?.iter().map(|l| l.segments.len()).sum();
    if n == 0 {
        return None;
    }
    let lock = File::open(dir.join(LOCK_FILE)).ok();
    match lock.map(|f| f.try_lock_shared()) {
        Some(Err(fs::TryLockError::WouldBlock)) => None,
        _ => Some(n),
    }
}

fn segment_name(run: &str, seq: u32) -> String {
    format!("{run}-{seq:06}{SEGMENT_SUFFIX}")
}

/// A new, empty segment, its directory entry forced to disk.
fn create_segment(dir: &Path, run: &str, seq: u32) -> io::Result<(File, PathBuf)> {
    let path = dir.join(segment_name(run, seq));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)?;
    File::open(dir)?.sync_all()?;
    Ok((file, path))
}

/// The segments in `dir`, by run.
fn leftovers(dir: &Path) -> io::Result<Vec<Leftover>> {
    let mut runs: BTreeMap<String, Vec<(u32, PathBuf)>> = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some((run, seq)) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.rsplit_once('-'))
        else {
            continue;
        };
        let Ok(seq) = seq.parse::<u32>() else {
            continue;
        };
        if run.len() != 32 || !run.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        runs.entry(run.to_string())
            .or_default()
            .push((seq, entry.path()));
    }
    Ok(runs
        .into_iter()
        .map(|(run, mut segments)| {
            segments.sort();
            Leftover {
                run: Arc::from(run),
                segments,
            }
        })
        .collect())
}

/// Reads a segment from where it stopped last time.
pub(crate) struct SegmentReader {
    pub(crate) path: PathBuf,
    file: Option<File>,
    offset: u64,
}

/// What one read found.
pub(crate) enum Line {
    Row(u64, Entry),
    /// A line that is not a whole, intact row (a torn write at the end of
    /// a crashed segment, or damage).
    Damaged,
}

impl SegmentReader {
    pub(crate) fn new(path: PathBuf) -> SegmentReader {
        SegmentReader {
            path,
            file: None,
            offset: 0,
        }
    }

    /// Reads the lines appended since the last call. A line still being
    /// written is left for the next call, unless the segment is `sealed`
    /// (nothing more will be appended): then it is damaged. Returns true
    /// when a sealed segment has been read to its end.
    pub(crate) fn read(&mut self, sealed: bool, mut each: impl FnMut(Line)) -> io::Result<bool> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(false);
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let whole = lines(&buf, &mut each);
        self.offset += whole as u64;
        if sealed {
            if whole < buf.len() {
                each(Line::Damaged);
                self.offset = self.offset.saturating_add((buf.len() - whole) as u64);
            }
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

/// Hands each newline-terminated line of `buf` to `each`; returns the
/// length of those lines (the rest is an unfinished line).
pub(crate) fn lines(buf: &[u8], each: &mut impl FnMut(Line)) -> usize {
    let mut start = 0;
    while let Some(n) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + n];
        each(match decode_line(line) {
            Some((row, entry)) => Line::Row(row, entry),
            None => Line::Damaged,
        });
        start += n + 1;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{reconcile, Usage};

    fn entry(tenant: &str, cache: CacheStatus) -> Entry {
        let mut items = Counts::default();
        items.set(Modality::Text, 2);
        items.set(Modality::Audio, 1);
        let w = crate::config::Weights {
            text: 1,
            image: 1,
            audio: 2,
        };
        let computed = Usage::of(items, &w);
        let mut billed = items;
        billed.set(Modality::Image, 3);
        let r = reconcile(computed, Some(Usage::of(billed, &w)));
        Entry::new(
            &Arc::from(tenant),
            "text-embedding-v4",
            Day::from_days(20_000),
            cache,
            &r,
        )
    }

    fn config(dir: &Path) -> LedgerConfig {
        LedgerConfig {
            journal: true,
            journal_dir: dir.join("journal"),
            fsync_interval: Duration::from_millis(10),
            sqlite_path: dir.join("ledger.sqlite"),
        }
    }

    /// The rows the events carry, in order: read from their segments and
    /// memory. The rows handed over with the events (what the shipper
    /// takes) must be the segments' rows exactly.
    fn read_all(events: &[Event]) -> Vec<(u64, Entry)> {
        let mut rows = Vec::new();
        let mut from_files = Vec::new();
        let mut fed = Vec::new();
        for e in events {
            let mut read = Vec::new();
            let mut each = |l: Line| match l {
                Line::Row(n, e) => read.push((n, e)),
                Line::Damaged => panic!("damaged line"),
            };
            match e {
                Event::Segment { path, .. } => {
                    SegmentReader::new(path.clone())
                        .read(true, &mut each)
                        .unwrap();
                    from_files.extend_from_slice(&read);
                }
                Event::Memory { bytes, .. } => {
                    assert_eq!(lines(bytes, &mut each), bytes.len());
                }
                Event::Rows { first, entries, .. } => {
                    fed.extend((*first..).zip(entries.iter().cloned()));
                }
                Event::Ended { .. } => {}
            }
            rows.append(&mut read);
        }
        assert_eq!(fed, from_files, "the rows handed over are the rows written");
        rows
    }

    #[test]
    fn lines_round_trip_and_damage_is_recognised() {
        let e = entry("search", CacheStatus::Miss);
        assert!(e.upstream && e.mismatch);
        let mut body = String::new();
        e.encode_body(&mut body);
        let mut line = Vec::new();
        push_line(42, &body, &mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let text = &line[..line.len() - 1];
        assert_eq!(decode_line(text), Some((42, e.clone())));
        // Any cut or changed byte is refused.
        for cut in 0..text.len() {
            assert_eq!(decode_line(&text[..cut]), None, "cut at {cut}");
        }
        for i in 0..text.len() {
            let mut bad = text.to_vec();
            bad[i] ^= 0x01;
            assert_eq!(decode_line(&bad), None, "byte {i} changed");
        }
    }

    /// A line as the gateway wrote it before the ledger had a model (three
    /// modalities, no version marker), checksum and all.
    fn v1_line(body: &str) -> Vec<u8> {
        let mut line = Vec::new();
        let head = format!("{body} ");
        line.extend_from_slice(head.as_bytes());
        let sum = fnv1a(&line);
        line.extend_from_slice(format!("{sum:08x}").as_bytes());
        line
    }

    #[test]
    fn lines_of_the_format_before_models_are_read_as_one_peace() {
        // Written by hand as the main branch before ca8dec8 wrote them:
        // `<row> <day> <cache> <flags> <items×3> <units×3> <computed×3> <tenant>`.
        let line = v1_line("7 20000 miss 3 2 1 1 2 1 2 2 0 2 search");
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            format!(
                "7 20000 miss 3 2 1 1 2 1 2 2 0 2 search {:08x}",
                fnv1a(b"7 20000 miss 3 2 1 1 2 1 2 2 0 2 search ")
            )
        );
        let (row, e) = decode_line(&line).unwrap();
        assert_eq!(row, 7);
        assert_eq!(&*e.model, LEGACY_MODEL);
        assert_eq!(&*e.tenant, "search");
        assert_eq!(e.day, Day::from_days(20_000));
        assert_eq!(e.cache, CacheStatus::Miss);
        assert!(e.upstream && e.mismatch);
        assert_eq!(
            [
                Modality::Text,
                Modality::Image,
                Modality::Audio,
                Modality::Video
            ]
            .map(|m| (e.items.get(m), e.units.get(m), e.computed.get(m))),
            [(2, 2, 2), (1, 1, 0), (1, 2, 2), (0, 0, 0)]
        );
        // With video (four modalities), as main wrote after ca8dec8.
        let (_, e4) = decode_line(&v1_line("1 20000 hit 0 1 0 0 5 1 0 0 5 1 0 0 5 ads")).unwrap();
        assert_eq!(
            (&*e4.model, e4.items.get(Modality::Video)),
            (LEGACY_MODEL, 5)
        );
        // Wrong arity, a partial row and a damaged checksum are refused.
        for bad in [
            "1 20000 hit 0 1 0 0 1 0 0 1 0 ads",
            "1 20000 partial 0 1 0 0 1 0 0 1 0 0 ads",
        ] {
            assert_eq!(decode_line(&v1_line(bad)), None, "{bad}");
        }
        let mut damaged = line.clone();
        damaged[2] = b'3';
        assert_eq!(decode_line(&damaged), None);
    }

    #[test]
    fn v2_lines_carry_the_model_and_refuse_bad_ones() {
        let e = entry("search", CacheStatus::Hit);
        let mut body = String::new();
        e.encode_body(&mut body);
        assert!(
            body.starts_with(&format!(" v3 {} 20000 hit 3 text-embedding-v4 4 ", e.at_ms)),
            "{body}"
        );
        // A v2 line written with fewer modalities than this build knows
        // (and a bad model, a partial row) by hand.
        let with = |s: &str| v1_line(s);
        let (_, e3) = decode_line(&with(
            "2 v2 20000 miss 1 qwen3-vl-embedding 3 1 2 3 1 2 3 1 2 3 ads",
        ))
        .unwrap();
        assert_eq!(&*e3.model, "qwen3-vl-embedding");
        // A v2 row's time is the start of its day.
        assert_eq!(e3.at_ms, 20_000 * MS_PER_DAY);
        let (_, e3b) = decode_line(&with(
            "2 v3 1728000123456 20000 miss 1 qwen3-vl-embedding 3 1 2 3 1 2 3 1 2 3 ads",
        ))
        .unwrap();
        assert_eq!(
            (e3b.at_ms, &*e3b.model),
            (1_728_000_123_456, "qwen3-vl-embedding")
        );
        assert_eq!(
            decode_line(&with(
                "2 v3 soon 20000 miss 1 qwen3-vl-embedding 3 1 2 3 1 2 3 1 2 3 ads"
            )),
            None
        );
        assert_eq!(e3.items.get(Modality::Audio), 3);
        for bad in [
            "2 v2 20000 miss 1 bad|model 3 1 2 3 1 2 3 1 2 3 ads",
            "2 v2 20000 partial 1 m 3 1 2 3 1 2 3 1 2 3 ads",
            "2 v2 20000 miss 1 m 9 1 2 3 1 2 3 1 2 3 ads",
            "2 v2 20000 miss 1 m 3 1 2 3 1 2 3 1 2 3 ads extra",
        ] {
            assert_eq!(decode_line(&with(bad)), None, "{bad}");
        }
    }

    #[test]
    fn a_directory_is_locked_to_one_journal_and_left_rows_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let cfg = config(dir.path());
        let (j, left) = Journal::open(&cfg, metrics.clone()).unwrap();
        assert!(left.is_empty());
        let err = Journal::open(&cfg, metrics.clone()).err().unwrap();
        assert!(err.contains("in use by another embedgate process"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        let e = entry("search", CacheStatus::Hit);
        for _ in 0..3 {
            j.append(e.clone());
        }
        let events = j.poll();
        let rows = read_all(&events);
        assert_eq!(
            rows.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let run = j.current_run();
        drop(j);
        // The lock goes with the journal; the rows stay for the next one.
        let (j2, left) = Journal::open(&cfg, metrics).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].run, run);
        assert_ne!(j2.current_run(), run);
        assert_eq!(left[0].segments.len(), 1);
    }

    #[test]
    fn segments_rotate_and_rows_keep_counting() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(&config(dir.path()), Arc::new(Metrics::new().unwrap())).unwrap();
        let e = entry("search", CacheStatus::Miss);
        j.append(e.clone());
        j.writer().segment_bytes = ROTATE_BYTES;
        j.maintain();
        j.append(e.clone());
        j.sync();
        let events = j.poll();
        let segments: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::Segment { path, .. } => {
                    Some(path.file_name().unwrap().to_string_lossy().into_owned())
                }
                _ => None,
            })
            .collect();
        let run = j.current_run();
        assert_eq!(
            segments,
            vec![format!("{run}-000000.jnl"), format!("{run}-000001.jnl")]
        );
        let rows = read_all(&events);
        assert_eq!(rows.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn an_unfinished_line_waits_unless_the_segment_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jnl");
        let e = entry("ads", CacheStatus::Unknown);
        let mut body = String::new();
        e.encode_body(&mut body);
        let mut line = Vec::new();
        push_line(1, &body, &mut line);
        let mut content = line.clone();
        content.extend_from_slice(&line[..10]);
        fs::write(&path, &content).unwrap();
        let mut r = SegmentReader::new(path.clone());
        let mut seen = Vec::new();
        assert!(!r
            .read(false, |l| seen.push(matches!(l, Line::Row(1, _))))
            .unwrap());
        assert_eq!(seen, vec![true]);
        assert!(r
            .read(true, |l| seen.push(matches!(l, Line::Row(..))))
            .unwrap());
        assert_eq!(seen, vec![true, false]);
    }

    #[tokio::test]
    async fn a_batch_is_one_write_and_wakes_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (j, _) = Journal::open(&config(dir.path()), metrics).unwrap();
        let e = entry("search", CacheStatus::Hit);
        let file_len = |j: &Journal| match &j.writer().target {
            Target::File(f) => f.metadata().unwrap().len(),
            Target::Memory(_) => panic!("not a file"),
        };
        let first = j.append_batched(e.clone());
        assert!(first.opened);
        let others: Vec<Batch> = (0..3).map(|_| j.append_batched(e.clone())).collect();
        assert!(others.iter().all(|b| !b.opened && b.number == first.number));
        // Nothing written yet; a row waiting for its batch waits.
        assert_eq!(file_len(&j), 0);
        let waiter = {
            let j = j.clone();
            tokio::spawn(async move { j.written(first.number).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        j.flush();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .unwrap();
        let one_line = file_len(&j) / 4;
        assert!(one_line > 0 && file_len(&j) == 4 * one_line);
        // The next row opens the next batch; a plain append writes it too,
        // rows numbered in order.
        let next = j.append_batched(e.clone());
        assert!(next.opened && next.number == first.number + 1);
        j.append(e.clone());
        j.written(next.number).await;
        let rows: Vec<u64> = read_all(&j.poll()).iter().map(|r| r.0).collect();
        assert_eq!(rows, vec![1, 2, 3, 4, 5, 6]);
        // Without a journal file a row is kept at once.
        let off = LedgerConfig {
            journal: false,
            ..config(dir.path())
        };
        let (m, _) = Journal::open(&off, Arc::new(Metrics::new().unwrap())).unwrap();
        let b = m.append_batched(e.clone());
        assert!(!b.opened);
        m.written(b.number).await;
    }

    #[test]
    fn a_failed_append_keeps_the_row_in_memory_until_the_disk_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (j, _) = Journal::open(&config(dir.path()), metrics.clone()).unwrap();
        let e = entry("search", CacheStatus::Miss);
        j.append(e.clone());
        let first = j.current_run();
        // A file that refuses writes stands in for a full or failing disk.
        let ro = dir.path().join("read-only");
        fs::write(&ro, b"").unwrap();
        j.writer().target = Target::File(Arc::new(File::open(&ro).unwrap()));
        j.append(e.clone());
        j.append(e.clone());
        assert_eq!(j.status(), "memory");
        assert_eq!(
            metrics.journal_errors.with_label_values(&["append"]).get(),
            1
        );
        let second = j.current_run();
        assert_ne!(first, second);
        // The disk is tried again after a while.
        j.writer().last_reopen = Instant::now() - REOPEN_EVERY;
        j.maintain();
        assert_eq!(j.status(), "ok");
        j.append(e.clone());
        let third = j.current_run();
        let events = j.poll();
        let order: Vec<String> = events
            .iter()
            .map(|ev| match ev {
                Event::Segment { run, .. } => format!("segment {run}"),
                Event::Memory { run, bytes } => {
                    format!(
                        "memory {run} {}",
                        bytes.iter().filter(|&&b| b == b'\n').count()
                    )
                }
                Event::Ended { run } => format!("ended {run}"),
                Event::Rows { run, entries, .. } => format!("rows {run} {}", entries.len()),
            })
            .collect();
        assert_eq!(
            order,
            vec![
                format!("segment {first}"),
                format!("rows {first} 1"),
                format!("ended {first}"),
                format!("memory {second} 2"),
                format!("ended {second}"),
                format!("segment {third}"),
                format!("rows {third} 1"),
            ]
        );
        // Every row is there once: one on the first segment, two in
        // memory (numbered from 1 in their own run), one on the new segment.
        let rows = read_all(&events);
        assert_eq!(
            rows.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 1, 2, 1]
        );
    }

    /// The cost of an append as the request path pays it (one formatted
    /// line, one `write(2)` under the mutex), from two threads at once:
    /// `cargo test --release --lib -- --ignored append_cost --nocapture`.
    #[test]
    #[ignore]
    fn append_cost() {
        let dir = tempfile::tempdir().unwrap();
        for journal in [true, false] {
            let mut cfg = config(dir.path());
            cfg.journal = journal;
            let (j, _) = Journal::open(&cfg, Arc::new(Metrics::new().unwrap())).unwrap();
            let e = entry("search", CacheStatus::Hit);
            let n = 200_000;
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..n / 2 {
                            j.append(e.clone());
                        }
                    });
                }
            });
            let per = start.elapsed().as_nanos() / n;
            println!("journal = {journal}: {per} ns per append (wall, 2 threads)");
            drop(j.poll());
        }
    }

    #[test]
    fn without_a_journal_rows_are_in_memory() {
        let mut cfg = config(Path::new("/nonexistent"));
        cfg.journal = false;
        let (j, left) = Journal::open(&cfg, Arc::new(Metrics::new().unwrap())).unwrap();
        assert!(left.is_empty());
        assert_eq!(j.status(), "off");
        j.append(entry("search", CacheStatus::Hit));
        let rows = read_all(&j.poll());
        assert_eq!(rows.len(), 1);
        assert!(j.poll().is_empty());
    }
}
