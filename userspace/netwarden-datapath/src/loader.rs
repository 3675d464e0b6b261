//! Loading the programs against the pinned maps (adopting a previous agent's pins), and
//! reading back what those maps hold.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier},
};
use netwarden_common::{KernelLayout, PeerId, maps as pinned};
use netwarden_policy::{CompiledPolicy, PolicyId};
use tracing::{info, warn};

use crate::{
    attach::Hook,
    bpffs::{self, PinLayout},
    conntrack,
    error::DatapathError,
    maps::{
        SyncedMaps,
        addresses::Addresses,
        endpoints::Endpoints,
        epoch::Epoch,
        frontends::Frontends,
        identities::Identities,
        ipcache::IpCache,
        policies::{ExactWritten, Policies, PolicyTables},
    },
    upgrade,
};

/// The compiled eBPF object, built by `build.rs`.
pub(crate) static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwarden-tc"));

/// Map sizes (entries). Defaults fit a node with ~250 pods in a cluster of ~60,000 pods; what
/// each map costs at these sizes is in docs/design.md ("Map memory").
#[derive(Clone, Debug)]
pub struct Capacity {
    /// Local endpoints.
    pub endpoints: u32,
    /// Pod and node addresses in the IP cache.
    pub ipcache: u32,
    /// Policy entries over all endpoints.
    pub policy: u32,
    /// CIDR prefixes over all policies, of each IP family.
    pub cidrs: u32,
    /// Tracked flows, of each IP family; also the size of the table of translated flows. These
    /// LRU tables are preallocated: their size is what they cost, used or not.
    pub conntrack: u32,
}

/// Default size of each conntrack table: 65,536 flows per IP family is ~600 concurrent flows
/// for each of a node's 110 pods (a flow between two local pods takes an entry on each), and
/// costs ~7 MiB (IPv4) and ~8.5 MiB (IPv6) of kernel memory. Busier nodes raise it with
/// `--conntrack-entries`; a full table evicts its least recently used flow.
pub const CONNTRACK_ENTRIES: u32 = pinned::CONNTRACK_V4.capacity;

// One `cidrs` for both tries, one `conntrack` for both flow tables and the table of translated
// flows: their defaults must agree.
const _: () = {
    assert!(pinned::CIDRS_V4.capacity == pinned::CIDRS_V6.capacity);
    assert!(pinned::CONNTRACK_V4.capacity == pinned::CONNTRACK_V6.capacity);
    assert!(pinned::CONNTRACK_V4.capacity == pinned::TRANSLATIONS.capacity);
    assert!(pinned::POLICY_EXACT.capacity == pinned::POLICY.capacity / 4);
    assert!(pinned::CIDRS_V4_EXACT.capacity == pinned::CIDRS_V4.capacity / 4);
};

impl Capacity {
    /// Entries of `POLICY_EXACT`, the hash that takes `POLICY`'s exact entries while it has
    /// room: a quarter of `policy`, as the programs declare it. Its buckets cost memory whether
    /// used or not, and an entry it has no room for goes to the trie. 0 (a policy map of under
    /// four entries): unused, every entry goes to the trie.
    #[must_use]
    pub fn exact_policy(&self) -> u32 {
        self.policy / 4
    }

    /// Entries of `CIDRS_V4_EXACT`, the hash that takes `CIDRS_V4`'s single addresses (`/32`
    /// blocks) while it has room: a quarter of `cidrs`, as [`Self::exact_policy`] is of
    /// `policy`.
    #[must_use]
    pub fn exact_cidrs_v4(&self) -> u32 {
        self.cidrs / 4
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            endpoints: pinned::ENDPOINTS.capacity,
            ipcache: pinned::IPCACHE.capacity,
            policy: pinned::POLICY.capacity,
            cidrs: pinned::CIDRS_V4.capacity,
            conntrack: CONNTRACK_ENTRIES,
        }
    }
}

/// What a previous agent left in the pinned maps, for the compiler to continue from.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Identity numbers by [`netwarden_policy::IdentityInfo::digest`].
    pub identities: HashMap<[u8; 32], PeerId>,
    /// The highest policy id in the maps.
    pub highest_policy_id: PolicyId,
    /// Each policy in the maps, read back (entries with their rule ids, CIDR prefixes with
    /// their classes), for the compiler to keep the ids of unchanged policies
    /// ([`netwarden_policy::Compiler::adopt_pinned_policies`]).
    pub policies: BTreeMap<PolicyId, CompiledPolicy>,
    /// Which endpoints (by interface index) use each pinned policy, in either direction.
    pub policy_users: BTreeMap<PolicyId, BTreeSet<u32>>,
}

/// The loaded object and where it pins things: what attaching and loading more programs needs.
pub(crate) struct Kernel {
    pub ebpf: Ebpf,
    pub layout: PinLayout,
    /// `KERNEL_LAYOUT`: offsets of the kernel fields the hook after translation reads, written
    /// before it is loaded.
    pub field_offsets: Array<MapData, KernelLayout>,
    #[cfg(feature = "test-support")]
    pub faults: crate::faults::Faults,
}

