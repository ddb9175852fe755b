//! Usage reports: the ledger's fields turned into rows (per tenant, day,
//! modality and cache status) and reconciliation figures (per tenant and
//! day), as JSON or CSV.
//!
//! Field vocabulary, per (tenant, UTC day), in Redis hashes and SQLite rows
//! alike (`<m>` a modality, `<c>` a cache status `hit`, `miss` or
//! `unknown`):
//!
//! | field | sum of |
//! |---|---|
//! | `<m>\|<c>\|items` | items (DashScope's `measure`) of the record |
//! | `<m>\|<c>\|units` | units of the record: upstream's usage on a miss when it gave one, else the gateway's |
//! | `<m>\|<c>\|computed` | the gateway's own units (not stored for hits, where they are the record) |
//! | `<m>\|<c>\|upstream` | units of upstream's usage blocks |
//! | `requests\|<c>` | answers |
//! | `mismatches\|<c>` | answers whose upstream usage disagreed with the gateway's, or was missing |

use std::collections::BTreeMap;

use serde::Serialize;

use super::journal::Entry;
use super::store::{Fields, Stored};
use crate::date::Day;
use crate::metering::CacheStatus;
use crate::request::Modality;

/// One report row, as `/admin/usage` answers it. The first six columns are
/// the original report; new ones go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Row {
    pub(crate) tenant: String,
    pub(crate) day: String,
    pub(crate) modality: &'static str,
    pub(crate) cache: &'static str,
    pub(crate) items: u64,
    pub(crate) units: u64,
    /// The gateway's own units for these answers (equal to `units` for hits).
    pub(crate) computed_units: u64,
    /// Units upstream's usage blocks reported for these answers.
    pub(crate) upstream_units: u64,
}

/// Reconciliation figures of one tenant and day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Figures {
    pub(crate) tenant: String,
    pub(crate) day: String,
    /// Successful answers (and unknown outcomes).
    pub(crate) requests: u64,
    /// Units served from the cache.
    pub(crate) hit_units: u64,
    /// Units of misses as recorded: what DashScope bills.
    pub(crate) miss_units: u64,
    /// Units upstream's usage blocks reported (misses).
    pub(crate) upstream_units: u64,
    /// The gateway's own units for the misses.
    pub(crate) computed_units: u64,
    /// Units of upstream calls whose outcome is unknown (maybe billed).
    pub(crate) unknown_units: u64,
    /// Misses whose upstream usage disagreed with the gateway's, or was
    /// missing.
    pub(crate) mismatches: u64,
}

/// A whole report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) figures: Vec<Figures>,
}

pub(crate) fn field(modality: Modality, cache: CacheStatus, what: &str) -> String {
    format!("{}|{}|{what}", modality.as_str(), cache.as_str())
}

fn cache_index(c: CacheStatus) -> usize {
    match c {
        CacheStatus::Hit => 0,
        CacheStatus::Miss => 1,
        CacheStatus::Unknown => 2,
    }
}

const CACHES: [CacheStatus; 3] = [CacheStatus::Hit, CacheStatus::Miss, CacheStatus::Unknown];

/// Answers of one group summed in fixed slots (no allocation per answer);
/// they become fields once per batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sums {
    /// [cache][modality]: items, units, computed units, upstream units.
    cells: [[[u64; 4]; 3]; 3],
    requests: [u64; 3],
    mismatches: [u64; 3],
}

impl Sums {
    /// Adds one answer.
    pub(crate) fn add(&mut self, e: &Entry) {
        let c = cache_index(e.cache);
        for (i, m) in Modality::ALL.into_iter().enumerate() {
            let cell = &mut self.cells[c][i];
            let units = e.units.get(m);
            cell[0] += e.items.get(m);
            cell[1] += units;
            cell[2] += e.computed.get(m);
            if e.upstream {
                cell[3] += units;
            }
        }
        self.requests[c] += 1;
        self.mismatches[c] += u64::from(e.mismatch);
    }

