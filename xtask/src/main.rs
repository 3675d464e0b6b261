//! `cargo xtask`: everything a developer or CI runs, from a fresh machine.
//!
//! `setup` installs what is missing and is a quick no-op otherwise; every other task runs it
//! first, so the README's two commands are all a newcomer needs.

mod fuzz;
mod image;
mod old_agent;
mod page;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker) if missing.
    Setup,
    /// Build the agent, the eBPF programs and the e2e harness (release).
    Build,
    /// Unit tests, clippy on userspace and on the eBPF crate, every e2e scenario (the upstream
    /// suite also through Services, with kube-proxy in iptables and nftables mode) and a short
    /// seeded churn soak.
    Test {
        /// Run proptest cases by the thousand more, and a million frames through the packet
        /// differential test (slow).
        #[arg(long)]
        thorough: bool,
    },
    /// Run scenario files (or directories of them) on the real kernel.
    E2e {
        /// Scenario files or directories.
        paths: Vec<PathBuf>,
        /// Print every probe's grid.
        #[arg(long)]
        verbose: bool,
        /// Run every scenario through per-pod Services with kube-proxy in this mode.
        #[arg(long, value_parser = SERVICE_VARIANTS)]
        variant: Option<String>,
    },
    /// Churn soak (run as root): the agent on a simulated node while pods, labels and policies
    /// change and the agent is killed (SIGKILL) now and then, probes checked against the reference
    /// evaluator; prints RSS, descriptors, map and conntrack entries and apply latency per
    /// minute, and fails on any disagreement, leaked map entry, pin or descriptor.
    Soak {
        /// How long the churn goes on.
        #[arg(long, default_value = "30")]
        minutes: String,
        /// Seeds the churn (same seed, same changes).
        #[arg(long, default_value = "1")]
        seed: String,
    },
    /// Benchmarks that print ratios and summaries (run as root).
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        bench: BenchKind,
    },
    /// Fuzz every target (manifest, compiler, identity, watch) or one, for `--time` seconds
    /// each, with cargo-fuzz on nightly (installed when missing); prints executions, exec/s,
    /// corpus size and failures per target, and fails when one failed an input.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value = "60")]
        time: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// cargo-fuzz's sanitizer: `none` is about twice as fast; `address` also catches
        /// memory errors, which only unsafe code (here: dependencies') can make.
        #[arg(long, default_value = "none")]
        sanitizer: String,
        /// Fuzzing processes per target (libFuzzer's fork mode when more than one).
        #[arg(long, default_value = "1")]
        workers: u32,
    },
    /// Render the demo's connectivity pages (`netwarden matrix --html`, `netwarden diff
    /// --html`) and check them in headless chromium, with screenshots under target/.
    Pages,
    /// Bring up a simulated node with a three-tier app, show connectivity before and after the
    /// example policies in deploy/examples/, and clean up.
    Demo,
    /// Build the agent's image from deploy/Containerfile with docker, podman or buildah.
    Image {
        /// The image's tag.
        #[arg(long, default_value = "netwarden:dev")]
        tag: String,
        /// The engine [default: the first of docker, podman, buildah found on PATH].
        #[arg(long)]
        engine: Option<String>,
        /// Print the command instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run scenario files on a kind cluster (kindnet) with the agent's image and deploy/;
    /// see docs/kind.md.
    E2eKind {
        /// Print every command and generated manifest, in order, and run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave the cluster running at the end.
        #[arg(long)]
        keep: bool,
        /// The agent image's tag.
        #[arg(long, default_value = "netwarden:dev")]
        tag: String,
        /// Scenario files or directories [default: tests/scenarios].
        scenarios: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchKind {
    /// Compile time (full and incremental), map entries and agent memory on a generated
    /// 10,000-pod, 1,000-policy cluster (200 ClusterNetworkPolicies); with `--pods`, a row for
    /// each of 10,000, 50,000 and that many pods, each held to its size's targets.
    Compile {
        /// Pods of the largest cluster (scale mode), e.g. 150000.
        #[arg(long)]
        pods: Option<String>,
        /// NetworkPolicies of the largest cluster [default: one per 10 pods].
        #[arg(long, requires = "pods")]
        policies: Option<String>,
        /// Namespaces of the largest cluster [default: one per 30 pods].
        #[arg(long, requires = "pods")]
        namespaces: Option<String>,
    },
    /// The classifier's cost per packet with 10,000 CIDR rules (`BPF_PROG_TEST_RUN`), then
    /// traffic between two pods: no program, netwarden with 10/1,000/10,000 rules, iptables
    /// and nftables.
    Datapath {
        /// Only the classifier's cost, no traffic.
        #[arg(long)]
        classifier_only: bool,
        /// Seconds each traffic figure is measured for.
        #[arg(long, default_value = "2")]
        seconds: String,
        /// Rounds per pass (every configuration once, each between two baseline runs).
        #[arg(long, default_value = "5")]
        repeats: String,
    },
    /// The identity check's latency (p50/p99 of `Authorization/Check` over the Unix socket)
    /// on the generated 10,000-pod cluster.
    Identity,
    /// Traffic between two pods (an iperf3 stream, idle connections, a connect/request/close
    /// loop to an allowed port, attempts on a forbidden one) while the agent is upgraded from
    /// the build before the last map layout change, then killed (SIGKILL) and restarted; fails
    /// when an established connection broke, an allowed one was refused or a forbidden one
    /// accepted. Dev builds: the agent's speed is not what is measured.
    Restart {
        /// SIGKILL and restart cycles.
        #[arg(long, default_value = "5")]
        cycles: String,
        /// Seconds of traffic after each agent has taken over.
        #[arg(long, default_value = "3")]
        seconds: String,
        /// Skip the upgrade (and the build of the earlier agent).
        #[arg(long)]
        no_upgrade: bool,
        /// A fault the run must catch and fail on (`unpin-links`, `deny-loop-port`): to
        /// check the bench itself.
        #[arg(long)]
        sabotage: Option<String>,
    },
}

/// The harness's `--variant`s: the scenarios run through Services, as on a real cluster.
const SERVICE_VARIANTS: [&str; 2] = ["service-iptables", "service-nftables"];
/// What runs in the service variants in `cargo xtask test`: upstream's suite, which upstream
/// itself runs through a Service per pod.
const SERVICE_VARIANT_SCENARIOS: &str = "tests/scenarios/upstream";
/// What `cargo xtask test` runs once more with pods on a bridge (`--cni bridge`).
const BRIDGE_SCENARIOS: &str = "tests/scenarios/upstream";
/// Where `cargo xtask test` (and `cargo xtask e2e-kind` without paths) finds its scenarios.
const SCENARIOS: &str = "tests/scenarios";
/// Scenario directories under [`SCENARIOS`] that `cargo xtask test` does not run yet, each with
/// the reason it prints when it skips them (`cargo xtask e2e DIR` still runs them on request).
/// Empty: the ClusterNetworkPolicy conformance suite was the last, until the datapath enforced it.
const NOT_YET_RUN: [(&str, &str); 0] = [];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            build_release("netwarden-e2e")
        }
        Task::Test { thorough } => test(&root, thorough),
        Task::E2e {
            paths,
            verbose,
            variant,
        } => {
            setup::ensure()?;
            build_release("netwarden-e2e")?;
            e2e_with("release", &paths, verbose, variant.as_deref())
        }
        Task::Soak { minutes, seed } => {
            setup::ensure()?;
            build_release("netwarden-e2e")?;
            run_command(&mut soak_command(
                "release",
                &["--minutes", &minutes, "--seed", &seed],
            ))
        }
        Task::Bench { bench } => run_bench(&root, bench),
        Task::Image {
            tag,
            engine,
            dry_run,
        } => image::build(&tag, engine.as_deref(), dry_run),
        Task::E2eKind {
            dry_run,
            keep,
            tag,
            scenarios,
        } => e2e_kind(dry_run, keep, &tag, scenarios),
        Task::Fuzz {
            time,
            target,
            sanitizer,
            workers,
        } => fuzz::fuzz(&fuzz::Options {
            seconds: time,
            target,
            sanitizer,
            workers,
        }),
        Task::Pages => {
            setup::ensure_packages(&["chromium"])?;
            run("cargo", &["build", "--package", "netwarden"])?;
            page::check(Path::new("target/debug/netwarden"))
        }
        Task::Demo => {
            setup::ensure()?;
            build_release("netwarden-e2e")?;
            e2e(
                &[PathBuf::from("tests/scenarios/demo/three-tier.yaml")],
                true,
            )?;
            demo_diff()
        }
    }
}

