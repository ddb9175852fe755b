//! Compaction of cache entries, off the request path: a bounded queue of
//! entries that proved themselves (they were hit) to one thread, which
//! makes each one's compact form once (see `cache`).
//!
//! A request only asks: it never waits for the thread unless it wants the
//! compact form itself (a gzip hit, which waits a bounded time for it and
//! is answered uncompressed without it). Work that does not fit in the
//! queue is dropped, and asked again by the entry's next hit. A key is in
//! the queue at most once: the requests that ask for it meanwhile share
//! its job, and a gzip hit moves it to the front.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::cache_key::CacheKey;
use crate::digits::Digits;
use crate::gzip::Precompressed;

/// Jobs waiting at most: each holds a reference to its entry's text, which
/// the entry holds anyway unless it is evicted meanwhile (then up to ~30 MB
/// of text waits here at 30 KB per entry). About 0.65 s of work.
pub(crate) const QUEUE_JOBS: usize = 1024;
/// How long a gzip hit waits for its entry's compact form; the thread takes
/// ~0.65 ms per entry and a waited-for job goes first, so this is only
/// reached when many gzip hits of fresh entries come at once. The hit is
/// then answered uncompressed.
pub(crate) const GZIP_WAIT: Duration = Duration::from_millis(20);

/// One entry to compact.
pub(crate) struct Job {
    pub(crate) key: CacheKey,
    /// The entry's form as the cache holds it (the same buffers: the
    /// thread replaces the entry only if it still holds this one).
    pub(crate) source: Source,
    /// An identity client read it: its text is worth keeping at hand.
    pub(crate) read_as_text: bool,
    /// A gzip client asked for it (or joined the job): its compact form
    /// is to be the DEFLATE one, which gzip answers are built around.
    pub(crate) gzip: bool,
    pub(crate) done: Arc<Done>,
}

/// What a job compacts.
#[derive(Clone)]
pub(crate) enum Source {
    /// An entry as it was stored.
    Text(Bytes),
    /// An entry in digits form, for a gzip client: made DEFLATE.
    Digits(Digits),
}

impl Source {
    /// The entry's text.
    pub(crate) fn text(&self) -> Option<Bytes> {
        match self {
            Source::Text(t) => Some(t.clone()),
            Source::Digits(d) => d.text(),
        }
    }
}

impl From<&Bytes> for Source {
    fn from(text: &Bytes) -> Source {
        Source::Text(text.clone())
    }
}

/// A job's outcome, for the requests waiting on it.
#[derive(Default)]
pub(crate) struct Done {
    /// Set once, when the job is over: its compact form, or `None` (none
    /// was made, or the job was dropped).
    outcome: OnceLock<Option<Precompressed>>,
    finished: Notify,
}

impl Done {
    /// Publishes the outcome and wakes the requests waiting for it.
    pub(crate) fn finish(&self, compact: Option<Precompressed>) {
        let _ = self.outcome.set(compact);
        self.finished.notify_waiters();
    }

    #[cfg(test)]
    fn outcome(&self) -> Option<&Option<Precompressed>> {
        self.outcome.get()
    }
}

/// What [`Compactor::ask`] did.
pub(crate) enum Asked {
    /// Queued now, or already queued by an earlier request.
    Queued(Arc<Done>),
    /// The queue is full (or the thread is gone): asked again next hit.
    Dropped,
}

struct State {
    /// Waited-for jobs first (`urgent` of them), then the others in order.
    jobs: VecDeque<Job>,
    urgent: usize,
    /// Keys queued or being compacted: asking again joins their job.
    asked: HashMap<CacheKey, Arc<Done>>,
    closed: bool,
}

struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                urgent: 0,
                asked: HashMap::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock left nothing half-done that
        // matters: the worst is a job lost, which a later hit asks again.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue's sending side; dropping it stops the thread once its current
/// job is done.
pub(crate) struct Compactor {
    queue: Arc<Queue>,
    capacity: usize,
}