    /// The fields these sums add to their group (zeros left out; the
    /// gateway's own units of hits are their units, so not stored).
    pub(crate) fn fields(&self) -> Fields {
        let mut f = Fields::new();
        let mut put = |k: String, v: u64| {
            if v > 0 {
                f.insert(k, i64::try_from(v).unwrap_or(i64::MAX));
            }
        };
        for (ci, c) in CACHES.into_iter().enumerate() {
            for (mi, m) in Modality::ALL.into_iter().enumerate() {
                let [items, units, computed, upstream] = self.cells[ci][mi];
                put(field(m, c, "items"), items);
                put(field(m, c, "units"), units);
                if c != CacheStatus::Hit {
                    put(field(m, c, "computed"), computed);
                }
                put(field(m, c, "upstream"), upstream);
            }
            put(format!("requests|{}", c.as_str()), self.requests[ci]);
            put(format!("mismatches|{}", c.as_str()), self.mismatches[ci]);
        }
        f
    }
}

#[derive(Default)]
struct Cell {
    items: u64,
    units: u64,
    computed: u64,
    upstream: u64,
}

/// The report of what the ledger stores, sorted by tenant, day, modality
/// and cache status.
pub(crate) fn build(stored: Vec<Stored>) -> Report {
    let mut report = Report::default();
    for s in stored {
        let mut cells: BTreeMap<(Modality, CacheStatus), Cell> = BTreeMap::new();
        let mut figures = Figures {
            tenant: s.tenant.clone(),
            day: s.day.to_string(),
            ..Figures::default()
        };
        let mut any = false;
        for (k, v) in &s.fields {
            let v = u64::try_from(*v).unwrap_or(0);
            let parts: Vec<&str> = k.split('|').collect();
            match parts[..] {
                [m, c, what] => {
                    let (Some(m), Some(c)) = (Modality::from_name(m), CacheStatus::from_name(c))
                    else {
                        continue;
                    };
                    let cell = cells.entry((m, c)).or_default();
                    match what {
                        "items" => cell.items += v,
                        "units" => cell.units += v,
                        "computed" => cell.computed += v,
                        "upstream" => cell.upstream += v,
                        _ => {}
                    }
                }
                ["requests", c] if CacheStatus::from_name(c).is_some() => {
                    figures.requests += v;
                    any |= v > 0;
                }
                ["mismatches", c] if CacheStatus::from_name(c).is_some() => {
                    figures.mismatches += v;
                    any |= v > 0;
                }
                _ => {}
            }
        }
        for ((m, c), cell) in cells {
            let computed = if c == CacheStatus::Hit {
                cell.units
            } else {
                cell.computed
            };
            match c {
                CacheStatus::Hit => figures.hit_units += cell.units,
                CacheStatus::Miss => {
                    figures.miss_units += cell.units;
                    figures.computed_units += computed;
                }
                CacheStatus::Unknown => figures.unknown_units += cell.units,
            }
            figures.upstream_units += cell.upstream;
            any = true;
            report.rows.push(Row {
                tenant: s.tenant.clone(),
                day: s.day.to_string(),
                modality: m.as_str(),
                cache: c.as_str(),
                items: cell.items,
                units: cell.units,
                computed_units: computed,
                upstream_units: cell.upstream,
            });
        }
        if any {
            report.figures.push(figures);
        }
    }
    report.rows.sort_by(|a, b| {
        (&a.tenant, &a.day, a.modality, a.cache).cmp(&(&b.tenant, &b.day, b.modality, b.cache))
    });
    report
        .figures
        .sort_by(|a, b| (&a.tenant, &a.day).cmp(&(&b.tenant, &b.day)));
    report
}

/// The rows as CSV with a header line; tenant names and days never need
/// quoting.
pub(crate) fn rows_csv(rows: &[Row]) -> String {
    let mut s =
        String::from("tenant,day,modality,cache,items,units,computed_units,upstream_units\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            r.tenant,
            r.day,
            r.modality,
            r.cache,
            r.items,
            r.units,
            r.computed_units,
            r.upstream_units
        ));
    }
    s
}

