//! What an answer costs, in DashScope's billing units.
//!
//! [`Usage`] is computed once per request: from the request's items and the
//! configured weights (the gateway's figure, used for hits and for the
//! quota reservation), or from upstream's `usage` block on a miss, which is
//! the record ([`reconcile`] flags every disagreement). Metrics
//! ([`Metrics::record_usage`](crate::metrics::Metrics::record_usage)) and the
//! ledger ([`Ledger::record`](crate::ledger::Ledger::record)) take a `Usage`
//! as it is; nothing downstream multiplies weights again.

use std::sync::Arc;

use crate::config::Weights;
use crate::request::{Counts, Modality};

/// Cache status of an answer, as in the `cache` label and `X-Cache`, and
/// of a ledger row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum CacheStatus {
    Hit,
    Miss,
    /// An upstream call whose outcome is not known (sent, then timed out or
    /// reset): DashScope may have billed it. A row status of the ledger and
    /// a `cache` label value of the usage counters (the answer itself is an
    /// error, `X-Cache: MISS`).
    Unknown,
    /// Some items of the request were cached, the others fetched upstream.
    /// A request-level status only: the `cache` label of
    /// `embedgate_requests_total` and `embedgate_request_duration_seconds`,
    /// and `X-Cache: PARTIAL`. Never on the units/items counters nor on a
    /// ledger row: a partial answer is metered as two calls, its hit items
    /// and its miss items ([`CacheStatus::is_row_status`]).
    Partial,
}

impl CacheStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Unknown => "unknown",
            CacheStatus::Partial => "partial",
        }
    }

    /// Any status, as [`Self::as_str`] names it (`partial` included).
    pub(crate) fn from_name(s: &str) -> Option<CacheStatus> {
        match s {
            "hit" => Some(CacheStatus::Hit),
            "miss" => Some(CacheStatus::Miss),
            "unknown" => Some(CacheStatus::Unknown),
            "partial" => Some(CacheStatus::Partial),
            _ => None,
        }
    }

    /// True for the statuses a metered call (a ledger row, a units/items
    /// sample) can have: hit, miss, unknown; not partial.
    pub(crate) fn is_row_status(self) -> bool {
        self != CacheStatus::Partial
    }

    /// A ledger row's status: as [`Self::from_name`], `partial` refused.
    pub(crate) fn row_from_name(s: &str) -> Option<CacheStatus> {
        CacheStatus::from_name(s).filter(|c| c.is_row_status())
    }
}

/// The model a request named, on its response (for the `model` label of
/// `embedgate_requests_total` and the access log). Absent when the request
/// never got as far as naming one (a 401 before the body is read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelName(pub(crate) Arc<str>);

/// The model every row of the ledger had before the ledger carried a
/// model (journals, Redis fields and SQLite rows of earlier versions).
pub(crate) const LEGACY_MODEL: &str = "multimodal-embedding-one-peace-v1";

/// The longest model name the ledger records.
pub(crate) const MAX_MODEL_NAME_BYTES: usize = 64;

/// True when `model` can be a ledger key and a label value: 1 to
/// [`MAX_MODEL_NAME_BYTES`] bytes of `[A-Za-z0-9._-]` (the journal line is
/// space-separated, ledger fields `|`-separated). DashScope's names are.
pub(crate) fn valid_model_name(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= MAX_MODEL_NAME_BYTES
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Items and units per modality of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// DashScope's `measure`: items per modality.
    pub(crate) items: Counts,
    /// `measure · weight` per modality.
    pub(crate) units: Counts,
}

impl Usage {
    /// The gateway's own figure for these items.
    pub(crate) fn of(items: Counts, w: &Weights) -> Usage {
        let mut units = Counts::default();
        for m in Modality::ALL {
            units.set(m, items.get(m) * m.weight(w));
        }
        Usage { items, units }
    }

    /// `n` times this usage (`n` attempts of the same request).
    pub(crate) fn times(&self, n: u64) -> Usage {
        let mut u = Usage::default();
        for m in Modality::ALL {
            u.items.set(m, self.items.get(m) * n);
            u.units.set(m, self.units.get(m) * n);
        }
        u
    }

    /// DashScope's `total_usage`: Σ measure·weight.
    pub(crate) fn total(&self) -> u64 {
        self.units.total()
    }

