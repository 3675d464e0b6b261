//! `IPCACHE`: the identity of every pod and node address in the cluster.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{HashMap as BpfHashMap, MapData};
use netwarden_common::{IpIdentity, IpKey, PeerId};
use netwarden_policy::map_keys;

use super::{Keyed, Synced, unmapped};
use crate::error::ApplyError;

/// `IPCACHE` and the entries this agent knows it holds.
pub(crate) struct IpCache {
    map: Keyed<IpKey, IpIdentity>,
    installed: BTreeMap<IpAddr, PeerId>,
}

impl IpCache {
    /// Takes over the pinned map and what it holds.
    pub fn adopt(map: BpfHashMap<MapData, IpKey, IpIdentity>) -> Self {
        let installed = map
            .iter()
            .flatten()
            .map(|(key, value)| (unmapped(key.addr), value.identity))
            .collect();
        Self::new(Box::new(map), installed)
    }

    pub fn new(map: Keyed<IpKey, IpIdentity>, installed: BTreeMap<IpAddr, PeerId>) -> Self {
        Self { map, installed }
    }

    /// Makes the map hold exactly `desired`.
    pub fn sync(&mut self, desired: &BTreeMap<IpAddr, PeerId>) -> Synced {
        let mut synced = Synced::default();
        for (ip, identity) in desired {
            if self.installed.get(ip) == Some(identity) {
                continue;
            }
            let key = map_keys::ip_key(*ip);
            let value = IpIdentity {
                identity: *identity,
            };
            match self.map.insert(&key, value) {
                Ok(()) => {
                    self.installed.insert(*ip, *identity);
                    synced.change();
                }
                Err(source) => synced.fail(ApplyError::IpCache { ip: *ip, source }),
            }
        }
        let gone: Vec<IpAddr> = self
            .installed
            .keys()
            .copied()
            .filter(|ip| !desired.contains_key(ip))
            .collect();
        for ip in gone {
            let _ = self.map.remove(&map_keys::ip_key(ip));
            self.installed.remove(&ip);
            synced.change();
        }
        synced
    }

    /// How many entries the agent wrote.
    pub fn len(&self) -> usize {
        self.installed.len()
    }
}