/// `cargo xtask bench KIND`.
fn run_bench(root: &Path, kind: BenchKind) -> anyhow::Result<()> {
    match kind {
        BenchKind::Compile {
            pods,
            policies,
            namespaces,
        } => {
            let mut args = vec!["compile", "--agent", "target/release/netwarden"];
            for (flag, value) in [
                ("--pods", &pods),
                ("--policies", &policies),
                ("--namespaces", &namespaces),
            ] {
                if let Some(value) = value {
                    args.extend([flag, value.as_str()]);
                }
            }
            bench(&args)
        }
        BenchKind::Datapath {
            classifier_only,
            seconds,
            repeats,
        } => {
            setup::ensure_packages(setup::BENCH_PACKAGES)?;
            let mut args = vec!["datapath", "--seconds", &seconds, "--repeats", &repeats];
            if !classifier_only {
                args.extend(["--agent", "target/release/netwarden"]);
            }
            bench(&args)
        }
        BenchKind::Identity => bench(&["identity"]),
        restart @ BenchKind::Restart { .. } => bench_restart(root, restart),
    }
}

/// The demo's last word: what the example policies change, as `netwarden diff` tells it from
/// no policy to deploy/examples/ on the demo's workloads.
fn demo_diff() -> anyhow::Result<()> {
    let empty = Path::new("target/netwarden-pages/no-policies");
    std::fs::create_dir_all(empty)?;
    let mut diff = Command::new("target/release/netwarden");
    diff.args(["diff", "--shared", "docs/demo/workloads.yaml"])
        .arg(empty)
        .arg("deploy/examples");
    println!("==> {diff:?}");
    let status = diff.status().context("running netwarden diff")?;
    // 1: the policies close flows, which is what they are for; 2 is an error.
    if status.code() == Some(2) || status.code().is_none() {
        bail!("netwarden diff failed: {status}");
    }
    Ok(())
}

