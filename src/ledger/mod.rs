//! The usage ledger: per tenant, UTC day, model, modality and cache status
//! (hit, miss or unknown: a partial answer is two calls), the items and
//! units of every metered call, with the figures to reconcile them with
//! upstream's bill and their cost ([`report`]). A model name must be 1-64
//! bytes of `[A-Za-z0-9._-]`; a call to another is logged, counted
//! (`embedgate_ledger_rejected_rows_total`) and not recorded.
//!
//! The path of one answer:
//!
//! 1. [`Ledger::record_answer`] appends it to this replica's [`journal`]
//!    before the response is sent: one `write(2)` for the answers metered
//!    at the same time (group commit), so a crash of the process loses
//!    nothing (a power loss at most `ledger.fsync_interval`).
//! 2. A background shipper takes the rows written to the journal every
//!    50 ms (from memory: the journal hands over each row it wrote, so this
//!    process never reads its own segments back) and writes them to the
//!    [`store`]: Redis, shared by every replica, or without Redis
//!    the embedded SQLite database. Rows are summed per (journal run,
//!    tenant, day) into one batch that carries the number of its last row;
//!    the store applies it only if it has not applied that row yet, so a
//!    retried batch, or a journal shipped again after a crash, counts once.
//!    A group's next batch waits until the one before is confirmed, so a
//!    retry is always the same batch.
//! 3. Once every row of a journal segment is confirmed the segment is
//!    deleted. At start the journal's leftovers (a crash, a store that was
//!    down at shutdown) are read with the store's last applied row per
//!    group and shipped from there.
//!
//! While the store is down rows wait in the journal (memory holds only
//! their sums per group). Reports are read-your-writes on the replica that
//! answered: a report first ships everything journaled so far.
//!
//! With `[events]` configured, the same journal lines are also sent out as
//! CloudEvents ([`events`]): a segment is then deleted only when both the
//! store and the events receiver have all its rows.

mod events;
pub(crate) mod export;
mod journal;
pub(crate) mod report;
mod store;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::{EventsConfig, LedgerConfig};
use crate::date::Day;
use crate::metering::{valid_model_name, CacheStatus, Reconciled};
use crate::metrics::Metrics;
use crate::redis_store::RedisStore;

use events::Events;
use journal::{Entry, Event, Journal, Leftover, Line, SegmentReader};
pub(crate) use report::Report;
use report::{Prices, Sums};
use store::{Batch, Fields, Sink, SinkError, Sqlite};

/// How long the shipper gathers answers before a shipment.
const FLUSH_WINDOW: Duration = Duration::from_millis(50);
/// The shipper looks at the journal at least this often, also when idle
/// (leftovers whose store was down, a journal that failed).
const IDLE_TICK: Duration = Duration::from_millis(500);

/// Why a report could not be made.
#[derive(Debug)]
pub(crate) enum LedgerError {
    Store(SinkError),
    /// Rows of the report's range are journaled here but the store has not
    /// confirmed them: the report would be short.
    Unshipped,
}

impl std::fmt::Display for LedgerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerError::Store(e) => e.fmt(f),
            LedgerError::Unshipped => {
                f.write_str("rows of this range are journaled but not yet in the ledger")
            }
        }
    }
}

type GroupKey = (Arc<str>, Day);

/// Writes the journal's open batch when dropped: the request that opened
/// it writes it even if it is cancelled while the others join.
struct WriteOnDrop<'a>(&'a Journal);

impl Drop for WriteOnDrop<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// One (run, tenant, day): what the store has, what is being written,
/// what waits.
#[derive(Default)]
struct Group {
    /// The last row the store confirmed.
    applied: u64,
    /// The batch being written; retried unchanged until confirmed.
    inflight: Option<InFlight>,
    /// Rows read since, summed.
    pending: Sums,
    pending_rows: u64,
    /// The last row read.
    read_to: u64,
}

struct InFlight {
    to: u64,
    fields: Fields,
    rows: u64,
}

impl Group {
    fn clean(&self) -> bool {
        self.inflight.is_none() && self.pending_rows == 0
    }
}

struct Segment {
    reader: SegmentReader,
    /// This process's segment: its rows come from the journal in memory
    /// ([`Event::Rows`]), the file is never read.
    fed: bool,
    /// Every row taken (read to its end, or fed and closed), and nothing
    /// more will be appended.
    done: bool,
    read_errors: u64,
}

