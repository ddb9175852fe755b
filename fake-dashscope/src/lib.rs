//! A stand-in for DashScope, for embedgate's tests (in-process, through
//! [`start`]), benchmarks and the compose demo (the `fake-dashscope` binary:
//! `fake-dashscope --listen 127.0.0.1:8090`). Not part of the gateway: the
//! `embedgate` crate has it as a dev-dependency only.
//!
//! It answers the ONE-PEACE embedding endpoint with a deterministic
//! 1536-float vector and DashScope's usage block, serves the SDK's
//! upload-certificate call and a fake OSS upload, counts every call, records
//! what it received, and can be told to be slow, to fail, or to throttle.
//!
//! It also models the rest of the embedding family (see
//! /work/shared/dashscope-embeddings.md): the synchronous text endpoint
//! (`text-embedding-v1`…`v4`, module `text`), the other multimodal models on
//! the multimodal path (module `multimodal`), the OpenAI-compatible endpoint
//! (module `compat`) and asynchronous batch text embedding with its task
//! routes (module `tasks`). Every vector is per item and deterministic:
//! [`item_embedding`] computes the one the fake answers.

mod compat;
mod multimodal;
mod tasks;
mod text;
mod vectors;

pub use compat::MAX_INPUTS as COMPAT_MAX_INPUTS;
pub use multimodal::{MultimodalModel, MAX_CONTENTS, MULTIMODAL_MODELS, TOKENS_PER_IMAGE};
pub use tasks::batch_tokens;
pub use text::{TextModel, TEXT_MODELS};
pub use vectors::{
    base64_f32_le, content_kind_value, fusion_embedding, fusion_embedding_with, item_embedding,
    item_embedding_with, text_tokens,
};

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

/// A scripted answer for the next embedding call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// HTTP status with a DashScope error body.
    Status(u16, &'static str),
    /// HTTP 200 whose body carries a `code` (must never count as success).
    CodeOn200,
    /// HTTP 200 with a short embedding.
    BadEmbedding,
    /// HTTP 200 with usage figures that disagree with the request.
    WrongUsage,
    /// Never answers (the gateway's timeout ends the attempt).
    Drop,
    /// Starts a 200 and breaks the connection mid-body: the request was
    /// received (and, at DashScope, maybe billed), the answer is lost.
    CutBody,
    /// Waits this long before answering normally.
    Delay(Duration),
}

#[derive(Default)]
pub struct FakeState {
    /// Synchronous embedding calls received on any of the three routes
    /// (multimodal incl. ONE-PEACE, text, compatible mode), every attempt.
    pub embedding_calls: AtomicU64,
    /// Σ items received by synchronous embedding calls (texts, contents or
    /// compatible-mode inputs), every attempt.
    pub items: AtomicU64,
    /// Synchronous calls on the text path (without the async header).
    pub text_calls: AtomicU64,
    /// Calls on the multimodal path (ONE-PEACE included).
    pub multimodal_calls: AtomicU64,
    /// Calls on `/compatible-mode/v1/embeddings`.
    pub compat_calls: AtomicU64,
    /// Text-path calls with `X-DashScope-Async: enable` (every attempt).
    pub task_submits: AtomicU64,
    /// `GET /api/v1/tasks/{id}` calls.
    pub task_polls: AtomicU64,
    /// `POST /api/v1/tasks/{id}/cancel` calls.
    pub task_cancels: AtomicU64,
    /// `GET /api/v1/tasks` calls.
    pub task_lists: AtomicU64,
    /// A task reads SUCCEEDED from this poll on (1-based; earlier polls read
    /// RUNNING; before its first poll it is PENDING). [`start`] sets 2.
    pub task_polls_to_succeed: AtomicU64,
    /// Path and query of every request received, any route, in order.
    pub paths: Mutex<Vec<String>>,
    /// Headers of every task submit, in order.
    pub task_headers: Mutex<Vec<HeaderMap>>,
    /// Bodies of every task submit, in order.
    pub task_bodies: Mutex<Vec<Value>>,
    /// The next task submitted ends FAILED instead of SUCCEEDED.
    fail_next_task: AtomicBool,
    tasks: Mutex<Vec<tasks::Task>>,
    pub upload_policy_calls: AtomicU64,
    pub oss_uploads: AtomicU64,
    /// Units billed: Σ total_usage of the ONE-PEACE 200 answers given, plus
    /// the tokens of every other 200 (text: total_tokens; multimodal
    /// family: input_tokens; compatible: total_tokens) and of every batch
    /// task once, when it succeeds.
    pub billed_units: AtomicU64,
    /// Latency added to every embedding answer, in ms.
    pub latency_ms: AtomicU64,
    /// Answers carry float32 values of full precision, about 19 characters
    /// each in JSON (~30 KB per 1536-float vector, like DashScope's own),
    /// instead of short exact ones (~16 KB); see [`full_precision_embedding_for`].
    pub full_precision: AtomicBool,
    faults: Mutex<VecDeque<Fault>>,
    /// Headers of every synchronous embedding call (all routes), in order.
    pub headers: Mutex<Vec<HeaderMap>>,
    /// Bodies of every synchronous embedding call (all routes), in order.
    pub bodies: Mutex<Vec<Value>>,
    /// Query strings of every upload-policy call, in order.
    pub upload_queries: Mutex<Vec<String>>,
    /// Headers of every upload-policy call, in order.
    pub upload_headers: Mutex<Vec<HeaderMap>>,
    /// `Authorization` value accepted; `None` accepts any.
    api_key: Option<String>,
    addr: Mutex<Option<SocketAddr>>,
}

