//! netwarden's datapath in the kernel, seen from userspace.
//!
//! [`Datapath::open`] loads the TC programs, adopting the maps and links a previous agent
//! pinned; [`Datapath::apply`] makes the maps and attachments match a compiled
//! [`DatapathState`], in an order that never lets a packet see a half-written policy:
//!
//! 1. new policies are written under ids no endpoint uses yet;
//! 2. each endpoint is switched to its new policies in one map write;
//! 3. programs are attached to new endpoints (their map entry exists first, so they enforce
//!    from the first packet);
//! 4. policies no endpoint uses any more are deleted;
//! 5. the policy epoch is bumped, so tracked flows are checked once against the new policy.

pub mod bpffs;
pub mod conntrack;
#[cfg(feature = "test-support")]
pub mod faults;
pub mod mtls;
pub mod netfilter;
pub mod netlink;
pub mod upgrade;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use ipnet::IpNet;
use netwarden_common::{
    CidrClass, CidrKey, CidrKeyV4, EPOCH_INDEX, Endpoint, EndpointAddress, FrontendKey,
    FrontendValue, IpIdentity, IpKey, KernelLayout, PeerId, PolicyEntry, PolicyKey,
    SETTING_ALLOW_EVENT_PERIOD, SETTING_FRONTENDS_INSTALLED, counter, direction, endpoint_state,
};
use netwarden_policy::{
    CompiledPolicy, DatapathState, Frontend, PolicyId, PolicyMatch, lookup::mapped,
};
use tracing::{error, info, warn};

use crate::{bpffs::PinLayout, netlink::NodeNetwork};

/// The compiled eBPF object, built by `build.rs`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwarden-tc"));

/// The program benchmarks run to measure `BPF_PROG_TEST_RUN` alone.
const TEST_RUN_BASELINE: &str = "test_run_baseline";

/// The two hooks of a pod's host-side veth, named by the program that runs there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hook {
    /// veth TC ingress: packets leaving the pod, checked against its egress policy.
    FromContainer,
    /// veth TC egress: packets towards the pod, checked against its ingress policy.
    ToContainer,
}

impl Hook {
    const ALL: [Self; 2] = [Self::FromContainer, Self::ToContainer];

    fn program(self) -> &'static str {
        match self {
            Self::FromContainer => "from_container",
            Self::ToContainer => "to_container",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromContainer => TcAttachType::Ingress,
            Self::ToContainer => TcAttachType::Egress,
        }
    }

    fn from_pin_name(name: &str) -> Option<(u32, Self)> {
        let (ifindex, program) = name.split_once('-')?;
        let hook = Self::ALL
            .into_iter()
            .find(|hook| hook.program() == program)?;
        Some((ifindex.parse().ok()?, hook))
    }
}

/// Where netwarden's filter sits on each hook of a pod's veth on kernels without TCX (Linux <
/// 6.6): one fixed priority and handle, so a restarted agent replaces its predecessor's filter
/// in place instead of adding one beside it at every start, and can find it again to remove
/// it. Priority 1 runs before filters other tools add at the kernel's default priorities.
#[must_use]
pub fn clsact_placement() -> NlOptions {
    NlOptions {
        priority: 1,
        handle: TcHandle::new(0, 1),
        classid: None,
    }
}

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The bpf filesystem could not be prepared.
    #[error("cannot prepare the bpf filesystem at {}: {source}", path.display())]
    Bpffs {
        /// The mount point.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The eBPF object could not be loaded.
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded into the kernel.
    #[error("cannot load program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// A map the programs declare is missing or has another type.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        source: MapError,
    },
}

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
pub const CONNTRACK_ENTRIES: u32 = 65536;

impl Default for Capacity {
    fn default() -> Self {
        Self {
            endpoints: 4096,
            ipcache: 65536,
            policy: 262_144,
            cidrs: 65536,
            conntrack: CONNTRACK_ENTRIES,
        }
    }
}

/// How one local endpoint stands after an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointReport {
    /// `namespace/name` of the pod, or `None` for a pod veth the agent knows no pod for yet.
    pub pod: Option<String>,
    /// The host-side veth.
    pub interface: String,
    /// Its index.
    pub ifindex: u32,
    /// `ready`, `unknown` (no pod object yet: only node traffic passes) or `locked` (its policy
    /// did not fit the maps: only node traffic passes).
    pub state: &'static str,
    /// Whether both programs are attached.
    pub attached: bool,
}

/// Why a local pod is not enforced after an apply. Each is retried by the agent (with backoff)
/// until it clears; the pod's traffic meanwhile passes unchecked (attach failed, interface
/// missing) or as the programs treat an interface without an entry (map write failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unenforced {
    /// A program could not be attached to the pod's veth.
    AttachFailed,
    /// The pod's `ENDPOINTS` entry could not be written.
    MapWriteFailed,
    /// No veth is routed to the pod's addresses yet.
    InterfaceMissing,
}

impl Unenforced {
    /// Every reason, in the order views list them.
    pub const ALL: [Self; 3] = [
        Self::AttachFailed,
        Self::MapWriteFailed,
        Self::InterfaceMissing,
    ];

    /// The reason's label in the status file and the metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::AttachFailed => "attach_failed",
            Self::MapWriteFailed => "map_write_failed",
            Self::InterfaceMissing => "interface_missing",
        }
    }
}

/// A local pod the datapath does not enforce on, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnenforcedEndpoint {
    /// `namespace/name` of the pod, or `None` for a pod veth with no known pod yet.
    pub pod: Option<String>,
    /// The host-side veth, when one was found.
    pub interface: Option<String>,
    /// Why.
    pub reason: Unenforced,
}

/// What an apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Every endpoint the datapath enforces on.
    pub endpoints: Vec<EndpointReport>,
    /// Local pods whose interface was not found (no route to their IP through a veth yet).
    pub pending: Vec<String>,
    /// Local pods not enforced, with why (the pending ones included): the agent retries them.
    pub unenforced: Vec<UnenforcedEndpoint>,
    /// Problems, each naming what it concerns.
    pub errors: Vec<String>,
    /// Whether any map changed.
    pub changed: bool,
    /// Compiled policies that did not fit the maps, with why; the endpoints using them are
    /// locked down.
    pub failed_policies: BTreeMap<PolicyId, String>,
}

/// What one local endpoint should look like in the maps.
#[derive(Clone, Debug)]
struct DesiredEndpoint {
    /// The pod, or `None` for a veth no known pod is routed through yet.
    pod: Option<String>,
    /// Its `ENDPOINTS` entry.
    value: Endpoint,
    /// The host-side veth.
    interface: String,
    /// The addresses the pod may send from.
    addresses: Vec<IpAddr>,
}

