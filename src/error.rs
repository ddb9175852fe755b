//! The one error type, and its one mapping to DashScope's wire shape
//! `{"code","message","request_id"}`.
//!
//! Every refusal the gateway makes goes through [`GatewayError`]; each
//! variant knows its HTTP status, its DashScope code, whose fault it is and
//! whether a retry can help. Matches are exhaustive so a new variant cannot
//! ship without a status.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// Whose fault an error is; logged, and used to pick the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Client,
    Gateway,
    Upstream,
}

#[derive(Debug, Clone)]
pub(crate) enum GatewayError {
    /// Missing or unknown tenant key (or admin token).
    InvalidApiKey,
    /// The request body is malformed; the message names the field.
    InvalidParameter(String),
    /// `model` is not one this gateway serves.
    ModelNotFound(String),
    /// The tenant may not use this model (its `models` allow list).
    ModelNotAllowed(String),
    BodyTooLarge {
        limit: usize,
    },
    /// The client did not send its body in time.
    RequestTimeout,
    /// Unknown path: never forwarded.
    NotFound,
    MethodNotAllowed,
    /// The tenant's request rate is exhausted.
    RateLimited {
        retry_after: Duration,
    },
    /// The tenant has its whole share of the in-flight bound in use.
    TenantBusy {
        limit: usize,
    },
    /// The tenant's unit quota for the period is spent.
    QuotaExceeded,
    /// Too much work in flight; shed fast.
    Overloaded,
    /// The limits store is down and policy says deny.
    StoreUnavailable,
    /// Upstream answered with an error; passed through as upstream said it.
    Upstream {
        status: StatusCode,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// Upstream could not be reached, or answered something unusable.
    BadGateway(String),
    /// Upstream did not answer within the deadline.
    GatewayTimeout,
    /// A bug or an impossible state; the message is logged, never sent.
    Internal(String),
}

/// DashScope error codes that may appear as metric label values; anything
/// else upstream says is counted as `UpstreamError` so labels stay a closed set.
const KNOWN_UPSTREAM_CODES: &[&str] = &[
    "InvalidParameter",
    "InvalidParameter.DataInspection",
    "DataInspectionFailed",
    "BadRequest.EmptyInput",
    "BadRequest.EmptyParameters",
    "BadRequest.EmptyModel",
    "BadRequest.TooLarge",
    "InvalidURL",
    "Arrearage",
    "UnsupportedOperation",
    "InvalidApiKey",
    "AccessDenied",
    "AccessDenied.Unpurchased",
    "ModelNotFound",
    "Model.NotExist",
    "NotFound",
    "RequestTimeOut",
    "Throttling",
    "Throttling.RateQuota",
    "Throttling.AllocationQuota",
    "InternalError",
    "InternalError.Algo",
    "ServiceUnavailable",
    "GatewayTimeout",
];

impl GatewayError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::InvalidParameter(_) | GatewayError::ModelNotFound(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::RateLimited { .. }
            | GatewayError::TenantBusy { .. }
            | GatewayError::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Overloaded | GatewayError::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Upstream { status, .. } => *status,
            GatewayError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            GatewayError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The DashScope `code` on the wire.
    pub(crate) fn code(&self) -> &str {
        match self {
            GatewayError::Upstream { code, .. } => code,
            other => other.own_code().unwrap_or("InternalError"),
        }
    }

    /// The `code` as a metric label: always from a closed set.
    pub(crate) fn metric_code(&self) -> &'static str {
        match self {
            GatewayError::Upstream { code, .. } => KNOWN_UPSTREAM_CODES
                .iter()
                .copied()
                .find(|k| k == code)
                .unwrap_or("UpstreamError"),
            other => other.own_code().unwrap_or("InternalError"),
        }
    }

