//! The mTLS ops: `mtls_probe` dials a pod through real mutual TLS, `identity_check` asks the
//! agent's identity check directly.
//!
//! Every scenario gets a test CA (rcgen) and issues SPIFFE SVIDs from it: an X.509 certificate
//! whose URI SAN is `spiffe://cluster.local/ns/<namespace>/sa/<service account>`. A destination
//! pod's port that is not one of its container ports is served by a test proxy in the pod's
//! namespace, started on first use: it terminates mTLS with rustls (client certificates must
//! chain to the test CA), takes the verified client certificate's URI SAN, calls the agent's
//! `envoy.service.auth.v3.Authorization/Check` over its Unix socket with the connection's
//! addresses, and then forwards the connection to the pod's first TCP container port, or
//! closes it. The proxy records each decision, so a probe can tell "the identity check refused"
//! (the proxy saw a handshake and got a deny) from "the kernel dropped it" (the proxy never saw
//! a handshake): after a deny the agent cuts the flow in conntrack, so the proxy's close never
//! reaches the client either.

use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use netwarden_identity::client::{check_request, connect_unix, is_allowed};
use nix::sched::{CloneFlags, setns};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{netns::Netns, node::Addresses, scenario::PodSpec};

/// The trust domain of the test SVIDs (the agent's default).
const TRUST_DOMAIN: &str = "cluster.local";
/// How long a probe waits for the TCP handshake, the TLS handshake, or an answer.
const WAIT: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    #[error("cannot generate test certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot configure TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot start the mTLS proxy of {pod} on port {port}: {source}")]
    Proxy {
        pod: String,
        port: u16,
        source: io::Error,
    },
    #[error("cannot reach the agent's identity check: {0}")]
    Check(String),
    #[error("{0} has no IPv4 or IPv6 address")]
    NoAddress(String),
}

/// What a pod's Pod object carries beyond labels and ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// `spec.serviceAccountName`; `default` when unset.
    pub service_account: Option<String>,
    /// `metadata.annotations`.
    pub annotations: crate::scenario::Labels,
}

/// Whose certificate a client presents.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Principal {
    /// The identity of a pod: its namespace and service account.
    Pod(String),
    /// Any namespace and service account.
    Account {
        namespace: String,
        #[serde(rename = "serviceAccount")]
        service_account: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsExpectation {
    /// The server answered through the connection.
    Allowed,
    /// The proxy's identity check refused it (and the connection is dead at L4).
    Denied,
    /// The kernel dropped it: no connection, or no answer and no handshake at the proxy.
    Dropped,
}

/// `mtls_probe`: one connection from `from` to `to:port`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsProbe {
    pub from: String,
    pub to: String,
    pub port: u16,
    /// The certificate presented; the `from` pod's own identity when absent.
    pub identity: Option<Principal>,
    /// Send a plaintext line instead of speaking TLS.
    #[serde(default)]
    pub plaintext: bool,
    pub expect: MtlsExpectation,
}

impl MtlsProbe {
    /// Pods the step names (they must exist).
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        named_pods(&self.from, &self.to, self.identity.as_ref())
    }
}

impl fmt::Display for MtlsProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} TCP/{}", self.from, self.to, self.port)?;
        if self.plaintext {
            f.write_str(" plaintext")?;
        } else if let Some(identity) = &self.identity {
            write!(f, " as {identity}")?;
        }
        write!(f, " (expect {:?})", self.expect)
    }
}

/// The pods a step between `from` and `to`, presenting `identity`, names.
fn named_pods<'a>(
    from: &'a str,
    to: &'a str,
    identity: Option<&'a Principal>,
) -> impl Iterator<Item = &'a str> {
    let identity_pod = match identity {
        Some(Principal::Pod(pod)) => Some(pod.as_str()),
        _ => None,
    };
    [from, to].into_iter().chain(identity_pod)
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(pod) => write!(f, "{pod}'s identity"),
            Self::Account {
                namespace,
                service_account,
            } => write!(f, "ns/{namespace}/sa/{service_account}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckExpectation {
    Allowed,
    Denied,
}

