//! The mTLS screen's maps (`ebpf/netwarden-ebpf/src/mtls.rs`) and the conntrack marks the
//! identity check leaves on the flows it refuses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use netwarden_common::{
    FlowKey, FlowKeyV4, FlowState, MTLS_STRICT, MtlsExemptPort, flow_flags, maps as pinned,
};
use netwarden_policy::lookup::mapped;

use crate::{Datapath, DatapathError, loader::take_map};

/// mTLS-strict endpoints by the ifindex of their veth, each with its exempt ports.
pub type StrictEndpoints = BTreeMap<u32, BTreeSet<u16>>;

impl Datapath {
    /// Makes the mTLS maps hold exactly `strict`. Returns whether anything changed. Entries
    /// are added before stale ones are removed, so an endpoint that stays strict is never
    /// briefly lax.
    pub fn sync_mtls(&mut self, strict: &StrictEndpoints) -> Result<bool, MapError> {
        let mut changed = false;
        let mut endpoints: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(
            self.kernel
                .ebpf
                .map_mut(pinned::MTLS_STRICT_ENDPOINTS.name)
                .ok_or_else(|| missing(pinned::MTLS_STRICT_ENDPOINTS.name))?,
        )?;
        let installed: BTreeSet<u32> = endpoints.keys().flatten().collect();
        for ifindex in strict.keys() {
            if !installed.contains(ifindex) {
                endpoints.insert(ifindex, MTLS_STRICT, 0)?;
                changed = true;
            }
        }
        let mut ports: BpfHashMap<&mut MapData, MtlsExemptPort, u32> = BpfHashMap::try_from(
            self.kernel
                .ebpf
                .map_mut(pinned::MTLS_EXEMPT_PORTS.name)
                .ok_or_else(|| missing(pinned::MTLS_EXEMPT_PORTS.name))?,
        )?;
        let installed_ports: BTreeSet<MtlsExemptPort> = ports.keys().flatten().collect();
        let wanted_ports: BTreeSet<MtlsExemptPort> = strict
            .iter()
            .flat_map(|(ifindex, exempt)| {
                exempt.iter().map(|port| MtlsExemptPort {
                    ifindex: *ifindex,
                    port: *port,
                    padding: 0,
                })
            })
            .collect();
        for port in wanted_ports.difference(&installed_ports) {
            ports.insert(port, 1, 0)?;
            changed = true;
        }
        for port in installed_ports.difference(&wanted_ports) {
            ports.remove(port)?;
            changed = true;
        }
        let mut endpoints: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(
            self.kernel
                .ebpf
                .map_mut(pinned::MTLS_STRICT_ENDPOINTS.name)
                .ok_or_else(|| missing(pinned::MTLS_STRICT_ENDPOINTS.name))?,
        )?;
        for ifindex in installed
            .iter()
            .filter(|ifindex| !strict.contains_key(ifindex))
        {
            endpoints.remove(ifindex)?;
            changed = true;
        }
        Ok(changed)
    }

    /// A handle on the conntrack table for cutting flows, once (the caller keeps it on the
    /// identity check's task).
    pub fn flow_cutter(&mut self) -> Result<FlowCutter, DatapathError> {
        Ok(FlowCutter {
            ipv4: take_map(&mut self.kernel.ebpf, crate::conntrack::TABLE_V4)?,
            ipv6: take_map(&mut self.kernel.ebpf, crate::conntrack::TABLE_V6)?,
        })
    }
}

fn missing(name: &str) -> MapError {
    MapError::InvalidName {
        name: name.to_owned(),
    }
}

/// Marks flows cut in the kernel's conntrack: every later packet of theirs drops.
pub struct FlowCutter {
    ipv4: BpfHashMap<MapData, FlowKeyV4, FlowState>,
    ipv6: BpfHashMap<MapData, FlowKey, FlowState>,
}

impl FlowCutter {
    /// Cuts the TCP flow between `pod` (an address of the endpoint behind `ifindex`) and
    /// `peer`, opened in `origin` ([`netwarden_common::direction`]). An entry that does not
    /// exist (evicted, or not opened yet) is created cut, so the flow cannot open afterwards.
    /// Returns whether the flow was tracked.
    pub fn cut(
        &mut self,
        ifindex: u32,
        pod: SocketAddr,
        peer: SocketAddr,
        origin: u32,
    ) -> Result<bool, MapError> {
        let key = flow_key(ifindex, pod, peer);
        let (tracked, mut state) = match self.get(&key) {
            Ok(state) => (true, state),
            Err(MapError::KeyNotFound) => (
                false,
                FlowState {
                    origin,
                    ..FlowState::default()
                },
            ),
            Err(error) => return Err(error),
        };
        state.flags |= flow_flags::CUT_BY_IDENTITY;
        self.insert(&key, state)?;
        Ok(tracked)
    }

    /// The flags of a tracked flow, for tests.
    #[must_use]
    pub fn flags(&self, ifindex: u32, pod: SocketAddr, peer: SocketAddr) -> Option<u32> {
        let key = flow_key(ifindex, pod, peer);
        self.get(&key).ok().map(|state| state.flags)
    }

    /// Sets the flags of a tracked flow, so tests and benchmarks can run the screen on the same
    /// packet again.
    pub fn set_flags(
        &mut self,
        ifindex: u32,
        pod: SocketAddr,
        peer: SocketAddr,
        flags: u32,
    ) -> Result<(), MapError> {
        let key = flow_key(ifindex, pod, peer);
        let mut state = self.get(&key)?;
        state.flags = flags;
        self.insert(&key, state)
    }

    /// The entry of `key` in the table of its family.
    fn get(&self, key: &FlowKey) -> Result<FlowState, MapError> {
        match key.ipv4() {
            Some(v4) => self.ipv4.get(&v4, 0),
            None => self.ipv6.get(key, 0),
        }
    }

    fn insert(&mut self, key: &FlowKey, state: FlowState) -> Result<(), MapError> {
        match key.ipv4() {
            Some(v4) => self.ipv4.insert(v4, state, 0),
            None => self.ipv6.insert(key, state, 0),
        }
    }
}

/// The conntrack key of the TCP flow between `pod` (behind `ifindex`) and `peer`.
fn flow_key(ifindex: u32, pod: SocketAddr, peer: SocketAddr) -> FlowKey {
    FlowKey::new(
        ifindex,
        6,
        (mapped(pod.ip()), pod.port()),
        (mapped(peer.ip()), peer.port()),
    )
}
