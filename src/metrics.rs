//! Prometheus metrics. The names and labels of the first five are a contract
//! (SPEC §4); label values come from config (tenant names) or closed sets,
//! never from request data.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label for requests that never got as far as a tenant; not a valid tenant
/// name, so it cannot collide with one.
pub const NO_TENANT: &str = "(none)";

/// Latency buckets from a memory hit (tens of µs) to a slow upstream (30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    /// tenant, cache (hit/miss/none), code (`ok` or the error code).
    pub requests: IntCounterVec,
    /// tenant, modality, cache.
    pub usage_units: IntCounterVec,
    /// tenant, modality, cache.
    pub items: IntCounterVec,
    /// cache.
    pub request_duration: HistogramVec,
    pub upstream_duration: Histogram,
    /// status (HTTP status, or `connect_error` / `timeout`).
    pub upstream_responses: IntCounterVec,
    /// op.
    pub cache_errors: IntCounterVec,
    pub coalesced: IntCounter,
    /// tenant.
    pub quota_remaining: IntGaugeVec,
    /// tenant.
    pub usage_mismatch: IntCounterVec,
    pub ledger_buffered: IntGauge,
    pub ledger_flush_errors: IntCounter,
    pub in_flight: IntGauge,
    pub redis_up: IntGauge,
    pub config_reloads: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable_metric(name, e));
    let _ = r.register(Box::new(c.clone()));
    c
}

// Metric construction only fails on invalid names, which are constants here.
#[allow(clippy::panic)]
fn unreachable_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} is invalid: {e}")
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "embedgate_requests_total",
            "Requests answered, by tenant, cache status and result code.",
            &["tenant", "cache", "code"],
        );
        let usage_units = counter_vec(
            &r,
            "embedgate_usage_units_total",
            "DashScope usage units (measure x weight) of successful answers.",
            &["tenant", "modality", "cache"],
        );
        let items = counter_vec(
            &r,
            "embedgate_items_total",
            "Content items (measure) of successful answers.",
            &["tenant", "modality", "cache"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "embedgate_request_duration_seconds",
                "Whole-request latency as seen by the gateway.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["cache"],
        )
        .unwrap_or_else(|e| unreachable_metric("embedgate_request_duration_seconds", e));
        let _ = r.register(Box::new(request_duration.clone()));
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "embedgate_upstream_duration_seconds",
                "Latency of each upstream call attempt.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable_metric("embedgate_upstream_duration_seconds", e));
        let _ = r.register(Box::new(upstream_duration.clone()));
        let upstream_responses = counter_vec(
            &r,
            "embedgate_upstream_responses_total",
            "Upstream call attempts by HTTP status (or connect_error, timeout).",
            &["status"],
        );
        let cache_errors = counter_vec(
            &r,
            "embedgate_cache_errors_total",
            "Redis calls that failed or were skipped because Redis is down, by operation.",
            &["op"],
        );
        let coalesced = IntCounter::new(
            "embedgate_coalesced_requests_total",
            "Requests answered by an identical request already in flight.",
        )
        .unwrap_or_else(|e| unreachable_metric("embedgate_coalesced_requests_total", e));
        let _ = r.register(Box::new(coalesced.clone()));
        let quota_remaining = IntGaugeVec::new(
            Opts::new(
                "embedgate_quota_remaining",
                "Units left in the tenant's current quota period, as last seen.",
            ),
            &["tenant"],
        )
        .unwrap_or_else(|e| unreachable_metric("embedgate_quota_remaining", e));
        let _ = r.register(Box::new(quota_remaining.clone()));
        let usage_mismatch = counter_vec(
            &r,
            "embedgate_usage_mismatch_total",
            "Misses whose upstream usage block disagreed with the gateway's computation.",
            &["tenant"],
        );
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
            let _ = r.register(Box::new(g.clone()));
            g
        };
        let ledger_buffered = gauge(
            "embedgate_ledger_buffered_entries",
            "Ledger rows waiting to be written to Redis.",
        );
        let in_flight = gauge("embedgate_in_flight_requests", "Requests being served.");
        let redis_up = gauge("embedgate_redis_up", "1 when Redis answers, else 0.");
        let ledger_flush_errors = IntCounter::new(
            "embedgate_ledger_flush_errors_total",
            "Failed attempts to write buffered ledger rows to Redis.",
        )
        .unwrap_or_else(|e| unreachable_metric("embedgate_ledger_flush_errors_total", e));
        let _ = r.register(Box::new(ledger_flush_errors.clone()));
        let config_reloads = counter_vec(
            &r,
            "embedgate_config_reloads_total",
            "Config reloads by result (ok, error).",
            &["result"],
        );
        let build = IntGaugeVec::new(
            Opts::new("embedgate_build_info", "Build information; always 1."),
            &["version"],
        )
        .unwrap_or_else(|e| unreachable_metric("embedgate_build_info", e));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let _ = r.register(Box::new(build));

        Metrics {
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
            ledger_flush_errors,
            in_flight,
            redis_up,
            config_reloads,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
