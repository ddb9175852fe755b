//! Usage reports: the ledger's fields turned into rows (per tenant, day,
//! model, modality and cache status), reconciliation figures (per tenant,
//! day and model) and totals (per tenant and model, with their cost), as
//! JSON or CSV.
//!
//! Field vocabulary, per (tenant, UTC day), in Redis hashes (SQLite keeps
//! the model in a column of its own and the field without it; see
//! [`split_model`]); `<model>` a model name (`[A-Za-z0-9._-]`), `<m>` a
//! modality, `<c>` a cache status `hit`, `miss` or `unknown` (never
//! `partial`):
//!
//! | field | sum of |
//! |---|---|
//! | `<model>\|<m>\|<c>\|items` | items (DashScope's `measure`) of the record |
//! | `<model>\|<m>\|<c>\|units` | units of the record: upstream's usage on a miss when it gave one, else the gateway's |
//! | `<model>\|<m>\|<c>\|computed` | the gateway's own units (not stored for hits, where they are the record) |
//! | `<model>\|<m>\|<c>\|upstream` | units of upstream's usage blocks |
//! | `requests\|<model>\|<c>` | answers |
//! | `mismatches\|<model>\|<c>` | answers whose upstream usage disagreed with the gateway's, or was missing |
//!
//! Fields written before the ledger had a model (`<m>|<c>|<what>`,
//! `requests|<c>`, `mismatches|<c>`) are read as [`LEGACY_MODEL`]'s.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::journal::Entry;
use super::store::{Fields, Stored};
use crate::date::Day;
use crate::metering::{CacheStatus, LEGACY_MODEL};
use crate::request::Modality;

/// Model name → price per unit ([`crate::Config::unit_prices`]).
pub(crate) type Prices = BTreeMap<String, f64>;

/// One report row, as `/admin/usage` answers it. The first six columns are
/// the original report; new ones go at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The model called.
    pub(crate) model: String,
    /// `units` × the model's price per unit; `None` (JSON `null`, CSV empty)
    /// when the model has no price.
    pub(crate) cost: Option<f64>,
}

/// Reconciliation figures of one tenant, day and model.
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
    /// The model called.
    pub(crate) model: String,
}

/// One tenant's use of one model over the report's days, with its cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Total {
    pub(crate) tenant: String,
    pub(crate) model: String,
    /// Successful answers (and unknown outcomes).
    pub(crate) requests: u64,
    pub(crate) items: u64,
    /// Units of every answer: hits, misses and unknown outcomes.
    pub(crate) units: u64,
    pub(crate) hit_units: u64,
    pub(crate) miss_units: u64,
    pub(crate) unknown_units: u64,
    /// `units` × price: what the tenant's answers are worth.
    pub(crate) cost: Option<f64>,
    /// `miss_units` × price: what upstream bills for them.
    pub(crate) miss_cost: Option<f64>,
}

/// A whole report.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) figures: Vec<Figures>,
    pub(crate) totals: Vec<Total>,
}

/// The field of a (model, modality, cache) cell.
pub(crate) fn field(model: &str, modality: Modality, cache: CacheStatus, what: &str) -> String {
    format!("{model}|{}|{}|{what}", modality.as_str(), cache.as_str())
}

/// The field of a per-answer count (`requests`, `mismatches`).
fn count_field(kind: &str, model: &str, cache: CacheStatus) -> String {
    format!("{kind}|{model}|{}", cache.as_str())
}

/// What a field is.
#[derive(Debug, PartialEq, Eq)]
enum Parsed<'a> {
    Cell {
        model: &'a str,
        modality: Modality,
        cache: CacheStatus,
        what: &'a str,
    },
    Count {
        kind: &'a str,
        model: &'a str,
        cache: CacheStatus,
    },
}

fn is_count(kind: &str) -> bool {
    matches!(kind, "requests" | "mismatches")
}

