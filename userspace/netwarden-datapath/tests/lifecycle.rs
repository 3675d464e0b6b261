//! The datapath across failures and restarts: an endpoint whose attachment or map entry
//! failed is reported unenforced and taken up by the next apply.
//!
//! Needs root; skipped with a message otherwise. Programs are attached to the loopback of a
//! network namespace of the test's own, never to the namespace the tests run in.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr};

use aya::maps::{HashMap, Map, MapData};
use netwarden_common::{Endpoint, maps as pinned};
use netwarden_datapath::{
    Capacity, Datapath, EndpointState, TranslationHook, Unenforced, faults::Faults,
};
use netwarden_policy::Compiler;

use crate::{common::PrivateBpffs, netns::in_new_netns};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

const MANIFESTS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{ports: [{port: 80}]}]
";

fn reasons(report: &netwarden_datapath::ApplyReport) -> Vec<Unenforced> {
    report
        .unenforced
        .iter()
        .map(|endpoint| endpoint.reason)
        .collect()
}

#[test]
fn a_failed_attach_or_endpoint_write_is_reported_and_the_next_apply_takes_it_up() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    let root = bpffs.path().to_owned();
    in_new_netns(move || {
        let (mut datapath, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        let mut compiler = Compiler::new("node-1");
        let state = compiler.sync(common::cluster_from(MANIFESTS)).clone();
        let network = common::loopback_node(&[IpAddr::V4(SERVER)]);

        datapath.inject_faults(Faults {
            endpoint_writes: 1,
            ..Faults::default()
        });
        let report = datapath.apply(&state, &network);
        assert_eq!(reasons(&report), [Unenforced::MapWriteFailed], "{report:?}");
        assert_eq!(
            report.unenforced[0].pod.as_ref().map(ToString::to_string),
            Some("x/server".to_owned()),
            "{report:?}"
        );

        datapath.inject_faults(Faults {
            attaches: 1,
            ..Faults::default()
        });
        let report = datapath.apply(&state, &network);
        assert_eq!(reasons(&report), [Unenforced::AttachFailed], "{report:?}");
        assert!(!report.endpoints[0].attached);

        // Nothing changed in the cluster: the retry alone takes the endpoint up.
        let report = datapath.apply(&state, &network);
        assert!(report.unenforced.is_empty(), "{report:?}");
        assert!(report.endpoints[0].attached, "{report:?}");

        let pending = datapath.apply(&state, &common::loopback_node(&[]));
        assert_eq!(
            reasons(&pending),
            [Unenforced::InterfaceMissing],
            "{pending:?}"
        );
    });
}

const RESTART_MANIFESTS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: early, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{ports: [{port: 1}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}, {port: 81}, {port: 82}, {protocol: UDP, port: 53}]
  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8}}, {ipBlock: {cidr: 'fd00::/8'}}]
";

/// Every `POLICY` entry (prefix length, key, rule) and every CIDR prefix, read through the pins.
fn pinned_content(root: &std::path::Path) -> (Vec<String>, usize) {
    use aya::maps::{HashMap as BpfHashMap, LpmTrie};
    use netwarden_common::{
        CidrClass, CidrKey, CidrKeyV4, POLICY_KEY_FULL_BITS, PolicyEntry, PolicyKey,
    };
    let maps = netwarden_datapath::bpffs::PinLayout::new(root).maps();
    let open = |name: &str| MapData::from_pin(maps.join(name)).expect("a pinned map");
    let policy: LpmTrie<MapData, PolicyKey, PolicyEntry> =
        LpmTrie::try_from(Map::LpmTrie(open(pinned::POLICY.name))).expect("the policy trie");
    let mut entries: Vec<String> = policy
        .iter()
        .map(|item| {
            let (key, value) = item.expect("an entry");
            format!("{}/{:?} -> {:?}", key.prefix_len(), key.data(), value)
        })
        .collect();
    // The exact entries, in the hash beside the trie, read as the trie would show them.
    let exact: BpfHashMap<MapData, PolicyKey, PolicyEntry> =
        BpfHashMap::try_from(Map::HashMap(open(pinned::POLICY_EXACT.name)))
            .expect("the exact policy hash");
    entries.extend(exact.iter().map(|item| {
        let (key, value) = item.expect("an entry");
        format!("{POLICY_KEY_FULL_BITS}/{key:?} -> {value:?}")
    }));
    entries.sort();
    let v4: LpmTrie<MapData, CidrKeyV4, CidrClass> =
        LpmTrie::try_from(Map::LpmTrie(open(pinned::CIDRS_V4.name))).expect("the v4 trie");
    let v6: LpmTrie<MapData, CidrKey, CidrClass> =
        LpmTrie::try_from(Map::LpmTrie(open(pinned::CIDRS_V6.name))).expect("the v6 trie");
    let v4_exact: BpfHashMap<MapData, CidrKeyV4, CidrClass> =
        BpfHashMap::try_from(Map::HashMap(open(pinned::CIDRS_V4_EXACT.name)))
            .expect("the hash of single IPv4 addresses");
    let cidrs = v4.keys().count() + v4_exact.keys().count() + v6.keys().count();
    (entries, cidrs)
}

