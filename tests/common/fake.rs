//! The fake upstream: the `fake-dashscope` crate, in this process.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fake_dashscope::FakeState;
use http::HeaderMap;
use serde_json::Value;

use super::{Fault, UPSTREAM_KEY};

/// The fake DashScope on a port of its own, in this process. Cloning shares it.
#[derive(Clone)]
pub struct Fake {
    pub state: Arc<FakeState>,
    pub addr: SocketAddr,
}

impl Fake {
    /// Starts a fake that accepts only [`UPSTREAM_KEY`].
    pub async fn start() -> Fake {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = fake_dashscope::start(l, Some(UPSTREAM_KEY.to_string()));
        Fake { state, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Embedding calls received (every attempt).
    pub fn calls(&self) -> u64 {
        self.state.calls()
    }

    /// Scripts the answers to the next embedding calls, one fault per call.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.push_faults(faults);
    }

    /// Latency added to every embedding answer from now on.
    pub fn set_latency_ms(&self, ms: u64) {
        self.state.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Answers with full-precision floats (~30 KB per vector, like
    /// DashScope's) instead of short exact ones (~16 KB).
    pub fn set_full_precision(&self, on: bool) {
        self.state.full_precision.store(on, Ordering::SeqCst);
    }

    /// Units billed: Σ total_usage of the 200 answers given.
    pub fn billed_units(&self) -> u64 {
        self.state.billed_units.load(Ordering::SeqCst)
    }

    pub fn upload_policy_calls(&self) -> u64 {
        self.state.upload_policy_calls.load(Ordering::SeqCst)
    }

    /// Query strings of every upload-policy call, in order.
    pub fn upload_queries(&self) -> Vec<String> {
        self.state.upload_queries.lock().unwrap().clone()
    }

    /// Headers of every upload-policy call, in order.
    pub fn upload_headers(&self) -> Vec<HeaderMap> {
        self.state.upload_headers.lock().unwrap().clone()
    }

    pub fn oss_uploads(&self) -> u64 {
        self.state.oss_uploads.load(Ordering::SeqCst)
    }

    /// Bodies of every embedding call, in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }

    /// Headers of every embedding call, in order.
    pub fn headers(&self) -> Vec<HeaderMap> {
        self.state.headers.lock().unwrap().clone()
    }

    pub fn last_body(&self) -> Option<Value> {
        self.state.last_body()
    }

    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.state.last_headers()
    }
}
