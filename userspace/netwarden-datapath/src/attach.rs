//! Attaching the programs to pods' veths, detaching them, and adopting the links a previous
//! agent pinned; and the hook after translation on the node's netfilter.
//!
//! [`Hooks`] is what the apply asks of the kernel; [`Kernel`] does it with TCX links (clsact
//! filters before Linux 6.6) and netfilter links, and the unit tests of `apply.rs` record it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use tracing::warn;

use crate::{
    desired::DesiredEndpoint,
    error::{ApplyError, AttachError, AttachFailure},
    loader::{Kernel, PROGRAMS},
    netfilter::{self, NetfilterError},
    report::{ApplyReport, Unenforced, UnenforcedEndpoint},
};

/// The two hooks of a pod's host-side veth, named by the program that runs there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Hook {
    /// veth TC ingress: packets leaving the pod, checked against its egress policy.
    FromContainer,
    /// veth TC egress: packets towards the pod, checked against its ingress policy.
    ToContainer,
}

impl Hook {
    pub const ALL: [Self; 2] = [Self::FromContainer, Self::ToContainer];

    pub fn program(self) -> &'static str {
        match self {
            Self::FromContainer => "from_container",
            Self::ToContainer => "to_container",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromContainer => TcAttachType::Ingress,
            Self::ToContainer => TcAttachType::Egress,
        }
    }

    /// The interface and hook of a link's pin, `<ifindex>-<program>`.
    pub fn from_pin_name(name: &str) -> Option<(u32, Self)> {
        let (ifindex, program) = name.split_once('-')?;
        let hook = Self::ALL
            .into_iter()
            .find(|hook| hook.program() == program)?;
        Some((ifindex.parse().ok()?, hook))
    }
}

/// Where netwarden's filter sits on each hook of a pod's veth on kernels without TCX (Linux <
/// 6.6): one fixed priority and handle, so a restarted agent replaces its predecessor's filter
/// in place instead of adding one beside it at every start, and can find it again to remove
/// it. Priority 1 runs before filters other tools add at the kernel's default priorities.
#[must_use]
pub fn clsact_placement() -> NlOptions {
    NlOptions {
        priority: 1,
        handle: TcHandle::new(0, 1),
        classid: None,
    }
}

/// What an apply asks of the kernel besides map writes.
pub(crate) trait Hooks {
    /// Attaches one program to one interface, taking over a link a previous agent pinned.
    fn attach(&mut self, ifindex: u32, interface: &str, hook: Hook) -> Result<(), AttachError>;
    /// Detaches both programs from `ifindex` (if it still exists) and removes their pins.
    fn detach(&mut self, ifindex: u32);
    /// Whether a link is pinned for `hook` of `ifindex`.
    fn is_pinned(&self, ifindex: u32, hook: Hook) -> bool;
    /// Every link pinned for a pod's veth.
    fn pinned_links(&self) -> Vec<(u32, Hook)>;
    /// Removes the pin of one link, which detaches it.
    fn unpin(&mut self, ifindex: u32, hook: Hook);
    /// Loads the hook after translation and attaches it, replacing a previous agent's.
    fn attach_translation_hook(&mut self) -> Result<(), NetfilterError>;
    /// Whether a (previous agent's) hook after translation is pinned.
    fn translation_hook_pinned(&self) -> bool;
}

/// Whether flows to Services are decided after translation (see [`netfilter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TranslationHook {
    /// Not asked for (tests that run the programs on crafted packets).
    Off,
    /// Attached: flows to Service frontends are decided on the backend they reach.
    Attached,
    /// To be attached at the end of the next apply, once the maps it reads are written
    /// (`Datapath::attach_translation_hook_after_fill`); a previous agent's hook, if pinned,
    /// decides meanwhile.
    AfterFill,
    /// Could not be attached (why): flows to Services are judged on the Service's address.
    Failed(String),
}

impl TranslationHook {
    /// Attaches the hook after translation with `hooks`, and records how that went.
    pub(crate) fn attach(&mut self, hooks: &mut dyn Hooks) -> Result<(), NetfilterError> {
        let result = hooks.attach_translation_hook();
        *self = match &result {
            Ok(()) => Self::Attached,
            Err(error) => Self::Failed(error.to_string()),
        };
        result
    }

    /// Whether some hook decides the flows deferred to it: this agent's, or until this one's
    /// is attached after the first apply, a previous agent's.
    pub(crate) fn deciding(&self, hooks: &dyn Hooks) -> bool {
        match self {
            Self::Attached => true,
            Self::AfterFill => hooks.translation_hook_pinned(),
            Self::Off | Self::Failed(_) => false,
        }
    }
}

/// Which programs this agent attached (or took over), and whether it attaches any.
pub(crate) struct Attachments {
    attached: BTreeSet<(u32, Hook)>,
    /// False when the programs are only run on crafted packets (`Datapath::detached`).
    pub enabled: bool,
}

impl Default for Attachments {
    fn default() -> Self {
        Self {
            attached: BTreeSet::new(),
            enabled: true,
        }
    }
}

