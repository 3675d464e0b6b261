//! What the datapath tests share: a private bpffs that is unmounted however the test ends, and
//! a node whose one endpoint is the loopback.

use std::{net::IpAddr, path::Path};

use netwarden_datapath::netlink::NodeNetwork;
use netwarden_model::Cluster;

/// The loopback: `BPF_PROG_TEST_RUN` needs an interface that exists, and nothing is sent.
pub const IFINDEX: u32 = 1;

/// A temporary directory for a private bpffs (mounted by `Datapath::open`). Created before
/// the datapath is opened, so a load that fails after mounting (a verifier error, a full disk)
/// still unmounts when the test panics.
pub struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    /// `None`, with a message, unless running as root.
    pub fn new() -> Option<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading eBPF programs needs root");
            return None;
        }
        Some(Self {
            dir: tempfile::tempdir().expect("temp dir for bpffs"),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // Not mounted yet (the test failed before opening) is fine too.
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A node whose only pod is behind the loopback, reached through host routes to `addresses`.
pub fn loopback_node(addresses: &[IpAddr]) -> NodeNetwork {
    NodeNetwork::behind_loopback(addresses)
}

/// The cluster `manifests` (one YAML stream) describe, as the manifest source reads it; the
/// fixture must be valid.
pub fn cluster_from(manifests: &str) -> Cluster {
    let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", manifests);
    assert!(errors.is_empty(), "fixture errors: {errors:?}");
    cluster
}
