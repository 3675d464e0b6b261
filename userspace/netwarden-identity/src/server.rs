//! `envoy.service.auth.v3.Authorization/Check` over gRPC, answered by [`decide`].
//!
//! A workload's proxy (an Istio sidecar with a CUSTOM action, an Envoy `ext_authz` filter, the
//! e2e harness's test proxy) calls it once per connection with the connection's source and
//! destination socket addresses and the peer's verified principal. Every decision is counted
//! and logged as one structured line (target `netwarden::identity`; allows at debug level,
//! like the datapath's verdicts, denies as warnings); a deny is also handed to
//! a [`FlowCutter`], which the agent implements by marking the flow denied in the kernel's
//! conntrack, so the client cannot carry on at L4 after the proxy refused it.

use std::{
    collections::{BTreeMap, HashSet},
    fs::{self, DirBuilder, Permissions},
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use envoy_types::{
    ext_authz::v3::{
        CheckResponseExt as _,
        pb::{
            Address as AnyAddress, Authorization, AuthorizationServer, CheckRequest, CheckResponse,
            DeniedHttpResponse, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
        },
    },
    pb::envoy::{
        config::core::v3::{Address, socket_address::PortSpecifier},
        service::auth::v3::attribute_context::Peer,
    },
};
use futures::Stream;
use netwarden_model::{Cluster, PodRef};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tracing::{debug, warn};

use crate::{
    IdentityError,
    decide::{ClusterIndex, Connection, Decision, TrustDomain, decide_indexed},
    limit::{CutBudget, CutRate},
};

/// What the check decides on; replaced as a whole after every apply.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The cluster, as last applied.
    pub cluster: Cluster,
    /// `cluster` by pod address.
    pub index: ClusterIndex,
    /// The node's own addresses (kubelet probes come from them; callers may too).
    pub node_addresses: Vec<IpAddr>,
    /// Addresses of this node's pods: the only pods whose proxies may call over TCP.
    pub local_pod_addresses: HashSet<IpAddr>,
}

impl Snapshot {
    /// A snapshot of `cluster`, indexed.
    #[must_use]
    pub fn new(
        cluster: Cluster,
        node_addresses: Vec<IpAddr>,
        local_pod_addresses: HashSet<IpAddr>,
    ) -> Self {
        Self {
            index: ClusterIndex::new(&cluster),
            cluster,
            node_addresses,
            local_pod_addresses,
        }
    }
}

/// The snapshot shared by the agent's apply loop (writer) and the server (readers); `None`
/// until the agent has applied the cluster once, while the check answers `UNAVAILABLE`.
pub type SharedSnapshot = Arc<RwLock<Option<Arc<Snapshot>>>>;

/// A [`SharedSnapshot`] holding `snapshot`, as after an apply.
#[must_use]
pub fn shared(snapshot: Snapshot) -> SharedSnapshot {
    Arc::new(RwLock::new(Some(Arc::new(snapshot))))
}

/// A connection the identity check refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusedConnection {
    /// The client's socket address.
    pub source: SocketAddr,
    /// The socket address the client connected to.
    pub destination: SocketAddr,
}

/// Cuts a refused connection below the proxy (the agent: in the kernel's conntrack).
pub trait FlowCutter: Send + Sync + 'static {
    /// Makes every later packet of `connection` drop; returns what was done, for the log.
    fn cut(&self, connection: &RefusedConnection) -> String;
}

