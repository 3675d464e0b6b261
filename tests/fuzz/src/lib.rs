//! What each fuzz target checks, as plain functions of the input bytes.
//!
//! The libFuzzer binaries in `fuzz/fuzz_targets/` (built on nightly by `cargo xtask fuzz`) are
//! one line each, calling [`TARGETS`]' functions; `cargo test` calls the same functions on the
//! committed seeds (`fuzz/seeds/<target>/`), on every input that once crashed
//! (`fuzz/regressions/<target>/`) and on seeded mutations of the seeds, so the short version
//! runs on stable in CI. A function panics when the property it checks fails: that is what
//! libFuzzer reports as a crash.

pub mod compiler;
pub mod identity;
pub mod manifest;
pub mod mutate;
pub mod watch;

/// One fuzz target.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Its name: the libFuzzer binary's, and the directory of its seeds and regressions.
    pub name: &'static str,
    /// Checks one input; panics when a property fails.
    pub check: fn(&[u8]),
}

/// Every target, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: [Target; 4] = [
    Target {
        name: "manifest",
        check: manifest::check,
    },
    Target {
        name: "compiler",
        check: compiler::check,
    },
    Target {
        name: "identity",
        check: identity::check,
    },
    Target {
        name: "watch",
        check: watch::check,
    },
];
