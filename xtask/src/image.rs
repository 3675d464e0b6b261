//! `cargo xtask image`: the agent's container image from `deploy/Containerfile`, built with
//! whichever container engine is installed.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

/// Engines that build the Containerfile, in order of preference. All three take
/// `build -f FILE -t TAG CONTEXT`.
pub const ENGINES: [&str; 3] = ["docker", "podman", "buildah"];

/// The first of `candidates` found as an executable file in the directories of `path` (a
/// `PATH`-style list).
pub fn find_engine<'a>(candidates: &[&'a str], path: Option<&OsStr>) -> Option<&'a str> {
    let dirs: Vec<PathBuf> = path.map(|path| std::env::split_paths(path).collect())?;
    candidates
        .iter()
        .copied()
        .find(|name| dirs.iter().any(|dir| is_executable(&dir.join(name))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// The build command line, run from the repository's root.
#[must_use]
pub fn build_command(engine: &str, tag: &str) -> Vec<String> {
    [
        engine,
        "build",
        "-f",
        "deploy/Containerfile",
        "-t",
        tag,
        ".",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Builds the image tagged `tag` with `engine` (else the first engine found), or with
/// `dry_run` only prints the command.
pub fn build(tag: &str, engine: Option<&str>, dry_run: bool) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH");
    let engine = match engine {
        Some(engine) => engine.to_owned(),
        None => match find_engine(&ENGINES, path.as_deref()) {
            Some(engine) => engine.to_owned(),
            // A dry run shows what would run once an engine is installed.
            None if dry_run => {
                eprintln!(
                    "no container engine on PATH ({}); showing the docker command",
                    ENGINES.join(", ")
                );
                ENGINES[0].to_owned()
            }
            None => bail!(
                "no container engine found on PATH: install docker, podman or buildah (or name one with --engine)"
            ),
        },
    };
    let argv = build_command(&engine, tag);
    println!("{}", argv.join(" "));
    if dry_run {
        return Ok(());
    }
    crate::run_command(Command::new(&argv[0]).args(&argv[1..]))
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

    use super::{ENGINES, build_command, find_engine};

    fn fake_executable(dir: &Path, name: &str) {
        let path = dir.join(name);
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_first_engine_found_in_order_of_preference_builds() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([first.path(), second.path()]).unwrap();
        assert_eq!(find_engine(&ENGINES, Some(&path)), None);

        fake_executable(second.path(), "buildah");
        assert_eq!(find_engine(&ENGINES, Some(&path)), Some("buildah"));
        // Not executable: not an engine.
        fs::write(first.path().join("podman"), "").unwrap();
        assert_eq!(find_engine(&ENGINES, Some(&path)), Some("buildah"));
        fake_executable(second.path(), "podman");
        assert_eq!(find_engine(&ENGINES, Some(&path)), Some("podman"));
        fake_executable(first.path(), "docker");
        assert_eq!(find_engine(&ENGINES, Some(&path)), Some("docker"));
        assert_eq!(find_engine(&ENGINES, None), None, "no PATH at all");
    }

    #[test]
    fn the_containerfile_is_built_from_the_repository_root_with_the_tag() {
        assert_eq!(
            build_command("podman", "netwarden:dev"),
            [
                "podman",
                "build",
                "-f",
                "deploy/Containerfile",
                "-t",
                "netwarden:dev",
                "."
            ]
        );
    }
}