/// Builds the agent and the benchmarks (release) on a machine set up for it, then runs
/// `netwarden-bench ARGS`.
fn bench(args: &[&str]) -> anyhow::Result<()> {
    setup::ensure()?;
    build_release("netwarden-bench")?;
    run("target/release/netwarden-bench", args)
}

/// `cargo xtask bench restart`: builds the agent and the bench (dev), and the earlier agent
/// unless `--no-upgrade`, then runs the bench.
fn bench_restart(root: &Path, restart: BenchKind) -> anyhow::Result<()> {
    let BenchKind::Restart {
        cycles,
        seconds,
        no_upgrade,
        sabotage,
    } = restart
    else {
        bail!("not the restart bench");
    };
    setup::ensure()?;
    setup::ensure_packages(setup::BENCH_PACKAGES)?;
    build_dev("netwarden-bench")?;
    let old_agent = if no_upgrade {
        None
    } else {
        Some(old_agent::build(root)?)
    };
    let mut command = restart_bench_command(&cycles, &seconds, old_agent.as_deref());
    if let Some(sabotage) = &sabotage {
        command.args(["--sabotage", sabotage]);
    }
    run_command(&mut command)
}

/// The restart bench on the dev builds of the agent and the bench, upgrading from `old_agent`
/// if given.
fn restart_bench_command(cycles: &str, seconds: &str, old_agent: Option<&Path>) -> Command {
    let mut command = Command::new("target/debug/netwarden-bench");
    command.args([
        "restart",
        "--agent",
        "target/debug/netwarden",
        "--cycles",
        cycles,
        "--seconds",
        seconds,
    ]);
    if let Some(old_agent) = old_agent {
        command.arg("--old-agent").arg(old_agent);
    }
    command
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

/// Runs `program args...`, failing with the command line when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    run_command(Command::new(program).args(args))
}

