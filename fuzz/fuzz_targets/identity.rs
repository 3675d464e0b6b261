//! The `identity` target: see `netwarden_fuzz::identity`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netwarden_fuzz::identity::check(data));
