//! Usage events out (`[events]`): every journaled row becomes one
//! CloudEvents 1.0 event, POSTed in batches to `events.url`.
//!
//! Events come from the journal's lines, the same lines the ledger is
//! shipped from, so nothing metered is missing from them, also across a
//! crash or a restart:
//!
//! - The ledger's shipper hands every journal event (a new segment, rows in
//!   memory, a run ended) and, at start, the leftover segments to
//!   [`Events`], which keeps its own cursor per segment: the byte offset up
//!   to which the receiver accepted its rows, persisted beside it in
//!   `<segment>.events` after every accepted batch.
//! - A segment is deleted once the ledger's store has confirmed its rows
//!   *and* its events are accepted ([`Events::holds`]); its cursor file
//!   goes with it. While the receiver is down rows wait in the journal,
//!   bounded only by the disk, as they do for the ledger.
//! - An event's `id` is `<run>-<row>`: the journal run (one process's
//!   journal) and the row's number in it, the same whenever the row is
//!   sent again (a retry, a cursor not yet persisted at a crash). Delivery
//!   is at least once; a receiver that deduplicates by id (OpenMeter does)
//!   counts each answer exactly once.
//!
//! One batch is in flight at a time; a batch that fails is rebuilt from
//! the same cursors, so a retry holds the same events (and maybe more).
//! 2xx: accepted. 408, 429, 5xx, 401, 403, 404 (the endpoint or its token
//! is wrong: an operator fixes it and nothing is lost), timeouts and
//! connection errors: retried with exponential backoff and jitter up to
//! `events.max_backoff`. Any other 4xx: the receiver refuses the batch
//! itself (a poison batch would block every later event): it is logged,
//! counted (`embedgate_events_rejected_total`) and skipped.
//!
//! Rows kept in memory (`ledger.journal = false`, or a disk that failed)
//! become events from memory and are lost with the process, as they are
//! for the ledger. The request id is not in the journal line and so not in
//! the event.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::journal::{self, Entry, Event, Line};
use crate::config::EventsConfig;
use crate::metrics::Metrics;
use crate::request::Modality;

/// The events' `type`.
pub(crate) const EVENT_TYPE: &str = "embedgate.usage";
/// What a batch is sent as: a JSON array of structured CloudEvents.
const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// A segment's cursor file: `<segment>.events`.
const CURSOR_SUFFIX: &str = ".events";
/// The first retry waits about this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long the shipper gathers rows before a batch.
const FLUSH_WINDOW: Duration = Duration::from_millis(50);
/// The shipper looks at the journal at least this often, also when idle.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// Bytes read per row of a batch at most: a journal line is ~150 bytes.
const READ_PER_ROW: u64 = 2048;

enum Data {
    /// A journal segment and its cursor file.
    File { path: PathBuf, cursor: PathBuf },
    /// Rows of a run kept in memory; `bytes[..ship]` accepted.
    Memory { bytes: Vec<u8> },
}

/// One segment (or run in memory) with rows to turn into events.
struct Source {
    id: u64,
    run: Arc<str>,
    data: Data,
    /// Nothing more will be appended.
    sealed: bool,
    /// Accepted (or skipped) up to this byte.
    ship: u64,
    /// Counted up to this byte.
    scan: u64,
    /// A sealed source counted to its end.
    scan_done: bool,
    /// Rows between `ship` and `scan`.
    backlog: u64,
}

impl Source {
    fn finished(&self) -> bool {
        self.sealed && self.scan_done && self.ship >= self.scan
    }

    fn path(&self) -> Option<&Path> {
        match &self.data {
            Data::File { path, .. } => Some(path),
            Data::Memory { .. } => None,
        }
    }
}

#[derive(Default)]
struct State {
    sources: VecDeque<Source>,
    next_id: u64,
}

impl State {
    fn push(&mut self, run: Arc<str>, data: Data, sealed: bool, ship: u64) {
        self.next_id += 1;
        self.sources.push_back(Source {
            id: self.next_id,
            run,
            data,
            sealed,
            ship,
            scan: ship,
            scan_done: false,
            backlog: 0,
        });
    }
}

