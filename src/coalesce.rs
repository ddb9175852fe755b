//! Identical misses in flight at the same time make one upstream call.
//!
//! The first request for a key becomes the leader; later ones wait for the
//! leader's outcome. A follower served by the leader's success is a hit (no
//! upstream call was made for it). If the leader fails or is dropped, its
//! followers are told so and each tries again on its own, so one tenant's
//! failure (say, its quota) never becomes another's answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::cache_key::CacheKey;
use crate::error::GatewayError;

/// What the leader tells its followers.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The embedding JSON: followers answer it as a hit.
    Done(Bytes),
    /// Upstream refused the request itself (same input, same answer):
    /// followers answer the same error without calling again.
    Failed(GatewayError),
    /// The leader failed for its own reasons (its quota, its cancellation):
    /// followers try again themselves.
    Retry,
}

pub(crate) type Slot = Option<Outcome>;

#[derive(Default)]
pub(crate) struct Coalescer {
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<Slot>>>,
}

pub(crate) enum Role {
    Leader(LeaderGuard),
    Follower(watch::Receiver<Slot>),
}

/// Held by the leader; dropping it without [`LeaderGuard::finish`] tells the
/// followers the leader failed.
pub(crate) struct LeaderGuard {
    key: CacheKey,
    tx: watch::Sender<Slot>,
    owner: Arc<Coalescer>,
    /// The entry is out of the table (by [`LeaderGuard::finish`]); a new
    /// leader's entry for the same key may be there now.
    left: bool,
}

impl Coalescer {
    pub(crate) fn join(self: &Arc<Self>, key: CacheKey) -> Role {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = map.get(&key) {
            return Role::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key, rx);
        Role::Leader(LeaderGuard {
            key,
            tx,
            owner: self.clone(),
            left: false,
        })
    }

    /// Requests currently leading a call.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inflight.lock().map(|m| m.len()).unwrap_or(0)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LeaderGuard {
    /// Leaves the table, then publishes the leader's result to the
    /// followers. Leaving first drops the table's own receiver, so a call
    /// nobody followed (almost every one) wakes nobody.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.leave();
        self.left = true;
        let _ = self.tx.send(Some(outcome));
    }

    fn leave(&self) {
        let mut map = self
            .owner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&self.key);
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        self.leave();
        // A leader dropped mid-call (its task was cancelled) counts as failed.
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(Outcome::Retry);
                true
            } else {
                false
            }
        });
    }
}

/// Waits for the leader's outcome.
pub(crate) async fn wait(mut rx: watch::Receiver<Slot>) -> Outcome {
    loop {
        if let Some(outcome) = rx.borrow_and_update().clone() {
            return outcome;
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone().unwrap_or(Outcome::Retry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        let models = vec!["m".to_string()];
        let body = format!(r#"{{"model":"m","input":{{"contents":[{{"text":"{n}"}}]}}}}"#);
        let req = crate::request::EmbeddingRequest::parse(
            body.as_bytes(),
            &crate::request::ParseRules::for_tests(&models),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        crate::cache_key::cache_key(
            crate::cache_key::KeyScope::Shared,
            None,
            &req,
            &crate::forwarded::ForwardedHeaders::default(),
        )
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer() {
        let c = Arc::new(Coalescer::default());
        let Role::Leader(lead) = c.join(key(1)) else {
            panic!("first must lead")
        };
        let Role::Follower(f1) = c.join(key(1)) else {
            panic!("second must follow")
        };
        let Role::Leader(_other) = c.join(key(2)) else {
            panic!("other key leads")
        };
        let waiter = tokio::spawn(wait(f1));
        lead.finish(Outcome::Done(Bytes::from_static(b"[1]")));
        assert!(matches!(waiter.await, Ok(Outcome::Done(b)) if &b[..] == b"[1]"));
        // The entry is gone: the next request leads again.
        assert!(matches!(c.join(key(1)), Role::Leader(_)));
    }

    #[test]
    fn a_finished_leader_leaves_the_next_ones_entry() {
        let c = Arc::new(Coalescer::default());
        let Role::Leader(first) = c.join(key(4)) else {
            panic!("first must lead")
        };
        let Role::Follower(f) = c.join(key(4)) else {
            panic!("second must follow")
        };
        first.finish(Outcome::Done(Bytes::from_static(b"[4]")));
        assert!(matches!(f.borrow().clone(), Some(Outcome::Done(_))));
        let Role::Leader(next) = c.join(key(4)) else {
            panic!("after the finish, the next one leads")
        };
        assert_eq!(c.len(), 1);
        assert!(matches!(c.join(key(4)), Role::Follower(_)));
        drop(next);
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn dropped_leader_releases_followers() {
        let c = Arc::new(Coalescer::default());
        let Role::Leader(lead) = c.join(key(3)) else {
            panic!("first must lead")
        };
        let Role::Follower(f) = c.join(key(3)) else {
            panic!("second must follow")
        };
        drop(lead);
        assert!(matches!(wait(f).await, Outcome::Retry));
        assert!(c.is_empty());
    }
}
