//! An agent of this build starts on a bpffs where a previous build pinned maps whose layout
//! has changed since (conntrack values grew by the mTLS flags, the verdict counters by two, and IPv4 flows
//! and prefixes got a conntrack table and a CIDR trie of their own).
//!
//! Needs root; skipped with a message otherwise.

use std::{ffi::CString, os::fd::FromRawFd as _, path::Path};

use netwarden_common::maps as pinned;
use netwarden_datapath::{Capacity, Datapath, bpffs::PinLayout};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
/// LPM tries must be created without preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Creates a map with the raw system call (aya only creates the maps of an object) and pins it
/// at `path`.
fn pin_map(path: &Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) {
    // `union bpf_attr` for BPF_MAP_CREATE starts with these four u32s; the rest stays zero.
    let mut create = [0_u32; 32];
    create[..4].copy_from_slice(&[map_type, key_size, value_size, max_entries]);
    if map_type == BPF_MAP_TYPE_LPM_TRIE {
        create[4] = BPF_F_NO_PREALLOC;
    }
    // SAFETY: the attribute buffer is valid, zero-padded and larger than the kernel reads for
    // this command; the call creates a new file descriptor and touches nothing else.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            create.as_ptr(),
            size_of_val(&create),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let fd = i32::try_from(fd).expect("a file descriptor");
    // SAFETY: the descriptor was just returned by the kernel and is owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in the path");
    // `union bpf_attr` for BPF_OBJ_PIN: u64 pathname, u32 bpf_fd, u32 file_flags.
    let mut pin = [0_u64; 8];
    pin[0] = path.as_ptr() as u64;
    pin[1] = u64::from(fd.cast_unsigned());
    // SAFETY: as above; `path` outlives the call.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), size_of_val(&pin)) };
    assert_eq!(
        result,
        0,
        "BPF_OBJ_PIN: {}",
        std::io::Error::last_os_error()
    );
    drop(owned);
}

/// A private bpffs in a temporary directory, and its pin layout; `None` (the test skipped)
/// without root.
fn private_bpffs() -> Option<(tempfile::TempDir, PinLayout)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loading eBPF programs needs root");
        return None;
    }
    let bpffs = tempfile::tempdir().expect("temp dir for bpffs");
    let layout = PinLayout::new(bpffs.path());
    netwarden_datapath::bpffs::prepare(bpffs.path(), &layout).expect("mount a private bpffs");
    Some((bpffs, layout))
}

#[test]
fn maps_pinned_with_an_older_layout_are_replaced() {
    let Some((bpffs, layout)) = private_bpffs() else {
        return;
    };
    // The layouts of the build before the mTLS screen: 8-byte flow state, 13 counters, and
    // one conntrack table for both IP families.
    pin_map(
        &layout.maps().join("CONNTRACK"),
        BPF_MAP_TYPE_LRU_HASH,
        44,
        8,
        1024,
    );
    pin_map(
        &layout.maps().join(pinned::CONNTRACK_V6.name),
        BPF_MAP_TYPE_LRU_HASH,
        44,
        8,
        1024,
    );
    // The IP cache when it was an LPM trie: a 4-byte prefix length before the address.
    pin_map(
        &layout.maps().join(pinned::IPCACHE.name),
        BPF_MAP_TYPE_LPM_TRIE,
        20,
        4,
        1024,
    );
    // One CIDR trie for both IP families: `(prefix length, policy, 16-byte address)` keys.
    pin_map(
        &layout.maps().join("CIDRS"),
        BPF_MAP_TYPE_LPM_TRIE,
        24,
        4,
        1024,
    );
    pin_map(
        &layout.maps().join(pinned::VERDICTS.name),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        8,
        13,
    );

    let verdicts = Datapath::open(bpffs.path(), &Capacity::default())
        .map(|(datapath, _)| datapath.verdicts().len())
        .map_err(|error| error.to_string());
    let retired_pins_left: Vec<&str> = pinned::RETIRED_NAMES
        .into_iter()
        .filter(|name| layout.maps().join(name).exists())
        .collect();
    let _ = nix::mount::umount2(bpffs.path(), nix::mount::MntFlags::MNT_DETACH);
    assert_eq!(
        verdicts.expect("the datapath loads over the old pins"),
        netwarden_common::counter::SLOTS as usize
    );
    assert!(
        retired_pins_left.is_empty(),
        "retired maps still pinned: {retired_pins_left:?}"
    );
}

#[test]
fn a_policy_map_of_one_rule_per_entry_is_rebuilt_with_the_cidr_tries() {
    let Some((bpffs, layout)) = private_bpffs() else {
        return;
    };
    // The build before ClusterNetworkPolicy tiers: a 4-byte rule id per entry, keyed by
    // `(prefix length, policy, peer, protocol, port)`; its IPv4 CIDR trie as today.
    let key_size = (size_of::<u32>() + size_of::<netwarden_common::PolicyKey>()) as u32;
    pin_map(
        &layout.maps().join(pinned::POLICY.name),
        BPF_MAP_TYPE_LPM_TRIE,
        key_size,
        4,
        1024,
    );
    let cidrs_v4_key = (size_of::<u32>() + size_of::<netwarden_common::CidrKeyV4>()) as u32;
    pin_map(
        &layout.maps().join(pinned::CIDRS_V4.name),
        BPF_MAP_TYPE_LPM_TRIE,
        cidrs_v4_key,
        size_of::<netwarden_common::CidrClass>() as u32,
        7,
    );
    // The previous agent's endpoints, naming its policies by id (same layout as today's).
    pin_map(
        &layout.maps().join(pinned::ENDPOINTS.name),
        BPF_MAP_TYPE_HASH,
        size_of::<u32>() as u32,
        size_of::<netwarden_common::Endpoint>() as u32,
        16,
    );
    let replaced = netwarden_datapath::upgrade::replace_outdated_pins(&layout.maps())
        .expect("replace the outdated pins");
    let opened = Datapath::open(bpffs.path(), &Capacity::default())
        .map(|_| ())
        .map_err(|error| error.to_string());
    let _ = nix::mount::umount2(bpffs.path(), nix::mount::MntFlags::MNT_DETACH);
    assert_eq!(
        replaced,
        [
            pinned::POLICY.name,
            pinned::CIDRS_V4.name,
            pinned::ENDPOINTS.name
        ],
        "the policy map, and the trie and endpoints that name its policies"
    );
    opened.expect("the datapath loads over the old pins");
}