impl Compactor {
    /// Starts the thread, which hands each job to `work`. `None` when the
    /// thread cannot be started (entries then stay as they were stored).
    pub(crate) fn start(
        capacity: usize,
        mut work: impl FnMut(Job, &Finisher) + Send + 'static,
    ) -> Option<Compactor> {
        let queue = Arc::new(Queue::new());
        let finisher = Finisher {
            queue: queue.clone(),
        };
        let started = std::thread::Builder::new()
            .name("cache-compact".into())
            .spawn(move || {
                while let Some(job) = finisher.next() {
                    let (key, done) = (job.key, job.done.clone());
                    // A job that panics (a bug) must not stop the thread, nor
                    // leave its key asked and its waiters waiting.
                    let run = std::panic::AssertUnwindSafe(|| work(job, &finisher));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!(key = ?key, "cache compaction panicked; the entry stays as it was");
                        finisher.forget(&key);
                        done.finish(None);
                    }
                }
            });
        match started {
            Ok(_) => Some(Compactor { queue, capacity }),
            Err(e) => {
                tracing::warn!(error = %e, "cache compaction thread did not start; entries stay uncompressed");
                None
            }
        }
    }

    /// Asks for the entry holding `source` to be compacted; `urgent` (a
    /// gzip request waits for it) puts it ahead of the others, moving it up
    /// if it is queued, and asks for the DEFLATE form.
    pub(crate) fn ask(
        &self,
        key: CacheKey,
        source: impl Into<Source>,
        read_as_text: bool,
        urgent: bool,
    ) -> Asked {
        let mut s = self.queue.lock();
        if s.closed {
            return Asked::Dropped;
        }
        if let Some(done) = s.asked.get(&key).cloned() {
            if urgent {
                promote(&mut s, &key);
            }
            return Asked::Queued(done);
        }
        if s.jobs.len() >= self.capacity {
            // Full: a waited-for job takes the place of the newest other one.
            if !urgent || s.urgent >= s.jobs.len() {
                return Asked::Dropped;
            }
            if let Some(last) = s.jobs.pop_back() {
                s.asked.remove(&last.key);
                last.done.finish(None);
            }
        }
        let done = Arc::new(Done::default());
        s.asked.insert(key, done.clone());
        let job = Job {
            key,
            source: source.into(),
            read_as_text,
            gzip: urgent,
            done: done.clone(),
        };
        if urgent {
            let at = s.urgent;
            s.jobs.insert(at, job);
            s.urgent += 1;
        } else {
            s.jobs.push_back(job);
        }
        drop(s);
        self.queue.ready.notify_one();
        Asked::Queued(done)
    }

    /// Jobs queued (not counting the one being compacted).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queue.lock().jobs.len()
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        let mut s = self.queue.lock();
        s.closed = true;
        // Nobody is left to ask for these; their waiters answer without.
        for job in s.jobs.drain(..) {
            job.done.finish(None);
        }
        s.urgent = 0;
        drop(s);
        self.queue.ready.notify_all();
    }
}

/// Moves `key`'s queued job (if it is among the others) behind the
/// waited-for ones; a gzip client waits for it now.
fn promote(s: &mut State, key: &CacheKey) {
    let urgent = s.urgent;
    if let Some(i) = s.jobs.iter().skip(urgent).position(|j| &j.key == key) {
        if let Some(mut job) = s.jobs.remove(urgent + i) {
            job.gzip = true;
            s.jobs.insert(urgent, job);
            s.urgent += 1;
        }
    }
}

/// The thread's side of the queue.
pub(crate) struct Finisher {
    queue: Arc<Queue>,
}

