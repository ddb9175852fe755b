//! Shutdown within one budget: `server.shutdown_grace`, counted from the
//! signal, is the whole time from SIGTERM to exit. Its phases share it:
//!
//! 1. **drain**: no new connections; requests in flight and the upstream
//!    calls that outlived their clients finish, until the budget minus the
//!    flush reserve. Upstream calls still running then are cut
//!    ([`Upstream::cut_calls`](crate::upstream::Upstream::cut_calls)): each
//!    records its attempt as of unknown outcome (ledger `unknown`, spent
//!    from the quota) and returns its slot, so what it may cost is shipped
//!    with the rest;
//! 2. **final flush** ([`final_flush`]), in the reserve (and whatever the
//!    drain left unused): unconfirmed quota transitions first, then the
//!    ledger, which keeps the last part of the reserve for itself.
//!
//! The flush reserve is [`FLUSH_RESERVE`], or a quarter of a budget shorter
//! than four times that; of it the ledger keeps [`LEDGER_SHARE`]. Every
//! phase is cut at its deadline, also in the middle of a Redis call, so the
//! process exits within the budget whatever Redis or upstream do.
//!
//! Whether everything was shipped decides the exit code (`main.rs`): quota
//! transitions or ledger rows Redis did not confirm, or an upstream call
//! that did not finish even once cut (the ledger does not have it, its
//! quota reservation stays counted), make it non-zero.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::app::App;

/// The end of the budget kept for the final flush (at most a quarter of it).
/// A healthy Redis takes milliseconds; 5 s lets a flush ride out a Redis
/// failover or a few timed-out calls.
const FLUSH_RESERVE: Duration = Duration::from_secs(5);
/// The ledger's part of the flush reserve, at its end: the ledger is
/// flushed last and always gets at least this much of it (quota
/// transitions get the rest, and the ledger any time they leave).
const LEDGER_SHARE: f64 = 0.6;

/// The deadlines of one shutdown, fixed when the signal arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Requests and upstream calls stop being waited for; calls still
    /// running are cut.
    pub(crate) drain_until: Instant,
    /// Cut upstream calls must have recorded what they may cost.
    pub(crate) cut_until: Instant,
    /// Quota transitions stop being sent; the ledger's slice begins.
    pub(crate) quota_until: Instant,
    /// The ledger stops being sent; the process exits.
    pub(crate) end: Instant,
}

impl Budget {
    /// The deadlines of a shutdown that starts now and may take `total`.
    pub(crate) fn starting_now(total: Duration) -> Budget {
        Budget::from(Instant::now(), total)
    }

    fn from(start: Instant, total: Duration) -> Budget {
        let reserve = FLUSH_RESERVE.min(total / 4);
        // Config durations are at most 100 years, which the clock can add;
        // were one not, that phase would not wait at all.
        let at = |d: Duration| start.checked_add(d).unwrap_or(start);
        let ledger = reserve.mul_f64(LEDGER_SHARE);
        Budget {
            drain_until: at(total - reserve),
            // Half of the quota's part of the reserve.
            cut_until: at(total - reserve + (reserve - ledger) / 2),
            quota_until: at(total - ledger),
            end: at(total),
        }
    }
}

/// Waits until every slot of `slots` (`total` of them) is back, or
/// `until`. Returns how many were still taken.
pub(crate) async fn wait_for_slots(slots: &Semaphore, total: usize, until: Instant) -> usize {
    let all = u32::try_from(total).unwrap_or(u32::MAX);
    match tokio::time::timeout_at(until, slots.acquire_many(all)).await {
        Ok(_) => 0,
        Err(_) => total.saturating_sub(slots.available_permits()),
    }
}

