//! The one error type, and its one mapping to DashScope's wire shape
//! `{"code","message","request_id"}`.
//!
//! Every refusal the gateway makes goes through [`GatewayError`]; each
//! variant knows its HTTP status, its DashScope code, whose fault it is and
//! whether a retry can help. Matches are exhaustive so a new variant cannot
//! ship without a status.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

/// Whose fault an error is; logged, and used to pick the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Gateway,
    Upstream,
}

#[derive(Debug, Clone)]
pub enum GatewayError {
    /// Missing or unknown tenant key (or admin token).
    InvalidApiKey,
    /// The request body is malformed; the message names the field.
    InvalidParameter(String),
    /// `model` is not one this gateway serves.
    ModelNotFound(String),
    BodyTooLarge {
        limit: usize,
    },
    /// Unknown path: never forwarded.
    NotFound,
    MethodNotAllowed,
    /// The tenant's request rate is exhausted.
    RateLimited {
        retry_after: Duration,
    },
    /// The tenant's unit quota for the period is spent.
    QuotaExceeded {
        remaining: u64,
    },
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
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::InvalidParameter(_) | GatewayError::ModelNotFound(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::RateLimited { .. } | GatewayError::QuotaExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
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
    pub fn code(&self) -> &str {
        match self {
            GatewayError::Upstream { code, .. } => code,
            other => other.own_code().unwrap_or("InternalError"),
        }
    }

    /// The `code` as a metric label: always from a closed set.
    pub fn metric_code(&self) -> &'static str {
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
            GatewayError::BodyTooLarge { .. } => "BadRequest.TooLarge",
            GatewayError::NotFound => "NotFound",
            GatewayError::MethodNotAllowed => "MethodNotAllowed",
            GatewayError::RateLimited { .. } => "Throttling.RateQuota",
            GatewayError::QuotaExceeded { .. } => "Throttling.AllocationQuota",
            GatewayError::Overloaded | GatewayError::StoreUnavailable => "ServiceUnavailable",
            GatewayError::Upstream { .. } => return None,
            GatewayError::BadGateway(_) => "BadGateway",
            GatewayError::GatewayTimeout => "GatewayTimeout",
            GatewayError::Internal(_) => "InternalError",
        })
    }

    /// The human message on the wire. Never contains secrets; internal
    /// details stay in the log.
    pub fn message(&self) -> String {
        match self {
            GatewayError::InvalidApiKey => "Invalid API-key provided.".to_string(),
            GatewayError::InvalidParameter(m) => m.clone(),
            GatewayError::ModelNotFound(m) => {
                format!("Model not exist: model `{m}` is not served by this gateway.")
            }
            GatewayError::BodyTooLarge { limit } => {
                format!("Payload Too Large: the request body exceeds {limit} bytes.")
            }
            GatewayError::NotFound => "The requested resource does not exist.".to_string(),
            GatewayError::MethodNotAllowed => {
                "The HTTP method is not allowed on this resource.".to_string()
            }
            GatewayError::RateLimited { .. } => {
                "Requests rate limit exceeded, please try again later.".to_string()
            }
            GatewayError::QuotaExceeded { .. } => {
                "Allocated quota exceeded, please increase your quota limit.".to_string()
            }
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

    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::InvalidApiKey
            | GatewayError::InvalidParameter(_)
            | GatewayError::ModelNotFound(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::RateLimited { .. }
            | GatewayError::QuotaExceeded { .. } => Fault::Client,
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
    pub fn should_retry(&self) -> Option<bool> {
        match self {
            GatewayError::InvalidApiKey
            | GatewayError::InvalidParameter(_)
            | GatewayError::ModelNotFound(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::QuotaExceeded { .. } => Some(false),
            GatewayError::RateLimited { .. }
            | GatewayError::Overloaded
            | GatewayError::StoreUnavailable => Some(true),
            GatewayError::Upstream { .. }
            | GatewayError::BadGateway(_)
            | GatewayError::GatewayTimeout
            | GatewayError::Internal(_) => None,
        }
    }

    /// Seconds for `Retry-After`, where waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
                    .map(|s| s.max(1))
            }
            GatewayError::Overloaded | GatewayError::StoreUnavailable => Some(1),
            GatewayError::InvalidApiKey
            | GatewayError::InvalidParameter(_)
            | GatewayError::ModelNotFound(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::Upstream { .. }
            | GatewayError::BadGateway(_)
            | GatewayError::GatewayTimeout
            | GatewayError::Internal(_) => None,
        }
    }

    /// The JSON body; `request_id` is upstream's for passed-through errors.
    pub fn body(&self, request_id: &str) -> Bytes {
        let rid = match self {
            GatewayError::Upstream {
                request_id: Some(r),
                ..
            } => r.as_str(),
            _ => request_id,
        };
        let v = serde_json::json!({
            "code": self.code(),
            "message": self.message(),
            "request_id": rid,
        });
        Bytes::from(v.to_string())
    }

    /// Headers that go with this error beyond content type.
    pub fn extra_headers(&self) -> Vec<(&'static str, HeaderValue)> {
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

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayError::BadGateway(detail) | GatewayError::Internal(detail) => {
                write!(f, "{}: {detail}", self.code())
            }
            _ => write!(f, "{}: {}", self.code(), self.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wire_shape_and_headers() {
        let e = GatewayError::QuotaExceeded { remaining: 0 };
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
