//! Batch text embedding (`text-embedding-async-v1/v2`): the submit
//! (`POST …/text-embedding` with `X-DashScope-Async: enable`) and the task
//! routes (`GET /api/v1/tasks/{id}`, `POST /api/v1/tasks/{id}/cancel`,
//! `GET /api/v1/tasks`), passed through with the company key, never cached.
//!
//! Every task upstream runs under the company's one account, so the
//! gateway keeps who created which task: a task id belongs to the tenant
//! whose submit returned it. Another tenant asking for it gets 404, never
//! upstream's answer; the list shows a tenant its own tasks only. A task's
//! usage (`usage.total_tokens`, on the poll that first says `SUCCEEDED`) is
//! metered once per task, whatever the number of polls or replicas, and
//! across restarts: the owner record carries a "metered" mark set
//! atomically before the usage is journaled (state Redis, or without Redis
//! an embedded SQLite file next to the ledger's).

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::app::App;
use crate::auth::tenant_of;
use crate::body::{full, Body, ReqBody};
use crate::config::ModelApi;
use crate::embeddings::read_request;
use crate::error::GatewayError;
use crate::forwarded::ForwardedHeaders;
use crate::metering::{CacheStatus, Reconciled, Usage};
use crate::redis_store::RedisStore;
use crate::request::Modality;
use crate::request_id;
use crate::tenants::Tenant;
use crate::upstream::{upstream_error, TASKS_PATH, TEXT_EMBEDDING_PATH};

/// Owner records outlive any task DashScope keeps (results expire in days).
const TASK_TTL_SECS: u64 = 90 * 24 * 3600;
/// Task ids are UUIDs; anything longer or odd is not one.
const MAX_TASK_ID: usize = 128;

/// Who owns which task, and whether its usage was metered.
pub(crate) enum TaskStore {
    Redis(Arc<RedisStore>),
    Sqlite(Mutex<Connection>),
}

/// A task's owner record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) tenant: String,
    pub(crate) model: String,
}

fn store_err(e: impl std::fmt::Display) -> GatewayError {
    tracing::warn!(error = %e, "task store error");
    GatewayError::StoreUnavailable
}

