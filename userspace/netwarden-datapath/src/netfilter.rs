//! The hook after translation: `after_translation` as a `BPF_PROG_TYPE_NETFILTER` program on
//! the node's `POSTROUTING` and `LOCAL_IN` hooks, after source NAT (see
//! `ebpf/netwarden-ebpf/src/translated.rs` for what it decides).
//!
//! aya 0.14 has no netfilter program type, so the program is parsed and relocated with
//! aya-obj (the same object, against the maps the classifiers already pinned) and loaded and
//! attached with the `bpf(2)` commands themselves. Its links are pinned under
//! `links/netfilter-<family>-<hook>`: they outlive the agent like the classifiers' do. A
//! netfilter link cannot be updated in place, so a new agent attaches its own links first
//! and only then replaces the pins, which detaches the old ones: there is no moment without
//! the hook.
//!
//! The program reads kernel structures (`sk_buff`, `nf_conn`) at offsets taken from the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`): those structures are not ABI.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::CString,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use netwarden_common::{KernelLayout, conntrack_tuple, maps as pinned};

/// The program's name in the eBPF object.
pub const PROGRAM: &str = "after_translation";

/// Netfilter's hook priorities for the program: after source NAT (`NF_IP_PRI_NAT_SRC`, 100,
/// where kube-proxy masquerades), before conntrack confirms the connection (`INT_MAX`). Two,
/// because the kernel lets one BPF link only at a given priority of a hook: a new agent
/// attaches at whichever the previous one does not hold, then detaches the previous one.
pub const HOOK_PRIORITIES: [i32; 2] = [200, 201];

/// `NFPROTO_IPV4`, `NFPROTO_IPV6`.
const FAMILIES: [(u32, &str); 2] = [(2, "ipv4"), (10, "ipv6")];
/// `NF_INET_LOCAL_IN`, `NF_INET_POST_ROUTING`: every packet that went through PREROUTING's
/// destination NAT leaves through one of them.
const HOOKS: [(u32, &str); 2] = [(1, "local-in"), (4, "post-routing")];

/// `bpf(2)` commands and constants (`include/uapi/linux/bpf.h`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_NETFILTER: u32 = 32;
const BPF_NETFILTER: u32 = 45;

/// The hook after translation could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// The kernel's BTF could not be read or lacks a structure or field the program reads.
    #[error("kernel BTF: {0}")]
    Btf(String),
    /// The eBPF object could not be parsed or relocated.
    #[error("the eBPF object: {0}")]
    Object(String),
    /// A map the program uses could not be opened from its pin.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: String,
        /// Why.
        source: aya::maps::MapError,
    },
    /// A `bpf(2)` command failed.
    #[error("{what}: {source}{log}")]
    Syscall {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
        /// The verifier's log, for a load that failed.
        log: String,
    },
}

impl NetfilterError {
    /// The error's kind, as a metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Btf(_) => "btf",
            Self::Object(_) => "object",
            Self::Map { .. } => "map",
            Self::Syscall { .. } => "syscall",
        }
    }
}

/// Offsets of the kernel fields the program reads, from the running kernel's BTF.
pub fn kernel_layout(btf_path: &Path) -> Result<KernelLayout, NetfilterError> {
    let data = fs::read(btf_path)
        .map_err(|error| NetfilterError::Btf(format!("{}: {error}", btf_path.display())))?;
    let btf = Btf::parse(&data)?;
    let offset = |structure: &str, path: &[&str]| -> Result<u32, NetfilterError> {
        btf.member_offset(structure, path).ok_or_else(|| {
            NetfilterError::Btf(format!(
                "struct {structure} has no field {}",
                path.join(".")
            ))
        })
    };
    let tuplehash = offset("nf_conn", &["tuplehash"])?;
    let tuple_in_hash = offset("nf_conntrack_tuple_hash", &["tuple"])?;
    let hash_size = btf
        .struct_size("nf_conntrack_tuple_hash")
        .ok_or_else(|| NetfilterError::Btf("no struct nf_conntrack_tuple_hash".into()))?;
    // The program reads tuples at fixed offsets: check that this kernel lays them out so.
    for (path, expected) in [
        (&["src", "u3"][..], conntrack_tuple::SRC_ADDR),
        (&["src", "u"], conntrack_tuple::SRC_PORT),
        (&["src", "l3num"], conntrack_tuple::FAMILY),
        (&["dst", "u3"], conntrack_tuple::DST_ADDR),
        (&["dst", "u"], conntrack_tuple::DST_PORT),
        (&["dst", "protonum"], conntrack_tuple::PROTOCOL),
    ] {
        let found = offset("nf_conntrack_tuple", path)?;
        if usize::try_from(found).ok() != Some(expected) {
            return Err(NetfilterError::Btf(format!(
                "nf_conntrack_tuple.{} is at {found}, not {expected}",
                path.join(".")
            )));
        }
    }
    Ok(KernelLayout {
        valid: 1,
        skb_nfct: offset("sk_buff", &["_nfct"])?,
        skb_head: offset("sk_buff", &["head"])?,
        skb_network_header: offset("sk_buff", &["network_header"])?,
        conn_status: offset("nf_conn", &["status"])?,
        conn_original_tuple: tuplehash + tuple_in_hash,
        conn_reply_tuple: tuplehash + hash_size + tuple_in_hash,
        padding: 0,
    })
}

