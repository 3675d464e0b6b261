//! `IDENTITIES`: identity numbers by the digest of their label set, read back by the next
//! agent so it numbers identities as this one did (the programs never read it).

use std::collections::{BTreeMap, HashMap};

use aya::maps::{HashMap as BpfHashMap, MapData};
use netwarden_common::PeerId;
use netwarden_policy::DatapathState;

use super::Keyed;

/// `IDENTITIES` and the entries this agent knows it holds.
pub(crate) struct Identities {
    map: Keyed<[u8; 32], PeerId>,
    installed: BTreeMap<[u8; 32], PeerId>,
}

impl Identities {
    /// Takes over the pinned map and what it holds.
    pub fn adopt(map: BpfHashMap<MapData, [u8; 32], PeerId>) -> Self {
        let installed = map.iter().flatten().collect();
        Self::new(Box::new(map), installed)
    }

    pub fn new(map: Keyed<[u8; 32], PeerId>, installed: BTreeMap<[u8; 32], PeerId>) -> Self {
        Self { map, installed }
    }

    /// The identity numbers a previous agent gave, by digest.
    pub fn inherited(&self) -> HashMap<[u8; 32], PeerId> {
        self.installed
            .iter()
            .map(|(digest, id)| (*digest, *id))
            .collect()
    }

    /// Makes the map hold the identities of `state`. A failed write only costs the next agent
    /// a renumbering, so it is not reported.
    pub fn sync(&mut self, state: &DatapathState) {
        let desired: BTreeMap<[u8; 32], PeerId> = state
            .identities
            .iter()
            .map(|(id, info)| (info.digest(), *id))
            .collect();
        for (digest, id) in &desired {
            if self.installed.get(digest) != Some(id) && self.map.insert(digest, *id).is_ok() {
                self.installed.insert(*digest, *id);
            }
        }
        let gone: Vec<[u8; 32]> = self
            .installed
            .keys()
            .copied()
            .filter(|digest| !desired.contains_key(digest))
            .collect();
        for digest in gone {
            let _ = self.map.remove(&digest);
            self.installed.remove(&digest);
        }
    }
}
