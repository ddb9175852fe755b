//! The log writer: a bounded, lossy queue of formatted lines and one
//! background thread that writes them in batches.
//!
//! A request never waits on a log line: [`LogQueue`] hands each line to the
//! queue with `try_send`; when the queue is full (the sink, usually stderr,
//! is slower than the logging) the line is dropped and counted in
//! [`LOG_LINES_DROPPED`], which `/metrics` shows as
//! `embedgate_log_lines_dropped_total`. The writer thread wakes on the first
//! line after an idle spell, lets a burst gather for [`BATCH_WINDOW`], and
//! writes everything queued in one `write(2)` (up to [`BATCH_BYTES`]); so
//! under load it costs one system call per batch rather than per line, and
//! producers rarely have to wake it.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Log lines dropped because the queue was full, or because the sink
/// refused them (the process has one log writer, so this is a process-wide
/// count; `/metrics` reads it).
pub(crate) static LOG_LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines the queue holds by default (`EMBEDGATE_LOG_QUEUE` changes it).
pub const DEFAULT_QUEUE_LINES: usize = 8192;
/// How long the writer lets lines gather after waking before it writes.
/// Each wake-up of the writer can take the CPU from a busy worker (at 5 ms
/// it preempted the one worker of a loaded gateway ~110 times a second).
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Bytes written per `write(2)` at most (the batch buffer's size).
const BATCH_BYTES: usize = 256 * 1024;
/// How long [`LogGuard`]'s drop waits for the last lines to be written.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(1);

/// The `tracing-subscriber` writer: each formatted event becomes one queued
/// line, or one dropped line. Cloneable; never blocks.
#[derive(Clone)]
pub struct LogQueue {
    tx: SyncSender<Vec<u8>>,
    dropped: &'static AtomicU64,
}

/// Stops the writer thread when dropped, after it wrote what was queued
/// (waiting at most [`FLUSH_ON_EXIT`], so a stuck sink cannot hold up exit).
pub struct LogGuard {
    tx: SyncSender<Vec<u8>>,
    closing: Arc<AtomicBool>,
    done: Receiver<()>,
}

impl LogQueue {
    /// Starts the writer thread on `sink` with a queue of `lines` lines;
    /// dropped lines are counted in [`LOG_LINES_DROPPED`].
    pub fn start<W: Write + Send + 'static>(
        sink: W,
        lines: usize,
    ) -> io::Result<(LogQueue, LogGuard)> {
        LogQueue::start_counting(sink, lines, &LOG_LINES_DROPPED, BATCH_WINDOW)
    }

    fn start_counting<W: Write + Send + 'static>(
        sink: W,
        lines: usize,
        dropped: &'static AtomicU64,
        window: Duration,
    ) -> io::Result<(LogQueue, LogGuard)> {
        let lines = lines.max(1);
        let (tx, rx) = mpsc::sync_channel(lines);
        let (done_tx, done) = mpsc::sync_channel(1);
        let closing = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            sink,
            dropped,
            closing: closing.clone(),
            window,
            max_lines: lines,
            batch: Vec::with_capacity(BATCH_BYTES),
            batch_lines: 0,
        };
        std::thread::Builder::new()
            .name("embedgate-log".into())
            .spawn(move || {
                writer.run();
                let _ = done_tx.send(());
            })?;
        Ok((
            LogQueue {
                tx: tx.clone(),
                dropped,
            },
            LogGuard { tx, closing, done },
        ))
    }

    /// Queues one line, or counts it as dropped; never waits.
    fn push(&self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        match self.tx.try_send(line.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The queue access lines are written to directly, formatted by
/// [`crate::access_log`] without going through `tracing` (set when the logs
/// are JSON and nothing else subscribes: see [`LogQueue::serve_access_lines`]).
static ACCESS_LINES: OnceLock<LogQueue> = OnceLock::new();

impl LogQueue {
    /// Lets the access log write its JSON lines straight to this queue, in
    /// the shape `tracing-subscriber`'s flattened JSON gives them, instead
    /// of formatting them through `tracing` (a third of its cost). Only
    /// for a subscriber that is this queue's JSON formatter alone.
    pub fn serve_access_lines(&self) {
        let _ = ACCESS_LINES.set(self.clone());
    }

    /// The queue of [`serve_access_lines`](LogQueue::serve_access_lines).
    pub(crate) fn access_lines() -> Option<&'static LogQueue> {
        ACCESS_LINES.get()
    }

    /// Queues one line it is given, or counts it as dropped; never waits.
    pub(crate) fn push_owned(&self, line: Vec<u8>) {
        if line.is_empty() {
            return;
        }
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Write for LogQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = LogQueue;

    fn make_writer(&'a self) -> LogQueue {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        // Wakes the writer if it is idle; if the queue is full it is busy
        // and sees `closing` after its batch.
        let _ = self.tx.try_send(Vec::new());
        let _ = self.done.recv_timeout(FLUSH_ON_EXIT);
    }
}

struct Writer<W> {
    rx: Receiver<Vec<u8>>,
    sink: W,
    dropped: &'static AtomicU64,
    closing: Arc<AtomicBool>,
    window: Duration,
    /// Lines taken per batch at most, so a producer faster than the sink
    /// cannot keep one batch open forever.
    max_lines: usize,
    batch: Vec<u8>,
    batch_lines: u64,
}

impl<W: Write> Writer<W> {
    fn run(mut self) {
        // Idle: blocks until a line (or the guard's wake-up) arrives.
        while let Ok(first) = self.rx.recv() {
            let closing = self.closing.load(Ordering::SeqCst);
            if !closing {
                // Lines arriving now are queued without waking anyone.
                std::thread::sleep(self.window);
            }
            self.add(&first);
            for _ in 0..self.max_lines {
                match self.rx.try_recv() {
                    Ok(line) => self.add(&line),
                    Err(_) => break,
                }
            }
            self.write_batch();
            if closing {
                return;
            }
        }
        self.write_batch();
    }

    fn add(&mut self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        if self.batch.len() + line.len() > BATCH_BYTES {
            self.write_batch();
        }
        self.batch.extend_from_slice(line);
        self.batch_lines += 1;
    }

    /// One `write(2)` for the whole batch (more only if the sink takes it
    /// in parts). Lines the sink refuses are counted as dropped.
    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if self
            .sink
            .write_all(&self.batch)
            .and_then(|()| self.sink.flush())
            .is_err()
        {
            self.dropped.fetch_add(self.batch_lines, Ordering::Relaxed);
        }
        self.batch.clear();
        self.batch_lines = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};
    use std::time::Instant;

    /// A sink that records what it is given and how many writes it took,
    /// and that blocks every write while it is closed (a stuck stderr).
    #[derive(Clone, Default)]
    struct Sink(Arc<SinkState>);

    #[derive(Default)]
    struct SinkState {
        /// (bytes, write calls, closed)
        inner: Mutex<(Vec<u8>, usize, bool)>,
        opened: Condvar,
    }

    impl Sink {
        fn closed() -> Sink {
            let s = Sink::default();
            s.0.inner.lock().unwrap().2 = true;
            s
        }

        fn open(&self) {
            self.0.inner.lock().unwrap().2 = false;
            self.0.opened.notify_all();
        }

        fn lines(&self) -> Vec<String> {
            let g = self.0.inner.lock().unwrap();
            String::from_utf8(g.0.clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }

        fn writes(&self) -> usize {
            self.0.inner.lock().unwrap().1
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut g = self.0.inner.lock().unwrap();
            while g.2 {
                g = self.0.opened.wait(g).unwrap();
            }
            g.0.extend_from_slice(buf);
            g.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_and_never_blocks() {
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        const QUEUE: usize = 4;
        const SENT: usize = 1000;
        let sink = Sink::closed();
        let (queue, guard) =
            LogQueue::start_counting(sink.clone(), QUEUE, &DROPPED, BATCH_WINDOW).unwrap();
        let started = Instant::now();
        for i in 0..SENT {
            let mut w = queue.make_writer();
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        // The sink is stuck: the writer holds at most one batch (its first
        // line and up to QUEUE more) and the queue QUEUE more; the rest was
        // dropped at once.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "writing {SENT} lines to a stuck sink took {:?}",
            started.elapsed()
        );
        let dropped = DROPPED.load(Ordering::SeqCst) as usize;
        assert!(dropped >= SENT - (1 + 2 * QUEUE), "dropped {dropped}");
        // Unstuck, the writer delivers exactly what was not dropped, in order.
        sink.open();
        drop(guard);
        let lines = sink.lines();
        assert_eq!(lines.len(), SENT - dropped, "{lines:?}");
        let numbers: Vec<usize> = lines
            .iter()
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        assert_eq!(numbers[0], 0);
    }

    #[test]
    fn lines_are_written_in_batches_and_flushed_at_exit() {
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        const SENT: usize = 2000;
        let sink = Sink::default();
        let (queue, guard) =
            LogQueue::start_counting(sink.clone(), SENT, &DROPPED, BATCH_WINDOW).unwrap();
        for i in 0..SENT {
            let mut w = queue.make_writer();
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        assert_eq!(DROPPED.load(Ordering::SeqCst), 0);
        assert_eq!(sink.lines().len(), SENT);
        // ~20 KB in bursts: a handful of writes, not one per line.
        let writes = sink.writes();
        assert!(writes <= SENT / 10, "{writes} writes for {SENT} lines");
    }

    #[test]
    fn a_sink_that_fails_counts_its_lines_as_dropped() {
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (queue, guard) =
            LogQueue::start_counting(Broken, 100, &DROPPED, Duration::ZERO).unwrap();
        for _ in 0..10 {
            queue.make_writer().write_all(b"x\n").unwrap();
        }
        drop(guard);
        assert_eq!(DROPPED.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn the_guard_does_not_wait_long_for_a_stuck_sink() {
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        let sink = Sink::closed();
        let (queue, guard) =
            LogQueue::start_counting(sink.clone(), 10, &DROPPED, Duration::ZERO).unwrap();
        queue.make_writer().write_all(b"stuck\n").unwrap();
        let started = Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(
            waited >= FLUSH_ON_EXIT / 2 && waited < FLUSH_ON_EXIT * 3,
            "{waited:?}"
        );
        sink.open();
    }
}