#[test]
fn a_restart_at_60_percent_of_the_policy_map_keeps_every_id_and_writes_nothing() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    let root = bpffs.path();
    let network = common::loopback_node(&[IpAddr::V4(SERVER)]);
    // The first agent saw a policy come and go: its rule ids are not a fresh compiler's.
    let history = common::cluster_from(RESTART_MANIFESTS);
    let mut current = history.clone();
    current.policies.retain(|id, _| id.name != "early");
    let mut compiler = Compiler::new("node-1");
    compiler.sync(history);
    let state = compiler.sync(current.clone()).clone();
    let entries: usize = state
        .policies
        .values()
        .map(|policy| policy.entries.len())
        .sum();
    let capacity = Capacity {
        // The entries fill 60% of the policy maps (the trie, and the hash of exact entries a
        // quarter of its size): installing them twice would not fit.
        policy: u32::try_from(entries * 4 / 3).expect("a small map"),
        ..Capacity::default()
    };
    assert!(
        entries >= 5,
        "enough entries for the ratio to mean something: {entries}"
    );

    let (mut first, _) = Datapath::open(root, &capacity).expect("datapath");
    first.detached();
    let report = first.apply(&state, &network);
    assert!(report.errors.is_empty(), "{report:?}");
    drop(first);
    let before = pinned_content(root);
    assert_eq!(before.0.len(), entries);

    let (mut second, inherited) = Datapath::open(root, &capacity).expect("datapath");
    second.detached();
    assert_eq!(inherited.policies.len(), state.policies.len());
    assert_eq!(
        inherited.policy_users.keys().collect::<Vec<_>>(),
        state.policies.keys().collect::<Vec<_>>(),
        "every pinned policy is in use by the endpoint"
    );
    let mut restarted = Compiler::new("node-1");
    restarted.resume(inherited.identities, inherited.highest_policy_id);
    restarted.adopt_pinned_policies(inherited.policies);
    let report = second.apply(restarted.sync(current), &network);
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.failed_policies.is_empty(), "{report:?}");
    assert!(
        report
            .endpoints
            .iter()
            .all(|endpoint| endpoint.state == EndpointState::Ready),
        "nothing locked down: {report:?}"
    );
    let after = pinned_content(root);
    assert_eq!(before, after, "no entry changed");
    drop(second);
}

/// The program each pinned link of the loopback runs, by pin name.
fn linked_programs(root: &std::path::Path) -> Vec<(String, u32)> {
    use aya::programs::links::{FdLink, PinnedLink};
    let links = netwarden_datapath::bpffs::PinLayout::new(root).links();
    let mut programs: Vec<(String, u32)> = std::fs::read_dir(links)
        .expect("the links directory")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("{}-", common::IFINDEX)))
        .map(|name| {
            let pin = netwarden_datapath::bpffs::PinLayout::new(root)
                .links()
                .join(&name);
            let link = FdLink::from(PinnedLink::from_pin(&pin).expect("a pinned link"));
            (name, link.info().expect("link info").program_id())
        })
        .collect();
    programs.sort();
    programs
}