/// Runs a prepared command, failing with its command line when it fails.
pub fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds the agent and `package` with the release profile, one at a time: built in one
/// command, the agent would get the features `package` enables in a shared dependency (the
/// benchmarks enable `netwarden-datapath/test-support`, which production builds must not
/// contain).
fn build_release(package: &str) -> anyhow::Result<()> {
    run("cargo", &["build", "--release", "--package", "netwarden"])?;
    run("cargo", &["build", "--release", "--package", package])
}

/// [`build_release`] in the dev profile.
fn build_dev(package: &str) -> anyhow::Result<()> {
    run("cargo", &["build", "--package", "netwarden"])?;
    run("cargo", &["build", "--package", package])
}

fn e2e(paths: &[PathBuf], verbose: bool) -> anyhow::Result<()> {
    e2e_with("release", paths, verbose, None)
}

/// Runs the harness and agent built with `profile` (`release` or `debug`), in a service
/// `variant` if one is given.
fn e2e_with(
    profile: &str,
    paths: &[PathBuf],
    verbose: bool,
    variant: Option<&str>,
) -> anyhow::Result<()> {
    run_command(&mut e2e_command(profile, paths, verbose, variant))
}

fn e2e_command(profile: &str, paths: &[PathBuf], verbose: bool, variant: Option<&str>) -> Command {
    let mut command = Command::new(format!("target/{profile}/netwarden-e2e"));
    command
        .arg("run")
        .arg("--agent")
        .arg(format!("target/{profile}/netwarden"));
    if verbose {
        command.arg("--verbose");
    }
    if let Some(variant) = variant {
        command.args(["--variant", variant]);
    }
    command.args(paths);
    command
}

/// The harness's churn soak with the agent and harness built with `profile`.
fn soak_command(profile: &str, args: &[&str]) -> Command {
    let mut command = Command::new(format!("target/{profile}/netwarden-e2e"));
    command
        .arg("soak")
        .arg("--agent")
        .arg(format!("target/{profile}/netwarden"))
        .args(args);
    command
}

/// `cargo xtask test`'s soak: short and seeded, with restarts, so that a leak or a disagreement
/// under churn fails CI; `cargo xtask soak` runs the long one.
const CI_SOAK: [&str; 6] = ["--steps", "40", "--restart-every", "15", "--seed", "1"];

/// Runs [`CI_SOAK`] with the debug builds `cargo xtask test` made.
fn ci_soak() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("==> soak {}", CI_SOAK.join(" "));
    let result = run_command(&mut soak_command("debug", &CI_SOAK));
    println!("<== soak: {:.1}s", started.elapsed().as_secs_f64());
    result
}

/// `cargo xtask e2e-kind`: checks the tools, then runs `netwarden-e2e kind`, which prints and
/// runs every step.
fn e2e_kind(dry_run: bool, keep: bool, tag: &str, scenarios: Vec<PathBuf>) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH");
    // kind runs its nodes with docker or podman only.
    let engine = match image::find_engine(&["docker", "podman"], path.as_deref()) {
        Some(engine) => engine,
        None if dry_run => "docker",
        None => bail!("kind needs docker or podman on PATH, and neither was found"),
    };
    if !dry_run {
        for tool in ["kind", "kubectl"] {
            if image::find_engine(&[tool], path.as_deref()).is_none() {
                bail!("{tool} is not on PATH: see docs/kind.md for the prerequisites");
            }
        }
    }
    let scenarios = if scenarios.is_empty() {
        scenario_paths(&workspace_root())?
    } else {
        scenarios
    };
    run_command(&mut e2e_kind_command(
        engine, tag, dry_run, keep, &scenarios,
    ))
}

/// The `netwarden-e2e kind` run `cargo xtask e2e-kind` starts.
fn e2e_kind_command(
    engine: &str,
    tag: &str,
    dry_run: bool,
    keep: bool,
    scenarios: &[PathBuf],
) -> Command {
    let mut command = Command::new("cargo");
    command.args([
        "run",
        "--quiet",
        "--package",
        "netwarden-e2e",
        "--",
        "kind",
        "--engine",
        engine,
        "--image",
        tag,
    ]);
    if dry_run {
        command.arg("--dry-run");
    }
    if keep {
        command.arg("--keep");
    }
    command.args(scenarios);
    command
}