/// Counts of decisions by [`Decision::label`].
#[derive(Debug, Default)]
pub struct DecisionCounts(Mutex<BTreeMap<&'static str, u64>>);

impl DecisionCounts {
    fn add(&self, label: &'static str) -> u64 {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(label).or_default();
        *count += 1;
        *count
    }

    /// A copy of the counts.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Whose budget of cuts a deny draws on: the destination pod's, or its address's when no
/// single pod owns it.
#[derive(Debug, Hash, PartialEq, Eq)]
enum CutKey {
    Pod(PodRef),
    Address(IpAddr),
}

/// The count, in [`DecisionCounts`], of denies whose kernel cut was skipped because their
/// destination was over its [`CutRate`].
pub const CUT_RATE_LIMITED: &str = "cut_rate_limited";

/// The Check service.
pub struct IdentityService {
    snapshot: SharedSnapshot,
    trust_domain: TrustDomain,
    cutter: Option<Arc<dyn FlowCutter>>,
    counts: Arc<DecisionCounts>,
    cut_budget: Mutex<CutBudget<CutKey>>,
}

impl IdentityService {
    /// A service deciding on `snapshot` in `trust_domain`; denies go to `cutter` when given.
    #[must_use]
    pub fn new(
        snapshot: SharedSnapshot,
        trust_domain: TrustDomain,
        cutter: Option<Arc<dyn FlowCutter>>,
    ) -> Self {
        Self {
            snapshot,
            trust_domain,
            cutter,
            counts: Arc::default(),
            cut_budget: Mutex::new(CutBudget::new(CutRate::default())),
        }
    }

    /// The same service with `rate` as each destination pod's budget of cuts.
    #[must_use]
    pub fn with_cut_rate(self, rate: CutRate) -> Self {
        Self {
            cut_budget: Mutex::new(CutBudget::new(rate)),
            ..self
        }
    }

    /// Whether a deny to `destination` may still cut, drawing on its pod's budget.
    fn may_cut(&self, snapshot: &Snapshot, destination: IpAddr) -> bool {
        let key = match snapshot.index.pods_at(destination) {
            [pod] => CutKey::Pod(pod.clone()),
            _ => CutKey::Address(destination),
        };
        self.cut_budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(key, tokio::time::Instant::now())
    }

    /// The decision counters (shared; they keep counting).
    #[must_use]
    pub fn counts(&self) -> Arc<DecisionCounts> {
        Arc::clone(&self.counts)
    }

    /// Decides one request from `caller` (its address over TCP; `None` over the Unix socket):
    /// parse, decide, log, count, cut on deny.
    pub fn check_request(
        &self,
        request: &CheckRequest,
        caller: Option<IpAddr>,
    ) -> Result<Decision, IdentityError> {
        // Before the first apply the check knows no pod: every destination would be "unknown"
        // and denied (and cut). Not answering lets the proxy retry once the agent has applied.
        let snapshot = self
            .snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(IdentityError::NotAppliedYet)?;
        let (source, destination, principal) = connection_of(request)?;
        if let Some(caller) = caller.map(unmap)
            && !may_ask_about(&snapshot, caller, destination.ip())
        {
            return Err(IdentityError::NotTheDestination {
                caller,
                destination: destination.ip(),
            });
        }
        let connection = Connection {
            source: source.ip(),
            destination: destination.ip(),
            port: destination.port(),
            principal,
        };
        let decision = decide_indexed(
            &snapshot.cluster,
            &snapshot.index,
            &snapshot.node_addresses,
            &self.trust_domain,
            &connection,
        );
        let count = self.counts.add(decision.label());
        let principal = connection.principal.as_deref().unwrap_or("");
        if decision.is_allowed() {
            // Like L3/L4 verdicts: allows are counted and logged at debug, denies always.
            debug!(
                target: "netwarden::identity",
                verdict = "allow",
                source = %source,
                destination = %destination,
                principal,
                reason = %decision,
                count,
                "identity check"
            );
        } else {
            let cut = match &self.cutter {
                None => String::new(),
                Some(cutter) if self.may_cut(&snapshot, destination.ip()) => {
                    cutter.cut(&RefusedConnection {
                        source,
                        destination,
                    })
                }
                Some(_) => {
                    self.counts.add(CUT_RATE_LIMITED);
                    "not cut: the destination is over its rate of cuts".to_owned()
                }
            };
            warn!(
                target: "netwarden::identity",
                verdict = "deny",
                source = %source,
                destination = %destination,
                principal,
                reason = %decision,
                denial = decision.label(),
                flow = %cut,
                count,
                "identity check"
            );
        }
        Ok(decision)
    }
}

#[tonic::async_trait]
impl Authorization for IdentityService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let caller = request.remote_addr().map(|address| address.ip());
        let decision = match self.check_request(request.get_ref(), caller) {
            Ok(decision) => decision,
            Err(error @ IdentityError::NotAppliedYet) => {
                self.counts.add("not_applied_yet");
                debug!(target: "netwarden::identity", %error, "identity check");
                return Err(tonic::Status::unavailable(error.to_string()));
            }
            Err(error) => {
                self.counts.add(match error {
                    IdentityError::NotTheDestination { .. } => "caller_not_the_destination",
                    _ => "malformed_request",
                });
                warn!(target: "netwarden::identity", verdict = "deny", %error, "identity check");
                return Ok(tonic::Response::new(denied(&error.to_string())));
            }
        };
        let response = if decision.is_allowed() {
            let mut response = CheckResponse::with_status(tonic::Status::ok(decision.to_string()));
            response.set_http_response(HttpResponse::OkResponse(OkHttpResponse::default()));
            response
        } else {
            denied(&decision.to_string())
        };
        Ok(tonic::Response::new(response))
    }
}