/// One journal run.
struct Run {
    /// In order.
    segments: Vec<Segment>,
    /// No more rows will be appended.
    ended: bool,
    /// The store's last applied row per group is known (always, for this
    /// process's runs; fetched for leftovers before their rows are read).
    markers_known: bool,
    /// A leftover's groups, found by a first pass over its segments.
    scanned: Option<Vec<GroupKey>>,
    groups: HashMap<GroupKey, Group>,
}

impl Run {
    fn live() -> Run {
        Run {
            segments: Vec::new(),
            ended: false,
            markers_known: true,
            scanned: None,
            groups: HashMap::new(),
        }
    }

    fn leftover(l: Leftover) -> Run {
        Run {
            segments: l
                .segments
                .into_iter()
                .map(|(_, path)| Segment::new(path, false))
                .collect(),
            ended: true,
            markers_known: false,
            scanned: None,
            groups: HashMap::new(),
        }
    }

    fn clean(&self) -> bool {
        self.markers_known && self.groups.values().all(Group::clean)
    }
}

impl Segment {
    fn new(path: std::path::PathBuf, fed: bool) -> Segment {
        Segment {
            reader: SegmentReader::new(path),
            fed,
            done: false,
            read_errors: 0,
        }
    }
}

/// Adds one journal line to its group.
fn take(groups: &mut HashMap<GroupKey, Group>, metrics: &Metrics, line: Line) {
    match line {
        Line::Damaged => {
            metrics.journal_damaged_rows.inc();
            tracing::warn!("a journal line is torn or damaged (a power loss?) and is skipped");
        }
        Line::Row(n, e) => {
            let g = groups.entry((e.tenant.clone(), e.day)).or_default();
            // At or below the store's mark: shipped before (a leftover).
            if n <= g.applied || n <= g.read_to {
                return;
            }
            g.pending.add(&e);
            g.pending_rows += 1;
            g.read_to = n;
        }
    }
}

#[derive(Default)]
struct Ship {
    runs: HashMap<Arc<str>, Run>,
}

pub(crate) struct Ledger {
    journal: Arc<Journal>,
    sink: Sink,
    ship: Mutex<Ship>,
    /// One shipment at a time: the background shipper, reports, shutdown.
    round: tokio::sync::Mutex<()>,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Usage events out (`events.url` set).
    events: Option<Arc<Events>>,
}

