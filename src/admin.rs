//! Admin routes under `/admin/`, behind the admin token (compared by
//! digest). Without `[admin]` in config they answer 404.
//!
//! `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=NAME][&model=NAME][&format=csv][&view=reconciliation|totals]`
//!
//! JSON: `{"from","to","rows":[…],"reconciliation":[…],"totals":[…]}`;
//! CSV: the rows (per tenant, day, model, modality and cache status, with
//! their cost), or with `view=reconciliation` the figures per tenant, day
//! and model, or with `view=totals` the totals and cost per tenant and
//! model. `model=` keeps one model's.

use std::sync::Arc;

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::body::{self, Body, ReqBody};
use crate::date::Day;
use crate::error::GatewayError;
use crate::ledger::export;
use crate::ledger::report::{self, Report};
use crate::response;

/// A report is one pipeline per tenant; a year of days keeps it bounded.
const MAX_REPORT_DAYS: i64 = 366;

/// Everything under `/admin/`.
pub(crate) async fn serve(
    app: Arc<App>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, Infallible> {
    response::from_head(req, |head| async move { handle(&app, &head).await }).await
}

async fn handle(app: &App, req: &http::request::Parts) -> Result<Response<Body>, GatewayError> {
    let tenants = app.tenants.load_full();
    if tenants.admin.is_none() {
        return Err(GatewayError::NotFound);
    }
    if !tenants.is_admin(&req.headers) {
        return Err(GatewayError::InvalidApiKey);
    }
    match (&req.method, req.uri.path()) {
        (&Method::GET, "/admin/usage") => {
            usage(app, req.uri.query().unwrap_or(""), &tenants.names()).await
        }
        (_, "/admin/usage") => Err(GatewayError::MethodNotAllowed),
        _ => Err(GatewayError::NotFound),
    }
}

/// What a CSV report lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    Rows,
    /// The reconciliation figures per tenant, day and model.
    Reconciliation,
    /// Totals and cost per tenant and model.
    Totals,
}

/// Query parameters of a usage report.
pub(crate) struct UsageQuery {
    pub(crate) from: Day,
    pub(crate) to: Day,
    pub(crate) tenant: Option<String>,
    /// Only this model's rows.
    pub(crate) model: Option<String>,
    pub(crate) csv: bool,
    pub(crate) view: View,
}

impl UsageQuery {
    /// The report as its answer's body and content type.
    pub(crate) fn render(&self, r: &Report) -> (String, &'static str) {
        const CSV: &str = "text/csv; charset=utf-8";
        match (self.csv, self.view) {
            (true, View::Rows) => (report::rows_csv(&r.rows), CSV),
            (true, View::Reconciliation) => (report::figures_csv(&r.figures), CSV),
            (true, View::Totals) => (report::totals_csv(&r.totals), CSV),
            (false, _) => (report::json(self.from, self.to, r), "application/json"),
        }
    }
}

impl UsageQuery {
    /// Parses and checks the report parameters; errors name the parameter.
    pub(crate) fn parse(query: &str) -> Result<UsageQuery, GatewayError> {
        let mut from = None;
        let mut to = None;
        let mut tenant = None;
        let mut model = None;
        let mut csv = false;
        let mut view = View::Rows;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "from" => from = Some(day_param("from", &v)?),
                "to" => to = Some(day_param("to", &v)?),
                "tenant" if !v.is_empty() => tenant = Some(v),
                "tenant" => {}
                "model" if !v.is_empty() => model = Some(v),
                "model" => {}
                "format" => {
                    csv = match v.as_str() {
                        "csv" => true,
                        "json" | "" => false,
                        _ => {
                            return Err(GatewayError::InvalidParameter(
                                "format must be json or csv".into(),
                            ))
                        }
                    }
                }
                "view" => {
                    view = match v.as_str() {
                        "reconciliation" => View::Reconciliation,
                        "totals" => View::Totals,
                        "rows" | "" => View::Rows,
                        _ => {
                            return Err(GatewayError::InvalidParameter(
                                "view must be rows, reconciliation or totals".into(),
                            ))
                        }
                    }
                }
                other => {
                    return Err(GatewayError::InvalidParameter(format!(
                        "unknown parameter `{}`; use from, to, tenant, model, format, view",
                        other.chars().take(32).collect::<String>()
                    )))
                }
            }
        }
        let from = from.ok_or_else(|| {
            GatewayError::InvalidParameter("from is required (YYYY-MM-DD)".into())
        })?;
        let to =
            to.ok_or_else(|| GatewayError::InvalidParameter("to is required (YYYY-MM-DD)".into()))?;
        if to < from {
            return Err(GatewayError::InvalidParameter(
                "to must not be before from".into(),
            ));
        }
        if to.days() - from.days() >= MAX_REPORT_DAYS {
            return Err(GatewayError::InvalidParameter(format!(
                "a report covers at most {MAX_REPORT_DAYS} days"
            )));
        }
        Ok(UsageQuery {
            from,
            to,
            tenant,
            model,
            csv,
            view,
        })
    }
}

