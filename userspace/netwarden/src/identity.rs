//! Wiring of the mTLS screen and the identity check into the agent: after every apply, the
//! strict endpoints go to the kernel and the snapshot to the Check server; a deny of the
//! Check server cuts the flow in the kernel's conntrack.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use anyhow::Context as _;
use aya::maps::MapError;
use netwarden_common::flow_flags;
use netwarden_datapath::{Datapath, mtls::StrictEndpoints, netlink::NodeNetwork};
use netwarden_identity::{
    CutRate, DecisionCounts, IdentityService, RefusedConnection, SharedSnapshot, Snapshot,
    SocketAccess, TrustDomain, server,
};
use netwarden_model::{Cluster, ClusterView, PodRef};
use netwarden_policy::DatapathState;
use tracing::info;

/// The identity check's options of `netwarden agent`.
#[derive(clap::Args)]
pub struct IdentityOptions {
    /// Serve Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`)
    /// on this Unix socket, for the proxies of mTLS-strict pods.
    #[arg(long)]
    pub authz_socket: Option<PathBuf>,
    /// Permission bits of `--authz-socket`, in octal: whoever can open it may ask about, and
    /// so cut, any connection of this node's pods.
    #[arg(long, default_value = "0660", value_parser = parse_mode)]
    pub authz_socket_mode: u32,
    /// Group of `--authz-socket` (a name or a numeric id); the agent's own when unset.
    #[arg(long)]
    pub authz_socket_group: Option<String>,
    /// Serve it on this TCP address too (the node's own address in a DaemonSet). A caller may
    /// only ask about connections to the pod whose address it calls from (its own proxy's).
    #[arg(long)]
    pub authz_address: Option<SocketAddr>,
    /// Flows the identity check may cut per second and destination pod; a deny beyond it is
    /// still answered, but not cut in the kernel (counted as `cut_rate_limited`).
    #[arg(long, default_value_t = CutRate::default().per_second)]
    pub authz_cut_rate: u32,
    /// Cuts a destination pod may take at once before `--authz-cut-rate` applies.
    #[arg(long, default_value_t = CutRate::default().burst)]
    pub authz_cut_burst: u32,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
}

/// What the apply loop keeps of the identity check.
/// What the identity wiring keeps of one apply's cluster snapshot ([`IdentityWiring::prepare`]).
pub struct IdentityInput {
    /// Exempt ports of each mTLS-strict pod.
    strict: BTreeMap<PodRef, BTreeSet<u16>>,
    /// The pods' annotation problems.
    problems: Vec<String>,
    /// The snapshot itself, when the identity check is served.
    snapshot: Option<Cluster>,
}

pub struct IdentityWiring {
    snapshot: SharedSnapshot,
    /// Local pod addresses -> the ifindex of their veth, for the flow cutter.
    endpoints: Arc<RwLock<HashMap<IpAddr, u32>>>,
    counts: Option<Arc<DecisionCounts>>,
}

impl IdentityWiring {
    /// Starts the Check server(s) the options ask for; none when neither is set (the kernel's
    /// mTLS screen is enforced either way).
    pub async fn start(options: &IdentityOptions, datapath: &mut Datapath) -> anyhow::Result<Self> {
        let IdentityOptions {
            authz_socket,
            authz_socket_mode,
            authz_socket_group,
            authz_address,
            authz_cut_rate,
            authz_cut_burst,
            trust_domain,
        } = options;
        let trust_domain = TrustDomain::new(trust_domain).context("--trust-domain")?;
        let socket_access = SocketAccess {
            mode: *authz_socket_mode,
            group: authz_socket_group
                .as_deref()
                .map(group_id)
                .transpose()
                .context("--authz-socket-group")?,
        };
        let snapshot = SharedSnapshot::default();
        let endpoints = Arc::new(RwLock::new(HashMap::new()));
        let mut wiring = Self {
            snapshot: Arc::clone(&snapshot),
            endpoints: Arc::clone(&endpoints),
            counts: None,
        };
        if authz_socket.is_none() && authz_address.is_none() {
            return Ok(wiring);
        }
        let cutter = KernelCutter {
            cutter: Mutex::new(
                datapath
                    .flow_cutter()
                    .context("opening conntrack for the identity check")?,
            ),
            endpoints,
        };
        let service = Arc::new(
            IdentityService::new(snapshot, trust_domain.clone(), Some(Arc::new(cutter)))
                .with_cut_rate(CutRate {
                    per_second: *authz_cut_rate,
                    burst: *authz_cut_burst,
                }),
        );
        wiring.counts = Some(service.counts());
        if let Some(path) = authz_socket {
            server::serve_unix(path, socket_access, Arc::clone(&service))?;
            info!(
                socket = %path.display(),
                mode = format!("{:04o}", socket_access.mode),
                group = ?socket_access.group,
                %trust_domain,
                "identity check listening"
            );
        }
        if let Some(address) = authz_address {
            let (bound, _) = server::serve_tcp(*address, service).await?;
            info!(address = %bound, %trust_domain, "identity check listening");
        }
        Ok(wiring)
    }

