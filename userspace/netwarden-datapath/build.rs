//! Builds the eBPF programs with the nightly toolchain, so a plain `cargo build` builds
//! everything (the aya-template way). The object lands in `OUT_DIR/netwarden-tc`.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata()?;
    aya_build::build_ebpf(
        [Package { name: "netwarden-ebpf", root_dir: &metadata, ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if the nightly toolchain, rust-src or bpf-linker is missing)")
}

fn cargo_metadata() -> anyhow::Result<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow!("{manifest_dir} has no workspace root two levels up"))?;
    Ok(root
        .join("ebpf/netwarden-ebpf")
        .to_string_lossy()
        .into_owned())
}
