//! `embedgate usage --reconcile FILE`: the ledger against upstream's own
//! usage export (CSV), day by day.
//!
//! The export: a header line, then one line per record. Columns are found
//! by name (case-insensitive, in any order; other columns are ignored):
//!
//! - `day` (or `date`): the UTC day, `YYYY-MM-DD`; required;
//! - `units` (or `usage`): billing units, a whole number; required;
//! - `workspace`, or `tenant`: optional, not both. With `workspace` each
//!   day is compared per DashScope workspace (a tenant counts under its
//!   `workspace`, tenants without one under the empty workspace); with
//!   `tenant`, per tenant name; with neither, per day over all tenants.
//!
//! Fields may be quoted (`"…"`, `""` for a quote). Lines with the same day
//! (and workspace or tenant) are added up.
//!
//! The output is CSV, one line per compared key, sorted: `day`, then
//! `workspace` or `tenant` when the export has it, `ledger_units` (the
//! ledger's miss units: what the gateway recorded DashScope billing),
//! `unknown_units` (upstream calls of unknown outcome, maybe billed),
//! `upstream_units`, `computed_units`, `export_units`, `difference`
//! (export − ledger) and `status`: `ok` (no difference), `unknown` (the
//! export is higher by at most the unknown units) or `mismatch`.

use std::collections::{BTreeMap, BTreeSet};

use super::report::Figures;
use crate::date::Day;

/// How the export groups its units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    Day,
    Workspace,
    Tenant,
}

impl By {
    fn column(self) -> Option<&'static str> {
        match self {
            By::Day => None,
            By::Workspace => Some("workspace"),
            By::Tenant => Some("tenant"),
        }
    }
}

/// An upstream usage export, summed per (day, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Export {
    pub(crate) by: By,
    /// (day, workspace or tenant, "" when by day) → units.
    pub(crate) units: BTreeMap<(Day, String), u64>,
}

impl Export {
    /// The first and last day in the export.
    pub(crate) fn days(&self) -> Option<(Day, Day)> {
        let first = self.units.keys().next()?.0;
        let last = self.units.keys().map(|k| k.0).max()?;
        Some((first, last))
    }
}

/// Splits one CSV line into fields (quotes as in RFC 4180, one line).
fn fields(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') if cur.trim().is_empty() && !was_quoted => {
                cur.clear();
                quoted = true;
                was_quoted = true;
            }
            (false, ',') => {
                out.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            (false, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    out.push(cur);
    Ok(out.into_iter().map(|f| f.trim().to_string()).collect())
}

fn whole_number(s: &str) -> Option<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    // "12.0", as spreadsheets write whole numbers.
    let (int, frac) = s.split_once('.')?;
    if !frac.is_empty() && frac.bytes().all(|b| b == b'0') {
        int.parse().ok()
    } else {
        None
    }
}

/// Parses an export; errors name the line.
pub(crate) fn parse(text: &str) -> Result<Export, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err("the export is empty; it needs a header line (day,units or day,workspace,units or day,tenant,units)".into());
    };
    let names: Vec<String> = fields(header)
        .map_err(|e| format!("line 1: {e}"))?
        .into_iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let find = |want: &[&str]| names.iter().position(|n| want.contains(&n.as_str()));
    let day_col = find(&["day", "date"]).ok_or("the header has no `day` column")?;
    let units_col = find(&["units", "usage"]).ok_or("the header has no `units` column")?;
    let (by, key_col) = match (find(&["workspace"]), find(&["tenant"])) {
        (Some(_), Some(_)) => {
            return Err("the header has both `workspace` and `tenant`; keep one".into())
        }
        (Some(i), None) => (By::Workspace, Some(i)),
        (None, Some(i)) => (By::Tenant, Some(i)),
        (None, None) => (By::Day, None),
    };
    let mut units: BTreeMap<(Day, String), u64> = BTreeMap::new();
    for (i, line) in lines {
        let n = i + 1;
        let f = fields(line).map_err(|e| format!("line {n}: {e}"))?;
        let get = |col: usize| f.get(col).map(String::as_str).unwrap_or("");
        let day = Day::parse(get(day_col))
            .ok_or_else(|| format!("line {n}: day `{}` is not YYYY-MM-DD", get(day_col)))?;
        let u = whole_number(get(units_col))
            .ok_or_else(|| format!("line {n}: units `{}` is not a whole number", get(units_col)))?;
        let key = key_col.map(|c| get(c).to_string()).unwrap_or_default();
        let e = units.entry((day, key)).or_default();
        *e = e.saturating_add(u);
    }
    Ok(Export { by, units })
}

/// One compared key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Difference {
    pub(crate) day: Day,
    pub(crate) key: String,
    pub(crate) ledger: Figures,
    pub(crate) export: u64,
}

impl Difference {
    pub(crate) fn difference(&self) -> i128 {
        i128::from(self.export) - i128::from(self.ledger.miss_units)
    }

    pub(crate) fn status(&self) -> &'static str {
        match self.difference() {
            0 => "ok",
            d if d > 0 && d <= i128::from(self.ledger.unknown_units) => "unknown",
            _ => "mismatch",
        }
    }
}

