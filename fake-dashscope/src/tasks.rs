//! Asynchronous batch text embedding: the submit (text path with
//! `X-DashScope-Async: enable`), `GET /api/v1/tasks/{id}`,
//! `POST /api/v1/tasks/{id}/cancel`, `GET /api/v1/tasks`, and the result
//! file `GET /results/{id}.txt` (the fake's stand-in for a signed OSS URL:
//! no key needed, like one).
//!
//! A task is PENDING until its first poll; then each poll advances it: it
//! reads RUNNING (with `task_metrics`) until the poll numbered
//! `task_polls_to_succeed` (default 2), from which on it reads SUCCEEDED
//! with `usage.total_tokens` = 10 + the URL's UTF-8 length, billed once.
//! Tasks are scoped to the `Authorization` that created them: another key
//! reads UNKNOWN, as for an id that does not exist.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};

use crate::text::ASYNC_MODELS;
use crate::vectors::item_embedding_with;
use crate::{
    act_on_fault, authorized, error, new_request_id, reply_raw, unauthorized, Answer, FakeState,
    Obj, Shape,
};

/// The dimension of the batch models' vectors.
const BATCH_DIMENSION: usize = 1536;

pub(crate) struct Task {
    id: String,
    model: String,
    url: String,
    params: Value,
    owner: Option<String>,
    status: &'static str,
    polls: u64,
    submit_time: String,
    scheduled_time: Option<String>,
    end_time: Option<String>,
    fail: bool,
}

impl Task {
    /// Rows the fake pretends the file has: 1 to 4, from the URL.
    fn rows(&self) -> usize {
        1 + self.url.len() % 4
    }

    fn tokens(&self) -> u64 {
        batch_tokens(&self.url)
    }
}

/// The tokens a batch task over `url` reports (and bills) when it succeeds.
pub fn batch_tokens(url: &str) -> u64 {
    10 + url.len() as u64
}

fn owner(h: &HeaderMap) -> Option<String> {
    h.get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// UTC now as DashScope prints task times: `2024-03-01 17:38:24.817`.
fn now_string() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

pub(crate) async fn submit(s: Arc<FakeState>, req: Request<Incoming>) -> Answer {
    s.task_submits.fetch_add(1, Ordering::SeqCst);
    let headers = req.headers().clone();
    s.task_headers
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
    s.task_bodies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(v.clone());
    let fault = s
        .faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    if let Some(answer) = act_on_fault(&fault, Shape::DashScope).await {
        return answer;
    }
    if !authorized(&s, &headers) {
        return unauthorized(Shape::DashScope);
    }
    let model = v.get("model").and_then(Value::as_str).unwrap_or("");
    if !ASYNC_MODELS.contains(&model) {
        if crate::text::model(model).is_some() {
            return error(
                403,
                "AccessDenied",
                "current user api does not support asynchronous calls",
            );
        }
        return error(400, "InvalidParameter", "Model not exist.");
    }
    let Some(url) = v
        .pointer("/input/url")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    else {
        return error(400, "InvalidParameter", "input.url is required");
    };
    let params = v.get("parameters").cloned().unwrap_or_else(|| json!({}));
    match params.get("text_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "query" || t == "document" => {}
        Some(other) => {
            return error(
                400,
                "InvalidParameter",
                &format!(
                    "The text_type parameter is invalid ({other}): it should be query or document."
                ),
            )
        }
    }
    let task = Task {
        id: uuid::Uuid::new_v4().to_string(),
        model: model.to_string(),
        url: url.to_string(),
        params,
        owner: owner(&headers),
        status: "PENDING",
        polls: 0,
        submit_time: now_string(),
        scheduled_time: None,
        end_time: None,
        fail: s.fail_next_task.swap(false, Ordering::SeqCst),
    };
    let body = Obj::new()
        .put(
            "output",
            json!({"task_status": "PENDING", "task_id": task.id}),
        )
        .put("request_id", json!(new_request_id()))
        .done();
    s.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    reply_raw(200, body)
}

fn result_url(s: &FakeState, id: &str) -> String {
    let base = s
        .addr
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    format!("{base}/results/{id}.txt")
}

/// The task's `output` object as a GET answers it.
fn output_of(s: &FakeState, t: &Task) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("task_id".into(), json!(t.id));
    o.insert("task_status".into(), json!(t.status));
    o.insert("submit_time".into(), json!(t.submit_time));
    if let Some(st) = &t.scheduled_time {
        o.insert("scheduled_time".into(), json!(st));
    }
    if let Some(et) = &t.end_time {
        o.insert("end_time".into(), json!(et));
    }
    match t.status {
        "RUNNING" => {
            o.insert(
                "task_metrics".into(),
                json!({"TOTAL": t.rows(), "SUCCEEDED": 0, "FAILED": 0}),
            );
        }
        "SUCCEEDED" => {
            o.insert("url".into(), json!(result_url(s, &t.id)));
        }
        "FAILED" => {
            o.insert("code".into(), json!("InvalidFile.DownloadFailed"));
            o.insert(
                "message".into(),
                json!("The fake was told to fail this task."),
            );
        }
        _ => {}
    }
    Value::Object(o)
}

