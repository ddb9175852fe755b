//! Traces end to end: the real binary exports OTLP/HTTP (protobuf) to a
//! receiver in this test, which decodes what it gets. One server span per
//! request with the GenAI attributes, a child per phase, an `upstream`
//! child per attempt on a miss only, the `traceparent` upstream receives,
//! a client's `traceparent` continued, nothing secret or sent in any
//! attribute; off, nothing is exported and no `traceparent` goes upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;

const KEY: &str = "sk-traced-team-key-0123";
const TENANT: &str = "traced";
const TEXT_PATH: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
/// A W3C traceparent a client might send (the spec's example).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

/// One exported span, flattened: ids in hex, attributes as strings.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: Vec<(String, String)>,
    /// `service.name` of its resource.
    service: String,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP receiver on a port of its own: records the path and body
/// of every request, answers 200 with an empty (valid) protobuf message.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(String, String, Bytes)>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<(String, String, Bytes)>>> = Arc::default();
        let store = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let ctype = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        store.lock().unwrap().push((path, ctype, body));
                        let mut r = Response::new(Full::new(Bytes::new()));
                        r.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Every span received so far, decoded.
    fn spans(&self) -> Vec<Span> {
        let got = self.got.lock().unwrap().clone();
        let mut out = Vec::new();
        for (path, ctype, body) in got {
            assert_eq!(path, "/v1/traces");
            assert_eq!(ctype, "application/x-protobuf");
            let req = ExportTraceServiceRequest::decode(body).unwrap();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| value(&kv.value))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        out.push(Span {
                            name: s.name,
                            kind: s.kind,
                            trace_id: hex::encode(&s.trace_id),
                            span_id: hex::encode(&s.span_id),
                            parent: hex::encode(&s.parent_span_id),
                            attrs: s
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), value(&kv.value)))
                                .collect(),
                            service: service.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The server span of the request with this `x-request-id`, once
    /// exported (with its children, exported no later).
    async fn request(&self, request_id: &str) -> (Span, Vec<Span>) {
        let server = eventually(
            15,
            &format!("the span of request {request_id}"),
            async || {
                self.spans().into_iter().find(|s| {
                    s.kind == SpanKind::Server as i32
                        && s.attr("embedgate.request_id") == Some(request_id)
                })
            },
        )
        .await;
        let children = self
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == server.trace_id && s.parent == server.span_id)
            .collect();
        (server, children)
    }
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn names(spans: &[Span]) -> Vec<&str> {
    let mut n: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    n.sort();
    n
}

/// `traceparent` of the last call upstream: (trace id, parent span id).
fn upstream_traceparent(gw: &TestGateway) -> Option<(String, String)> {
    let h = gw.fake.last_headers()?;
    let tp = h.get("traceparent")?.to_str().unwrap().to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    Some((parts[1].to_string(), parts[2].to_string()))
}

fn traced(receiver: &Receiver) -> GatewayBuilder {
    TestGateway::builder()
        .tenant(TENANT, KEY)
        .rate(1000.0, 1000)
        .quota(1_000_000, Per::Day)
        .set("telemetry", format!("endpoint = \"{}\"", receiver.url()))
        // Export every 100 ms instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
}

async fn post_text(gw: &TestGateway, texts: &[&str]) -> Reply {
    let body = json!({"model": "text-embedding-v4", "input": {"texts": texts}});
    let r = gw
        .client
        .post(gw.url(TEXT_PATH))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    Reply::from_response(r).await
}

