//! Prometheus metrics. The names and labels of the first five are a contract
//! (the README's metrics table); label values come from config (tenant and
//! model names) or closed sets, never from free request data: a `model` label
//! is a model the gateway serves (its model table bounds them), and a name
//! that could not be a model is counted as [`INVALID_MODEL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::log_writer::LOG_LINES_DROPPED;

use crate::metering::{valid_model_name, CacheStatus, Reconciled, Usage};
use crate::request::Modality;

/// Label for requests that never got as far as a tenant; not a valid tenant
/// name, so it cannot collide with one.
pub(crate) const NO_TENANT: &str = "(none)";

/// `model` label of requests that never named a model (refused before
/// their body was read).
pub(crate) const NO_MODEL: &str = "none";

/// `model` label standing in for a name that is not a valid model name
/// ([`valid_model_name`]); such answers are not in the ledger.
pub(crate) const INVALID_MODEL: &str = "(invalid)";

/// The `model` label value of a model name.
pub(crate) fn model_label(model: &str) -> &str {
    if valid_model_name(model) {
        model
    } else {
        INVALID_MODEL
    }
}

/// Latency buckets from a memory hit (tens of µs) to a slow upstream (30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub(crate) struct Metrics {
    registry: Registry,
    /// tenant, model, cache (hit/partial/miss/none), code (`ok` or the
    /// error code).
    pub(crate) requests: IntCounterVec,
    /// tenant, model, modality, cache (hit/miss/unknown).
    pub(crate) usage_units: IntCounterVec,
    /// tenant, model, modality, cache (hit/miss/unknown).
    pub(crate) items: IntCounterVec,
    /// cache (hit/partial/miss/none).
    pub(crate) request_duration: HistogramVec,
    pub(crate) upstream_duration: Histogram,
    /// status (HTTP status, or `connect_error` / `timeout`).
    pub(crate) upstream_responses: IntCounterVec,
    /// op.
    pub(crate) cache_errors: IntCounterVec,
    pub(crate) coalesced: IntCounter,
    /// tenant.
    pub(crate) quota_remaining: IntGaugeVec,
    /// tenant, model.
    pub(crate) usage_mismatch: IntCounterVec,
    pub(crate) ledger_buffered: IntGauge,
    pub(crate) quota_unsynced: IntGauge,
    pub(crate) ledger_flush_errors: IntCounter,
    /// when (waited, ahead).
    pub(crate) rate_lease_refills: IntCounterVec,
    /// tenant, cache: the gateway's own units of successful answers.
    pub(crate) usage_computed_units: IntCounterVec,
    /// tenant: units in upstream's usage blocks (misses).
    pub(crate) usage_upstream_units: IntCounterVec,
    /// op (append, fsync, rotate, read).
    pub(crate) journal_errors: IntCounterVec,
    pub(crate) journal_damaged_rows: IntCounter,
    pub(crate) in_flight: IntGauge,
    /// tenant: upstream attempts sent whose outcome is unknown.
    pub(crate) upstream_unknown_outcomes: IntCounterVec,
    /// tenant, model: units those attempts may have cost.
    pub(crate) unknown_outcome_units: IntCounterVec,
    /// Metered answers left out of the ledger because their model name
    /// cannot be a ledger key (see [`valid_model_name`]).
    pub(crate) ledger_rejected_rows: IntCounter,
    pub(crate) connections_open: IntGauge,
    pub(crate) connections_refused: IntCounter,
    /// store (`cache`, `state`); one Redis holding both sets both.
    pub(crate) redis_up: IntGaugeVec,
    pub(crate) config_reloads: IntCounterVec,
    /// Usage events accepted by the receiver.
    pub(crate) events_shipped: IntCounter,
    /// Usage event batches that failed (each attempt).
    pub(crate) events_failed: IntCounter,
    /// Usage events the receiver refused (a 4xx for the batch), skipped.
    pub(crate) events_rejected: IntCounter,
    /// Journaled rows whose events are not accepted yet.
    pub(crate) events_backlog: IntGauge,
}

