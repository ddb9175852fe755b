//! `GET /api/v1/uploads?action=getPolicy&model=…`: the SDK's upload
//! certificate for `file://` inputs, fetched with the company key (the
//! `oss://` URL it yields then resolves for the same account). Not cached,
//! not metered.
//!
//! The certificate API is rate-limited per account and model, and every
//! team's uploads share that account, so this route forwards only what the
//! SDK asks for: `action=getPolicy` and a `model` the gateway serves, each
//! once, nothing else. The query sent upstream is rebuilt from those parsed
//! values, never the client's string. Anything else is 400
//! `InvalidParameter` naming the parameter, and nothing is forwarded.
//! Behind the same auth and in-flight layers as the embedding route, and a
//! rate of its own (`tenants[].uploads_rate`), so upload policies never
//! spend a tenant's embedding rate, nor embeddings its uploads rate.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::body::{full, Body, ReqBody};
use crate::error::GatewayError;
use crate::forwarded::ForwardedHeaders;
use crate::response;
use crate::tenants::Tenant;
use crate::upstream::{upstream_error, UPLOADS_PATH};

/// The one action the SDK uses.
const GET_POLICY: &str = "getPolicy";
/// A client's parameter name or value is quoted in an error up to this
/// many characters.
const MAX_QUOTED_CHARS: usize = 64;

/// The upload-policy route's service.
pub(crate) async fn serve(
    app: Arc<App>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, Infallible> {
    response::from_head(req, |head| async move { policy(&app, &head).await }).await
}

async fn policy(app: &App, req: &http::request::Parts) -> Result<Response<Body>, GatewayError> {
    let tenant = req
        .extensions
        .get::<Arc<Tenant>>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("no tenant on an authenticated route".into()))?;
    let model = policy_model(req.uri.query(), &app.upload_models)?;
    let forwarded = ForwardedHeaders::from_client(&req.headers)?;
    let resp = app
        .upstream
        .send(
            Method::GET,
            &policy_path(model),
            &forwarded,
            tenant.workspace.as_deref(),
            Bytes::new(),
        )
        .await
        // Policy calls are not billed: unknown outcomes do not matter here.
        .result?;
    if resp.status != StatusCode::OK {
        return Err(upstream_error(&resp));
    }
    let ct = resp
        .headers
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let mut r = Response::new(full(resp.body));
    r.headers_mut().insert(CONTENT_TYPE, ct);
    Ok(r)
}

/// The served model a policy may be fetched for: the query must be
/// `action=getPolicy` and `model=<one of models>`, each exactly once (in any
/// order, percent-encoded or not), and nothing else.
fn policy_model<'m>(query: Option<&str>, models: &'m [String]) -> Result<&'m str, GatewayError> {
    let mut action: Option<Cow<'_, str>> = None;
    let mut model: Option<Cow<'_, str>> = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match &*name {
            "action" => &mut action,
            "model" => &mut model,
            other => {
                return Err(invalid(format!(
                    "query parameter `{}` is not accepted: an upload policy takes only `action` and `model`",
                    quoted(other)
                )))
            }
        };
        if slot.replace(value).is_some() {
            return Err(invalid(format!(
                "query parameter `{name}` must be given at most once"
            )));
        }
    }
    match action.as_deref() {
        Some(GET_POLICY) => {}
        Some(other) => {
            return Err(invalid(format!(
                "query parameter `action` must be `{GET_POLICY}`, got `{}`",
                quoted(other)
            )))
        }
        None => {
            return Err(invalid(format!(
                "query parameter `action` is required (`{GET_POLICY}`)"
            )))
        }
    }
    let Some(model) = model else {
        return Err(invalid("query parameter `model` is required".into()));
    };
    models
        .iter()
        .find(|m| **m == *model)
        .map(String::as_str)
        .ok_or_else(|| {
            invalid(format!(
                "query parameter `model`: `{}` is not a model this gateway serves",
                quoted(&model)
            ))
        })
}

/// The path and query sent upstream, built from the checked values.
fn policy_path(model: &str) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("action", GET_POLICY)
        .append_pair("model", model)
        .finish();
    format!("{UPLOADS_PATH}?{query}")
}

fn invalid(message: String) -> GatewayError {
    GatewayError::InvalidParameter(message)
}

/// A client's string for an error message: at most [`MAX_QUOTED_CHARS`]
/// characters, and no backticks, so the quote cannot be confused.
fn quoted(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_QUOTED_CHARS)
        .map(|c| if c == '`' || c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(MAX_QUOTED_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "multimodal-embedding-one-peace-v1";

    fn models() -> Vec<String> {
        vec![M.to_string(), "other model/v2".to_string()]
    }

    fn refusal(query: Option<&str>) -> String {
        match policy_model(query, &models()) {
            Ok(m) => panic!("{query:?} was accepted for {m}"),
            Err(e) => {
                assert_eq!(e.code(), "InvalidParameter");
                assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                e.message()
            }
        }
    }

    #[test]
    fn only_get_policy_for_a_served_model_is_accepted() {
        let served = models();
        let ok = |q: &str| policy_model(Some(q), &served).unwrap().to_string();
        assert_eq!(ok(&format!("action=getPolicy&model={M}")), M);
        assert_eq!(ok(&format!("model={M}&action=getPolicy")), M);
        assert_eq!(ok(&format!("action=get%50olicy&model={M}&")), M);
        assert_eq!(
            ok("action=getPolicy&model=other+model%2Fv2"),
            "other model/v2"
        );
    }

    #[test]
    fn every_other_query_is_refused_naming_the_parameter() {
        for (query, named) in [
            (None, "`action` is required"),
            (Some(""), "`action` is required"),
            (Some(&*format!("model={M}")), "`action` is required"),
            (Some("action=getPolicy"), "`model` is required"),
            (
                Some(&*format!("action=getUploadUrl&model={M}")),
                "`action` must be `getPolicy`, got `getUploadUrl`",
            ),
            (
                Some(&*format!("action=GETPOLICY&model={M}")),
                "`action` must be `getPolicy`",
            ),
            (
                Some("action=getPolicy&model=qwen-max"),
                "`model`: `qwen-max` is not a model this gateway serves",
            ),
            (Some("action=getPolicy&model="), "`model`: `` is not"),
            (
                Some(&*format!("action=getPolicy&model={M}%20")),
                "is not a model this gateway serves",
            ),
            (
                Some(&*format!("action=getPolicy&model={M}&model={M}")),
                "`model` must be given at most once",
            ),
            (
                Some(&*format!("action=getPolicy&action=getPolicy&model={M}")),
                "`action` must be given at most once",
            ),
            (
                Some(&*format!("action=getPolicy&model={M}&workspace=ws-1")),
                "`workspace` is not accepted",
            ),
            (
                Some(&*format!("action=getPolicy&model={M}&model%00=x")),
                "`model?` is not accepted",
            ),
        ] {
            let m = refusal(query);
            assert!(m.contains(named), "{query:?}: {m}");
        }
    }

    #[test]
    fn quoted_values_are_bounded() {
        let long = "x".repeat(10_000);
        let m = refusal(Some(&format!("action=getPolicy&model={long}")));
        assert!(m.len() < 200, "{m}");
    }

    #[test]
    fn the_forwarded_query_is_rebuilt() {
        assert_eq!(
            policy_path(M),
            format!("/api/v1/uploads?action=getPolicy&model={M}")
        );
        assert_eq!(
            policy_path("other model/v2"),
            "/api/v1/uploads?action=getPolicy&model=other+model%2Fv2"
        );
    }
}