/// One batch: the events and, per source, the cursor it moves to.
#[derive(Default)]
struct Batch {
    events: Vec<Value>,
    moves: Vec<(u64, u64, u64)>,
}

/// What one round did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Idle,
    /// A batch was accepted (or rejected and skipped); `true`: more wait.
    Sent(bool),
    Failed,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(crate) struct Events {
    url: http::Uri,
    source: String,
    authorization: Option<HeaderValue>,
    batch_size: usize,
    timeout: Duration,
    max_backoff: Duration,
    client: HttpClient,
    state: Mutex<State>,
    /// One round at a time: the background shipper or a shutdown flush.
    round: tokio::sync::Mutex<()>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

impl Events {
    /// The shipper of `config`, or `None` when `events.url` is unset; not
    /// started yet ([`Events::start`]). `journal_dir`: where leftover
    /// cursor files are tidied.
    pub(crate) fn new(
        config: &EventsConfig,
        journal_dir: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Events>>, String> {
        let Some(url) = config.url.clone() else {
            return Ok(None);
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("events: TLS setup failed: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let authorization = match (&config.authorization_env, &config.authorization) {
            (_, Some(token)) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                        "events.authorization_env: the token is not a valid header value"
                            .to_string()
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            (Some(name), None) => {
                tracing::warn!(
                    variable = %name,
                    "events.authorization_env names an environment variable that is not set; events are sent without Authorization"
                );
                None
            }
            (None, None) => None,
        };
        if let Some(dir) = journal_dir {
            tidy_cursors(dir);
        }
        let name = config.source.clone().unwrap_or_else(host_name);
        Ok(Some(Arc::new(Events {
            url,
            source: format!("embedgate/{name}"),
            authorization,
            batch_size: config.batch_size,
            timeout: config.timeout,
            max_backoff: config.max_backoff,
            client,
            state: Mutex::new(State::default()),
            round: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            metrics,
        })))
    }

    /// Starts the background shipper. Must run inside a tokio runtime.
    pub(crate) fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.shipper().await });
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A leftover segment of an earlier process (in order): shipped from
    /// its cursor file.
    pub(crate) fn leftover(&self, run: &Arc<str>, path: &Path) {
        let cursor = cursor_path(path);
        let ship = read_cursor(&cursor, path);
        self.state().push(
            run.clone(),
            Data::File {
                path: path.to_path_buf(),
                cursor,
            },
            true,
            ship,
        );
    }

    /// What the journal did (the ledger's shipper forwards every event).
    pub(crate) fn journal_events(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut st = self.state();
        for ev in events {
            match ev {
                Event::Segment { run, path } => {
                    // The run's earlier segments get no more rows.
                    for s in st.sources.iter_mut().filter(|s| s.run == *run) {
                        s.sealed = true;
                    }
                    st.push(
                        run.clone(),
                        Data::File {
                            path: path.clone(),
                            cursor: cursor_path(path),
                        },
                        false,
                        0,
                    );
                }
                Event::Memory { run, bytes } => {
                    let last = st.sources.back_mut().filter(|s| {
                        s.run == *run && !s.sealed && matches!(s.data, Data::Memory { .. })
                    });
                    match last {
                        Some(Source {
                            data: Data::Memory { bytes: b },
                            ..
                        }) => b.extend_from_slice(bytes),
                        _ => st.push(
                            run.clone(),
                            Data::Memory {
                                bytes: bytes.clone(),
                            },
                            false,
                            0,
                        ),
                    }
                }
                Event::Ended { run } => {
                    for s in st.sources.iter_mut().filter(|s| s.run == *run) {
                        s.sealed = true;
                    }
                }
                // Events read a segment's rows from the file, at their own
                // pace and from their cursor (the ledger takes them here).
                Event::Rows { .. } => {}
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// New rows were journaled.
    pub(crate) fn notify(&self) {
        self.wake.notify_one();
    }

    /// True while the segment at `path` has rows whose events are not
    /// accepted yet (or may get more): it must not be deleted.
    pub(crate) fn holds(&self, path: &Path) -> bool {
        self.state()
            .sources
            .iter()
            .any(|s| s.path() == Some(path) && !s.finished())
    }

    async fn shipper(self: Arc<Self>) {
        let mut failures = 0u32;
        let mut again = false;
        loop {
            if failures > 0 {
                tokio::time::sleep(self.backoff(failures)).await;
            } else if !again {
                let _ = tokio::time::timeout(IDLE_TICK, self.wake.notified()).await;
                tokio::time::sleep(FLUSH_WINDOW).await;
            }
            // In a task of its own: a bug that panics costs one round.
            let me = self.clone();
            let round = tokio::spawn(async move {
                let _round = me.round.lock().await;
                me.round_once().await
            });
            match round.await {
                Ok(Outcome::Failed) => {
                    failures = failures.saturating_add(1);
                    again = false;
                }
                Ok(Outcome::Sent(more)) => {
                    failures = 0;
                    again = more;
                }
                Ok(Outcome::Idle) => {
                    failures = 0;
                    again = false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "usage events round failed; trying again");
                    failures = failures.saturating_add(1);
                    again = false;
                }
            }
        }
    }

    /// Exponential from [`FIRST_BACKOFF`], at most `max_backoff`, with
    /// jitter: between half of it and all of it.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = FIRST_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let d = exp.min(self.max_backoff);
        d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// Ships what is journaled until nothing is left or `until`; used on
    /// shutdown. Returns true when every event is accepted.
    pub(crate) async fn flush(self: &Arc<Self>, until: tokio::time::Instant) -> bool {
        let _round = self.round.lock().await;
        let mut failures = 0u32;
        loop {
            match self.round_once().await {
                Outcome::Idle => return self.blocking(|e| e.pending() == 0).await,
                Outcome::Sent(_) => failures = 0,
                Outcome::Failed => {
                    failures = failures.saturating_add(1);
                    let next = tokio::time::Instant::now() + self.backoff(failures);
                    if next >= until {
                        return false;
                    }
                    tokio::time::sleep_until(next).await;
                }
            }
        }
    }

    /// One round: counts new rows, builds a batch, sends it, moves the
    /// cursors when it is accepted. The caller holds `round`.
    async fn round_once(self: &Arc<Self>) -> Outcome {
        let batch = self.blocking(Events::prepare).await;
        if batch.events.is_empty() {
            if !batch.moves.is_empty() {
                // Only damaged lines, or a torn end: nothing to send.
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.commit(&batch.moves)).await;
            }
            return Outcome::Idle;
        }
        let n = batch.events.len() as u64;
        let full = batch.events.len() >= self.batch_size;
        let result = self.send(&batch.events).await;
        let accepted = match result {
            Ok(status) if status.is_success() => {
                self.metrics.events_shipped.inc_by(n);
                true
            }
            Ok(status) if rejected(status) => {
                self.metrics.events_rejected.inc_by(n);
                tracing::error!(
                    status = status.as_u16(),
                    events = n,
                    "the usage events receiver refused a batch; its events are skipped"
                );
                true
            }
            Ok(status) => {
                self.failed(&format!("HTTP {}", status.as_u16()));
                false
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        };
        if !accepted {
            return Outcome::Failed;
        }
        let me = self.clone();
        let moves = batch.moves;
        let _ = tokio::task::spawn_blocking(move || me.commit(&moves)).await;
        Outcome::Sent(full)
    }

    fn failed(&self, why: &str) {
        self.metrics.events_failed.inc();
        let n = self.metrics.events_failed.get();
        // The first failure of a streak and every 20th after it.
        if n % 20 == 1 {
            tracing::warn!(error = %why, "usage events could not be delivered; retrying with backoff");
        } else {
            tracing::debug!(error = %why, "usage events could not be delivered; retrying");
        }
    }

    async fn send(&self, events: &[Value]) -> Result<StatusCode, String> {
        let body = serde_json::to_vec(events).map_err(|e| e.to_string())?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(CONTENT_TYPE, BATCH_CONTENT_TYPE);
        if let Some(auth) = &self.authorization {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                // The error chain, never the request (its token).
                let mut msg = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    msg = format!("{msg}: {src}");
                }
                msg
            })?;
            let status = resp.status();
            // Read the answer so the connection can be reused.
            let _ = resp.into_body().collect().await;
            Ok(status)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn blocking<T: Default + Send + 'static>(self: &Arc<Self>, f: fn(&Events) -> T) -> T {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "usage events file work failed");
                T::default()
            }
        }
    }

    /// Rows not accepted yet, as far as counted.
    fn pending(&self) -> u64 {
        self.state().sources.iter().map(|s| s.backlog).sum()
    }

    /// Counts what was appended since, forgets finished sources, updates
    /// the backlog gauge and builds the next batch.
    fn prepare(&self) -> Batch {
        let mut st = self.state();
        for s in st.sources.iter_mut() {
            if s.scan_done {
                continue;
            }
            if let Err(e) = scan(s) {
                self.metrics
                    .journal_errors
                    .with_label_values(&["read"])
                    .inc();
                tracing::warn!(error = %e, "usage events: cannot read a journal segment");
            }
        }
        st.sources.retain(|s| !s.finished());
        let backlog: u64 = st.sources.iter().map(|s| s.backlog).sum();
        self.metrics
            .events_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        let mut batch = Batch::default();
        for s in st.sources.iter() {
            let room = self.batch_size - batch.events.len();
            if room == 0 {
                break;
            }
            if s.ship >= s.scan {
                continue;
            }
            match self.take(s, room, &mut batch.events) {
                Ok((to, rows)) => batch.moves.push((s.id, to, rows)),
                Err(e) => {
                    self.metrics
                        .journal_errors
                        .with_label_values(&["read"])
                        .inc();
                    tracing::warn!(error = %e, "usage events: cannot read a journal segment");
                    break;
                }
            }
        }
        batch
    }

    /// Up to `room` events from `s`'s rows after its cursor; returns where
    /// the cursor moves once they are accepted, and how many rows that is.
    fn take(&self, s: &Source, room: usize, out: &mut Vec<Value>) -> io::Result<(u64, u64)> {
        let want = (s.scan - s.ship).min(room as u64 * READ_PER_ROW);
        let owned;
        let buf: &[u8] = match &s.data {
            Data::Memory { bytes } => {
                let from = usize::try_from(s.ship).unwrap_or(usize::MAX);
                let to = usize::try_from(s.ship + want).unwrap_or(usize::MAX);
                bytes.get(from..to).unwrap_or_default()
            }
            Data::File { path, .. } => {
                let mut f = fs::File::open(path)?;
                f.seek(SeekFrom::Start(s.ship))?;
                let mut b = Vec::new();
                f.take(want).read_to_end(&mut b)?;
                owned = b;
                &owned
            }
        };
        let mut at = 0usize;
        let mut rows = 0u64;
        while rows < room as u64 {
            let Some(n) = buf[at..].iter().position(|&b| b == b'\n') else {
                break;
            };
            if let Some((row, e)) = journal::decode_line(&buf[at..at + n]) {
                out.push(self.event(&s.run, row, &e));
                rows += 1;
            }
            at += n + 1;
        }
        // A torn tail of a sealed segment (counted up to, not a row).
        let to = if at == 0 && rows == 0 && s.sealed && s.scan_done {
            s.scan
        } else {
            s.ship + at as u64
        };
        Ok((to, rows))
    }

    /// Moves the cursors of an accepted batch and persists them.
    fn commit(&self, moves: &[(u64, u64, u64)]) {
        let mut writes = Vec::new();
        {
            let mut st = self.state();
            for &(id, to, rows) in moves {
                if let Some(s) = st.sources.iter_mut().find(|s| s.id == id) {
                    s.ship = s.ship.max(to);
                    s.backlog = s.backlog.saturating_sub(rows);
                    match &mut s.data {
                        Data::File { cursor, .. } => writes.push((cursor.clone(), s.ship)),
                        Data::Memory { bytes } => {
                            // Accepted rows leave memory; offsets are
                            // relative to what is kept.
                            let n = usize::try_from(s.ship)
                                .unwrap_or(usize::MAX)
                                .min(bytes.len());
                            bytes.drain(..n);
                            s.scan = s.scan.saturating_sub(n as u64);
                            s.ship = s.ship.saturating_sub(n as u64);
                        }
                    }
                }
            }
            let backlog: u64 = st.sources.iter().map(|s| s.backlog).sum();
            self.metrics
                .events_backlog
                .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        }
        for (cursor, at) in writes {
            if let Err(e) = write_cursor(&cursor, at) {
                // At worst these events are sent again after a restart.
                tracing::warn!(path = %cursor.display(), error = %e, "usage events: cannot persist a segment's cursor");
            }
        }
    }

    /// The CloudEvent of row `row` of `run`.
    fn event(&self, run: &str, row: u64, e: &Entry) -> Value {
        let mut units = Map::new();
        let mut items = Map::new();
        for m in Modality::ALL {
            units.insert(m.as_str().into(), e.units.get(m).into());
            items.insert(m.as_str().into(), e.items.get(m).into());
        }
        let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(e.at_ms));
        json!({
            "specversion": "1.0",
            "id": format!("{run}-{row}"),
            "source": self.source,
            "type": EVENT_TYPE,
            "subject": &*e.tenant,
            "time": time.to_string(),
            "datacontenttype": "application/json",
            "data": {
                "model": &*e.model,
                "cache": e.cache.as_str(),
                "units": units,
                "items": items,
                "total_units": e.units.total(),
                "upstream_usage": e.upstream,
                "mismatch": e.mismatch,
            }
        })
    }
}

