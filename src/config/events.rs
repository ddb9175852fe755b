//! `[events]`: usage events out. Every metered answer, as journaled, is
//! POSTed as a CloudEvents 1.0 event to `url` (OpenMeter's ingest API or
//! anything that takes a batch of CloudEvents), in batches, retried until
//! accepted. Off while `url` is unset.

use std::time::Duration;

use serde::Deserialize;

use super::check::Check;
use super::values::HumanDuration;
use super::EnvLookup;
use crate::secret::Secret;

/// OpenMeter's ingest takes batches of any size; 100 events are ~50 KB, a
/// request a receiver answers in milliseconds, and few enough that a batch
/// refused as a whole costs little.
const DEFAULT_BATCH_SIZE: usize = 100;
/// Bodies stay well under the 1 MiB request limit of common proxies.
const MAX_BATCH_SIZE: usize = 1000;
/// An ingest endpoint answers in well under a second; longer means it is
/// down or overloaded, and the batch is tried again.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries back off exponentially (with jitter) up to this: an endpoint
/// that was down for a while gets its backlog within half a minute of
/// coming back, without being hammered meanwhile.
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// `Default` is off (no `url`); a loaded config has the defaults above.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventsConfig {
    /// Where batches are POSTed; `None`: no events.
    pub url: Option<http::Uri>,
    /// The events' `source` is `embedgate/<source>`; `None`: the host name.
    pub source: Option<String>,
    /// Events per request, at most.
    pub batch_size: usize,
    /// One request's time limit.
    pub timeout: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// The environment variable holding the bearer token, if any.
    pub authorization_env: Option<String>,
    /// Its value, read at load; never logged.
    pub authorization: Option<Secret>,
}

/// `[events]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    url: Option<String>,
    source: Option<String>,
    batch_size: Option<i64>,
    timeout: Option<HumanDuration>,
    max_backoff: Option<HumanDuration>,
    authorization_env: Option<String>,
}

impl RawEvents {
    pub(crate) fn load(self, c: &mut Check<'_>, env: EnvLookup<'_>) -> EventsConfig {
        let url = self.url.and_then(|raw| {
            let ok = raw.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http") | Some("https")) && u.authority().is_some()
            });
            if ok.is_none() {
                c.err(
                    "events.url",
                    format!("`{raw}` must be an http(s) URL, e.g. \"https://openmeter.cloud/api/v1/events\""),
                );
            }
            ok
        });
        let source = self.source.filter(|s| {
            let ok = !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_control);
            if !ok {
                c.err(
                    "events.source",
                    "must be 1-200 characters without control characters",
                );
            }
            ok
        });
        let mut batch_size = c.positive("events.batch_size", self.batch_size, DEFAULT_BATCH_SIZE);
        if batch_size > MAX_BATCH_SIZE {
            c.err(
                "events.batch_size",
                format!("must be at most {MAX_BATCH_SIZE}, got {batch_size}"),
            );
            batch_size = DEFAULT_BATCH_SIZE;
        }
        let timeout = self.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
        if timeout.is_zero() {
            c.err("events.timeout", "must be longer than 0");
        }
        let max_backoff = self.max_backoff.map_or(DEFAULT_MAX_BACKOFF, |d| d.0);
        if max_backoff.is_zero() {
            c.err("events.max_backoff", "must be longer than 0");
        }
        if self.authorization_env.as_deref() == Some("") {
            c.err(
                "events.authorization_env",
                "must name an environment variable",
            );
        }
        let authorization = self
            .authorization_env
            .as_deref()
            .and_then(env)
            .filter(|v| !v.is_empty())
            .map(Secret::new);
        EventsConfig {
            url,
            source,
            batch_size,
            timeout,
            max_backoff,
            authorization_env: self.authorization_env,
            authorization,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn env(key: &str) -> Option<String> {
        (key == "OPENMETER_TOKEN").then(|| "om-secret".to_string())
    }

    #[test]
    fn events_are_off_until_a_url_is_set() {
        let c = Config::parse("", &env).unwrap();
        assert_eq!(c.events.url, None);
        assert_eq!(c.events.batch_size, 100);
        let c = Config::parse(
            "[events]\nurl = \"http://127.0.0.1:8888/api/v1/events\"\nsource = \"eu-1\"\nbatch_size = 7\ntimeout = \"2s\"\nauthorization_env = \"OPENMETER_TOKEN\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(
            c.events.url.as_ref().map(|u| u.to_string()).as_deref(),
            Some("http://127.0.0.1:8888/api/v1/events")
        );
        assert_eq!(c.events.source.as_deref(), Some("eu-1"));
        assert_eq!(c.events.batch_size, 7);
        assert_eq!(c.events.timeout, std::time::Duration::from_secs(2));
        assert_eq!(
            c.events.authorization.as_ref().map(|s| s.expose()),
            Some("om-secret")
        );
        // The token never prints.
        assert!(!format!("{:?}", c.events).contains("om-secret"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::parse(
            "[events]\nurl = \"ftp://x\"\nsource = \"\"\nbatch_size = 5000\ntimeout = \"0s\"\nauthorization_env = \"\"\n",
            &env,
        )
        .unwrap_err()
        .to_string();
        for key in [
            "events.url",
            "events.source",
            "events.batch_size",
            "events.timeout",
            "events.authorization_env",
        ] {
            assert!(e.contains(key), "{key} in {e}");
        }
    }
}