/// The reconciliation figures as CSV with a header line.
pub(crate) fn figures_csv(figures: &[Figures]) -> String {
    let mut s = String::from(
        "tenant,day,requests,hit_units,miss_units,upstream_units,computed_units,unknown_units,mismatches\n",
    );
    for f in figures {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            f.tenant,
            f.day,
            f.requests,
            f.hit_units,
            f.miss_units,
            f.upstream_units,
            f.computed_units,
            f.unknown_units,
            f.mismatches
        ));
    }
    s
}

/// The JSON report: `from`, `to`, `rows` (as always) and `reconciliation`.
pub(crate) fn json(from: Day, to: Day, report: &Report) -> String {
    serde_json::json!({
        "from": from.to_string(),
        "to": to.to_string(),
        "rows": report.rows,
        "reconciliation": report.figures,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{reconcile, Reconciled, Usage};
    use crate::request::Counts;
    use std::sync::Arc;

    const W: crate::config::Weights = crate::config::Weights {
        text: 1,
        image: 1,
        audio: 2,
    };

    fn usage(text: u64, image: u64, audio: u64) -> Usage {
        let mut c = Counts::default();
        c.set(Modality::Text, text);
        c.set(Modality::Image, image);
        c.set(Modality::Audio, audio);
        Usage::of(c, &W)
    }

    #[test]
    fn fields_become_rows_and_figures() {
        let day = Day::from_days(20_000);
        let t: Arc<str> = Arc::from("search");
        let answers: [(CacheStatus, Reconciled); 5] = [
            (CacheStatus::Hit, Reconciled::own(usage(2, 0, 1))),
            (
                CacheStatus::Miss,
                reconcile(usage(2, 0, 1), Some(usage(2, 0, 1))),
            ),
            // Upstream billed one image more than the gateway counted.
            (
                CacheStatus::Miss,
                reconcile(usage(1, 0, 0), Some(usage(1, 1, 0))),
            ),
            // No usage block: the gateway's figure is the record.
            (CacheStatus::Miss, reconcile(usage(0, 1, 0), None)),
            (CacheStatus::Unknown, Reconciled::own(usage(0, 0, 3))),
        ];
        let mut sums = Sums::default();
        for (c, r) in &answers {
            sums.add(&Entry::new(&t, day, *c, r));
        }
        let fields = sums.fields();
        let report = build(vec![Stored {
            tenant: "search".into(),
            day,
            fields: fields.into_iter().collect(),
        }]);
        let d = day.to_string();
        let row = |m, c, items, units, computed, upstream| Row {
            tenant: "search".into(),
            day: d.clone(),
            modality: m,
            cache: c,
            items,
            units,
            computed_units: computed,
            upstream_units: upstream,
        };
        assert_eq!(
            report.rows,
            vec![
                row("audio", "hit", 1, 2, 2, 0),
                row("audio", "miss", 1, 2, 2, 2),
                row("audio", "unknown", 3, 6, 6, 0),
                row("image", "miss", 2, 2, 1, 1),
                row("text", "hit", 2, 2, 2, 0),
                row("text", "miss", 3, 3, 3, 3),
            ]
        );
        assert_eq!(
            report.figures,
            vec![Figures {
                tenant: "search".into(),
                day: d.clone(),
                requests: 5,
                hit_units: 4,
                miss_units: 7,
                upstream_units: 6,
                computed_units: 6,
                unknown_units: 6,
                mismatches: 2,
            }]
        );
        let csv = rows_csv(&report.rows);
        assert!(csv
            .starts_with("tenant,day,modality,cache,items,units,computed_units,upstream_units\n"));
        assert!(
            csv.contains(&format!("search,{d},image,miss,2,2,1,1\n")),
            "{csv}"
        );
        let fcsv = figures_csv(&report.figures);
        assert_eq!(
            fcsv,
            format!("tenant,day,requests,hit_units,miss_units,upstream_units,computed_units,unknown_units,mismatches\nsearch,{d},5,4,7,6,6,6,2\n")
        );
    }
}
