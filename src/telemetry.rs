//! Traces: OpenTelemetry spans exported over OTLP/HTTP (protobuf), off
//! unless `[telemetry] endpoint` is set ([`TelemetryConfig`]).
//!
//! Off, nothing here runs: no exporter, no OpenTelemetry layer; the
//! request span is the access log's DEBUG one ([`crate::access_log`]) and
//! the phase spans are DEBUG spans the log filter drops at their callsite.
//!
//! On, [`Traces::start`] builds the exporter (opentelemetry-http's hyper
//! client over rustls, so an `https` collector works), a batch span
//! processor on the tokio runtime and a tracer; [`Traces::layer`] is the
//! `tracing` layer that turns the gateway's own spans (target [`TARGET`],
//! spans only, never events) into OpenTelemetry spans. The spans:
//!
//! | span | kind | where | attributes |
//! |---|---|---|---|
//! | `embeddings {model}` (other routes: the method) | server | [`RequestSpan`], layer 4 of [`crate::stack`] | `gen_ai.operation.name`, `gen_ai.system`, `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.usage.input_tokens` (token models), `embedgate.tenant`, `embedgate.cache`, `embedgate.request_id`, `http.request.method`, `http.route`, `http.response.status_code`, `error.type` |
//! | `auth` | internal | [`crate::auth`] | |
//! | `rate_limit` | internal | [`crate::rate_limit`] | |
//! | `cache.lookup` | internal | [`crate::embeddings`], [`crate::family`] | |
//! | `coalesce.wait` | internal | same | |
//! | `quota` | internal | [`crate::limits`] (the reservation) | |
//! | `upstream` | client | [`crate::upstream`], one per attempt | `http.request.method`, `server.address`, `server.port`, `http.request.resend_count`, `http.response.status_code`, `error.type` |
//!
//! A request's `traceparent` (W3C) is continued; each upstream attempt
//! sends its own. Nothing a client sends beyond the model name and request
//! id, and nothing secret, becomes an attribute: no key, no header, no
//! text, no URL (the route is one of the gateway's fixed paths).
//!
//! The batch processor exports every `OTEL_BSP_SCHEDULE_DELAY` (5 s by
//! default; the other `OTEL_BSP_*` variables apply too); the shutdown
//! exports what is left within `server.shutdown_grace` ([`shutdown`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use http::{Method, Request, Response, StatusCode, Uri};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tower_http::request_id::RequestId;
use tower_http::trace::MakeSpan;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::{Layer, Registry};

use crate::access_log::RouteName;
use crate::auth::TenantName;
use crate::config::TelemetryConfig;
use crate::error::ErrorCode;
use crate::metering::{CacheStatus, ModelName};
use crate::metrics::model_label;
use crate::upstream::{COMPATIBLE_PATH, EMBEDDING_PATH, TEXT_EMBEDDING_PATH};

/// The target of every span meant for export; the exporter's layer takes
/// these and nothing else (no events, no dependency's spans).
pub(crate) const TARGET: &str = "embedgate::trace";

/// `gen_ai.system` / `gen_ai.provider.name`: who serves the embeddings.
const PROVIDER_NAME: &str = "dashscope";

/// Set once the layer is installed; read on the request path, so that with
/// traces off nothing but this load is spent.
static ON: AtomicBool = AtomicBool::new(false);
/// For [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported.
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The exporter and tracer of a gateway with `[telemetry] endpoint` set.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// `None` without an endpoint. Must run inside the tokio runtime: the
    /// batch processor is a task on it.
    pub fn start(cfg: &TelemetryConfig) -> Result<Option<Traces>, String> {
        let Some(url) = cfg.traces_url() else {
            return Ok(None);
        };
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.export_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("telemetry: TLS setup failed: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = opentelemetry_http::hyper::HyperClient::new(https, cfg.export_timeout, None);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(cfg.export_timeout)
            .build()
            .map_err(|e| format!("telemetry.endpoint: {e}"))?;
        let batch = BatchConfigBuilder::default()
            .with_max_export_timeout(cfg.export_timeout)
            .build();
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(batch)
            .build();
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Some(Traces { provider }))
    }

    /// The layer for the `tracing` registry. From here on the request path
    /// makes and fills the spans; [`shutdown`] exports the last ones.
    pub fn layer(self) -> Box<dyn Layer<Registry> + Send + Sync> {
        let tracer = self.provider.tracer("embedgate");
        let _ = PROVIDER.set(self.provider);
        ON.store(true, Ordering::Relaxed);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            .with_tracked_inactivity(false)
            .with_filter(
                filter_fn(|m| m.is_span() && m.target() == TARGET)
                    .with_max_level_hint(LevelFilter::DEBUG),
            )
            .boxed()
    }
}

/// Exports the spans not exported yet and stops the exporter, waiting at
/// most until `until` (the end of the shutdown budget).
pub(crate) async fn shutdown(until: tokio::time::Instant) {
    let Some(provider) = PROVIDER.get().cloned() else {
        return;
    };
    // The processor's shutdown blocks its caller until the export task on
    // the runtime is done: a blocking thread waits, the runtime exports.
    let done = tokio::task::spawn_blocking(move || provider.shutdown());
    match tokio::time::timeout_at(until, done).await {
        Ok(Ok(Ok(()))) => tracing::info!("traces exported"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "shutdown: the last traces were not exported"),
        Ok(Err(e)) => tracing::warn!(error = %e, "shutdown: the trace exporter failed"),
        Err(_) => tracing::warn!(
            "shutdown: the last traces were not exported before server.shutdown_grace ended"
        ),
    }
}