/// `identity_check`: the agent's Check, asked directly as a proxy of `to` would ask it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityCheck {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub identity: Option<Principal>,
    pub expect: CheckExpectation,
    /// Text the reason must contain.
    pub reason: Option<String>,
}

impl IdentityCheck {
    /// Pods the step names (they must exist).
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        named_pods(&self.from, &self.to, self.identity.as_ref())
    }
}

impl fmt::Display for IdentityCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} TCP/{}", self.from, self.to, self.port)?;
        if let Some(identity) = &self.identity {
            write!(f, " as {identity}")?;
        }
        write!(f, " (expect {:?})", self.expect)
    }
}

/// `expect_agent_log`: a line of the agent's log that contains every one of `contains` must
/// appear (within a short wait: the agent logs kernel events as it reads them).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectAgentLog {
    pub contains: Vec<String>,
}

impl fmt::Display for ExpectAgentLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a line with {:?}", self.contains)
    }
}

impl ExpectAgentLog {
    /// Waits for the line in the log at `path`; returns it, or why it is missing.
    pub async fn find(&self, path: &std::path::Path) -> Result<String, String> {
        for _ in 0..40 {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = log.lines().find(|line| {
                self.contains
                    .iter()
                    .all(|text| line.contains(text.as_str()))
            }) {
                return Ok(line.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "no line of the agent log contains all of {:?}",
            self.contains
        ))
    }
}

/// What the mTLS ops need of a live pod.
pub struct PodView<'a> {
    pub netns: &'a Netns,
    pub addresses: &'a Addresses,
    pub spec: &'a PodSpec,
}

impl PodView<'_> {
    fn address(&self) -> Result<IpAddr, MtlsError> {
        self.addresses.all().first().copied().ok_or_else(|| {
            MtlsError::NoAddress(format!("{}/{}", self.spec.namespace, self.spec.name))
        })
    }
}

/// What the proxy saw of one client connection.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ProxyRecord {
    Allowed,
    Denied(String),
}

type ProxyRecords = Arc<Mutex<HashMap<SocketAddr, ProxyRecord>>>;

/// The scenario's CA, proxies and the agent's socket.
pub struct MtlsState {
    authz_socket: PathBuf,
    ca: Option<CertifiedIssuer<'static, KeyPair>>,
    proxies: HashMap<(String, u16), (JoinHandle<()>, ProxyRecords)>,
}

impl Drop for MtlsState {
    fn drop(&mut self) {
        for (task, _) in self.proxies.values() {
            task.abort();
        }
    }
}

/// The result of one `mtls_probe`.
#[derive(Debug)]
pub struct ProbeOutcome {
    observed: MtlsExpectation,
    detail: String,
    /// After a deny: whether the client still saw the proxy close the connection (it must not:
    /// the agent cut the flow in the kernel first).
    close_reached_client: bool,
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.observed, self.detail)
    }
}

impl ProbeOutcome {
    /// Why the outcome is not what the step expects, if it is not.
    pub fn mismatch(&self, expect: MtlsExpectation) -> Option<String> {
        if self.observed != expect {
            return Some(format!("expected {expect:?}, observed {self}"));
        }
        if expect == MtlsExpectation::Denied && self.close_reached_client {
            return Some(format!(
                "the identity check refused it, but the proxy's close reached the client: the flow was not cut in the kernel ({})",
                self.detail
            ));
        }
        None
    }
}

/// The answer of one `identity_check`.
#[derive(Debug)]
pub struct CheckAnswer {
    allowed: bool,
    reason: String,
}

impl fmt::Display for CheckAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        write!(f, "{verdict}: {}", self.reason)
    }
}

impl CheckAnswer {
    /// Why the answer is not what the step expects, if it is not.
    pub fn mismatch(&self, check: &IdentityCheck) -> Option<String> {
        let expected = check.expect == CheckExpectation::Allowed;
        if self.allowed != expected {
            return Some(format!(
                "expected {:?}, the agent answered {self}",
                check.expect
            ));
        }
        match &check.reason {
            Some(text) if !self.reason.contains(text.as_str()) => Some(format!(
                "the reason does not contain {text:?}: {}",
                self.reason
            )),
            _ => None,
        }
    }
}

