//! Fair-share layer: each tenant may have at most its `max_in_flight`
//! requests in flight (by default a share of `server.max_in_flight`), so
//! one team at its bound is refused with 429 `Throttling` and `Retry-After`
//! while the others keep being served. The permit is held until the answer
//! is complete (or the client goes away).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::auth::tenant_of;
use crate::body::{Body, BoxFuture, ReqBody};
use crate::error::GatewayError;
use crate::response::{self, Framing};

/// Every tenant's in-flight slots, by name. A tenant whose bound changed on
/// reload gets a new semaphore; permits of the old one drain away with the
/// requests that hold them.
#[derive(Default)]
pub(crate) struct TenantSlots {
    by_tenant: RwLock<HashMap<Arc<str>, Slots>>,
}

/// A tenant's bound and the semaphore of that size.
type Slots = (usize, Arc<Semaphore>);

impl TenantSlots {
    fn slots(&self, tenant: &Arc<str>, limit: usize) -> Arc<Semaphore> {
        {
            let map = self.by_tenant.read().unwrap_or_else(|p| p.into_inner());
            if let Some((n, s)) = map.get(tenant) {
                if *n == limit {
                    return s.clone();
                }
            }
        }
        let mut map = self.by_tenant.write().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(tenant.clone())
            .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit))));
        if entry.0 != limit {
            *entry = (limit, Arc::new(Semaphore::new(limit)));
        }
        entry.1.clone()
    }

    /// After a reload: forgets tenants no longer configured.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.by_tenant.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, _| keep(name));
    }
}

#[derive(Clone)]
pub(crate) struct FairShareLayer {
    slots: Arc<TenantSlots>,
    framing: Framing,
}

impl FairShareLayer {
    pub(crate) fn new(slots: Arc<TenantSlots>, framing: Framing) -> FairShareLayer {
        FairShareLayer { slots, framing }
    }
}

impl<S> Layer<S> for FairShareLayer {
    type Service = FairShare<S>;

    fn layer(&self, inner: S) -> FairShare<S> {
        FairShare {
            slots: self.slots.clone(),
            framing: self.framing,
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct FairShare<S> {
    slots: Arc<TenantSlots>,
    framing: Framing,
    inner: S,
}

impl<S> Service<Request<ReqBody>> for FairShare<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let tenant = match tenant_of(&req) {
            Ok(t) => t,
            Err(e) => return response::now(response::refusal(&req, e, self.framing)),
        };
        let limit = tenant.max_in_flight;
        let Ok(permit) = self.slots.slots(&tenant.name, limit).try_acquire_owned() else {
            let e = GatewayError::TenantBusy { limit };
            return response::now(response::refusal(&req, e, self.framing));
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            drop(permit);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_bound_gets_new_slots_and_the_same_bound_keeps_them() {
        let slots = TenantSlots::default();
        let t: Arc<str> = Arc::from("t");
        let a = slots.slots(&t, 2);
        assert!(Arc::ptr_eq(&a, &slots.slots(&t, 2)));
        let held = a.clone().try_acquire_many_owned(2).unwrap();
        assert!(slots.slots(&t, 2).try_acquire().is_err());
        let b = slots.slots(&t, 3);
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(b.available_permits(), 3);
        drop(held);
        slots.retain(|n| n != "t");
        assert!(!Arc::ptr_eq(&b, &slots.slots(&t, 3)));
    }
}