pub(crate) fn poll(s: Arc<FakeState>, req: Request<Incoming>, id: &str) -> Answer {
    s.task_polls.fetch_add(1, Ordering::SeqCst);
    if !authorized(&s, req.headers()) {
        return unauthorized(Shape::DashScope);
    }
    let who = owner(req.headers());
    let rid = new_request_id();
    let to_succeed = s.task_polls_to_succeed.load(Ordering::SeqCst);
    let mut tasks = s.tasks.lock().unwrap_or_else(|p| p.into_inner());
    let Some(t) = tasks.iter_mut().find(|t| t.id == id && t.owner == who) else {
        return reply_raw(
            200,
            Obj::new()
                .put("request_id", json!(rid))
                .put("output", json!({"task_id": id, "task_status": "UNKNOWN"}))
                .done(),
        );
    };
    if matches!(t.status, "PENDING" | "RUNNING") {
        t.polls += 1;
        if t.scheduled_time.is_none() {
            t.scheduled_time = Some(now_string());
        }
        if t.polls >= to_succeed {
            t.end_time = Some(now_string());
            if t.fail {
                t.status = "FAILED";
            } else {
                t.status = "SUCCEEDED";
                s.billed_units.fetch_add(t.tokens(), Ordering::SeqCst);
            }
        } else {
            t.status = "RUNNING";
        }
    }
    let mut body = Obj::new()
        .put("request_id", json!(rid))
        .put("output", output_of(&s, t));
    if t.status == "SUCCEEDED" {
        body = body.put("usage", json!({"total_tokens": t.tokens()}));
    }
    reply_raw(200, body.done())
}

pub(crate) fn cancel(s: Arc<FakeState>, req: Request<Incoming>, id: &str) -> Answer {
    s.task_cancels.fetch_add(1, Ordering::SeqCst);
    if !authorized(&s, req.headers()) {
        return unauthorized(Shape::DashScope);
    }
    let who = owner(req.headers());
    let mut tasks = s.tasks.lock().unwrap_or_else(|p| p.into_inner());
    match tasks
        .iter_mut()
        .find(|t| t.id == id && t.owner == who && t.status == "PENDING")
    {
        Some(t) => {
            t.status = "CANCELED";
            t.end_time = Some(now_string());
            reply_raw(200, json!({"request_id": new_request_id()}).to_string())
        }
        None => error(
            400,
            "UnsupportedOperation",
            "Failed to cancel the task, please confirm if the task is in PENDING status.",
        ),
    }
}

pub(crate) fn list(s: Arc<FakeState>, req: Request<Incoming>) -> Answer {
    s.task_lists.fetch_add(1, Ordering::SeqCst);
    if !authorized(&s, req.headers()) {
        return unauthorized(Shape::DashScope);
    }
    let who = owner(req.headers());
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.replace('+', " ")))
        })
        .collect();
    let q = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let page_no = q("page_no")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1);
    let page_size = q("page_size")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(10);
    let status = q("status");
    let model_name = q("model_name");
    let tasks = s.tasks.lock().unwrap_or_else(|p| p.into_inner());
    // Newest first.
    let mine: Vec<&Task> = tasks
        .iter()
        .rev()
        .filter(|t| t.owner == who)
        .filter(|t| status.is_none_or(|st| st == t.status))
        .filter(|t| model_name.is_none_or(|m| m == t.model))
        .collect();
    let total = mine.len();
    let data: Vec<Value> = mine
        .iter()
        .skip((page_no - 1) * page_size)
        .take(page_size)
        .map(|t| {
            let mut o = serde_json::Map::new();
            o.insert("task_id".into(), json!(t.id));
            o.insert("task_status".into(), json!(t.status));
            o.insert("model_name".into(), json!(t.model));
            o.insert("submit_time".into(), json!(t.submit_time));
            if let Some(et) = &t.end_time {
                o.insert("end_time".into(), json!(et));
            }
            Value::Object(o)
        })
        .collect();
    let body = Obj::new()
        .put("request_id", json!(new_request_id()))
        .put("data", json!(data))
        .put("page_no", json!(page_no))
        .put("page_size", json!(page_size))
        .put("total", json!(total))
        .put("total_page", json!(total.div_ceil(page_size)))
        .done();
    reply_raw(200, body)
}

/// `GET /results/{id}.txt`: one JSON line per row of a SUCCEEDED task.
pub(crate) fn result_file(s: Arc<FakeState>, path: &str) -> Answer {
    let id = path
        .strip_prefix("/results/")
        .and_then(|p| p.strip_suffix(".txt"))
        .unwrap_or("");
    let tasks = s.tasks.lock().unwrap_or_else(|p| p.into_inner());
    let Some(t) = tasks.iter().find(|t| t.id == id && t.status == "SUCCEEDED") else {
        return error(404, "NotFound", "no such result in the fake");
    };
    let full = s.full_precision.load(Ordering::SeqCst);
    let rows = t.rows();
    let per_row = t.tokens() / rows as u64;
    let mut out = String::new();
    for i in 0..rows {
        let tokens = if i + 1 == rows {
            t.tokens() - per_row * (rows as u64 - 1)
        } else {
            per_row
        };
        let text = format!("{}#{i}", t.url);
        let v = item_embedding_with(&t.model, "text", &text, &t.params, BATCH_DIMENSION, full);
        out.push_str(
            &json!({"output": {"code": 200, "text_index": i, "embedding": v}, "usage": {"total_tokens": tokens}})
                .to_string(),
        );
        out.push('\n');
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(r)
}