impl Ledger {
    /// Opens the journal (locking its directory) and the store (SQLite
    /// without Redis), and starts the shipper; leftovers of an earlier
    /// process are shipped first. Must run inside a tokio runtime.
    #[cfg(test)]
    pub(crate) fn open(
        config: &LedgerConfig,
        redis: Option<Arc<RedisStore>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Ledger>, String> {
        Ledger::open_with_events(config, &EventsConfig::default(), redis, metrics)
    }

    /// [`Ledger::open`], and the usage events shipper when `events.url`
    /// is set.
    pub(crate) fn open_with_events(
        config: &LedgerConfig,
        events: &EventsConfig,
        redis: Option<Arc<RedisStore>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Ledger>, String> {
        let sink = match redis {
            Some(r) => Sink::redis(r),
            None => Sink::Sqlite(Arc::new(Sqlite::create(&config.sqlite_path)?)),
        };
        let (journal, leftovers) = Journal::open(config, metrics.clone())?;
        let events = Events::new(
            events,
            config.journal.then_some(config.journal_dir.as_path()),
            metrics.clone(),
        )?;
        let mut ship = Ship::default();
        for l in leftovers {
            if let Some(e) = &events {
                for (_, path) in &l.segments {
                    e.leftover(&l.run, path);
                }
            }
            tracing::info!(run = %l.run, segments = l.segments.len(), "journal rows of an earlier process found; shipping them");
            ship.runs.insert(l.run.clone(), Run::leftover(l));
        }
        let ledger = Arc::new(Ledger {
            journal,
            sink,
            ship: Mutex::new(ship),
            round: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            metrics,
            events,
        });
        if let Some(e) = &ledger.events {
            e.start();
        }
        let l = ledger.clone();
        tokio::spawn(async move { l.shipper().await });
        ledger.wake.notify_one();
        Ok(ledger)
    }

    /// Records one metered call to `model`; returns once it is in the
    /// journal. A model name that cannot be a ledger key, or a `partial`
    /// status (a request's, not a call's), is refused: logged and counted.
    pub(crate) fn record(
        &self,
        tenant: &Arc<str>,
        model: &str,
        cache: CacheStatus,
        r: &Reconciled,
    ) {
        if !self.recordable(tenant, model, cache, r) {
            return;
        }
        self.journal
            .append(Entry::new(tenant, model, Day::today(), cache, r));
        self.recorded();
    }

    /// False (logged and counted) for a row the ledger does not take.
    fn recordable(
        &self,
        tenant: &Arc<str>,
        model: &str,
        cache: CacheStatus,
        r: &Reconciled,
    ) -> bool {
        if !valid_model_name(model) || !cache.is_row_status() {
            self.metrics.ledger_rejected_rows.inc();
            let shown: String = model
                .chars()
                .take(80)
                .collect::<String>()
                .escape_debug()
                .collect();
            tracing::error!(
                %tenant,
                model = %shown,
                cache = cache.as_str(),
                units = r.record.total(),
                "a metered call is not recorded in the ledger: its model name is not 1-64 bytes of [A-Za-z0-9._-], or its status is partial"
            );
            return false;
        }
        true
    }

    /// [`Ledger::record`] for an answer's request: the row is written with
    /// the others recorded meanwhile on this worker, one `write(2)` for all
    /// (group commit). Returns once it is in the journal. The request that
    /// opens a batch lets the others run first and then writes it (also
    /// when it is cancelled meanwhile); the others wait for it.
    pub(crate) async fn record_answer(
        &self,
        tenant: &Arc<str>,
        model: &str,
        cache: CacheStatus,
        r: &Reconciled,
    ) {
        if !self.recordable(tenant, model, cache, r) {
            return;
        }
        let batch = self
            .journal
            .append_batched(Entry::new(tenant, model, Day::today(), cache, r));
        if batch.opened {
            let writer = WriteOnDrop(&self.journal);
            tokio::task::yield_now().await;
            drop(writer);
        } else {
            self.journal.written(batch.number).await;
        }
        self.recorded();
    }

    fn recorded(&self) {
        self.wake.notify_one();
        if let Some(e) = &self.events {
            e.notify();
        }
    }

    /// `ok`, `memory` (the disk failed; rows wait in memory) or `off`.
    pub(crate) fn journal_status(&self) -> &'static str {
        self.journal.status()
    }

    fn state(&self) -> MutexGuard<'_, Ship> {
        self.ship.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn shipper(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(IDLE_TICK, self.wake.notified()).await;
            // Let answers accumulate: one write per group per window.
            tokio::time::sleep(FLUSH_WINDOW).await;
            if let Some(redis) = self.sink.redis_down() {
                if !self.state().runs.values().all(Run::clean) {
                    // Nothing will get through; wait for Redis (or the next tick).
                    let _ = tokio::time::timeout(Duration::from_secs(1), redis.wait_up()).await;
                }
            }
            // In a task of its own: a bug that panics costs one round, not
            // the shipper.
            let me = self.clone();
            let round = tokio::spawn(async move {
                let _round = me.round.lock().await;
                me.ship_once().await
            });
            if let Err(e) = round.await {
                tracing::error!(error = %e, "ledger shipment failed; trying again");
            }
        }
    }

    /// One shipment: reads the journal, writes what it read, tidies up.
    /// The caller holds `round`. Returns true when everything read is
    /// confirmed.
    async fn ship_once(self: &Arc<Self>) -> bool {
        let need = self
            .off_worker_if(Ledger::reads_files, Ledger::read_journal)
            .await;
        if !need.is_empty() {
            for (run, groups) in need {
                match self.sink.applied(&run, &groups).await {
                    Ok(marks) => {
                        let mut st = self.state();
                        if let Some(r) = st.runs.get_mut(&run) {
                            for (key, mark) in groups.into_iter().zip(marks) {
                                r.groups.entry(key).or_default().applied = mark;
                            }
                            r.markers_known = true;
                            r.scanned = None;
                        }
                    }
                    Err(e) => {
                        self.metrics.ledger_flush_errors.inc();
                        tracing::debug!(%run, error = %e, "cannot read the ledger's marks for journal leftovers; will retry");
                    }
                }
            }
            self.off_worker_if(Ledger::reads_files, Ledger::read_journal)
                .await;
        }
        let batches = self.batches();
        if !batches.is_empty() {
            let results = self.sink.apply(batches.clone()).await;
            let mut st = self.state();
            for (b, r) in batches.iter().zip(results) {
                match r {
                    Ok(()) => {
                        if let Some(g) = st
                            .runs
                            .get_mut(&b.run)
                            .and_then(|run| run.groups.get_mut(&(b.tenant.clone(), b.day)))
                        {
                            g.applied = g.applied.max(b.to);
                            g.inflight = None;
                        }
                    }
                    Err(e) => {
                        self.metrics.ledger_flush_errors.inc();
                        tracing::debug!(tenant = %b.tenant, error = %e, "ledger write failed; kept for retry");
                    }
                }
            }
        }
        self.off_worker_if(Ledger::tidies_files, Ledger::tidy).await
    }