/// Keys of one installed policy, so it can be deleted without scanning the maps, and, until
/// the first apply compared it with what the compiler wants, the content read back from a
/// previous agent's maps (an id this agent installed never changes content: no copy is kept).
#[derive(Default)]
struct InstalledPolicy {
    entries: Vec<Key<PolicyKey>>,
    cidrs_v4: Vec<Key<CidrKeyV4>>,
    cidrs_v6: Vec<Key<CidrKey>>,
    pinned: Option<CompiledPolicy>,
}

/// The loaded programs, their maps, and what the maps hold.
pub struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    endpoints: BpfHashMap<MapData, u32, Endpoint>,
    ipcache: BpfHashMap<MapData, IpKey, IpIdentity>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    cidrs_v4: LpmTrie<MapData, CidrKeyV4, CidrClass>,
    cidrs_v6: LpmTrie<MapData, CidrKey, CidrClass>,
    epoch: Array<MapData, u32>,
    settings: Array<MapData, u32>,
    verdicts: PerCpuArray<MapData, u64>,
    identities: BpfHashMap<MapData, [u8; 32], u32>,
    installed_ipcache: BTreeMap<IpAddr, PeerId>,
    installed_policies: BTreeMap<PolicyId, InstalledPolicy>,
    installed_endpoints: BTreeMap<u32, Endpoint>,
    installed_identities: BTreeMap<[u8; 32], PeerId>,
    endpoint_addresses: BpfHashMap<MapData, EndpointAddress, u32>,
    installed_addresses: BTreeSet<(u32, IpAddr)>,
    endpoint_of_address: BpfHashMap<MapData, IpKey, u32>,
    installed_owners: BTreeMap<IpAddr, u32>,
    frontends: BpfHashMap<MapData, FrontendKey, FrontendValue>,
    installed_frontends: BTreeMap<FrontendKey, u32>,
    kernel_layout: Array<MapData, KernelLayout>,
    translation: TranslationHook,
    attached: BTreeSet<(u32, Hook)>,
    attach_programs: bool,
    events: Option<RingBuf<MapData>>,
    capacity: Capacity,
    #[cfg(feature = "test-support")]
    faults: faults::Faults,
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

impl Datapath {
    /// Loads the programs with maps pinned under `bpffs` (adopting existing pins) and reads
    /// back what the maps hold.
    pub fn open(bpffs: &Path, capacity: &Capacity) -> Result<(Self, Inherited), DatapathError> {
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
            ("ENDPOINTS", capacity.endpoints),
            ("IPCACHE", capacity.ipcache),
            ("POLICY", capacity.policy),
            ("CIDRS_V4", capacity.cidrs),
            ("CIDRS_V6", capacity.cidrs),
            (conntrack::TABLE_V4, capacity.conntrack),
            (conntrack::TABLE_V6, capacity.conntrack),
            ("TRANSLATIONS", capacity.conntrack),
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

        let mut datapath = Self {
            endpoints: take_map(&mut ebpf, "ENDPOINTS")?,
            ipcache: take_map(&mut ebpf, "IPCACHE")?,
            policy: take_map(&mut ebpf, "POLICY")?,
            cidrs_v4: take_map(&mut ebpf, "CIDRS_V4")?,
            cidrs_v6: take_map(&mut ebpf, "CIDRS_V6")?,
            epoch: take_map(&mut ebpf, "EPOCH")?,
            settings: take_map(&mut ebpf, "SETTINGS")?,
            verdicts: take_map(&mut ebpf, "VERDICTS")?,
            identities: take_map(&mut ebpf, "IDENTITIES")?,
            endpoint_addresses: take_map(&mut ebpf, "ENDPOINT_ADDRESSES")?,
            installed_addresses: BTreeSet::new(),
            endpoint_of_address: take_map(&mut ebpf, "ENDPOINT_OF_ADDRESS")?,
            installed_owners: BTreeMap::new(),
            frontends: take_map(&mut ebpf, "FRONTENDS")?,
            installed_frontends: BTreeMap::new(),
            kernel_layout: take_map(&mut ebpf, "KERNEL_LAYOUT")?,
            translation: TranslationHook::Off,
            attach_programs: true,
            events: Some(take_map(&mut ebpf, "EVENTS")?),
            ebpf,
            layout,
            installed_ipcache: BTreeMap::new(),
            installed_policies: BTreeMap::new(),
            installed_endpoints: BTreeMap::new(),
            installed_identities: BTreeMap::new(),
            attached: BTreeSet::new(),
            capacity: capacity.clone(),
            #[cfg(feature = "test-support")]
            faults: faults::Faults::default(),
        };
        let inherited = datapath.read_back();
        Ok((datapath, inherited))
    }