/// Reads a field, of this version or of the one before models; `None` for
/// fields this version does not know.
fn parse_field(f: &str) -> Option<Parsed<'_>> {
    let parts: Vec<&str> = f.split('|').collect();
    let cell = |model, m, c, what| {
        Some(Parsed::Cell {
            model,
            modality: Modality::from_name(m)?,
            cache: CacheStatus::row_from_name(c)?,
            what,
        })
    };
    let count = |kind, model, c| {
        Some(Parsed::Count {
            kind,
            model,
            cache: CacheStatus::row_from_name(c)?,
        })
    };
    match parts[..] {
        [model, m, c, what] => cell(model, m, c, what),
        [kind, model, c] if is_count(kind) => count(kind, model, c),
        [m, c, what] => cell(LEGACY_MODEL, m, c, what),
        [kind, c] if is_count(kind) => count(kind, LEGACY_MODEL, c),
        _ => None,
    }
}

/// A field as SQLite stores it: its model, and the field without the model
/// (`<m>|<c>|<what>`, `requests|<c>`, as before models). Fields without a
/// model are [`LEGACY_MODEL`]'s. [`join_model`] is the inverse.
pub(crate) fn split_model(f: &str) -> (String, String) {
    let parts: Vec<&str> = f.split('|').collect();
    match parts[..] {
        [model, m, c, what] => (model.to_string(), format!("{m}|{c}|{what}")),
        [kind, model, c] if is_count(kind) => (model.to_string(), format!("{kind}|{c}")),
        _ => (LEGACY_MODEL.to_string(), f.to_string()),
    }
}

/// The field named with its model, from SQLite's columns.
pub(crate) fn join_model(model: &str, rest: &str) -> String {
    let parts: Vec<&str> = rest.split('|').collect();
    match parts[..] {
        [kind, c] if is_count(kind) => format!("{kind}|{model}|{c}"),
        [m, c, what] => format!("{model}|{m}|{c}|{what}"),
        _ => rest.to_string(),
    }
}

fn cache_index(c: CacheStatus) -> Option<usize> {
    match c {
        CacheStatus::Hit => Some(0),
        CacheStatus::Miss => Some(1),
        CacheStatus::Unknown => Some(2),
        CacheStatus::Partial => None,
    }
}

const CACHES: [CacheStatus; 3] = [CacheStatus::Hit, CacheStatus::Miss, CacheStatus::Unknown];
const MODALITIES: usize = Modality::ALL.len();

/// One model's answers of a group, summed in fixed slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ModelSums {
    /// [cache][modality]: items, units, computed units, upstream units.
    cells: [[[u64; 4]; MODALITIES]; 3],
    requests: [u64; 3],
    mismatches: [u64; 3],
}

/// Answers of one group summed per model in fixed slots (no allocation
/// per answer, one per model); they become fields once per batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sums {
    models: BTreeMap<Arc<str>, ModelSums>,
}