#[test]
fn an_upgrade_that_rebuilds_the_policy_map_swaps_programs_in_only_once_it_is_filled() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    let root = bpffs.path().to_owned();
    in_new_netns(move || {
        let mut compiler = Compiler::new("node-1");
        let state = compiler.sync(common::cluster_from(MANIFESTS)).clone();
        let network = common::loopback_node(&[IpAddr::V4(SERVER)]);
        let (mut previous, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        let report = previous.apply(&state, &network);
        assert!(report.unenforced.is_empty(), "{report:?}");
        drop(previous);
        let old = linked_programs(&root);
        assert_eq!(old.len(), 2, "both hooks pinned: {old:?}");

        // The new build's layout differs: its loader creates the policy maps afresh, and the
        // maps that name their ids (as `upgrade.rs` does), while the old programs keep the
        // maps they were loaded with. The endpoints as the old programs read them:
        let maps = netwarden_datapath::bpffs::PinLayout::new(&root).maps();
        let old_endpoints: HashMap<MapData, u32, Endpoint> = HashMap::try_from(Map::HashMap(
            MapData::from_pin(maps.join(pinned::ENDPOINTS.name)).expect("pinned endpoints"),
        ))
        .expect("the endpoints map");
        let endpoints_before: Vec<(u32, Endpoint)> = old_endpoints
            .iter()
            .map(|entry| entry.expect("an entry"))
            .collect();
        assert_eq!(endpoints_before.len(), 1, "{endpoints_before:?}");
        for name in std::iter::once(pinned::POLICY.name).chain(
            netwarden_datapath::upgrade::NAMING_POLICY_IDS
                .iter()
                .copied(),
        ) {
            std::fs::remove_file(maps.join(name)).expect("unpin");
        }
        let (mut upgraded, inherited) =
            Datapath::open(&root, &Capacity::default()).expect("datapath");
        assert!(
            inherited.policies.is_empty(),
            "the new policy map starts empty"
        );
        assert_eq!(linked_programs(&root), old, "opening swaps nothing");
        // As the agent does: its compiler continues from what the maps still hold.
        let mut compiler = Compiler::new("node-1");
        compiler.resume(inherited.identities, inherited.highest_policy_id);
        compiler.adopt_pinned_policies(inherited.policies);
        let state = compiler.sync(common::cluster_from(MANIFESTS)).clone();

        // The first apply cannot write the endpoint's entry: the old program stays.
        upgraded.inject_faults(Faults {
            endpoint_writes: 1,
            ..Faults::default()
        });
        let report = upgraded.apply(&state, &network);
        assert_eq!(reasons(&report), [Unenforced::MapWriteFailed], "{report:?}");
        assert_eq!(
            linked_programs(&root),
            old,
            "not swapped before its entry is written"
        );

        let report = upgraded.apply(&state, &network);
        assert!(report.unenforced.is_empty(), "{report:?}");
        assert!(report.endpoints[0].attached, "{report:?}");
        let new = linked_programs(&root);
        assert_eq!(new.len(), 2);
        for ((name, old_id), (_, new_id)) in old.iter().zip(&new) {
            assert_ne!(
                old_id, new_id,
                "{name}: this agent's program once the maps are filled"
            );
        }
        let (entries, _) = pinned_content(&root);
        assert!(!entries.is_empty(), "the new policy map is filled");
        // Until the swap the old programs looked their endpoint's policy id up in their own
        // policy map: had the new agent rewritten their entry with its ids, every new flow
        // would have been denied meanwhile.
        let endpoints_after: Vec<(u32, Endpoint)> = old_endpoints
            .iter()
            .map(|entry| entry.expect("an entry"))
            .collect();
        assert_eq!(
            endpoints_after, endpoints_before,
            "the old programs' endpoints are left as they were"
        );
    });
}

