//! What the agent leaves in its bpffs: the pinned objects, and the entries of its pinned maps
//! as the kernel holds them. The agent's own metrics count what it wrote; a leak is an entry it
//! forgot, so only the kernel's view can show one.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// `bpf(2)` commands (`include/uapi/linux/bpf.h`).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Map types whose entries come and go (hash tables, LRU tables, tries); arrays always hold
/// `max_entries` and ring buffers hold no keys, so counting them says nothing.
const KEYED_MAP_TYPES: [u32; 6] = [
    1,  // BPF_MAP_TYPE_HASH
    5,  // BPF_MAP_TYPE_PERCPU_HASH
    9,  // BPF_MAP_TYPE_LRU_HASH
    10, // BPF_MAP_TYPE_LRU_PERCPU_HASH
    11, // BPF_MAP_TYPE_LPM_TRIE
    13, // BPF_MAP_TYPE_HASH_OF_MAPS
];

/// Where netwarden pins its maps under a bpffs (`netwarden_datapath::bpffs::PinLayout`).
fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("netwarden").join("v1").join("maps")
}

/// Every pinned object under `bpffs`, as paths relative to it.
pub fn pins(bpffs: &Path) -> io::Result<BTreeSet<PathBuf>> {
    let mut found = BTreeSet::new();
    let mut pending = vec![bpffs.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else if let Ok(relative) = entry.path().strip_prefix(bpffs) {
                found.insert(relative.to_owned());
            }
        }
    }
    Ok(found)
}

/// The interface index of a pinned TCX link (`…/links/<ifindex>-<hook>`), if `pin` is one.
#[must_use]
pub fn link_ifindex(pin: &Path) -> Option<u32> {
    let parent = pin.parent()?;
    if parent.file_name()? != "links" {
        return None;
    }
    let name = pin.file_name()?.to_str()?;
    name.split_once('-')?.0.parse().ok()
}

/// The keys of every keyed map the agent pinned, by the map's pinned name.
pub fn map_keys(bpffs: &Path) -> io::Result<BTreeMap<String, BTreeSet<Vec<u8>>>> {
    let mut keys = BTreeMap::new();
    for entry in fs::read_dir(maps_dir(bpffs))? {
        let entry = entry?;
        let map = open_pinned(&entry.path())?;
        let info = map_info(&map)?;
        if KEYED_MAP_TYPES.contains(&info.map_type) {
            keys.insert(
                entry.file_name().to_string_lossy().into_owned(),
                read_keys(&map, &info)?,
            );
        }
    }
    Ok(keys)
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info`: the kernel fills what fits in `info_len`.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Calls `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `T` must be the prefix of `union bpf_attr` that `cmd` reads, and every pointer in `attr`
/// must point to memory valid for the length the kernel will read or write through it.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`'s layout and the buffers it points to; `attr`
    // itself lives across the call and its size is passed with it.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `ObjGetAttr` is the head of `bpf_attr` for BPF_OBJ_GET; `pathname` points to a
    // NUL-terminated string that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("file descriptor out of range"))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn map_info(map: &OwnedFd) -> io::Result<MapInfo> {
    let mut info = MapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_number(map),
        info_len: u32::try_from(size_of::<MapInfo>()).expect("a few bytes"),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `InfoAttr` is the head of `bpf_attr` for BPF_OBJ_GET_INFO_BY_FD; `info` points to
    // `info_len` writable bytes that outlive the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info)
}

fn fd_number(fd: &OwnedFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("an open descriptor is not negative")
}

/// Walks the map's keys. A key deleted under the walk sends it back to the first key, so it
/// stops at the first key seen twice: it may then miss a few keys of a map that changes
/// (conntrack), never count one twice.
fn read_keys(map: &OwnedFd, info: &MapInfo) -> io::Result<BTreeSet<Vec<u8>>> {
    let size = info.key_size as usize;
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut current: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; size];
        let mut attr = NextKeyAttr {
            map_fd: fd_number(map),
            _pad: 0,
            key: current.as_ref().map_or(0, |key| key.as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: `NextKeyAttr` is the head of `bpf_attr` for BPF_MAP_GET_NEXT_KEY; `key` is
        // null (the first key) or points to `key_size` readable bytes, `next_key` to
        // `key_size` writable bytes, both alive across the call.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(seen.into_iter().collect());
            }
            Err(error) => return Err(error),
        }
        if !seen.insert(next.clone()) || seen.len() > info.max_entries as usize {
            return Ok(seen.into_iter().collect());
        }
        current = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_their_interface() {
        assert_eq!(
            link_ifindex(Path::new("netwarden/v1/links/17-ingress")),
            Some(17)
        );
        assert_eq!(link_ifindex(Path::new("netwarden/v1/maps/POLICY")), None);
        assert_eq!(link_ifindex(Path::new("links")), None);
    }
}
