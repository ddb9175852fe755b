//! `[upstream]`: where misses go, with which key, how patiently.

use std::time::Duration;

use serde::Deserialize;

use super::check::Check;
use super::values::{self, HumanDuration};
use super::EnvLookup;
use crate::secret::Secret;

/// The one model this gateway exists for.
pub const ONE_PEACE_MODEL: &str = "multimodal-embedding-one-peace-v1";

/// DashScope's public endpoint, the official SDKs' own default.
const DEFAULT_BASE_URL: &str = "https://dashscope.aliyuncs.com";
/// The variable the official SDKs read, so the company key stays where
/// operators already keep it.
const DEFAULT_API_KEY_ENV: &str = "DASHSCOPE_API_KEY";
/// The SDK's own default is 300 s; an embedding normally answers in well under 5 s.
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// A TCP and TLS handshake with DashScope takes well under a second; longer
/// means the network is down, and a retry has a better chance.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Two retries, like the 2.x SDK: enough to ride out a blip, bounded cost.
const DEFAULT_MAX_RETRIES: u32 = 2;
/// More retries than this only stretch an outage until `timeout` anyway.
const MAX_RETRIES_LIMIT: u32 = 10;
/// Long enough for a throttling window to move on, short enough that both
/// default retries fit well inside a second.
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Only ONE-PEACE: other models bill and cache differently.
const DEFAULT_MODELS: &[&str] = &[ONE_PEACE_MODEL];
/// ONE-PEACE answers 1536 float32 values; anything else is not an embedding.
const DEFAULT_EMBEDDING_DIMENSION: usize = 1536;
/// The SDK docstring's limit for one text item ("70 words", measured in characters).
const DEFAULT_MAX_TEXT_CHARS: usize = 70;
/// ONE-PEACE's docs give no item limit; its siblings allow 1 to 25 items
/// (tongyi-embedding-vision: 8, text-embedding-v1/v2: 25). 32 covers every
/// documented batch, and bounds a request at 64 units (32 audio items).
const DEFAULT_MAX_ITEMS: usize = 32;
/// With `auto_truncation` upstream reads the first 70 characters (at most
/// 280 bytes) and drops the rest; 16 KiB is a few pages of text, so anything
/// longer is a document sent by mistake, and every byte of it would be
/// forwarded and hashed. 32 items of it fill half the default body limit.
const DEFAULT_MAX_TEXT_BYTES: usize = 16 * 1024;
/// Image and audio items are URLs (http(s) or `oss://`); a signed OSS URL is
/// about 1 KB, and 8 KiB is the request-line limit of common HTTP servers
/// (nginx), past which no fetcher would accept the URL anyway.
const DEFAULT_MAX_URL_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme and authority, no trailing slash, e.g. `https://dashscope.aliyuncs.com`.
    pub base_url: http::Uri,
    pub api_key_env: String,
    /// `None` when the environment variable is unset: upstream calls are made
    /// without a key and upstream answers 401, which `/readyz` warns about.
    pub api_key: Option<Secret>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    pub models: Vec<String>,
    pub embedding_dimension: usize,
    pub max_text_chars: usize,
    /// Items per request (`input.contents`).
    pub max_items: usize,
    /// Bytes per text item, also with `auto_truncation`.
    pub max_text_bytes: usize,
    /// Bytes per image or audio item (a URL).
    pub max_url_bytes: usize,
}

/// `[upstream]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    base_url: Option<String>,
    api_key_env: Option<String>,
    timeout: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    max_retries: Option<i64>,
    retry_backoff: Option<HumanDuration>,
    #[serde(default, deserialize_with = "values::strings")]
    models: Option<Vec<String>>,
    embedding_dimension: Option<i64>,
    max_text_chars: Option<i64>,
    max_items: Option<i64>,
    max_text_bytes: Option<i64>,
    max_url_bytes: Option<i64>,
}

impl RawUpstream {
    /// The upstream key is read from `env` here, once per load.
    pub(crate) fn load(self, c: &mut Check<'_>, env: EnvLookup<'_>) -> UpstreamConfig {
        let base_url = match self.base_url {
            None => http::Uri::from_static(DEFAULT_BASE_URL),
            Some(raw) => base_url(&raw).unwrap_or_else(|| {
                c.err(
                    "upstream.base_url",
                    format!(
                        "`{raw}` must be an http(s) URL with a host and no path, e.g. \"{DEFAULT_BASE_URL}\""
                    ),
                );
                http::Uri::from_static(DEFAULT_BASE_URL)
            }),
        };
        let api_key_env = self
            .api_key_env
            .unwrap_or_else(|| DEFAULT_API_KEY_ENV.to_string());
        if api_key_env.is_empty() {
            c.err("upstream.api_key_env", "must name an environment variable");
        }
        let api_key = env(&api_key_env).filter(|k| !k.is_empty()).map(Secret::new);
        let models = self
            .models
            .unwrap_or_else(|| DEFAULT_MODELS.iter().map(|m| m.to_string()).collect());
        if models.is_empty() || models.iter().any(|m| m.is_empty()) {
            c.err(
                "upstream.models",
                "must list at least one non-empty model name",
            );
        }
        let max_retries = match self.max_retries {
            None => DEFAULT_MAX_RETRIES,
            Some(v) => match u32::try_from(v) {
                Ok(n) if n <= MAX_RETRIES_LIMIT => n,
                Ok(_) | Err(_) => {
                    c.err(
                        "upstream.max_retries",
                        format!("must be between 0 and {MAX_RETRIES_LIMIT}, got {v}"),
                    );
                    DEFAULT_MAX_RETRIES
                }
            },
        };
        UpstreamConfig {
            base_url,
            api_key_env,
            api_key,
            timeout: self.timeout.map_or(DEFAULT_UPSTREAM_TIMEOUT, |d| d.0),
            connect_timeout: self
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            max_retries,
            retry_backoff: self.retry_backoff.map_or(DEFAULT_RETRY_BACKOFF, |d| d.0),
            models,
            embedding_dimension: c.positive(
                "upstream.embedding_dimension",
                self.embedding_dimension,
                DEFAULT_EMBEDDING_DIMENSION,
            ),
            max_text_chars: c.positive(
                "upstream.max_text_chars",
                self.max_text_chars,
                DEFAULT_MAX_TEXT_CHARS,
            ),
            max_items: c.positive("upstream.max_items", self.max_items, DEFAULT_MAX_ITEMS),
            max_text_bytes: c.positive(
                "upstream.max_text_bytes",
                self.max_text_bytes,
                DEFAULT_MAX_TEXT_BYTES,
            ),
            max_url_bytes: c.positive(
                "upstream.max_url_bytes",
                self.max_url_bytes,
                DEFAULT_MAX_URL_BYTES,
            ),
        }
    }
}

/// An http(s) URL with a host and no path; a trailing slash is dropped.
pub(crate) fn base_url(raw: &str) -> Option<http::Uri> {
    let uri = raw.trim_end_matches('/').parse::<http::Uri>().ok()?;
    let ok = matches!(uri.scheme_str(), Some("http") | Some("https"))
        && uri.authority().is_some()
        && (uri.path() == "/" || uri.path().is_empty());
    ok.then_some(uri)
}
