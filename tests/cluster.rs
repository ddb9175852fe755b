//! The gateway on a real three-node Redis Cluster: cache, quota and ledger
//! keys of one tenant share a hash slot, so its Lua scripts run atomically.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Cluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for p in &ports {
            let node_dir = dir.path().join(p.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            children.push(
                Command::new("redis-server")
                    .args([
                        "--port",
                        &p.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--save",
                        "",
                        "--dir",
                        node_dir.to_str().unwrap(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        let cluster = Cluster {
            ports,
            children,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        for p in &cluster.ports {
            while redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .is_err()
            {
                assert!(Instant::now() < deadline, "cluster node {p} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &cluster.ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not converge");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_quota_and_ledger_on_redis_cluster() {
    let cluster = Cluster::start();
    let gw = TestGateway::builder()
        .tenant("search", "k-search")
        .quota(5, Per::Day)
        .rate(0.001, 100)
        .set("cache", format!("redis_url = \"{}\"", cluster.urls()))
        .set("cache", "redis_cluster = true")
        .set("cache", "memory_max_bytes = 0")
        .start()
        .await;
    eventually(10, "redis cluster up", async || {
        let r = gw.get("/readyz", None).await;
        (r.json()["redis"] == "up").then_some(())
    })
    .await;

    // Cache: the second request is served from Redis (no L1) without upstream.
    let b = body(&[("text", "cluster"), ("audio", "https://x/a.wav")]);
    assert_eq!(gw.embed("k-search", &b).await.cache(), "MISS");
    let hit = gw.embed("k-search", &b).await;
    assert_eq!(hit.status, 200, "{}", hit.text);
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);

    // Quota (5 units): 3 used above; two 1-unit misses fit, the third does not.
    assert_eq!(gw.embed("k-search", &text_body("q1")).await.status, 200);
    assert_eq!(gw.embed("k-search", &text_body("q2")).await.status, 200);
    let refused = gw.embed("k-search", &text_body("q3")).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "Throttling.AllocationQuota");
    assert_eq!(gw.fake.calls(), 3);

    // Ledger: the rows reach the cluster.
    let today = today();
    let path = format!("/admin/usage?from={today}&to={today}&tenant=search");
    let rows = eventually(10, "ledger rows in the cluster", async || {
        let r = gw.get(&path, Some(ADMIN_TOKEN)).await;
        let v = r.json();
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        let units: u64 = rows.iter().map(|r| r["units"].as_u64().unwrap()).sum();
        (units == 3 + 3 + 2).then_some(rows)
    })
    .await;
    let miss_text: u64 = rows
        .iter()
        .filter(|r| r["modality"] == "text" && r["cache"] == "miss")
        .map(|r| r["items"].as_u64().unwrap())
        .sum();
    assert_eq!(miss_text, 3);
}