impl MtlsState {
    pub fn new(authz_socket: PathBuf) -> Self {
        Self {
            authz_socket,
            ca: None,
            proxies: HashMap::new(),
        }
    }

    fn ca(&mut self) -> Result<&CertifiedIssuer<'static, KeyPair>, MtlsError> {
        if self.ca.is_none() {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "netwarden e2e test CA");
            self.ca = Some(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?);
        }
        Ok(self.ca.as_ref().expect("just created"))
    }

    fn roots(&mut self) -> Result<Arc<RootCertStore>, MtlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca()?.der().clone())?;
        Ok(Arc::new(roots))
    }

    /// An SVID for `spiffe_id`, with `ip` as an IP SAN too when given (a server's).
    fn svid(
        &mut self,
        spiffe_id: &str,
        ip: Option<IpAddr>,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), MtlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .subject_alt_names
            .push(SanType::URI(spiffe_id.try_into()?));
        if let Some(ip) = ip {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, self.ca()?)?;
        Ok((
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// Runs one `mtls_probe`.
    pub async fn probe(
        &mut self,
        pods: &HashMap<String, PodView<'_>>,
        probe: &MtlsProbe,
    ) -> Result<ProbeOutcome, MtlsError> {
        let client = &pods[&probe.from];
        let server = &pods[&probe.to];
        let destination = SocketAddr::new(server.address()?, probe.port);
        let served_plainly = server
            .spec
            .ports
            .iter()
            .any(|port| port.container_port == probe.port);
        let records = if served_plainly {
            None
        } else {
            Some(self.proxy(server, probe.port)?)
        };
        if probe.plaintext {
            return Ok(plaintext(client, destination, &probe.to, records.as_ref()).await);
        }
        let spiffe_id = spiffe_id(pods, probe.identity.as_ref(), &probe.from);
        let (chain, key) = self.svid(&spiffe_id, None)?;
        let config = ClientConfig::builder()
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)?;
        Ok(over_tls(client, destination, &probe.to, config, records.as_ref()).await)
    }

    /// Runs one `identity_check`.
    pub async fn check(
        &mut self,
        pods: &HashMap<String, PodView<'_>>,
        check: &IdentityCheck,
    ) -> Result<CheckAnswer, MtlsError> {
        let source = SocketAddr::new(pods[&check.from].address()?, fastrand::u16(32_768..61_000));
        let destination = SocketAddr::new(pods[&check.to].address()?, check.port);
        let principal = spiffe_id(pods, check.identity.as_ref(), &check.from);
        let mut client = connect_unix(&self.authz_socket)
            .await
            .map_err(|error| MtlsError::Check(error.to_string()))?;
        let response = client
            .check(check_request(source, destination, &principal))
            .await
            .map_err(|status| MtlsError::Check(status.to_string()))?
            .into_inner();
        Ok(CheckAnswer {
            allowed: is_allowed(&response),
            reason: response
                .status
                .map(|status| status.message)
                .unwrap_or_default(),
        })
    }

    /// The records of the proxy of `server` on `port`, starting it first if needed.
    fn proxy(&mut self, server: &PodView<'_>, port: u16) -> Result<ProxyRecords, MtlsError> {
        let key = (
            format!("{}/{}", server.spec.namespace, server.spec.name),
            port,
        );
        if let Some((_, records)) = self.proxies.get(&key) {
            return Ok(Arc::clone(records));
        }
        let address = server.address()?;
        let identity = spiffe_id_of(server.spec);
        let (chain, private_key) = self.svid(&identity, Some(address))?;
        let verifier = WebPkiClientVerifier::builder(self.roots()?).build()?;
        let config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, private_key)?;
        let proxy_error = |source| MtlsError::Proxy {
            pod: key.0.clone(),
            port,
            source,
        };
        let listener = listen(server.netns, SocketAddr::new(address, port)).map_err(proxy_error)?;
        let upstream_port = server
            .spec
            .ports
            .iter()
            .find(|port| port.protocol == crate::scenario::Protocol::Tcp)
            .map(|port| port.container_port)
            .ok_or_else(|| {
                proxy_error(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the pod has no TCP container port to forward to",
                ))
            })?;
        let netns_file =
            File::open(format!("/run/netns/{}", server.netns.name())).map_err(proxy_error)?;
        let records = ProxyRecords::default();
        let proxy = Proxy {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            upstream: SocketAddr::new(address, upstream_port),
            netns: Arc::new(netns_file),
            authz_socket: self.authz_socket.clone(),
            records: Arc::clone(&records),
        };
        let task = tokio::spawn(proxy.serve(listener));
        self.proxies.insert(key, (task, Arc::clone(&records)));
        Ok(records)
    }
}

