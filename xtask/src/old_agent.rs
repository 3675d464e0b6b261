//! The agent of an earlier build, for the restart bench's upgrade: the real binary of the last
//! revision whose maps had another layout, built once from `git archive` into a target
//! directory of its own under `target/restart-bench/` and reused afterwards.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The revision before `PolicyEntry` grew from a 4-byte rule id to two tier matches (16 bytes)
/// with ClusterNetworkPolicy in the datapath (dd51649): its `POLICY` map has the older value
/// layout, and an upgrade from it replaces `POLICY` and the maps that name its ids
/// (`netwarden-datapath/src/upgrade.rs`). Found with `git log -S PolicyEntry`.
pub const REVISION: &str = "f42777083e09c0194322788f6da3837de4217453";

/// Builds (or finds, already built) the agent of [`REVISION`] in the dev profile, and returns
/// its path. The first build compiles its own dependency tree (minutes; sccache helps).
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root
        .join("target/restart-bench")
        .join(format!("agent-{}", &REVISION[..12]));
    let source = dir.join("src");
    if !source.join("Cargo.toml").exists() {
        extract(root, &source)?;
    }
    println!("==> the agent of {} (upgrade source)", &REVISION[..12]);
    crate::run_command(
        Command::new("cargo")
            .current_dir(&source)
            .args([
                "build",
                "--locked",
                "--package",
                "netwarden",
                "--target-dir",
            ])
            .arg(dir.join("target")),
    )?;
    Ok(dir.join("target/debug/netwarden"))
}

/// Writes the tree of [`REVISION`] to `source`, whole or not at all.
fn extract(root: &Path, source: &Path) -> anyhow::Result<()> {
    let partial = source.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    let mut archive = Command::new("git")
        .current_dir(root)
        .args(["archive", REVISION])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting git archive")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&partial)
        .stdin(archive.stdout.take().context("git archive stdout")?)
        .status()
        .context("starting tar")?;
    let archived = archive.wait()?;
    if !archived.success() || !tar.success() {
        bail!("extracting {REVISION}: git archive {archived}, tar {tar}");
    }
    fs::rename(&partial, source)?;
    Ok(())
}