    /// Reads what a previous agent left in the pinned maps.
    fn read_back(&mut self) -> Inherited {
        for (key, value) in self.ipcache.iter().flatten() {
            self.installed_ipcache
                .insert(unmapped(key.addr), value.identity);
        }
        for (key, value) in self.policy.iter().flatten() {
            let (id, entry) = PolicyMatch::from_key(key.prefix_len(), &key.data());
            let installed = self.installed_policies.entry(id).or_default();
            installed
                .pinned
                .get_or_insert_default()
                .entries
                .insert(entry, value.rule);
            installed.entries.push(key);
        }
        for (key, class) in self.cidrs_v4.iter().flatten() {
            let data = key.data();
            let id = u32::from_be_bytes(data.policy);
            let installed = self.installed_policies.entry(id).or_default();
            let prefix_len = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(u8::MAX);
            if let Ok(net) = ipnet::Ipv4Net::new(data.addr.into(), prefix_len) {
                installed
                    .pinned
                    .get_or_insert_default()
                    .cidrs
                    .insert(IpNet::V4(net), class.peer);
            }
            installed.cidrs_v4.push(key);
        }
        for (key, class) in self.cidrs_v6.iter().flatten() {
            let data = key.data();
            let id = u32::from_be_bytes(data.policy);
            let installed = self.installed_policies.entry(id).or_default();
            let prefix_len = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(u8::MAX);
            if let Ok(net) = ipnet::Ipv6Net::new(data.addr.into(), prefix_len) {
                installed
                    .pinned
                    .get_or_insert_default()
                    .cidrs
                    .insert(IpNet::V6(net), class.peer);
            }
            installed.cidrs_v6.push(key);
        }
        for (ifindex, endpoint) in self.endpoints.iter().flatten() {
            self.installed_endpoints.insert(ifindex, endpoint);
        }
        for key in self.endpoint_addresses.keys().flatten() {
            self.installed_addresses
                .insert((key.ifindex, unmapped(key.addr)));
        }
        for (digest, identity) in self.identities.iter().flatten() {
            self.installed_identities.insert(digest, identity);
        }
        for (key, ifindex) in self.endpoint_of_address.iter().flatten() {
            self.installed_owners.insert(unmapped(key.addr), ifindex);
        }
        for (key, value) in self.frontends.iter().flatten() {
            self.installed_frontends.insert(key, value.id);
        }
        let highest_policy_id = self
            .installed_policies
            .keys()
            .copied()
            .chain(
                self.installed_endpoints
                    .values()
                    .flat_map(|endpoint| [endpoint.ingress_policy, endpoint.egress_policy]),
            )
            .max()
            .unwrap_or(0);
        if !self.installed_endpoints.is_empty() {
            info!(
                endpoints = self.installed_endpoints.len(),
                policies = self.installed_policies.len(),
                "adopting pinned datapath state"
            );
        }
        Inherited {
            identities: self
                .installed_identities
                .iter()
                .map(|(digest, id)| (*digest, *id))
                .collect(),
            highest_policy_id,
            policies: self
                .installed_policies
                .iter()
                .map(|(id, installed)| (*id, installed.pinned.clone().unwrap_or_default()))
                .collect(),
            policy_users: self.installed_endpoints.iter().fold(
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

    /// Makes the maps and attachments enforce `state` on the interfaces found in `network`.
    pub fn apply(&mut self, state: &DatapathState, network: &NodeNetwork) -> ApplyReport {
        let mut report = ApplyReport::default();

        let desired = desired_endpoints(state, network, &mut report);
        report.changed |= self.sync_ipcache(&state.ipcache, &mut report.errors);
        let mut failed_policies = BTreeSet::new();
        for (id, compiled) in &state.policies {
            if let Some(installed) = self.installed_policies.get_mut(id) {
                // A pinned policy the compiler adopted: equal, or equal but for rule ids.
                if let Some(pinned) = installed.pinned.take()
                    && pinned != *compiled
                {
                    report.changed |=
                        self.rewrite_policy(*id, &pinned, compiled, &mut report.errors);
                }
                continue;
            }
            match self.install_policy(*id, compiled) {
                Ok(()) => report.changed = true,
                Err(message) => {
                    failed_policies.insert(*id);
                    report.failed_policies.insert(*id, message.clone());
                    report.errors.push(message);
                }
            }
        }

        report.changed |= self.sync_endpoint_addresses(&desired, &mut report.errors);
        // Endpoints whose `ENDPOINTS` entry could not be written: a previous agent's program
        // keeps enforcing there (with its maps) rather than this agent's without an entry.
        let mut unwritten = BTreeSet::new();
        for (ifindex, endpoint) in desired.clone() {
            let DesiredEndpoint {
                pod,
                mut value,
                interface,
                addresses: _,
            } = endpoint;
            if failed_policies.contains(&value.ingress_policy)
                || failed_policies.contains(&value.egress_policy)
            {
                error!(pod = pod.as_deref().unwrap_or("?"), %interface, "policy does not fit the maps; endpoint locked down");
                value = Endpoint {
                    state: endpoint_state::LOCKED,
                    ..Endpoint::default()
                };
            }
            if self.installed_endpoints.get(&ifindex) != Some(&value) {
                if let Err(error) = self.write_endpoint(ifindex, value) {
                    report.errors.push(format!(
                        "endpoint {interface}: cannot write its map entry: {error}"
                    ));
                    report.unenforced.push(UnenforcedEndpoint {
                        pod,
                        interface: Some(interface),
                        reason: Unenforced::MapWriteFailed,
                    });
                    unwritten.insert(ifindex);
                    continue;
                }
                self.installed_endpoints.insert(ifindex, value);
                report.changed = true;
            }
            let attached = self.attach_endpoint(ifindex, &interface, &mut report.errors);
            let state_name = match value.state {
                endpoint_state::READY => "ready",
                endpoint_state::LOCKED => "locked",
                _ => "unknown",
            };
            report.endpoints.push(EndpointReport {
                pod,
                interface,
                ifindex,
                state: state_name,
                attached,
            });
            if !attached && self.attach_programs {
                let endpoint = report.endpoints.last().expect("just pushed");
                report.unenforced.push(UnenforcedEndpoint {
                    pod: endpoint.pod.clone(),
                    interface: Some(endpoint.interface.clone()),
                    reason: Unenforced::AttachFailed,
                });
            }
        }

        report.changed |= self.remove_endpoints_except(&desired);

        let unused: Vec<PolicyId> = self
            .installed_policies
            .keys()
            .copied()
            .filter(|id| !state.policies.contains_key(id) || failed_policies.contains(id))
            .collect();
        for id in unused {
            self.remove_policy(id);
            report.changed = true;
        }

        report.changed |= self.sync_frontends(state, &mut report.errors);
        self.sync_identities(state);
        self.attach_translation_hook_if_due(state, &mut report);
        if report.changed {
            self.bump_epoch(&mut report.errors);
        }
        if self.attach_programs {
            self.adopt_links(&desired, &unwritten, &mut report);
        }
        report
    }

    /// Attaches both programs to the veth of a new endpoint, and to one whose attachment failed
    /// before. Returns whether both enforce there (a previous agent's pinned programs count:
    /// this agent's replace them once every map is written, in `adopt_links`).
    fn attach_endpoint(&mut self, ifindex: u32, interface: &str, errors: &mut Vec<String>) -> bool {
        let mut attached = self.attach_programs;
        for hook in Hook::ALL {
            if !self.attach_programs
                || self.attached.contains(&(ifindex, hook))
                || self.layout.link(ifindex, hook.program()).exists()
            {
                continue;
            }
            match self.attach(ifindex, interface, hook) {
                Ok(()) => {
                    self.attached.insert((ifindex, hook));
                }
                Err(message) => {
                    attached = false;
                    errors.push(message);
                }
            }
        }
        attached
    }

    /// Whether programs are attached with TCX links (else as clsact filters).
    fn has_tcx(&self) -> bool {
        #[cfg(feature = "test-support")]
        if self.faults.no_tcx {
            return false;
        }
        has_tcx()
    }

    /// Writes the `ENDPOINTS` entry of one interface.
    fn write_endpoint(&mut self, ifindex: u32, value: Endpoint) -> Result<(), MapError> {
        #[cfg(feature = "test-support")]
        if let Some(error) = self.faults.endpoint_write_error() {
            return Err(error);
        }
        self.endpoints.insert(ifindex, value, 0)
    }

    /// Detaches and forgets endpoints that are not in `desired`, and links a previous agent
    /// pinned for interfaces that enforce nothing now. Returns whether a map changed.
    fn remove_endpoints_except(&mut self, desired: &BTreeMap<u32, DesiredEndpoint>) -> bool {
        let mut changed = false;
        // Endpoints that went away: detach first, then forget the map entry.
        let gone: Vec<u32> = self
            .installed_endpoints
            .keys()
            .copied()
            .filter(|ifindex| !desired.contains_key(ifindex))
            .collect();
        for ifindex in gone {
            self.detach(ifindex);
            if let Err(error) = self.endpoints.remove(&ifindex) {
                warn!(ifindex, %error, "cannot remove endpoint entry");
            }
            self.installed_endpoints.remove(&ifindex);
            changed = true;
        }
        // Links pinned by a previous agent for interfaces that no longer enforce anything.
        let orphaned: Vec<(u32, Hook)> = self
            .attached
            .iter()
            .copied()
            .filter(|(ifindex, _)| !desired.contains_key(ifindex))
            .collect();
        for (ifindex, _) in orphaned {
            self.detach(ifindex);
        }

        changed
    }

    /// Writes the addresses each endpoint owns (anti-spoofing) and forgets the others.
    fn sync_endpoint_addresses(
        &mut self,
        desired: &BTreeMap<u32, DesiredEndpoint>,
        errors: &mut Vec<String>,
    ) -> bool {
        let wanted: BTreeSet<(u32, IpAddr)> = desired
            .iter()
            .flat_map(|(ifindex, endpoint)| {
                endpoint.addresses.iter().map(move |ip| (*ifindex, *ip))
            })
            .collect();
        let mut changed = false;
        for (ifindex, ip) in wanted.difference(&self.installed_addresses.clone()) {
            let key = EndpointAddress {
                ifindex: *ifindex,
                addr: mapped(*ip),
            };
            match self.endpoint_addresses.insert(key, 1, 0) {
                Ok(()) => {
                    self.installed_addresses.insert((*ifindex, *ip));
                    changed = true;
                }
                // The pod cannot send from this address until it fits: fail closed.
                Err(error) => errors.push(format!(
                    "endpoint {ifindex}: cannot record address {ip}: {error}"
                )),
            }
        }
        let gone: Vec<(u32, IpAddr)> = self
            .installed_addresses
            .difference(&wanted)
            .copied()
            .collect();
        for (ifindex, ip) in gone {
            let _ = self.endpoint_addresses.remove(&EndpointAddress {
                ifindex,
                addr: mapped(ip),
            });
            self.installed_addresses.remove(&(ifindex, ip));
            changed = true;
        }
        changed | self.sync_address_owners(&wanted, errors)
    }

    /// Writes which endpoint owns each address, for the hook after translation, which sees
    /// packets on the node's routing path where the interface no longer tells.
    fn sync_address_owners(
        &mut self,
        wanted: &BTreeSet<(u32, IpAddr)>,
        errors: &mut Vec<String>,
    ) -> bool {
        let owners: BTreeMap<IpAddr, u32> =
            wanted.iter().map(|(ifindex, ip)| (*ip, *ifindex)).collect();
        let mut changed = false;
        for (ip, ifindex) in &owners {
            if self.installed_owners.get(ip) == Some(ifindex) {
                continue;
            }
            match self
                .endpoint_of_address
                .insert(IpKey { addr: mapped(*ip) }, *ifindex, 0)
            {
                Ok(()) => {
                    self.installed_owners.insert(*ip, *ifindex);
                    changed = true;
                }
                // Flows of this address through a Service are then judged as no pod's: the
                // backend's ingress still applies, and a pod's own flows to a frontend drop
                // (nothing decides them, see `translated.rs`).
                Err(error) => errors.push(format!(
                    "endpoint {ifindex}: cannot record the owner of {ip}: {error}"
                )),
            }
        }
        let gone: Vec<IpAddr> = self
            .installed_owners
            .keys()
            .filter(|ip| !owners.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            let _ = self.endpoint_of_address.remove(&IpKey { addr: mapped(ip) });
            self.installed_owners.remove(&ip);
            changed = true;
        }
        changed
    }

    /// Writes the Service frontends whose flows are decided after translation, while the hook
    /// after translation is attached; with no hook there are none, so nothing is deferred to a
    /// hook that is not there and flows to a Service are judged on its address (fail closed).
    fn sync_frontends(&mut self, state: &DatapathState, errors: &mut Vec<String>) -> bool {
        let deciding = match self.translation {
            TranslationHook::Attached => true,
            // A previous agent's hook still decides the flows deferred to it.
            TranslationHook::AfterFill => self.previous_hook_pinned(),
            TranslationHook::Off | TranslationHook::Failed(_) => false,
        };
        let wanted: BTreeMap<FrontendKey, u32> = if deciding {
            state
                .service_frontends
                .iter()
                .map(|(frontend, info)| (frontend_key(frontend), info.id))
                .collect()
        } else {
            BTreeMap::new()
        };
        let mut changed = false;
        if wanted.is_empty() && !self.installed_frontends.is_empty() {
            // No new flow looks the map up once the flag is down.
            self.set_frontends_installed(false, errors);
        }
        for (key, id) in &wanted {
            if self.installed_frontends.get(key) == Some(id) {
                continue;
            }
            match self.frontends.insert(*key, FrontendValue { id: *id }, 0) {
                Ok(()) => {
                    self.installed_frontends.insert(*key, *id);
                    changed = true;
                }
                // Not deferred: flows to it are judged on the frontend's address (fail closed).
                Err(error) => errors.push(format!(
                    "Service frontend {id}: cannot write its map entry: {error}"
                )),
            }
        }
        let gone: Vec<FrontendKey> = self
            .installed_frontends
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            let _ = self.frontends.remove(&key);
            self.installed_frontends.remove(&key);
            changed = true;
        }
        if !self.installed_frontends.is_empty() {
            self.set_frontends_installed(true, errors);
        }
        changed
    }

    fn set_frontends_installed(&mut self, installed: bool, errors: &mut Vec<String>) {
        if let Err(error) = self
            .settings
            .set(SETTING_FRONTENDS_INSTALLED, u32::from(installed), 0)
        {
            errors.push(format!(
                "SETTINGS: cannot record whether frontends are installed: {error}"
            ));
        }
    }

    /// Loads the hook after translation and attaches it to this network namespace's
    /// netfilter (`POSTROUTING` and `LOCAL_IN`, after source NAT), replacing a previous agent's.
    /// Until it is attached no flow is deferred to it; on a kernel without netfilter BPF
    /// links (Linux < 6.4) or BTF, flows to Services are judged on the Service's address.
    pub fn attach_translation_hook(&mut self) -> Result<(), netfilter::NetfilterError> {
        let result = (|| -> Result<(), netfilter::NetfilterError> {
            let layout = netfilter::kernel_layout(Path::new("/sys/kernel/btf/vmlinux"))?;
            self.kernel_layout.set(0, layout, 0).map_err(|source| {
                netfilter::NetfilterError::Map {
                    name: "KERNEL_LAYOUT".into(),
                    source,
                }
            })?;
            let program = netfilter::load(PROGRAMS, &self.layout.maps(), &self.ebpf)?;
            netfilter::attach(&program, &self.layout.links())?;
            Ok(())
        })();
        self.translation = match &result {
            Ok(()) => TranslationHook::Attached,
            Err(error) => TranslationHook::Failed(error.to_string()),
        };
        result
    }

    /// Attaches the hook after translation (see [`Datapath::attach_translation_hook`]) at the end
    /// of the next apply, once every map it reads is written: an upgrade whose loader created
    /// a map afresh never lets the new hook decide on an empty map. A previous agent's hook
    /// keeps deciding, with the maps it was loaded with, until then.
    pub fn attach_translation_hook_after_fill(&mut self) {
        self.translation = TranslationHook::AfterFill;
    }

    /// Attaches the hook after translation if it waited for the maps to be filled (they are),
    /// and writes or clears the frontends as it now stands.
    fn attach_translation_hook_if_due(&mut self, state: &DatapathState, report: &mut ApplyReport) {
        if self.translation != TranslationHook::AfterFill {
            return;
        }
        if let Err(error) = self.attach_translation_hook() {
            report
                .errors
                .push(format!("hook after translation not attached: {error}"));
        }
        report.changed |= self.sync_frontends(state, &mut report.errors);
    }

    /// Whether a previous agent's hook after translation is pinned.
    fn previous_hook_pinned(&self) -> bool {
        fs::read_dir(self.layout.links()).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("netfilter-")
            })
        })
    }

    /// Whether the hook after translation is attached, or why not.
    #[must_use]
    pub fn translation_hook(&self) -> &TranslationHook {
        &self.translation
    }

    fn sync_ipcache(
        &mut self,
        desired: &BTreeMap<IpAddr, PeerId>,
        errors: &mut Vec<String>,
    ) -> bool {
        let mut changed = false;
        for (ip, identity) in desired {
            if self.installed_ipcache.get(ip) == Some(identity) {
                continue;
            }
            let key = IpKey { addr: mapped(*ip) };
            match self.ipcache.insert(
                key,
                IpIdentity {
                    identity: *identity,
                },
                0,
            ) {
                Ok(()) => {
                    self.installed_ipcache.insert(*ip, *identity);
                    changed = true;
                }
                // The address stays WORLD: selector rules no longer match it, ipBlock rules still do.
                Err(error) => errors.push(format!("IP cache: cannot add {ip}: {error}")),
            }
        }
        let gone: Vec<IpAddr> = self
            .installed_ipcache
            .keys()
            .copied()
            .filter(|ip| !desired.contains_key(ip))
            .collect();
        for ip in gone {
            let _ = self.ipcache.remove(&IpKey { addr: mapped(ip) });
            self.installed_ipcache.remove(&ip);
            changed = true;
        }
        changed
    }

    fn install_policy(&mut self, id: PolicyId, compiled: &CompiledPolicy) -> Result<(), String> {
        let mut installed = InstalledPolicy::default();
        let mut failure = None;
        for (prefix, class) in &compiled.cidrs {
            let policy = id.to_be_bytes();
            let class = CidrClass { peer: *class };
            let inserted = match prefix {
                IpNet::V4(v4) => insert_prefix(
                    &mut self.cidrs_v4,
                    Key::new(
                        32 + u32::from(v4.prefix_len()),
                        CidrKeyV4 {
                            policy,
                            addr: v4.network().octets(),
                        },
                    ),
                    class,
                    &mut installed.cidrs_v4,
                ),
                IpNet::V6(v6) => insert_prefix(
                    &mut self.cidrs_v6,
                    Key::new(
                        32 + u32::from(v6.prefix_len()),
                        CidrKey {
                            policy,
                            addr: v6.network().octets(),
                        },
                    ),
                    class,
                    &mut installed.cidrs_v6,
                ),
            };
            if let Err(error) = inserted {
                failure = Some(format!(
                    "policy {id}: CIDR map is full or failing ({error}); {} prefixes needed",
                    compiled.cidrs.len()
                ));
                break;
            }
        }
        if failure.is_none() {
            for (entry, rule) in &compiled.entries {
                let (prefix_len, data) = entry.key(id);
                let key = Key::new(prefix_len, data);
                if let Err(error) = self.policy.insert(&key, PolicyEntry { rule: *rule }, 0) {
                    failure = Some(format!(
                        "policy {id}: policy map is full or failing ({error}); {} entries needed",
                        compiled.entries.len()
                    ));
                    break;
                }
                installed.entries.push(key);
            }
        }
        self.installed_policies.insert(id, installed);
        match failure {
            None => Ok(()),
            Some(message) => {
                self.remove_policy(id);
                Err(message)
            }
        }
    }

    /// Makes pinned policy `id`, read back as `pinned`, hold `compiled`, which the compiler gave
    /// the same id because its shape is the same (see `Compiler::adopt_pinned_policies`): only
    /// the rule ids of entries differ, and each differing value is overwritten in place (one
    /// atomic update per entry, the verdict unchanged). Returns whether anything was written.
    fn rewrite_policy(
        &mut self,
        id: PolicyId,
        pinned: &CompiledPolicy,
        compiled: &CompiledPolicy,
        errors: &mut Vec<String>,
    ) -> bool {
        if pinned.entries.keys().ne(compiled.entries.keys()) || pinned.cidrs != compiled.cidrs {
            errors.push(format!(
                "policy {id}: the compiler reused a pinned id for other content; reinstalling it"
            ));
            self.remove_policy(id);
            if let Err(message) = self.install_policy(id, compiled) {
                errors.push(message);
            }
            return true;
        }
        let mut changed = false;
        for (entry, rule) in &compiled.entries {
            if pinned.entries.get(entry) == Some(rule) {
                continue;
            }
            let (prefix_len, data) = entry.key(id);
            match self
                .policy
                .insert(&Key::new(prefix_len, data), PolicyEntry { rule: *rule }, 0)
            {
                Ok(()) => changed = true,
                // The entry still allows; only its attribution is stale.
                Err(error) => errors.push(format!(
                    "policy {id}: cannot rewrite the rule of an entry: {error}"
                )),
            }
        }
        changed
    }

    fn remove_policy(&mut self, id: PolicyId) {
        if let Some(installed) = self.installed_policies.remove(&id) {
            for key in installed.entries {
                let _ = self.policy.remove(&key);
            }
            for key in installed.cidrs_v4 {
                let _ = self.cidrs_v4.remove(&key);
            }
            for key in installed.cidrs_v6 {
                let _ = self.cidrs_v6.remove(&key);
            }
        }
    }

    fn sync_identities(&mut self, state: &DatapathState) {
        let desired: BTreeMap<[u8; 32], PeerId> = state
            .identities
            .iter()
            .map(|(id, info)| (info.digest(), *id))
            .collect();
        for (digest, id) in &desired {
            if self.installed_identities.get(digest) != Some(id)
                && self.identities.insert(digest, id, 0).is_ok()
            {
                self.installed_identities.insert(*digest, *id);
            }
        }
        let gone: Vec<[u8; 32]> = self
            .installed_identities
            .keys()
            .copied()
            .filter(|digest| !desired.contains_key(digest))
            .collect();
        for digest in gone {
            let _ = self.identities.remove(&digest);
            self.installed_identities.remove(&digest);
        }
    }

    fn bump_epoch(&mut self, errors: &mut Vec<String>) {
        let epoch = self.epoch.get(&EPOCH_INDEX, 0).unwrap_or(0).wrapping_add(1);
        if let Err(error) = self.epoch.set(EPOCH_INDEX, epoch, 0) {
            errors.push(format!("cannot bump the policy epoch: {error}"));
        }
    }

    /// Attaches one program to one interface with TCX, pinning the link so it outlives the
    /// agent; an existing pin (from a previous agent) is taken over by swapping in this agent's
    /// program atomically. Falls back to a clsact qdisc on kernels without TCX.
    fn attach(&mut self, ifindex: u32, interface: &str, hook: Hook) -> Result<(), String> {
        let pin = self.layout.link(ifindex, hook.program());
        let tcx = self.has_tcx();
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.program())
            .and_then(|program| program.try_into().ok())
            .ok_or_else(|| format!("program {} is missing", hook.program()))?;
        let describe = |error: &dyn std::fmt::Display| {
            format!(
                "endpoint {interface}: cannot attach {}: {error}",
                hook.program()
            )
        };
        #[cfg(feature = "test-support")]
        if self.faults.attach_fails() {
            return Err(describe(&"injected failure (test-support)"));
        }

        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|error| describe(&error))?;
            match program.attach_to_link(link) {
                Ok(link_id) => {
                    // The pin keeps the link; dropping our handle only closes a descriptor.
                    let _link = program
                        .take_link(link_id)
                        .map_err(|error| describe(&error))?;
                    return Ok(());
                }
                Err(error) => {
                    warn!(%interface, %error, "pinned link is stale; attaching afresh");
                    let _ = fs::remove_file(&pin);
                }
            }
        }

        if !tcx {
            return attach_clsact(program, interface, hook).map_err(|error| describe(&error));
        }
        let link_id = program
            .attach(interface, hook.attach_type())
            .map_err(|error| describe(&error))?;
        let link = program
            .take_link(link_id)
            .map_err(|error| describe(&error))?;
        let fd_link = FdLink::try_from(link).map_err(|error| describe(&error))?;
        fd_link.pin(&pin).map_err(|error| describe(&error))?;
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) {
        if !self.has_tcx() {
            // The filters outlive this process: remove netwarden's from an interface that
            // is still there (one that is gone took its filters along).
            if let Some(interface) = interface_name(ifindex) {
                for hook in Hook::ALL {
                    detach_clsact(&interface, hook);
                }
            }
        }
        for hook in Hook::ALL {
            // Unpinning drops the last reference to the TCX link, which detaches it.
            let _ = fs::remove_file(self.layout.link(ifindex, hook.program()));
            self.attached.remove(&(ifindex, hook));
        }
    }

    /// Takes over the links a previous agent pinned for the endpoints in `desired`, swapping in
    /// this agent's programs (each swap is atomic, `bpf_link_update`), except where the
    /// endpoint's entry is `unwritten`; removes the pins of interfaces that enforce nothing
    /// now. Runs at the end of an apply (in effect the first, or the first that wrote the
    /// endpoint's entry): the new programs may read maps this agent created afresh (an upgrade
    /// that replaced a pinned map), so they replace the old ones only once every map is
    /// filled. Until then the old programs keep enforcing with the maps they were loaded with.
    fn adopt_links(
        &mut self,
        desired: &BTreeMap<u32, DesiredEndpoint>,
        unwritten: &BTreeSet<u32>,
        report: &mut ApplyReport,
    ) {
        let Ok(entries) = fs::read_dir(self.layout.links()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((ifindex, hook)) = Hook::from_pin_name(&name) else {
                continue;
            };
            if self.attached.contains(&(ifindex, hook)) || unwritten.contains(&ifindex) {
                continue;
            }
            match desired.get(&ifindex) {
                Some(endpoint) => {
                    let interface = endpoint.interface.clone();
                    match self.attach(ifindex, &interface, hook) {
                        Ok(()) => {
                            self.attached.insert((ifindex, hook));
                        }
                        Err(message) => {
                            warn!(%message, "cannot adopt pinned link");
                            report.errors.push(message);
                        }
                    }
                }
                None => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        // A link that could not be taken over: retried by the next apply as a new attach.
        for endpoint in &mut report.endpoints {
            let adopted = Hook::ALL
                .iter()
                .all(|hook| self.attached.contains(&(endpoint.ifindex, *hook)));
            if endpoint.attached && !adopted {
                endpoint.attached = false;
                report.unenforced.push(UnenforcedEndpoint {
                    pod: endpoint.pod.clone(),
                    interface: Some(endpoint.interface.clone()),
                    reason: Unenforced::AttachFailed,
                });
            }
        }
    }

    /// The ring buffer of deny events (`netwarden_common::VerdictEvent`), once: the caller
    /// reads it on its own task.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Makes the next kernel calls of each kind fail (tests of the agent's retries).
    #[cfg(feature = "test-support")]
    pub fn inject_faults(&mut self, faults: faults::Faults) {
        self.faults = faults;
    }

    /// Keeps the programs unattached: maps are written as usual and the programs can be run on
    /// crafted packets with [`Datapath::test_run`], without touching any interface.
    pub fn detached(&mut self) {
        self.attach_programs = false;
    }

    /// Runs the program of one hook on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times, as if
    /// it arrived on interface `ifindex` (the kernel requires the interface to exist; 1, the
    /// loopback, always does). Returns the program's verdict and the mean time per run.
    pub fn test_run(
        &self,
        towards_pod: bool,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), ProgramError> {
        let name = if towards_pod {
            Hook::ToContainer.program()
        } else {
            Hook::FromContainer.program()
        };
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(ProgramError::NotLoaded)?;
        test_run(program, frame, ifindex, repeat)
    }

    /// Runs a program that allows everything and reads nothing the way [`Datapath::test_run`]
    /// runs a classifier: what `BPF_PROG_TEST_RUN` itself costs per run, for benchmarks to
    /// subtract. The program is loaded at the first call.
    pub fn test_run_baseline(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), ProgramError> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(TEST_RUN_BASELINE)
            .and_then(|program| program.try_into().ok())
            .ok_or(ProgramError::NotLoaded)?;
        if program.fd().is_err() {
            program.load()?;
        }
        test_run(program, frame, 1, repeat)
    }

    /// How many new allowed flows the programs report as events: 0 none, 1 every one, N about
    /// one in N.
    pub fn set_allow_event_period(&mut self, period: u32) -> Result<(), DatapathError> {
        self.settings
            .set(SETTING_ALLOW_EVENT_PERIOD, period, 0)
            .map_err(|source| DatapathError::Map {
                name: "SETTINGS",
                source,
            })
    }

    /// Verdict counters summed over CPUs, indexed by [`counter::slot`] (direction, reason).
    #[must_use]
    pub fn verdicts(&self) -> Vec<u64> {
        sum_counters(&self.verdicts)
    }

    /// A second handle on the verdict counters, opened from their pin, for a reader on another
    /// task (the metrics endpoint reads them when it is scraped, not when the agent applies).
    pub fn verdict_counters(&self) -> Result<VerdictCounters, DatapathError> {
        const NAME: &str = "VERDICTS";
        let data = MapData::from_pin(self.layout.maps().join(NAME))
            .map_err(|source| DatapathError::Map { name: NAME, source })?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(|source| DatapathError::Map { name: NAME, source })?;
        Ok(VerdictCounters { map })
    }

    /// How full each map is, as far as the agent knows without walking the kernel's maps: the
    /// entries it wrote. Connection tracking is filled by the programs, so only its capacity is
    /// known.
    #[must_use]
    pub fn map_usage(&self) -> Vec<MapUsage> {
        let (entries, cidrs_v4, cidrs_v6) = self.installed_policies.values().fold(
            (0, 0, 0),
            |(entries, cidrs_v4, cidrs_v6), policy| {
                (
                    entries + policy.entries.len(),
                    cidrs_v4 + policy.cidrs_v4.len(),
                    cidrs_v6 + policy.cidrs_v6.len(),
                )
            },
        );
        let capacity = &self.capacity;
        vec![
            MapUsage {
                map: "ENDPOINTS",
                entries: Some(self.installed_endpoints.len()),
                capacity: capacity.endpoints,
            },
            MapUsage {
                map: "ENDPOINT_ADDRESSES",
                entries: Some(self.installed_addresses.len()),
                capacity: ENDPOINT_ADDRESSES_CAPACITY,
            },
            MapUsage {
                map: "IPCACHE",
                entries: Some(self.installed_ipcache.len()),
                capacity: capacity.ipcache,
            },
            MapUsage {
                map: "POLICY",
                entries: Some(entries),
                capacity: capacity.policy,
            },
            MapUsage {
                map: "CIDRS_V4",
                entries: Some(cidrs_v4),
                capacity: capacity.cidrs,
            },
            MapUsage {
                map: "CIDRS_V6",
                entries: Some(cidrs_v6),
                capacity: capacity.cidrs,
            },
            MapUsage {
                map: conntrack::TABLE_V4,
                entries: None,
                capacity: capacity.conntrack,
            },
            MapUsage {
                map: conntrack::TABLE_V6,
                entries: None,
                capacity: capacity.conntrack,
            },
        ]
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

/// Whether flows to Services are decided after translation (see [`netfilter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TranslationHook {
    /// Not asked for (tests that run the programs on crafted packets).
    Off,
    /// Attached: flows to Service frontends are decided on the backend they reach.
    Attached,
    /// To be attached at the end of the next apply, once the maps it reads are written
    /// ([`Datapath::attach_translation_hook_after_fill`]); a previous agent's hook, if pinned,
    /// decides meanwhile.
    AfterFill,
    /// Could not be attached (why): flows to Services are judged on the Service's address.
    Failed(String),
}

/// The key of `frontend` in the frontend map.
fn frontend_key(frontend: &Frontend) -> FrontendKey {
    FrontendKey {
        addr: mapped(frontend.address),
        protocol: frontend.protocol.number(),
        padding: 0,
        port: frontend.port,
    }
}

/// Size of `ENDPOINT_ADDRESSES` as the programs declare it (not configurable: four addresses
/// for each of the default 4,096 endpoints).
const ENDPOINT_ADDRESSES_CAPACITY: u32 = 16384;

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    /// The map's name, as pinned.
    pub map: &'static str,
    /// Entries written by the agent; `None` for a map the programs fill.
    pub entries: Option<usize>,
    /// Its `max_entries`.
    pub capacity: u32,
}

