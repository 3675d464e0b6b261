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
        tc::{self, SchedClassifierLink},
    },
};
use ipnet::IpNet;
use netwarden_common::{
    CidrClass, CidrKey, CidrKeyV4, EPOCH_INDEX, Endpoint, EndpointAddress, FrontendKey,
    FrontendValue, IpIdentity, IpKey, KernelLayout, PeerId, PolicyEntry, PolicyKey,
    SETTING_ALLOW_EVENT_PERIOD, SETTING_FRONTENDS_INSTALLED, counter, endpoint_state,
};
use netwarden_policy::{CompiledPolicy, DatapathState, Frontend, PolicyId, lookup::mapped};
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

/// What an apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Every endpoint the datapath enforces on.
    pub endpoints: Vec<EndpointReport>,
    /// Local pods whose interface was not found (no route to their IP through a veth yet).
    pub pending: Vec<String>,
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

/// Keys of one installed policy, so it can be deleted without scanning the maps.
#[derive(Default)]
struct InstalledPolicy {
    entries: Vec<Key<PolicyKey>>,
    cidrs_v4: Vec<Key<CidrKeyV4>>,
    cidrs_v6: Vec<Key<CidrKey>>,
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
}

/// What a previous agent left in the pinned maps, for the compiler to continue from.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Identity numbers by [`netwarden_policy::IdentityInfo::digest`].
    pub identities: HashMap<[u8; 32], PeerId>,
    /// The highest policy id in the maps.
    pub highest_policy_id: PolicyId,
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
        for key in self.policy.keys().flatten() {
            let id = u32::from_be_bytes(key.data().policy);
            self.installed_policies
                .entry(id)
                .or_default()
                .entries
                .push(key);
        }
        for key in self.cidrs_v4.keys().flatten() {
            let id = u32::from_be_bytes(key.data().policy);
            self.installed_policies
                .entry(id)
                .or_default()
                .cidrs_v4
                .push(key);
        }
        for key in self.cidrs_v6.keys().flatten() {
            let id = u32::from_be_bytes(key.data().policy);
            self.installed_policies
                .entry(id)
                .or_default()
                .cidrs_v6
                .push(key);
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
        }
    }

    /// Makes the maps and attachments enforce `state` on the interfaces found in `network`.
    pub fn apply(&mut self, state: &DatapathState, network: &NodeNetwork) -> ApplyReport {
        let mut report = ApplyReport::default();

        let desired = desired_endpoints(state, network, &mut report);
        report.changed |= self.sync_ipcache(&state.ipcache, &mut report.errors);
        let mut failed_policies = BTreeSet::new();
        for (id, compiled) in &state.policies {
            if self.installed_policies.contains_key(id) {
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
                if let Err(error) = self.endpoints.insert(ifindex, value, 0) {
                    report.errors.push(format!(
                        "endpoint {interface}: cannot write its map entry: {error}"
                    ));
                    continue;
                }
                self.installed_endpoints.insert(ifindex, value);
                report.changed = true;
            }
            let mut attached = self.attach_programs;
            for hook in Hook::ALL {
                if self.attach_programs && !self.attached.contains(&(ifindex, hook)) {
                    match self.attach(ifindex, &interface, hook) {
                        Ok(()) => {
                            self.attached.insert((ifindex, hook));
                        }
                        Err(message) => {
                            attached = false;
                            report.errors.push(message);
                        }
                    }
                }
            }
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
        if report.changed {
            self.bump_epoch(&mut report.errors);
        }
        report
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
        let owners: BTreeMap<IpAddr, u32> = wanted.iter().map(|(ifindex, ip)| (*ip, *ifindex)).collect();
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
                Err(error) => errors.push(format!("endpoint {ifindex}: cannot record the owner of {ip}: {error}")),
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
        let wanted: BTreeMap<FrontendKey, u32> = if self.translation == TranslationHook::Attached {
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
                Err(error) => errors.push(format!("Service frontend {id}: cannot write its map entry: {error}")),
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
        if let Err(error) =
            self.settings
                .set(SETTING_FRONTENDS_INSTALLED, u32::from(installed), 0)
        {
            errors.push(format!("SETTINGS: cannot record whether frontends are installed: {error}"));
        }
    }

    /// Loads the hook after translation and attaches it to this network namespace's
    /// netfilter (`POSTROUTING` and `LOCAL_IN`, after source NAT), replacing a previous agent's.
    /// Until it is attached no flow is deferred to it; on a kernel without netfilter BPF
    /// links (Linux < 6.4) or BTF, flows to Services are judged on the Service's address.
    pub fn attach_translation_hook(&mut self) -> Result<(), netfilter::NetfilterError> {
        let result = (|| -> Result<(), netfilter::NetfilterError> {
            let layout = netfilter::kernel_layout(Path::new("/sys/kernel/btf/vmlinux"))?;
            self.kernel_layout
                .set(0, layout, 0)
                .map_err(|source| netfilter::NetfilterError::Map {
                    name: "KERNEL_LAYOUT".into(),
                    source,
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

        if !has_tcx() {
            // Without TCX, a clsact filter persists on the interface by itself.
            if let Err(error) = tc::qdisc_add_clsact(interface)
                && !matches!(&error, tc::TcError::NetlinkError(inner) if inner.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(describe(&error));
            }
        }
        let link_id = program
            .attach(interface, hook.attach_type())
            .map_err(|error| describe(&error))?;
        let link = program
            .take_link(link_id)
            .map_err(|error| describe(&error))?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(&pin).map_err(|error| describe(&error))?;
            }
            Err(_) => {
                // A netlink (clsact) filter: dropping the handle would detach it, and it
                // belongs to the interface, not to this process.
                info!(%interface, "attached with clsact (no TCX on this kernel)");
            }
        }
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) {
        for hook in Hook::ALL {
            // Unpinning drops the last reference to the TCX link, which detaches it.
            let _ = fs::remove_file(self.layout.link(ifindex, hook.program()));
            self.attached.remove(&(ifindex, hook));
        }
    }

    /// Takes over links a previous agent pinned for interfaces that still exist, swapping in
    /// this agent's programs; removes pins of interfaces that are gone.
    pub fn adopt_links(&mut self, network: &NodeNetwork) {
        let Ok(entries) = fs::read_dir(self.layout.links()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((ifindex, hook)) = Hook::from_pin_name(&name) else {
                continue;
            };
            match network.interfaces.get(&ifindex) {
                Some(interface) if interface.is_veth => {
                    let interface = interface.name.clone();
                    match self.attach(ifindex, &interface, hook) {
                        Ok(()) => {
                            self.attached.insert((ifindex, hook));
                        }
                        Err(message) => warn!(%message, "cannot adopt pinned link"),
                    }
                }
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    /// The ring buffer of deny events (`netwarden_common::VerdictEvent`), once: the caller
    /// reads it on its own task.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
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

/// Which interface enforces for which endpoint: local pods through the veth their IP is routed
/// to, and veths routed to an address no local pod has (a pod the agent has not heard of yet).
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
            continue;
        };
        let value = Endpoint {
            ingress_policy: endpoint.ingress.unwrap_or(0),
            egress_policy: endpoint.egress.unwrap_or(0),
            state: endpoint_state::READY,
            reserved: 0,
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
        let known_pod = desired
            .get(&interface.index)
            .is_some_and(|endpoint| endpoint.pod.is_some());
        if !known_ips.contains(&ip) && !known_pod {
            let value = Endpoint {
                state: endpoint_state::UNKNOWN,
                ..Endpoint::default()
            };
            let unknown = desired
                .entry(interface.index)
                .or_insert_with(|| DesiredEndpoint {
                    pod: None,
                    value,
                    interface: interface.name.clone(),
                    addresses: Vec::new(),
                });
            unknown.addresses.push(ip);
        }
    }
    desired
}

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