impl TaskStore {
    /// The state Redis when there is one, else `tasks.sqlite3` beside the
    /// ledger's database.
    pub(crate) fn open(
        redis: Option<Arc<RedisStore>>,
        ledger_sqlite: &Path,
    ) -> Result<TaskStore, String> {
        if let Some(r) = redis {
            return Ok(TaskStore::Redis(r));
        }
        let path = ledger_sqlite.with_file_name("tasks.sqlite3");
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("{}: cannot create its directory: {e}", path.display()))?;
        }
        let conn = Connection::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS tasks (
               id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL,
               metered INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL);",
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TaskStore::Sqlite(Mutex::new(conn)))
    }

    fn key(id: &str) -> String {
        format!("eg:task:{id}")
    }

    pub(crate) async fn record(&self, id: &str, owner: &Owner) -> Result<(), GatewayError> {
        match self {
            TaskStore::Redis(r) => {
                let key = Self::key(id);
                let (t, m) = (owner.tenant.clone(), owner.model.clone());
                r.call("task_record", true, |mut c| async move {
                    redis::pipe()
                        .atomic()
                        .cmd("HSET")
                        .arg(&key)
                        .arg("tenant")
                        .arg(t)
                        .arg("model")
                        .arg(m)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(TASK_TTL_SECS)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .map_err(store_err)
            }
            TaskStore::Sqlite(db) => {
                let conn = db.lock().unwrap_or_else(|p| p.into_inner());
                conn.execute(
                    "INSERT OR IGNORE INTO tasks (id, tenant, model, created) VALUES (?1, ?2, ?3, strftime('%s','now'))",
                    params![id, owner.tenant, owner.model],
                )
                .map(|_| ())
                .map_err(store_err)
            }
        }
    }

    pub(crate) async fn owner(&self, id: &str) -> Result<Option<Owner>, GatewayError> {
        match self {
            TaskStore::Redis(r) => {
                let key = Self::key(id);
                let got: (Option<String>, Option<String>) = r
                    .call("task_owner", true, |mut c| async move {
                        redis::cmd("HMGET")
                            .arg(&key)
                            .arg("tenant")
                            .arg("model")
                            .query_async(&mut c)
                            .await
                    })
                    .await
                    .map_err(store_err)?;
                Ok(match got {
                    (Some(tenant), Some(model)) => Some(Owner { tenant, model }),
                    _ => None,
                })
            }
            TaskStore::Sqlite(db) => {
                let conn = db.lock().unwrap_or_else(|p| p.into_inner());
                conn.query_row(
                    "SELECT tenant, model FROM tasks WHERE id = ?1",
                    params![id],
                    |r| {
                        Ok(Owner {
                            tenant: r.get(0)?,
                            model: r.get(1)?,
                        })
                    },
                )
                .optional()
                .map_err(store_err)
            }
        }
    }

    /// True the first time it is called for `id`, on any replica.
    pub(crate) async fn mark_metered(&self, id: &str) -> Result<bool, GatewayError> {
        match self {
            TaskStore::Redis(r) => {
                let key = Self::key(id);
                r.call("task_metered", true, |mut c| async move {
                    redis::cmd("HSETNX")
                        .arg(&key)
                        .arg("metered")
                        .arg(1)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await
                .map(|n| n == 1)
                .map_err(store_err)
            }
            TaskStore::Sqlite(db) => {
                let conn = db.lock().unwrap_or_else(|p| p.into_inner());
                conn.execute(
                    "UPDATE tasks SET metered = 1 WHERE id = ?1 AND metered = 0",
                    params![id],
                )
                .map(|n| n == 1)
                .map_err(store_err)
            }
        }
    }
}

/// A JSON answer passed through from upstream, its status kept.
fn pass(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `POST …/text-embedding` with `X-DashScope-Async: enable`.
pub(crate) async fn submit(
    app: Arc<App>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, Infallible> {
    let request_id = request_id::of(&req);
    let result = async {
        let tenant = tenant_of(&req)?;
        let (_, mut forwarded, body) = read_request(&app, req).await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            GatewayError::InvalidParameter(format!("request body is not valid JSON: {e}"))
        })?;
        let model = v["model"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| GatewayError::InvalidParameter("model is required (a string)".into()))?;
        let spec = app
            .config
            .models
            .get(&model)
            .ok_or_else(|| GatewayError::ModelNotFound(model.clone()))?;
        if spec.api != ModelApi::Batch {
            return Err(GatewayError::InvalidParameter(format!(
                "model `{model}` does not take asynchronous calls (X-DashScope-Async); batch models: text-embedding-async-v1, text-embedding-async-v2"
            )));
        }
        if !tenant.may_use(&model) {
            return Err(GatewayError::ModelNotAllowed(model));
        }
        // A batch's size is known only when it succeeds; a spent quota
        // refuses new batches.
        if let Some(q) = tenant.quota {
            if app.limits.remaining(&tenant.name, q) == 0 {
                return Err(GatewayError::QuotaExceeded);
            }
        }
        if v["input"]["url"].as_str().is_none_or(|u| u.is_empty()) {
            return Err(GatewayError::InvalidParameter(
                "input.url is required: the URL of the file of texts".into(),
            ));
        }
        forwarded.dashscope_async = Some(HeaderValue::from_static("enable"));
        let resp = app
            .upstream
            .send_via(
                spec.upstream_base_url.as_ref(),
                Method::POST,
                TEXT_EMBEDDING_PATH,
                &forwarded,
                tenant.workspace.as_deref(),
                body,
            )
            .await
            // A submit is not billed; its task's usage is, when it succeeds.
            .result?;
        if resp.status != StatusCode::OK {
            return Err(upstream_error(&resp));
        }
        let answer: Value = serde_json::from_slice(&resp.body)
            .map_err(|e| GatewayError::BadGateway(format!("task submit answer is not JSON: {e}")))?;
        let id = answer["output"]["task_id"]
            .as_str()
            .filter(|id| valid_id(id))
            .ok_or_else(|| GatewayError::BadGateway("task submit answer without a task_id".into()))?;
        // Recorded before the client learns the id: it can never poll a
        // task the gateway does not know is its own.
        app.tasks
            .record(
                id,
                &Owner {
                    tenant: tenant.name.to_string(),
                    model: model.clone(),
                },
            )
            .await?;
        Ok(pass(StatusCode::OK, resp.body))
    }
    .await;
    Ok(result.unwrap_or_else(|e| e.into_response(&request_id, false)))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `GET /api/v1/tasks/{id}`, `POST /api/v1/tasks/{id}/cancel`, `GET /api/v1/tasks`.
pub(crate) async fn serve(
    app: Arc<App>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, Infallible> {
    crate::response::from_head(req, |head| async move { task_route(&app, &head).await }).await
}

async fn task_route(
    app: &App,
    head: &http::request::Parts,
) -> Result<Response<Body>, GatewayError> {
    let tenant = head
        .extensions
        .get::<Arc<Tenant>>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("no tenant on an authenticated route".into()))?;
    let forwarded = ForwardedHeaders::from_client(&head.headers)?;
    let rest = head.uri.path().strip_prefix(TASKS_PATH).unwrap_or("");
    match (&head.method, rest.trim_end_matches('/')) {
        (&Method::GET, "") => list(app, &tenant, head.uri.query(), &forwarded).await,
        (&Method::GET, one) => match one.strip_prefix('/') {
            Some(id) if valid_id(id) => poll(app, &tenant, id, &forwarded).await,
            _ => Err(GatewayError::NotFound),
        },
        (&Method::POST, one) => match one
            .strip_prefix('/')
            .and_then(|s| s.strip_suffix("/cancel"))
        {
            Some(id) if valid_id(id) => {
                owned(app, &tenant, id).await?;
                let resp = app
                    .upstream
                    .send(
                        Method::POST,
                        &format!("{TASKS_PATH}/{id}/cancel"),
                        &forwarded,
                        tenant.workspace.as_deref(),
                        Bytes::new(),
                    )
                    .await
                    .result?;
                Ok(pass(resp.status, resp.body))
            }
            _ => Err(GatewayError::NotFound),
        },
        _ => Err(GatewayError::MethodNotAllowed),
    }
}

/// The task's owner record if `tenant` owns it; 404 otherwise (whether
/// the task exists for someone else is not told).
async fn owned(app: &App, tenant: &Tenant, id: &str) -> Result<Owner, GatewayError> {
    match app.tasks.owner(id).await? {
        Some(o) if *o.tenant == *tenant.name => Ok(o),
        _ => Err(GatewayError::NotFound),
    }
}

async fn poll(
    app: &App,
    tenant: &Arc<Tenant>,
    id: &str,
    forwarded: &ForwardedHeaders,
) -> Result<Response<Body>, GatewayError> {
    let owner = owned(app, tenant, id).await?;
    let base = app
        .config
        .models
        .get(&owner.model)
        .and_then(|m| m.upstream_base_url.clone());
    let resp = app
        .upstream
        .send_via(
            base.as_ref(),
            Method::GET,
            &format!("{TASKS_PATH}/{id}"),
            forwarded,
            tenant.workspace.as_deref(),
            Bytes::new(),
        )
        .await
        .result?;
    if resp.status == StatusCode::OK {
        if let Ok(v) = serde_json::from_slice::<Value>(&resp.body) {
            if v["output"]["task_status"] == "SUCCEEDED" {
                meter_once(app, tenant, id, &owner, &v).await;
            }
        }
    }
    Ok(pass(resp.status, resp.body))
}

/// Meters a succeeded task's usage the first time any replica sees it.
async fn meter_once(app: &App, tenant: &Arc<Tenant>, id: &str, owner: &Owner, v: &Value) {
    let Some(tokens) = v["usage"]["total_tokens"].as_u64() else {
        app.metrics
            .usage_mismatch
            .with_label_values(&[&*tenant.name, owner.model.as_str()])
            .inc();
        tracing::warn!(tenant = %tenant.name, task_id = id, "a succeeded task without usage.total_tokens; not metered");
        return;
    };
    match app.tasks.mark_metered(id).await {
        Ok(true) => {
            let mut u = Usage::default();
            u.items.add(Modality::Text, 1);
            u.units.add(Modality::Text, tokens);
            let r = Reconciled {
                record: u,
                computed: u,
                upstream: true,
                mismatch: false,
            };
            app.meter(&tenant.name, &owner.model, CacheStatus::Miss, &r)
                .await;
            if let Some(q) = tenant.quota {
                // Spent after the fact: a batch's size is known only now.
                if let Ok(res) = app.limits.reserve(&tenant.name, q, 0).await {
                    app.limits.settle(res, tokens).await;
                }
            }
        }
        Ok(false) => {}
        Err(e) => {
            // Polled again later, it is metered then.
            tracing::warn!(tenant = %tenant.name, task_id = id, error = %e, "cannot mark a task metered; will meter on a later poll");
        }
    }
}

/// The upstream list, filtered to the tenant's own tasks.
async fn list(
    app: &App,
    tenant: &Arc<Tenant>,
    query: Option<&str>,
    forwarded: &ForwardedHeaders,
) -> Result<Response<Body>, GatewayError> {
    let mut path = TASKS_PATH.to_string();
    if let Some(q) = query {
        // Rebuilt from parsed pairs: only the documented filters go through.
        let kept: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
            .filter(|(k, _)| {
                matches!(
                    k.as_ref(),
                    "page_no"
                        | "page_size"
                        | "start_time"
                        | "end_time"
                        | "model_name"
                        | "status"
                        | "region"
                )
            })
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if !kept.is_empty() {
            path.push('?');
            path.push_str(
                &form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(kept)
                    .finish(),
            );
        }
    }
    let resp = app
        .upstream
        .send(
            Method::GET,
            &path,
            forwarded,
            tenant.workspace.as_deref(),
            Bytes::new(),
        )
        .await
        .result?;
    if resp.status != StatusCode::OK {
        return Err(upstream_error(&resp));
    }
    let mut v: Value = serde_json::from_slice(&resp.body)
        .map_err(|e| GatewayError::BadGateway(format!("task list answer is not JSON: {e}")))?;
    // Captured answers list under `data`; the 2.x SDK reads `tasks`.
    let key = if v.get("data").is_some_and(Value::is_array) {
        "data"
    } else {
        "tasks"
    };
    if let Some(data) = v.get_mut(key).and_then(Value::as_array_mut) {
        let mut mine = Vec::new();
        for t in data.drain(..) {
            let id = t["task_id"].as_str().unwrap_or("");
            if valid_id(id) && owned(app, tenant, id).await.is_ok() {
                mine.push(t);
            }
        }
        let n = mine.len();
        *data = mine;
        // Totals describe what this tenant sees.
        if let Some(obj) = v.as_object_mut() {
            obj.insert("total".into(), Value::from(n));
            if obj.contains_key("total_page") {
                obj.insert("total_page".into(), Value::from(1));
            }
        }
    }
    Ok(pass(StatusCode::OK, Bytes::from(v.to_string())))
}
