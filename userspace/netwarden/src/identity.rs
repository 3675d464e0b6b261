//! Wiring of the mTLS screen and the identity check into the agent: after every apply, the
//! strict endpoints go to the kernel and the snapshot to the Check server; a deny of the
//! Check server cuts the flow in the kernel's conntrack.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use anyhow::Context as _;
use netwarden_common::direction;
use netwarden_datapath::{Datapath, mtls::StrictEndpoints, netlink::NodeNetwork};
use netwarden_identity::{
    DecisionCounts, IdentityService, RefusedConnection, SharedSnapshot, Snapshot, TrustDomain,
    server,
};
use netwarden_model::Cluster;
use netwarden_policy::DatapathState;
use tracing::info;

/// The identity check's options of `netwarden agent`.
#[derive(clap::Args)]
pub struct IdentityOptions {
    /// Serve Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`)
    /// on this Unix socket, for the proxies of mTLS-strict pods.
    #[arg(long)]
    pub authz_socket: Option<PathBuf>,
    /// Serve it on this TCP address too (the node's own address in a DaemonSet). Only the node
    /// and this node's pods may call.
    #[arg(long)]
    pub authz_address: Option<SocketAddr>,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
}

/// What the apply loop keeps of the identity check.
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
            authz_address,
            trust_domain,
        } = options;
        let trust_domain = TrustDomain::new(trust_domain).context("--trust-domain")?;
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
        let service = Arc::new(IdentityService::new(
            snapshot,
            trust_domain.clone(),
            Some(Arc::new(cutter)),
        ));
        wiring.counts = Some(service.counts());
        if let Some(path) = authz_socket {
            server::serve_unix(path, Arc::clone(&service))?;
            info!(socket = %path.display(), %trust_domain, "identity check listening");
        }
        if let Some(address) = authz_address {
            let (bound, _) = server::serve_tcp(*address, service).await?;
            info!(address = %bound, %trust_domain, "identity check listening");
        }
        Ok(wiring)
    }

    /// Writes the strict endpoints of `state` (found in `network` the way the datapath finds
    /// them) to the kernel's mTLS maps and remembers which veth serves which pod address, for
    /// the flow cutter. Runs before the datapath applies `state`, so a pod whose endpoint turns
    /// ready in that apply is screened from its first packet.
    pub fn sync_kernel(
        &self,
        datapath: &mut Datapath,
        cluster: &Cluster,
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
            if let Some(pod) = cluster.pods.get(&local.pod)
                && cluster.is_mtls_strict(pod)
            {
                strict.insert(interface.index, pod.mtls.exempt_ports.clone());
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
        cluster: Cluster,
        network: &NodeNetwork,
        state: &DatapathState,
        errors: &mut Vec<String>,
    ) {
        errors.extend(cluster.annotation_problems().map(ToString::to_string));
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

/// Cuts refused connections in conntrack, on the veth of each side that is a local pod.
struct KernelCutter {
    cutter: Mutex<netwarden_datapath::mtls::FlowCutter>,
    endpoints: Arc<RwLock<HashMap<IpAddr, u32>>>,
}

impl netwarden_identity::FlowCutter for KernelCutter {
    fn cut(&self, connection: &RefusedConnection) -> String {
        let endpoints = self
            .endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut cutter = self
            .cutter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sides = [
            // The server's side: the flow came in towards it.
            (
                connection.destination,
                connection.source,
                direction::INGRESS,
            ),
            // The client's side, when it runs on this node too.
            (connection.source, connection.destination, direction::EGRESS),
        ];
        let mut done = Vec::new();
        for (pod, peer, origin) in sides {
            let Some(ifindex) = endpoints.get(&pod.ip()).copied() else {
                continue;
            };
            match cutter.cut(ifindex, pod, peer, origin) {
                Ok(true) => done.push(format!("cut on ifindex {ifindex}")),
                Ok(false) => done.push(format!("blocked on ifindex {ifindex} (was not tracked)")),
                Err(error) => done.push(format!("cannot cut on ifindex {ifindex}: {error}")),
            }
        }
        if done.is_empty() {
            "no local endpoint to cut it on".to_owned()
        } else {
            done.join("; ")
        }
    }
}
