//! Kubernetes Events on NetworkPolicies and ClusterNetworkPolicies the agent cannot enforce as
//! written, or whose order it had to choose.
//!
//! Two things make a policy unenforceable on a node: a field the conversion rejects (the policy
//! is then replaced by its last valid version, or locks its namespace down), and a compiled
//! policy that does not fit the datapath's maps (the endpoints it selects are then locked
//! down). Either is reported once per policy and [`Reason`] per [window](PolicyEvents::start),
//! as a `Warning` Event of the `events.k8s.io/v1` API whose `regarding` is the policy, reported
//! by `netwarden` with the node name as the instance: every node with the problem says so, and
//! `kubectl describe networkpolicy` shows it.
//!
//! The agent loop must never wait for the API server, so [`PolicyEvents::post`] decides and
//! queues; a task posts, with kube-rs's [`Recorder`].

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use netwarden_model::{Cluster, ModelError, PolicyRef, cluster_policy};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::KubeError;

/// The Events' `reportingController`.
pub const REPORTING_CONTROLLER: &str = "netwarden";

/// At most one Event per policy and reason in this window. Longer than the 6 minutes during
/// which kube-rs's [`Recorder`] would turn a repeat into a patch of the previous Event, so each
/// post is a create.
pub const DEFAULT_WINDOW: Duration = Duration::from_mins(10);

/// Why a policy is not enforced as written: the Event's `reason`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    /// A field the conversion rejects: a value outside what the NetworkPolicy API allows.
    InvalidField,
    /// The compiled policy does not fit the datapath's maps on this node.
    OverCapacity,
    /// A ClusterNetworkPolicy part of which (a peer, a protocol) the agent cannot enforce: it
    /// is enforced without it, failing closed.
    NotEnforcedAsWritten,
    /// Two ClusterNetworkPolicies of one tier share a priority: upstream leaves their order
    /// undefined, netwarden evaluates them by name.
    PriorityTie,
}

impl Reason {
    /// As the Event's `reason` (`PascalCase`, as Kubernetes spells reasons).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidField => "InvalidField",
            Self::OverCapacity => "OverCapacity",
            Self::NotEnforcedAsWritten => "NotEnforcedAsWritten",
            Self::PriorityTie => "PriorityTie",
        }
    }

    /// The Event's `action`: what the agent did instead.
    fn action(self) -> &'static str {
        match self {
            Self::InvalidField => "KeepLastValidVersion",
            Self::OverCapacity => "LockDownEndpoint",
            Self::NotEnforcedAsWritten => "FailClosed",
            Self::PriorityTie => "OrderByName",
        }
    }
}

/// A policy this node does not enforce as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unenforceable {
    /// The policy: a NetworkPolicy, or a ClusterNetworkPolicy (cluster-scoped: an empty
    /// namespace).
    pub policy: PolicyRef,
    /// Why.
    pub reason: Reason,
    /// The field concerned, as `kubectl explain` spells it (`spec.ingress[0].from[0].ipBlock`).
    pub field: String,
    /// What is wrong and what the agent does instead.
    pub detail: String,
}

impl Unenforceable {
    /// Every NetworkPolicy among `errors` that failed validation.
    #[must_use]
    pub fn from_errors(errors: &[KubeError]) -> Vec<Self> {
        errors
            .iter()
            .filter_map(|error| match error {
                KubeError::Invalid(error) => Self::invalid(error),
                KubeError::Config(_) | KubeError::Kubeconfig { .. } | KubeError::Watch { .. } => {
                    None
                }
            })
            .collect()
    }

    /// A NetworkPolicy or ClusterNetworkPolicy that failed validation; `None` for other kinds.
    #[must_use]
    pub fn invalid(error: &ModelError) -> Option<Self> {
        let policy = match error.kind {
            "NetworkPolicy" => {
                let (namespace, name) = error.object.split_once('/')?;
                PolicyRef {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }
            }
            cluster_policy::KIND => cluster_scoped(&error.object),
            _ => return None,
        };
        Some(Self {
            policy,
            reason: Reason::InvalidField,
            field: error.field.clone(),
            detail: format!(
                "{}; its last valid version is enforced instead, or, if it never had one, its \
                 namespace is isolated both ways",
                error.problem
            ),
        })
    }