impl FakeState {
    /// Queues faults for the next embedding calls, one per call.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(faults);
    }

    pub fn calls(&self) -> u64 {
        self.embedding_calls.load(Ordering::SeqCst)
    }

    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }

    pub fn last_body(&self) -> Option<Value> {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }

    /// The next task submitted ends `FAILED` (with `code` and `message`)
    /// on the poll that would have made it SUCCEEDED.
    pub fn fail_next_task(&self) {
        self.fail_next_task.store(true, Ordering::SeqCst);
    }

    /// Paths (with query) of every request received so far.
    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads a counter (`&fake.text_calls` etc.).
    pub fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// Starts the fake on `listener`; it runs until the runtime stops.
pub fn start(listener: TcpListener, api_key: Option<String>) -> Arc<FakeState> {
    let state = Arc::new(FakeState {
        api_key,
        task_polls_to_succeed: AtomicU64::new(2),
        ..FakeState::default()
    });
    if let Ok(a) = listener.local_addr() {
        *state.addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let s = s.clone();
                    async move { handle(s, req).await.map(Cut::serve) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    state
}

/// The deterministic embedding of a request body: same contents, same vector.
pub fn embedding_for(contents: &Value, dimension: usize) -> Vec<f32> {
    let seed = Sha256::digest(contents.to_string().as_bytes());
    let mut out = Vec::with_capacity(dimension);
    let mut block = Sha256::digest(seed);
    let mut i = 0;
    while out.len() < dimension {
        if i == 32 {
            block = Sha256::digest(block);
            i = 0;
        }
        // Exact float32 values in [-0.5, 0.5), like DashScope's.
        out.push((f32::from(block[i]) - 128.0) / 256.0);
        i += 1;
    }
    out
}

/// Like [`embedding_for`], with 24 random bits in every value: printed as
/// JSON they take as many digits as DashScope's float32 vectors do.
pub fn full_precision_embedding_for(contents: &Value, dimension: usize) -> Vec<f32> {
    let seed = Sha256::digest(contents.to_string().as_bytes());
    let mut out = Vec::with_capacity(dimension);
    let mut block = Sha256::digest(seed);
    let mut i = 0;
    while out.len() < dimension {
        if i + 3 > 32 {
            block = Sha256::digest(block);
            i = 0;
        }
        let bits = u32::from_be_bytes([0, block[i], block[i + 1], block[i + 2]]);
        // Exact in float32: 24 significant bits.
        out.push((bits as f32) / 16_777_216.0 - 0.5);
        i += 3;
    }
    out
}

/// The multimodal path (ONE-PEACE and the family).
pub const MULTIMODAL_PATH: &str =
    "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding";
/// The text path (sync, and async batch submits with `X-DashScope-Async`).
pub const TEXT_PATH: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
/// The OpenAI-compatible embeddings path.
pub const COMPAT_PATH: &str = "/compatible-mode/v1/embeddings";

pub(crate) type Answer = Result<Response<Full<Bytes>>, Infallible>;

/// A JSON object written in the order given (DashScope's field order),
/// whatever serde_json's map ordering is.
pub(crate) struct Obj(String);

impl Obj {
    pub(crate) fn new() -> Obj {
        Obj(String::from("{"))
    }

    /// Adds `key: value`. Vectors go through `json!` like ONE-PEACE's
    /// (float32 widened to f64, printed shortest).
    pub(crate) fn put(self, key: &str, value: Value) -> Obj {
        self.raw(key, &value.to_string())
    }

    /// Adds `key: raw`, `raw` being JSON text already.
    pub(crate) fn raw(mut self, key: &str, raw: &str) -> Obj {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0
            .push_str(&serde_json::to_string(key).unwrap_or_default());
        self.0.push(':');
        self.0.push_str(raw);
        self
    }

    pub(crate) fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A JSON array of JSON texts.
pub(crate) fn array_of(items: &[String]) -> String {
    format!("[{}]", items.join(","))
}

pub(crate) fn reply_raw(status: u16, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

pub(crate) fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Which error shape a route answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    DashScope,
    OpenAi,
}

/// A synchronous embedding call, received and recorded.
pub(crate) struct Received {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
    /// The fault scripted for this call, if any (Status, Drop, Delay and
    /// CutBody are already acted on).
    pub(crate) fault: Option<Fault>,
}

/// Counts and records a synchronous embedding call, then acts on its fault
/// (if any), the latency, and the key, as ONE-PEACE always did: `Err` is the
/// answer already decided.
pub(crate) async fn receive(
    s: &FakeState,
    req: Request<Incoming>,
    route_counter: &AtomicU64,
    items_of: fn(&Value) -> u64,
    shape: Shape,
) -> Result<Received, Answer> {
    s.embedding_calls.fetch_add(1, Ordering::SeqCst);
    route_counter.fetch_add(1, Ordering::SeqCst);
    let headers = req.headers().clone();
    s.headers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(headers.clone());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.items.fetch_add(items_of(&v), Ordering::SeqCst);
    s.bodies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(v.clone());
    let fault = s
        .faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    let latency = s.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Some(answer) = act_on_fault(&fault, shape).await {
        return Err(answer);
    }
    if !authorized(s, &headers) {
        return Err(unauthorized(shape));
    }
    Ok(Received {
        headers,
        body: v,
        fault,
    })
}

/// Status, Drop, Delay and CutBody: what every route does with them before
/// looking at the request. `Some` is the answer to give.
pub(crate) async fn act_on_fault(fault: &Option<Fault>, shape: Shape) -> Option<Answer> {
    match fault {
        Some(Fault::Status(status, code)) => Some(match shape {
            Shape::DashScope => error(*status, code, "injected by the fake"),
            Shape::OpenAi => compat::oai_error(
                *status,
                compat::oai_code(*status, code),
                "injected by the fake",
            ),
        }),
        Some(Fault::Drop) => {
            // Never answer; the gateway's timeout or the connection drop handles it.
            std::future::pending::<()>().await;
            None
        }
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(*d).await;
            None
        }
        Some(Fault::CutBody) => {
            // A length the body never reaches, and the connection broken
            // off after the first bytes ([`Cut`]).
            let mut r = Response::new(Full::new(Bytes::from_static(CUT_PREFIX)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r.headers_mut()
                .insert("content-length", HeaderValue::from_static("100000"));
            r.extensions_mut().insert(CutMark);
            Some(Ok(r))
        }
        _ => None,
    }
}

/// Marks an answer to break off after its first bytes (`Fault::CutBody`).
#[derive(Clone, Copy)]
struct CutMark;

/// An answer's body as served: whole, or (marked [`CutMark`]) its bytes
/// sent and flushed, then an error, on which hyper drops the connection.
/// A body that only ends short of its length is not enough: hyper then
/// keeps the connection open, and the client waits for the rest.
enum Cut {
    Whole(Full<Bytes>),
    /// The bytes to send, then whether the flush has had its turn.
    Cut(Option<Bytes>, bool),
}

/// What a cut answer sends before it is broken off.
const CUT_PREFIX: &[u8] = b"{\"output\":";

impl Cut {
    fn serve(r: Response<Full<Bytes>>) -> Response<Cut> {
        let cut = r.extensions().get::<CutMark>().is_some();
        r.map(|full| match cut {
            true => Cut::Cut(Some(Bytes::from_static(CUT_PREFIX)), false),
            false => Cut::Whole(full),
        })
    }
}

impl hyper::body::Body for Cut {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            Cut::Whole(full) => std::pin::Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Cut::Cut(bytes, flushed) => {
                if let Some(b) = bytes.take() {
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(b))));
                }
                if !*flushed {
                    // Pending once, so hyper writes out what it has.
                    *flushed = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(std::io::Error::other("answer cut by the fake"))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Cut::Whole(full) => full.is_end_stream(),
            Cut::Cut(..) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Cut::Whole(full) => full.size_hint(),
            Cut::Cut(..) => hyper::body::SizeHint::default(),
        }
    }
}

pub(crate) fn unauthorized(shape: Shape) -> Answer {
    match shape {
        Shape::DashScope => error(401, "InvalidApiKey", "Invalid API-key provided."),
        Shape::OpenAi => compat::oai_error(401, "invalid_api_key", "Incorrect API key provided. "),
    }
}

fn reply(status: u16, body: Value) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

pub(crate) fn error(
    status: u16,
    code: &str,
    message: &str,
) -> Result<Response<Full<Bytes>>, Infallible> {
    reply(
        status,
        json!({"code": code, "message": message, "request_id": uuid::Uuid::new_v4().to_string()}),
    )
}

async fn handle(
    s: Arc<FakeState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    s.paths.lock().unwrap_or_else(|p| p.into_inner()).push(
        req.uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| path.clone()),
    );
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, MULTIMODAL_PATH) => embed(s, req).await,
        (Method::POST, TEXT_PATH) => {
            let is_async = req
                .headers()
                .get("x-dashscope-async")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("enable"));
            if is_async {
                tasks::submit(s, req).await
            } else {
                text::embed(s, req).await
            }
        }
        (Method::POST, COMPAT_PATH) => compat::embed(s, req).await,
        (Method::GET, "/api/v1/tasks") => tasks::list(s, req),
        (m, p) if p.starts_with("/api/v1/tasks/") => {
            let rest = &p["/api/v1/tasks/".len()..];
            match (m, rest.strip_suffix("/cancel")) {
                (Method::POST, Some(id)) if !id.contains('/') => tasks::cancel(s, req, id),
                (Method::GET, None) if !rest.contains('/') => tasks::poll(s, req, rest),
                _ => error(404, "NotFound", "no such path in the fake"),
            }
        }
        (Method::GET, p) if p.starts_with("/results/") => tasks::result_file(s, p),
        (Method::GET, "/api/v1/uploads") => {
            s.upload_policy_calls.fetch_add(1, Ordering::SeqCst);
            s.upload_queries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(req.uri().query().unwrap_or("").to_string());
            s.upload_headers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(req.headers().clone());
            if !authorized(&s, req.headers()) {
                return error(401, "InvalidApiKey", "Invalid API-key provided.");
            }
            let host = s
                .addr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|a| format!("http://{a}/oss"))
                .unwrap_or_default();
            reply(
                200,
                json!({
                    "request_id": uuid::Uuid::new_v4().to_string(),
                    "data": {
                        "policy": "ZmFrZS1wb2xpY3k=",
                        "signature": "fake-signature",
                        "upload_dir": "dashscope-instant/fake/2026-11-24/abc",
                        "upload_host": host,
                        "expire_in_seconds": 300,
                        "max_file_size_mb": 100,
                        "capacity_limit_mb": 999999,
                        "oss_access_key_id": "fake-access-key",
                        "x_oss_object_acl": "private",
                        "x_oss_forbid_overwrite": "true"
                    }
                }),
            )
        }
        (Method::POST, "/oss") => {
            let _ = req.into_body().collect().await;
            s.oss_uploads.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::OK;
            Ok(r)
        }
        _ => error(404, "NotFound", "no such path in the fake"),
    }
}

