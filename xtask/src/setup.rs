//! Installs the build and test prerequisites that a fresh Debian machine lacks.
//!
//! Each check is cheap, so on a machine that has everything this takes well under a second.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{run, run_command};

/// Debian packages: LLVM 22 for bpf-linker, iproute2 and procps (`sysctl`) for the simulated
/// node, iptables and nftables for the kube-proxy it emulates (Services in both of kube-proxy's
/// modes), chromium to check the connectivity pages in a real browser.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "iproute2",
    "procps",
    "iptables",
    "nftables",
    "chromium",
];

/// Debian packages the traffic benchmark drives: iperf3 and the firewalls it compares with.
pub const BENCH_PACKAGES: &[&str] = &["iperf3", "nftables", "iptables"];

/// The bpf-linker release that links with LLVM 22 (what the nightly toolchain emits).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs whatever is missing.
pub fn ensure() -> anyhow::Result<()> {
    ensure_packages(APT_PACKAGES)?;
    ensure_toolchain()
}

/// Installs the Debian packages of `packages` that are missing.
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !dpkg_installed(package))
        .collect();
    if !missing.is_empty() {
        println!("setup: installing {}", missing.join(" "));
        run("apt-get", &["update", "-qq"])?;
        let mut install = Command::new("apt-get");
        install
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing);
        run_command(&mut install)?;
    }
    Ok(())
}

/// The nightly toolchain with rust-src and clippy, and bpf-linker.
fn ensure_toolchain() -> anyhow::Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("setup: installing the nightly toolchain");
        run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    // nightly: rust-src to build `core` for the bpf targets, clippy to lint the eBPF crate;
    // the default toolchain: clippy and rustfmt, which `cargo xtask test` runs first.
    for (toolchain, wanted) in [
        ("nightly", ["rust-src", "clippy"]),
        ("stable", ["clippy", "rustfmt"]),
    ] {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            toolchain,
            "--installed",
        ]))?;
        for component in wanted {
            if !installed.lines().any(|line| line.starts_with(component)) {
                println!("setup: adding {component} to {toolchain}");
                run(
                    "rustup",
                    &["component", "add", component, "--toolchain", toolchain],
                )?;
            }
        }
    }

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about two minutes)"
        );
        let mut install = Command::new("cargo");
        install.env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        run_command(&mut install)?;
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        bail!("/sys/fs/bpf does not exist: this kernel has no bpf filesystem support");
    }
    Ok(())
}

/// The nightly toolchain and cargo-fuzz, which is all `cargo xtask fuzz` needs.
pub fn ensure_fuzzing() -> anyhow::Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("setup: installing the nightly toolchain");
        run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        println!("setup: installing cargo-fuzz (about a minute)");
        run("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.contains("install ok installed"))
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