fn day_param(name: &str, v: &str) -> Result<Day, GatewayError> {
    Day::parse(v)
        .ok_or_else(|| GatewayError::InvalidParameter(format!("{name} must be a date YYYY-MM-DD")))
}

async fn usage(app: &App, query: &str, known: &[String]) -> Result<Response<Body>, GatewayError> {
    let q = UsageQuery::parse(query)?;
    let r = app
        .ledger
        .report(
            q.from,
            q.to,
            q.tenant.as_deref(),
            q.model.as_deref(),
            known,
            &app.config.unit_prices(),
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "usage report failed");
            GatewayError::StoreUnavailable
        })?;
    let (body, ct) = q.render(&r);
    Ok(body::with_body(StatusCode::OK, ct, Bytes::from(body)))
}

/// The arguments of `embedgate usage`.
#[derive(Debug, Clone, Default)]
pub struct UsageArgs {
    /// First and last day (`YYYY-MM-DD`); required for a report, the
    /// export's own days by default with `reconcile`.
    pub from: Option<String>,
    pub to: Option<String>,
    pub tenant: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
    /// `rows` (default), `reconciliation` or `totals` (CSV).
    pub view: Option<String>,
    /// The text of an upstream usage export to compare the ledger with.
    pub reconcile: Option<String>,
}

/// What `embedgate usage` prints.
#[derive(Debug, Clone)]
pub struct UsageOutput {
    /// For stdout.
    pub text: String,
    /// For stderr: things the reader of the report should know.
    pub notes: Vec<String>,
    /// With `reconcile`: compared keys whose status is `mismatch`.
    pub mismatches: usize,
}

/// `embedgate usage`: the report straight from the ledger (Redis, or the
/// SQLite file without Redis), as the CLI prints it, or with `reconcile`
/// its comparison with an upstream usage export. Errors are the message to
/// print.
pub async fn usage_report(config: &crate::Config, args: &UsageArgs) -> Result<UsageOutput, String> {
    let mut notes = Vec::new();
    if let Some(n) = crate::ledger::journal_note(&config.ledger) {
        notes.push(n);
    }
    let names: Vec<String> = config.tenants.iter().map(|t| t.name.clone()).collect();
    let Some(export_text) = &args.reconcile else {
        let (Some(from), Some(to)) = (&args.from, &args.to) else {
            return Err("--from and --to are required (YYYY-MM-DD)".into());
        };
        let mut query = format!("from={from}&to={to}");
        for (k, v) in [
            ("format", &args.format),
            ("view", &args.view),
            ("tenant", &args.tenant),
            ("model", &args.model),
        ] {
            if let Some(v) = v {
                query.push_str(&format!("&{k}={v}"));
            }
        }
        let q = UsageQuery::parse(&query).map_err(|e| e.message())?;
        let r = cli_report(
            config,
            q.from,
            q.to,
            q.tenant.as_deref(),
            q.model.as_deref(),
            &names,
        )
        .await?;
        let (mut text, _) = q.render(&r);
        if !q.csv {
            text.push('\n');
        }
        return Ok(UsageOutput {
            text,
            notes,
            mismatches: 0,
        });
    };
    if args.tenant.is_some() || args.format.is_some() || args.view.is_some() || args.model.is_some()
    {
        return Err("--reconcile compares every tenant and model and prints CSV: leave out --tenant, --model, --format and --view".into());
    }
    let export = export::parse(export_text)?;
    let Some((first, last)) = export.days() else {
        return Err("the export has no lines after its header".into());
    };
    let day = |name: &str, v: &Option<String>, default: Day| match v {
        Some(v) => day_param(name, v).map_err(|e| e.message()),
        None => Ok(default),
    };
    let from = day("from", &args.from, first)?;
    let to = day("to", &args.to, last)?;
    let mut query = format!("from={from}&to={to}");
    query.push_str("&view=reconciliation");
    UsageQuery::parse(&query).map_err(|e| e.message())?;
    let outside = export
        .units
        .keys()
        .filter(|(d, _)| *d < from || *d > to)
        .count();
    if outside > 0 {
        notes.push(format!(
            "{outside} export lines are outside {from}..{to} and were not compared"
        ));
    }
    let r = cli_report(config, from, to, None, None, &names).await?;
    let workspace_of = |tenant: &str| {
        config
            .tenant(tenant)
            .and_then(|t| t.workspace.clone())
            .unwrap_or_default()
    };
    let diffs = export::compare(&export, &r.figures, from, to, &workspace_of);
    let mismatches = diffs.iter().filter(|d| d.status() == "mismatch").count();
    notes.push(format!(
        "{} compared, {} ok, {} explained by unknown outcomes, {mismatches} mismatched",
        diffs.len(),
        diffs.iter().filter(|d| d.status() == "ok").count(),
        diffs.iter().filter(|d| d.status() == "unknown").count(),
    ));
    Ok(UsageOutput {
        text: export::to_csv(export.by, &diffs),
        notes,
        mismatches,
    })
}

