//! The compiler: from a cluster snapshot, kept up to date one change at a time, to the content
//! of the datapath maps ([`DatapathState`]).
//!
//! It orchestrates; the work lives beside it: `pods` (identities and address claims),
//! `selectors` (selector peers' match sets), `rules` (one endpoint's rules into entries and
//! CIDR classes), `ids` (stable policy and rule ids), `frontends` (Service frontends).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use netwarden_common::{IDENTITY_HOST, PeerId, PolicyEntry};
use netwarden_model::{
    Cluster, ClusterNetworkPolicy, ClusterView, Enforcement, Namespace, NetworkPolicy,
    Node as ClusterNode, Pod, PodRef, PodsView, PolicyRef, Service, ServiceRef, Tier,
};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::{
    frontends::FrontendTable,
    identity::IdentityInfo,
    ids::{PolicyIds, RuleIds},
    pods::{AddressClaims, PodRecord, Pods, fingerprint},
    rules::{DirectionPolicies, DirectionRules, RuleCompiler},
    selectors::{IdentityChanges, Selectors},
    state::{CompiledPolicy, DatapathState, Direction, LocalEndpoint, PolicyId, PolicyMatch},
};

/// One change to the cluster, as a source reports it: the object's new version, or `None` when
/// it was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A pod was created, updated or deleted.
    Pod(PodRef, Option<Pod>),
    /// A namespace was created, updated or deleted.
    Namespace(String, Option<Namespace>),
    /// A NetworkPolicy was created, updated or deleted.
    Policy(PolicyRef, Option<Arc<NetworkPolicy>>),
    /// A Service was created, updated or deleted.
    Service(ServiceRef, Option<Service>),
    /// A ClusterNetworkPolicy was created, updated or deleted.
    ClusterPolicy(String, Option<ClusterNetworkPolicy>),
    /// A Node was created, updated or deleted (ClusterNetworkPolicy `nodes` peers).
    Node(String, Option<ClusterNode>),
}

/// The node the compiler enforces for.
#[derive(Clone, Debug)]
struct Node {
    name: String,
    /// Traffic from these to local pods is always allowed.
    addresses: BTreeSet<IpAddr>,
}

/// What the next [`Compiler::update`] must recompile.
#[derive(Clone, Debug, Default)]
struct Pending {
    /// Local endpoints to recompile.
    dirty: BTreeSet<PodRef>,
    /// Local endpoints whose egress `ipBlock` rules with named ports depend on every pod's
    /// addresses and ports: they are rare, so any pod change recompiles them.
    on_every_pod_change: BTreeSet<PodRef>,
    /// Local endpoints with ClusterNetworkPolicy `nodes` peers: any node change recompiles them.
    on_every_node_change: BTreeSet<PodRef>,
    /// Local endpoints whose entries for some identities change, and nothing else: an identity
    /// joined or left a selector peer's match set their policies use.
    identity_changes: IdentityChanges,
}

/// The compiler. It keeps the datapath state for the cluster it was told about and updates it
/// from one change at a time, touching only what the change can affect:
///
/// - a pod changes the IP cache for its addresses; when it creates or retires a label-set
///   identity, the cached selectors are checked against that one identity, and only the
///   endpoints whose policies use a selector whose match set changed are recompiled;
/// - a namespace re-checks the selectors against the identities of that namespace;
/// - a policy recompiles the local pods its old or new version selects;
/// - a Service replaces its own frontends, and node addresses the node-port frontends.
///
/// Identity, policy and rule ids stay stable from one change to the next, so a small change to
/// the cluster is a small change to the maps. A new peer pod whose label set already exists
/// changes only the IP cache.
#[derive(Clone, Debug)]
pub struct Compiler {
    node: Node,
    /// Namespaces, policies and Services as applied (pods live in `pods`).
    cluster: Cluster,
    pods: Pods,
    addresses: AddressClaims,
    selectors: Selectors,
    policy_ids: PolicyIds,
    rule_ids: RuleIds,
    frontends: FrontendTable,
    pending: Pending,
    /// What each local endpoint's entries for one identity are computed from, ingress then
    /// egress.
    direction_rules: FxHashMap<PodRef, [DirectionRules; 2]>,
    /// Every policy is in audit mode (the agent's `--audit`).
    audit_everything: bool,
    state: DatapathState,
}

