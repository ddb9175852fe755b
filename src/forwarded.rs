//! The client headers that reach upstream: an explicit allow-list, each
//! value bounded, and the ones that change the answer normalised so that
//! the cache key and upstream see the same value.
//!
//! | header | cache key | why |
//! |---|---|---|
//! | `X-DashScope-DataInspection` | yes | asks upstream to moderate the input: an answer computed without it must not answer a request that asked for it |
//! | `X-DashScope-OssResourceResolve` | yes | makes upstream resolve `oss://` contents (`text` items too), so the same body stands for other bytes |
//! | `user-agent`, `x-dashscope-sdk-client`, `x-dashscope-sdk-session-id` | no | identify the SDK and process; the answer is the same whoever asks |
//! | `accept-language` | no | only the language of error messages, and errors are never cached |
//!
//! Every other client header stays here: the tenant's `Authorization`,
//! cookies, hop-by-hop headers, `X-DashScope-SSE` (the gateway frames SSE
//! itself), `X-DashScope-WorkSpace` (the tenant's configured workspace is
//! sent instead) and any other `X-DashScope-*` header (`X-DashScope-Async`
//! would turn the call into a task the gateway cannot answer with).
//!
//! A forwarded header longer than [`MAX_FORWARDED_HEADER_BYTES`], or given
//! more than once, is refused (400 naming it): it would go upstream with the
//! company key, and one of two values would be keyed or forwarded blindly.
//! A header that is not forwarded is ignored, whatever its size.

use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT_LANGUAGE, USER_AGENT};

use crate::error::GatewayError;

/// Longest forwarded header value. The SDK's longest, its user-agent, is
/// about 150 bytes (a caller's `user_agent=` suffix included, rarely 300);
/// a value past this is not the SDK's and would only cost upstream bytes.
pub(crate) const MAX_FORWARDED_HEADER_BYTES: usize = 1024;

const DATA_INSPECTION: HeaderName = HeaderName::from_static("x-dashscope-datainspection");
const OSS_RESOURCE_RESOLVE: HeaderName = HeaderName::from_static("x-dashscope-ossresourceresolve");
const SDK_CLIENT: HeaderName = HeaderName::from_static("x-dashscope-sdk-client");
const SDK_SESSION_ID: HeaderName = HeaderName::from_static("x-dashscope-sdk-session-id");

/// The client headers that go upstream, read once per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ForwardedHeaders {
    /// `X-DashScope-DataInspection`, trimmed and lowercased (`None` when
    /// absent or empty); part of the cache key.
    pub(crate) data_inspection: Option<HeaderValue>,
    /// `X-DashScope-OssResourceResolve`, like `data_inspection`; part of the
    /// cache key.
    pub(crate) oss_resource_resolve: Option<HeaderValue>,
    /// The SDK's identification, as sent; not part of the key.
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) sdk_client: Option<HeaderValue>,
    pub(crate) sdk_session_id: Option<HeaderValue>,
    /// As sent; not part of the key (it changes only error messages).
    pub(crate) accept_language: Option<HeaderValue>,
    /// `X-DashScope-Async: enable`: set by the batch route for a task
    /// submit only (never taken from other requests: a synchronous call
    /// stays synchronous).
    pub(crate) dashscope_async: Option<HeaderValue>,
}

impl ForwardedHeaders {
    /// Picks the allow-listed headers out of a client request.
    pub(crate) fn from_client(h: &HeaderMap) -> Result<ForwardedHeaders, GatewayError> {
        Ok(ForwardedHeaders {
            data_inspection: keyed(h, &DATA_INSPECTION)?,
            oss_resource_resolve: keyed(h, &OSS_RESOURCE_RESOLVE)?,
            user_agent: as_sent(h, &USER_AGENT)?,
            sdk_client: as_sent(h, &SDK_CLIENT)?,
            sdk_session_id: as_sent(h, &SDK_SESSION_ID)?,
            accept_language: as_sent(h, &ACCEPT_LANGUAGE)?,
            dashscope_async: None,
        })
    }

    /// Writes them into an upstream request's headers.
    pub(crate) fn write_to(&self, out: &mut HeaderMap) {
        let ForwardedHeaders {
            data_inspection,
            oss_resource_resolve,
            user_agent,
            sdk_client,
            sdk_session_id,
            accept_language,
            dashscope_async,
        } = self;
        if let Some(v) = dashscope_async {
            out.insert("x-dashscope-async", v.clone());
        }
        for (name, value) in [
            (DATA_INSPECTION, data_inspection),
            (OSS_RESOURCE_RESOLVE, oss_resource_resolve),
            (USER_AGENT, user_agent),
            (SDK_CLIENT, sdk_client),
            (SDK_SESSION_ID, sdk_session_id),
            (ACCEPT_LANGUAGE, accept_language),
        ] {
            if let Some(v) = value {
                out.insert(name, v.clone());
            }
        }
    }
}

