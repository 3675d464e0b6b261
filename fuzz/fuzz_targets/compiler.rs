//! The `compiler` target: see `netwarden_fuzz::compiler`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netwarden_fuzz::compiler::check(data));