    /// The `usage` block DashScope answers with, listing present modalities
    /// only: `{"text":{"measure":1,"weight":1},…,"total_usage":N}`.
    pub(crate) fn json(&self) -> String {
        // By hand (no `fmt`): every hit writes one.
        let mut num = itoa::Buffer::new();
        let mut s = String::with_capacity(96);
        s.push('{');
        for m in Modality::ALL {
            let n = self.items.get(m);
            // Only modalities present are listed (`checked_div` is None for 0).
            if let Some(weight) = self.units.get(m).checked_div(n) {
                s.push('"');
                s.push_str(m.as_str());
                s.push_str("\":{\"measure\":");
                s.push_str(num.format(n));
                s.push_str(",\"weight\":");
                s.push_str(num.format(weight));
                s.push_str("},");
            }
        }
        s.push_str("\"total_usage\":");
        s.push_str(num.format(self.total()));
        s.push('}');
        s
    }
}

/// What is metered for one answer: the record, and the figures it is
/// reconciled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reconciled {
    /// Upstream's usage when it gave one, else the gateway's.
    pub(crate) record: Usage,
    /// The gateway's own figure (Σ items × weight of the request).
    pub(crate) computed: Usage,
    /// `record` is upstream's usage block.
    pub(crate) upstream: bool,
    /// Upstream's usage disagreed with the gateway's, or was missing:
    /// counted (`embedgate_usage_mismatch_total`) and logged, never hidden.
    pub(crate) mismatch: bool,
}

impl Reconciled {
    /// An answer with the gateway's own figure only (a hit).
    pub(crate) fn own(usage: Usage) -> Reconciled {
        Reconciled {
            record: usage,
            computed: usage,
            upstream: false,
            mismatch: false,
        }
    }
}

pub(crate) fn reconcile(expected: Usage, upstream: Option<Usage>) -> Reconciled {
    let record = upstream.unwrap_or(expected);
    Reconciled {
        record,
        computed: expected,
        upstream: upstream.is_some(),
        mismatch: upstream.is_none() || record != expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Weights = Weights {
        text: 1,
        image: 1,
        audio: 2,
    };

    fn counts(text: u64, image: u64, audio: u64) -> Counts {
        let mut c = Counts::default();
        c.set(Modality::Text, text);
        c.set(Modality::Image, image);
        c.set(Modality::Audio, audio);
        c
    }

    #[test]
    fn units_are_measure_times_weight() {
        let u = Usage::of(counts(1, 1, 1), &W);
        assert_eq!(u.total(), 4);
        let v: serde_json::Value = serde_json::from_str(&u.json()).unwrap();
        assert_eq!(v["audio"]["weight"], 2);
        assert_eq!(v["audio"]["measure"], 1);
        assert_eq!(v["total_usage"], 4);
        let only_text: serde_json::Value =
            serde_json::from_str(&Usage::of(counts(3, 0, 0), &W).json()).unwrap();
        assert!(only_text.get("image").is_none());
        assert_eq!(only_text["text"]["measure"], 3);
    }

    #[test]
    fn partial_is_a_request_status_only() {
        for c in [
            CacheStatus::Hit,
            CacheStatus::Miss,
            CacheStatus::Unknown,
            CacheStatus::Partial,
        ] {
            assert_eq!(CacheStatus::from_name(c.as_str()), Some(c));
        }
        assert!(!CacheStatus::Partial.is_row_status());
        assert_eq!(CacheStatus::row_from_name("partial"), None);
        assert_eq!(CacheStatus::row_from_name("miss"), Some(CacheStatus::Miss));
        assert_eq!(CacheStatus::from_name("none"), None);
    }

    #[test]
    fn model_names_fit_the_ledger() {
        for ok in [
            LEGACY_MODEL,
            "text-embedding-v4",
            "qwen2.5-vl-embedding",
            "tongyi-embedding-vision-plus",
            &"a".repeat(MAX_MODEL_NAME_BYTES),
        ] {
            assert!(valid_model_name(ok), "{ok}");
        }
        for bad in [
            "",
            "two words",
            "a|b",
            "模型",
            "new\nline",
            &"a".repeat(MAX_MODEL_NAME_BYTES + 1),
        ] {
            assert!(!valid_model_name(bad), "{bad}");
        }
    }

    #[test]
    fn upstream_usage_is_the_record_and_mismatches_are_flagged() {
        let expected = Usage::of(counts(1, 0, 1), &W);
        let same = reconcile(expected, Some(expected));
        assert_eq!((same.record, same.mismatch), (expected, false));
        assert!(same.upstream);
        let billed = Usage::of(counts(1, 0, 2), &W);
        let more = reconcile(expected, Some(billed));
        assert_eq!((more.record, more.mismatch), (billed, true));
        assert_eq!(more.computed, expected);
        let none = reconcile(expected, None);
        assert_eq!((none.record, none.mismatch), (expected, true));
        assert!(!none.upstream);
        let hit = Reconciled::own(expected);
        assert_eq!((hit.record, hit.computed), (expected, expected));
        assert!(!hit.upstream && !hit.mismatch);
    }
}