/// A deny: `PERMISSION_DENIED` for the network filter, 403 with the reason for the HTTP one.
fn denied(reason: &str) -> CheckResponse {
    let mut response = CheckResponse::with_status(tonic::Status::permission_denied(reason));
    response.set_http_response(HttpResponse::DeniedResponse(DeniedHttpResponse {
        status: Some(HttpStatus {
            code: HttpStatusCode::Forbidden.into(),
        }),
        body: reason.to_owned(),
        ..DeniedHttpResponse::default()
    }));
    response
}

/// The source and destination socket addresses and the source principal of a request, or
/// which attribute is missing or malformed.
pub fn connection_of(
    request: &CheckRequest,
) -> Result<(SocketAddr, SocketAddr, Option<String>), IdentityError> {
    let attributes = request
        .attributes
        .as_ref()
        .ok_or(IdentityError::MissingAttribute("attributes"))?;
    let source_peer = attributes
        .source
        .as_ref()
        .ok_or(IdentityError::MissingAttribute("attributes.source"))?;
    let source = socket_address(source_peer, "attributes.source.address")?;
    let destination = socket_address(
        attributes
            .destination
            .as_ref()
            .ok_or(IdentityError::MissingAttribute("attributes.destination"))?,
        "attributes.destination.address",
    )?;
    let principal = Some(source_peer.principal.clone()).filter(|p| !p.is_empty());
    Ok((source, destination, principal))
}

fn socket_address(peer: &Peer, field: &'static str) -> Result<SocketAddr, IdentityError> {
    let Some(Address {
        address: Some(AnyAddress::SocketAddress(socket)),
    }) = &peer.address
    else {
        return Err(IdentityError::MissingAttribute(field));
    };
    let ip: IpAddr = socket
        .address
        .parse()
        .map_err(|_| IdentityError::BadAddress {
            field,
            value: socket.address.clone(),
        })?;
    let port = match &socket.port_specifier {
        Some(PortSpecifier::PortValue(port)) => u16::try_from(*port).ok(),
        _ => None,
    }
    .ok_or_else(|| IdentityError::BadAddress {
        field,
        value: format!("{:?}", socket.port_specifier),
    })?;
    Ok(SocketAddr::new(unmap(ip), port))
}

/// `::ffff:a.b.c.d` as `a.b.c.d`: an IPv4 client of a dual-stack listener.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Who may open the check's Unix socket: its permission bits and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (`0o660`: the owner and the group read and write).
    pub mode: u32,
    /// The group to give the socket, by id; `None` keeps the agent's.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        Self {
            mode: 0o660,
            group: None,
        }
    }
}

/// Serves `service` on a Unix socket at `path` (a stale socket there is replaced) until the
/// runtime stops. Who may call is up to the socket's permissions, `access`: whoever can open
/// it is trusted like the node (it is only reachable from the node, or from pods the node
/// mounts it into).
pub fn serve_unix(
    path: &Path,
    access: SocketAccess,
    service: Arc<IdentityService>,
) -> Result<tokio::task::JoinHandle<()>, IdentityError> {
    let listener = bind_unix(path, access).map_err(|source| IdentityError::Listen {
        address: path.display().to_string(),
        source,
    })?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    Ok(spawn_server(service, incoming))
}