    /// Takes what the identity wiring needs of `cluster` before the compiler consumes it: the
    /// mTLS-strict pods, the annotation problems and, only when the check is served, a copy of
    /// the whole snapshot for it (its threads read it while the next apply compiles). Without
    /// the check nobody would read that copy: it is not made (10,000 pods: ~10 MiB resident).
    pub fn prepare(&self, cluster: &ClusterView<'_>) -> IdentityInput {
        IdentityInput {
            strict: cluster
                .pods
                .iter()
                .filter(|(_, pod)| cluster.rest.is_mtls_strict(pod))
                .map(|(id, pod)| (id.clone(), pod.mtls.exempt_ports.clone()))
                .collect(),
            problems: cluster
                .annotation_problems()
                .map(ToString::to_string)
                .collect(),
            snapshot: self.counts.is_some().then(|| cluster.to_cluster()),
        }
    }

    /// Writes the strict endpoints of `state` (found in `network` the way the datapath finds
    /// them) to the kernel's mTLS maps and remembers which veth serves which pod address, for
    /// the flow cutter. Runs before the datapath applies `state`, so a pod whose endpoint turns
    /// ready in that apply is screened from its first packet.
    pub fn sync_kernel(
        &self,
        datapath: &mut Datapath,
        input: &IdentityInput,
        network: &NodeNetwork,
        state: &DatapathState,
        errors: &mut Vec<String>,
    ) {
        let mut strict = StrictEndpoints::new();
        let mut endpoints = HashMap::new();
        for local in state.endpoints.values() {
            let Some(interface) = local.ips.iter().find_map(|ip| network.veth_for(*ip)) else {
                continue;
            };
            for ip in &local.ips {
                endpoints.insert(*ip, interface.index);
            }
            if let Some(exempt_ports) = input.strict.get(&local.pod) {
                strict.insert(interface.index, exempt_ports.clone());
            }
        }
        if let Err(error) = datapath.sync_mtls(&strict) {
            errors.push(format!("cannot write the mTLS maps: {error}"));
        }
        *self
            .endpoints
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = endpoints;
    }

    /// Hands the Check server the snapshot just applied; the pods' annotation problems go to
    /// `errors`.
    pub fn refresh(
        &self,
        input: IdentityInput,
        network: &NodeNetwork,
        state: &DatapathState,
        errors: &mut Vec<String>,
    ) {
        let IdentityInput {
            strict: _,
            problems,
            snapshot,
        } = input;
        errors.extend(problems);
        let Some(cluster) = snapshot else {
            return;
        };
        let local_pod_addresses = state
            .endpoints
            .values()
            .flat_map(|endpoint| endpoint.ips.iter().copied())
            .collect();
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(Snapshot::new(
            cluster,
            network.addresses.clone(),
            local_pod_addresses,
        )));
    }

    /// The identity check's decision counters, when it is served.
    pub fn decision_counts(&self) -> Option<Arc<DecisionCounts>> {
        self.counts.clone()
    }

    /// Decisions by reason, for the status file.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .as_ref()
            .map(|counts| {
                counts
                    .snapshot()
                    .into_iter()
                    .map(|(label, count)| (label.to_owned(), count))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Permission bits in octal (`0660`, `0o600`), at most `0777`.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not permission bits in octal (0000 to 0777)"))
}

/// The id of the group named `group`, or `group` itself when it is a number.
pub(crate) fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(id) = group.parse() {
        return Ok(id);
    }
    nix::unistd::Group::from_name(group)
        .with_context(|| format!("looking up group {group:?}"))?
        .map(|found| found.gid.as_raw())
        .with_context(|| format!("no group {group:?}"))
}

/// Cuts refused connections in conntrack, on the destination pod's veth only, and only an
/// entry conntrack already has: creating one could make the LRU table evict another pod's
/// flow. An untracked flow is left alone: a new TCP flow is tracked from its SYN, so the flow a
/// proxy asks about is tracked unless it was evicted, and payload to an mTLS-strict pod on a
/// connection conntrack does not know is dropped by the screen anyway.
struct KernelCutter {
    cutter: Mutex<netwarden_datapath::mtls::FlowCutter>,
    endpoints: Arc<RwLock<HashMap<IpAddr, u32>>>,
}

impl netwarden_identity::FlowCutter for KernelCutter {
    fn cut(&self, connection: &RefusedConnection) -> String {
        let RefusedConnection {
            source,
            destination,
        } = *connection;
        let Some(ifindex) = self
            .endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&destination.ip())
            .copied()
        else {
            return "not cut: the destination is not a pod of this node".to_owned();
        };
        let mut cutter = self
            .cutter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The flow as the destination's endpoint keys it: the pod's side first. Read, then
        // updated: an entry evicted between the two is written back by the update, a window
        // an update-only (`BPF_EXIST`) cut in the datapath's `FlowCutter` would close.
        let Some(flags) = cutter.flags(ifindex, destination, source) else {
            return format!("not cut: not tracked on ifindex {ifindex}");
        };
        match cutter.set_flags(
            ifindex,
            destination,
            source,
            flags | flow_flags::CUT_BY_IDENTITY,
        ) {
            Ok(()) => format!("cut on ifindex {ifindex}"),
            // Evicted or expired between the two calls: nothing left to cut.
            Err(MapError::KeyNotFound) => format!("not cut: not tracked on ifindex {ifindex}"),
            Err(error) => format!("cannot cut on ifindex {ifindex}: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mode;

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert_eq!(parse_mode("777"), Ok(0o777));
        assert!(parse_mode("4755").is_err(), "no setuid bit");
        assert!(parse_mode("0980").is_err());
        assert!(parse_mode("rw").is_err());
    }
}