/// The datapath's per-CPU verdict counters, readable from any task.
pub struct VerdictCounters {
    map: PerCpuArray<MapData, u64>,
}

impl VerdictCounters {
    /// The counters summed over CPUs, indexed by [`counter::slot`].
    #[must_use]
    pub fn read(&self) -> Vec<u64> {
        sum_counters(&self.map)
    }
}

fn sum_counters(map: &PerCpuArray<MapData, u64>) -> Vec<u64> {
    (0..counter::SLOTS)
        .map(|index| map.get(&index, 0).map_or(0, |values| values.iter().sum()))
        .collect()
}

/// Which interface enforces for which endpoint: local pods through the veth that leads to their
/// IP (its other end holds it, or the node routes it there), and veths that lead to a pod no
/// local pod object describes yet (a pod the agent has not heard of): those are unknown
/// endpoints, allowed only node traffic and only from the addresses seen on them.
fn desired_endpoints(
    state: &DatapathState,
    network: &NodeNetwork,
    report: &mut ApplyReport,
) -> BTreeMap<u32, DesiredEndpoint> {
    let mut desired: BTreeMap<u32, DesiredEndpoint> = BTreeMap::new();
    let mut known_ips = BTreeSet::new();
    for endpoint in state.endpoints.values() {
        known_ips.extend(endpoint.ips.iter().copied());
        let Some(interface) = endpoint.ips.iter().find_map(|ip| network.veth_for(*ip)) else {
            report.pending.push(endpoint.pod.to_string());
            report.unenforced.push(UnenforcedEndpoint {
                pod: Some(endpoint.pod.to_string()),
                interface: None,
                reason: Unenforced::InterfaceMissing,
            });
            continue;
        };
        let value = Endpoint {
            ingress_policy: endpoint.ingress.unwrap_or(0),
            egress_policy: endpoint.egress.unwrap_or(0),
            state: endpoint_state::READY,
            audit: [
                (endpoint.ingress_audit, direction::INGRESS),
                (endpoint.egress_audit, direction::EGRESS),
            ]
            .into_iter()
            .filter(|(audited, _)| *audited)
            .fold(0, |bits, (_, dir)| bits | direction::audit_bit(dir)),
        };
        if let Some(DesiredEndpoint {
            pod: Some(other), ..
        }) = desired.get(&interface.index)
        {
            report.errors.push(format!(
                "Pod {}: interface {} already enforces for Pod {other}",
                endpoint.pod, interface.name
            ));
            continue;
        }
        desired.insert(
            interface.index,
            DesiredEndpoint {
                pod: Some(endpoint.pod.to_string()),
                value,
                interface: interface.name.clone(),
                addresses: endpoint.ips.clone(),
            },
        );
    }
    // A veth routed to an address no local pod has yet: a pod the agent has not heard of.
    for (ip, interface) in network.veth_host_routes() {
        if !known_ips.contains(&ip) {
            add_unknown_endpoint(&mut desired, interface, &[ip]);
        }
    }
    // A bridge port, or a veth whose other end has addresses, that no known pod's address
    // leads to: also a pod the agent has not heard of, whatever its addresses are.
    for interface in network.pod_veths() {
        let addresses = interface
            .peer
            .as_ref()
            .map_or(&[][..], |peer| &peer.addresses);
        add_unknown_endpoint(&mut desired, interface, addresses);
    }
    desired
}