/// A status that refuses the batch itself: skipped, not retried.
fn rejected(status: StatusCode) -> bool {
    status.is_client_error()
        && !matches!(
            status,
            StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
        )
}

/// Counts the rows appended to `s` since the last call.
fn scan(s: &mut Source) -> io::Result<()> {
    let mut rows = 0u64;
    let mut count = |l: Line| {
        if let Line::Row(..) = l {
            rows += 1;
        }
    };
    let (whole, len) = match &s.data {
        Data::Memory { bytes } => {
            let from = usize::try_from(s.scan).unwrap_or(usize::MAX);
            let rest = bytes.get(from..).unwrap_or_default();
            (journal::lines(rest, &mut count), rest.len())
        }
        Data::File { path, .. } => {
            let mut f = fs::File::open(path)?;
            f.seek(SeekFrom::Start(s.scan))?;
            let mut b = Vec::new();
            f.read_to_end(&mut b)?;
            (journal::lines(&b, &mut count), b.len())
        }
    };
    s.scan += whole as u64;
    s.backlog += rows;
    if s.sealed {
        // A torn line at the end of a sealed segment is not a row.
        s.scan += (len - whole) as u64;
        s.scan_done = true;
    }
    Ok(())
}

/// `<segment>.events`.
pub(crate) fn cursor_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(CURSOR_SUFFIX);
    PathBuf::from(name)
}

