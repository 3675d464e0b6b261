//! The apply: makes the maps and attachments enforce a compiled [`DatapathState`], in an order
//! that never lets a packet see a half-written policy, neither a transient allow nor a
//! transient deny:
//!
//! 1. new policies are written under ids no endpoint uses yet;
//! 2. each endpoint is switched to its new policies in one map write;
//! 3. programs are attached to new endpoints (their map entry exists first, so they enforce
//!    from the first packet);
//! 4. endpoints that went away are detached, then their entry removed; policies no endpoint
//!    uses any more are deleted;
//! 5. the policy epoch is bumped, so tracked flows are checked once against the new policy;
//! 6. links a previous agent pinned are taken over, now that every map is filled.
//!
//! The unit tests below check that order against maps and hooks that record what is done to
//! them, on every run and without root; `tests/lifecycle.rs` checks it on the kernel.

use std::collections::{BTreeMap, BTreeSet};

use netwarden_common::{Endpoint, endpoint_state};
use netwarden_policy::{DatapathState, PolicyId};
use tracing::error;

use crate::{
    attach::{Attachments, Hooks, TranslationHook},
    desired::{DesiredEndpoint, desired_endpoints, owned_addresses},
    error::ApplyError,
    maps::SyncedMaps,
    netlink::NodeNetwork,
    report::{ApplyReport, EndpointReport, EndpointState, Unenforced, UnenforcedEndpoint},
};

/// The maps, the attachments and the hook after translation, kept in step by [`Enforcer::apply`].
pub(crate) struct Enforcer {
    pub maps: SyncedMaps,
    pub attachments: Attachments,
    pub translation: TranslationHook,
}

impl Enforcer {
    pub fn new(maps: SyncedMaps) -> Self {
        Self {
            maps,
            attachments: Attachments::default(),
            translation: TranslationHook::Off,
        }
    }

    /// Makes the maps and attachments enforce `state` on the interfaces found in `network`.
    pub fn apply(
        &mut self,
        hooks: &mut dyn Hooks,
        state: &DatapathState,
        network: &NodeNetwork,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let desired = desired_endpoints(state, network, &mut report);
        report.absorb(self.maps.ipcache.sync(&state.ipcache));
        let installed = self.maps.policies.install_new(&state.policies);
        report.failed_policies = installed.failed;
        report.absorb(installed.synced);
        report.absorb(self.maps.addresses.sync(&owned_addresses(&desired)));
        let unwritten = self.switch_endpoints(hooks, &desired, &mut report);
        self.remove_endpoints_except(hooks, &desired, &mut report);
        report.absorb(
            self.maps
                .policies
                .remove_unused(&state.policies, &report.failed_policies),
        );
        let deciding = self.translation.deciding(hooks);
        report.absorb(
            self.maps
                .frontends
                .sync(state, deciding, self.maps.settings.as_mut()),
        );
        self.maps.identities.sync(state);
        self.attach_translation_hook_if_due(hooks, state, &mut report);
        if report.changed
            && let Err(error) = self.maps.epoch.bump()
        {
            report.errors.push(error);
        }
        self.attachments
            .adopt(hooks, &desired, &unwritten, &mut report);
        report
    }

    /// Writes each endpoint's entry (locked down where its policy did not fit) and attaches
    /// the programs to its veth. Returns the endpoints whose entry could not be written: a
    /// previous agent's program keeps enforcing there (with its maps) rather than this
    /// agent's without an entry.
    fn switch_endpoints(
        &mut self,
        hooks: &mut dyn Hooks,
        desired: &BTreeMap<u32, DesiredEndpoint>,
        report: &mut ApplyReport,
    ) -> BTreeSet<u32> {
        let mut unwritten = BTreeSet::new();
        for (ifindex, endpoint) in desired {
            let DesiredEndpoint {
                pod,
                value,
                interface,
                addresses: _,
            } = endpoint;
            let value = if uses_any(value, &report.failed_policies) {
                error!(
                    pod = pod.as_ref().map_or_else(|| "?".to_owned(), ToString::to_string),
                    %interface,
                    "policy does not fit the maps; endpoint locked down"
                );
                Endpoint {
                    state: endpoint_state::LOCKED,
                    ..Endpoint::default()
                }
            } else {
                *value
            };
            match self.maps.endpoints.write(*ifindex, value) {
                Ok(written) => report.changed |= written,
                Err(source) => {
                    report.errors.push(ApplyError::EndpointEntry {
                        interface: interface.clone(),
                        source,
                    });
                    report.unenforced.push(UnenforcedEndpoint {
                        pod: pod.clone(),
                        interface: Some(interface.clone()),
                        reason: Unenforced::MapWriteFailed,
                    });
                    unwritten.insert(*ifindex);
                    continue;
                }
            }
            let attached =
                self.attachments
                    .attach_endpoint(hooks, *ifindex, interface, &mut report.errors);
            report.endpoints.push(EndpointReport {
                pod: pod.clone(),
                interface: interface.clone(),
                ifindex: *ifindex,
                state: EndpointState::of_map_value(value.state),
                attached,
            });
            if !attached && self.attachments.enabled {
                report.unenforced.push(UnenforcedEndpoint {
                    pod: pod.clone(),
                    interface: Some(interface.clone()),
                    reason: Unenforced::AttachFailed,
                });
            }
        }
        unwritten
    }

    /// Detaches and forgets endpoints that are not in `desired` (detached first, then their
    /// entry removed), and detaches interfaces that enforce nothing now.
    fn remove_endpoints_except(
        &mut self,
        hooks: &mut dyn Hooks,
        desired: &BTreeMap<u32, DesiredEndpoint>,
        report: &mut ApplyReport,
    ) {
        let gone: Vec<u32> = self
            .maps
            .endpoints
            .installed()
            .keys()
            .copied()
            .filter(|ifindex| !desired.contains_key(ifindex))
            .collect();
        for ifindex in gone {
            self.attachments.detach(hooks, ifindex);
            self.maps.endpoints.remove(ifindex);
            report.changed = true;
        }
        self.attachments.detach_all_but(hooks, desired);
    }

    /// Attaches the hook after translation if it waited for the maps to be filled (they are),
    /// and writes or clears the frontends as it now stands.
    fn attach_translation_hook_if_due(
        &mut self,
        hooks: &mut dyn Hooks,
        state: &DatapathState,
        report: &mut ApplyReport,
    ) {
        if self.translation != TranslationHook::AfterFill {
            return;
        }
        if let Err(error) = self.translation.attach(hooks) {
            report.errors.push(ApplyError::TranslationHook(error));
        }
        let deciding = self.translation.deciding(hooks);
        report.absorb(
            self.maps
                .frontends
                .sync(state, deciding, self.maps.settings.as_mut()),
        );
    }
}

/// Whether `endpoint` uses one of `policies` in either direction.
fn uses_any(endpoint: &Endpoint, policies: &BTreeSet<PolicyId>) -> bool {
    policies.contains(&endpoint.ingress_policy) || policies.contains(&endpoint.egress_policy)
}

#[cfg(test)]
mod tests;