impl Compiler {
    /// A compiler for the node called `node`, with an empty cluster.
    #[must_use]
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: Node {
                name: node.into(),
                addresses: BTreeSet::new(),
            },
            cluster: Cluster::default(),
            pods: Pods::default(),
            addresses: AddressClaims::default(),
            selectors: Selectors::default(),
            policy_ids: PolicyIds::default(),
            rule_ids: RuleIds::default(),
            frontends: FrontendTable::default(),
            pending: Pending::default(),
            direction_rules: FxHashMap::default(),
            audit_everything: false,
            state: DatapathState::default(),
        }
    }

    /// Puts every policy in audit mode, whatever its annotation: nothing a policy does not
    /// allow is dropped, all of it is reported (rolling out default deny on a whole cluster).
    #[must_use]
    pub fn auditing_everything(mut self, audit: bool) -> Self {
        self.audit_everything = audit;
        self
    }

    /// Continues where a previous agent left off: `identities` are the numbers it gave (by
    /// [`IdentityInfo::digest`]), and `highest_policy_id` the highest policy id in its maps, so
    /// new policies never overwrite ones that endpoints still use.
    pub fn resume(&mut self, identities: HashMap<[u8; 32], PeerId>, highest_policy_id: PolicyId) {
        self.pods.identities.prefer(identities);
        self.policy_ids.start_above(highest_policy_id);
    }

    /// Offers the policies a previous agent left in the maps (their id and content, as read
    /// back) to the next compilation: a policy it compiles whose pinned content is equal, or
    /// equal but for rule ids, keeps its pinned id, so an unchanged policy is not installed a
    /// second time beside its old copy (which would fill large maps until endpoints lock down).
    /// New ids start above every pinned one. Ids the next compilation does not claim are
    /// forgotten after it, and the datapath deletes them once no endpoint uses them.
    pub fn adopt_pinned_policies(
        &mut self,
        pinned: impl IntoIterator<Item = (PolicyId, CompiledPolicy)>,
    ) {
        self.policy_ids.adopt_pinned(pinned);
    }

    /// Every pod address with the pod that owns it (the first claimant by namespace and name).
    pub fn pod_addresses(&self) -> impl Iterator<Item = (IpAddr, &Arc<PodRef>)> {
        self.addresses.owners()
    }

    /// The pod that owns `ip` (the first claimant by namespace and name).
    #[must_use]
    pub fn pod_address_owner(&self, ip: IpAddr) -> Option<&Arc<PodRef>> {
        self.addresses.owner(ip)
    }

    /// The cluster snapshot compiled last (what `netwarden explain --agent` is answered on).
    #[must_use]
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The state for everything applied so far.
    #[must_use]
    pub fn state(&self) -> &DatapathState {
        &self.state
    }

    /// The node's own addresses: traffic from them to local pods is always allowed.
    pub fn set_node_addresses(&mut self, addresses: &[IpAddr]) -> &DatapathState {
        let new: BTreeSet<IpAddr> = addresses.iter().copied().collect();
        let touched: Vec<IpAddr> = self
            .node
            .addresses
            .symmetric_difference(&new)
            .copied()
            .collect();
        if touched.is_empty() {
            return &self.state;
        }
        self.node.addresses = new;
        for ip in touched {
            self.refresh_ip(ip);
        }
        for (id, service) in &self.cluster.services {
            if service.ports.iter().any(|port| port.node_port.is_some()) {
                self.frontends.set_service(
                    id,
                    Some(service),
                    &self.node.addresses,
                    &mut self.state.service_frontends,
                );
            }
        }
        self.collect_warnings();
        &self.state
    }

    /// Brings the compiler to `cluster`, applying only the objects that differ from what it
    /// has. Takes the snapshot by value: changed objects move into the compiler uncopied.
    pub fn sync(&mut self, cluster: Cluster) -> &DatapathState {
        self.sync_view(ClusterView::from(cluster))
    }

    /// [`Compiler::sync`] on a view whose pods may be borrowed: only the pods that changed are
    /// copied, each as the compiler takes it, so that not even the first sync, where every pod
    /// is new, holds a second copy of the cluster's pods.
    pub fn sync_view(&mut self, view: ClusterView<'_>) -> &DatapathState {
        let ClusterView {
            rest:
                Cluster {
                    namespaces,
                    pods: _,
                    policies,
                    services,
                    // The datapath judges the translated flow by its backend pod: it needs no
                    // backends.
                    endpoint_slices: _,
                    cluster_policies,
                    nodes,
                },
            pods,
        } = view;
        let mut changes = Vec::new();
        diff(
            &self.cluster.namespaces,
            namespaces,
            &mut changes,
            Change::Namespace,
        );
        let mut removed: Vec<&PodRef> = self
            .pods
            .records
            .keys()
            .map(AsRef::as_ref)
            .filter(|id| !pods.contains(id))
            .collect();
        // In order, as a sync always applied them (the records are hashed).
        removed.sort_unstable();
        changes.extend(removed.into_iter().map(|id| Change::Pod(id.clone(), None)));
        let mut after_pods = Vec::new();
        diff(
            &self.cluster.policies,
            policies,
            &mut after_pods,
            Change::Policy,
        );
        diff(
            &self.cluster.services,
            services,
            &mut after_pods,
            Change::Service,
        );
        // After the pods: which local pods a ClusterNetworkPolicy selects is read from them.
        diff(&self.cluster.nodes, nodes, &mut after_pods, Change::Node);
        diff(
            &self.cluster.cluster_policies,
            cluster_policies,
            &mut after_pods,
            Change::ClusterPolicy,
        );
        let records = &self.pods.records;
        // A pod the compiler does not know differs without hashing it (`change_pod` hashes
        // every pod it takes: at the first sync, every pod, once).
        let differs = |id: &PodRef, pod: &Pod| {
            records
                .get(id)
                .is_none_or(|record| record.fingerprint != fingerprint(pod))
        };
        match pods {
            PodsView::Owned(pods) => {
                changes.extend(
                    pods.into_iter()
                        .filter(|(id, pod)| differs(id, pod))
                        .map(|(id, pod)| Change::Pod(id, Some(pod))),
                );
                changes.extend(after_pods);
                self.update(changes)
            }
            PodsView::Borrowed(pods) => {
                let to_copy: Vec<(&PodRef, &Pod)> = pods
                    .into_iter()
                    .filter(|(id, pod)| differs(id, pod))
                    .collect();
                let copied = to_copy
                    .into_iter()
                    .map(|(id, pod)| Change::Pod(id.clone(), Some(pod.clone())));
                self.update(changes.into_iter().chain(copied).chain(after_pods))
            }
        }
    }

    /// Applies `changes` and recompiles what they affect.
    pub fn update(&mut self, changes: impl IntoIterator<Item = Change>) -> &DatapathState {
        for change in changes {
            match change {
                Change::Pod(id, pod) => self.change_pod(id, pod),
                Change::Namespace(name, namespace) => self.change_namespace(&name, namespace),
                Change::Policy(id, policy) => self.change_policy(&id, policy),
                Change::Service(id, service) => self.change_service(&id, service),
                Change::ClusterPolicy(name, policy) => self.change_cluster_policy(&name, policy),
                Change::Node(name, node) => self.change_node(&name, node),
            }
        }
        let dirty = std::mem::take(&mut self.pending.dirty);
        for pod in &dirty {
            self.recompile_endpoint(pod);
        }
        let identity_changes = std::mem::take(&mut self.pending.identity_changes);
        self.update_identity_entries(
            identity_changes
                .into_iter()
                .filter(|(pod, _)| !dirty.contains(pod)),
        );
        self.rule_ids.drop_unused(&mut self.state.rules);
        self.selectors.drop_unused();
        self.collect_warnings();
        // Pinned ids are offered to one compilation, the first after a restart: the datapath
        // deletes those it did not claim, and an id once deleted is not used again. (Forgotten
        // here, after compiling, not when the node's addresses are set: the agent sets them
        // before every sync, and the first sync must still find the pinned ids.)
        self.policy_ids.forget_pinned();
        &self.state
    }

    fn collect_warnings(&mut self) {
        self.state.warnings = self
            .addresses
            .warnings()
            .chain(self.frontends.conflicts())
            .cloned()
            .collect();
        // What a ClusterNetworkPolicy enforces other than as written, and the order netwarden
        // chose where upstream leaves it undefined.
        self.state.warnings.extend(
            self.cluster
                .cluster_policies
                .values()
                .flat_map(|policy| &policy.problems)
                .map(ToString::to_string),
        );
        self.state.warnings.extend(
            netwarden_model::cluster_policy::priority_ties(&self.cluster)
                .iter()
                .map(ToString::to_string),
        );
    }

    fn change_service(&mut self, id: &ServiceRef, service: Option<Service>) {
        let old = match service {
            Some(service) => self.cluster.services.insert(id.clone(), service),
            None => self.cluster.services.remove(id),
        };
        let new = self.cluster.services.get(id);
        if old.as_ref() == new {
            return;
        }
        self.frontends.set_service(
            id,
            new,
            &self.node.addresses,
            &mut self.state.service_frontends,
        );
    }

    fn change_cluster_policy(&mut self, name: &str, policy: Option<ClusterNetworkPolicy>) {
        let old = match policy {
            Some(policy) => self
                .cluster
                .cluster_policies
                .insert(name.to_owned(), policy),
            None => self.cluster.cluster_policies.remove(name),
        };
        let new = self.cluster.cluster_policies.get(name);
        if old.as_ref() == new {
            return;
        }
        self.selectors.forget_cluster_policy(name);
        for (pod, local) in &self.pods.local {
            let selected = |policy: Option<&ClusterNetworkPolicy>| {
                policy.is_some_and(|policy| policy.subject.selects(&self.cluster, local))
            };
            if selected(old.as_ref()) || selected(new) {
                self.pending.dirty.insert(pod.clone());
            }
        }
    }

    fn change_node(&mut self, name: &str, node: Option<ClusterNode>) {
        let old = match node {
            Some(node) => self.cluster.nodes.insert(name.to_owned(), node),
            None => self.cluster.nodes.remove(name),
        };
        if old.as_ref() != self.cluster.nodes.get(name) {
            self.pending
                .dirty
                .extend(self.pending.on_every_node_change.iter().cloned());
        }
    }

    fn change_pod(&mut self, id: PodRef, pod: Option<Pod>) {
        let new_fingerprint = pod.as_ref().map(fingerprint);
        let old = self.pods.records.remove_entry(&id);
        if old.as_ref().map(|(_, record)| record.fingerprint) == new_fingerprint {
            if let Some((id, record)) = old {
                self.pods.records.insert(id, record);
            }
            return;
        }
        // The record's key, which the addresses the pod claims share.
        let (shared_id, old_record) = match old {
            Some((shared_id, record)) => (shared_id, Some(record)),
            None => (Arc::new(id.clone()), None),
        };
        let old_local = self.pods.local.remove(&id).is_some();
        let mut touched_ips = Vec::new();
        if let Some(old) = old_record {
            if let Some(identity) = old.identity
                && let Some(retired) = self.pods.identities.release_id(identity)
            {
                self.identity_retired(retired);
            }
            for ip in old.ips {
                self.addresses.release(ip, &id);
                touched_ips.push(ip);
            }
        }
        let mut new_local = false;
        if let (Some(pod), Some(fingerprint)) = (pod, new_fingerprint) {
            let mut record = PodRecord {
                fingerprint,
                identity: None,
                ips: SmallVec::new(),
            };
            if Pods::enforceable(Some(&pod)).is_some() {
                let (identity, is_new) = self.pods.identities.acquire_of(&pod);
                if is_new {
                    let info = Arc::clone(self.pods.identity_info_shared(identity));
                    self.identity_created(identity, &info);
                }
                record.identity = Some(identity);
                record.ips = SmallVec::from_slice(&pod.ips);
                for ip in &pod.ips {
                    self.addresses.claim(*ip, &shared_id);
                    touched_ips.push(*ip);
                }
            }
            self.pods.records.insert(shared_id, record);
            if pod.node_name.as_deref() == Some(self.node.name.as_str()) {
                new_local = true;
                self.pods.local.insert(id.clone(), pod);
            }
        }
        for ip in touched_ips {
            self.refresh_ip(ip);
        }
        if old_local || new_local {
            self.pending.dirty.insert(id);
        }
        self.pending
            .dirty
            .extend(self.pending.on_every_pod_change.iter().cloned());
    }

    fn change_namespace(&mut self, name: &str, namespace: Option<Namespace>) {
        let old = match namespace {
            Some(namespace) => self.cluster.namespaces.insert(name.to_owned(), namespace),
            None => self.cluster.namespaces.remove(name),
        };
        if old.as_ref() == self.cluster.namespaces.get(name) {
            return;
        }
        if !self.cluster.cluster_policies.is_empty() {
            // ClusterNetworkPolicy subjects select pods by their namespace's labels.
            let namespace = PodRef {
                namespace: name.to_owned(),
                name: String::new(),
            };
            self.pending.dirty.extend(
                self.pods
                    .local
                    .range(namespace..)
                    .take_while(|(pod, _)| pod.namespace == name)
                    .map(|(pod, _)| pod.clone()),
            );
        }
        let labels = self.cluster.namespace_labels(name);
        let members: Vec<(PeerId, &IdentityInfo)> = self
            .pods
            .identities_by_namespace
            .get(name)
            .into_iter()
            .flatten()
            .map(|id| (*id, self.pods.identity_info(*id)))
            .collect();
        self.selectors.namespace_relabelled(
            name,
            &labels,
            &members,
            &mut self.pending.identity_changes,
        );
    }

    fn change_policy(&mut self, id: &PolicyRef, policy: Option<Arc<NetworkPolicy>>) {
        let old = match policy {
            Some(policy) => self.cluster.policies.insert(id.clone(), policy),
            None => self.cluster.policies.remove(id),
        };
        let policy = self.cluster.policies.get(id).cloned();
        if old == policy {
            return;
        }
        let namespace = PodRef {
            namespace: id.namespace.clone(),
            name: String::new(),
        };
        for (pod, local) in self
            .pods
            .local
            .range(namespace..)
            .take_while(|(pod, _)| pod.namespace == id.namespace)
        {
            let selected = |policy: &Option<Arc<NetworkPolicy>>| {
                policy
                    .as_ref()
                    .is_some_and(|policy| policy.selects_pod(&pod.namespace, &local.labels))
            };
            if selected(&old) || selected(&policy) {
                self.pending.dirty.insert(pod.clone());
            }
        }
    }

    fn identity_created(&mut self, identity: PeerId, info: &IdentityInfo) {
        // Shared with the allocator: one copy of each identity's labels and ports.
        let shared = Arc::clone(&self.pods.identities.identities()[&identity]);
        self.state.identities.insert(identity, shared);
        self.pods
            .identities_by_namespace
            .entry(info.namespace.clone())
            .or_default()
            .insert(identity);
        let namespace_labels = self.cluster.namespace_labels(&info.namespace);
        self.selectors.identity_created(
            identity,
            info,
            &namespace_labels,
            &mut self.pending.identity_changes,
        );
    }

    fn identity_retired(&mut self, identity: PeerId) {
        if let Some(info) = self.state.identities.remove(&identity)
            && let Some(members) = self.pods.identities_by_namespace.get_mut(&info.namespace)
        {
            members.remove(&identity);
            if members.is_empty() {
                self.pods.identities_by_namespace.remove(&info.namespace);
            }
        }
        self.selectors
            .identity_retired(identity, &mut self.pending.identity_changes);
    }

    /// Sets the IP cache entry of `ip`: the node if it is a node address, else the identity of
    /// the first pod (by namespace and name) that claims it.
    fn refresh_ip(&mut self, ip: IpAddr) {
        self.addresses.check_duplicate(ip);
        let identity = if self.node.addresses.contains(&ip) {
            Some(IDENTITY_HOST)
        } else {
            self.addresses
                .owner(ip)
                .and_then(|owner| self.pods.identity_of(owner))
        };
        match identity {
            Some(identity) => {
                self.state.ipcache.insert(ip, identity);
            }
            None => {
                self.state.ipcache.remove(&ip);
            }
        }
    }

    /// Forgets what local endpoint `id` used: its policies, selectors and dependencies.
    fn forget_endpoint(&mut self, id: &PodRef) {
        if let Some(old) = self.state.endpoints.remove(id) {
            for policy in [old.ingress, old.egress].into_iter().flatten() {
                if let Some(removed) = self.policy_ids.release(policy, &mut self.state.policies) {
                    self.rule_ids.let_go(&removed);
                }
            }
        }
        self.selectors.forget_uses(id);
        self.direction_rules.remove(id);
        self.pending.on_every_pod_change.remove(id);
        self.pending.on_every_node_change.remove(id);
    }

    fn recompile_endpoint(&mut self, id: &PodRef) {
        self.forget_endpoint(id);

        let Some(pod) = Pods::enforceable(self.pods.local.get(id)).cloned() else {
            return;
        };
        let Some(identity) = self.pods.identity_of(id) else {
            return;
        };
        let selecting: Vec<Arc<NetworkPolicy>> = self
            .cluster
            .policies
            .range(
                PolicyRef {
                    namespace: id.namespace.clone(),
                    name: String::new(),
                }..,
            )
            .take_while(|(policy, _)| policy.namespace == id.namespace)
            .filter(|(_, policy)| policy.selects_pod(&id.namespace, &pod.labels))
            .map(|(_, policy)| policy.clone())
            .collect();
        let mut endpoint = LocalEndpoint::unisolated(id.clone(), pod.ips.clone(), identity);
        // By priority, then name (the map's order; a stable sort keeps it among equals).
        let mut selecting_cluster: Vec<&ClusterNetworkPolicy> = self
            .cluster
            .cluster_policies
            .values()
            .filter(|policy| policy.subject.selects(&self.cluster, &pod))
            .collect();
        selecting_cluster.sort_by_key(|policy| policy.priority);
        let mut rules = RuleCompiler::new(
            &self.cluster,
            &self.pods,
            &self.addresses,
            &mut self.selectors,
            &mut self.rule_ids,
            &mut self.state.rules,
        );
        let mut new_policies = Vec::new();
        let mut direction_rules = [DirectionRules::default(), DirectionRules::default()];
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(policies) = direction_policies(
                &selecting,
                &selecting_cluster,
                direction,
                self.audit_everything,
            ) else {
                continue;
            };
            let (audit, cluster_policies) = (
                policies.audited,
                policies
                    .admin
                    .iter()
                    .chain(&policies.baseline)
                    .map(|policy| policy.name.clone())
                    .collect(),
            );
            let (compiled, for_identities) = rules.compile_direction(&pod, direction, &policies);
            direction_rules[usize::from(direction == Direction::Egress)] = for_identities;
            let (policy, new) = self.policy_ids.acquire(compiled, &mut self.state.policies);
            if new {
                new_policies.push(policy);
            }
            let isolated_by = policies
                .network
                .iter()
                .map(|policy| policy.id.clone())
                .collect();
            match direction {
                Direction::Ingress => {
                    endpoint.ingress = Some(policy);
                    endpoint.ingress_isolated_by = isolated_by;
                    endpoint.ingress_audit = audit;
                    endpoint.ingress_cluster_policies = cluster_policies;
                }
                Direction::Egress => {
                    endpoint.egress = Some(policy);
                    endpoint.egress_isolated_by = isolated_by;
                    endpoint.egress_audit = audit;
                    endpoint.egress_cluster_policies = cluster_policies;
                }
            }
        }
        let RuleCompiler {
            selectors_used,
            reads_every_pod,
            reads_nodes,
            ..
        } = rules;
        for policy in new_policies {
            self.rule_ids.hold(&self.state.policies[&policy]);
        }
        if reads_every_pod {
            self.pending.on_every_pod_change.insert(id.clone());
        }
        if reads_nodes {
            self.pending.on_every_node_change.insert(id.clone());
        }
        self.selectors.record_uses(id, selectors_used);
        self.direction_rules.insert(id.clone(), direction_rules);
        self.state.endpoints.insert(id.clone(), endpoint);
    }

    /// Recomputes the entries of each local endpoint of `changes` for its identities alone,
    /// each direction moving to the policy with its other entries and the new ones for them.
    /// Much cheaper than a recompilation when an identity joins a selector every endpoint uses
    /// (a new label set and a Baseline rule over every namespace, say), and what a
    /// recompilation would compile.
    ///
    /// The directions that leave one policy for the same content move together: when they are
    /// all of its users, its content is edited in place under the new id rather than copied
    /// (at 150,000 pods a policy holds ~7,000 entries, and copying one per direction was most
    /// of a relabel's cost).
    fn update_identity_entries(
        &mut self,
        changes: impl IntoIterator<Item = (PodRef, BTreeSet<PeerId>)>,
    ) {
        let mut moves: Vec<PolicyMove> = Vec::new();
        let mut moves_from: FxHashMap<PolicyId, Vec<usize>> = FxHashMap::default();
        for (id, identities) in changes {
            let (Some(endpoint), Some(rules)) =
                (self.state.endpoints.get(&id), self.direction_rules.get(&id))
            else {
                continue;
            };
            for (slot, (policy, rules)) in [endpoint.ingress, endpoint.egress]
                .into_iter()
                .zip(rules)
                .enumerate()
            {
                let Some(from) = policy else {
                    continue;
                };
                let mut fresh = BTreeMap::new();
                for identity in &identities {
                    fresh.extend(rules.identity_entries(
                        *identity,
                        &self.pods,
                        &self.selectors,
                        &mut self.rule_ids,
                        &mut self.state.rules,
                    ));
                }
                let compiled = &self.state.policies[&from];
                let mut stale = identities
                    .iter()
                    .flat_map(|identity| compiled.entries.range(identity_entries(*identity)));
                let unchanged = stale.clone().count() == fresh.len()
                    && stale.all(|(entry, decided)| fresh.get(entry) == Some(decided));
                if unchanged {
                    continue;
                }
                let same_move = moves_from.entry(from).or_default();
                let existing = same_move.iter().copied().find(|at| {
                    let other = &moves[*at];
                    other.identities == identities && other.fresh == fresh
                });
                let at = existing.unwrap_or_else(|| {
                    same_move.push(moves.len());
                    moves.push(PolicyMove {
                        from,
                        identities: identities.clone(),
                        fresh,
                        directions: Vec::new(),
                    });
                    moves.len() - 1
                });
                moves[at].directions.push((id.clone(), slot));
            }
        }
        for policy_move in moves {
            self.move_policy(policy_move);
        }
    }

    /// Moves the endpoint directions of `policy_move` to their new policy.
    fn move_policy(&mut self, policy_move: PolicyMove) {
        let PolicyMove {
            from,
            identities,
            fresh,
            directions,
        } = policy_move;
        let mut digest = self.policy_ids.digest(from);
        // Every user leaves: the old content is taken, not copied.
        let taken = if self.policy_ids.users(from) == directions.len() {
            self.policy_ids
                .release_users(from, directions.len(), &mut self.state.policies)
        } else {
            None
        };
        let whole_policy_left = taken.is_some();
        let mut compiled = taken.unwrap_or_else(|| self.state.policies[&from].clone());
        let stale: Vec<PolicyMatch> = identities
            .iter()
            .flat_map(|identity| compiled.entries.range(identity_entries(*identity)))
            .map(|(entry, _)| *entry)
            .collect();
        let mut removed_entries = Vec::with_capacity(stale.len());
        for entry in &stale {
            if let Some(decided) = compiled.entries.remove(entry) {
                digest.remove(entry, &decided);
                removed_entries.push(decided);
            }
        }
        let added_entries: Vec<PolicyEntry> = fresh.values().copied().collect();
        for (entry, decided) in &fresh {
            digest.add(entry, decided);
        }
        compiled.entries.extend(fresh);
        let (to, is_new) = self.policy_ids.acquire_digested(
            compiled,
            digest,
            directions.len(),
            &mut self.state.policies,
        );
        if whole_policy_left {
            // The old content is gone, the new one is held: the rules' counts change by the
            // entries that changed (`hold` first, so that no count drops to zero on the way).
            self.rule_ids.hold_entries(&added_entries);
            if !is_new {
                // The new content was already there, so the old one's entries all go; they
                // are the new ones' but for the entries that changed.
                self.rule_ids.let_go(&self.state.policies[&to]);
            }
            self.rule_ids.let_go_entries(&removed_entries);
        } else {
            if is_new {
                self.rule_ids.hold(&self.state.policies[&to]);
            }
            // Others still use the old policy: these users' release never removes it.
            self.policy_ids
                .release_users(from, directions.len(), &mut self.state.policies);
        }
        for (pod, slot) in directions {
            if let Some(endpoint) = self.state.endpoints.get_mut(&pod) {
                if slot == 0 {
                    endpoint.ingress = Some(to);
                } else {
                    endpoint.egress = Some(to);
                }
            }
        }
    }
}