impl Attachments {
    /// Attaches both programs to the veth of a new endpoint, and to one whose attachment failed
    /// before. Returns whether both enforce there (a previous agent's pinned programs count:
    /// this agent's replace them once every map is written, in [`Attachments::adopt`]).
    pub fn attach_endpoint(
        &mut self,
        hooks: &mut dyn Hooks,
        ifindex: u32,
        interface: &str,
        errors: &mut Vec<ApplyError>,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let mut attached = true;
        for hook in Hook::ALL {
            if self.attached.contains(&(ifindex, hook)) || hooks.is_pinned(ifindex, hook) {
                continue;
            }
            match hooks.attach(ifindex, interface, hook) {
                Ok(()) => {
                    self.attached.insert((ifindex, hook));
                }
                Err(error) => {
                    attached = false;
                    errors.push(error.into());
                }
            }
        }
        attached
    }

    /// Detaches both programs from `ifindex`.
    pub fn detach(&mut self, hooks: &mut dyn Hooks, ifindex: u32) {
        hooks.detach(ifindex);
        for hook in Hook::ALL {
            self.attached.remove(&(ifindex, hook));
        }
    }

    /// Detaches the programs from interfaces that enforce nothing now.
    pub fn detach_all_but(
        &mut self,
        hooks: &mut dyn Hooks,
        desired: &BTreeMap<u32, DesiredEndpoint>,
    ) {
        let orphaned: BTreeSet<u32> = self
            .attached
            .iter()
            .map(|(ifindex, _)| *ifindex)
            .filter(|ifindex| !desired.contains_key(ifindex))
            .collect();
        for ifindex in orphaned {
            self.detach(hooks, ifindex);
        }
    }

    /// Takes over the links a previous agent pinned for the endpoints in `desired`, swapping in
    /// this agent's programs (each swap is atomic, `bpf_link_update`), except where the
    /// endpoint's entry is `unwritten`; removes the pins of interfaces that enforce nothing
    /// now. Runs at the end of an apply (in effect the first, or the first that wrote the
    /// endpoint's entry): the new programs may read maps this agent created afresh (an upgrade
    /// that replaced a pinned map), so they replace the old ones only once every map is
    /// filled. Until then the old programs keep enforcing with the maps they were loaded with.
    pub fn adopt(
        &mut self,
        hooks: &mut dyn Hooks,
        desired: &BTreeMap<u32, DesiredEndpoint>,
        unwritten: &BTreeSet<u32>,
        report: &mut ApplyReport,
    ) {
        if !self.enabled {
            return;
        }
        for (ifindex, hook) in hooks.pinned_links() {
            if self.attached.contains(&(ifindex, hook)) || unwritten.contains(&ifindex) {
                continue;
            }
            match desired.get(&ifindex) {
                Some(endpoint) => match hooks.attach(ifindex, &endpoint.interface, hook) {
                    Ok(()) => {
                        self.attached.insert((ifindex, hook));
                    }
                    Err(error) => {
                        warn!(message = %error, "cannot adopt pinned link");
                        report.errors.push(error.into());
                    }
                },
                None => hooks.unpin(ifindex, hook),
            }
        }
        // A link that could not be taken over: retried by the next apply as a new attach.
        for endpoint in &mut report.endpoints {
            let adopted = Hook::ALL
                .iter()
                .all(|hook| self.attached.contains(&(endpoint.ifindex, *hook)));
            if endpoint.attached && !adopted {
                endpoint.attached = false;
                report.unenforced.push(UnenforcedEndpoint {
                    pod: endpoint.pod.clone(),
                    interface: Some(endpoint.interface.clone()),
                    reason: Unenforced::AttachFailed,
                });
            }
        }
    }
}

impl Kernel {
    /// Whether programs are attached with TCX links (else as clsact filters).
    #[cfg_attr(
        not(feature = "test-support"),
        expect(clippy::unused_self, reason = "only injected faults read it")
    )]
    fn has_tcx(&self) -> bool {
        #[cfg(feature = "test-support")]
        if self.faults.no_tcx {
            return false;
        }
        aya::util::KernelVersion::current()
            .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0))
    }
}

