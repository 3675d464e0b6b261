//! `ENDPOINT_ADDRESSES` (which addresses each endpoint may send from: anti-spoofing) and
//! `ENDPOINT_OF_ADDRESS` (which endpoint owns an address, for the hook after translation,
//! which sees packets on the node's routing path where the interface no longer tells).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use netwarden_common::{EndpointAddress, IpKey};
use netwarden_policy::map_keys;

use super::{Keyed, Synced, unmapped};
use crate::error::ApplyError;

/// The two address maps and the entries this agent knows they hold.
pub(crate) struct Addresses {
    owned: Keyed<EndpointAddress, u32>,
    installed_owned: BTreeSet<(u32, IpAddr)>,
    owners: Keyed<IpKey, u32>,
    installed_owners: BTreeMap<IpAddr, u32>,
}

impl Addresses {
    /// Takes over the pinned maps and what they hold.
    pub fn adopt(
        owned: BpfHashMap<MapData, EndpointAddress, u32>,
        owners: BpfHashMap<MapData, IpKey, u32>,
    ) -> Self {
        let installed_owned = owned
            .keys()
            .flatten()
            .map(|key| (key.ifindex, unmapped(key.addr)))
            .collect();
        let installed_owners = owners
            .iter()
            .flatten()
            .map(|(key, ifindex)| (unmapped(key.addr), ifindex))
            .collect();
        Self {
            owned: Box::new(owned),
            installed_owned,
            owners: Box::new(owners),
            installed_owners,
        }
    }

    /// Empty maps (the unit tests' recording ones).
    #[cfg(test)]
    pub fn new(owned: Keyed<EndpointAddress, u32>, owners: Keyed<IpKey, u32>) -> Self {
        Self {
            owned,
            installed_owned: BTreeSet::new(),
            owners,
            installed_owners: BTreeMap::new(),
        }
    }

    /// Makes both maps hold exactly `wanted`: (endpoint's ifindex, address it owns).
    pub fn sync(&mut self, wanted: &BTreeSet<(u32, IpAddr)>) -> Synced {
        let mut synced = Synced::default();
        let missing: Vec<(u32, IpAddr)> =
            wanted.difference(&self.installed_owned).copied().collect();
        for (ifindex, ip) in missing {
            let key = map_keys::endpoint_address(ifindex, ip);
            match self.owned.insert(&key, 1) {
                Ok(()) => {
                    self.installed_owned.insert((ifindex, ip));
                    synced.change();
                }
                Err(source) => synced.fail(ApplyError::EndpointAddress {
                    ifindex,
                    ip,
                    source,
                }),
            }
        }
        let gone: Vec<(u32, IpAddr)> = self.installed_owned.difference(wanted).copied().collect();
        for (ifindex, ip) in gone {
            let _ = self.owned.remove(&map_keys::endpoint_address(ifindex, ip));
            self.installed_owned.remove(&(ifindex, ip));
            synced.change();
        }
        synced.merge(self.sync_owners(wanted));
        synced
    }

    fn sync_owners(&mut self, wanted: &BTreeSet<(u32, IpAddr)>) -> Synced {
        let owners: BTreeMap<IpAddr, u32> =
            wanted.iter().map(|(ifindex, ip)| (*ip, *ifindex)).collect();
        let mut synced = Synced::default();
        for (ip, ifindex) in &owners {
            if self.installed_owners.get(ip) == Some(ifindex) {
                continue;
            }
            match self.owners.insert(&map_keys::ip_key(*ip), *ifindex) {
                Ok(()) => {
                    self.installed_owners.insert(*ip, *ifindex);
                    synced.change();
                }
                Err(source) => synced.fail(ApplyError::AddressOwner {
                    ifindex: *ifindex,
                    ip: *ip,
                    source,
                }),
            }
        }
        let gone: Vec<IpAddr> = self
            .installed_owners
            .keys()
            .filter(|ip| !owners.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            let _ = self.owners.remove(&map_keys::ip_key(ip));
            self.installed_owners.remove(&ip);
            synced.change();
        }
        synced
    }

    /// How many (endpoint, address) entries the agent wrote.
    pub fn len(&self) -> usize {
        self.installed_owned.len()
    }
}
