//! Usage events out: every metered answer as a CloudEvents 1.0 event,
//! shipped from the journal to an in-test receiver that fails, hangs and
//! drops connections at times. After it recovers, the events deduplicated
//! by id equal the ledger to the unit; a `kill -9` with events unshipped
//! loses none of them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const K1: &str = "sk-events-search-1";
const K2: &str = "sk-events-ads-2";
const TEXT_PATH: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
const TOKEN: &str = "om-token-not-in-logs";

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// 200, events recorded.
    Ok = 0,
    /// 500, nothing recorded.
    Fail = 1,
    /// Events recorded, then no answer (past the gateway's timeout): the
    /// gateway sends them again.
    Hang = 2,
    /// The connection is closed before the request is read.
    Close = 3,
}

#[derive(Default)]
struct Received {
    /// Every event as it arrived, duplicates included.
    events: Vec<Value>,
    /// Every batch's content type and authorization header.
    headers: Vec<(String, String)>,
}

struct Receiver {
    url: String,
    mode: Arc<AtomicU8>,
    got: Arc<Mutex<Received>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/v1/events", listener.local_addr().unwrap());
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let got = Arc::new(Mutex::new(Received::default()));
        let (m, g) = (mode.clone(), got.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                if m.load(Ordering::SeqCst) == Mode::Close as u8 {
                    drop(stream);
                    continue;
                }
                let (m, g) = (m.clone(), g.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (m, g) = (m.clone(), g.clone());
                            async move { Ok::<_, Infallible>(answer(req, &m, &g).await) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { url, mode, got }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn all(&self) -> Vec<Value> {
        self.got.lock().unwrap().events.clone()
    }

    /// The events by id, each once.
    fn unique(&self) -> BTreeMap<String, Value> {
        self.all()
            .into_iter()
            .map(|e| (e["id"].as_str().unwrap().to_string(), e))
            .collect()
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    mode: &AtomicU8,
    got: &Mutex<Received>,
) -> Response<Full<Bytes>> {
    let reply = |code: u16| {
        Response::builder()
            .status(code)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let m = mode.load(Ordering::SeqCst);
    if m == Mode::Fail as u8 {
        return reply(500);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let headers = (header("content-type"), header("authorization"));
    let Ok(body) = req.into_body().collect().await else {
        return reply(400);
    };
    let batch: Vec<Value> = serde_json::from_slice(&body.to_bytes()).unwrap();
    {
        let mut g = got.lock().unwrap();
        g.events.extend(batch);
        g.headers.push(headers);
    }
    if m == Mode::Hang as u8 {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    reply(200)
}

fn builder(receiver: &Receiver) -> GatewayBuilder {
    TestGateway::builder()
        .tenant("search", K1)
        .tenant("ads", K2)
        .set("events", format!("url = \"{}\"", receiver.url))
        .set("events", "source = \"test-replica\"")
        .set("events", "batch_size = 3")
        .set("events", "timeout = \"300ms\"")
        .set("events", "max_backoff = \"200ms\"")
        .set("events", "authorization_env = \"EVENTS_TOKEN\"")
        .env("EVENTS_TOKEN", TOKEN)
}

async fn text_embedding(gw: &TestGateway, key: &str, texts: &[&str]) {
    let r = gw
        .client
        .post(gw.url(TEXT_PATH))
        .header("authorization", format!("Bearer {key}"))
        .json(&json!({"model": "text-embedding-v4", "input": {"texts": texts}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Units per (tenant, model, cache, modality).
type Units = BTreeMap<(String, String, String, String), u64>;

async fn ledger_units(gw: &TestGateway) -> Units {
    let d = today();
    let r = gw
        .get(&format!("/admin/usage?from={d}&to={d}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut out = Units::new();
    for row in r.json()["rows"].as_array().unwrap() {
        let key =
            ["tenant", "model", "cache", "modality"].map(|k| row[k].as_str().unwrap().to_string());
        *out.entry(key.into()).or_default() += row["units"].as_u64().unwrap();
    }
    out.retain(|_, u| *u > 0);
    out
}

fn event_units(events: &BTreeMap<String, Value>) -> Units {
    let mut out = Units::new();
    for e in events.values() {
        let d = &e["data"];
        for (modality, units) in d["units"].as_object().unwrap() {
            let key = (
                e["subject"].as_str().unwrap().to_string(),
                d["model"].as_str().unwrap().to_string(),
                d["cache"].as_str().unwrap().to_string(),
                modality.clone(),
            );
            *out.entry(key).or_default() += units.as_u64().unwrap();
        }
    }
    out.retain(|_, u| *u > 0);
    out
}

/// A structured CloudEvents 1.0 event as the gateway documents it.
fn assert_cloudevent(e: &Value) {
    assert_eq!(e["specversion"], "1.0", "{e}");
    assert_eq!(e["type"], "embedgate.usage", "{e}");
    assert_eq!(e["source"], "embedgate/test-replica", "{e}");
    assert_eq!(e["datacontenttype"], "application/json", "{e}");
    let id = e["id"].as_str().unwrap();
    let (run, row) = id.rsplit_once('-').unwrap();
    assert!(
        run.len() == 32 && run.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(row.parse::<u64>().unwrap() >= 1, "{id}");
    assert!(
        ["search", "ads"].contains(&e["subject"].as_str().unwrap()),
        "{e}"
    );
    // RFC 3339, UTC, today.
    let time = e["time"].as_str().unwrap();
    assert!(time.starts_with(&format!("{}T", today())), "{time}");
    assert!(
        time.ends_with('Z') && time.len() == "2024-01-01T00:00:00.000Z".len(),
        "{time}"
    );
    let d = &e["data"];
    assert!(
        ["hit", "miss", "unknown"].contains(&d["cache"].as_str().unwrap()),
        "{e}"
    );
    let total: u64 = d["units"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(d["total_units"].as_u64(), Some(total), "{e}");
    assert!(total > 0, "{e}");
}

async fn backlog(gw: &TestGateway) -> f64 {
    metric(&gw.metrics().await, "embedgate_events_backlog", &[])
}

async fn failed(gw: &TestGateway) -> f64 {
    metric(&gw.metrics().await, "embedgate_events_failed_total", &[])
}

/// Waits until the gateway has failed to deliver at least once more.
async fn wait_failure(gw: &TestGateway, what: &str) {
    let before = failed(gw).await;
    eventually(20, what, async || (failed(gw).await > before).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_failing_receiver_and_equal_the_ledger_to_the_unit() {
    let receiver = Receiver::start(Mode::Ok).await;
    let gw = builder(&receiver).start().await;

    // Delivered while the receiver is up.
    assert_eq!(gw.embed(K1, &text_body("one")).await.status, 200);
    assert_eq!(gw.embed(K1, &text_body("one")).await.status, 200);
    eventually(20, "the first events", async || {
        (receiver.unique().len() == 2).then_some(())
    })
    .await;

    // 500s.
    receiver.set(Mode::Fail);
    assert_eq!(
        gw.embed(
            K2,
            &body(&[("text", "two"), ("image", "https://example.com/a.png")])
        )
        .await
        .status,
        200
    );
    text_embedding(&gw, K1, &["a", "b"]).await;
    wait_failure(&gw, "a 500 to be retried").await;
    assert!(backlog(&gw).await > 0.0);

    // Received, but answered too late: sent again.
    let before = receiver.all().len();
    receiver.set(Mode::Hang);
    for t in ["three", "four", "three"] {
        assert_eq!(gw.embed(K2, &text_body(t)).await.status, 200);
    }
    text_embedding(&gw, K1, &["a", "b"]).await;
    eventually(20, "a batch received and left unanswered", async || {
        (receiver.all().len() > before).then_some(())
    })
    .await;
    wait_failure(&gw, "a timed-out batch to be retried").await;

    // Connections closed unread.
    receiver.set(Mode::Close);
    text_embedding(&gw, K2, &["c"]).await;
    assert_eq!(gw.embed(K1, &text_body("five")).await.status, 200);
    wait_failure(&gw, "a closed connection to be retried").await;

    // Recovery: everything arrives.
    receiver.set(Mode::Ok);
    let ledger = ledger_units(&gw).await;
    assert!(ledger.len() >= 5, "{ledger:?}");
    eventually(
        30,
        "the backlog delivered and equal to the ledger",
        async || {
            let done = backlog(&gw).await == 0.0 && event_units(&receiver.unique()) == ledger;
            done.then_some(())
        },
    )
    .await;

    let unique = receiver.unique();
    assert_eq!(event_units(&unique), ledger_units(&gw).await);
    // Every answer once: 2 + 2 + 4 + 2 calls (a request of several items
    // is one call, and one event).
    assert_eq!(unique.len(), 10, "{:#?}", unique.keys());
    // Retries did send some events twice; the ids made them one.
    let all = receiver.all();
    assert!(
        all.len() > unique.len(),
        "{} events, {} ids",
        all.len(),
        unique.len()
    );
    // The same id is the same event.
    for e in &all {
        assert_eq!(&unique[e["id"].as_str().unwrap()], e);
        assert_cloudevent(e);
    }
    let caches: Vec<&str> = unique
        .values()
        .map(|e| e["data"]["cache"].as_str().unwrap())
        .collect();
    assert!(
        caches.contains(&"hit") && caches.contains(&"miss"),
        "{caches:?}"
    );
    let v4 = unique
        .values()
        .find(|e| e["data"]["model"] == "text-embedding-v4")
        .unwrap();
    assert_eq!(v4["data"]["items"]["text"], 2, "{v4}");
    // Batches carry the batch content type and the token; the token is
    // never logged.
    for (ct, auth) in &receiver.got.lock().unwrap().headers {
        assert_eq!(ct, "application/cloudevents-batch+json");
        assert_eq!(auth, &format!("Bearer {TOKEN}"));
    }
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "embedgate_events_rejected_total", &[]), 0.0);
    assert!(metric(&m, "embedgate_events_shipped_total", &[]) >= 10.0);
    assert!(!gw.logs().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_unshipped_at_a_kill_arrive_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Ok).await;
    let b = builder(&receiver).data_dir(dir.path());
    let gw = b.start().await;
    assert_eq!(gw.embed(K1, &text_body("before")).await.status, 200);
    eventually(20, "the first event", async || {
        (receiver.unique().len() == 1).then_some(())
    })
    .await;

    receiver.set(Mode::Fail);
    for t in ["x", "y", "x", "z"] {
        assert_eq!(gw.embed(K2, &text_body(t)).await.status, 200);
    }
    text_embedding(&gw, K1, &["a", "b", "c"]).await;
    wait_failure(&gw, "the receiver to refuse").await;
    let before_kill = ledger_units(&gw).await;
    assert_eq!(receiver.unique().len(), 1);
    gw.kill();

    let journal = dir.path().join("journal");
    receiver.set(Mode::Ok);
    let gw = b.start().await;
    eventually(30, "every event after the restart", async || {
        (receiver.unique().len() == 6).then_some(())
    })
    .await;
    let unique = receiver.unique();
    assert_eq!(event_units(&unique), before_kill);
    assert_eq!(event_units(&unique), ledger_units(&gw).await);
    for e in unique.values() {
        assert_cloudevent(e);
    }
    // Delivered and in the ledger, the old run's segment is deleted.
    eventually(20, "the old segment deleted", async || {
        let left: Vec<String> = std::fs::read_dir(&journal)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".jnl") || n.ends_with(".events"))
            .collect();
        let runs: std::collections::BTreeSet<&str> =
            left.iter().filter_map(|n| n.split('-').next()).collect();
        (runs.len() == 1).then_some(())
    })
    .await;
    assert_eq!(backlog(&gw).await, 0.0);
}