/// Loads `after_translation` from `object`: the maps it shares with the classifiers are
/// taken from their pins in `maps_dir`, its data sections (`.rodata`...) and unpinned caches
/// (`maps::UNPINNED`) from `loaded`, where aya created them for the classifiers.
pub fn load(object: &[u8], maps_dir: &Path, loaded: &Ebpf) -> Result<OwnedFd, NetfilterError> {
    let mut obj = aya_obj::Object::parse(object)
        .map_err(|error| NetfilterError::Object(error.to_string()))?;
    let mut fds: BTreeMap<String, RawFd> = BTreeMap::new();
    let mut opened = Vec::new();
    for name in obj.maps.keys() {
        if name.starts_with('.') {
            let Some(Map::Array(data)) = loaded.map(name) else {
                return Err(NetfilterError::Object(format!(
                    "data section {name} was not loaded"
                )));
            };
            fds.insert(name.clone(), data.fd().as_fd().as_raw_fd());
            continue;
        }
        if pinned::UNPINNED.iter().any(|map| map.name == name) {
            // A cache of this load's, not pinned: the one aya created for the classifiers.
            let Some(Map::Array(data)) = loaded.map(name) else {
                return Err(NetfilterError::Object(format!(
                    "map {name} was not loaded as an array"
                )));
            };
            fds.insert(name.clone(), data.fd().as_fd().as_raw_fd());
            continue;
        }
        let data =
            MapData::from_pin(maps_dir.join(name)).map_err(|source| NetfilterError::Map {
                name: name.clone(),
                source,
            })?;
        fds.insert(name.clone(), data.fd().as_fd().as_raw_fd());
        // Kept open until the program is loaded: the kernel takes its own references then.
        opened.push(data);
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(name, map)| (name.clone(), fds[name], map.clone()))
        .collect();
    obj.relocate_maps(
        maps.iter().map(|(name, fd, map)| (name.as_str(), *fd, map)),
        &text_sections,
    )
    .map_err(|error| NetfilterError::Object(error.to_string()))?;
    obj.relocate_calls(&text_sections)
        .map_err(|error| NetfilterError::Object(error.to_string()))?;
    let program = obj
        .programs
        .get(PROGRAM)
        .ok_or_else(|| NetfilterError::Object(format!("no program {PROGRAM}")))?;
    let function = &obj.functions[&program.function_key()];
    let license = program.license.clone();
    let loaded = prog_load(&function.instructions, &license);
    drop(opened);
    loaded
}

/// Attaches `program` to every family and hook, pins the links under `links_dir`, and
/// replaces the pins of a previous agent's links (which detaches them).
pub fn attach(program: &OwnedFd, links_dir: &Path) -> Result<Vec<PathBuf>, NetfilterError> {
    let mut created = Vec::new();
    for (family, family_name) in FAMILIES {
        for (hook, hook_name) in HOOKS {
            let mut attached = link_create(program, family, hook, HOOK_PRIORITIES[0]);
            if matches!(&attached, Err(error) if error.raw_os_error() == Some(libc::EBUSY)) {
                attached = link_create(program, family, hook, HOOK_PRIORITIES[1]);
            }
            let link = attached.map_err(|source| NetfilterError::Syscall {
                what: format!("attaching the netfilter hook ({family_name} {hook_name})"),
                source,
                log: String::new(),
            })?;
            created.push((
                links_dir.join(format!("netfilter-{family_name}-{hook_name}")),
                link,
            ));
        }
    }
    // Every new link is attached before any old one goes.
    let mut pins = Vec::new();
    for (pin, link) in created {
        let _ = fs::remove_file(&pin);
        obj_pin(&link, &pin).map_err(|source| NetfilterError::Syscall {
            what: format!("pinning {}", pin.display()),
            source,
            log: String::new(),
        })?;
        pins.push(pin);
    }
    Ok(pins)
}

