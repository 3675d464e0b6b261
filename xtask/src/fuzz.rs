//! `cargo xtask fuzz`: every fuzz target (or one) for a while each, with cargo-fuzz and
//! libFuzzer on the nightly toolchain, and a line per target of what the run did.
//!
//! The targets' logic lives in `tests/fuzz` and the libFuzzer binaries in `fuzz/` (cargo-fuzz's
//! layout). A run reads the committed seeds (`fuzz/seeds/<target>/`) and regressions
//! (`fuzz/regressions/<target>/`), grows a working corpus (`fuzz/corpus/<target>/`, not
//! committed) that the next run starts from, and leaves what failed in
//! `fuzz/artifacts/<target>/` and libFuzzer's output in `fuzz/logs/<target>.log`.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{run_command, setup};

/// Where cargo-fuzz's project lives, from the workspace root.
const FUZZ_DIR: &str = "fuzz";

/// Files libFuzzer writes under its artifact prefix when an input fails, by kind.
const FAILURE_PREFIXES: [&str; 4] = ["crash-", "timeout-", "oom-", "leak-"];

/// Targets built without libFuzzer's compare tracing. Their input is read only through
/// `arbitrary`'s choices, each a byte mapped into a small range: a compared constant that
/// libFuzzer copies into the input is not the value the target then compares, so the tracing
/// only costs. Measured on the compiler target replaying one corpus of 2,554 inputs: 4.23 s
/// with it, 2.60 s without.
const WITHOUT_COMPARE_TRACING: [&str; 1] = ["compiler"];

/// Where cargo-fuzz builds the targets of [`WITHOUT_COMPARE_TRACING`], from the workspace
/// root: apart, so that neither build invalidates the other.
const UNTRACED_TARGET_DIR: &str = "fuzz/target/without-compare-tracing";

/// How long one input may take, in seconds, before libFuzzer calls it a hang: far above any
/// target's cost on a loaded machine (milliseconds), far below "forever".
const INPUT_TIMEOUT_SECONDS: u32 = 30;

/// What to fuzz and how.
pub struct Options {
    /// Seconds each target runs.
    pub seconds: u64,
    /// Only this target.
    pub target: Option<String>,
    /// cargo-fuzz's `--sanitizer`.
    pub sanitizer: String,
    /// Fuzzing processes per target: more than one runs libFuzzer's fork mode.
    pub workers: u32,
}

/// What one target's run did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    executions: u64,
    executions_per_second: u64,
    new_inputs: u64,
}

