//! Pinned maps a previous build left with a layout this build changed.
//!
//! aya adopts a pinned map by name without comparing its definition, and the kernel then
//! refuses a program that reads past the old value size: an upgraded agent would not start on
//! a node its predecessor ran on. Maps whose content may be lost are therefore replaced when
//! their layout differs: conntrack (flows are decided again segment by segment, as after an
//! eviction) and the verdict counters (they restart from zero).

use std::{io, path::Path};

use aya::maps::MapInfo;
use netwarden_common::{
    FlowKey, FlowKeyV4, FlowState, IpIdentity, IpKey, PolicyEntry, PolicyKey, maps as pinned,
};
use tracing::warn;

/// A pinned map's expected value size and entries (`None`: any capacity will do).
struct Layout {
    name: &'static str,
    key_size: u32,
    value_size: u32,
    max_entries: Option<u32>,
    /// Maps whose content refers to this one's and must be rebuilt along.
    dependents: &'static [&'static str],
}

fn layouts() -> [Layout; 6] {
    [
        Layout {
            name: crate::conntrack::TABLE_V4,
            key_size: size_of::<FlowKeyV4>() as u32,
            value_size: size_of::<FlowState>() as u32,
            max_entries: None,
            dependents: &[],
        },
        Layout {
            name: crate::conntrack::TABLE_V6,
            key_size: size_of::<FlowKey>() as u32,
            value_size: size_of::<FlowState>() as u32,
            max_entries: None,
            dependents: &[],
        },
        Layout {
            name: pinned::VERDICTS.name,
            key_size: size_of::<u32>() as u32,
            value_size: size_of::<u64>() as u32,
            max_entries: Some(pinned::VERDICTS.capacity),
            dependents: &[],
        },
        // Settings the agent writes at start: a smaller array lacks the newer ones.
        Layout {
            name: pinned::SETTINGS.name,
            key_size: size_of::<u32>() as u32,
            value_size: size_of::<u32>() as u32,
            max_entries: Some(pinned::SETTINGS.capacity),
            dependents: &[],
        },
        // An LPM trie before it became an exact hash: its keys carried a prefix length.
        Layout {
            name: pinned::IPCACHE.name,
            key_size: size_of::<IpKey>() as u32,
            value_size: size_of::<IpIdentity>() as u32,
            max_entries: None,
            dependents: &[],
        },
        // A rule id per entry before ClusterNetworkPolicy tiers gave each entry two matches.
        Layout {
            name: pinned::POLICY.name,
            // An LPM trie's key starts with its prefix length.
            key_size: (size_of::<u32>() + size_of::<PolicyKey>()) as u32,
            value_size: size_of::<PolicyEntry>() as u32,
            max_entries: None,
            dependents: NAMING_POLICY_IDS,
        },
    ]
}

/// The maps whose entries name policies by id, rebuilt along with a replaced `POLICY` map: the
/// hash of its exact entries, the CIDR tries and the hash of single IPv4 addresses, and
/// `ENDPOINTS`. The previous agent's programs stay attached until the new agent's first apply
/// has filled its maps, and they keep the maps they were loaded with, the old `POLICY` map
/// among them; `ENDPOINTS` is read by both. Adopted, it would be switched to the new agent's
/// policy ids while the old programs still look them up in their old `POLICY` map, where they
/// are not: every new flow, and every tracked flow checked again after the
/// epoch bump, would be denied until the links are taken over (found by the restart bench,
/// `cargo xtask bench restart`). Rebuilt, the old programs decide on old entries until
/// then, and the new ones on new entries.
pub const NAMING_POLICY_IDS: &[&str] = &[
    pinned::POLICY_EXACT.name,
    pinned::CIDRS_V4.name,
    pinned::CIDRS_V4_EXACT.name,
    pinned::CIDRS_V6.name,
    pinned::ENDPOINTS.name,
];

/// Maps earlier builds pinned that this one no longer has, each with the maps whose content
/// refers to it and must be rebuilt along: `CONNTRACK`, one table for both IP families
/// before IPv4 flows got a table of their own, and `CIDRS`, one trie for both families before
/// IPv4 prefixes got one (the policy map is rebuilt with it, with the maps that name its
/// policies, so the new agent installs every policy again, into both tries, before its
/// programs replace the old ones).
const RETIRED: [(&str, &[&str]); pinned::RETIRED_NAMES.len()] = [
    (pinned::RETIRED_NAMES[0], &[]),
    (
        pinned::RETIRED_NAMES[1],
        &[pinned::POLICY.name, pinned::ENDPOINTS.name],
    ),
];

