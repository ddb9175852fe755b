//! `[telemetry]`: OpenTelemetry traces over OTLP/HTTP. Off unless
//! `endpoint` is set: no exporter, no OpenTelemetry layer, the gateway's
//! spans stay at DEBUG where the log filter drops them.

use std::time::Duration;

use serde::Deserialize;

use super::check::Check;
use super::values::HumanDuration;

/// `service.name` of the exported spans, the name tracing backends list.
const DEFAULT_SERVICE_NAME: &str = "embedgate";
/// Every trace, once an endpoint is set: a gateway's request rate is low
/// enough for a collector, and a collector can sample further (tail
/// sampling keeps the slow and failed ones).
const DEFAULT_SAMPLING_RATIO: f64 = 1.0;
/// The OpenTelemetry default (OTEL_EXPORTER_OTLP_TIMEOUT): one export, a
/// batch of up to 512 spans, may take this long before it is dropped.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP root, e.g. `http://127.0.0.1:4318`;
    /// spans are POSTed to its `/v1/traces`. `None`: traces are off.
    pub endpoint: Option<http::Uri>,
    pub service_name: String,
    /// Fraction of new traces recorded, in [0, 1]; a request that carries
    /// a `traceparent` follows its caller's sampling decision.
    pub sampling_ratio: f64,
    pub export_timeout: Duration,
}

impl TelemetryConfig {
    /// Where spans are POSTed: the endpoint's path (a proxy's prefix, if
    /// any) followed by `/v1/traces`, as OTEL_EXPORTER_OTLP_ENDPOINT means.
    pub fn traces_url(&self) -> Option<String> {
        let e = self.endpoint.as_ref()?;
        let scheme = e.scheme_str().unwrap_or("http");
        let authority = e.authority()?;
        let prefix = e.path().trim_end_matches('/');
        Some(format!("{scheme}://{authority}{prefix}/v1/traces"))
    }
}

/// `[telemetry]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    endpoint: Option<String>,
    service_name: Option<String>,
    sampling_ratio: Option<f64>,
    export_timeout: Option<HumanDuration>,
}

impl RawTelemetry {
    pub(crate) fn load(self, c: &mut Check<'_>) -> TelemetryConfig {
        let endpoint = self
            .endpoint
            .filter(|e| !e.is_empty())
            .and_then(|raw| match endpoint(&raw) {
                Some(uri) => Some(uri),
                None => {
                    c.err(
                        "telemetry.endpoint",
                        format!(
                            "`{raw}` must be an http(s) URL with a host and no query, e.g. \"http://127.0.0.1:4318\""
                        ),
                    );
                    None
                }
            });
        let service_name = match self.service_name {
            None => DEFAULT_SERVICE_NAME.to_string(),
            Some(s) if !s.trim().is_empty() => s,
            Some(_) => {
                c.err("telemetry.service_name", "must not be empty");
                DEFAULT_SERVICE_NAME.to_string()
            }
        };
        let sampling_ratio = match self.sampling_ratio {
            None => DEFAULT_SAMPLING_RATIO,
            Some(r) if (0.0..=1.0).contains(&r) => r,
            Some(r) => {
                c.err(
                    "telemetry.sampling_ratio",
                    format!("must be a fraction in [0, 1], got {r}"),
                );
                DEFAULT_SAMPLING_RATIO
            }
        };
        TelemetryConfig {
            endpoint,
            service_name,
            sampling_ratio,
            export_timeout: self.export_timeout.map_or(DEFAULT_EXPORT_TIMEOUT, |d| d.0),
        }
    }
}

/// An http(s) URL with a host, no query and no fragment.
fn endpoint(raw: &str) -> Option<http::Uri> {
    let uri: http::Uri = raw.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    let plain = uri.query().is_none() && !raw.contains('#');
    (scheme_ok && host_ok && plain).then_some(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str) -> Result<TelemetryConfig, Vec<String>> {
        let full = format!("[telemetry]\n{src}");
        crate::config::Config::parse(&full, &|_| None)
            .map(|c| c.telemetry)
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn off_by_default_with_the_documented_defaults() {
        let t = load("").unwrap();
        assert_eq!(t.endpoint, None);
        assert_eq!(t.traces_url(), None);
        assert_eq!(t.service_name, "embedgate");
        assert_eq!(t.sampling_ratio, 1.0);
        assert_eq!(t.export_timeout, Duration::from_secs(10));
        // An empty endpoint is no endpoint.
        assert_eq!(load("endpoint = \"\"").unwrap().endpoint, None);
    }

    #[test]
    fn the_traces_path_follows_the_endpoint() {
        for (raw, url) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            (
                "https://otel.example.com/otlp/",
                "https://otel.example.com/otlp/v1/traces",
            ),
        ] {
            let t = load(&format!("endpoint = \"{raw}\"")).unwrap();
            assert_eq!(t.traces_url().as_deref(), Some(url), "{raw}");
        }
    }

    #[test]
    fn bad_values_are_reported_with_their_keys_and_lines() {
        let errors = load(
            "endpoint = \"collector:4318\"\nservice_name = \" \"\nsampling_ratio = 1.5\nexport_timeout = \"0s\"",
        )
        .unwrap_err();
        let keys = [
            "line 2: telemetry.endpoint",
            "line 3: telemetry.service_name",
            "line 4: telemetry.sampling_ratio",
            "line 5: telemetry.export_timeout",
        ];
        assert_eq!(errors.len(), keys.len(), "{errors:?}");
        for (e, k) in errors.iter().zip(keys) {
            assert!(e.starts_with(k), "{errors:?}");
        }
        for bad in [
            "ftp://c:4318",
            "http://c:4318/?x=1",
            "http://c:4318/#x",
            "/v1/traces",
        ] {
            assert!(load(&format!("endpoint = \"{bad}\"")).is_err(), "{bad}");
        }
        assert_eq!(load("sampling_ratio = 0").unwrap().sampling_ratio, 0.0);
    }
}