fn request_id(r: &Reply) -> String {
    r.header("x-request-id").unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_a_hit_and_a_text_request_are_traced_with_their_phases() {
    let receiver = Receiver::start().await;
    let gw = traced(&receiver).start().await;
    let secret_text = "the quarterly numbers nobody may see";

    // A miss: every phase, one upstream attempt.
    let miss = gw.embed(KEY, &text_body(secret_text)).await;
    assert_eq!(miss.status, 200, "{}", miss.text);
    assert_eq!(miss.cache(), "MISS");
    let (server, children) = receiver.request(&request_id(&miss)).await;
    assert_eq!(server.name, format!("embeddings {MODEL}"));
    assert_eq!(server.service, "embedgate");
    for (k, v) in [
        ("gen_ai.operation.name", "embeddings"),
        ("gen_ai.request.model", MODEL),
        ("gen_ai.system", "dashscope"),
        ("gen_ai.provider.name", "dashscope"),
        ("embedgate.tenant", TENANT),
        ("embedgate.cache", "miss"),
        ("http.request.method", "POST"),
        ("http.route", EMBED_PATH),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(server.attr(k), Some(v), "{k}: {server:#?}");
    }
    // ONE-PEACE bills weighted items, not tokens.
    assert_eq!(server.attr("gen_ai.usage.input_tokens"), None);
    assert_eq!(
        names(&children),
        [
            "auth",
            "cache.lookup",
            "cache.lookup",
            "quota",
            "rate_limit",
            "upstream"
        ],
        "{children:#?}"
    );
    let upstream = children.iter().find(|s| s.name == "upstream").unwrap();
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    assert_eq!(upstream.attr("http.request.method"), Some("POST"));
    assert_eq!(upstream.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(
        upstream.attr("server.port"),
        Some(&*gw.fake.addr.port().to_string())
    );
    assert_eq!(upstream.attr("http.response.status_code"), Some("200"));
    assert_eq!(upstream.attr("http.request.resend_count"), None);
    // Upstream got the attempt's own context, in the request's trace.
    let (trace, parent) = upstream_traceparent(&gw).expect("a traceparent upstream");
    assert_eq!(trace, server.trace_id);
    assert_eq!(parent, upstream.span_id);
    assert_eq!(
        server.parent, "",
        "a request without traceparent starts a trace"
    );

    // The same body again: a hit, no upstream child.
    let hit = gw.embed(KEY, &text_body(secret_text)).await;
    assert_eq!(hit.cache(), "HIT");
    let (server, children) = receiver.request(&request_id(&hit)).await;
    assert_eq!(server.attr("embedgate.cache"), Some("hit"));
    assert_eq!(server.attr("embedgate.tenant"), Some(TENANT));
    assert_eq!(
        names(&children),
        ["auth", "cache.lookup", "rate_limit"],
        "{children:#?}"
    );

    // The text route: a token model, its input tokens on the span.
    let text = post_text(&gw, &["a"]).await;
    assert_eq!(text.status, 200, "{}", text.text);
    let tokens = text.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(tokens > 0);
    let (server, children) = receiver.request(&request_id(&text)).await;
    assert_eq!(server.name, "embeddings text-embedding-v4");
    assert_eq!(
        server.attr("gen_ai.request.model"),
        Some("text-embedding-v4")
    );
    assert_eq!(server.attr("http.route"), Some(TEXT_PATH));
    assert_eq!(server.attr("embedgate.cache"), Some("miss"));
    assert_eq!(
        server.attr("gen_ai.usage.input_tokens"),
        Some(&*tokens.to_string())
    );
    assert_eq!(
        names(&children),
        ["auth", "cache.lookup", "quota", "rate_limit", "upstream"],
        "{children:#?}"
    );
    let (trace, _) = upstream_traceparent(&gw).unwrap();
    assert_eq!(trace, server.trace_id);

    // Its hit: the same tokens, from the cache.
    let again = post_text(&gw, &["a"]).await;
    assert_eq!(again.cache(), "HIT");
    let (server, children) = receiver.request(&request_id(&again)).await;
    assert_eq!(server.attr("embedgate.cache"), Some("hit"));
    assert_eq!(
        server.attr("gen_ai.usage.input_tokens"),
        Some(&*tokens.to_string())
    );
    assert!(children.iter().all(|s| s.name != "upstream"));

    // A refusal: a span too, with the error, no tenant.
    let refused = gw.embed("sk-not-a-key", &text_body(secret_text)).await;
    assert_eq!(refused.status, 401);
    let (server, _) = receiver.request(&request_id(&refused)).await;
    assert_eq!(server.attr("http.response.status_code"), Some("401"));
    assert_eq!(server.attr("error.type"), Some("InvalidApiKey"));
    assert_eq!(server.attr("embedgate.tenant"), None);

    // Nothing secret, nothing sent: no key, no text, no header, no URL.
    let spans = receiver.spans();
    assert!(spans.len() >= 20, "{}", spans.len());
    for s in &spans {
        for (k, v) in s
            .attrs
            .iter()
            .chain([(String::new(), s.name.clone())].iter())
        {
            for secret in [
                KEY,
                "sk-not-a-key",
                UPSTREAM_KEY,
                secret_text,
                "Bearer",
                "http://",
                &gw.fake.addr.to_string(),
            ] {
                assert!(!v.contains(secret), "{k} = {v:?} holds {secret:?}");
            }
        }
        assert_eq!(s.service, "embedgate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_is_continued_up_to_upstream() {
    let receiver = Receiver::start().await;
    let gw = traced(&receiver).start().await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = gw
        .embed_with(KEY, &text_body("continued"), &[("traceparent", &tp)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (server, children) = receiver.request(&request_id(&r)).await;
    assert_eq!(server.trace_id, CLIENT_TRACE);
    assert_eq!(server.parent, CLIENT_PARENT);
    let upstream = children.iter().find(|s| s.name == "upstream").unwrap();
    let (trace, parent) = upstream_traceparent(&gw).unwrap();
    assert_eq!(
        (trace.as_str(), parent.as_str()),
        (CLIENT_TRACE, &*upstream.span_id)
    );
    // A garbled one is ignored: a trace of its own.
    let r = gw
        .embed_with(
            KEY,
            &text_body("garbled"),
            &[("traceparent", "00-zz-yy-01")],
        )
        .await;
    let (server, _) = receiver.request(&request_id(&r)).await;
    assert_ne!(server.trace_id, CLIENT_TRACE);
    assert_eq!(server.parent, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_one_upstream_span_each() {
    let receiver = Receiver::start().await;
    let gw = traced(&receiver).start().await;
    gw.fake
        .push_faults([Fault::Status(503, "ServiceUnavailable")]);
    let r = gw.embed(KEY, &text_body("retried")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, children) = receiver.request(&request_id(&r)).await;
    let mut attempts: Vec<&Span> = children.iter().filter(|s| s.name == "upstream").collect();
    attempts.sort_by_key(|s| s.attr("http.request.resend_count").map(str::to_string));
    assert_eq!(attempts.len(), 2, "{children:#?}");
    assert_eq!(attempts[0].attr("http.response.status_code"), Some("503"));
    assert_eq!(attempts[0].attr("error.type"), Some("503"));
    assert_eq!(attempts[1].attr("http.response.status_code"), Some("200"));
    assert_eq!(attempts[1].attr("http.request.resend_count"), Some("1"));
    // The fake saw two traceparents, one per attempt, in one trace.
    let tps: Vec<String> = gw
        .fake
        .headers()
        .iter()
        .map(|h| h["traceparent"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(tps.len(), 2);
    assert_ne!(tps[0], tps[1]);
    assert_eq!(tps[0][3..35], tps[1][3..35]);
}

/// Spans not exported yet go out at shutdown, within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_spans_are_exported_at_shutdown() {
    let receiver = Receiver::start().await;
    let gw = traced(&receiver)
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .set("server", "shutdown_grace = \"5s\"")
        .start()
        .await;
    let r = gw.embed(KEY, &text_body("last words")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = request_id(&r);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests(), 0, "exported before the delay");
    let (code, took, logs) = gw.terminate_within(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{logs}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (server, children) = receiver.request(&id).await;
    assert_eq!(server.attr("embedgate.cache"), Some("miss"));
    assert!(children.iter().any(|s| s.name == "upstream"));
    assert!(logs.contains("traces exported"), "{logs}");
}

/// `sampling_ratio = 0`: no new trace is recorded; a caller's sampled
/// trace still is (parent-based).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_ratio_and_the_callers_decision() {
    let receiver = Receiver::start().await;
    let gw = traced(&receiver)
        .set("telemetry", "sampling_ratio = 0")
        .start()
        .await;
    let unsampled = gw.embed(KEY, &text_body("not sampled")).await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let sampled = gw
        .embed_with(KEY, &text_body("sampled"), &[("traceparent", &tp)])
        .await;
    let (server, _) = receiver.request(&request_id(&sampled)).await;
    assert_eq!(server.trace_id, CLIENT_TRACE);
    // Upstream still gets a traceparent, flagged not sampled.
    let h = gw.fake.headers();
    let first = h[0]["traceparent"].to_str().unwrap();
    assert!(first.ends_with("-00"), "{first}");
    let code = gw.terminate();
    assert_eq!(code, Some(0));
    let unsampled_id = request_id(&unsampled);
    assert!(receiver
        .spans()
        .iter()
        .all(|s| s.attr("embedgate.request_id") != Some(&*unsampled_id)
            && s.trace_id == CLIENT_TRACE));
}

/// Without `[telemetry] endpoint` nothing is exported, whatever the
/// standard OpenTelemetry variables say, and nothing is sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_exports_nothing_and_sends_no_traceparent() {
    let receiver = Receiver::start().await;
    let gw = TestGateway::builder()
        .tenant(TENANT, KEY)
        .set("telemetry", "service_name = \"embedgate-off\"")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url())
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            &format!("{}/v1/traces", receiver.url()),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    for _ in 0..2 {
        let r = gw
            .embed_with(KEY, &text_body("untraced"), &[("traceparent", &tp)])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(post_text(&gw, &["b"]).await.status, 200);
    for h in gw.fake.headers() {
        assert!(h.get("traceparent").is_none(), "{h:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.terminate(), Some(0));
    assert_eq!(receiver.requests(), 0);
}