/// Binds a Unix socket at `path` that is never there with other permissions than `access`:
/// it is bound in a private directory beside `path`, given its mode and group there, and
/// renamed into place (replacing a stale socket atomically). Not left to the umask, which
/// `bind` applies and which is process-wide; and not `fchmod` on the listening descriptor,
/// which on Linux changes the socket's inode in sockfs, not the file `bind` created.
pub fn bind_unix(path: &Path, access: SocketAccess) -> std::io::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(parent)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.{}.bind", std::process::id()));
    // Left behind by a predecessor killed between bind and rename, with our pid.
    match fs::remove_dir_all(&staging) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    DirBuilder::new().mode(0o700).create(&staging)?;
    let staged = staging.join("socket");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        fs::set_permissions(&staged, Permissions::from_mode(access.mode))?;
        if let Some(group) = access.group {
            std::os::unix::fs::chown(&staged, None, Some(group))?;
        }
        fs::rename(&staged, path)?;
        Ok(listener)
    });
    let cleaned = fs::remove_dir_all(&staging);
    let listener = bound?;
    cleaned?;
    Ok(listener)
}

/// Serves `service` on a TCP `address`; only callers whose address is one of the node's or of
/// a local pod (as the current snapshot says) are served, others are closed at once. Each
/// request is then only decided for a caller asking about its own pod ([`may_ask_about`]).
pub async fn serve_tcp(
    address: SocketAddr,
    service: Arc<IdentityService>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), IdentityError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| IdentityError::Listen {
            address: address.to_string(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| IdentityError::Listen {
            address: address.to_string(),
            source,
        })?;
    let snapshot = Arc::clone(&service.snapshot);
    let incoming = local_callers(listener, snapshot);
    Ok((bound, spawn_server(service, incoming)))
}

/// Accepted connections from the node or its pods; anything else is dropped (and logged).
fn local_callers(
    listener: TcpListener,
    snapshot: SharedSnapshot,
) -> impl Stream<Item = Result<TcpStream, std::io::Error>> {
    futures::stream::unfold((listener, snapshot), |(listener, snapshot)| async move {
        loop {
            let accepted = listener.accept().await;
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => return Some((Err(error), (listener, snapshot))),
            };
            if is_local_caller(&snapshot, unmap(peer.ip())) {
                return Some((Ok(stream), (listener, snapshot)));
            }
            warn!(target: "netwarden::identity", caller = %peer, "refused a caller that is neither the node nor a local pod");
        }
    })
}

/// Whether a TCP `caller` may ask about connections to `destination`, and so have them cut:
/// only from an address of the destination pod itself (its proxy shares the pod's network
/// namespace), a pod of this node that is not on the host network and is the only pod
/// claiming that address. Not the node's addresses, nor loopback: every hostNetwork pod has
/// those, and could otherwise cut any pod's connections by asking with a wrong principal.
/// Callers that need more ask over the Unix socket.
#[must_use]
pub fn may_ask_about(snapshot: &Snapshot, caller: IpAddr, destination: IpAddr) -> bool {
    if !snapshot.local_pod_addresses.contains(&destination) {
        return false;
    }
    let [owner] = snapshot.index.pods_at(destination) else {
        return false;
    };
    snapshot
        .cluster
        .pods
        .get(owner)
        .is_some_and(|pod| !pod.host_network && pod.ips.contains(&caller))
}

/// Whether `caller` is the node (its addresses, loopback) or one of its pods.
#[must_use]
pub fn is_local_caller(snapshot: &SharedSnapshot, caller: IpAddr) -> bool {
    if caller.is_loopback() {
        return true;
    }
    let snapshot = snapshot
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    snapshot.as_ref().is_some_and(|snapshot| {
        snapshot.node_addresses.contains(&caller) || snapshot.local_pod_addresses.contains(&caller)
    })
}

fn spawn_server<S, IO, E>(service: Arc<IdentityService>, incoming: S) -> tokio::task::JoinHandle<()>
where
    S: Stream<Item = Result<IO, E>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(AuthorizationServer::from_arc(service))
            .serve_with_incoming(incoming)
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "the identity check server stopped");
        }
    })
}