impl Sums {
    /// Adds one answer.
    pub(crate) fn add(&mut self, e: &Entry) {
        let Some(c) = cache_index(e.cache) else {
            return;
        };
        let s = match self.models.get_mut(&*e.model) {
            Some(s) => s,
            None => self.models.entry(e.model.clone()).or_default(),
        };
        for (i, m) in Modality::ALL.into_iter().enumerate() {
            let cell = &mut s.cells[c][i];
            let units = e.units.get(m);
            cell[0] += e.items.get(m);
            cell[1] += units;
            cell[2] += e.computed.get(m);
            if e.upstream {
                cell[3] += units;
            }
        }
        s.requests[c] += 1;
        s.mismatches[c] += u64::from(e.mismatch);
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
        for (model, s) in &self.models {
            for (ci, c) in CACHES.into_iter().enumerate() {
                for (mi, m) in Modality::ALL.into_iter().enumerate() {
                    let [items, units, computed, upstream] = s.cells[ci][mi];
                    put(field(model, m, c, "items"), items);
                    put(field(model, m, c, "units"), units);
                    if c != CacheStatus::Hit {
                        put(field(model, m, c, "computed"), computed);
                    }
                    put(field(model, m, c, "upstream"), upstream);
                }
                put(count_field("requests", model, c), s.requests[ci]);
                put(count_field("mismatches", model, c), s.mismatches[ci]);
            }
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

fn cost(units: u64, price: Option<f64>) -> Option<f64> {
    price.map(|p| units as f64 * p)
}

/// The figures of `model` in one (tenant, day)'s map, made on first use.
fn figures_of<'a>(
    figures: &'a mut BTreeMap<String, (Figures, bool)>,
    s: &Stored,
    model: &str,
) -> &'a mut (Figures, bool) {
    figures.entry(model.to_string()).or_insert_with(|| {
        (
            Figures {
                tenant: s.tenant.clone(),
                day: s.day.to_string(),
                model: model.to_string(),
                ..Figures::default()
            },
            false,
        )
    })
}

/// The report of what the ledger stores (of one model, or all), sorted by
/// tenant, day, model, modality and cache status; costs from `prices`.
pub(crate) fn build(stored: Vec<Stored>, prices: &Prices, model: Option<&str>) -> Report {
    let mut report = Report::default();
    let mut totals: BTreeMap<(String, String), Total> = BTreeMap::new();
    for s in stored {
        let mut cells: BTreeMap<(String, Modality, CacheStatus), Cell> = BTreeMap::new();
        // Per model: its figures, and whether anything is in them.
        let mut figures: BTreeMap<String, (Figures, bool)> = BTreeMap::new();
        for (k, v) in &s.fields {
            let v = u64::try_from(*v).unwrap_or(0);
            match parse_field(k) {
                Some(Parsed::Cell {
                    model: m,
                    modality,
                    cache,
                    what,
                }) if model.is_none_or(|want| want == m) => {
                    let cell = cells.entry((m.to_string(), modality, cache)).or_default();
                    match what {
                        "items" => cell.items += v,
                        "units" => cell.units += v,
                        "computed" => cell.computed += v,
                        "upstream" => cell.upstream += v,
                        _ => {}
                    }
                }
                Some(Parsed::Count { kind, model: m, .. })
                    if model.is_none_or(|want| want == m) =>
                {
                    let (f, any) = figures_of(&mut figures, &s, m);
                    if kind == "requests" {
                        f.requests += v;
                    } else {
                        f.mismatches += v;
                    }
                    *any |= v > 0;
                }
                _ => {}
            }
        }
        for ((m, modality, c), cell) in cells {
            let computed = if c == CacheStatus::Hit {
                cell.units
            } else {
                cell.computed
            };
            let (f, any) = figures_of(&mut figures, &s, &m);
            match c {
                CacheStatus::Hit => f.hit_units += cell.units,
                CacheStatus::Miss => {
                    f.miss_units += cell.units;
                    f.computed_units += computed;
                }
                CacheStatus::Unknown => f.unknown_units += cell.units,
                CacheStatus::Partial => {}
            }
            f.upstream_units += cell.upstream;
            *any = true;
            report.rows.push(Row {
                tenant: s.tenant.clone(),
                day: s.day.to_string(),
                modality: modality.as_str(),
                cache: c.as_str(),
                items: cell.items,
                units: cell.units,
                computed_units: computed,
                upstream_units: cell.upstream,
                cost: cost(cell.units, prices.get(&m).copied()),
                model: m,
            });
        }
        for (f, _) in figures.into_values().filter(|(_, any)| *any) {
            let t = totals
                .entry((f.tenant.clone(), f.model.clone()))
                .or_insert_with(|| Total {
                    tenant: f.tenant.clone(),
                    model: f.model.clone(),
                    ..Total::default()
                });
            t.requests += f.requests;
            t.hit_units += f.hit_units;
            t.miss_units += f.miss_units;
            t.unknown_units += f.unknown_units;
            report.figures.push(f);
        }
    }
    for r in &report.rows {
        if let Some(t) = totals.get_mut(&(r.tenant.clone(), r.model.clone())) {
            t.items += r.items;
            t.units += r.units;
        }
    }
    for t in totals.values_mut() {
        let price = prices.get(&t.model).copied();
        t.cost = cost(t.units, price);
        t.miss_cost = cost(t.miss_units, price);
    }
    report.totals = totals.into_values().collect();
    report.rows.sort_by(|a, b| {
        (&a.tenant, &a.day, &a.model, a.modality, a.cache)
            .cmp(&(&b.tenant, &b.day, &b.model, b.modality, b.cache))
    });
    report
        .figures
        .sort_by(|a, b| (&a.tenant, &a.day, &a.model).cmp(&(&b.tenant, &b.day, &b.model)));
    report
}

fn cost_csv(c: Option<f64>) -> String {
    c.map(|c| c.to_string()).unwrap_or_default()
}

/// The rows as CSV with a header line; tenant and model names and days
/// never need quoting.
pub(crate) fn rows_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "tenant,day,modality,cache,items,units,computed_units,upstream_units,model,cost\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            r.tenant,
            r.day,
            r.modality,
            r.cache,
            r.items,
            r.units,
            r.computed_units,
            r.upstream_units,
            r.model,
            cost_csv(r.cost)
        ));
    }
    s
}

