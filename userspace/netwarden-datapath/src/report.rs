//! What an apply did, as the agent reports it (status file, metrics, readiness).

use std::collections::BTreeSet;

use netwarden_common::endpoint_state;
use netwarden_model::PodRef;
use netwarden_policy::PolicyId;

use crate::error::ApplyError;

/// How an endpoint's programs treat its traffic (`Endpoint::state` in `ENDPOINTS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointState {
    /// Its policy is installed and enforced.
    Ready,
    /// A pod veth with no pod object yet: only node traffic passes.
    Unknown,
    /// Its policy did not fit the maps: only node traffic passes.
    Locked,
}

impl EndpointState {
    /// Every state, in the order views list them.
    pub const ALL: [Self; 3] = [Self::Ready, Self::Unknown, Self::Locked];

    /// The state's label in the status file and the metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Unknown => "unknown",
            Self::Locked => "locked",
        }
    }

    /// The state the programs read in an `ENDPOINTS` value; anything they do not know as ready
    /// or locked they treat as unknown.
    #[must_use]
    pub fn of_map_value(state: u32) -> Self {
        match state {
            endpoint_state::READY => Self::Ready,
            endpoint_state::LOCKED => Self::Locked,
            _ => Self::Unknown,
        }
    }
}

/// How one local endpoint stands after an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointReport {
    /// The pod, or `None` for a pod veth the agent knows no pod for yet.
    pub pod: Option<PodRef>,
    /// The host-side veth.
    pub interface: String,
    /// Its index.
    pub ifindex: u32,
    /// What its programs let through.
    pub state: EndpointState,
    /// Whether both programs are attached.
    pub attached: bool,
}

/// Why a local pod is not enforced after an apply. Each is retried by the agent (with backoff)
/// until it clears; the pod's traffic meanwhile passes unchecked (attach failed, interface
/// missing) or as the programs treat an interface without an entry (map write failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unenforced {
    /// A program could not be attached to the pod's veth.
    AttachFailed,
    /// The pod's `ENDPOINTS` entry could not be written.
    MapWriteFailed,
    /// No veth is routed to the pod's addresses yet.
    InterfaceMissing,
}

impl Unenforced {
    /// Every reason, in the order views list them.
    pub const ALL: [Self; 3] = [
        Self::AttachFailed,
        Self::MapWriteFailed,
        Self::InterfaceMissing,
    ];

    /// The reason's label in the status file and the metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::AttachFailed => "attach_failed",
            Self::MapWriteFailed => "map_write_failed",
            Self::InterfaceMissing => "interface_missing",
        }
    }
}

/// A local pod the datapath does not enforce on, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnenforcedEndpoint {
    /// The pod, or `None` for a pod veth with no known pod yet.
    pub pod: Option<PodRef>,
    /// The host-side veth, when one was found.
    pub interface: Option<String>,
    /// Why.
    pub reason: Unenforced,
}

/// What an apply did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Every endpoint the datapath enforces on.
    pub endpoints: Vec<EndpointReport>,
    /// Local pods whose interface was not found (no route to their IP through a veth yet).
    pub pending: Vec<PodRef>,
    /// Local pods not enforced, with why (the pending ones included): the agent retries them.
    pub unenforced: Vec<UnenforcedEndpoint>,
    /// What did not take, each naming what it concerns.
    pub errors: Vec<ApplyError>,
    /// Whether any map changed.
    pub changed: bool,
    /// Compiled policies that did not fit the maps (why is among `errors`); the endpoints
    /// using them are locked down.
    pub failed_policies: BTreeSet<PolicyId>,
}

impl ApplyReport {
    /// Why compiled policy `id` did not fit the maps, if it did not; the endpoints using it are
    /// locked down.
    #[must_use]
    pub fn policy_failure(&self, id: PolicyId) -> Option<&ApplyError> {
        if !self.failed_policies.contains(&id) {
            return None;
        }
        self.errors.iter().find(|error| {
            matches!(error, ApplyError::PolicyDoesNotFit { id: failed, .. } if *failed == id)
        })
    }

    /// Takes in what one map's sync did.
    pub(crate) fn absorb(&mut self, synced: crate::maps::Synced) {
        self.changed |= synced.changed;
        self.errors.extend(synced.failures);
    }
}
