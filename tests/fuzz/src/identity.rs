//! The identity check target: an arbitrary `CheckRequest` protobuf, as a proxy (or anything
//! that can reach the check's socket) sends it, through the gRPC handler.
//!
//! The first byte picks who asks (the Unix socket, or a TCP caller: a local pod, the node,
//! loopback, a stranger) and whether the agent has applied the cluster yet; the rest is the
//! message. Whatever it holds, the handler must answer, never panic; it allows only what
//! [`IdentityService::check_request`] allows, and that only when the decision on the whole
//! cluster (not the index of the two addresses) allows it too; it cuts a connection only on a
//! deny, once at most.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest};
use netwarden_identity::{
    Connection, FlowCutter, IdentityError, IdentityService, RefusedConnection, SharedSnapshot,
    Snapshot, TrustDomain, decide::decide, server::connection_of, shared,
};
use netwarden_model::{Cluster, cluster_of_stream};
use prost::Message as _;
use tonic::{Code, transport::server::TcpConnectInfo};

/// The cluster decided on: see the file's comment.
const CLUSTER: &str = include_str!("../fixtures/identity-cluster.yaml");
/// This node's name in [`CLUSTER`].
const NODE: &str = "node-1";

/// Who asks, by the first byte of the input (modulo the length).
const CALLERS: [Option<IpAddr>; 9] = [
    // The Unix socket: trusted like the node.
    None,
    // The pods of this node, by each family, and mapped as a dual-stack listener sees IPv4.
    Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
    Some(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))),
    Some(IpAddr::V6(Ipv6Addr::new(
        0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001,
    ))),
    Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
    // The address two pods claim.
    Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))),
    // The node, loopback, a stranger.
    Some(IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2))),
    Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
];

/// Counts the cuts the service asks for.
#[derive(Debug, Default)]
struct CountingCutter(Arc<AtomicUsize>);

impl FlowCutter for CountingCutter {
    fn cut(&self, _: &RefusedConnection) -> String {
        self.0.fetch_add(1, Ordering::Relaxed);
        "counted".to_owned()
    }
}

/// The applied snapshot, built once: indexing the cluster is not what is fuzzed.
fn applied() -> &'static (SharedSnapshot, Arc<Snapshot>) {
    static APPLIED: OnceLock<(SharedSnapshot, Arc<Snapshot>)> = OnceLock::new();
    APPLIED.get_or_init(|| {
        let (cluster, errors) = cluster_of_stream("identity-cluster.yaml", CLUSTER);
        assert!(errors.is_empty(), "the fixture is valid: {errors:?}");
        let node_addresses = cluster
            .nodes
            .get(NODE)
            .map(|node| node.addresses.clone())
            .unwrap_or_default();
        let local_pod_addresses = local_pod_addresses(&cluster);
        let snapshot = Snapshot::new(cluster, node_addresses, local_pod_addresses);
        let shared = shared(snapshot);
        let snapshot = shared
            .read()
            .expect("not poisoned")
            .clone()
            .expect("applied");
        (shared, snapshot)
    })
}

fn local_pod_addresses(cluster: &Cluster) -> HashSet<IpAddr> {
    cluster
        .pods
        .values()
        .filter(|pod| pod.node_name.as_deref() == Some(NODE) && !pod.host_network)
        .flat_map(|pod| pod.ips.iter().copied())
        .collect()
}

/// Checks one input: see the module's documentation.
pub fn check(data: &[u8]) {
    let Some((&choice, message)) = data.split_first() else {
        return;
    };
    let Ok(request) = CheckRequest::decode(message) else {
        return;
    };
    let caller = CALLERS[usize::from(choice) % CALLERS.len()];
    // One in sixteen asks an agent that has not applied the cluster yet.
    let applied_yet = choice / 16 != 0;
    let (applied_snapshot, snapshot) = applied();
    let shared_snapshot: SharedSnapshot = if applied_yet {
        Arc::clone(applied_snapshot)
    } else {
        Arc::new(RwLock::new(None))
    };
    let cuts = Arc::new(AtomicUsize::new(0));
    // A new service per input: its budget of cuts must not carry one input over to the next.
    let service = IdentityService::new(
        shared_snapshot,
        TrustDomain::default(),
        Some(Arc::new(CountingCutter(Arc::clone(&cuts)))),
    );

    let decided = service.check_request(&request, caller);
    let cuts_by_check_request = cuts.swap(0, Ordering::Relaxed);
    let mut grpc_request = tonic::Request::new(request.clone());
    if let Some(caller) = caller {
        grpc_request.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(SocketAddr::new(caller, 40000)),
        });
    }
    let answered = futures::executor::block_on(service.check(grpc_request));
    let cuts_by_handler = cuts.load(Ordering::Relaxed);

    match &decided {
        Ok(decision) => {
            let response = answered.expect("a decided request is answered with a response");
            let status = response.get_ref().status.as_ref().expect("a status");
            assert_eq!(
                status.code == Code::Ok as i32,
                decision.is_allowed(),
                "the response's status {status:?} does not say the decision {decision:?}"
            );
            let expected_cuts = usize::from(!decision.is_allowed());
            assert!(
                cuts_by_check_request <= expected_cuts && cuts_by_handler <= expected_cuts,
                "{cuts_by_check_request} and {cuts_by_handler} cuts for {decision:?}"
            );
            let (source, destination, principal) =
                connection_of(&request).expect("a decided request has a connection");
            let on_the_whole_cluster = decide(
                &snapshot.cluster,
                &snapshot.node_addresses,
                &TrustDomain::default(),
                &Connection {
                    source: source.ip(),
                    destination: destination.ip(),
                    port: destination.port(),
                    principal,
                },
            );
            assert_eq!(
                decision, &on_the_whole_cluster,
                "the indexed decision differs from the decision on the whole cluster"
            );
        }
        Err(IdentityError::NotAppliedYet) => {
            assert!(!applied_yet, "the applied snapshot was not seen");
            let status = answered.expect_err("not applied yet is an error status");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        Err(error) => {
            let response = answered.expect("a malformed request is answered with a deny");
            let status = response.get_ref().status.as_ref().expect("a status");
            assert_eq!(
                status.code,
                Code::PermissionDenied as i32,
                "{error} answered with {status:?}"
            );
            assert_eq!(
                cuts_by_check_request + cuts_by_handler,
                0,
                "a request that was not decided cut a connection: {error}"
            );
        }
    }
}