/// The directories and `*.yaml` files directly under [`SCENARIOS`] in the workspace `root`, as
/// paths relative to it (sorted), but those in [`NOT_YET_RUN`], each of which is named with its
/// reason as it is left out. The harness searches each directory as it would have searched
/// [`SCENARIOS`].
fn scenario_paths(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = root.join(SCENARIOS);
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = Path::new(SCENARIOS).join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        if !(is_dir
            || path
                .extension()
                .is_some_and(|extension| extension == "yaml"))
        {
            continue;
        }
        if let Some((skipped, reason)) = NOT_YET_RUN
            .iter()
            .find(|(skipped, _)| path == Path::new(skipped))
        {
            println!("note: not running {skipped}: {reason}");
            continue;
        }
        paths.push(path);
    }
    paths.sort();
    Ok(paths)
}

/// Runs one step of `cargo xtask test`, saying how long it took.
fn step(name: &str, command: &mut Command) -> anyhow::Result<()> {
    println!("==> {name}");
    let step_started = Instant::now();
    run_command(command)?;
    println!("<== {name}: {:.1}s", step_started.elapsed().as_secs_f64());
    Ok(())
}

/// rustfmt and clippy, on userspace and on the eBPF crate.
fn lints(root: &Path) -> anyhow::Result<()> {
    step(
        "rustfmt",
        Command::new("cargo").args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "clippy (userspace)",
        Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--exclude",
            "netwarden-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "clippy (eBPF)",
        Command::new("cargo")
            .current_dir(root.join("ebpf/netwarden-ebpf"))
            .args([
                "+nightly",
                "clippy",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    Ok(())
}

fn test(root: &Path, thorough: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::ensure()?;
    // The restart bench's short run (`tests/bench/tests/restart.rs`) drives iperf3: without it
    // that test would skip on a fresh machine.
    setup::ensure_packages(setup::BENCH_PACKAGES)?;
    lints(root)?;
    let mut unit = Command::new("cargo");
    unit.args(["test", "--workspace", "--exclude", "netwarden-ebpf"]);
    if thorough {
        unit.env("PROPTEST_CASES", "50000");
        // Frames through the kernel's classifier and its model
        // (`netwarden-datapath/tests/packet_differential.rs`).
        unit.env("NETWARDEN_PACKET_CASES", "1000000");
    }
    step("unit and integration tests", &mut unit)?;
    // The tests above compiled every dependency in the dev profile: building the two binaries
    // there takes seconds, where a release build would compile the world again.
    step(
        "build (agent and harness)",
        Command::new("cargo").args([
            "build",
            "--package",
            "netwarden",
            "--package",
            "netwarden-e2e",
        ]),
    )?;
    let page_started = Instant::now();
    println!("==> connectivity pages in chromium");
    page::check(Path::new("target/debug/netwarden"))?;
    println!(
        "<== connectivity pages: {:.1}s",
        page_started.elapsed().as_secs_f64()
    );

    let mut scenarios = scenario_paths(root)?;
    let shared = root.join("../shared/scenarios");
    if shared.is_dir() {
        scenarios.push(shared);
    }
    // Every run goes ahead even when an earlier one failed: each says something of its own
    // (the pod-IP run about policy, the variants about policy behind kube-proxy's NAT).
    let mut e2e_results = vec![e2e_with("debug", &scenarios, false, None)];
    for variant in SERVICE_VARIANTS {
        let variant_started = Instant::now();
        println!("==> e2e {SERVICE_VARIANT_SCENARIOS} --variant {variant}");
        e2e_results.push(e2e_with(
            "debug",
            &[PathBuf::from(SERVICE_VARIANT_SCENARIOS)],
            false,
            Some(variant),
        ));
        println!(
            "<== e2e --variant {variant}: {:.1}s",
            variant_started.elapsed().as_secs_f64()
        );
    }
    // The upstream suite again with pods on a bridge (flannel's shape), where the agent finds
    // pods through their veths' other ends instead of host routes.
    let bridge_started = Instant::now();
    println!("==> e2e {BRIDGE_SCENARIOS} --cni bridge");
    let mut on_bridge = e2e_command("debug", &[PathBuf::from(BRIDGE_SCENARIOS)], false, None);
    on_bridge.args(["--cni", "bridge"]);
    e2e_results.push(run_command(&mut on_bridge));
    println!(
        "<== e2e --cni bridge: {:.1}s",
        bridge_started.elapsed().as_secs_f64()
    );
    e2e_results.push(ci_soak());
    println!(
        "cargo xtask test: {:.0}s in all",
        started.elapsed().as_secs_f64()
    );
    e2e_results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{
        CI_SOAK, NOT_YET_RUN, SERVICE_VARIANTS, e2e_command, e2e_kind_command,
        restart_bench_command, soak_command,
    };

    /// A command's arguments, as text.
    fn args(command: &std::process::Command) -> Vec<String> {
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_restart_bench_runs_the_dev_builds_and_upgrades_from_the_old_agent_if_given() {
        let old = PathBuf::from("target/restart-bench/agent-f42777083e09/target/debug/netwarden");
        let command = restart_bench_command("5", "3", Some(&old));
        assert_eq!(command.get_program(), "target/debug/netwarden-bench");
        assert_eq!(
            args(&command),
            [
                "restart",
                "--agent",
                "target/debug/netwarden",
                "--cycles",
                "5",
                "--seconds",
                "3",
                "--old-agent",
                "target/restart-bench/agent-f42777083e09/target/debug/netwarden"
            ]
        );
        assert!(!args(&restart_bench_command("1", "2", None)).contains(&"--old-agent".to_owned()));
        assert!(
            super::old_agent::REVISION.len() == 40
                && super::old_agent::REVISION.starts_with("f427770"),
            "a full hash: git archive takes it as it is"
        );
    }

    #[test]
    fn test_runs_every_scenario_directory_but_the_ones_not_yet_run() {
        let root = super::workspace_root();
        let paths = super::scenario_paths(&root).unwrap();
        for (skipped, _) in NOT_YET_RUN {
            assert!(
                root.join(skipped).is_dir(),
                "{skipped} is skipped but does not exist"
            );
            assert!(
                !paths
                    .iter()
                    .any(|path| path == std::path::Path::new(skipped))
            );
        }
        for expected in [
            "tests/scenarios/upstream",
            "tests/scenarios/semantics",
            "tests/scenarios/cluster-policy",
        ] {
            assert!(
                paths
                    .iter()
                    .any(|path| path == std::path::Path::new(expected))
            );
        }
        assert!(
            !paths.iter().any(|path| path.ends_with("README.md")),
            "only directories and scenario files are passed"
        );
    }

    #[test]
    fn e2e_passes_the_service_variant_to_the_harness() {
        let command = e2e_command(
            "debug",
            &[PathBuf::from("tests/scenarios/upstream")],
            false,
            Some(SERVICE_VARIANTS[1]),
        );
        assert_eq!(command.get_program(), "target/debug/netwarden-e2e");
        let args = args(&command);
        assert_eq!(
            args,
            [
                "run",
                "--agent",
                "target/debug/netwarden",
                "--variant",
                "service-nftables",
                "tests/scenarios/upstream"
            ]
        );
        let plain = e2e_command("release", &[], true, None);
        assert!(!plain.get_args().any(|arg| arg == "--variant"));
    }

    #[test]
    fn soak_runs_the_harness_soak_with_the_agent_beside_it() {
        let command = soak_command("debug", &CI_SOAK);
        assert_eq!(command.get_program(), "target/debug/netwarden-e2e");
        let args = args(&command);
        assert_eq!(
            args,
            [
                "soak",
                "--agent",
                "target/debug/netwarden",
                "--steps",
                "40",
                "--restart-every",
                "15",
                "--seed",
                "1"
            ]
        );
    }

    #[test]
    fn e2e_kind_runs_the_harness_kind_command_with_every_option() {
        let command = e2e_kind_command(
            "podman",
            "netwarden:test",
            true,
            true,
            &[PathBuf::from(
                "../shared/scenarios/default-deny-ingress.yaml",
            )],
        );
        assert_eq!(command.get_program(), "cargo");
        let args = args(&command);
        assert_eq!(
            args,
            [
                "run",
                "--quiet",
                "--package",
                "netwarden-e2e",
                "--",
                "kind",
                "--engine",
                "podman",
                "--image",
                "netwarden:test",
                "--dry-run",
                "--keep",
                "../shared/scenarios/default-deny-ingress.yaml"
            ]
        );
    }
}