impl Finisher {
    /// The next job; `None` once the [`Compactor`] is dropped.
    fn next(&self) -> Option<Job> {
        let mut s = self.queue.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(job) = s.jobs.pop_front() {
                s.urgent = s.urgent.saturating_sub(1);
                return Some(job);
            }
            s = self.queue.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `key` is settled (its entry replaced, or its new form stored where
    /// the next lookup reads it): asking again makes a new job.
    pub(crate) fn forget(&self, key: &CacheKey) {
        self.queue.lock().asked.remove(key);
    }

    /// One of a queue no thread reads, for driving a job by hand.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Finisher {
        Finisher {
            queue: Arc::new(Queue::new()),
        }
    }

    /// A handle that can [`forget`](Finisher::forget) later, from a task.
    pub(crate) fn handle(&self) -> Finisher {
        Finisher {
            queue: self.queue.clone(),
        }
    }
}

/// Waits up to [`GZIP_WAIT`] for `done`'s compact form.
pub(crate) async fn wait(done: &Done) -> Option<Precompressed> {
    let finished = done.finished.notified();
    tokio::pin!(finished);
    // Registered before looking, so a finish in between still wakes it.
    finished.as_mut().enable();
    if let Some(over) = done.outcome.get() {
        return over.clone();
    }
    let _ = tokio::time::timeout(GZIP_WAIT, finished).await;
    done.outcome.get().cloned().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn key(n: u8) -> CacheKey {
        crate::cache::test_key(&n.to_string())
    }

    /// A compactor whose thread reports each job's key and then blocks
    /// until the test lets it go on (one message per job).
    fn gated(capacity: usize) -> (Compactor, mpsc::Receiver<CacheKey>, mpsc::Sender<()>) {
        let (seen_tx, seen) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let c = Compactor::start(capacity, move |job, fin| {
            let _ = seen_tx.send(job.key);
            let _ = go_rx.recv();
            job.done
                .finish(job.source.text().and_then(|t| Precompressed::of(&t)));
            fin.forget(&job.key);
        })
        .unwrap();
        (c, seen, go)
    }

    fn recv(rx: &mpsc::Receiver<CacheKey>) -> CacheKey {
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[tokio::test]
    async fn one_job_per_key_urgent_first_full_drops() {
        let (c, seen, go) = gated(3);
        let text = Bytes::from_static(b"[0.1,0.2,0.3]");
        // Key 1 is taken by the thread, which then blocks.
        assert!(matches!(
            c.ask(key(1), &text, true, false),
            Asked::Queued(_)
        ));
        assert_eq!(recv(&seen), key(1));
        // Asking again while it is being compacted joins its job.
        let (Asked::Queued(a), Asked::Queued(b)) = (
            c.ask(key(1), &text, true, false),
            c.ask(key(1), &text, false, true),
        ) else {
            panic!("not queued")
        };
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(c.queued(), 0);
        // 2, 3, 4 fill the queue; 5 is dropped; urgent 3 moves up; urgent 6
        // takes the place of 4 (whose waiters are told there is nothing).
        for k in [2, 3, 4] {
            assert!(matches!(
                c.ask(key(k), &text, true, false),
                Asked::Queued(_)
            ));
        }
        assert!(matches!(c.ask(key(5), &text, true, false), Asked::Dropped));
        let Asked::Queued(two) = c.ask(key(2), &text, true, false) else {
            panic!("2 not queued")
        };
        let Asked::Queued(four) = c.ask(key(4), &text, true, false) else {
            panic!("4 not queued")
        };
        assert!(matches!(c.ask(key(3), &text, true, true), Asked::Queued(_)));
        assert!(matches!(c.ask(key(6), &text, true, true), Asked::Queued(_)));
        assert_eq!(wait(&four).await.map(|p| p.size()), None);
        // Still full: an ordinary job is dropped.
        assert!(matches!(c.ask(key(7), &text, true, false), Asked::Dropped));
        let order: Vec<CacheKey> = (0..3)
            .map(|_| {
                go.send(()).unwrap();
                recv(&seen)
            })
            .collect();
        assert_eq!(order, vec![key(3), key(6), key(2)]);
        // Key 1's waiters got its compact form.
        let one = a.outcome().cloned().flatten().and_then(|p| p.inflate());
        assert_eq!(one, Some(text.clone()));
        go.send(()).unwrap();
        // Forgotten once done: asking again makes a new job.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let Asked::Queued(again) = c.ask(key(2), &text, true, false) else {
                panic!("dropped")
            };
            if !Arc::ptr_eq(&again, &two) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "key 2 never forgotten"
            );
            std::thread::yield_now();
        }
        drop(go);
    }

    /// Polls until `done` has an outcome.
    async fn outcome(done: &Done) -> Option<Precompressed> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(o) = done.outcome() {
                return o.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no outcome");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_panicking_job_frees_its_waiters_and_the_thread_goes_on() {
        let c = Compactor::start(4, |job, fin| {
            assert!(job.key != key(1), "a bug");
            job.done
                .finish(job.source.text().and_then(|t| Precompressed::of(&t)));
            fin.forget(&job.key);
        })
        .unwrap();
        let text = Bytes::from_static(b"[0.5,0.25,0.125]");
        let Asked::Queued(one) = c.ask(key(1), &text, false, true) else {
            panic!("dropped")
        };
        assert!(outcome(&one).await.is_none());
        let Asked::Queued(two) = c.ask(key(2), &text, false, false) else {
            panic!("dropped")
        };
        assert!(outcome(&two).await.is_some());
        // Key 1 was forgotten: asking again makes a new job.
        let Asked::Queued(again) = c.ask(key(1), &text, false, false) else {
            panic!("dropped")
        };
        assert!(!Arc::ptr_eq(&again, &one));
    }

    #[tokio::test]
    async fn a_waiter_gets_the_form_and_a_drop_frees_waiters() {
        let (c, seen, go) = gated(4);
        let text = Bytes::from(
            (0..64)
                .map(|i| format!("{},", f64::from(i) / 7.0))
                .collect::<String>(),
        );
        let Asked::Queued(done) = c.ask(key(9), &text, false, true) else {
            panic!("dropped")
        };
        assert_eq!(recv(&seen), key(9));
        go.send(()).unwrap();
        // Bounded: the thread may take longer than GZIP_WAIT on a loaded
        // machine, so wait until the form is there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let got = loop {
            if let Some(p) = wait(&done).await {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "never compacted");
        };
        assert_eq!(got.inflate(), Some(text.clone()));
        // A queued job's waiters are freed when the compactor goes.
        let _busy = c.ask(key(10), &text, false, false);
        assert_eq!(recv(&seen), key(10));
        let Asked::Queued(left) = c.ask(key(11), &text, false, false) else {
            panic!("dropped")
        };
        drop(c);
        assert!(wait(&left).await.is_none());
        drop(go);
    }
}
