//! Where netwarden pins its maps and links.
//!
//! Pinned objects outlive the agent: a restarted or upgraded agent adopts them, so enforcement
//! never stops (a TCX link whose loader dies is detached unless it is pinned).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{mount::MsFlags, sys::statfs};

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin layout under a bpffs mount. The version segment changes whenever the map layout in
/// `netwarden-common` does, so an upgrade never adopts maps of another shape.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `bpffs` (usually `/sys/fs/bpf`).
    #[must_use]
    pub fn new(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join("netwarden").join("v1"),
        }
    }

    /// Directory of the pinned maps.
    #[must_use]
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Directory of the pinned TCX links.
    #[must_use]
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pin path of the program that reads the conntrack clock (see [`crate::conntrack`]).
    #[must_use]
    pub fn conntrack_clock(&self) -> PathBuf {
        self.root.join("programs").join("conntrack_clock")
    }

    /// Pin path of the link of one hook of one interface.
    #[must_use]
    pub fn link(&self, ifindex: u32, hook: &str) -> PathBuf {
        self.links().join(format!("{ifindex}-{hook}"))
    }
}

/// Makes sure `bpffs` is a bpf filesystem, mounting one there if it is not (as Cilium does), and
/// creates the pin directories.
pub fn prepare(bpffs: &Path, layout: &PinLayout) -> io::Result<()> {
    fs::create_dir_all(bpffs)?;
    if !is_bpffs(bpffs)? {
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(io::Error::from)?;
    }
    fs::create_dir_all(layout.maps())?;
    fs::create_dir_all(layout.links())?;
    if let Some(programs) = layout.conntrack_clock().parent() {
        fs::create_dir_all(programs)?;
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let stat = statfs::statfs(path).map_err(io::Error::from)?;
    #[expect(
        clippy::useless_conversion,
        reason = "the field's integer type differs between targets"
    )]
    let magic = i64::from(stat.filesystem_type().0);
    Ok(magic == BPF_FS_MAGIC)
}