/// Creates and registers a metric. Only invalid names or duplicate
/// registrations fail; the names are constants, so a unit test covers it.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: Result<M, prometheus::Error>,
) -> Result<M, prometheus::Error> {
    let m = m?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

impl Metrics {
    pub(crate) fn new() -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "embedgate_requests_total",
            "Requests answered, by tenant, model, cache status and result code.",
            &["tenant", "model", "cache", "code"],
        )?;
        let usage_units = counter_vec(
            &r,
            "embedgate_usage_units_total",
            "DashScope usage units (measure x weight) of successful answers.",
            &["tenant", "model", "modality", "cache"],
        )?;
        let items = counter_vec(
            &r,
            "embedgate_items_total",
            "Content items (measure) of successful answers.",
            &["tenant", "model", "modality", "cache"],
        )?;
        let request_duration = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "embedgate_request_duration_seconds",
                    "Whole-request latency as seen by the gateway.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["cache"],
            ),
        )?;
        let upstream_duration = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "embedgate_upstream_duration_seconds",
                    "Latency of each upstream call attempt.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            ),
        )?;
        let upstream_responses = counter_vec(
            &r,
            "embedgate_upstream_responses_total",
            "Upstream call attempts by HTTP status (or connect_error, timeout).",
            &["status"],
        )?;
        let cache_errors = counter_vec(
            &r,
            "embedgate_cache_errors_total",
            "Redis calls that failed or were skipped because Redis is down, by operation.",
            &["op"],
        )?;
        let coalesced = register(
            &r,
            IntCounter::new(
                "embedgate_coalesced_requests_total",
                "Requests answered by an identical request already in flight.",
            ),
        )?;
        let quota_remaining = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "embedgate_quota_remaining",
                    "Units left in the tenant's current quota period, as last seen.",
                ),
                &["tenant"],
            ),
        )?;
        let usage_mismatch = counter_vec(
            &r,
            "embedgate_usage_mismatch_total",
            "Misses whose upstream usage block disagreed with the gateway's computation.",
            &["tenant", "model"],
        )?;
        let usage_computed_units = counter_vec(
            &r,
            "embedgate_usage_computed_units_total",
            "The gateway's own count of units (items x weight) of successful answers; on a miss, compare with upstream's.",
            &["tenant", "cache"],
        )?;
        let usage_upstream_units = counter_vec(
            &r,
            "embedgate_usage_upstream_units_total",
            "Units in upstream's usage blocks of successful misses (what DashScope says it billed).",
            &["tenant"],
        )?;
        let journal_errors = counter_vec(
            &r,
            "embedgate_journal_errors_total",
            "Journal operations that failed, by operation (append, fsync, rotate, read).",
            &["op"],
        )?;
        let journal_damaged_rows = register(
            &r,
            IntCounter::new(
                "embedgate_journal_damaged_rows_total",
                "Journal lines skipped when read back because they were torn or damaged.",
            ),
        )?;
        let gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help));
        let ledger_buffered = gauge(
            "embedgate_ledger_buffered_entries",
            "Metered answers journaled but not yet confirmed by the ledger (Redis or SQLite).",
        )?;
        let in_flight = gauge("embedgate_in_flight_requests", "Requests being served.")?;
        let redis_up = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "embedgate_redis_up",
                    "1 when the Redis holding the store (cache, state) answers, else 0.",
                ),
                &["store"],
            ),
        )?;
        let upstream_unknown_outcomes = counter_vec(
            &r,
            "embedgate_upstream_unknown_outcome_total",
            "Upstream attempts sent whose outcome is unknown (timed out, reset, body failed): upstream may have billed them.",
            &["tenant"],
        )?;
        let unknown_outcome_units = counter_vec(
            &r,
            "embedgate_unknown_outcome_units_total",
            "Units the unknown-outcome attempts may have cost (recorded in the ledger as cache=unknown).",
            &["tenant", "model"],
        )?;
        let ledger_rejected_rows = register(
            &r,
            IntCounter::new(
                "embedgate_ledger_rejected_rows_total",
                "Metered answers not recorded in the ledger because their model name is not 1-64 bytes of [A-Za-z0-9._-].",
            ),
        )?;
        let connections_open = gauge("embedgate_connections_open", "Client connections open now.")?;
        let connections_refused = register(
            &r,
            IntCounter::new(
                "embedgate_connections_refused_total",
                "Connections closed at accept because server.max_connections were open.",
            ),
        )?;
        let quota_unsynced = gauge(
            "embedgate_quota_unsynced",
            "Quota settlements and releases waiting for Redis to confirm them.",
        )?;
        let ledger_flush_errors = register(
            &r,
            IntCounter::new(
                "embedgate_ledger_flush_errors_total",
                "Failed attempts to write journaled rows to the ledger (Redis or SQLite).",
            ),
        )?;
        let rate_lease_refills = counter_vec(
            &r,
            "embedgate_rate_lease_refills_total",
            "Refills of Redis-leased rate tokens: waited (a request waited for Redis) or ahead (started before the lease ran out).",
            &["when"],
        )?;
        let config_reloads = counter_vec(
            &r,
            "embedgate_config_reloads_total",
            "Config reloads by result (ok, error).",
            &["result"],
        )?;
        let events_shipped = register(
            &r,
            IntCounter::new(
                "embedgate_events_shipped_total",
                "Usage events (one per metered answer) accepted by the events receiver (events.url).",
            ),
        )?;
        let events_failed = register(
            &r,
            IntCounter::new(
                "embedgate_events_failed_total",
                "Attempts to send a batch of usage events that failed (timeout, connection error, 5xx, 401, 403, 404, 408, 429) and are retried.",
            ),
        )?;
        let events_rejected = register(
            &r,
            IntCounter::new(
                "embedgate_events_rejected_total",
                "Usage events in batches the receiver refused with another 4xx: logged and skipped, not retried.",
            ),
        )?;
        let events_backlog = gauge(
            "embedgate_events_backlog",
            "Journaled metered answers whose usage events the receiver has not accepted yet.",
        )?;
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new("embedgate_build_info", "Build information; always 1."),
                &["version"],
            ),
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Counted by the log writer, which exists before any `Metrics`.
        r.register(Box::new(StaticCounter::new(
            "embedgate_log_lines_dropped_total",
            "Log lines dropped because the log queue was full or the log sink failed.",
            &LOG_LINES_DROPPED,
        )?))?;

        Ok(Metrics {
            registry: r,
            requests,
            usage_units,
            items,
            request_duration,
            upstream_duration,
            upstream_responses,
            cache_errors,
            coalesced,
            quota_remaining,
            usage_mismatch,
            ledger_buffered,
            quota_unsynced,
            ledger_flush_errors,
            rate_lease_refills,
            usage_computed_units,
            usage_upstream_units,
            journal_errors,
            journal_damaged_rows,
            in_flight,
            upstream_unknown_outcomes,
            unknown_outcome_units,
            ledger_rejected_rows,
            connections_open,
            connections_refused,
            redis_up,
            config_reloads,
            events_shipped,
            events_failed,
            events_rejected,
            events_backlog,
        })
    }

    /// The contract counters for one successful answer's usage (one call:
    /// hit, miss or unknown; a partial answer is two calls).
    pub(crate) fn record_usage(
        &self,
        tenant: &str,
        model: &str,
        cache: CacheStatus,
        usage: &Usage,
    ) {
        if !cache.is_row_status() {
            tracing::error!(
                cache = cache.as_str(),
                "usage metered with a request-level cache status; not counted"
            );
            return;
        }
        let model = model_label(model);
        for m in Modality::ALL {
            let n = usage.items.get(m);
            if n == 0 {
                continue;
            }
            let labels = [tenant, model, m.as_str(), cache.as_str()];
            self.items.with_label_values(&labels).inc_by(n);
            self.usage_units
                .with_label_values(&labels)
                .inc_by(usage.units.get(m));
        }
    }

    /// The reconciliation counters for one successful answer: the gateway's
    /// own figure, and upstream's when it gave one.
    pub(crate) fn record_reconciliation(&self, tenant: &str, cache: CacheStatus, r: &Reconciled) {
        self.usage_computed_units
            .with_label_values(&[tenant, cache.as_str()])
            .inc_by(r.computed.total());
        if r.upstream {
            self.usage_upstream_units
                .with_label_values(&[tenant])
                .inc_by(r.record.total());
        }
    }

    /// Prometheus text exposition.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// A counter kept in a static atomic by code outside the registry, read