/// Compares the ledger's figures (of `from..=to`) with the export, keyed
/// as the export is; `workspace_of` maps a tenant to its workspace. Keys
/// on either side are compared; export lines outside the range are left
/// out.
pub(crate) fn compare(
    export: &Export,
    figures: &[Figures],
    from: Day,
    to: Day,
    workspace_of: &dyn Fn(&str) -> String,
) -> Vec<Difference> {
    let mut ledger: BTreeMap<(Day, String), Figures> = BTreeMap::new();
    for f in figures {
        let Some(day) = Day::parse(&f.day) else {
            continue;
        };
        let key = match export.by {
            By::Day => String::new(),
            By::Workspace => workspace_of(&f.tenant),
            By::Tenant => f.tenant.clone(),
        };
        let e = ledger.entry((day, key)).or_default();
        e.requests += f.requests;
        e.hit_units += f.hit_units;
        e.miss_units += f.miss_units;
        e.upstream_units += f.upstream_units;
        e.computed_units += f.computed_units;
        e.unknown_units += f.unknown_units;
        e.mismatches += f.mismatches;
    }
    let keys: BTreeSet<&(Day, String)> = ledger
        .keys()
        .chain(export.units.keys())
        .filter(|(d, _)| *d >= from && *d <= to)
        .collect();
    keys.into_iter()
        .map(|k| Difference {
            day: k.0,
            key: k.1.clone(),
            ledger: ledger.get(k).cloned().unwrap_or_default(),
            export: export.units.get(k).copied().unwrap_or(0),
        })
        .collect()
}

/// The comparison as CSV (see the module's doc).
pub(crate) fn to_csv(by: By, diffs: &[Difference]) -> String {
    let mut s = String::from("day,");
    if let Some(c) = by.column() {
        s.push_str(c);
        s.push(',');
    }
    s.push_str(
        "ledger_units,unknown_units,upstream_units,computed_units,export_units,difference,status\n",
    );
    for d in diffs {
        s.push_str(&d.day.to_string());
        s.push(',');
        if by.column().is_some() {
            s.push_str(&quote(&d.key));
            s.push(',');
        }
        s.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            d.ledger.miss_units,
            d.ledger.unknown_units,
            d.ledger.upstream_units,
            d.ledger.computed_units,
            d.export,
            d.difference(),
            d.status()
        ));
    }
    s
}

fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(tenant: &str, day: &str, miss: u64, unknown: u64) -> Figures {
        Figures {
            tenant: tenant.into(),
            day: day.into(),
            miss_units: miss,
            upstream_units: miss,
            computed_units: miss,
            unknown_units: unknown,
            ..Figures::default()
        }
    }

    #[test]
    fn exports_are_read_by_column_name() {
        let e = parse(
            "\u{feff}Date,Product,Units\n2026-11-01,x,10\n\n2026-11-01,y,\"5\"\n2026-11-02,x,7.0\n",
        )
        .unwrap();
        assert_eq!(e.by, By::Day);
        let d1 = Day::parse("2026-11-01").unwrap();
        assert_eq!(e.units[&(d1, String::new())], 15);
        assert_eq!(e.days().unwrap().1.to_string(), "2026-11-02");
        let w = parse("workspace,day,units\n\"ws,1\",2026-11-01,3\n").unwrap();
        assert_eq!(w.by, By::Workspace);
        assert_eq!(w.units[&(d1, "ws,1".to_string())], 3);
        for (bad, want) in [
            ("", "empty"),
            ("units\n1\n", "no `day`"),
            ("day\n2026-11-01\n", "no `units`"),
            ("day,tenant,workspace,units\n", "both"),
            ("day,units\n2026-13-01,1\n", "line 2: day"),
            ("day,units\n2026-11-01,-1\n", "line 2: units"),
            ("day,units\n2026-11-01,1.5\n", "not a whole number"),
            ("day,units\n\"2026-11-01,1\n", "line 2: a quoted field"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn differences_per_day_and_workspace() {
        let export = parse(
            "day,workspace,units\n2026-11-01,ws-a,10\n2026-11-01,,4\n2026-11-02,ws-a,9\n2026-11-03,ws-a,1\n",
        )
        .unwrap();
        let figs = vec![
            figures("search", "2026-11-01", 6, 0),
            figures("ads", "2026-11-01", 4, 0),
            figures("other", "2026-11-01", 4, 0),
            figures("search", "2026-11-02", 7, 2),
            figures("search", "2026-11-04", 1, 0),
        ];
        let ws = |t: &str| match t {
            "search" | "ads" => "ws-a".to_string(),
            _ => String::new(),
        };
        let (from, to) = (
            Day::parse("2026-11-01").unwrap(),
            Day::parse("2026-11-02").unwrap(),
        );
        let diffs = compare(&export, &figs, from, to, &ws);
        assert_eq!(
            to_csv(export.by, &diffs),
            "day,workspace,ledger_units,unknown_units,upstream_units,computed_units,export_units,difference,status\n\
             2026-11-01,,4,0,4,4,4,0,ok\n\
             2026-11-01,ws-a,10,0,10,10,10,0,ok\n\
             2026-11-02,ws-a,7,2,7,7,9,2,unknown\n"
        );
        let by_day = parse("day,units\n2026-11-01,13\n2026-11-02,6\n").unwrap();
        let diffs = compare(&by_day, &figs, from, to, &ws);
        let csv = to_csv(by_day.by, &diffs);
        assert!(
            csv.contains("2026-11-01,14,0,14,14,13,-1,mismatch\n"),
            "{csv}"
        );
        assert!(csv.contains("2026-11-02,7,2,7,7,6,-1,mismatch\n"), "{csv}");
    }
}
