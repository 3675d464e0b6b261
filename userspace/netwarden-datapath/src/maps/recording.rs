//! Maps and hooks that hold their content in memory and record every write, in order, in one
//! log: what the unit tests of the apply check its promised order against.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    io,
    sync::{Arc, Mutex, PoisonError},
};

use aya::{
    maps::{MapError, lpm_trie::Key},
    sys::SyscallError,
};
use netwarden_common::{CidrKey, CidrKeyV4, PolicyKey, maps as pinned};

use super::{
    ArrayMap, KeyedMap, SyncedMaps, addresses::Addresses, endpoints::Endpoints, epoch::Epoch,
    frontends::Frontends, identities::Identities, ipcache::IpCache, policies::Policies,
};
use crate::{
    attach::{Hook, Hooks},
    error::{AttachError, AttachFailure},
    netfilter::NetfilterError,
};

/// One thing done to a map or an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    /// An entry added or replaced.
    Insert {
        map: &'static str,
        key: String,
        value: String,
    },
    /// An entry removed.
    Remove { map: &'static str, key: String },
    /// An array cell written.
    Set {
        map: &'static str,
        index: u32,
        value: String,
    },
    /// A program attached.
    Attach { ifindex: u32, hook: Hook },
    /// Both programs detached.
    Detach { ifindex: u32 },
}

/// The log every recording map and hook of one test writes to, and their content.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    log: Arc<Mutex<Vec<Write>>>,
}

impl Recorder {
    /// Every write since the last call, in order.
    pub fn take(&self) -> Vec<Write> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn push(&self, write: Write) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(write);
    }

    /// A hash map or trie named `map` that holds at most `capacity` entries, its keys shown by
    /// `describe`. `content` sees what it holds.
    pub fn keyed<K: 'static, V: Debug + Send + 'static>(
        &self,
        map: &'static str,
        capacity: usize,
        describe: fn(&K) -> String,
    ) -> (Box<dyn KeyedMap<K, V>>, Content) {
        let content = Content::default();
        let table = RecordingMap {
            map,
            capacity,
            describe,
            content: content.clone(),
            recorder: self.clone(),
        };
        (Box::new(table), content)
    }

    /// Every map the agent writes, empty, recording into this log, each holding at most its
    /// entry in `capacities` (else unbounded); and the content of each.
    pub fn maps(&self, capacities: &BTreeMap<&'static str, usize>) -> (SyncedMaps, Contents) {
        let mut contents = Contents::default();
        let mut tables = Tables {
            recorder: self,
            capacities,
            contents: &mut contents,
        };
        let maps = SyncedMaps {
            ipcache: IpCache::new(tables.keyed(pinned::IPCACHE.name, debug), BTreeMap::new()),
            policies: Policies::new(
                tables.keyed(pinned::POLICY.name, policy_entry),
                tables.keyed(pinned::CIDRS_V4.name, cidr_v4),
                tables.keyed(pinned::CIDRS_V6.name, cidr_v6),
            ),
            endpoints: Endpoints::new(tables.keyed(pinned::ENDPOINTS.name, debug), BTreeMap::new()),
            addresses: Addresses::new(
                tables.keyed(pinned::ENDPOINT_ADDRESSES.name, debug),
                tables.keyed(pinned::ENDPOINT_OF_ADDRESS.name, debug),
            ),
            frontends: Frontends::new(tables.keyed(pinned::FRONTENDS.name, debug), BTreeMap::new()),
            identities: Identities::new(
                tables.keyed(pinned::IDENTITIES.name, debug),
                BTreeMap::new(),
            ),
            epoch: Epoch::new(Box::new(self.array(pinned::EPOCH.name))),
            settings: Box::new(self.array(pinned::SETTINGS.name)),
        };
        (maps, contents)
    }

    fn array(&self, map: &'static str) -> RecordingArray {
        RecordingArray {
            map,
            cells: BTreeMap::new(),
            recorder: self.clone(),
        }
    }

    /// Hooks that attach everything asked, recording into this log.
    pub fn hooks(&self) -> RecordingHooks {
        RecordingHooks {
            recorder: self.clone(),
            failing_attaches: 0,
        }
    }
}

/// Makes the recording maps of [`Recorder::maps`], noting each one's content.
struct Tables<'a> {
    recorder: &'a Recorder,
    capacities: &'a BTreeMap<&'static str, usize>,
    contents: &'a mut Contents,
}