/// The request span (layer 4 of the stack): the access log's DEBUG span
/// when traces are off; on, a server span that continues the client's
/// `traceparent`, filled in by [`on_response`].
#[derive(Clone, Copy, Default)]
pub(crate) struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        if !on() {
            return crate::access_log::RequestSpan.make_span(req);
        }
        let route = embedding_route(req.method(), req.uri().path());
        let (name, operation) = match route {
            Some(_) => ("embeddings", Some("embeddings")),
            None => (method_name(req.method()), None),
        };
        let span = tracing::debug_span!(
            target: TARGET,
            "request",
            otel.name = name,
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = method_name(req.method()),
            http.route = route,
            http.response.status_code = Empty,
            error.type = Empty,
            gen_ai.operation.name = operation,
            gen_ai.system = operation.map(|_| PROVIDER_NAME),
            gen_ai.provider.name = operation.map(|_| PROVIDER_NAME),
            gen_ai.request.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            embedgate.tenant = Empty,
            embedgate.cache = Empty,
            embedgate.request_id = Empty,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        span
    }
}

/// The embedding routes' fixed paths (`http.route`).
fn embedding_route(method: &Method, path: &str) -> Option<&'static str> {
    if method != Method::POST {
        return None;
    }
    [EMBEDDING_PATH, TEXT_EMBEDDING_PATH, COMPATIBLE_PATH]
        .into_iter()
        .find(|p| *p == path)
}

/// A known method, or `_OTHER` (HTTP semantic conventions): a client's
/// made-up method is not recorded.
fn method_name(m: &Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|k| *k == m.as_str())
        .unwrap_or("_OTHER")
}

/// The tokens an answer's input cost (token-billed models), on the
/// response for [`on_response`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct InputTokens(pub(crate) u64);

/// Puts `tokens` on the response when traces are on.
pub(crate) fn set_input_tokens<B>(r: &mut Response<B>, tokens: u64) {
    if on() {
        r.extensions_mut().insert(InputTokens(tokens));
    }
}

/// Fills the request span from what the inner layers put on the response
/// (inside layer 4, where the request span is the current one).
pub(crate) fn on_response<B>(r: Response<B>) -> Response<B> {
    if !on() {
        return r;
    }
    let span = Span::current();
    let ext = r.extensions();
    let status = r.status();
    span.record("http.response.status_code", status.as_u16());
    // The id the client and the access log see (upstream's, on a miss).
    let id = ext
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .or_else(|| r.headers().get("x-request-id")?.to_str().ok());
    if let Some(id) = id {
        span.record("embedgate.request_id", id);
    }
    if let Some(t) = ext.get::<TenantName>() {
        span.record("embedgate.tenant", &*t.0);
    }
    if let Some(c) = ext.get::<CacheStatus>() {
        span.record("embedgate.cache", c.as_str());
    }
    if let Some(n) = ext.get::<InputTokens>() {
        span.record("gen_ai.usage.input_tokens", n.0);
    }
    let embeddings = ext
        .get::<RouteName>()
        .is_some_and(|r| matches!(r.0, "embeddings" | "text" | "compatible"));
    if let Some(m) = ext.get::<ModelName>() {
        let model = model_label(&m.0);
        span.record("gen_ai.request.model", model);
        if embeddings {
            // `{gen_ai.operation.name} {gen_ai.request.model}`; the span
            // has started, so its name is changed on the span itself.
            span.context()
                .span()
                .update_name(format!("embeddings {model}"));
        }
    }
    if !status.is_success() {
        match ext.get::<ErrorCode>() {
            Some(c) => span.record("error.type", c.0),
            None => span.record("error.type", status.as_str()),
        };
    }
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    r
}

/// The span of one upstream attempt (`attempt` 0 is the first), its
/// `traceparent` written into `headers`. A disabled span when traces are off.
pub(crate) fn upstream_span(
    method: &Method,
    uri: &Uri,
    attempt: u32,
    headers: &mut http::HeaderMap,
) -> Span {
    if !on() {
        return Span::none();
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let span = tracing::debug_span!(
        target: TARGET,
        "upstream",
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = method_name(method),
        server.address = uri.host().unwrap_or(""),
        server.port = port,
        http.request.resend_count = (attempt > 0).then_some(attempt),
        http.response.status_code = Empty,
        error.type = Empty,
    );
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
    span
}

/// How an upstream attempt ended: upstream's status, or why there is none.
pub(crate) fn upstream_ended(span: &Span, outcome: Result<StatusCode, &'static str>) {
    if span.is_none() {
        return;
    }
    match outcome {
        Ok(status) => {
            span.record("http.response.status_code", status.as_u16());
            if !status.is_success() {
                span.record("error.type", status.as_str());
            }
            if status.is_server_error() {
                span.record("otel.status_code", "error");
            }
        }
        Err(why) => {
            span.record("error.type", why);
            span.record("otel.status_code", "error");
        }
    }
}