/// The report from the ledger's store, for the CLI.
async fn cli_report(
    config: &crate::Config,
    from: Day,
    to: Day,
    tenant: Option<&str>,
    model: Option<&str>,
    names: &[String],
) -> Result<Report, String> {
    // The ledger lives in the state's Redis (state.redis_url, which
    // defaults to cache.redis_url), else in SQLite.
    let redis = match &config.state.redis_url {
        None => None,
        Some(url) => {
            let metrics = Arc::new(crate::metrics::Metrics::new().map_err(|e| e.to_string())?);
            let redis = crate::redis_store::RedisStore::start(
                url,
                config.state.redis_cluster,
                CLI_REDIS_TIMEOUT,
                crate::redis_store::Holds::State,
                metrics,
            )?;
            if tokio::time::timeout(CLI_REDIS_WAIT, redis.wait_up())
                .await
                .is_err()
            {
                return Err("Redis is not reachable".into());
            }
            Some(redis)
        }
    };
    crate::ledger::read_report(config, redis, from, to, tenant, model, names).await
}

/// The CLI waits this long per Redis call; it has no request deadline.
const CLI_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the CLI waits for Redis to answer at all.
const CLI_REDIS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match (
                    (b[i + 1] as char).to_digit(16),
                    (b[i + 2] as char).to_digit(16),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_report_queries() {
        let q =
            UsageQuery::parse("from=2026-11-01&to=2026-11-24&tenant=search&format=csv").unwrap();
        assert_eq!(q.from.to_string(), "2026-11-01");
        assert_eq!(q.tenant.as_deref(), Some("search"));
        assert!(q.csv);
        assert_eq!((q.model, q.view), (None, View::Rows));
        let q = UsageQuery::parse(
            "from=2026-11-01&to=2026-11-01&model=text-embedding-v4&view=totals&format=csv",
        )
        .unwrap();
        assert_eq!(q.model.as_deref(), Some("text-embedding-v4"));
        assert_eq!(q.view, View::Totals);
        let (body, ct) = q.render(&Report::default());
        assert!(ct.starts_with("text/csv"));
        assert!(body.starts_with("tenant,model,requests,"), "{body}");
        for (bad, want) in [
            ("to=2026-11-01", "from is required"),
            ("from=2026-11-01", "to is required"),
            (
                "from=2026-11-02&to=2026-11-01",
                "to must not be before from",
            ),
            ("from=2026-13-01&to=2026-11-01", "from must be a date"),
            ("from=2020-01-01&to=2026-11-01", "at most 366 days"),
            (
                "from=2026-11-01&to=2026-11-01&format=xml",
                "format must be json or csv",
            ),
            (
                "from=2026-11-01&to=2026-11-01&view=models",
                "view must be rows, reconciliation or totals",
            ),
            ("from=2026-11-01&to=2026-11-01&x=1", "unknown parameter `x`"),
        ] {
            match UsageQuery::parse(bad) {
                Err(GatewayError::InvalidParameter(m)) => assert!(m.contains(want), "{bad}: {m}"),
                _ => unreachable_test(bad),
            }
        }
        assert_eq!(percent_decode("2026%2D11%2D01"), "2026-11-01");
    }

    fn unreachable_test(case: &str) {
        panic!("{case} should fail")
    }
}
