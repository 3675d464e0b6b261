//! The datapath's errors, one enum per seam: opening it ([`DatapathError`]), one part of an
//! apply that did not take ([`ApplyError`]), attaching a program ([`AttachError`]). Each has a
//! `metric_label` so a caller can count failures by kind without reading their messages.

use std::{io, net::IpAddr, path::PathBuf};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};
use netwarden_model::PodRef;
use netwarden_policy::PolicyId;

use crate::netfilter::NetfilterError;

/// Why the datapath could not be opened, or a handle on one of its maps taken.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The bpf filesystem could not be prepared.
    #[error("cannot prepare the bpf filesystem at {}: {source}", path.display())]
    Bpffs {
        /// The mount point.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The eBPF object could not be loaded.
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded into the kernel.
    #[error("cannot load program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// A map the programs declare is missing or has another type.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        source: MapError,
    },
}

impl DatapathError {
    /// The error's kind, as a metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Bpffs { .. } => "bpffs",
            Self::Load(_) => "load",
            Self::Program { .. } => "program",
            Self::Map { .. } => "map",
        }
    }
}

/// Which of a policy's maps it did not fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMap {
    /// `POLICY`: its entries.
    Entries,
    /// `CIDRS_V4` or `CIDRS_V6`: its `ipBlock` prefixes.
    Cidrs,
}

impl PolicyMap {
    fn describe(self) -> &'static str {
        match self {
            Self::Entries => "policy map",
            Self::Cidrs => "CIDR map",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Entries => "entries",
            Self::Cidrs => "prefixes",
        }
    }
}

/// One part of an apply that did not take. The apply goes on with the rest; what each means for
/// enforcement is said where it is returned (always closed, never open).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An address could not be added to `IPCACHE`: it stays WORLD (selector rules no longer
    /// match it, `ipBlock` rules still do).
    #[error("IP cache: cannot add {ip}: {source}")]
    IpCache {
        /// The address.
        ip: IpAddr,
        /// Why.
        source: MapError,
    },
    /// A compiled policy did not fit its maps: the endpoints using it are locked down.
    #[error(
        "policy {id}: {} is full or failing ({source}); {needed} {} needed",
        map.describe(),
        map.unit()
    )]
    PolicyDoesNotFit {
        /// The policy.
        id: PolicyId,
        /// The map that refused it.
        map: PolicyMap,
        /// How many entries or prefixes the policy has.
        needed: usize,
        /// Why.
        source: MapError,
    },
    /// The compiler gave a pinned policy's id to other content; it was installed again.
    #[error("policy {id}: the compiler reused a pinned id for other content; reinstalling it")]
    PinnedIdReused {
        /// The policy.
        id: PolicyId,
    },
    /// A pinned entry's rule id could not be rewritten: the entry still allows, only its
    /// attribution is stale.
    #[error("policy {id}: cannot rewrite the rule of an entry: {source}")]
    RuleRewrite {
        /// The policy.
        id: PolicyId,
        /// Why.
        source: MapError,
    },
    /// An address an endpoint owns could not be recorded: the pod cannot send from it (fail
    /// closed).
    #[error("endpoint {ifindex}: cannot record address {ip}: {source}")]
    EndpointAddress {
        /// The endpoint's interface index.
        ifindex: u32,
        /// The address.
        ip: IpAddr,
        /// Why.
        source: MapError,
    },
    /// Which endpoint owns an address could not be recorded: flows of that address through a
    /// Service are judged as no pod's.
    #[error("endpoint {ifindex}: cannot record the owner of {ip}: {source}")]
    AddressOwner {
        /// The endpoint's interface index.
        ifindex: u32,
        /// The address.
        ip: IpAddr,
        /// Why.
        source: MapError,
    },
    /// An endpoint's `ENDPOINTS` entry could not be written: it is unenforced and retried.
    #[error("endpoint {interface}: cannot write its map entry: {source}")]
    EndpointEntry {
        /// The host-side veth.
        interface: String,
        /// Why.
        source: MapError,
    },
    /// Two pods lead to the same interface: the first keeps it.
    #[error("Pod {pod}: interface {interface} already enforces for Pod {other}")]
    InterfaceTaken {
        /// The pod left without an interface.
        pod: PodRef,
        /// The interface.
        interface: String,
        /// The pod it enforces for.
        other: PodRef,
    },
    /// A Service frontend could not be written: flows to it are judged on its address (fail
    /// closed).
    #[error("Service frontend {id}: cannot write its map entry: {source}")]
    Frontend {
        /// The frontend's id.
        id: u32,
        /// Why.
        source: MapError,
    },
    /// The flag saying whether frontends are installed could not be written.
    #[error("SETTINGS: cannot record whether frontends are installed: {source}")]
    FrontendsFlag {
        /// Why.
        source: MapError,
    },
    /// The policy epoch could not be bumped: tracked flows are not decided again.
    #[error("cannot bump the policy epoch: {source}")]
    Epoch {
        /// Why.
        source: MapError,
    },
    /// A program could not be attached to an endpoint's veth.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The hook after translation could not be attached: flows to Services are judged on the
    /// Service's address.
    #[error("hook after translation not attached: {0}")]
    TranslationHook(#[source] NetfilterError),
}

impl ApplyError {
    /// The error's kind, as a metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::IpCache { .. } => "ipcache_write",
            Self::PolicyDoesNotFit { .. } => "policy_does_not_fit",
            Self::PinnedIdReused { .. } => "pinned_id_reused",
            Self::RuleRewrite { .. } => "rule_rewrite",
            Self::EndpointAddress { .. } => "endpoint_address_write",
            Self::AddressOwner { .. } => "address_owner_write",
            Self::EndpointEntry { .. } => "endpoint_write",
            Self::InterfaceTaken { .. } => "interface_taken",
            Self::Frontend { .. } => "frontend_write",
            Self::FrontendsFlag { .. } => "frontends_flag_write",
            Self::Epoch { .. } => "epoch_write",
            Self::Attach(_) => "attach",
            Self::TranslationHook(_) => "translation_hook",
        }
    }
}

/// Why a program could not be attached to an interface.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The loaded object has no such classifier.
    #[error("program {program} is missing")]
    ProgramMissing {
        /// The program.
        program: &'static str,
    },
    /// The kernel refused.
    #[error("endpoint {interface}: cannot attach {program}: {source}")]
    Refused {
        /// The host-side veth.
        interface: String,
        /// The program.
        program: &'static str,
        /// Why.
        source: AttachFailure,
    },
}

impl AttachError {
    /// The error's kind, as a metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ProgramMissing { .. } => "program_missing",
            Self::Refused { source, .. } => match source {
                AttachFailure::Program(_) => "attach_program",
                AttachFailure::Link(_) => "attach_link",
                AttachFailure::Pin(_) => "attach_pin",
                #[cfg(feature = "test-support")]
                AttachFailure::Injected => "attach_injected",
            },
        }
    }
}

/// The kernel call an attachment failed in.
#[derive(Debug, thiserror::Error)]
pub enum AttachFailure {
    /// Attaching, or taking the link of, the program.
    #[error(transparent)]
    Program(#[from] ProgramError),
    /// Converting a pinned link into a classifier link, or the reverse.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Pinning the new link.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// A failure a test injected (`Faults::attaches`).
    #[cfg(feature = "test-support")]
    #[error("injected failure (test-support)")]
    Injected,
}
