//! Config text through the loader; the invariants are
//! `embedgate::fuzzing::config`'s. Config files are UTF-8 (`load` reads
//! them with `read_to_string`), so other bytes are skipped.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(src) = std::str::from_utf8(bytes) {
        embedgate::fuzzing::config(src);
    }
});
