//! Failures a test can inject into the datapath's kernel calls (feature `test-support`), so the
//! agent's retries can be tested without a kernel that misbehaves. Not part of the production
//! API: the feature is enabled only from dev-dependencies and the benchmark crate.

use std::io;

use aya::{maps::MapError, sys::SyscallError};

/// How many of the next calls of each kind fail.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Program attachments (one per hook of an endpoint).
    pub attaches: u32,
    /// `ENDPOINTS` writes.
    pub endpoint_writes: u32,
    /// Attach clsact filters as on a kernel without TCX (any kernel can: netlink attachment
    /// works where TCX exists too).
    pub no_tcx: bool,
}

impl Faults {
    /// Whether the next attachment fails (and counts it).
    pub(crate) fn attach_fails(&mut self) -> bool {
        take(&mut self.attaches)
    }
}

/// The error an injected `ENDPOINTS` write failure returns: what a kernel out of memory says.
pub(crate) fn injected_map_error() -> MapError {
    MapError::SyscallError(SyscallError {
        call: "bpf_map_update_elem",
        io_error: io::Error::from_raw_os_error(libc::ENOMEM),
    })
}

fn take(remaining: &mut u32) -> bool {
    let fails = *remaining > 0;
    *remaining = remaining.saturating_sub(1);
    fails
}
