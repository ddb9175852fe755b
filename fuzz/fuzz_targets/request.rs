//! A request body through the parser, the cache key and the upstream body;
//! the invariants are `embedgate::fuzzing::request`'s.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    embedgate::fuzzing::request(body);
});