    /// `f` on a blocking thread when `files` says it will touch files,
    /// otherwise here: a round with nothing to read or delete (the usual
    /// one: rows come from memory) wakes no other thread, which on a
    /// machine whose cores are busy would preempt a request worker.
    async fn off_worker_if<T: Default + Send + 'static>(
        self: &Arc<Self>,
        files: fn(&Ledger) -> bool,
        f: fn(&Ledger) -> T,
    ) -> T {
        if files(self) {
            self.blocking(f).await
        } else {
            f(self)
        }
    }

    /// [`Ledger::read_journal`] has segments to read: leftovers.
    fn reads_files(&self) -> bool {
        self.state()
            .runs
            .values()
            .any(|r| !r.markers_known || r.segments.iter().any(|s| !s.fed && !s.done))
    }

    /// [`Ledger::tidy`] has segments to delete, or the journal a segment
    /// to start.
    fn tidies_files(&self) -> bool {
        self.journal.maintenance_due()
            || self
                .state()
                .runs
                .values()
                .any(|r| r.clean() && r.segments.iter().any(|s| s.done))
    }

    /// Runs blocking file work off the async workers. A panic in it (a
    /// bug) is logged and counts as nothing done; the next round tries
    /// again.
    async fn blocking<T: Default + Send + 'static>(self: &Arc<Self>, f: fn(&Ledger) -> T) -> T {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "ledger file work failed");
                T::default()
            }
        }
    }

    /// Reads what the journal has that was not read yet. Returns the
    /// leftover runs whose store marks are needed before their rows can be
    /// read, with their groups.
    fn read_journal(&self) -> Vec<(Arc<str>, Vec<GroupKey>)> {
        let events = self.journal.poll();
        if let Some(e) = &self.events {
            e.journal_events(&events);
        }
        let metrics = &*self.metrics;
        let mut st = self.state();
        for ev in events {
            match ev {
                Event::Segment { run, path } => {
                    let r = st.runs.entry(run).or_insert_with(Run::live);
                    // Every row of the segments before it was handed over.
                    for s in r.segments.iter_mut().filter(|s| s.fed) {
                        s.done = true;
                    }
                    r.segments.push(Segment::new(path, true));
                }
                Event::Rows {
                    run,
                    first,
                    entries,
                } => {
                    let r = st.runs.entry(run).or_insert_with(Run::live);
                    for (n, e) in (first..).zip(entries) {
                        take(&mut r.groups, metrics, Line::Row(n, e));
                    }
                }
                Event::Memory { run, bytes } => {
                    let r = st.runs.entry(run).or_insert_with(Run::live);
                    journal::lines(&bytes, &mut |l| take(&mut r.groups, metrics, l));
                }
                Event::Ended { run } => {
                    if let Some(r) = st.runs.get_mut(&run) {
                        r.ended = true;
                        for s in r.segments.iter_mut().filter(|s| s.fed) {
                            s.done = true;
                        }
                    }
                }
            }
        }
        let mut need = Vec::new();
        for (id, run) in st.runs.iter_mut() {
            if !run.markers_known {
                if run.scanned.is_none() {
                    match scan_groups(&run.segments) {
                        Ok(groups) => run.scanned = Some(groups),
                        Err(e) => {
                            metrics.journal_errors.with_label_values(&["read"]).inc();
                            tracing::warn!(run = %id, error = %e, "cannot read journal leftovers");
                        }
                    }
                }
                if let Some(groups) = &run.scanned {
                    need.push((id.clone(), groups.clone()));
                }
                continue;
            }
            let last = run.segments.len();
            let ended = run.ended;
            let groups = &mut run.groups;
            for (i, seg) in run.segments.iter_mut().enumerate() {
                if seg.done || seg.fed {
                    continue;
                }
                let sealed = ended || i + 1 < last;
                match seg.reader.read(sealed, |l| take(groups, metrics, l)) {
                    Ok(done) => seg.done = done,
                    Err(e) => {
                        seg.read_errors += 1;
                        metrics.journal_errors.with_label_values(&["read"]).inc();
                        if seg.read_errors % 100 == 1 {
                            tracing::warn!(path = %seg.reader.path.display(), error = %e, "cannot read a journal segment");
                        }
                    }
                }
            }
        }
        need
    }

    /// Every group's batch to write: the one in flight, or its pending
    /// rows as a new one.
    fn batches(&self) -> Vec<Batch> {
        let mut st = self.state();
        let mut out = Vec::new();
        for (run_id, run) in st.runs.iter_mut() {
            if !run.markers_known {
                continue;
            }
            for ((tenant, day), g) in run.groups.iter_mut() {
                if g.inflight.is_none() && g.pending_rows > 0 {
                    g.inflight = Some(InFlight {
                        to: g.read_to,
                        fields: std::mem::take(&mut g.pending).fields(),
                        rows: std::mem::take(&mut g.pending_rows),
                    });
                }
                if let Some(b) = &g.inflight {
                    out.push(Batch {
                        run: run_id.clone(),
                        tenant: tenant.clone(),
                        day: *day,
                        to: b.to,
                        fields: b.fields.clone(),
                    });
                }
            }
        }
        out
    }

    /// Deletes segments whose rows are all confirmed, forgets finished
    /// runs and old groups, rotates the journal, updates the gauge.
    /// Returns true when everything read is confirmed.
    fn tidy(&self) -> bool {
        let yesterday = Day::from_days(Day::today().days() - 1);
        let mut all_clean = true;
        let mut waiting = 0u64;
        {
            let mut st = self.state();
            st.runs.retain(|_, run| {
                if !run.clean() {
                    all_clean = false;
                    waiting += run
                        .groups
                        .values()
                        .map(|g| g.pending_rows + g.inflight.as_ref().map_or(0, |b| b.rows))
                        .sum::<u64>();
                    return true;
                }
                run.segments.retain(|s| {
                    if !s.done {
                        return true;
                    }
                    // Its usage events are not all accepted yet.
                    if self.events.as_ref().is_some_and(|e| e.holds(&s.reader.path)) {
                        return true;
                    }
                    // The segment first, then its events' cursor: a
                    // cursor left without its segment is tidied at start,
                    // a segment left without its cursor would send its
                    // events again.
                    match std::fs::remove_file(&s.reader.path) {
                        Ok(()) => {
                            let _ = std::fs::remove_file(events::cursor_path(&s.reader.path));
                            false
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            let _ = std::fs::remove_file(events::cursor_path(&s.reader.path));
                            false
                        }
                        Err(e) => {
                            tracing::warn!(path = %s.reader.path.display(), error = %e, "cannot delete a shipped journal segment");
                            true
                        }
                    }
                });
                // A later row of a forgotten group is still above the
                // store's mark, so forgetting loses nothing.
                run.groups.retain(|(_, day), _| *day >= yesterday);
                !(run.ended && run.segments.is_empty())
            });
        }
        self.journal.maintain();
        self.metrics
            .ledger_buffered
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        all_clean
    }

    /// True while rows of `from..=to` (of `tenant`, or any) are journaled
    /// here but not confirmed by the store.
    fn unshipped(&self, from: Day, to: Day, tenant: Option<&str>) -> bool {
        let st = self.state();
        st.runs.values().any(|run| {
            let matches = |(t, d): &GroupKey| {
                *d >= from && *d <= to && tenant.is_none_or(|want| want == &**t)
            };
            if !run.markers_known {
                return run
                    .scanned
                    .as_ref()
                    .is_none_or(|groups| groups.iter().any(matches));
            }
            run.groups.iter().any(|(k, g)| !g.clean() && matches(k))
        })
    }

    /// Ships everything journaled, retrying until `deadline` passes. Used
    /// on shutdown. When everything is shipped the journal's segments are
    /// deleted; otherwise they are forced to disk and shipped at the next
    /// start. Returns true when nothing is left unshipped.
    ///
    /// With usage events, their shipper flushes at the same time, until the
    /// same deadline; events it cannot deliver stay in the journal (its
    /// segments are kept) and are sent at the next start. They do not
    /// change the result: the ledger is what the exit code reports.
    pub(crate) async fn flush(self: &Arc<Self>, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        let _round = self.round.lock().await;
        let events = async {
            match &self.events {
                Some(e) => e.flush(until).await,
                None => true,
            }
        };
        let (clean, _) = tokio::join!(self.flush_ledger(until), events);
        if let Some(e) = &self.events {
            // Once more: the ledger's last round sealed the journal's run.
            if e.flush(until).await {
                self.blocking(Ledger::tidy).await;
                tracing::info!("usage events delivered");
            } else {
                tracing::error!(
                    backlog = self.metrics.events_backlog.get(),
                    "shutdown: usage events were not all accepted by events.url before exit; they stay in the journal and are sent when the gateway starts on it again"
                );
            }
        }
        clean
    }

    /// The ledger's part of [`Ledger::flush`]; the caller holds `round`.
    async fn flush_ledger(self: &Arc<Self>, until: tokio::time::Instant) -> bool {
        let mut clean = self.ship_once().await;
        while !clean && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            clean = self.ship_once().await;
        }
        if clean {
            // Later rows (requests that outlived the grace period) stay in
            // memory; one more shipment takes them and the sealed segments.
            self.journal.seal();
            clean = self.ship_once().await;
        }
        self.blocking(|l| l.journal.sync()).await;
        clean
    }

    /// The report of `from..=to`, for all tenants (or one) and all models
    /// (or one), costed with `prices`, with everything this replica has
    /// metered so far: it ships first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn report(
        self: &Arc<Self>,
        from: Day,
        to: Day,
        tenant: Option<&str>,
        model: Option<&str>,
        known_tenants: &[String],
        prices: &Prices,
    ) -> Result<Report, LedgerError> {
        let _round = self.round.lock().await;
        self.ship_once().await;
        if self.unshipped(from, to, tenant) {
            return Err(LedgerError::Unshipped);
        }
        let stored = self
            .sink
            .read(from, to, tenant, known_tenants)
            .await
            .map_err(LedgerError::Store)?;
        Ok(report::build(stored, prices, model))
    }
}

