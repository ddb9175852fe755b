//! Every route of the DashScope embedding family driven by the official
//! SDKs (tests/sdk/drive_family.py; `dashscope` and `openai` pinned in
//! scripts/sdk-venv.sh): first against the in-process fake directly (this
//! validates the driver and the fake), then through the real gateway
//! binary. The venv is made once under the cargo target dir; without PyPI
//! these tests fail, unless `EMBEDGATE_SKIP_SDK=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use fake_dashscope::{batch_tokens, fusion_embedding, item_embedding, text_tokens, FakeState};
use serde_json::{json, Value};

const TENANT_A: &str = "sk-tenant-family-a";
const TENANT_B: &str = "sk-tenant-family-b";

// What drive_family.py sends (keep in step with it).
const IMAGE: &str = "https://dashscope.oss-cn-beijing.aliyuncs.com/images/256_1.png";
const TEXTS5: [&str; 5] = [
    "the first text",
    "a second one",
    "三番目",
    "fourth",
    "and a fifth, longer text",
];
const BATCH_URL_1X: &str = "https://example.com/embedgate/batch-1x.txt";
const BATCH_URL_2X: &str = "https://example.com/embedgate/batch-2x.txt";
const MM_TEXT: &str = "a red bicycle leaning on a wall";

const ALL_CASES: [&str; 12] = [
    "text_1x",
    "text_2x",
    "text_async",
    "mm_v1",
    "mm_plus",
    "mm_2x",
    "mm_fusion",
    "batch_1x",
    "batch_2x",
    "oai_default",
    "oai_float",
    "oai_notfound",
];

async fn python() -> Option<PathBuf> {
    sdk_python_or_skip().await
}

/// Runs tests/sdk/drive_family.py with `cases` against `base` (the host
/// root) with `key`; returns one JSON line per case, in order. `ctx` is
/// added to failure messages (e.g. the gateway's log).
async fn drive(
    py: &Path,
    base: &str,
    key: &str,
    env: &[(&str, &str)],
    cases: &[&str],
    ctx: &dyn Fn() -> String,
) -> Vec<Value> {
    let mut cmd = sdk_command(py, "drive_family.py");
    cmd.args(cases).env("BASE", base).env("KEY", key);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("cannot run the venv python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect();
    assert!(
        out.status.success() && lines.len() == cases.len(),
        "drive_family.py failed or printed {} lines for {} cases\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        lines.len(),
        cases.len(),
        ctx()
    );
    for (l, case) in lines.iter().zip(cases) {
        assert_eq!(l["case"], *case);
        println!("sdk: {}", short(l));
        if let Some(tb) = l["error"].as_str() {
            println!("{tb}");
        }
    }
    lines
}

/// A line with its vectors shortened to their lengths, for logs.
fn short(l: &Value) -> String {
    let mut l = l.clone();
    if let Some(vs) = l.get_mut("vectors").and_then(Value::as_array_mut) {
        for v in vs.iter_mut() {
            *v = json!(format!("<{} floats>", v.as_array().map_or(0, Vec::len)));
        }
    }
    if let Some(h) = l.get_mut("headers") {
        *h = json!({"x-cache": h.get("x-cache")});
    }
    l.to_string()
}

fn vectors(l: &Value) -> Vec<Vec<f32>> {
    l["vectors"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap_or(&Vec::new())
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                .collect()
        })
        .collect()
}

/// What a check found wrong, or nothing.
type Check = Result<(), String>;

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Check {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn ok_line(l: &Value) -> Check {
    // The traceback's last line names the exception (the whole one is in
    // the `sdk:` log line printed by `drive`).
    ensure(l["ok"] == true, || {
        let tb = l["error"].as_str().unwrap_or("");
        format!("raised {}", tb.trim_end().lines().last().unwrap_or(""))
    })
}

/// A text/multimodal answer: 200, these vectors, indices 0.., types, usage.
fn check_embeddings(l: &Value, want: &[Vec<f32>], types: Option<&[&str]>, usage: &Value) -> Check {
    ok_line(l)?;
    ensure(l["status_code"] == 200, || {
        format!("status {}: {}", l["status_code"], short(l))
    })?;
    let got = vectors(l);
    ensure(got.len() == want.len(), || {
        format!("{} vectors, want {}: {}", got.len(), want.len(), short(l))
    })?;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        ensure(g == w, || {
            format!(
                "vector {i} differs from fake_dashscope::item_embedding ({} vs {} floats, first {:?} vs {:?})",
                g.len(),
                w.len(),
                g.first(),
                w.first()
            )
        })?;
    }
    let idx: Vec<u64> = (0..want.len() as u64).collect();
    ensure(l["indices"] == json!(idx), || {
        format!("indices {}", l["indices"])
    })?;
    if let Some(t) = types {
        ensure(l["types"] == json!(t), || format!("types {}", l["types"]))?;
    }
    // 2.x fills in absent usage fields with 0: compare the wire's keys only.
    for (k, v) in usage.as_object().unwrap() {
        ensure(&l["usage"][k] == v, || {
            format!(
                "usage.{k} = {}, want {v} (usage {})",
                l["usage"][k], l["usage"]
            )
        })?;
    }
    Ok(())
}