pub(crate) fn authorized(s: &FakeState, h: &HeaderMap) -> bool {
    match &s.api_key {
        None => true,
        Some(k) => h
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {k}")),
    }
}

fn contents_len(v: &Value) -> u64 {
    v.pointer("/input/contents")
        .and_then(Value::as_array)
        .map_or(0, |a| a.len() as u64)
}

/// The multimodal path: ONE-PEACE here, the rest of the family in
/// [`multimodal`].
async fn embed(s: Arc<FakeState>, req: Request<Incoming>) -> Answer {
    let r = match receive(&s, req, &s.multimodal_calls, contents_len, Shape::DashScope).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let (headers, v, fault) = (r.headers, r.body, r.fault);
    let model = v.get("model").and_then(Value::as_str).unwrap_or("");
    if model != "multimodal-embedding-one-peace-v1" {
        return match multimodal::model(model) {
            Some(m) => multimodal::embed(&s, m, &headers, &v, fault),
            None => error(400, "InvalidParameter", "Model not exist."),
        };
    }
    let Some(contents) = v.pointer("/input/contents").and_then(Value::as_array) else {
        return error(400, "InvalidParameter", "input.contents is required");
    };
    let resolve = headers
        .get("x-dashscope-ossresourceresolve")
        .and_then(|h| h.to_str().ok())
        == Some("enable");
    let (mut text, mut image, mut audio) = (0u64, 0u64, 0u64);
    for item in contents {
        for (k, val) in item.as_object().into_iter().flatten() {
            let sval = val.as_str().unwrap_or("");
            if sval.starts_with("oss://") && !resolve {
                return error(
                    400,
                    "InvalidParameter",
                    "oss:// resources need X-DashScope-OssResourceResolve: enable",
                );
            }
            if sval.contains("unreachable") {
                return error(400, "InvalidURL", "Invalid URL provided in your request.");
            }
            match k.as_str() {
                "text" => text += 1,
                "image" => image += 1,
                "audio" => audio += 1,
                _ => {}
            }
        }
    }
    let rid = uuid::Uuid::new_v4().to_string();
    match fault {
        Some(Fault::CodeOn200) => {
            return reply(
                200,
                json!({"code": "InternalError.Algo", "message": "injected", "request_id": rid}),
            )
        }
        Some(Fault::BadEmbedding) => {
            return reply(
                200,
                json!({"output": {"embedding": [0.1, 0.2]}, "usage": {"total_usage": 1}, "request_id": rid}),
            )
        }
        _ => {}
    }
    if matches!(fault, Some(Fault::WrongUsage)) {
        text += 1;
    }
    let mut usage = serde_json::Map::new();
    if text > 0 {
        usage.insert("text".into(), json!({"measure": text, "weight": 1}));
    }
    if image > 0 {
        usage.insert("image".into(), json!({"measure": image, "weight": 1}));
    }
    if audio > 0 {
        usage.insert("audio".into(), json!({"measure": audio, "weight": 2}));
    }
    let total = text + image + 2 * audio;
    usage.insert("total_usage".into(), json!(total));
    s.billed_units.fetch_add(total, Ordering::SeqCst);
    let dimension = v
        .pointer("/parameters/dimension")
        .and_then(Value::as_u64)
        .unwrap_or(1536) as usize;
    let contents = Value::Array(contents.clone());
    let embedding = if s.full_precision.load(Ordering::SeqCst) {
        full_precision_embedding_for(&contents, dimension)
    } else {
        embedding_for(&contents, dimension)
    };
    reply(
        200,
        json!({
            "output": {"embedding": embedding},
            "usage": usage,
            "request_id": rid,
        }),
    )
}