/// The byte offset a segment's events are accepted to; 0 when there is no
/// cursor or it cannot be right (then events are sent again: at least once).
fn read_cursor(cursor: &Path, segment: &Path) -> u64 {
    let Ok(text) = fs::read_to_string(cursor) else {
        return 0;
    };
    let len = fs::metadata(segment).map_or(0, |m| m.len());
    match text.trim().parse::<u64>() {
        Ok(at) if at <= len => at,
        _ => 0,
    }
}

/// Replaces the cursor file (a new file renamed over the old one, so a
/// crash leaves the old cursor or the new one). Not forced to disk: a lost
/// update sends some events again.
fn write_cursor(cursor: &Path, at: u64) -> io::Result<()> {
    let mut tmp = cursor.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, format!("{at}\n"))?;
    fs::rename(&tmp, cursor)
}

/// Deletes cursor files whose segment is gone (a crash between the two
/// deletions).
fn tidy_cursors(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let segment = name
            .strip_suffix(".events.tmp")
            .or_else(|| name.strip_suffix(CURSOR_SUFFIX));
        if let Some(segment) = segment {
            if segment.ends_with(".jnl") && !dir.join(segment).exists() {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// This machine's name, for the default `source`.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LedgerConfig;
    use crate::date::Day;
    use crate::ledger::report::Prices;
    use crate::ledger::Ledger;
    use crate::metering::{CacheStatus, Reconciled, Usage};
    use crate::request::Counts;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A receiver answering 400 to its first batch, 200 after; returns its
    /// URL and the ids it accepted.
    async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let ids = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let got = ids.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (got, calls) = (got.clone(), calls.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (got, calls) = (got.clone(), calls.clone());
                            async move {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                                let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                                    400
                                } else {
                                    got.lock().unwrap().extend(
                                        batch.iter().map(|e| e["id"].as_str().unwrap().to_string()),
                                    );
                                    200
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, ids)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_batch_is_skipped_and_a_leftover_ships_from_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LedgerConfig {
            journal: true,
            journal_dir: dir.path().join("journal"),
            fsync_interval: Duration::from_millis(10),
            sqlite_path: dir.path().join("ledger.sqlite"),
        };
        std::fs::create_dir_all(&cfg.journal_dir).unwrap();
        // A leftover: rows 1-5, a damaged line, a torn end; its cursor
        // says rows 1-2 were accepted before.
        let run = "00112233445566778899aabbccddeeff";
        let seg = cfg.journal_dir.join(format!("{run}-000000.jnl"));
        let mut items = Counts::default();
        items.set(Modality::Text, 1);
        let w = crate::config::Weights {
            text: 1,
            image: 1,
            audio: 2,
        };
        let r = Reconciled::own(Usage::of(items, &w));
        let t: Arc<str> = Arc::from("search");
        let mut bytes = Vec::new();
        let mut cursor = 0;
        for row in 1..=5u64 {
            let e = Entry::new(&t, "text-embedding-v4", Day::today(), CacheStatus::Hit, &r);
            let mut line = format!("{row}");
            e.encode_body_for_test(&mut line);
            bytes.extend_from_slice(journal::line_for_test(&line).as_bytes());
            if row == 2 {
                cursor = bytes.len();
            }
        }
        bytes.extend_from_slice(b"6 v3 garbage\n7 v3 torn");
        std::fs::write(&seg, &bytes).unwrap();
        write_cursor(&cursor_path(&seg), cursor as u64).unwrap();

        let (url, ids) = receiver().await;
        let events = EventsConfig {
            url: Some(url.parse().unwrap()),
            source: Some("unit".into()),
            batch_size: 2,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_millis(50),
            authorization_env: None,
            authorization: None,
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let l = Ledger::open_with_events(&cfg, &events, None, metrics.clone()).unwrap();
        let today = Day::today();
        // Two rows of this process after it.
        l.record(&t, "text-embedding-v4", CacheStatus::Miss, &r);
        l.record(&t, "text-embedding-v4", CacheStatus::Miss, &r);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            // Reports ship the ledger and let tidy run.
            let _ = l
                .report(today, today, None, None, &[], &Prices::new())
                .await;
            let done = metrics.events_backlog.get() == 0
                && metrics.events_shipped.get() + metrics.events_rejected.get() == 5
                && !seg.exists();
            if done {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not delivered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first batch (rows 3 and 4 of the leftover) was refused and
        // skipped; rows 1 and 2 were accepted before the restart.
        assert_eq!(metrics.events_rejected.get(), 2);
        let got = ids.lock().unwrap().clone();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], format!("{run}-5"));
        assert!(got[1..].iter().all(|id| !id.starts_with(run)));
        assert!(!cursor_path(&seg).exists());
    }
}
