//! The order of an apply's writes, checked against maps and hooks that record them (no root,
//! no kernel): the promise of `apply.rs`, tested where it is made.

use std::collections::BTreeMap;

use netwarden_common::{Endpoint, endpoint_state, maps as pinned};
use netwarden_policy::{Compiler, DatapathState, PolicyId};

use super::Enforcer;
use crate::{
    attach::Hook,
    error::{ApplyError, PolicyMap},
    maps::recording::{Contents, Recorder, RecordingHooks, Write},
    netlink::{Interface, NodeNetwork},
    report::{EndpointState, Unenforced},
};

/// The veth of pod `x/a`.
const VETH_A: u32 = 7;
/// The veth of pod `x/c`.
const VETH_C: u32 = 8;

/// Pods `x/a` (10.0.0.1) and `x/c` (10.0.0.3) on this node and `x/b` on another, with one
/// NetworkPolicy letting `app: b` reach `app: a` on `port`; `x/c` only when `with_c`.
fn cluster(port: u16, with_c: bool) -> String {
    let mut text = format!(
        "\
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: x, labels: {{app: a}}}}
spec: {{nodeName: node-1, containers: [{{name: c}}]}}
status: {{podIP: 10.0.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: b, namespace: x, labels: {{app: b}}}}
spec: {{nodeName: node-2, containers: [{{name: c}}]}}
status: {{podIP: 10.0.1.2}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: a, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: a}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: b}}}}}}], ports: [{{port: {port}}}]}}]
"
    );
    if with_c {
        text.push_str(
            "\
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
",
        );
    }
    text
}

/// A node whose pod `x/a`, and `x/c` when `with_c`, sit behind point-to-point veths with host
/// routes (the CNI creates a pod's veth with the pod).
fn node(with_c: bool) -> NodeNetwork {
    let mut network = NodeNetwork::default();
    let veths = [(VETH_A, "10.0.0.1/32"), (VETH_C, "10.0.0.3/32")];
    for (index, ip) in veths.into_iter().take(if with_c { 2 } else { 1 }) {
        network.interfaces.insert(
            index,
            Interface {
                index,
                name: format!("veth{index}"),
                is_veth: true,
                ..Interface::default()
            },
        );
        network.routes.push((ip.parse().unwrap(), index));
    }
    network
}

/// A compiler on node-1, an enforcer on recording maps, and what they record.
struct Bench {
    compiler: Compiler,
    enforcer: Enforcer,
    hooks: RecordingHooks,
    recorder: Recorder,
    contents: Contents,
}