impl Tables<'_> {
    fn keyed<K: 'static, V: Debug + Send + 'static>(
        &mut self,
        map: &'static str,
        describe: fn(&K) -> String,
    ) -> Box<dyn KeyedMap<K, V>> {
        let capacity = self.capacities.get(map).copied().unwrap_or(usize::MAX);
        let (table, content) = self.recorder.keyed(map, capacity, describe);
        self.contents.0.insert(map, content);
        table
    }
}

fn debug<K: Debug>(key: &K) -> String {
    format!("{key:?}")
}

/// A `POLICY` key as `policy <id> <rest of the key>/<prefix length>`.
fn policy_entry(key: &Key<PolicyKey>) -> String {
    let data = key.data();
    format!(
        "policy {} {:?}/{}",
        u32::from_be_bytes(data.policy),
        data,
        key.prefix_len()
    )
}

fn cidr_v4(key: &Key<CidrKeyV4>) -> String {
    let data = key.data();
    format!(
        "policy {} {:?}/{}",
        u32::from_be_bytes(data.policy),
        data.addr,
        key.prefix_len()
    )
}

fn cidr_v6(key: &Key<CidrKey>) -> String {
    let data = key.data();
    format!(
        "policy {} {:?}/{}",
        u32::from_be_bytes(data.policy),
        data.addr,
        key.prefix_len()
    )
}

/// What one recording map holds: described keys and values.
#[derive(Clone, Default)]
pub(crate) struct Content(Arc<Mutex<BTreeMap<String, String>>>);

impl Content {
    pub fn entries(&self) -> BTreeMap<String, String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The content of every recording map, by name.
#[derive(Default)]
pub(crate) struct Contents(BTreeMap<&'static str, Content>);

impl Contents {
    pub fn of(&self, map: &str) -> BTreeMap<String, String> {
        self.0[map].entries()
    }
}

struct RecordingMap<K> {
    map: &'static str,
    capacity: usize,
    describe: fn(&K) -> String,
    content: Content,
    recorder: Recorder,
}

/// What a full kernel map answers.
fn full() -> MapError {
    MapError::SyscallError(SyscallError {
        call: "bpf_map_update_elem",
        io_error: io::Error::from_raw_os_error(libc::E2BIG),
    })
}

impl<K: 'static, V: Debug + Send + 'static> KeyedMap<K, V> for RecordingMap<K> {
    fn insert(&mut self, key: &K, value: V) -> Result<(), MapError> {
        let key = (self.describe)(key);
        let value = format!("{value:?}");
        let mut content = self
            .content
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !content.contains_key(&key) && content.len() >= self.capacity {
            return Err(full());
        }
        content.insert(key.clone(), value.clone());
        self.recorder.push(Write::Insert {
            map: self.map,
            key,
            value,
        });
        Ok(())
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        let key = (self.describe)(key);
        self.content
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        self.recorder.push(Write::Remove { map: self.map, key });
        Ok(())
    }
}

struct RecordingArray {
    map: &'static str,
    cells: BTreeMap<u32, u32>,
    recorder: Recorder,
}

impl ArrayMap<u32> for RecordingArray {
    fn get(&self, index: u32) -> Result<u32, MapError> {
        Ok(self.cells.get(&index).copied().unwrap_or(0))
    }

    fn set(&mut self, index: u32, value: u32) -> Result<(), MapError> {
        self.cells.insert(index, value);
        self.recorder.push(Write::Set {
            map: self.map,
            index,
            value: value.to_string(),
        });
        Ok(())
    }
}

/// Hooks that record what they are asked to do.
pub(crate) struct RecordingHooks {
    recorder: Recorder,
    /// How many of the next attachments fail.
    pub failing_attaches: u32,
}

impl Hooks for RecordingHooks {
    fn attach(&mut self, ifindex: u32, interface: &str, hook: Hook) -> Result<(), AttachError> {
        if self.failing_attaches > 0 {
            self.failing_attaches -= 1;
            return Err(AttachError::Refused {
                interface: interface.to_owned(),
                program: hook.program(),
                source: AttachFailure::Program(aya::programs::ProgramError::NotLoaded),
            });
        }
        self.recorder.push(Write::Attach { ifindex, hook });
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) {
        self.recorder.push(Write::Detach { ifindex });
    }

    fn is_pinned(&self, _ifindex: u32, _hook: Hook) -> bool {
        false
    }

    fn pinned_links(&self) -> Vec<(u32, Hook)> {
        Vec::new()
    }

    fn unpin(&mut self, _ifindex: u32, _hook: Hook) {}

    fn attach_translation_hook(&mut self) -> Result<(), NetfilterError> {
        Ok(())
    }

    fn translation_hook_pinned(&self) -> bool {
        false
    }
}