impl Hooks for Kernel {
    /// Attaches with TCX, pinning the link so it outlives the agent; an existing pin (from a
    /// previous agent) is taken over by swapping in this agent's program atomically. Falls
    /// back to a clsact filter on kernels without TCX.
    fn attach(&mut self, ifindex: u32, interface: &str, hook: Hook) -> Result<(), AttachError> {
        let pin = self.layout.link(ifindex, hook.program());
        let tcx = self.has_tcx();
        #[cfg(feature = "test-support")]
        let injected = self.faults.attach_fails();
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.program())
            .and_then(|program| program.try_into().ok())
            .ok_or(AttachError::ProgramMissing {
                program: hook.program(),
            })?;
        let refused = |source: AttachFailure| AttachError::Refused {
            interface: interface.to_owned(),
            program: hook.program(),
            source,
        };
        #[cfg(feature = "test-support")]
        if injected {
            return Err(refused(AttachFailure::Injected));
        }

        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|error| refused(error.into()))?;
            match program.attach_to_link(link) {
                Ok(link_id) => {
                    // The pin keeps the link; dropping our handle only closes a descriptor.
                    let _link = program
                        .take_link(link_id)
                        .map_err(|error| refused(error.into()))?;
                    return Ok(());
                }
                Err(error) => {
                    warn!(%interface, %error, "pinned link is stale; attaching afresh");
                    let _ = fs::remove_file(&pin);
                }
            }
        }

        if !tcx {
            return attach_clsact(program, interface, hook).map_err(|error| refused(error.into()));
        }
        let link_id = program
            .attach(interface, hook.attach_type())
            .map_err(|error| refused(error.into()))?;
        let link = program
            .take_link(link_id)
            .map_err(|error| refused(error.into()))?;
        let fd_link = FdLink::try_from(link).map_err(|error| refused(error.into()))?;
        fd_link.pin(&pin).map_err(|error| refused(error.into()))?;
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) {
        if !self.has_tcx() {
            // The filters outlive this process: remove netwarden's from an interface that
            // is still there (one that is gone took its filters along).
            if let Some(interface) = interface_name(ifindex) {
                for hook in Hook::ALL {
                    detach_clsact(&interface, hook);
                }
            }
        }
        for hook in Hook::ALL {
            // Unpinning drops the last reference to the TCX link, which detaches it.
            self.unpin(ifindex, hook);
        }
    }

    fn is_pinned(&self, ifindex: u32, hook: Hook) -> bool {
        self.layout.link(ifindex, hook.program()).exists()
    }

    fn pinned_links(&self) -> Vec<(u32, Hook)> {
        let Ok(entries) = fs::read_dir(self.layout.links()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| Hook::from_pin_name(&entry.file_name().to_string_lossy()))
            .collect()
    }

    fn unpin(&mut self, ifindex: u32, hook: Hook) {
        let _ = fs::remove_file(self.layout.link(ifindex, hook.program()));
    }

    /// Attaches to this network namespace's netfilter (`POSTROUTING` and `LOCAL_IN`, after
    /// source NAT). On a kernel without netfilter BPF links (Linux < 6.4) or BTF it fails,
    /// and flows to Services are judged on the Service's address.
    fn attach_translation_hook(&mut self) -> Result<(), NetfilterError> {
        let layout = netfilter::kernel_layout(Path::new("/sys/kernel/btf/vmlinux"))?;
        self.field_offsets
            .set(0, layout, 0)
            .map_err(|source| NetfilterError::Map {
                name: netwarden_common::maps::KERNEL_LAYOUT.name.into(),
                source,
            })?;
        let program = netfilter::load(PROGRAMS, &self.layout.maps(), &self.ebpf)?;
        netfilter::attach(&program, &self.layout.links())?;
        Ok(())
    }

    fn translation_hook_pinned(&self) -> bool {
        fs::read_dir(self.layout.links()).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("netfilter-")
            })
        })
    }
}

/// Attaches `program` as netwarden's clsact filter on `hook` of `interface` (see
/// [`clsact_placement`]): replaces the one a previous agent left there, or adds it. The filter
/// belongs to the interface, not to this process.
fn attach_clsact(
    program: &mut SchedClassifier,
    interface: &str,
    hook: Hook,
) -> Result<(), ProgramError> {
    if let Err(error) = tc::qdisc_add_clsact(interface)
        && !matches!(&error, tc::TcError::NetlinkError(inner) if inner.raw_os_error() == Some(libc::EEXIST))
    {
        return Err(error.into());
    }
    let placement = clsact_placement();
    let existing = SchedClassifierLink::attached(
        interface,
        hook.attach_type(),
        placement.priority,
        placement.handle,
        placement.classid,
    )
    .map_err(tc::TcError::IoError)?;
    // A replace (no NLM_F_CREATE) fails when no filter is there yet: then add it.
    let link_id = match program.attach_to_link(existing) {
        Ok(link_id) => link_id,
        Err(_) => program.attach_with_options(
            interface,
            hook.attach_type(),
            TcAttachOptions::Netlink(placement),
        )?,
    };
    let link = program.take_link(link_id)?;
    // Dropping the handle would detach the filter, which must outlive the agent.
    std::mem::forget(link);
    Ok(())
}

/// Removes netwarden's clsact filter from `hook` of `interface`, if it is there.
fn detach_clsact(interface: &str, hook: Hook) {
    let placement = clsact_placement();
    if let Ok(link) = SchedClassifierLink::attached(
        interface,
        hook.attach_type(),
        placement.priority,
        placement.handle,
        placement.classid,
    ) {
        // Dropping a link detaches it.
        drop(link);
    }
}

/// The name of interface `ifindex`, if it exists.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut name = [0_u8; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname may write, NUL included.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr().cast()) };
    if found.is_null() {
        return None;
    }
    let len = name.iter().position(|byte| *byte == 0)?;
    String::from_utf8(name[..len].to_vec()).ok()
}
