//! Admin routes under `/admin/`, behind the admin token (compared by
//! digest). Without `[admin]` in config they answer 404.
//!
//! `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=NAME][&format=csv]`

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::app::App;
use crate::date::Day;
use crate::error::GatewayError;
use crate::ledger::to_csv;
use crate::proxy::{error_response, new_request_id, Body};

/// A report is one pipeline per tenant; a year of days keeps it bounded.
const MAX_REPORT_DAYS: i64 = 366;

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let rid = new_request_id();
    let tenants = app.tenants.load_full();
    if tenants.admin.is_none() {
        return error_response(&GatewayError::NotFound, &rid, false);
    }
    if !tenants.is_admin(req.headers()) {
        return error_response(&GatewayError::InvalidApiKey, &rid, false);
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/admin/usage") => {
            match usage(app, req.uri().query().unwrap_or(""), &tenants.names()).await {
                Ok(r) => r,
                Err(e) => error_response(&e, &rid, false),
            }
        }
        (_, "/admin/usage") => error_response(&GatewayError::MethodNotAllowed, &rid, false),
        _ => error_response(&GatewayError::NotFound, &rid, false),
    }
}

/// Query parameters of a usage report.
pub struct UsageQuery {
    pub from: Day,
    pub to: Day,
    pub tenant: Option<String>,
    pub csv: bool,
}

impl UsageQuery {
    /// Parses and checks the report parameters; errors name the parameter.
    pub fn parse(query: &str) -> Result<UsageQuery, GatewayError> {
        let mut from = None;
        let mut to = None;
        let mut tenant = None;
        let mut csv = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "from" => from = Some(day_param("from", &v)?),
                "to" => to = Some(day_param("to", &v)?),
                "tenant" if !v.is_empty() => tenant = Some(v),
                "tenant" => {}
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
                other => {
                    return Err(GatewayError::InvalidParameter(format!(
                        "unknown parameter `{}`; use from, to, tenant, format",
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
            csv,
        })
    }
}

fn day_param(name: &str, v: &str) -> Result<Day, GatewayError> {
    Day::parse(v)
        .ok_or_else(|| GatewayError::InvalidParameter(format!("{name} must be a date YYYY-MM-DD")))
}

async fn usage(
    app: &Arc<App>,
    query: &str,
    known: &[String],
) -> Result<Response<Body>, GatewayError> {
    let q = UsageQuery::parse(query)?;
    let rows = app
        .ledger
        .report(q.from, q.to, q.tenant.as_deref(), known)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "usage report failed");
            GatewayError::StoreUnavailable
        })?;
    let (body, ct) = if q.csv {
        (Bytes::from(to_csv(&rows)), "text/csv; charset=utf-8")
    } else {
        let v = serde_json::json!({
            "from": q.from.to_string(),
            "to": q.to.to_string(),
            "rows": rows,
        });
        (Bytes::from(v.to_string()), "application/json")
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    Ok(r)
}

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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_report_queries() {
        let q =
            UsageQuery::parse("from=2026-11-01&to=2026-11-24&tenant=search&format=csv").unwrap();
        assert_eq!(q.from.to_string(), "2026-11-01");
        assert_eq!(q.tenant.as_deref(), Some("search"));
        assert!(q.csv);
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
            ("from=2026-11-01&to=2026-11-01&x=1", "unknown parameter `x`"),
        ] {
            match UsageQuery::parse(bad) {
                Err(GatewayError::InvalidParameter(m)) => assert!(m.contains(want), "{bad}: {m}"),
                _ => unreachable_test(bad),
            }
        }
        assert_eq!(percent_decode("2026%2D11%2D01"), "2026-11-01");
    }

    #[allow(clippy::panic)]
    fn unreachable_test(case: &str) {
        panic!("{case} should fail")
    }
}
