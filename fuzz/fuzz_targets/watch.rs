//! The `watch` target: see `netwarden_fuzz::watch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netwarden_fuzz::watch::check(data));
