//! The `manifest` target: see `netwarden_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netwarden_fuzz::manifest::check(data));