/// at every scrape.
struct StaticCounter {
    desc: Desc,
    value: &'static AtomicU64,
}

impl StaticCounter {
    fn new(
        name: &str,
        help: &str,
        value: &'static AtomicU64,
    ) -> Result<StaticCounter, prometheus::Error> {
        let desc = Desc::new(name.into(), help.into(), Vec::new(), HashMap::new())?;
        Ok(StaticCounter { desc, value })
    }
}

impl Collector for StaticCounter {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut counter = Counter::default();
        counter.set_value(self.value.load(Ordering::Relaxed) as f64);
        let mut metric = Metric::default();
        metric.set_counter(counter);
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::COUNTER);
        family.set_metric(vec![metric]);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers() {
        let m = Metrics::new().unwrap();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("embedgate_build_info"));
    }

    #[test]
    fn usage_counters_carry_the_model_and_never_partial() {
        let m = Metrics::new().unwrap();
        let mut items = crate::request::Counts::default();
        items.set(Modality::Text, 2);
        let w = crate::config::Weights {
            text: 1,
            image: 1,
            audio: 2,
        };
        let u = Usage::of(items, &w);
        m.record_usage("search", "text-embedding-v4", CacheStatus::Miss, &u);
        m.record_usage("search", "bad model", CacheStatus::Hit, &u);
        m.record_usage("search", "text-embedding-v4", CacheStatus::Partial, &u);
        let got = |model, cache| {
            m.usage_units
                .with_label_values(&["search", model, "text", cache])
                .get()
        };
        assert_eq!(got("text-embedding-v4", "miss"), 2);
        assert_eq!(got(INVALID_MODEL, "hit"), 2);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            !text.contains("cache=\"partial\""),
            "partial is never a usage label: {text}"
        );
        assert!(text.contains(
            "embedgate_items_total{cache=\"miss\",modality=\"text\",model=\"text-embedding-v4\",tenant=\"search\"} 2"
        ), "{text}");
    }

    #[test]
    fn dropped_log_lines_are_a_counter_read_at_each_scrape() {
        let m = Metrics::new().unwrap();
        let before = LOG_LINES_DROPPED.load(Ordering::SeqCst);
        LOG_LINES_DROPPED.fetch_add(3, Ordering::SeqCst);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("# TYPE embedgate_log_lines_dropped_total counter"),
            "{text}"
        );
        let value: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("embedgate_log_lines_dropped_total "))
            .unwrap()
            .parse()
            .unwrap();
        // Other tests in this process may drop lines too; never fewer.
        assert!(value >= before + 3, "{value} < {before} + 3");
    }
}