/// The groups in a leftover run's segments.
fn scan_groups(segments: &[Segment]) -> io::Result<Vec<GroupKey>> {
    let mut seen: HashMap<GroupKey, ()> = HashMap::new();
    for s in segments {
        let mut r = SegmentReader::new(s.reader.path.clone());
        r.read(true, |l| {
            if let Line::Row(_, e) = l {
                seen.insert((e.tenant, e.day), ());
            }
        })?;
    }
    Ok(seen.into_keys().collect())
}

/// A note for `embedgate usage` when the journal directory holds segments
/// of a gateway that is not running: their rows may not be in the report.
pub(crate) fn journal_note(config: &LedgerConfig) -> Option<String> {
    if !config.journal {
        return None;
    }
    let n = journal::unshipped_segments(&config.journal_dir)?;
    Some(format!(
        "{} holds {n} journal segment(s) of a gateway that stopped before shipping them (a crash, or its store was down): their rows are not in this report until a gateway starts on that directory",
        config.journal_dir.display()
    ))
}

/// `embedgate usage`: the report straight from the store (Redis, or the
/// SQLite file), without a journal; costed with the config's prices.
pub(crate) async fn read_report(
    config: &crate::Config,
    redis: Option<Arc<RedisStore>>,
    from: Day,
    to: Day,
    tenant: Option<&str>,
    model: Option<&str>,
    known: &[String],
) -> Result<Report, String> {
    let sink = match redis {
        Some(r) => Sink::redis(r),
        None => Sink::Sqlite(Arc::new(Sqlite::open_existing(&config.ledger.sqlite_path)?)),
    };
    let stored = sink
        .read(from, to, tenant, known)
        .await
        .map_err(|e| e.to_string())?;
    Ok(report::build(stored, &config.unit_prices(), model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{reconcile, Usage};
    use crate::request::{Counts, Modality};

    fn usage(text: u64, audio: u64) -> Usage {
        let mut items = Counts::default();
        items.set(Modality::Text, text);
        items.set(Modality::Audio, audio);
        Usage::of(
            items,
            &crate::config::Weights {
                text: 1,
                image: 1,
                audio: 2,
            },
        )
    }

    fn config(dir: &std::path::Path) -> LedgerConfig {
        LedgerConfig {
            journal: true,
            journal_dir: dir.join("journal"),
            fsync_interval: Duration::from_millis(10),
            sqlite_path: dir.join("ledger.sqlite"),
        }
    }

    const M: &str = "multimodal-embedding-one-peace-v1";

    fn units(r: &Report) -> u64 {
        r.rows.iter().map(|r| r.units).sum()
    }

    #[tokio::test]
    async fn answers_recorded_together_are_written_together_even_if_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let today = Day::today();
        let t: Arc<str> = Arc::from("search");
        let l = Ledger::open(&config(dir.path()), None, metrics.clone()).unwrap();
        let hit = Reconciled::own(usage(1, 0));
        // Ten answers recorded at once: all return, their rows written.
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (l, t) = (l.clone(), t.clone());
            all.spawn(async move { l.record_answer(&t, M, CacheStatus::Hit, &hit).await });
        }
        all.join_all().await;
        // One whose request goes away while its batch is open (the one
        // that opened it): its row is written anyway, and so is the row of
        // another answer in the batch, which returns.
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut opener = Box::pin(l.record_answer(&t, M, CacheStatus::Hit, &hit));
        assert!(opener.as_mut().poll(&mut cx).is_pending());
        let mut joined = Box::pin(l.record_answer(&t, M, CacheStatus::Hit, &hit));
        assert!(joined.as_mut().poll(&mut cx).is_pending());
        drop(opener);
        tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .expect("the batch was written");
        let r = l
            .report(today, today, None, None, &[], &Prices::new())
            .await
            .unwrap();
        assert_eq!(units(&r), 12);
        assert_eq!(r.figures[0].requests, 12);
    }

    /// The shipper takes this process's rows from the journal in memory:
    /// a segment's file is written, never read back. Here the file is
    /// damaged after the rows are written and they are shipped whole; once
    /// shipped, a segment the journal rotated away from is deleted.
    #[tokio::test]
    async fn rows_are_shipped_from_memory_and_shipped_segments_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let today = Day::today();
        let t: Arc<str> = Arc::from("search");
        let l = Ledger::open(&config(dir.path()), None, metrics.clone()).unwrap();
        let _round = l.round.lock().await;
        for _ in 0..5 {
            l.record(&t, M, CacheStatus::Miss, &reconcile(usage(1, 1), None));
        }
        let segment = |n: usize| {
            let mut all: Vec<_> = std::fs::read_dir(dir.path().join("journal"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
                .collect();
            all.sort();
            assert_eq!(all.len(), n, "{all:?}");
            all
        };
        let first = segment(1).remove(0);
        let written = std::fs::read(&first).unwrap();
        assert_eq!(written.iter().filter(|&&b| b == b'\n').count(), 5);
        std::fs::write(&first, vec![b'#'; written.len()]).unwrap();
        // A new segment: the first is now closed, shipped and deleted.
        l.journal.fill_segment_for_test();
        l.journal.maintain();
        l.record(&t, M, CacheStatus::Hit, &Reconciled::own(usage(1, 0)));
        assert!(l.ship_once().await);
        drop(_round);
        let r = l
            .report(today, today, None, None, &[], &Prices::new())
            .await
            .unwrap();
        assert_eq!(units(&r), 16);
        assert_eq!(r.figures[0].requests, 6);
        assert_eq!(metrics.journal_damaged_rows.get(), 0);
        let left = segment(1);
        assert_ne!(left[0], first);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_read_their_own_writes_and_survive_a_lost_process() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let today = Day::today();
        let t: Arc<str> = Arc::from("search");
        let l = Ledger::open(&config(dir.path()), None, metrics.clone()).unwrap();
        for _ in 0..10 {
            l.record(&t, M, CacheStatus::Miss, &reconcile(usage(1, 1), None));
            l.record(&t, M, CacheStatus::Hit, &Reconciled::own(usage(1, 0)));
        }
        // At once, not after a flush: read-your-writes.
        let r = l
            .report(today, today, None, None, &[], &Prices::new())
            .await
            .unwrap();
        assert_eq!(units(&r), 40);
        assert_eq!(r.figures[0].mismatches, 10);
        assert_eq!(r.figures[0].requests, 20);
        assert!(l
            .report(today, today, Some("ads"), None, &[], &Prices::new())
            .await
            .unwrap()
            .rows
            .is_empty());

        // More rows, then the process "dies": nothing shipped them. The
        // journal lock goes with the journal, as with a killed process.
        l.record(&t, M, CacheStatus::Hit, &Reconciled::own(usage(5, 0)));
        let journal = dir.path().join("journal");
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        for e in std::fs::read_dir(&journal).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
        }
        drop(l);
        // (The shipper task holds the old ledger; give the next one the
        // copied journal, as a restart on the same disk would see it.)
        let mut cfg = config(dir.path());
        cfg.journal_dir = copy.clone();
        std::fs::remove_file(copy.join("lock")).unwrap();
        let l = Ledger::open(&cfg, None, metrics).unwrap();
        let r = l
            .report(today, today, None, None, &[], &Prices::new())
            .await
            .unwrap();
        // The copy holds every row: 40 units shipped before, 5 not; the
        // shipped ones are recognised by their ids.
        assert_eq!(units(&r), 45);
        // Once shipped, the leftover segments are deleted.
        let left = std::fs::read_dir(&copy)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".jnl")
            })
            .count();
        assert_eq!(left, 1, "only the new process's own segment is left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_are_recorded_per_model_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let today = Day::today();
        let t: Arc<str> = Arc::from("search");
        let l = Ledger::open(&config(dir.path()), None, metrics.clone()).unwrap();
        let v4 = "text-embedding-v4";
        l.record(&t, v4, CacheStatus::Miss, &reconcile(usage(4, 0), None));
        l.record(&t, v4, CacheStatus::Hit, &Reconciled::own(usage(4, 0)));
        l.record(&t, M, CacheStatus::Miss, &reconcile(usage(1, 1), None));
        // Refused: a name that cannot be a journal field, a request status.
        l.record(
            &t,
            "bad model",
            CacheStatus::Miss,
            &reconcile(usage(9, 0), None),
        );
        l.record(&t, v4, CacheStatus::Partial, &Reconciled::own(usage(9, 0)));
        assert_eq!(metrics.ledger_rejected_rows.get(), 2);
        let prices = Prices::from([(v4.to_string(), 0.25)]);
        let r = l
            .report(today, today, None, None, &[], &prices)
            .await
            .unwrap();
        assert_eq!(units(&r), 11);
        let totals: Vec<(&str, u64, Option<f64>)> = r
            .totals
            .iter()
            .map(|t| (t.model.as_str(), t.units, t.cost))
            .collect();
        assert_eq!(totals, vec![(M, 3, None), (v4, 8, Some(2.0))]);
        assert!(r.rows.iter().all(|row| row.cache != "partial"));
        let only = l
            .report(today, today, None, Some(v4), &[], &prices)
            .await
            .unwrap();
        assert_eq!(units(&only), 8);
        assert!(only.rows.iter().all(|row| row.model == v4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_left_by_the_version_before_models_ships_as_one_peace() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(&cfg.journal_dir).unwrap();
        let today = Day::today();
        // Two rows as the version before models wrote them (three
        // modalities, no model), checksums computed the way it did.
        let mut seg = Vec::new();
        for body in [
            format!("1 {} miss 3 2 0 1 2 0 2 2 0 2 search ", today.days()),
            format!("2 {} hit 0 1 0 0 1 0 0 1 0 0 search ", today.days()),
        ] {
            let sum = body.bytes().fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            });
            seg.extend_from_slice(format!("{body}{sum:08x}\n").as_bytes());
        }
        let run = "0123456789abcdef0123456789abcdef";
        std::fs::write(cfg.journal_dir.join(format!("{run}-000000.jnl")), &seg).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let l = Ledger::open(&cfg, None, metrics.clone()).unwrap();
        let r = l
            .report(
                today,
                today,
                None,
                None,
                &[],
                &Prices::from([(M.to_string(), 2.0)]),
            )
            .await
            .unwrap();
        assert_eq!(metrics.journal_damaged_rows.get(), 0);
        assert_eq!(units(&r), 5);
        assert!(r.rows.iter().all(|row| row.model == M), "{:?}", r.rows);
        assert_eq!(r.figures[0].requests, 2);
        assert_eq!(r.figures[0].mismatches, 1);
        assert_eq!(
            r.totals
                .iter()
                .map(|t| (t.model.as_str(), t.cost))
                .collect::<Vec<_>>(),
            vec![(M, Some(10.0))]
        );
        // Shipped, the leftover is deleted.
        assert!(!cfg.journal_dir.join(format!("{run}-000000.jnl")).exists());
    }
}
