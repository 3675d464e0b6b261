//! `ENDPOINTS`: each local endpoint's policies and state, by the ifindex of its veth. One
//! write switches an endpoint to its new policies (see `apply.rs`).

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use netwarden_common::Endpoint;

use super::Keyed;

/// `ENDPOINTS` and the entries this agent knows it holds.
pub(crate) struct Endpoints {
    map: Keyed<u32, Endpoint>,
    installed: BTreeMap<u32, Endpoint>,
    /// How many of the next writes fail (`Faults::endpoint_writes`).
    #[cfg(feature = "test-support")]
    pub failing_writes: u32,
}

impl Endpoints {
    /// Takes over the pinned map and what it holds.
    pub fn adopt(map: BpfHashMap<MapData, u32, Endpoint>) -> Self {
        let installed = map.iter().flatten().collect();
        Self::new(Box::new(map), installed)
    }

    pub fn new(map: Keyed<u32, Endpoint>, installed: BTreeMap<u32, Endpoint>) -> Self {
        Self {
            map,
            installed,
            #[cfg(feature = "test-support")]
            failing_writes: 0,
        }
    }

    /// What the map holds, as far as this agent knows.
    pub fn installed(&self) -> &BTreeMap<u32, Endpoint> {
        &self.installed
    }

    /// Makes the entry of `ifindex` hold `value`. Returns whether it was written (it already
    /// held it otherwise).
    pub fn write(&mut self, ifindex: u32, value: Endpoint) -> Result<bool, MapError> {
        if self.installed.get(&ifindex) == Some(&value) {
            return Ok(false);
        }
        #[cfg(feature = "test-support")]
        if self.failing_writes > 0 {
            self.failing_writes -= 1;
            return Err(crate::faults::injected_map_error());
        }
        self.map.insert(&ifindex, value)?;
        self.installed.insert(ifindex, value);
        Ok(true)
    }

    /// Forgets the entry of `ifindex`: its interface is gone or enforces nothing now.
    pub fn remove(&mut self, ifindex: u32) {
        if let Err(error) = self.map.remove(&ifindex) {
            tracing::warn!(ifindex, %error, "cannot remove endpoint entry");
        }
        self.installed.remove(&ifindex);
    }
}