fn text_vectors(model: &str, texts: &[&str], params: &Value, dim: usize) -> Vec<Vec<f32>> {
    texts
        .iter()
        .map(|t| item_embedding(model, "text", t, params, dim))
        .collect()
}

fn tokens(texts: &[&str]) -> u64 {
    texts.iter().map(|t| text_tokens(t)).sum()
}

/// The checks of each case's first run, shared by both tests.
fn check_case(l: &Value) -> Check {
    let case = l["case"].as_str().unwrap_or("");
    let mm_usage =
        json!({"input_tokens": text_tokens(MM_TEXT) + 256, "image_tokens": 256, "image_count": 1});
    match case {
        "text_1x" => check_embeddings(
            l,
            &text_vectors(
                "text-embedding-v4",
                &TEXTS5,
                &json!({"text_type": "query"}),
                512,
            ),
            None,
            &json!({"total_tokens": tokens(&TEXTS5)}),
        ),
        "text_2x" => {
            let t = ["client two", "second of two"];
            check_embeddings(
                l,
                &text_vectors("text-embedding-v4", &t, &json!({}), 256),
                None,
                &json!({"total_tokens": tokens(&t)}),
            )
        }
        "text_async" => {
            let t = ["async one", "async two"];
            check_embeddings(
                l,
                &text_vectors("text-embedding-v3", &t, &json!({}), 1024),
                None,
                &json!({"total_tokens": tokens(&t)}),
            )
        }
        "mm_v1" => {
            let m = "multimodal-embedding-v1";
            check_embeddings(
                l,
                &[
                    item_embedding(m, "text", MM_TEXT, &json!({}), 1024),
                    item_embedding(m, "image", IMAGE, &json!({}), 1024),
                ],
                Some(&["text", "image"]),
                &mm_usage,
            )
        }
        "mm_plus" => {
            let m = "tongyi-embedding-vision-plus";
            check_embeddings(
                l,
                &[
                    item_embedding(m, "image", IMAGE, &json!({}), 512),
                    item_embedding(m, "text", MM_TEXT, &json!({}), 512),
                ],
                Some(&["image", "text"]),
                &mm_usage,
            )
        }
        "mm_2x" => {
            let m = "tongyi-embedding-vision-flash";
            check_embeddings(
                l,
                &[
                    item_embedding(m, "text", "flash text", &json!({}), 256),
                    item_embedding(m, "image", IMAGE, &json!({}), 256),
                ],
                Some(&["text", "image"]),
                &json!({"input_tokens": text_tokens("flash text") + 256, "image_tokens": 256, "image_count": 1}),
            )
        }
        "mm_fusion" => {
            let contents = json!([{"text": "fused text"}, {"image": IMAGE}]);
            check_embeddings(
                l,
                &[fusion_embedding(
                    "qwen3-vl-embedding",
                    &contents,
                    &json!({}),
                    1024,
                )],
                Some(&["fusion"]),
                &json!({"input_tokens": text_tokens("fused text") + 256, "image_tokens": 256, "image_count": 1}),
            )
        }
        "batch_1x" => {
            ok_line(l)?;
            let id = &l["submitted"]["task_id"];
            ensure(l["submitted"]["task_status"] == "PENDING", || {
                format!("submitted {}", l["submitted"])
            })?;
            ensure(id.as_str().is_some_and(|s| !s.is_empty()), || {
                format!("no task id: {}", l["submitted"])
            })?;
            ensure(
                &l["fetched"]["task_id"] == id && l["fetched"]["task_status"] == "RUNNING",
                || format!("fetched {}", l["fetched"]),
            )?;
            ensure(l["waited"]["task_status"] == "SUCCEEDED", || {
                format!("waited {}", l["waited"])
            })?;
            ensure(
                l["waited"]["usage"]["total_tokens"] == batch_tokens(BATCH_URL_1X),
                || format!("batch usage not visible: {}", l["waited"]),
            )?;
            ensure(l["waited"]["url"].is_string(), || {
                format!("no result url: {}", l["waited"])
            })?;
            ensure(l["cancel_status"] == 200, || {
                format!("cancel: {} {}", l["cancel_status"], l["cancel_code"])
            })?;
            ensure(l["after_cancel"]["task_status"] == "CANCELED", || {
                format!("after cancel {}", l["after_cancel"])
            })?;
            ensure(l["list_status"] == 200, || {
                format!("list status {}", l["list_status"])
            })?;
            let ids = l["list_ids"].as_array().cloned().unwrap_or_default();
            ensure(ids.contains(id) && ids.contains(&l["canceled_id"]), || {
                format!("list {} lacks {id} / {}", l["list_ids"], l["canceled_id"])
            })
        }
        "batch_2x" => {
            ok_line(l)?;
            ensure(l["created"]["status"] == "PENDING", || {
                format!("created {}", l["created"])
            })?;
            ensure(l["fetched"]["status"] == "RUNNING", || {
                format!("fetched {}", l["fetched"])
            })?;
            ensure(l["waited"]["status"] == "SUCCEEDED", || {
                format!("waited {}", l["waited"])
            })?;
            ensure(
                l["waited"]["usage"]["total_tokens"] == batch_tokens(BATCH_URL_2X),
                || format!("batch usage not visible: {}", l["waited"]),
            )?;
            ensure(l["waited"]["result_url"].is_string(), || {
                format!("no result url: {}", l["waited"])
            })?;
            ensure(l["list_total"].as_u64().unwrap_or(0) >= 1, || {
                format!("list total {}", l["list_total"])
            })
        }
        "oai_default" | "oai_float" => {
            ok_line(l)?;
            let t = ["compat one", "compat two"];
            check_embeddings(
                l,
                &text_vectors("text-embedding-v4", &t, &json!({}), 512),
                None,
                &json!({"prompt_tokens": tokens(&t), "total_tokens": tokens(&t)}),
            )?;
            ensure(l["model"] == "text-embedding-v4", || {
                format!("model {}", l["model"])
            })
        }
        "oai_notfound" => {
            ok_line(l)?;
            ensure(
                l["exception"] == "NotFoundError" && l["status_code"] == 404,
                || format!("want NotFoundError 404: {}", short(l)),
            )
        }
        other => Err(format!("no checks for case {other}")),
    }
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

/// Bodies the fake received on the compatible route, in order.
fn compat_bodies(s: &FakeState) -> Vec<Value> {
    s.bodies
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b.get("dimensions").is_some())
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_family_against_the_fake_directly() {
    let Some(py) = python().await else {
        return;
    };
    let fake = Fake::start().await;
    let s = &fake.state;
    let base = fake.url();
    let none = || String::new();
    let lines = drive(&py, &base, UPSTREAM_KEY, &[], &ALL_CASES, &none).await;
    let failures: Vec<String> = lines
        .iter()
        .filter_map(|l| check_case(l).err().map(|e| format!("{}: {e}", l["case"])))
        .collect();
    assert!(
        failures.is_empty(),
        "cases failed against the fake:\n{}",
        failures.join("\n")
    );

    // The fake saw each sync call once (no cache here): 3 text, 4
    // multimodal, 3 compatible.
    assert_eq!(count(&s.text_calls), 3);
    assert_eq!(count(&s.multimodal_calls), 4);
    assert_eq!(count(&s.compat_calls), 3);
    assert_eq!(count(&s.embedding_calls), 10);
    assert_eq!(count(&s.items), 5 + 2 + 2 + 2 + 2 + 2 + 2 + 2 + 2 + 1);
    assert_eq!(count(&s.task_submits), 3);
    assert_eq!(count(&s.task_cancels), 1);
    assert_eq!(count(&s.task_lists), 2);
    // The openai SDK asks for base64 unless told otherwise; both decode to
    // the same floats (checked above).
    let compat = compat_bodies(s);
    assert_eq!(compat.len(), 2, "{compat:?}");
    assert_eq!(compat[0]["encoding_format"], "base64");
    assert_eq!(compat[1]["encoding_format"], "float");
    // Billed: the batch tasks' tokens are in.
    assert!(count(&s.billed_units) > batch_tokens(BATCH_URL_1X) + batch_tokens(BATCH_URL_2X));
    // The 2.x JobList reads `tasks`; the fake lists under `data` (as the
    // reference says), so 2.x sees the total but no entries.
    let b2 = lines.iter().find(|l| l["case"] == "batch_2x").unwrap();
    assert_eq!(b2["list_total"], 3, "{b2}");

    // Another key is refused by the fake itself (it accepts one key only).
    let task = lines[7]["submitted"]["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = drive(
        &py,
        &base,
        UPSTREAM_KEY,
        &[("OTHER_KEY", "sk-not-the-fake-key"), ("TASK_ID", &task)],
        &["fetch_other"],
        &none,
    )
    .await;
    assert_eq!(other[0]["status_code"], 401, "{}", other[0]);
    assert_eq!(
        other[0]["v2"]["exception"], "AuthenticationError",
        "{}",
        other[0]
    );

    // No cache in front of the fake: the same call reaches it again.
    let again = drive(&py, &base, UPSTREAM_KEY, &[], &["text_1x"], &none).await;
    check_case(&again[0]).unwrap();
    assert_eq!(count(&s.embedding_calls), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_family_through_the_gateway() {
    let Some(py) = python().await else {
        return;
    };
    let gw = TestGateway::builder()
        .tenant("family-a", TENANT_A)
        .tenant("family-b", TENANT_B)
        .start()
        .await;
    let s = gw.fake.state.clone();
    let base = gw.url("");
    let ctx = || format!("gateway log:\n{}", gw.logs());
    let mut failures: Vec<String> = Vec::new();

    let lines = drive(&py, &base, TENANT_A, &[], &ALL_CASES, &ctx).await;
    for l in &lines {
        if let Err(e) = check_case(l) {
            failures.push(format!("{}: {e}", l["case"]));
        }
    }
    let compat = compat_bodies(&s);
    if compat.iter().any(|b| b["encoding_format"] == "base64") {
        failures.push(format!(
            "oai_default: the gateway forwarded encoding_format=base64 upstream (it should ask for floats and re-encode): {compat:?}"
        ));
    }

    // Repeated identical calls: served from the cache (no new upstream
    // call), X-Cache: HIT; the float call after the base64 one is a hit too.
    let calls = count(&s.embedding_calls);
    let again = drive(
        &py,
        &base,
        TENANT_A,
        &[],
        &["text_1x", "mm_v1", "text_2x", "oai_float"],
        &ctx,
    )
    .await;
    for l in &again {
        let case = l["case"].as_str().unwrap();
        match check_case(l) {
            Err(e) => failures.push(format!("{case} (repeated): {e}")),
            Ok(()) => {
                if l["headers"]["x-cache"] != "HIT" {
                    failures.push(format!(
                        "{case} (repeated): X-Cache {} instead of HIT",
                        l["headers"]["x-cache"]
                    ));
                }
            }
        }
    }
    let new_calls = count(&s.embedding_calls) - calls;
    if new_calls != 0 {
        failures.push(format!(
            "repeated calls reached upstream {new_calls} times (want 0: all cached)"
        ));
    }

    // Tenant B cannot read tenant A's task: 404.
    if let Some(task) = lines[7]["submitted"]["task_id"].as_str() {
        let other = drive(
            &py,
            &base,
            TENANT_A,
            &[("OTHER_KEY", TENANT_B), ("TASK_ID", task)],
            &["fetch_other"],
            &ctx,
        )
        .await;
        let o = &other[0];
        if o["ok"] != true || o["status_code"] != 404 || o["v2"]["status_code"] != 404 {
            failures.push(format!(
                "fetch_other: tenant B reading tenant A's task should get 404 (1.x and 2.x): {o}"
            ));
        }
    } else {
        failures.push("fetch_other: batch_1x gave no task id to try".into());
    }

    // Upstream only ever saw the company key.
    for h in s
        .headers
        .lock()
        .unwrap()
        .iter()
        .chain(s.task_headers.lock().unwrap().iter())
    {
        let auth = h
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        if auth.as_deref() != Some(&*format!("Bearer {UPSTREAM_KEY}")) {
            failures.push("a call reached upstream without the company key".into());
            break;
        }
    }

    assert!(
        failures.is_empty(),
        "{} problem(s) through the gateway (a 404 from the gateway on a route means that route is not implemented yet):\n{}\nupstream paths: {:?}\n{}",
        failures.len(),
        failures.join("\n"),
        s.paths(),
        ctx()
    );
}