/// The one value of `name`, bounded; `None` when absent or blank.
fn one<'h>(h: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h HeaderValue>, GatewayError> {
    let mut values = h.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(GatewayError::InvalidParameter(format!(
            "header `{name}` must be given at most once"
        )));
    }
    if v.len() > MAX_FORWARDED_HEADER_BYTES {
        return Err(GatewayError::InvalidParameter(format!(
            "header `{name}` is longer than {MAX_FORWARDED_HEADER_BYTES} bytes"
        )));
    }
    Ok((!v.as_bytes().trim_ascii().is_empty()).then_some(v))
}

fn as_sent(h: &HeaderMap, name: &HeaderName) -> Result<Option<HeaderValue>, GatewayError> {
    Ok(one(h, name)?.cloned())
}

/// A header that changes the answer: trimmed and ASCII-lowercased, so
/// `Enable` and ` enable` are one cache entry, and upstream is sent exactly
/// the value the entry is keyed on.
fn keyed(h: &HeaderMap, name: &HeaderName) -> Result<Option<HeaderValue>, GatewayError> {
    let Some(v) = one(h, name)? else {
        return Ok(None);
    };
    let normal = v.as_bytes().trim_ascii().to_ascii_lowercase();
    HeaderValue::from_bytes(&normal).map(Some).map_err(|_| {
        GatewayError::InvalidParameter(format!("header `{name}` has an invalid value"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn forwarded(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut out = HeaderMap::new();
        ForwardedHeaders::from_client(&headers(pairs))
            .unwrap()
            .write_to(&mut out);
        out
    }

    #[test]
    fn forwards_only_the_allow_list() {
        for (name, want) in [
            ("x-dashscope-ossresourceresolve", true),
            ("x-dashscope-datainspection", true),
            ("x-dashscope-sdk-client", true),
            ("x-dashscope-sdk-session-id", true),
            ("user-agent", true),
            ("accept-language", true),
            ("x-dashscope-sse", false),
            ("x-dashscope-workspace", false),
            ("x-dashscope-async", false),
            ("x-dashscope-plugin", false),
            ("x-dashscope-anything", false),
            ("authorization", false),
            ("cookie", false),
            ("connection", false),
            ("transfer-encoding", false),
            ("accept", false),
            ("cache-control", false),
        ] {
            let out = forwarded(&[(name, "enable")]);
            assert_eq!(out.contains_key(name), want, "{name}");
            assert!(out.len() <= 1, "{name}: {out:?}");
        }
    }

    #[test]
    fn answer_changing_headers_are_normalised_identification_kept_as_sent() {
        let out = forwarded(&[
            ("X-DashScope-DataInspection", "  Enable "),
            ("x-dashscope-ossresourceresolve", "ENABLE"),
            ("user-agent", "DashScope/2.0.2; Python/3.11"),
            ("accept-language", "zh-CN"),
        ]);
        assert_eq!(out["x-dashscope-datainspection"], "enable");
        assert_eq!(out["x-dashscope-ossresourceresolve"], "enable");
        assert_eq!(out["user-agent"], "DashScope/2.0.2; Python/3.11");
        assert_eq!(out["accept-language"], "zh-CN");
    }

    #[test]
    fn blank_is_absent() {
        let f = ForwardedHeaders::from_client(&headers(&[
            ("x-dashscope-datainspection", "  "),
            ("user-agent", ""),
        ]))
        .unwrap();
        assert_eq!(f, ForwardedHeaders::default());
    }

    #[test]
    fn long_or_repeated_forwarded_headers_are_refused_by_name() {
        let at_limit = "a".repeat(MAX_FORWARDED_HEADER_BYTES);
        assert!(ForwardedHeaders::from_client(&headers(&[("user-agent", &at_limit)])).is_ok());
        let over = "a".repeat(MAX_FORWARDED_HEADER_BYTES + 1);
        for name in [
            "x-dashscope-datainspection",
            "x-dashscope-ossresourceresolve",
            "x-dashscope-sdk-client",
            "x-dashscope-sdk-session-id",
            "user-agent",
            "accept-language",
        ] {
            let e = ForwardedHeaders::from_client(&headers(&[(name, &over)])).unwrap_err();
            assert_eq!(e.code(), "InvalidParameter");
            assert!(e.message().contains(name), "{}", e.message());
            assert!(e.message().contains("1024 bytes"), "{}", e.message());
            let e =
                ForwardedHeaders::from_client(&headers(&[(name, "a"), (name, "b")])).unwrap_err();
            assert!(e.message().contains(name), "{}", e.message());
        }
        // Not forwarded: ignored, whatever its size.
        let f = ForwardedHeaders::from_client(&headers(&[("x-dashscope-other", &over)])).unwrap();
        assert_eq!(f, ForwardedHeaders::default());
    }
}