/// The SPIFFE ID a probe presents: `identity`, or the `from` pod's own.
fn spiffe_id(
    pods: &HashMap<String, PodView<'_>>,
    identity: Option<&Principal>,
    from: &str,
) -> String {
    match identity {
        None => spiffe_id_of(pods[from].spec),
        Some(Principal::Pod(pod)) => spiffe_id_of(pods[pod].spec),
        Some(Principal::Account {
            namespace,
            service_account,
        }) => format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"),
    }
}

fn spiffe_id_of(pod: &PodSpec) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
        pod.namespace,
        pod.identity.service_account.as_deref().unwrap_or("default")
    )
}

/// A listening socket in `netns`.
fn listen(netns: &Netns, local: SocketAddr) -> io::Result<TcpListener> {
    let socket = netns.socket(Domain::for_address(local), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// A non-blocking socket created in the namespace open as `netns`: the proxy's upstream side
/// must leave from the pod, never from the harness's own namespace.
fn socket_in(netns: &File, domain: Domain) -> io::Result<Socket> {
    let original = File::open("/proc/thread-self/ns/net")?;
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let socket = Socket::new(domain, Type::STREAM, None);
    setns(original.as_fd(), CloneFlags::CLONE_NEWNET)
        .expect("returning to the harness's own network namespace");
    let socket = socket?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

async fn connect_from(netns: &Netns, destination: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns.socket(Domain::for_address(destination), Type::STREAM, None)?;
    TcpSocket::from_std_stream(socket.into())
        .connect(destination)
        .await
}

/// The test proxy of one pod port.
struct Proxy {
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    netns: Arc<File>,
    authz_socket: PathBuf,
    records: ProxyRecords,
}

impl Proxy {
    async fn serve(self, listener: TcpListener) {
        let proxy = Arc::new(self);
        while let Ok((stream, peer)) = listener.accept().await {
            let proxy = Arc::clone(&proxy);
            tokio::spawn(async move {
                let _ = proxy.handle(stream, peer).await;
            });
        }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let local = stream.local_addr()?;
        let mut tls = self.acceptor.accept(stream).await?;
        let principal = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| uri_san(leaf))
            .unwrap_or_default();
        let decision = match connect_unix(&self.authz_socket).await {
            Ok(mut client) => match client.check(check_request(peer, local, &principal)).await {
                Ok(response) => {
                    let response = response.into_inner();
                    if is_allowed(&response) {
                        ProxyRecord::Allowed
                    } else {
                        ProxyRecord::Denied(
                            response
                                .status
                                .map(|status| status.message)
                                .unwrap_or_default(),
                        )
                    }
                }
                Err(status) => ProxyRecord::Denied(format!("Check failed: {status}")),
            },
            Err(error) => ProxyRecord::Denied(format!("Check unreachable: {error}")),
        };
        self.records
            .lock()
            .expect("records lock")
            .insert(peer, decision.clone());
        if decision != ProxyRecord::Allowed {
            // Fail closed, as a proxy must: refuse the connection.
            let _ = tls.shutdown().await;
            return Ok(());
        }
        let socket = socket_in(&self.netns, Domain::for_address(self.upstream))?;
        let mut upstream = TcpSocket::from_std_stream(socket.into())
            .connect(self.upstream)
            .await?;
        tokio::io::copy_bidirectional(&mut tls, &mut upstream).await?;
        Ok(())
    }
}

/// The URI SAN of a DER certificate (the SPIFFE ID of an SVID).
fn uri_san(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let names = parsed.subject_alternative_name().ok()??;
    names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
}

/// What the proxy recorded for the client at `local`, waiting briefly for it: the record is
/// written once the Check answer arrives.
async fn record_of(records: Option<&ProxyRecords>, local: SocketAddr) -> Option<ProxyRecord> {
    let records = records?;
    for _ in 0..20 {
        if let Some(record) = records.lock().expect("records lock").get(&local) {
            return Some(record.clone());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

fn outcome(observed: MtlsExpectation, detail: String) -> ProbeOutcome {
    ProbeOutcome {
        observed,
        detail,
        close_reached_client: false,
    }
}

/// Connects over TLS, sends a line and classifies what happens.
async fn over_tls(
    client: &PodView<'_>,
    destination: SocketAddr,
    server_name: &str,
    config: ClientConfig,
    records: Option<&ProxyRecords>,
) -> ProbeOutcome {
    let stream = match timeout(WAIT, connect_from(client.netns, destination)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return outcome(MtlsExpectation::Dropped, format!("connect: {error}")),
        Err(_) => return outcome(MtlsExpectation::Dropped, "connect timed out".into()),
    };
    let Ok(local) = stream.local_addr() else {
        return outcome(MtlsExpectation::Dropped, "no local address".into());
    };
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(destination.ip().into());
    let mut tls = match timeout(WAIT, connector.connect(name, stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            return outcome(
                MtlsExpectation::Dropped,
                format!("TLS handshake failed: {error}"),
            );
        }
        Err(_) => return outcome(MtlsExpectation::Dropped, "TLS handshake timed out".into()),
    };
    let line = format!("mtls {:016x}", fastrand::u64(..));
    let expected = format!("{server_name} TCP ");
    let answer = async {
        tls.write_all(format!("{line}\n").as_bytes()).await?;
        let mut lines = BufReader::new(&mut tls).lines();
        lines.next_line().await
    };
    let answered = timeout(WAIT, answer).await;
    let record = record_of(records, local).await;
    match (answered, record) {
        (Ok(Ok(Some(text))), Some(ProxyRecord::Allowed))
            if text.starts_with(&expected) && text.ends_with(&line) =>
        {
            outcome(MtlsExpectation::Allowed, format!("answered {text:?}"))
        }
        (answered, Some(ProxyRecord::Denied(reason))) => ProbeOutcome {
            observed: MtlsExpectation::Denied,
            detail: format!("identity check: {reason}"),
            close_reached_client: matches!(answered, Ok(Ok(None) | Err(_))),
        },
        (Ok(Ok(Some(text))), record) => outcome(
            MtlsExpectation::Allowed,
            format!("unexpected answer {text:?} (proxy record {record:?})"),
        ),
        (answered, record) => outcome(
            MtlsExpectation::Dropped,
            format!("no answer ({answered:?}), proxy record {record:?}"),
        ),
    }
}

/// Connects, sends a plaintext line and classifies what happens.
async fn plaintext(
    client: &PodView<'_>,
    destination: SocketAddr,
    server_name: &str,
    records: Option<&ProxyRecords>,
) -> ProbeOutcome {
    let stream = match timeout(WAIT, connect_from(client.netns, destination)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return outcome(MtlsExpectation::Dropped, format!("connect: {error}")),
        Err(_) => return outcome(MtlsExpectation::Dropped, "connect timed out".into()),
    };
    let (reader, mut writer) = stream.into_split();
    let line = format!("plaintext {:016x}", fastrand::u64(..));
    let answer = async {
        writer.write_all(format!("{line}\n").as_bytes()).await?;
        BufReader::new(reader).lines().next_line().await
    };
    match timeout(WAIT, answer).await {
        Ok(Ok(Some(text))) if text.starts_with(&format!("{server_name} TCP ")) => {
            outcome(MtlsExpectation::Allowed, format!("answered {text:?}"))
        }
        // A TLS proxy that reads a plaintext line answers with an alert or a close.
        Ok(Ok(other)) if records.is_some() => outcome(
            MtlsExpectation::Denied,
            format!("the proxy rejected plaintext: {other:?}"),
        ),
        Ok(result) => outcome(MtlsExpectation::Dropped, format!("no answer: {result:?}")),
        Err(_) => outcome(
            MtlsExpectation::Dropped,
            "no answer: the payload never arrived".into(),
        ),
    }
}
