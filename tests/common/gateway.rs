//! The real `embedgate` binary, started on a written config; its client side.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Fake, GatewayBuilder, Reply, EMBED_PATH, UPSTREAM_KEY};

/// The real `embedgate` binary, killed on drop.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `server.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub child: Child,
    pub config_path: PathBuf,
    /// The binary's working directory (a temp dir of its own): where the
    /// default `[ledger]` paths are.
    pub work_dir: PathBuf,
    _dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
    /// The read end of the stderr pipe, held open and never read (`stderr_unread`).
    _stderr_unread: Option<ChildStderr>,
    pub client: reqwest::Client,
    /// The upstream this gateway calls.
    pub fake: Fake,
}

impl TestGateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::new()
    }

    /// Starts the binary; `Err` (its stderr) when it exits before listening.
    pub(super) fn spawn(
        config: &str,
        fake: Fake,
        metrics_line: bool,
        env: &[(String, String)],
        stderr_unread: bool,
    ) -> Result<TestGateway, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embedgate.toml");
        std::fs::write(&path, config).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = if stderr_unread {
            Stdio::piped()
        } else {
            std::fs::File::create(&stderr_path).unwrap().into()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_embedgate"))
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("EG_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
            .env("EMBEDGATE_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stderr_unread = child.stderr.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // The bound addresses, printed on stdout once listening.
        let mut read = |prefix: &str, suffix: &str| -> Result<SocketAddr, String> {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            match line
                .trim()
                .strip_prefix(prefix)
                .and_then(|l| l.strip_suffix(suffix))
            {
                Some(a) => Ok(a.parse().unwrap()),
                None => Err(format!(
                    "gateway did not start: {line:?} (want {prefix}ADDR{suffix})\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )),
            }
        };
        let started = read("embedgate listening on http://", "").and_then(|addr| {
            let metrics_addr = match metrics_line {
                true => Some(read("embedgate metrics on http://", "/metrics")?),
                false => None,
            };
            Ok((addr, metrics_addr))
        });
        let (addr, metrics_addr) = match started {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(TestGateway {
            addr,
            metrics_addr,
            child,
            config_path: path,
            work_dir: dir.path().to_path_buf(),
            _dir: dir,
            stderr_path,
            _stderr_unread: stderr_unread,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            fake,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// POSTs an embedding request body with a tenant key.
    pub async fn embed(&self, key: &str, body: &str) -> Reply {
        self.embed_with(key, body, &[]).await
    }

    pub async fn embed_with(&self, key: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .post(self.url(EMBED_PATH))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        self.get_with(path, key, &[]).await
    }

    pub async fn get_with(&self, path: &str, key: Option<&str>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.client.get(self.url(path));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    /// The `/metrics` text (from the metrics listener when there is one).
    pub async fn metrics(&self) -> String {
        match self.metrics_addr {
            None => self.get("/metrics", None).await.text,
            Some(a) => {
                let r = self
                    .client
                    .get(format!("http://{a}/metrics"))
                    .send()
                    .await
                    .unwrap();
                Reply::from(r).await.text
            }
        }
    }

    /// Sends a signal (`TERM`, `HUP`) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then waits for exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to `limit` for the exit; returns the exit
    /// code, the time from the signal to the exit (panics past `limit`) and
    /// the logs.
    pub fn terminate_within(mut self, limit: Duration) -> (Option<i32>, Duration, String) {
        let sent = Instant::now();
        self.signal("TERM");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), sent.elapsed(), self.logs());
            }
            assert!(
                sent.elapsed() < limit,
                "gateway did not exit within {limit:?} of SIGTERM\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, like a crash or the OOM killer: no shutdown, nothing
    /// flushed; waits until the process is gone.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Rewrites the config file (picked up by the file watch or SIGHUP).
    pub fn rewrite_config(&self, config: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, config).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Rewrites the config file with `builder`'s config for this gateway's fake.
    pub fn reconfigure(&self, builder: &GatewayBuilder) {
        self.rewrite_config(&builder.render(&self.fake));
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