/// Maps this build added, each beside the pinned map whose presence without it means the pins
/// are an earlier build's: `POLICY_EXACT` and `CIDRS_V4_EXACT`, the hashes that take the exact
/// entries of `POLICY` and `CIDRS_V4`. The earlier build's programs, attached until the new ones
/// replace them, read only the tries; over adopted ones, the new agent's policies would have
/// their exact entries in hashes those programs never ask, and be denied there. So `POLICY` is
/// rebuilt, with the maps naming its ids ([`NAMING_POLICY_IDS`]): the old programs keep the old
/// maps, and the new agent writes every policy into new ones.
const INTRODUCED: [(&str, &str); 2] = [
    (pinned::POLICY_EXACT.name, pinned::POLICY.name),
    (pinned::CIDRS_V4_EXACT.name, pinned::POLICY.name),
];

/// Unpins the maps under `maps_dir` whose layout is not this build's, so the loader creates
/// them afresh, the maps an earlier build pinned without one this build added
/// ([`INTRODUCED`]), and the maps this build no longer has (the programs still attached keep
/// theirs until the new ones replace them). Returns what it replaced or removed.
pub fn replace_outdated_pins(maps_dir: &Path) -> io::Result<Vec<String>> {
    let mut replaced = Vec::new();
    for (retired, dependents) in RETIRED {
        if !unpin(maps_dir, retired)? {
            continue;
        }
        warn!(
            map = retired,
            "removed the pin of a map this build no longer has"
        );
        replaced.push(retired.to_owned());
        for dependent in dependents {
            if unpin(maps_dir, dependent)? {
                warn!(
                    map = dependent,
                    retired, "rebuilding a map that referred to a retired one"
                );
                replaced.push((*dependent).to_owned());
            }
        }
    }
    for (introduced, beside) in INTRODUCED {
        if maps_dir.join(introduced).exists() || !maps_dir.join(beside).exists() {
            continue;
        }
        for map in std::iter::once(&beside).chain(NAMING_POLICY_IDS) {
            if unpin(maps_dir, map)? {
                warn!(
                    map,
                    introduced, "rebuilding a map an earlier build pinned without this one"
                );
                replaced.push((*map).to_owned());
            }
        }
    }
    for layout in layouts() {
        let path = maps_dir.join(layout.name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        // A per-CPU map reports the size of one CPU's value.
        let outdated = info.key_size() != layout.key_size
            || info.value_size() != layout.value_size
            || layout
                .max_entries
                .is_some_and(|entries| entries != info.max_entries());
        if outdated {
            warn!(
                map = layout.name,
                value_size = info.value_size(),
                max_entries = info.max_entries(),
                "the pinned map has the layout of another build; replacing it"
            );
            std::fs::remove_file(&path)?;
            replaced.push(layout.name.to_owned());
            for dependent in layout.dependents {
                if unpin(maps_dir, dependent)? {
                    warn!(
                        map = dependent,
                        replaced = layout.name,
                        "rebuilding a map that referred to a replaced one"
                    );
                    replaced.push((*dependent).to_owned());
                }
            }
        }
    }
    Ok(replaced)
}

/// Removes the pin of map `name`; whether there was one.
fn unpin(maps_dir: &Path, name: &str) -> io::Result<bool> {
    match std::fs::remove_file(maps_dir.join(name)) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// A pinned map adopted as it is although this build would create it otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedDifference {
    /// The map.
    pub name: String,
    /// The pin's `map_flags`, and this build's.
    pub flags: (u32, u32),
    /// The pin's `max_entries`, and what this build asks for.
    pub max_entries: (u32, u32),
}

/// The pins under `maps_dir` that the loader will adopt although their flags or `max_entries`
/// differ from this build's: `wanted` lists, per map name, the flags and entries it would be
/// created with. aya adopts a pin by name without comparing either. Neither matters for
/// correctness (key and value sizes are checked by [`replace_outdated_pins`]): a preallocated
/// map where this build allocates per entry, or a conntrack table of another size, only costs
/// other memory until its pin is removed. The pins are kept: replacing an agent-written map
/// would leave pods unenforced until the first apply, and replacing conntrack would forget
/// every established flow (docs/design.md, "Map memory").
pub fn adopted_differences<'a>(
    maps_dir: &Path,
    wanted: impl IntoIterator<Item = (&'a str, u32, u32)>,
) -> Vec<AdoptedDifference> {
    wanted
        .into_iter()
        .filter_map(|(name, flags, max_entries)| {
            let info = MapInfo::from_pin(maps_dir.join(name)).ok()?;
            (info.map_flags() != flags || info.max_entries() != max_entries).then(|| {
                AdoptedDifference {
                    name: name.to_owned(),
                    flags: (info.map_flags(), flags),
                    max_entries: (info.max_entries(), max_entries),
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use netwarden_common::maps as pinned;

    use super::{INTRODUCED, NAMING_POLICY_IDS, RETIRED, layouts, replace_outdated_pins};

    /// Pins of a build before the hashes of exact entries: its `POLICY` and every map naming
    /// policy ids go, the rest stays; pins that already have them stay whole.
    #[test]
    fn pins_without_the_hashes_of_exact_entries_rebuild_the_policy_maps_only() {
        let dir = std::env::temp_dir().join(format!("netwarden-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let pin = |name: &str| std::fs::write(dir.join(name), b"").expect("a stand-in pin");
        let pinned_now = |name: &str| dir.join(name).exists();
        for map in pinned::ALL {
            pin(map.name);
        }
        let introduced = [pinned::POLICY_EXACT.name, pinned::CIDRS_V4_EXACT.name];
        for name in introduced {
            std::fs::remove_file(dir.join(name)).expect("unpinned");
        }
        let replaced = replace_outdated_pins(&dir).expect("the pins are read");
        assert_eq!(INTRODUCED.map(|(introduced, _)| introduced), introduced);
        let rebuilt = [
            pinned::POLICY.name,
            pinned::CIDRS_V4.name,
            pinned::CIDRS_V6.name,
            pinned::ENDPOINTS.name,
        ];
        assert_eq!(replaced, rebuilt);
        for map in pinned::ALL {
            assert_eq!(
                pinned_now(map.name),
                !rebuilt.contains(&map.name) && !introduced.contains(&map.name),
                "{}",
                map.name
            );
        }

        // Once the new build pinned its maps, nothing is rebuilt on the next start.
        for map in pinned::ALL {
            pin(map.name);
        }
        assert_eq!(
            replace_outdated_pins(&dir).expect("the pins are read"),
            Vec::<String>::new()
        );
        std::fs::remove_dir_all(&dir).expect("removed");
    }

    #[test]
    fn the_retired_cidrs_trie_rebuilds_the_policy_map_and_the_endpoints_and_nothing_else() {
        assert_eq!(
            RETIRED,
            [
                ("CONNTRACK", &[][..]),
                ("CIDRS", &[pinned::POLICY.name, pinned::ENDPOINTS.name][..]),
            ]
        );
    }

    /// An `ENDPOINTS` entry names its policies by id: adopted over a rebuilt `POLICY` map, it
    /// would point the previous agent's programs, still attached, at ids their `POLICY` map
    /// does not have.
    #[test]
    fn a_rebuilt_policy_map_rebuilds_every_map_naming_its_ids() {
        let policy = layouts()
            .into_iter()
            .find(|layout| layout.name == pinned::POLICY.name)
            .expect("POLICY's layout is checked");
        assert_eq!(policy.dependents, NAMING_POLICY_IDS);
        for name in [
            pinned::POLICY_EXACT.name,
            pinned::CIDRS_V4.name,
            pinned::CIDRS_V4_EXACT.name,
            pinned::CIDRS_V6.name,
            pinned::ENDPOINTS.name,
        ] {
            assert!(NAMING_POLICY_IDS.contains(&name), "{name}");
        }
    }

    #[test]
    fn every_checked_layout_is_a_shared_map() {
        for layout in layouts() {
            assert!(
                pinned::ALL.iter().any(|map| map.name == layout.name),
                "{}",
                layout.name
            );
        }
    }
}