/// Makes `interface` an unknown endpoint sending from `addresses` (among others already
/// recorded), unless it enforces for a known pod.
fn add_unknown_endpoint(
    desired: &mut BTreeMap<u32, DesiredEndpoint>,
    interface: &netlink::Interface,
    addresses: &[IpAddr],
) {
    let endpoint = desired
        .entry(interface.index)
        .or_insert_with(|| DesiredEndpoint {
            pod: None,
            value: Endpoint {
                state: endpoint_state::UNKNOWN,
                ..Endpoint::default()
            },
            interface: interface.name.clone(),
            addresses: Vec::new(),
        });
    if endpoint.pod.is_some() {
        return;
    }
    for ip in addresses {
        if !endpoint.addresses.contains(ip) {
            endpoint.addresses.push(*ip);
        }
    }
}

#[cfg(test)]
mod desired_endpoints_tests;

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
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

/// Inserts one prefix into a CIDR trie and remembers its key, so the policy can be removed
/// without walking the trie.
fn insert_prefix<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, CidrClass>,
    key: Key<K>,
    class: CidrClass,
    installed: &mut Vec<Key<K>>,
) -> Result<(), MapError> {
    trie.insert(&key, class, 0)?;
    installed.push(key);
    Ok(())
}

/// Attaches `program` as netwarden's clsact filter on `hook` of `interface` (see
/// [`clsact_placement`]): replaces the one a previous agent left there, or adds it. The filter
/// belongs to the interface, not to this process.
fn attach_clsact(
    program: &mut SchedClassifier,
    interface: &str,
    hook: Hook,
) -> Result<(), ProgramError> {
    if let Err(error) = tc::qdisc_add_clsact(interface)
        && !matches!(&error, tc::TcError::NetlinkError(inner) if inner.raw_os_error() == Some(libc::EEXIST))
    {
        return Err(error.into());
    }
    let placement = clsact_placement();
    let existing = SchedClassifierLink::attached(
        interface,
        hook.attach_type(),
        placement.priority,
        placement.handle,
        placement.classid,
    )
    .map_err(tc::TcError::IoError)?;
    // A replace (no NLM_F_CREATE) fails when no filter is there yet: then add it.
    let link_id = match program.attach_to_link(existing) {
        Ok(link_id) => link_id,
        Err(_) => program.attach_with_options(
            interface,
            hook.attach_type(),
            TcAttachOptions::Netlink(placement),
        )?,
    };
    let link = program.take_link(link_id)?;
    // Dropping the handle would detach the filter, which must outlive the agent.
    std::mem::forget(link);
    Ok(())
}