/// Endpoint directions that leave one policy for the same content: the policy without its
/// entries for `identities`, with `fresh` instead.
struct PolicyMove {
    from: PolicyId,
    identities: BTreeSet<PeerId>,
    fresh: BTreeMap<PolicyMatch, PolicyEntry>,
    /// Each endpoint, and 0 for its ingress or 1 for its egress.
    directions: Vec<(PodRef, usize)>,
}

/// The policies of every tier a local pod's `direction` is held to: `selecting`, the
/// NetworkPolicies selecting it; `selecting_cluster`, the ClusterNetworkPolicies selecting it by
/// priority then name. `None` when none applies (the direction has no policy id).
fn direction_policies<'p>(
    selecting: &'p [Arc<NetworkPolicy>],
    selecting_cluster: &[&'p ClusterNetworkPolicy],
    direction: Direction,
    audit_everything: bool,
) -> Option<DirectionPolicies<'p>> {
    let ingress = direction == Direction::Ingress;
    let in_tier = |tier: Tier| -> Vec<&'p ClusterNetworkPolicy> {
        selecting_cluster
            .iter()
            .copied()
            .filter(|policy| policy.tier == tier && !policy.rules(ingress).is_empty())
            .collect()
    };
    let (admin, baseline) = (in_tier(Tier::Admin), in_tier(Tier::Baseline));
    let isolating: Vec<&NetworkPolicy> = selecting
        .iter()
        .map(AsRef::as_ref)
        .filter(|policy| match direction {
            Direction::Ingress => policy.policy_types.ingress,
            Direction::Egress => policy.policy_types.egress,
        })
        .collect();
    if isolating.is_empty() && admin.is_empty() && baseline.is_empty() {
        return None;
    }
    // Audit-mode policies only add allows to what enforced ones allow, so they change nothing
    // while an enforced policy isolates the direction: the direction is audited only when
    // nothing enforced isolates it, and then by the audit-mode policies.
    let enforced: Vec<&NetworkPolicy> = isolating
        .iter()
        .copied()
        .filter(|policy| policy.enforcement == Enforcement::Enforce)
        .collect();
    let audited = !isolating.is_empty() && (audit_everything || enforced.is_empty());
    Some(DirectionPolicies {
        admin,
        network: if audited { isolating } else { enforced },
        baseline,
        audited,
    })
}

/// The keys of a compiled policy's entries for `identity`.
fn identity_entries(identity: PeerId) -> std::ops::RangeInclusive<PolicyMatch> {
    let first = PolicyMatch {
        peer: identity,
        protocol: None,
        port: 0,
        port_bits: 0,
    };
    let last = PolicyMatch {
        peer: identity,
        protocol: Some(u8::MAX),
        port: u16::MAX,
        port_bits: u8::MAX,
    };
    first..=last
}

/// Appends a change for every key whose value differs between `old` and `new`.
fn diff<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: BTreeMap<K, V>,
    changes: &mut Vec<Change>,
    change: impl Fn(K, Option<V>) -> Change,
) {
    for key in old.keys() {
        if !new.contains_key(key) {
            changes.push(change(key.clone(), None));
        }
    }
    for (key, value) in new {
        if old.get(&key) != Some(&value) {
            changes.push(change(key, Some(value)));
        }
    }
}
