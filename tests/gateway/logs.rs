//! Logs never hold up a request: a stderr nobody reads costs log lines
//! (counted), not answers; refusals at full rate are logged at a bounded
//! rate, while the metrics count every one.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// The gateway's budget of full access lines per second for each kind of
/// refusal (`REFUSAL_LINES_PER_SECOND` in `src/access_log.rs`).
const REFUSAL_LINES_PER_SECOND: usize = 10;

/// Runs `f(0)`, …, `f(n - 1)` on `workers` concurrent tasks, failing if
/// they are not all answered within `deadline`; the answers in order.
async fn flood<F, Fut>(n: usize, workers: usize, deadline: Duration, f: F) -> Vec<Reply>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (f, next, done) = (f.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return out;
                }
                out.push((i, f(i).await));
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let all = async {
        let mut out = Vec::new();
        for t in tasks {
            out.extend(t.await.unwrap());
        }
        out
    };
    let mut out = match tokio::time::timeout(deadline, all).await {
        Ok(out) => out,
        Err(_) => panic!(
            "only {} of {n} requests answered within {deadline:?}",
            done.load(Ordering::SeqCst)
        ),
    };
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_costs_log_lines_not_answers() {
    // A small queue, so that the lines of 1,000 API requests overflow it
    // and the 64 KiB pipe behind it; the default is 8,192 lines.
    let gw = one_tenant()
        .stderr_unread()
        .env("EMBEDGATE_LOG_QUEUE", "256")
        .start()
        .await;
    let gw = Arc::new(gw);
    let body = text_body("logs: a hit");
    assert_eq!(gw.embed(K1, &body).await.cache(), "MISS");
    let started = Instant::now();
    let replies = {
        let gw = gw.clone();
        flood(2000, 8, Duration::from_secs(60), move |i| {
            let (gw, body) = (gw.clone(), body.clone());
            async move {
                if i % 2 == 0 {
                    gw.get("/healthz", None).await
                } else {
                    gw.embed(K1, &body).await
                }
            }
        })
        .await
    };
    let took = started.elapsed();
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
        if i % 2 == 1 {
            assert_eq!(r.cache(), "HIT", "request {i}");
        }
    }
    // The log writer is stuck on the pipe, so lines were dropped and
    // counted; the gateway still answers.
    let m = gw.metrics().await;
    let dropped = metric(&m, "embedgate_log_lines_dropped_total", &[]);
    assert!(dropped > 0.0, "no dropped log lines:\n{m}");
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("cache", "hit"),
                ("code", "ok")
            ]
        ),
        1000.0
    );
    assert_eq!(gw.get("/healthz", None).await.status, 200);
    println!("2000 requests in {took:?} with stderr unread; {dropped} log lines dropped");
}

/// (full access lines, Σ suppressed in summary lines) for answers with
/// this status.
fn refusal_lines(logs: &str, status: u64) -> (usize, u64) {
    let mut full = 0;
    let mut suppressed = 0;
    for line in logs.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["target"] != "embedgate::access" || v["status"] != status {
            continue;
        }
        match v["suppressed"].as_u64() {
            Some(n) => {
                let msg = v["message"].as_str().unwrap_or("");
                assert!(msg.starts_with(&format!("suppressed {n} ")), "{line}");
                suppressed += n;
            }
            None => {
                assert_eq!(v["message"], "request", "{line}");
                full += 1;
            }
        }
    }
    (full, suppressed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_at_full_rate_are_logged_at_a_bounded_rate_and_all_counted() {
    const EACH: usize = 600;
    let gw = one_tenant()
        .tenant("ads", K2)
        .rate(0.001, 1)
        .set("server", "max_in_flight = 1")
        .set("upstream", "timeout = \"60s\"")
        .start()
        .await;
    let gw = Arc::new(gw);
    let started = Instant::now();

    // 429: `ads` spends its one token, then is throttled (one client at a
    // time: with one slot, concurrent requests would be shed instead).
    assert_eq!(gw.embed(K2, &text_body("ads 0")).await.status, 200);
    let throttled = {
        let gw = gw.clone();
        flood(EACH, 1, Duration::from_secs(60), move |i| {
            let gw = gw.clone();
            async move { gw.embed(K2, &text_body(&format!("ads {i}"))).await }
        })
        .await
    };
    for r in &throttled {
        assert_error(r, 429, "Throttling.RateQuota");
    }

    // 503: one slow miss holds the only slot, so the rest are shed.
    gw.fake.set_latency_ms(30_000);
    let slow = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.embed(K1, &text_body("slow")).await })
    };
    eventually(10, "the slow miss upstream", async || {
        (gw.fake.calls() == 2).then_some(())
    })
    .await;
    let shed = {
        let gw = gw.clone();
        flood(EACH, 8, Duration::from_secs(60), move |i| {
            let gw = gw.clone();
            async move { gw.embed(K1, &text_body(&format!("shed {i}"))).await }
        })
        .await
    };
    for r in &shed {
        assert_error(r, 503, "ServiceUnavailable");
    }
    let took = started.elapsed();

    // The metrics count every refusal.
    let m = gw.metrics().await;
    let count = |tenant: &str, code: &str| {
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", tenant),
                ("model", "none"),
                ("cache", "none"),
                ("code", code),
            ],
        )
    };
    assert_eq!(count("ads", "Throttling.RateQuota"), EACH as f64);
    assert_eq!(count("search", "ServiceUnavailable"), EACH as f64);

    // The log has every refusal too, but mostly as counts in summary lines
    // (written once a second): full lines stay within the per-second budget.
    let logs = eventually(10, "the summaries of every refusal", async || {
        let logs = gw.logs();
        let (f429, s429) = refusal_lines(&logs, 429);
        let (f503, s503) = refusal_lines(&logs, 503);
        (f429 as u64 + s429 == EACH as u64 && f503 as u64 + s503 == EACH as u64).then_some(logs)
    })
    .await;
    let (f429, _) = refusal_lines(&logs, 429);
    let (f503, _) = refusal_lines(&logs, 503);
    let seconds = took.as_secs() as usize + 2;
    let bound = REFUSAL_LINES_PER_SECOND * seconds;
    for (status, full) in [(429, f429), (503, f503)] {
        assert!(
            (1..=bound).contains(&full),
            "{full} full lines of {EACH} {status} answers in {took:?} (bound {bound})"
        );
    }
    println!(
        "{} refusals in {took:?}: {f429} + {f503} full lines, the rest in summaries",
        2 * EACH
    );
    slow.abort();
}