/// Removes the pins (and so the links) of the hook, for `netwarden` teardown and tests.
pub fn detach(links_dir: &Path) {
    for (_, family_name) in FAMILIES {
        for (_, hook_name) in HOOKS {
            let _ = fs::remove_file(links_dir.join(format!("netfilter-{family_name}-{hook_name}")));
        }
    }
}

fn bpf(command: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a buffer of the size passed, laid out as the command's `union
    // bpf_attr` member; the kernel reads (and for some commands writes) within it.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn fd_of(result: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(result as RawFd) }
}

fn put(attr: &mut [u8], offset: usize, bytes: &[u8]) {
    attr[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// `BPF_PROG_LOAD` of a netfilter program; on failure, loads it again with the verifier's
/// log, for the error.
fn prog_load(
    instructions: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd, NetfilterError> {
    let attempt = |log: &mut Vec<u8>| -> io::Result<OwnedFd> {
        // struct { prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
        // kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type }
        let mut attr = [0_u8; 72];
        put(&mut attr, 0, &BPF_PROG_TYPE_NETFILTER.to_ne_bytes());
        let count = u32::try_from(instructions.len()).unwrap_or(u32::MAX);
        put(&mut attr, 4, &count.to_ne_bytes());
        put(&mut attr, 8, &(instructions.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        if !log.is_empty() {
            put(&mut attr, 24, &1_u32.to_ne_bytes());
            let size = u32::try_from(log.len()).unwrap_or(u32::MAX);
            put(&mut attr, 28, &size.to_ne_bytes());
            put(&mut attr, 32, &(log.as_mut_ptr() as u64).to_ne_bytes());
        }
        put(&mut attr, 48, b"nw_translated\0");
        put(&mut attr, 68, &BPF_NETFILTER.to_ne_bytes());
        bpf(BPF_PROG_LOAD, &mut attr).map(fd_of)
    };
    attempt(&mut Vec::new()).or_else(|source| {
        let mut log = vec![0_u8; 1 << 26];
        let retried = attempt(&mut log);
        let written = verifier_log(&log);
        if let Ok(path) = std::env::var("NETWARDEN_VERIFIER_LOG") {
            let _ = fs::write(path, written);
        }
        // The end of the log says why; the kernel keeps the log's end when it overflows.
        let tail = String::from_utf8_lossy(&written[written.len().saturating_sub(2048)..]);
        retried.map_err(|_| NetfilterError::Syscall {
            what: format!("loading {PROGRAM}"),
            source,
            log: format!("\n{tail}"),
        })
    })
}

/// The verifier's log in `buffer`: the string the kernel wrote, up to its terminating NUL.
/// What follows the NUL is not the log: at log level 1 the verifier winds its log back to the
/// branch point each time a path proves safe, so the bytes of longer, abandoned paths stay
/// after the end (the last non-zero byte of the buffer can lie far past the error).
fn verifier_log(buffer: &[u8]) -> &[u8] {
    let end = buffer
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(buffer.len());
    &buffer[..end]
}

/// How many instructions the verifier processed to load `program`, as the kernel shows it in
/// the descriptor's fdinfo (`verified_insns:`, Linux >= 5.16; `None` before). aya reads this
/// only for programs it loaded itself, and it did not load this one.
pub fn verified_instructions(program: &OwnedFd) -> io::Result<Option<u32>> {
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{}", program.as_raw_fd()))?;
    Ok(fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("verified_insns:"))
        .and_then(|count| count.trim().parse().ok()))
}

/// `BPF_LINK_CREATE` of a netfilter link.
fn link_create(program: &OwnedFd, family: u32, hook: u32, priority: i32) -> io::Result<OwnedFd> {
    // struct { prog_fd, target_fd, attach_type, flags, netfilter { pf, hooknum, priority,
    // flags } }
    let mut attr = [0_u8; 32];
    let program = u32::try_from(program.as_raw_fd()).unwrap_or(u32::MAX);
    put(&mut attr, 0, &program.to_ne_bytes());
    put(&mut attr, 8, &BPF_NETFILTER.to_ne_bytes());
    put(&mut attr, 16, &family.to_ne_bytes());
    put(&mut attr, 20, &hook.to_ne_bytes());
    put(&mut attr, 24, &priority.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_of)
}

/// `BPF_OBJ_PIN` of `object` at `path`.
fn obj_pin(object: &OwnedFd, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct { pathname, bpf_fd, file_flags }
    let mut attr = [0_u8; 16];
    put(&mut attr, 0, &(path.as_ptr() as u64).to_ne_bytes());
    let fd = u32::try_from(object.as_raw_fd()).unwrap_or(u32::MAX);
    put(&mut attr, 8, &fd.to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Just enough of a BTF reader to find where a structure's fields lie. It reads the records
/// where they lie in `data` and keeps only where each begins: the kernel's BTF has ~100,000
/// types, and decoding them all into vectors took ~12 MiB at the agent's first apply, when its
/// memory peaks anyway.
struct Btf<'a> {
    data: &'a [u8],
    /// Where the record of each type begins in `data`, by id - 1 (id 0 is `void`).
    type_offsets: Vec<u32>,
    strings: &'a [u8],
}

/// The fixed part of a type's record.
struct BtfType {
    name: u32,
    kind: u32,
    /// The size (structures) or the referred type (typedefs, qualifiers).
    size_or_type: u32,
    /// How many members (structures and unions), and where the first begins in `data`.
    vlen: usize,
    members_at: usize,
    /// Member offsets hold a bitfield size in their top 8 bits.
    bitfields: bool,
}

struct BtfMember {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

const BTF_KIND_STRUCT: u32 = 4;
const BTF_KIND_UNION: u32 = 5;
const BTF_KIND_TYPEDEF: u32 = 8;
const BTF_KIND_VOLATILE: u32 = 9;
const BTF_KIND_CONST: u32 = 10;
const BTF_KIND_RESTRICT: u32 = 11;
const BTF_KIND_TYPE_TAG: u32 = 18;

/// A type's record begins with its name, its info word and its size or referred type.
const TYPE_HEADER: usize = 12;
/// A structure's member: name, type, offset.
const MEMBER: usize = 12;

/// The native-endian word at `at` in `data`.
fn word(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|bytes| u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, NetfilterError> {
        let bad = |what: &str| NetfilterError::Btf(format!("malformed: {what}"));
        let word = |at: usize| word(data, at).ok_or_else(|| bad("truncated"));
        if data.get(0..2) != Some(&0xeb9f_u16.to_ne_bytes()[..]) {
            return Err(bad("magic"));
        }
        let header_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or_else(|| bad("string section"))?;
        let mut type_offsets = Vec::new();
        let mut at = header_len + type_off;
        let end = at + type_len;
        while at < end {
            type_offsets.push(u32::try_from(at).map_err(|_| bad("too large"))?);
            let info = word(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            at += TYPE_HEADER
                + match kind {
                    1 | 14 | 17 => 4,
                    3 => 12,
                    BTF_KIND_STRUCT | BTF_KIND_UNION => MEMBER * vlen,
                    6 | 13 => 8 * vlen,
                    15 | 19 => 12 * vlen,
                    _ => 0,
                };
        }
        // The last type's members must lie within the data.
        if at > data.len() {
            return Err(bad("truncated"));
        }
        Ok(Self {
            data,
            type_offsets,
            strings,
        })
    }

    /// The fixed part of the record at `at`.
    fn record(&self, at: usize) -> Option<BtfType> {
        let info = word(self.data, at + 4)?;
        Some(BtfType {
            name: word(self.data, at)?,
            kind: (info >> 24) & 0x1f,
            size_or_type: word(self.data, at + 8)?,
            vlen: (info & 0xffff) as usize,
            members_at: at + TYPE_HEADER,
            bitfields: info >> 31 != 0,
        })
    }

    /// The members of structure or union `aggregate`.
    fn members(&self, aggregate: &BtfType) -> impl Iterator<Item = BtfMember> + '_ {
        let (first, bitfields) = (aggregate.members_at, aggregate.bitfields);
        (0..aggregate.vlen).filter_map(move |index| {
            let at = first + index * MEMBER;
            let offset = word(self.data, at + 8)?;
            Some(BtfMember {
                name: word(self.data, at)?,
                type_id: word(self.data, at + 4)?,
                bit_offset: if bitfields {
                    offset & 0x00ff_ffff
                } else {
                    offset
                },
            })
        })
    }

    fn name(&self, offset: u32) -> &str {
        let start = offset as usize;
        let rest = self.strings.get(start..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|byte| *byte == 0)
            .unwrap_or(rest.len());
        std::str::from_utf8(&rest[..len]).unwrap_or_default()
    }

    fn get(&self, id: u32) -> Option<BtfType> {
        let at = *self.type_offsets.get((id as usize).checked_sub(1)?)?;
        self.record(at as usize)
    }

    /// The structure named `name`.
    fn find_struct(&self, name: &str) -> Option<BtfType> {
        self.type_offsets
            .iter()
            .filter_map(|at| self.record(*at as usize))
            .find(|t| t.kind == BTF_KIND_STRUCT && self.name(t.name) == name)
    }

    fn struct_size(&self, name: &str) -> Option<u32> {
        self.find_struct(name).map(|t| t.size_or_type)
    }

    /// The structure or union behind typedefs and qualifiers of type `id`.
    fn aggregate(&self, mut id: u32) -> Option<BtfType> {
        loop {
            let t = self.get(id)?;
            match t.kind {
                BTF_KIND_STRUCT | BTF_KIND_UNION => return Some(t),
                BTF_KIND_TYPEDEF | BTF_KIND_VOLATILE | BTF_KIND_CONST | BTF_KIND_RESTRICT
                | BTF_KIND_TYPE_TAG => id = t.size_or_type,
                _ => return None,
            }
        }
    }

    /// The byte offset of field `name` in `aggregate`, looking through anonymous members,
    /// and the field's type.
    fn field(&self, aggregate: &BtfType, name: &str) -> Option<(u32, u32)> {
        for member in self.members(aggregate) {
            if self.name(member.name) == name {
                return Some((member.bit_offset / 8, member.type_id));
            }
            if member.name == 0
                && let Some(inner) = self.aggregate(member.type_id)
                && let Some((offset, type_id)) = self.field(&inner, name)
            {
                return Some((member.bit_offset / 8 + offset, type_id));
            }
        }
        None
    }

    /// The byte offset of the field at `path` (`["dst", "protonum"]`) in struct `structure`.
    fn member_offset(&self, structure: &str, path: &[&str]) -> Option<u32> {
        let mut current = self.find_struct(structure)?;
        let mut offset = 0;
        for (index, name) in path.iter().enumerate() {
            let (at, type_id) = self.field(&current, name)?;
            offset += at;
            if index + 1 < path.len() {
                current = self.aggregate(type_id)?;
            }
        }
        Some(offset)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{kernel_layout, verifier_log};

    /// As a failed load left it on this kernel: the error, then the NUL, then the stale
    /// bytes of a path the verifier wound back.
    #[test]
    fn the_verifier_log_ends_at_its_nul_not_at_stale_bytes_after_it() {
        let mut buffer =
            b"combined stack size of 5 calls is 544. Too large\nprocessed 120412 insns\n\0"
                .to_vec();
        buffer.extend_from_slice(b"  -8) = r1 ; R1=0 R10=fp0\nfrom 1440 to 2358: safe\n");
        buffer.resize(buffer.len() + 64, 0);
        assert_eq!(
            verifier_log(&buffer),
            b"combined stack size of 5 calls is 544. Too large\nprocessed 120412 insns\n"
        );
        assert_eq!(verifier_log(b"no terminator"), b"no terminator");
        assert_eq!(verifier_log(&[0; 8]), b"");
    }

    /// The layout of the running kernel, where it publishes its BTF.
    #[test]
    fn this_kernels_layout_is_found_and_plausible() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipped: this kernel publishes no BTF");
            return;
        }
        let layout = kernel_layout(path).expect("the running kernel's BTF has every field");
        assert_eq!(layout.valid, 1);
        // Both tuples lie in one nf_conn, one tuple hash apart, after its status word.
        assert!(layout.conn_reply_tuple > layout.conn_original_tuple);
        assert_ne!(layout.skb_head, layout.skb_network_header);
        assert_ne!(layout.skb_nfct, 0);
    }
}
