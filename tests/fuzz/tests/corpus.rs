//! The short, seeded version of the fuzz run, on stable: every target on its committed seeds
//! (`fuzz/seeds/<target>/`), on every input that once made it fail (`fuzz/regressions/<target>/`),
//! and on seeded mutations of its seeds. `FUZZ_MUTATIONS` sets how many mutations per target
//! (default 500); `cargo xtask fuzz` is the long, coverage-guided run.

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use netwarden_fuzz::{
    TARGETS, Target,
    mutate::{Rng, mutate},
};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted by name (none when it does not exist).
fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = fs::read(&path).expect("a readable input");
            (path, bytes)
        })
        .collect()
}

/// Runs `target` on `input`, naming the input when it fails and saving it to a file, to be
/// debugged with `cargo xtask fuzz --target T --replay FILE` and kept under
/// `fuzz/regressions/<target>/` once fixed.
fn run(target: &Target, what: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| (target.check)(input))).is_err() {
        let saved = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("fuzz-failures")
            .join(target.name);
        let file = saved.join(format!("{:016x}", fnv1a(input)));
        let written = fs::create_dir_all(&saved).and_then(|()| fs::write(&file, input));
        panic!(
            "fuzz target {} failed on {what} ({} bytes, {}: {:?})",
            target.name,
            input.len(),
            match written {
                Ok(()) => format!("saved to {}", file.display()),
                Err(error) => format!("not saved: {error}"),
            },
            String::from_utf8_lossy(input)
        );
    }
}

/// A name for an input: FNV-1a of its bytes.
fn fnv1a(input: &[u8]) -> u64 {
    input.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn every_target_has_seeds() {
    for target in &TARGETS {
        let seeds = inputs(&fuzz_dir().join("seeds").join(target.name));
        assert!(
            seeds.len() >= 3,
            "fuzz/seeds/{} has {} seeds",
            target.name,
            seeds.len()
        );
    }
}

#[test]
fn seeds_and_regressions_pass() {
    for target in &TARGETS {
        for kind in ["seeds", "regressions"] {
            for (path, input) in inputs(&fuzz_dir().join(kind).join(target.name)) {
                run(target, &path.display().to_string(), &input);
            }
        }
    }
}

#[test]
fn seeded_mutations_pass() {
    let mutations: usize = std::env::var("FUZZ_MUTATIONS")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(500);
    for (index, target) in TARGETS.iter().enumerate() {
        let seeds = inputs(&fuzz_dir().join("seeds").join(target.name));
        if seeds.is_empty() {
            continue;
        }
        let mut rng = Rng::new(0x5eed + index as u64);
        for round in 0..mutations {
            let (path, seed) = &seeds[rng.below(seeds.len())];
            let (_, other) = &seeds[rng.below(seeds.len())];
            let input = mutate(seed, other, &mut rng);
            run(
                target,
                &format!("mutation {round} of {}", path.display()),
                &input,
            );
        }
    }
}