    /// The code of a refusal the gateway makes itself; `None` for
    /// upstream's errors, whose code is upstream's.
    fn own_code(&self) -> Option<&'static str> {
        Some(match self {
            GatewayError::InvalidApiKey => "InvalidApiKey",
            GatewayError::InvalidParameter(_) | GatewayError::ModelNotFound(_) => {
                "InvalidParameter"
            }
            GatewayError::ModelNotAllowed(_) => "AccessDenied",
            GatewayError::BodyTooLarge { .. } => "BadRequest.TooLarge",
            GatewayError::RequestTimeout => "RequestTimeOut",
            GatewayError::NotFound => "NotFound",
            GatewayError::MethodNotAllowed => "MethodNotAllowed",
            GatewayError::RateLimited { .. } => "Throttling.RateQuota",
            GatewayError::TenantBusy { .. } => "Throttling",
            GatewayError::QuotaExceeded => "Throttling.AllocationQuota",
            GatewayError::Overloaded | GatewayError::StoreUnavailable => "ServiceUnavailable",
            GatewayError::Upstream { .. } => return None,
            GatewayError::BadGateway(_) => "BadGateway",
            GatewayError::GatewayTimeout => "GatewayTimeout",
            GatewayError::Internal(_) => "InternalError",
        })
    }

    /// The human message on the wire. Never contains secrets; internal
    /// details stay in the log.
    pub(crate) fn message(&self) -> String {
        match self {
            GatewayError::InvalidApiKey => "Invalid API-key provided.".to_string(),
            GatewayError::InvalidParameter(m) => m.clone(),
            GatewayError::ModelNotFound(m) => {
                format!("Model not exist: model `{m}` is not served by this gateway.")
            }
            GatewayError::ModelNotAllowed(m) => {
                format!("Access denied: this key may not use model `{m}`.")
            }
            GatewayError::BodyTooLarge { limit } => {
                format!("Payload Too Large: the request body exceeds {limit} bytes.")
            }
            GatewayError::RequestTimeout => {
                "The request body was not received in time.".to_string()
            }
            GatewayError::NotFound => "The requested resource does not exist.".to_string(),
            GatewayError::MethodNotAllowed => {
                "The HTTP method is not allowed on this resource.".to_string()
            }
            GatewayError::RateLimited { .. } => {
                "Requests rate limit exceeded, please try again later.".to_string()
            }
            GatewayError::QuotaExceeded => {
                "Allocated quota exceeded, please increase your quota limit.".to_string()
            }
            GatewayError::TenantBusy { limit } => format!(
                "Too many requests in flight for this key (at most {limit} at once), please try again later."
            ),
            GatewayError::Overloaded => {
                "The gateway is overloaded, please try again later.".to_string()
            }
            GatewayError::StoreUnavailable => {
                "The quota store is unavailable, please try again later.".to_string()
            }
            GatewayError::Upstream { message, .. } => message.clone(),
            GatewayError::BadGateway(_) => {
                "The upstream service could not be reached or gave an invalid answer.".to_string()
            }
            GatewayError::GatewayTimeout => {
                "The upstream service did not answer in time.".to_string()
            }
            GatewayError::Internal(_) => {
                "An internal error has occured, please try again later or contact service support."
                    .to_string()
            }
        }
    }

    pub(crate) fn fault(&self) -> Fault {
        match self {
            GatewayError::InvalidApiKey
            | GatewayError::InvalidParameter(_)
            | GatewayError::ModelNotFound(_)
            | GatewayError::ModelNotAllowed(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::RequestTimeout
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::RateLimited { .. }
            | GatewayError::TenantBusy { .. }
            | GatewayError::QuotaExceeded => Fault::Client,
            GatewayError::Overloaded
            | GatewayError::StoreUnavailable
            | GatewayError::Internal(_) => Fault::Gateway,
            GatewayError::Upstream { .. }
            | GatewayError::BadGateway(_)
            | GatewayError::GatewayTimeout => Fault::Upstream,
        }
    }

    /// `Some(false)` for refusals a retry cannot fix, which the 2.x SDK
    /// honours through `x-should-retry`; `None` lets the client decide.
    pub(crate) fn should_retry(&self) -> Option<bool> {
        match self {
            GatewayError::InvalidApiKey
            | GatewayError::InvalidParameter(_)
            | GatewayError::ModelNotFound(_)
            | GatewayError::ModelNotAllowed(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::QuotaExceeded => Some(false),
            GatewayError::RateLimited { .. }
            | GatewayError::TenantBusy { .. }
            | GatewayError::RequestTimeout
            | GatewayError::Overloaded
            | GatewayError::StoreUnavailable => Some(true),
            GatewayError::Upstream { .. }
            | GatewayError::BadGateway(_)
            | GatewayError::GatewayTimeout
            | GatewayError::Internal(_) => None,
        }
    }

    /// Seconds for `Retry-After`, where waiting helps.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
                    .map(|s| s.max(1))
            }
            GatewayError::TenantBusy { .. }
            | GatewayError::Overloaded
            | GatewayError::StoreUnavailable => Some(1),
            GatewayError::InvalidApiKey
            | GatewayError::InvalidParameter(_)
            | GatewayError::ModelNotFound(_)
            | GatewayError::ModelNotAllowed(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::RequestTimeout
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::QuotaExceeded
            | GatewayError::Upstream { .. }
            | GatewayError::BadGateway(_)
            | GatewayError::GatewayTimeout
            | GatewayError::Internal(_) => None,
        }
    }

    /// The JSON body; `request_id` is upstream's for passed-through errors.
    pub(crate) fn body(&self, request_id: &str) -> Bytes {
        // Upstream's errors keep upstream's id; every other error is the
        // gateway's own answer to this request.
        let rid = if let GatewayError::Upstream {
            request_id: Some(r),
            ..
        } = self
        {
            r.as_str()
        } else {
            request_id
        };
        let v = serde_json::json!({
            "code": self.code(),
            "message": self.message(),
            "request_id": rid,
        });
        Bytes::from(v.to_string())
    }

    /// Headers that go with this error beyond content type.
    pub(crate) fn extra_headers(&self) -> Vec<(&'static str, HeaderValue)> {
        let mut h = Vec::new();
        if let Some(s) = self.retry_after() {
            h.push(("retry-after", HeaderValue::from(s)));
        }
        match self.should_retry() {
            Some(true) => h.push(("x-should-retry", HeaderValue::from_static("true"))),
            Some(false) => h.push(("x-should-retry", HeaderValue::from_static("false"))),
            None => {}
        }
        h
    }
}