/// Everything [`open`] took out of the loaded object.
pub(crate) struct Opened {
    pub kernel: Kernel,
    pub maps: SyncedMaps,
    pub verdicts: PerCpuArray<MapData, u64>,
    pub events: RingBuf<MapData>,
    pub inherited: Inherited,
}

/// Loads the programs with maps pinned under `bpffs` (adopting existing pins) and reads back
/// what the maps hold.
pub(crate) fn open(bpffs: &Path, capacity: &Capacity) -> Result<Opened, DatapathError> {
    let layout = PinLayout::new(bpffs);
    bpffs::prepare(bpffs, &layout).map_err(|source| DatapathError::Bpffs {
        path: bpffs.to_owned(),
        source,
    })?;
    let maps_dir = layout.maps();
    upgrade::replace_outdated_pins(&maps_dir).map_err(|source| DatapathError::Bpffs {
        path: maps_dir.clone(),
        source,
    })?;
    let sizes = [
        (pinned::ENDPOINTS.name, capacity.endpoints),
        (pinned::IPCACHE.name, capacity.ipcache),
        (pinned::POLICY.name, capacity.policy),
        // The kernel makes no map of no entries.
        (pinned::POLICY_EXACT.name, capacity.exact_policy().max(1)),
        (
            pinned::CIDRS_V4_EXACT.name,
            capacity.exact_cidrs_v4().max(1),
        ),
        (pinned::CIDRS_V4.name, capacity.cidrs),
        (pinned::CIDRS_V6.name, capacity.cidrs),
        (conntrack::TABLE_V4, capacity.conntrack),
        (conntrack::TABLE_V6, capacity.conntrack),
        (pinned::TRANSLATIONS.name, capacity.conntrack),
    ];
    report_adopted_differences(&maps_dir, &sizes);
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&maps_dir);
    for (name, entries) in sizes {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader.load(PROGRAMS)?;
    for hook in Hook::ALL {
        let name = hook.program();
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        program
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    conntrack::pin_clock(&mut ebpf, &layout)?;

    let maps = SyncedMaps {
        ipcache: IpCache::adopt(take_map(&mut ebpf, pinned::IPCACHE.name)?),
        policies: Policies::adopt(
            PolicyTables {
                entries_exact: take_map(&mut ebpf, pinned::POLICY_EXACT.name)?,
                entries: take_map(&mut ebpf, pinned::POLICY.name)?,
                cidrs_v4_exact: take_map(&mut ebpf, pinned::CIDRS_V4_EXACT.name)?,
                cidrs_v4: take_map(&mut ebpf, pinned::CIDRS_V4.name)?,
                cidrs_v6: take_map(&mut ebpf, pinned::CIDRS_V6.name)?,
            },
            ExactWritten {
                entries: capacity.exact_policy() > 0,
                cidrs_v4: capacity.exact_cidrs_v4() > 0,
            },
        ),
        endpoints: Endpoints::adopt(take_map(&mut ebpf, pinned::ENDPOINTS.name)?),
        addresses: Addresses::adopt(
            take_map(&mut ebpf, pinned::ENDPOINT_ADDRESSES.name)?,
            take_map(&mut ebpf, pinned::ENDPOINT_OF_ADDRESS.name)?,
        ),
        identities: Identities::adopt(take_map(&mut ebpf, pinned::IDENTITIES.name)?),
        frontends: Frontends::adopt(take_map(&mut ebpf, pinned::FRONTENDS.name)?),
        epoch: Epoch::new(Box::new(take_map::<Array<MapData, u32>>(
            &mut ebpf,
            pinned::EPOCH.name,
        )?)),
        settings: Box::new(take_map::<Array<MapData, u32>>(
            &mut ebpf,
            pinned::SETTINGS.name,
        )?),
    };
    let inherited = inherited(&maps);
    Ok(Opened {
        verdicts: take_map(&mut ebpf, pinned::VERDICTS.name)?,
        events: take_map(&mut ebpf, pinned::EVENTS.name)?,
        kernel: Kernel {
            field_offsets: take_map(&mut ebpf, pinned::KERNEL_LAYOUT.name)?,
            ebpf,
            layout,
            #[cfg(feature = "test-support")]
            faults: crate::faults::Faults::default(),
        },
        maps,
        inherited,
    })
}

/// What the compiler needs to know of the maps a previous agent left.
fn inherited(maps: &SyncedMaps) -> Inherited {
    let endpoints = maps.endpoints.installed();
    let highest_policy_id = maps
        .policies
        .ids()
        .chain(
            endpoints
                .values()
                .flat_map(|endpoint| [endpoint.ingress_policy, endpoint.egress_policy]),
        )
        .max()
        .unwrap_or(0);
    let policies = maps.policies.pinned();
    if !endpoints.is_empty() {
        info!(
            endpoints = endpoints.len(),
            policies = policies.len(),
            "adopting pinned datapath state"
        );
    }
    Inherited {
        identities: maps.identities.inherited(),
        highest_policy_id,
        policies,
        policy_users: endpoints.iter().fold(
            BTreeMap::new(),
            |mut users: BTreeMap<PolicyId, BTreeSet<u32>>, (ifindex, endpoint)| {
                for id in [endpoint.ingress_policy, endpoint.egress_policy] {
                    if id != 0 {
                        users.entry(id).or_default().insert(*ifindex);
                    }
                }
                users
            },
        ),
    }
}

/// Warns about each pin the loader is about to adopt although this build would create it with
/// other flags or another size (`sizes`: the entries asked for, by map name; other maps as the
/// programs declare them).
fn report_adopted_differences(maps_dir: &Path, sizes: &[(&str, u32)]) {
    if !maps_dir.exists() {
        return;
    }
    let Ok(object) = aya_obj::Object::parse(PROGRAMS) else {
        return;
    };
    let wanted = object.maps.iter().map(|(name, map)| {
        let entries = sizes
            .iter()
            .find_map(|(sized, entries)| (sized == name).then_some(*entries))
            .unwrap_or_else(|| map.max_entries());
        (name.as_str(), map.map_flags(), entries)
    });
    for difference in upgrade::adopted_differences(maps_dir, wanted) {
        warn!(
            map = difference.name,
            pinned_flags = difference.flags.0,
            flags = difference.flags.1,
            pinned_entries = difference.max_entries.0,
            entries = difference.max_entries.1,
            "adopting a pinned map as an earlier build created it; it keeps its flags and size (and memory) until its pin is removed"
        );
    }
}

/// Takes map `name` out of the loaded object as a `T`.
pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Map {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use netwarden_common::maps as pinned;

    use super::{Capacity, PROGRAMS};

    /// Maps of the object that are not shared ones: the data sections of the programs.
    fn is_section(name: &str) -> bool {
        name.starts_with('.')
    }

    #[test]
    fn every_map_of_the_programs_is_named_and_sized_by_netwarden_common() {
        let object = aya_obj::Object::parse(PROGRAMS).expect("the compiled programs parse");
        let declared: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !is_section(name))
            .collect();
        let named: BTreeSet<&str> = pinned::ALL
            .iter()
            .chain(&pinned::UNPINNED)
            .map(|map| map.name)
            .collect();
        assert_eq!(declared, named);
        for map in pinned::ALL.iter().chain(&pinned::UNPINNED) {
            assert_eq!(
                object.maps[map.name].max_entries(),
                map.capacity,
                "{} as the programs declare it",
                map.name
            );
        }
    }

    #[test]
    fn every_map_the_loader_opens_or_sizes_is_a_shared_one() {
        let capacity = Capacity::default();
        let named: BTreeSet<&str> = pinned::ALL.iter().map(|map| map.name).collect();
        let opened = [
            pinned::ENDPOINTS,
            pinned::ENDPOINT_ADDRESSES,
            pinned::ENDPOINT_OF_ADDRESS,
            pinned::IPCACHE,
            pinned::POLICY,
            pinned::POLICY_EXACT,
            pinned::CIDRS_V4,
            pinned::CIDRS_V4_EXACT,
            pinned::CIDRS_V6,
            pinned::IDENTITIES,
            pinned::FRONTENDS,
            pinned::EPOCH,
            pinned::SETTINGS,
            pinned::VERDICTS,
            pinned::EVENTS,
            pinned::KERNEL_LAYOUT,
            pinned::MTLS_STRICT_ENDPOINTS,
            pinned::MTLS_EXEMPT_PORTS,
        ]
        .map(|map| map.name);
        for name in opened
            .into_iter()
            .chain([crate::conntrack::TABLE_V4, crate::conntrack::TABLE_V6])
        {
            assert!(named.contains(name), "{name} is not in maps::ALL");
        }
        // The defaults are the sizes the programs declare.
        assert_eq!(capacity.endpoints, pinned::ENDPOINTS.capacity);
        assert_eq!(capacity.ipcache, pinned::IPCACHE.capacity);
        assert_eq!(capacity.policy, pinned::POLICY.capacity);
        assert_eq!(capacity.exact_policy(), pinned::POLICY_EXACT.capacity);
        assert_eq!(capacity.exact_cidrs_v4(), pinned::CIDRS_V4_EXACT.capacity);
        assert_eq!(capacity.cidrs, pinned::CIDRS_V6.capacity);
        assert_eq!(capacity.conntrack, pinned::CONNTRACK_V6.capacity);
        assert_eq!(capacity.conntrack, pinned::TRANSLATIONS.capacity);
    }
}
