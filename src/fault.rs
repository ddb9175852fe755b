//! Injected faults, for the tests that prove a panic in a request leaks
//! nothing (quota reservations, coalescing slots, in-flight counts). Only
//! in debug builds, which is what `cargo test` runs; release builds compile
//! these points to nothing.

use crate::request::EmbeddingRequest;
#[cfg(debug_assertions)]
use crate::request::Modality;

/// The environment variable naming a text item whose miss panics right
/// after its quota is reserved.
#[cfg(debug_assertions)]
const PANIC_ON_TEXT: &str = "EMBEDGATE_TEST_PANIC_ON_TEXT";

/// True when the request has a text item equal to
/// `$EMBEDGATE_TEST_PANIC_ON_TEXT` (debug builds only): its miss then
/// panics right after the quota is reserved.
#[cfg(debug_assertions)]
pub(crate) fn wanted(req: &EmbeddingRequest) -> bool {
    std::env::var(PANIC_ON_TEXT).is_ok_and(|trigger| {
        req.items
            .iter()
            .any(|i| i.modality == Modality::Text && i.content == trigger)
    })
}

#[cfg(not(debug_assertions))]
pub(crate) fn wanted(_: &EmbeddingRequest) -> bool {
    false
}

/// The injected panic.
#[allow(clippy::panic)] // the whole point: an injected fault
pub(crate) fn panic_now() {
    panic!("injected fault (EMBEDGATE_TEST_PANIC_ON_TEXT)");
}