/// Phase 1: waits for the connections (`connection_slots`, one per open
/// connection) to close and the upstream calls to finish, until the drain
/// deadline; then cuts the calls still running and waits for them to
/// record their cost, until `cut_until`. Returns the calls that did not:
/// each one is unshipped (metered by nobody, its reservation left in Redis).
pub(crate) async fn drain(
    app: &App,
    connection_slots: &Arc<Semaphore>,
    max_connections: usize,
    budget: &Budget,
) -> usize {
    let open = wait_for_slots(connection_slots, max_connections, budget.drain_until).await;
    if open > 0 {
        tracing::warn!(
            connections = open,
            "shutdown: drain time is over; connections still open are dropped at exit"
        );
    }
    // Upstream calls whose clients hung up still hold slots.
    let max = app.config.server.max_in_flight;
    let calls = wait_for_slots(&app.upstream_slots, max, budget.drain_until).await;
    if calls == 0 {
        return 0;
    }
    app.upstream.cut_calls();
    tracing::warn!(
        calls,
        "shutdown: upstream calls still running at the end of the drain time are cut (504): \
         recorded as of unknown outcome, as DashScope may bill them"
    );
    let left = wait_for_slots(&app.upstream_slots, max, budget.cut_until).await;
    if left > 0 {
        tracing::error!(
            calls = left,
            "shutdown: upstream calls did not end when cut and are abandoned: \
             DashScope may bill them, the ledger does not have them, their quota reservations stay counted"
        );
    }
    left
}

/// Phase 2, the last step of every shutdown: sends what this process still
/// owes its state store and says whether all of it was confirmed. Quota
/// transitions go first, until `budget.quota_until`; the ledger goes last,
/// until `budget.end`: it ships the on-disk journal to the ledger's store
/// (Redis, or SQLite without Redis); what it cannot ship stays in the
/// journal for the next start on it, and makes the result false.
pub(crate) async fn final_flush(app: &App, budget: &Budget) -> bool {
    let quota = flush_until(budget.quota_until, |left| app.limits.flush(left)).await;
    if !quota {
        tracing::error!(
            unsynced = app.metrics.quota_unsynced.get(),
            "shutdown: quota transitions were not confirmed by Redis before exit and are lost"
        );
    }
    let ledger = flush_until(budget.end, |left| app.ledger.flush(left)).await;
    if ledger {
        tracing::info!("ledger shipped; journal empty");
    } else if app.ledger.journal_status() == "off" {
        tracing::error!(
            buffered = app.metrics.ledger_buffered.get(),
            "shutdown: the ledger's store did not take every metered answer before exit; with ledger.journal = false they are lost"
        );
    } else {
        tracing::error!(
            journal_dir = %app.config.ledger.journal_dir.display(),
            "shutdown: the ledger's store did not take every journaled row before exit; they stay in the journal and are shipped when the gateway starts on it again"
        );
    }
    quota && ledger
}

/// Runs `flush(time left)` and cuts it at `until`, also mid-call.
async fn flush_until<F, Fut>(until: Instant, flush: F) -> bool
where
    F: FnOnce(Duration) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let left = until.saturating_duration_since(Instant::now());
    tokio::time::timeout_at(until, flush(left))
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_share_the_budget() {
        let t0 = Instant::now();
        let b = Budget::from(t0, Duration::from_secs(35));
        assert_eq!(b.end - t0, Duration::from_secs(35));
        assert_eq!(b.drain_until - t0, Duration::from_secs(30));
        assert_eq!(b.cut_until - t0, Duration::from_secs(31));
        assert_eq!(b.quota_until - t0, Duration::from_secs(32));
        // A short budget keeps three quarters for the drain.
        let b = Budget::from(t0, Duration::from_secs(4));
        assert_eq!(b.drain_until - t0, Duration::from_secs(3));
        assert_eq!(b.cut_until - t0, Duration::from_millis(3200));
        assert_eq!(b.quota_until - t0, Duration::from_millis(3400));
        assert_eq!(b.end - t0, Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_flush_is_cut_at_its_deadline() {
        let until = Instant::now() + Duration::from_millis(50);
        let started = Instant::now();
        let shipped = flush_until(until, |_| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            true
        })
        .await;
        assert!(!shipped);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