/// Runs the targets and prints a summary; fails when one of them failed an input.
pub fn fuzz(options: &Options) -> anyhow::Result<()> {
    setup::ensure_fuzzing()?;
    let targets = targets()?;
    let chosen: Vec<String> = match &options.target {
        Some(target) if targets.contains(target) => vec![target.clone()],
        Some(target) => bail!(
            "no fuzz target {target}; there are: {}",
            targets.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
        None => targets.into_iter().collect(),
    };
    // Built once for every target, and once more for those without compare tracing: `cargo
    // fuzz run` then finds them up to date.
    run_command(
        cargo_fuzz("build", &options.sanitizer, true)
            .arg("--fuzz-dir")
            .arg(FUZZ_DIR),
    )?;
    for target in chosen.iter().filter(|target| !compare_tracing(target)) {
        run_command(
            cargo_fuzz("build", &options.sanitizer, false)
                .arg("--fuzz-dir")
                .arg(FUZZ_DIR)
                .arg(target),
        )?;
    }

    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for target in &chosen {
        let TargetRun {
            outcome,
            failures,
            corpus,
            seconds,
        } = run_target(target, options)?;
        rows.push((target.clone(), outcome, failures.len(), corpus, seconds));
        if !failures.is_empty() {
            failed.push((target.clone(), failures));
        }
    }

    println!(
        "\n{:<10} {:>8} {:>14} {:>9} {:>8} {:>6} {:>9}",
        "target", "seconds", "executions", "exec/s", "corpus", "new", "failures"
    );
    for (target, outcome, failures, corpus, seconds) in &rows {
        println!(
            "{target:<10} {seconds:>8} {:>14} {:>9} {corpus:>8} {:>6} {failures:>9}",
            outcome.executions, outcome.executions_per_second, outcome.new_inputs
        );
    }
    if failed.is_empty() {
        return Ok(());
    }
    for (target, failures) in &failed {
        for failure in failures {
            println!(
                "\n{target}: {} (libFuzzer's output: {FUZZ_DIR}/logs/{target}.log)",
                failure.display()
            );
        }
    }
    println!(
        "\nTo debug one on stable: copy it to {FUZZ_DIR}/regressions/<target>/<what it shows> and run \
         `cargo test -p netwarden-fuzz --test corpus`; keep it there once fixed."
    );
    bail!("{} fuzz target(s) failed an input", failed.len())
}

/// The targets cargo-fuzz knows, from `cargo fuzz list`.
fn targets() -> anyhow::Result<BTreeSet<String>> {
    let output = Command::new("cargo")
        .args(["+nightly", "fuzz", "list", "--fuzz-dir", FUZZ_DIR])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo fuzz list")?;
    if !output.status.success() {
        bail!("cargo fuzz list failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Whether `target` is built with libFuzzer's compare tracing (see [`WITHOUT_COMPARE_TRACING`]).
fn compare_tracing(target: &str) -> bool {
    !WITHOUT_COMPARE_TRACING.contains(&target)
}

/// `cargo +nightly fuzz SUBCOMMAND` with the build options every run shares: release, with
/// debug assertions (integer overflow panics instead of wrapping), and `sanitizer`; without
/// compare tracing unless `traced`.
fn cargo_fuzz(subcommand: &str, sanitizer: &str, traced: bool) -> Command {
    let mut command = Command::new("cargo");
    command.args([
        "+nightly",
        "fuzz",
        subcommand,
        "--release",
        "--debug-assertions",
        "--sanitizer",
        sanitizer,
    ]);
    if !traced {
        command.args(["--no-trace-compares", "--target-dir", UNTRACED_TARGET_DIR]);
    }
    command
}

/// One target's run, as the summary reports it.
struct TargetRun {
    outcome: Outcome,
    /// The inputs it failed on.
    failures: Vec<PathBuf>,
    /// The size of its working corpus afterwards.
    corpus: usize,
    /// How long libFuzzer ran: longer than asked when it finishes a long input, or, in fork
    /// mode, its first merge of the corpus.
    seconds: u64,
}

/// Fuzzes `target` for the configured time.
fn run_target(target: &str, options: &Options) -> anyhow::Result<TargetRun> {
    let fuzz = Path::new(FUZZ_DIR);
    let corpus = fuzz.join("corpus").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    let logs = fuzz.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let before = failures_in(&artifacts)?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    let mut command = cargo_fuzz("run", &options.sanitizer, compare_tracing(target));
    command.args(["--fuzz-dir", FUZZ_DIR, target]).arg(&corpus);
    // libFuzzer reads every directory given, and adds what it finds to the first only.
    for committed in ["seeds", "regressions"] {
        let dir = fuzz.join(committed).join(target);
        if dir.is_dir() {
            command.arg(dir);
        }
    }
    command.arg("--").args([
        format!("-max_total_time={}", options.seconds),
        format!("-timeout={INPUT_TIMEOUT_SECONDS}"),
        "-print_final_stats=1".to_owned(),
    ]);
    if options.workers > 1 {
        // Fork mode: one corpus, crashes found by any worker stop the run, one count.
        command.arg(format!("-fork={}", options.workers));
    }
    let dictionary = fuzz.join("dictionaries").join(format!("{target}.dict"));
    if dictionary.is_file() {
        command.arg(format!("-dict={}", dictionary.display()));
    }
    command.stdout(log.try_clone()?).stderr(log);

    println!(
        "==> fuzzing {target} for {} s (output: {})",
        options.seconds,
        log_path.display()
    );
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    let seconds = started.elapsed().as_secs();
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let outcome = parse_outcome(&output);
    let failures: Vec<PathBuf> = failures_in(&artifacts)?
        .difference(&before)
        .cloned()
        .collect();
    println!(
        "<== {target}: {} executions in {seconds} s, {}",
        outcome.executions,
        if failures.is_empty() {
            "no failure".to_owned()
        } else {
            format!("{} failure(s)", failures.len())
        }
    );
    if !status.success() && failures.is_empty() {
        let tail: Vec<&str> = output.lines().rev().take(30).collect();
        for line in tail.into_iter().rev() {
            println!("    {line}");
        }
        bail!("fuzzing {target} failed without a failing input: {status}");
    }
    Ok(TargetRun {
        outcome,
        failures,
        corpus: fs::read_dir(&corpus)?.count(),
        seconds,
    })
}

/// The inputs libFuzzer saved in `artifacts` because they failed.
fn failures_in(artifacts: &Path) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut failures = BTreeSet::new();
    for entry in
        fs::read_dir(artifacts).with_context(|| format!("reading {}", artifacts.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if FAILURE_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            failures.insert(path);
        }
    }
    Ok(failures)
}

/// What libFuzzer's final statistics (`-print_final_stats=1`) say, or its closing `Done N runs`
/// line when they are missing, or in fork mode (which prints neither) its last progress line,
/// `#N: cov: ... corp: C exec/s: R ...`, against the corpus it started from, `INFO: -fork=J: S
/// seed inputs, ...`: libFuzzer's own count, which another fuzzer writing to the same corpus
/// directory does not inflate.
fn parse_outcome(output: &str) -> Outcome {
    let mut outcome = Outcome::default();
    let mut forked = None;
    let mut seed_inputs = None;
    let stat = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    };
    for line in output.lines() {
        let line = line.trim();
        if let Some(value) = stat(line, "stat::number_of_executed_units") {
            outcome.executions = value;
        } else if let Some(value) = stat(line, "stat::average_exec_per_sec") {
            outcome.executions_per_second = value;
        } else if let Some(value) = stat(line, "stat::new_units_added") {
            outcome.new_inputs = value;
        } else if outcome.executions == 0
            && let Some(runs) = line
                .strip_prefix("Done ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|runs| runs.parse().ok())
        {
            outcome.executions = runs;
        } else if let Some(progress) = fork_progress(line) {
            forked = Some(progress);
        } else if let Some(seeds) = fork_seed_inputs(line) {
            seed_inputs = Some(seeds);
        }
    }
    if outcome.executions == 0
        && let Some(progress) = forked
    {
        outcome.executions = progress.executions;
        outcome.executions_per_second = progress.executions_per_second;
        outcome.new_inputs = seed_inputs.map_or(0, |seeds| progress.corpus.saturating_sub(seeds));
    }
    outcome
}

/// A fork-mode progress line's figures.
#[derive(Clone, Copy)]
struct ForkProgress {
    executions: u64,
    executions_per_second: u64,
    /// Inputs in the corpus libFuzzer keeps, seeds included.
    corpus: u64,
}

/// The figures of a fork-mode progress line, `#7239: cov: 7855 ft: 46051 corp: 1908 exec/s:
/// 253 oom/timeout/crash: 0/0/0 time: 19s job: 6 dft_time: 0`.
fn fork_progress(line: &str) -> Option<ForkProgress> {
    let (runs, rest) = line.strip_prefix('#')?.split_once(": ")?;
    let executions = runs.parse().ok()?;
    let value_after = |name: &str| -> Option<u64> {
        let mut words = rest.split_whitespace();
        words.find(|word| *word == name)?;
        words.next()?.parse().ok()
    };
    Some(ForkProgress {
        executions,
        executions_per_second: value_after("exec/s:")?,
        corpus: value_after("corp:")?,
    })
}

/// The size of the corpus fork mode starts from, `INFO: -fork=2: 1828 seed inputs, starting to
/// fuzz in /tmp/...`.
fn fork_seed_inputs(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("INFO: -fork=")?;
    let (_, rest) = rest.split_once(": ")?;
    let (seeds, _) = rest.split_once(" seed inputs")?;
    seeds.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{Outcome, parse_outcome};

    #[test]
    fn the_final_statistics_are_read() {
        let output = "#1048576\tpulse  cov: 2151 ft: 9022 corp: 812/91Kb exec/s: 2048 rss: 312Mb
Done 1234567 runs in 601 second(s)
stat::number_of_executed_units: 1234567
stat::average_exec_per_sec:     2054
stat::new_units_added:          301
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              312
";
        assert_eq!(
            parse_outcome(output),
            Outcome {
                executions: 1_234_567,
                executions_per_second: 2054,
                new_inputs: 301
            }
        );
    }

    #[test]
    fn in_fork_mode_the_last_progress_line_gives_the_executions() {
        let output = "INFO: -fork=2: fuzzing in separate process(s)
INFO: -fork=2: 1828 seed inputs, starting to fuzz in /tmp/libFuzzerTemp.FuzzWithFork7.dir
#599: cov: 7824 ft: 45782 corp: 1828 exec/s: 299 oom/timeout/crash: 0/0/0 time: 6s job: 1 dft_time: 0
#7239: cov: 7855 ft: 46051 corp: 1908 exec/s: 253 oom/timeout/crash: 0/0/0 time: 19s job: 6 dft_time: 0
INFO: fuzzed for 20 seconds, wrapping up soon
INFO: exiting: 0 time: 20s
";
        let outcome = parse_outcome(output);
        assert_eq!(outcome.executions, 7239);
        assert_eq!(outcome.executions_per_second, 253);
        assert_eq!(outcome.new_inputs, 1908 - 1828);
        // A single process's progress lines (`#N<TAB>NEW ...`) are not fork mode's.
        assert_eq!(
            parse_outcome("#4312\tNEW    cov: 7859 ft: 46359 corp: 1918/1173Kb exec/s: 1078\n")
                .executions,
            0
        );
    }

    #[test]
    fn without_statistics_the_done_line_gives_the_executions() {
        assert_eq!(
            parse_outcome("Done 42 runs in 1 second(s)\n").executions,
            42
        );
        assert_eq!(parse_outcome("").executions, 0);
    }
}