/// netwarden's filters on the loopback's `direction` (`ingress` or `egress`) as `tc` lists them.
fn clsact_filters(direction: &str) -> Vec<String> {
    let output = std::process::Command::new("tc")
        .args(["filter", "show", "dev", "lo", direction])
        .output()
        .expect("tc runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("_container"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn without_tcx_a_restart_replaces_its_clsact_filters_and_a_gone_endpoint_loses_them() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    let root = bpffs.path().to_owned();
    in_new_netns(move || {
        let placement = netwarden_datapath::clsact_placement();
        assert_eq!((placement.priority, u32::from(placement.handle)), (1, 1));
        let mut compiler = Compiler::new("node-1");
        let state = compiler.sync(common::cluster_from(MANIFESTS)).clone();
        let network = common::loopback_node(&[IpAddr::V4(SERVER)]);
        let no_tcx = Faults {
            no_tcx: true,
            ..Faults::default()
        };
        let mut filters = Vec::new();
        for _ in 0..2 {
            let (mut datapath, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
            datapath.inject_faults(no_tcx.clone());
            let report = datapath.apply(&state, &network);
            assert!(report.unenforced.is_empty(), "{report:?}");
            assert!(report.endpoints[0].attached, "{report:?}");
            drop(datapath);
            let now = [clsact_filters("ingress"), clsact_filters("egress")];
            for (direction, lines) in ["ingress", "egress"].iter().zip(&now) {
                let [line] = lines.as_slice() else {
                    panic!("one netwarden filter on {direction}: {lines:?}");
                };
                assert!(
                    line.contains("pref 1 ") && line.contains("handle 0x1 "),
                    "{line}"
                );
            }
            filters.push(now);
        }
        assert_ne!(
            filters[0], filters[1],
            "the restarted agent's programs replaced the first's"
        );

        // The endpoint goes (its interface stays): its filters go with it.
        let (mut datapath, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        datapath.inject_faults(no_tcx);
        datapath.apply(&state, &network);
        datapath.apply(&state, &common::loopback_node(&[]));
        assert!(
            clsact_filters("ingress").is_empty(),
            "{:?}",
            clsact_filters("ingress")
        );
        assert!(
            clsact_filters("egress").is_empty(),
            "{:?}",
            clsact_filters("egress")
        );
    });
}

#[test]
fn a_pinned_policy_numbered_by_an_older_build_keeps_its_keys_and_gets_its_rules_rewritten() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    let root = bpffs.path();
    let network = common::loopback_node(&[IpAddr::V4(SERVER)]);
    let current = common::cluster_from(RESTART_MANIFESTS);
    let state = Compiler::new("node-1").sync(current.clone()).clone();
    // An older build numbered rules in the order it met them.
    let mut older = state.clone();
    for policy in older.policies.values_mut() {
        for decided in policy.entries.values_mut() {
            decided.below.rule = decided.below.rule.wrapping_add(1);
        }
    }
    let (mut first, _) = Datapath::open(root, &Capacity::default()).expect("datapath");
    first.detached();
    assert!(first.apply(&older, &network).errors.is_empty());
    drop(first);
    let keys = |content: &(Vec<String>, usize)| -> Vec<String> {
        content
            .0
            .iter()
            .map(|entry| entry.split(" -> ").next().unwrap_or_default().to_owned())
            .collect()
    };
    let before = pinned_content(root);

    let (mut second, inherited) = Datapath::open(root, &Capacity::default()).expect("datapath");
    second.detached();
    let mut restarted = Compiler::new("node-1");
    restarted.resume(inherited.identities, inherited.highest_policy_id);
    restarted.adopt_pinned_policies(inherited.policies);
    let report = second.apply(restarted.sync(current), &network);
    assert!(report.errors.is_empty(), "{report:?}");
    let after = pinned_content(root);
    assert_eq!(keys(&after), keys(&before), "no key added or removed");
    assert_eq!(after.1, before.1, "the same prefixes");
    assert_ne!(after.0, before.0, "the rule ids are the compiler's now");
    drop(second);
}

/// The program each pinned netfilter link of the hook after translation runs.
fn hook_programs(root: &std::path::Path) -> Vec<u32> {
    use aya::programs::links::{FdLink, PinnedLink};
    let links = netwarden_datapath::bpffs::PinLayout::new(root).links();
    let mut names: Vec<_> = std::fs::read_dir(&links)
        .expect("the links directory")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("netfilter-"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| {
            let link = FdLink::from(PinnedLink::from_pin(links.join(name)).expect("a pinned link"));
            link.info().expect("link info").program_id()
        })
        .collect()
}

#[test]
fn a_restarted_agent_attaches_the_hook_after_translation_only_once_the_maps_are_filled() {
    let Some(bpffs) = PrivateBpffs::new() else {
        return;
    };
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("skipped: this kernel publishes no BTF");
        return;
    }
    let root = bpffs.path().to_owned();
    in_new_netns(move || {
        let (mut first, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        first.attach_translation_hook().expect("the hook attaches");
        drop(first);
        let old = hook_programs(&root);
        assert_eq!(old.len(), 4, "{old:?}");

        let (mut second, _) = Datapath::open(&root, &Capacity::default()).expect("datapath");
        second.detached();
        second.attach_translation_hook_after_fill();
        assert_eq!(
            hook_programs(&root),
            old,
            "the previous hook decides until the apply"
        );
        let state = Compiler::new("node-1")
            .sync(common::cluster_from(MANIFESTS))
            .clone();
        let report = second.apply(&state, &common::loopback_node(&[IpAddr::V4(SERVER)]));
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(second.translation_hook(), &TranslationHook::Attached);
        let new = hook_programs(&root);
        assert_eq!(new.len(), 4, "{new:?}");
        assert!(
            new.iter().all(|id| !old.contains(id)),
            "this agent's hook replaced the previous one: {old:?} -> {new:?}"
        );
    });
}