/// The closed-set metric code of an error response, carried in the
/// response's extensions for the access log and request metrics. A
/// response without it that is not a success came from a generic layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorCode(pub(crate) &'static str);

impl GatewayError {
    /// The one wire mapping: DashScope's `{code, message, request_id}` (or
    /// one SSE `error` event), status, `Retry-After`, `x-should-retry` and
    /// `x-request-id`. Logs the error once, at the level its fault calls for.
    pub(crate) fn into_response(self, request_id: &str, sse: bool) -> Response<Body> {
        let wire = self.body(request_id);
        let status = self.status();
        let mut r = if sse {
            body::sse_event(status, "error", &wire)
        } else {
            body::json(status, wire)
        };
        for (k, v) in self.extra_headers() {
            r.headers_mut().insert(k, v);
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            r.headers_mut().insert("x-request-id", v);
        }
        match self.fault() {
            Fault::Gateway => tracing::error!(request_id, error = %self, "gateway error"),
            Fault::Upstream => tracing::warn!(request_id, error = %self, "upstream error"),
            Fault::Client => {}
        }
        r.extensions_mut().insert(ErrorCode(self.metric_code()));
        r
    }
}

impl std::fmt::Display for GatewayError {
    /// For logs: the wire code and message, plus the internal detail that
    /// the wire never shows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let GatewayError::BadGateway(detail) | GatewayError::Internal(detail) = self {
            write!(f, "{}: {detail}", self.code())
        } else {
            write!(f, "{}: {}", self.code(), self.message())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_and_headers() {
        let e = GatewayError::QuotaExceeded;
        let v: serde_json::Value = serde_json::from_slice(&e.body("rid-1")).unwrap();
        assert_eq!(v["code"], "Throttling.AllocationQuota");
        assert_eq!(v["request_id"], "rid-1");
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = e.extra_headers();
        assert!(h
            .iter()
            .any(|(k, v)| *k == "x-should-retry" && v == "false"));

        let r = GatewayError::RateLimited {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(r.retry_after(), Some(2));
    }

    #[test]
    fn internal_details_never_reach_the_wire() {
        let e = GatewayError::Internal("redis password is hunter2".into());
        let body = String::from_utf8(e.body("r").to_vec()).unwrap();
        assert!(!body.contains("hunter2"));
        let e = GatewayError::BadGateway("connect to 10.0.0.1 refused".into());
        let body = String::from_utf8(e.body("r").to_vec()).unwrap();
        assert!(!body.contains("10.0.0.1"));
    }

    #[test]
    fn upstream_codes_are_bounded_as_labels() {
        let e = GatewayError::Upstream {
            status: StatusCode::BAD_REQUEST,
            code: "Some.New<script>".into(),
            message: "x".into(),
            request_id: Some("up-1".into()),
        };
        assert_eq!(e.metric_code(), "UpstreamError");
        assert_eq!(e.code(), "Some.New<script>");
        let v: serde_json::Value = serde_json::from_slice(&e.body("mine")).unwrap();
        assert_eq!(v["request_id"], "up-1");
    }
}