    /// What a ClusterNetworkPolicy enforces other than as written (`problems` of the model,
    /// each naming its field), and every priority it shares with another of its tier.
    #[must_use]
    pub fn cluster_policies(cluster: &Cluster) -> Vec<Self> {
        let mut found: Vec<Self> = cluster
            .cluster_policies
            .values()
            .flat_map(|policy| &policy.problems)
            .map(|problem| Self {
                policy: cluster_scoped(&problem.object),
                reason: Reason::NotEnforcedAsWritten,
                field: problem.field.clone(),
                detail: problem.problem.clone(),
            })
            .collect();
        for tie in cluster_policy::priority_ties(cluster) {
            for name in [&tie.first, &tie.second] {
                found.push(Self {
                    policy: cluster_scoped(name),
                    reason: Reason::PriorityTie,
                    field: "spec.priority".to_owned(),
                    detail: tie.to_string(),
                });
            }
        }
        found
    }

    /// A policy whose rules for `pod`, in the direction of `field` (`spec.ingress` or
    /// `spec.egress`), did not fit the datapath's maps: `why` is the datapath's message.
    #[must_use]
    pub fn over_capacity(policy: PolicyRef, field: &str, pod: &str, why: &str) -> Self {
        Self {
            policy,
            reason: Reason::OverCapacity,
            field: field.to_owned(),
            detail: format!(
                "the rules selecting pod {pod} do not fit the datapath's maps ({why}); the pod is \
                 locked down, only node traffic reaches or leaves it"
            ),
        }
    }

    /// The note: the field, the problem and the node, within the API's 1 kB limit.
    fn note(&self, node_name: &str) -> String {
        let mut note = format!("{}: {} (node {node_name})", self.field, self.detail);
        if note.len() > 1024 {
            let mut end = 1021;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        note
    }
}

/// The reference of ClusterNetworkPolicy `name` in an [`Unenforceable`].
fn cluster_scoped(name: &str) -> PolicyRef {
    PolicyRef {
        namespace: String::new(),
        name: name.to_owned(),
    }
}

/// Posts Events on unenforceable policies, at most one per policy and reason per window.
///
/// Dropping it stops the posting task (queued Events are lost: they are reminders, the log and
/// the metrics have the same information).
#[derive(Debug)]
pub struct PolicyEvents {
    node: String,
    window: Duration,
    last_posted: HashMap<(PolicyRef, Reason), Instant>,
    queue: mpsc::UnboundedSender<(ObjectReference, Event)>,
    task: JoinHandle<()>,
}

impl Drop for PolicyEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PolicyEvents {
    /// Starts the posting task on the current Tokio runtime; Events name `node` as the
    /// reporting instance.
    #[must_use]
    pub fn start(client: Client, node: impl Into<String>, window: Duration) -> Self {
        let node = node.into();
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: REPORTING_CONTROLLER.to_owned(),
                instance: Some(node.clone()),
            },
        );
        let (queue, mut queued) = mpsc::unbounded_channel::<(ObjectReference, Event)>();
        let task = tokio::spawn(async move {
            while let Some((regarding, event)) = queued.recv().await {
                if let Err(error) = recorder.publish(&event, &regarding).await {
                    // Not retried: the next occurrence after the window posts again.
                    tracing::warn!(
                        %error,
                        policy = regarding.name.as_deref().unwrap_or_default(),
                        reason = event.reason,
                        "cannot post the Event"
                    );
                }
            }
        });
        Self {
            node,
            window,
            last_posted: HashMap::new(),
            queue,
            task,
        }
    }

    /// Queues an Event on `regarding` (the policy's reference, with its uid) for `problem`,
    /// unless one for the same policy and reason was queued within the window. Returns whether
    /// it was queued.
    pub fn post(&mut self, regarding: ObjectReference, problem: &Unenforceable) -> bool {
        let now = Instant::now();
        let window = self.window;
        self.last_posted
            .retain(|_, posted| now.duration_since(*posted) < window);
        let key = (problem.policy.clone(), problem.reason);
        if self.last_posted.contains_key(&key) {
            return false;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: problem.reason.as_str().to_owned(),
            note: Some(problem.note(&self.node)),
            action: problem.reason.action().to_owned(),
            secondary: None,
        };
        if self.queue.send((regarding, event)).is_err() {
            return false;
        }
        self.last_posted.insert(key, now);
        true
    }
}
