//! `FRONTENDS`: the Service frontends whose flows are decided after translation, and the flag
//! in `SETTINGS` that tells the programs whether to look them up at all.

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, MapData};
use netwarden_common::{FrontendKey, FrontendValue, SETTING_FRONTENDS_INSTALLED};
use netwarden_policy::{DatapathState, map_keys::frontend_key};

use super::{ArrayMap, Keyed, Synced};
use crate::error::ApplyError;

/// `FRONTENDS` and the entries this agent knows it holds.
pub(crate) struct Frontends {
    map: Keyed<FrontendKey, FrontendValue>,
    installed: BTreeMap<FrontendKey, u32>,
}

impl Frontends {
    /// Takes over the pinned map and what it holds.
    pub fn adopt(map: BpfHashMap<MapData, FrontendKey, FrontendValue>) -> Self {
        let installed = map
            .iter()
            .flatten()
            .map(|(key, value)| (key, value.id))
            .collect();
        Self::new(Box::new(map), installed)
    }

    pub fn new(
        map: Keyed<FrontendKey, FrontendValue>,
        installed: BTreeMap<FrontendKey, u32>,
    ) -> Self {
        Self { map, installed }
    }

    /// Makes the map hold the frontends of `state` while a hook after translation is
    /// `deciding`, and none otherwise: with no hook nothing may be deferred to it, so flows to
    /// a Service are judged on its address (fail closed). `settings` holds the flag.
    pub fn sync(
        &mut self,
        state: &DatapathState,
        deciding: bool,
        settings: &mut dyn ArrayMap<u32>,
    ) -> Synced {
        let wanted: BTreeMap<FrontendKey, u32> = if deciding {
            state
                .service_frontends
                .iter()
                .map(|(frontend, info)| (frontend_key(frontend), info.id))
                .collect()
        } else {
            BTreeMap::new()
        };
        let mut synced = Synced::default();
        if wanted.is_empty() && !self.installed.is_empty() {
            // No new flow looks the map up once the flag is down.
            set_installed_flag(settings, false, &mut synced);
        }
        for (key, id) in &wanted {
            if self.installed.get(key) == Some(id) {
                continue;
            }
            match self.map.insert(key, FrontendValue { id: *id }) {
                Ok(()) => {
                    self.installed.insert(*key, *id);
                    synced.change();
                }
                // Not deferred: flows to it are judged on the frontend's address (fail closed).
                Err(source) => synced.fail(ApplyError::Frontend { id: *id, source }),
            }
        }
        let gone: Vec<FrontendKey> = self
            .installed
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            let _ = self.map.remove(&key);
            self.installed.remove(&key);
            synced.change();
        }
        if !self.installed.is_empty() {
            set_installed_flag(settings, true, &mut synced);
        }
        synced
    }
}

fn set_installed_flag(settings: &mut dyn ArrayMap<u32>, installed: bool, synced: &mut Synced) {
    if let Err(source) = settings.set(SETTING_FRONTENDS_INSTALLED, u32::from(installed)) {
        synced.fail(ApplyError::FrontendsFlag { source });
    }
}
