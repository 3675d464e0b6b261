//! The short, CI-sized restart bench (`cargo xtask bench restart` runs the long one, with the
//! upgrade from an earlier build): two SIGKILLs and restarts of the agent under traffic, the
//! second just after a policy change, must break nothing and open nothing, and the same run with the links' pins removed after the
//! kill (an agent that detaches when it dies) must fail, or the bench could not see it.
//!
//! Needs root and iperf3 (skipped with a message otherwise), and the agent built beside this
//! bench (`target/debug/netwarden`), which `cargo test --workspace` builds for the agent's
//! own integration tests.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::Mutex,
};

/// One bench at a time: each saturates the machine with iperf3.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The agent next to this bench's binary, if the environment lets the bench run.
fn agent() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the restart bench loads eBPF programs and creates namespaces (root)");
        return None;
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!("skipped: iperf3 is not installed (cargo xtask setup)");
        return None;
    }
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_netwarden-bench")).with_file_name("netwarden");
    assert!(
        agent.exists(),
        "{} is missing: cargo build --package netwarden",
        agent.display()
    );
    Some(agent)
}

fn restart_bench(agent: &PathBuf, extra: &[&str]) -> Output {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Command::new(env!("CARGO_BIN_EXE_netwarden-bench"))
        .args(["restart", "--agent"])
        .arg(agent)
        .args(["--cycles", "2", "--seconds", "2"])
        .args(extra)
        .output()
        .expect("the bench runs")
}

#[test]
fn a_sigkilled_and_restarted_agent_breaks_nothing_and_opens_nothing() {
    let Some(agent) = agent() else { return };
    let output = restart_bench(&agent, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("summary: established_broken=0 allowed_refused=0 allowed_syn_dropped=0 forbidden_accepted=0"),
        "{stdout}"
    );
}

#[test]
fn links_unpinned_after_the_kill_fail_the_bench() {
    let Some(agent) = agent() else { return };
    let output = restart_bench(&agent, &["--sabotage", "unpin-links"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stdout.contains("forbidden_accepted<=0:MISSED"),
        "the open pod is what fails it: {stdout}"
    );
}