/// The reconciliation figures as CSV with a header line.
pub(crate) fn figures_csv(figures: &[Figures]) -> String {
    let mut s = String::from(
        "tenant,day,requests,hit_units,miss_units,upstream_units,computed_units,unknown_units,mismatches,model\n",
    );
    for f in figures {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            f.tenant,
            f.day,
            f.requests,
            f.hit_units,
            f.miss_units,
            f.upstream_units,
            f.computed_units,
            f.unknown_units,
            f.mismatches,
            f.model
        ));
    }
    s
}

/// The totals per tenant and model as CSV with a header line.
pub(crate) fn totals_csv(totals: &[Total]) -> String {
    let mut s = String::from(
        "tenant,model,requests,items,units,hit_units,miss_units,unknown_units,cost,miss_cost\n",
    );
    for t in totals {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            t.tenant,
            t.model,
            t.requests,
            t.items,
            t.units,
            t.hit_units,
            t.miss_units,
            t.unknown_units,
            cost_csv(t.cost),
            cost_csv(t.miss_cost)
        ));
    }
    s
}

/// The JSON report: `from`, `to`, `rows` (as always), `reconciliation` and
/// `totals`.
pub(crate) fn json(from: Day, to: Day, report: &Report) -> String {
    serde_json::json!({
        "from": from.to_string(),
        "to": to.to_string(),
        "rows": report.rows,
        "reconciliation": report.figures,
        "totals": report.totals,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{reconcile, Reconciled, Usage};
    use crate::request::Counts;

    const W: crate::config::Weights = crate::config::Weights {
        text: 1,
        image: 1,
        audio: 2,
    };
    const M: &str = "text-embedding-v4";

    fn usage(text: u64, image: u64, audio: u64) -> Usage {
        let mut c = Counts::default();
        c.set(Modality::Text, text);
        c.set(Modality::Image, image);
        c.set(Modality::Audio, audio);
        Usage::of(c, &W)
    }

    fn stored(tenant: &str, day: Day, answers: &[(&str, CacheStatus, Reconciled)]) -> Stored {
        let t: Arc<str> = Arc::from(tenant);
        let mut sums = Sums::default();
        for (model, c, r) in answers {
            sums.add(&Entry::new(&t, model, day, *c, r));
        }
        Stored {
            tenant: tenant.into(),
            day,
            fields: sums.fields().into_iter().collect(),
        }
    }

    #[test]
    fn fields_become_rows_and_figures() {
        let day = Day::from_days(20_000);
        let answers = [
            (M, CacheStatus::Hit, Reconciled::own(usage(2, 0, 1))),
            (
                M,
                CacheStatus::Miss,
                reconcile(usage(2, 0, 1), Some(usage(2, 0, 1))),
            ),
            // Upstream billed one image more than the gateway counted.
            (
                M,
                CacheStatus::Miss,
                reconcile(usage(1, 0, 0), Some(usage(1, 1, 0))),
            ),
            // No usage block: the gateway's figure is the record.
            (M, CacheStatus::Miss, reconcile(usage(0, 1, 0), None)),
            (M, CacheStatus::Unknown, Reconciled::own(usage(0, 0, 3))),
        ];
        let s = stored("search", day, &answers);
        assert!(
            s.fields
                .iter()
                .any(|(k, _)| k == "text-embedding-v4|text|miss|units"),
            "{:?}",
            s.fields
        );
        assert!(s
            .fields
            .iter()
            .any(|(k, _)| k == "requests|text-embedding-v4|miss"));
        let report = build(vec![s], &Prices::new(), None);
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
            model: M.into(),
            cost: None,
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
                model: M.into(),
            }]
        );
        let csv = rows_csv(&report.rows);
        assert!(csv.starts_with(
            "tenant,day,modality,cache,items,units,computed_units,upstream_units,model,cost\n"
        ));
        assert!(
            csv.contains(&format!("search,{d},image,miss,2,2,1,1,{M},\n")),
            "{csv}"
        );
        let fcsv = figures_csv(&report.figures);
        assert_eq!(
            fcsv,
            format!("tenant,day,requests,hit_units,miss_units,upstream_units,computed_units,unknown_units,mismatches,model\nsearch,{d},5,4,7,6,6,6,2,{M}\n")
        );
    }

    #[test]
    fn reports_group_by_model_and_cost_what_has_a_price() {
        let (d1, d2) = (Day::from_days(20_000), Day::from_days(20_001));
        let v4 = "text-embedding-v4";
        let vl = "qwen3-vl-embedding";
        let stored = vec![
            stored(
                "search",
                d1,
                &[
                    (v4, CacheStatus::Miss, reconcile(usage(10, 0, 0), None)),
                    (v4, CacheStatus::Hit, Reconciled::own(usage(30, 0, 0))),
                    (vl, CacheStatus::Miss, reconcile(usage(0, 4, 0), None)),
                ],
            ),
            stored(
                "search",
                d2,
                &[(v4, CacheStatus::Miss, reconcile(usage(5, 0, 0), None))],
            ),
            stored(
                "ads",
                d1,
                &[(v4, CacheStatus::Unknown, Reconciled::own(usage(2, 0, 0)))],
            ),
        ];
        // Only v4 has a price.
        let prices = Prices::from([(v4.to_string(), 0.5)]);
        let r = build(stored.clone(), &prices, None);
        let cost_of = |tenant: &str, day: Day, model: &str, cache: &str| {
            r.rows
                .iter()
                .find(|x| {
                    x.tenant == tenant
                        && x.day == day.to_string()
                        && x.model == model
                        && x.cache == cache
                })
                .map(|x| (x.units, x.cost))
        };
        assert_eq!(cost_of("search", d1, v4, "miss"), Some((10, Some(5.0))));
        assert_eq!(cost_of("search", d1, v4, "hit"), Some((30, Some(15.0))));
        assert_eq!(cost_of("search", d1, vl, "miss"), Some((4, None)));
        // Rows sort by tenant, day, model.
        let order: Vec<(&str, &str, &str)> = r
            .rows
            .iter()
            .map(|x| (x.tenant.as_str(), x.model.as_str(), x.cache))
            .collect();
        assert_eq!(
            order,
            vec![
                ("ads", v4, "unknown"),
                ("search", vl, "miss"),
                ("search", v4, "hit"),
                ("search", v4, "miss"),
                ("search", v4, "miss"),
            ]
        );
        // Figures per tenant, day and model.
        assert_eq!(
            r.figures
                .iter()
                .map(|f| (
                    f.tenant.as_str(),
                    f.model.as_str(),
                    f.requests,
                    f.miss_units
                ))
                .collect::<Vec<_>>(),
            vec![
                ("ads", v4, 1, 0),
                ("search", vl, 1, 4),
                ("search", v4, 2, 10),
                ("search", v4, 1, 5),
            ]
        );
        // Totals per tenant and model over the days, with their cost.
        let total = |tenant: &str, model: &str| {
            r.totals
                .iter()
                .find(|t| t.tenant == tenant && t.model == model)
                .cloned()
                .unwrap()
        };
        assert_eq!(r.totals.len(), 3);
        let s4 = total("search", v4);
        assert_eq!(
            (s4.requests, s4.units, s4.hit_units, s4.miss_units, s4.items),
            (3, 45, 30, 15, 45)
        );
        assert_eq!((s4.cost, s4.miss_cost), (Some(22.5), Some(7.5)));
        let svl = total("search", vl);
        assert_eq!((svl.units, svl.cost, svl.miss_cost), (4, None, None));
        let a4 = total("ads", v4);
        assert_eq!(
            (a4.unknown_units, a4.cost, a4.miss_cost),
            (2, Some(1.0), Some(0.0))
        );
        let csv = totals_csv(&r.totals);
        assert!(csv.starts_with(
            "tenant,model,requests,items,units,hit_units,miss_units,unknown_units,cost,miss_cost\n"
        ));
        assert!(
            csv.contains(&format!("search,{v4},3,45,45,30,15,0,22.5,7.5\n")),
            "{csv}"
        );
        assert!(
            csv.contains(&format!("search,{vl},1,4,4,0,4,0,,\n")),
            "{csv}"
        );
        let json: serde_json::Value = serde_json::from_str(&json(d1, d2, &r)).unwrap();
        assert_eq!(json["rows"][0]["model"], v4);
        assert_eq!(json["rows"][0]["cost"], 1.0);
        assert!(json["rows"][1]["cost"].is_null());
        assert_eq!(json["totals"][0]["tenant"], "ads");
        // A model filter keeps that model's rows, figures and totals only.
        let only = build(stored, &prices, Some(vl));
        assert_eq!(only.rows.len(), 1);
        assert_eq!(only.figures.len(), 1);
        assert_eq!(only.totals.len(), 1);
        assert_eq!(only.rows[0].model, vl);
    }

    #[test]
    fn fields_from_before_models_are_one_peaces() {
        let day = Day::from_days(20_000);
        let old = Stored {
            tenant: "search".into(),
            day,
            fields: vec![
                ("text|miss|units".into(), 3),
                ("text|miss|items".into(), 3),
                ("text|miss|computed".into(), 3),
                ("requests|miss".into(), 2),
                ("mismatches|miss".into(), 1),
                // A status no row can have, and junk: ignored.
                ("text|partial|units".into(), 9),
                ("what|ever".into(), 9),
            ],
        };
        let r = build(vec![old], &Prices::new(), None);
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0].model, LEGACY_MODEL);
        assert_eq!((r.rows[0].units, r.rows[0].cache), (3, "miss"));
        assert_eq!(r.figures[0].model, LEGACY_MODEL);
        assert_eq!((r.figures[0].requests, r.figures[0].mismatches), (2, 1));
        // SQLite's split of a field and back.
        for f in [
            "text-embedding-v4|text|miss|units",
            "requests|text-embedding-v4|hit",
            "mismatches|m|unknown",
        ] {
            let (model, rest) = split_model(f);
            assert_eq!(join_model(&model, &rest), f);
        }
        assert_eq!(
            split_model("requests|miss"),
            (LEGACY_MODEL.to_string(), "requests|miss".to_string())
        );
        assert_eq!(split_model("m|text|hit|items").1, "text|hit|items");
    }
}