impl Bench {
    fn new(capacities: &[(&'static str, usize)]) -> Self {
        let recorder = Recorder::default();
        let (maps, contents) = recorder.maps(&capacities.iter().copied().collect());
        Self {
            compiler: Compiler::new("node-1"),
            enforcer: Enforcer::new(maps),
            hooks: recorder.hooks(),
            recorder,
            contents,
        }
    }

    /// Compiles [`cluster`]`(port, with_c)` and applies it on [`node`]`(with_c)`; returns the
    /// compiled state, the report and the writes.
    fn apply(
        &mut self,
        port: u16,
        with_c: bool,
    ) -> (DatapathState, crate::ApplyReport, Vec<Write>) {
        let manifests = cluster(port, with_c);
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", &manifests);
        assert!(errors.is_empty(), "{errors:?}");
        let state = self.compiler.sync(cluster).clone();
        let report = self.enforcer.apply(&mut self.hooks, &state, &node(with_c));
        (state, report, self.recorder.take())
    }
}

/// The ingress policy id the compiler gave pod `x/<name>`.
fn ingress_of(state: &DatapathState, name: &str) -> PolicyId {
    state
        .endpoints
        .values()
        .find(|endpoint| endpoint.pod.name == name)
        .and_then(|endpoint| endpoint.ingress)
        .expect("the pod is isolated for ingress")
}

/// Where in `writes` the first write matching `wanted` is.
fn position(writes: &[Write], wanted: impl Fn(&Write) -> bool) -> usize {
    writes
        .iter()
        .position(wanted)
        .unwrap_or_else(|| panic!("no such write in {writes:#?}"))
}

/// Positions of every write matching `wanted`.
fn positions(writes: &[Write], wanted: impl Fn(&Write) -> bool) -> Vec<usize> {
    let found: Vec<usize> = writes
        .iter()
        .enumerate()
        .filter_map(|(at, write)| wanted(write).then_some(at))
        .collect();
    assert!(!found.is_empty(), "no such write in {writes:#?}");
    found
}

/// The maps that hold a policy's entries and prefixes.
const POLICY_MAPS: [&str; 3] = [
    pinned::POLICY.name,
    pinned::CIDRS_V4.name,
    pinned::CIDRS_V6.name,
];

fn inserts_policy(write: &Write, id: PolicyId) -> bool {
    matches!(write, Write::Insert { map, key, .. }
        if POLICY_MAPS.contains(map) && key.starts_with(&format!("policy {id} ")))
}

fn removes_policy(write: &Write, id: PolicyId) -> bool {
    matches!(write, Write::Remove { map, key }
        if POLICY_MAPS.contains(map) && key.starts_with(&format!("policy {id} ")))
}

fn writes_endpoint(write: &Write, ifindex: u32) -> bool {
    matches!(write, Write::Insert { map, key, .. }
        if *map == pinned::ENDPOINTS.name && *key == ifindex.to_string())
}

fn removes_endpoint(write: &Write, ifindex: u32) -> bool {
    matches!(write, Write::Remove { map, key }
        if *map == pinned::ENDPOINTS.name && *key == ifindex.to_string())
}

fn bumps_epoch(write: &Write) -> bool {
    matches!(write, Write::Set { map, .. } if *map == pinned::EPOCH.name)
}

#[test]
fn a_changed_policy_is_written_whole_before_its_endpoint_switches_and_deleted_after() {
    let mut bench = Bench::new(&[]);
    let (before, _, _) = bench.apply(80, false);
    let old = ingress_of(&before, "a");

    let (after, report, writes) = bench.apply(81, false);
    let new = ingress_of(&after, "a");
    assert_ne!(old, new, "a changed policy gets a new id");
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let switch = positions(&writes, |write| writes_endpoint(write, VETH_A));
    assert_eq!(
        switch.len(),
        1,
        "one write switches the endpoint: {writes:#?}"
    );
    let switch = switch[0];
    assert!(
        matches!(&writes[switch], Write::Insert { value, .. }
            if *value == format!("{:?}", Endpoint { ingress_policy: new, state: endpoint_state::READY, ..Endpoint::default() })),
        "the endpoint is switched to the new policy: {:?}",
        writes[switch]
    );
    let installs = positions(&writes, |write| inserts_policy(write, new));
    assert!(
        installs.iter().all(|at| *at < switch),
        "the new policy is whole before the endpoint uses it: {writes:#?}"
    );
    let deletes = positions(&writes, |write| removes_policy(write, old));
    assert!(
        deletes.iter().all(|at| *at > switch),
        "the old policy is deleted only once no endpoint uses it: {writes:#?}"
    );
    let epoch = position(&writes, bumps_epoch);
    assert!(
        deletes.iter().all(|at| *at < epoch),
        "the epoch moves once the old policy is gone: {writes:#?}"
    );
    assert_eq!(
        writes.last(),
        Some(&writes[epoch]),
        "nothing is written after the epoch"
    );
    let left: Vec<String> = bench.contents.of(pinned::POLICY.name).into_keys().collect();
    assert!(
        left.iter()
            .all(|key| key.starts_with(&format!("policy {new} "))),
        "only the new policy is left: {left:?}"
    );
}

#[test]
fn a_new_endpoint_has_its_entry_before_its_programs_and_a_gone_one_loses_them_first() {
    let mut bench = Bench::new(&[]);
    bench.apply(80, false);

    let (_, report, writes) = bench.apply(80, true);
    let entry = position(&writes, |write| writes_endpoint(write, VETH_C));
    for hook in Hook::ALL {
        let attach = position(&writes, |write| {
            *write
                == Write::Attach {
                    ifindex: VETH_C,
                    hook,
                }
        });
        assert!(
            entry < attach,
            "{hook:?} attached before the entry: {writes:#?}"
        );
    }
    assert!(
        !writes.iter().any(|write| matches!(
            write,
            Write::Attach {
                ifindex: VETH_A,
                ..
            }
        )),
        "an attached endpoint is not attached again: {writes:#?}"
    );
    let c = report
        .endpoints
        .iter()
        .find(|endpoint| endpoint.ifindex == VETH_C)
        .expect("x/c is reported");
    assert_eq!(
        (c.pod.as_ref().map(ToString::to_string), c.state, c.attached),
        (Some("x/c".to_owned()), EndpointState::Ready, true)
    );

    let (_, _, writes) = bench.apply(80, false);
    let detach = position(&writes, |write| *write == Write::Detach { ifindex: VETH_C });
    let removal = position(&writes, |write| removes_endpoint(write, VETH_C));
    assert!(
        detach < removal,
        "programs stay on an interface with no entry: {writes:#?}"
    );
    assert!(bumps_epoch(writes.last().unwrap()), "{writes:#?}");
}

#[test]
fn a_policy_that_does_not_fit_leaves_nothing_of_itself_and_locks_its_endpoints_down() {
    let mut bench = Bench::new(&[(pinned::POLICY.name, 0)]);
    let (state, report, writes) = bench.apply(80, false);
    let id = ingress_of(&state, "a");

    assert_eq!(report.failed_policies, [id].into());
    assert!(
        matches!(
            report.policy_failure(id),
            Some(ApplyError::PolicyDoesNotFit {
                map: PolicyMap::Entries,
                ..
            })
        ),
        "{:?}",
        report.errors
    );
    assert!(bench.contents.of(pinned::POLICY.name).is_empty());
    let locked = Endpoint {
        state: endpoint_state::LOCKED,
        ..Endpoint::default()
    };
    assert_eq!(
        bench.contents.of(pinned::ENDPOINTS.name),
        BTreeMap::from([(VETH_A.to_string(), format!("{locked:?}"))])
    );
    assert_eq!(report.endpoints[0].state, EndpointState::Locked);
    assert!(bumps_epoch(writes.last().unwrap()), "{writes:#?}");
}

#[test]
fn an_endpoint_whose_programs_did_not_attach_is_unenforced_and_attached_at_the_next_apply() {
    let mut bench = Bench::new(&[]);
    bench.hooks.failing_attaches = 1;
    let (_, report, _) = bench.apply(80, false);
    assert_eq!(
        report
            .unenforced
            .iter()
            .map(|endpoint| endpoint.reason)
            .collect::<Vec<_>>(),
        [Unenforced::AttachFailed]
    );
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].metric_label(), "attach");

    let (_, report, writes) = bench.apply(80, false);
    assert!(report.unenforced.is_empty(), "{:?}", report.unenforced);
    assert_eq!(
        writes,
        [Write::Attach {
            ifindex: VETH_A,
            hook: Hook::FromContainer
        }],
        "only the program that failed is attached again, and nothing changed in the maps"
    );
}