/// Removes netwarden's clsact filter from `hook` of `interface`, if it is there.
fn detach_clsact(interface: &str, hook: Hook) {
    let placement = clsact_placement();
    if let Ok(link) = SchedClassifierLink::attached(
        interface,
        hook.attach_type(),
        placement.priority,
        placement.handle,
        placement.classid,
    ) {
        // Dropping a link detaches it.
        drop(link);
    }
}

/// The name of interface `ifindex`, if it exists.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut name = [0_u8; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname may write, NUL included.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr().cast()) };
    if found.is_null() {
        return None;
    }
    let len = name.iter().position(|byte| *byte == 0)?;
    String::from_utf8(name[..len].to_vec()).ok()
}

/// TCX arrived in Linux 6.6.
fn has_tcx() -> bool {
    aya::util::KernelVersion::current()
        .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0))
}

fn unmapped(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// One `BPF_PROG_TEST_RUN` of `program` on `frame` as if it arrived on interface `ifindex`:
/// its verdict and the mean time per run.
fn test_run(
    program: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(i32, std::time::Duration), ProgramError> {
    use aya::programs::{TestRun as _, TestRunOptions};
    // `struct __sk_buff`: ifindex is its 11th u32 (offset 40); the rest stays zero.
    let mut context = [0_u8; 192];
    context[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0_u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&context),
        repeat,
        ..TestRunOptions::default()
    })?;
    #[expect(
        clippy::cast_possible_wrap,
        reason = "TC verdicts are small signed numbers"
    )]
    let verdict = result.return_value as i32;
    Ok((verdict, result.duration))
}
