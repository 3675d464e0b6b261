//! The cluster DNS: a server a model pod with `dns: true` runs on its container ports `dns`
//! (53/UDP) and `dns-tcp` (53/TCP), named as `CoreDNS` names them, answering for the Services
//! and pods of the scenario the way `CoreDNS`'s `kubernetes` plugin does; and the client side of
//! the `resolve` step.
//!
//! Names: `<service>.<namespace>.svc.cluster.local` has the Service's `ClusterIPs` (A for the
//! IPv4 one, AAAA for the IPv6 one), `<address with dashes>.<namespace>.pod.cluster.local` a
//! published pod's address (`10-244-0-11.web.pod.cluster.local`, `fd00-10-244--b.web.pod...`).
//! A name that has addresses but none of the asked type gets an empty answer (NOERROR); any
//! other name is NXDOMAIN (there is no upstream to forward to). Messages are RFC 1035's, over
//! UDP, and over TCP with the two-byte length prefix; the wire format is `hickory-proto`'s.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};
use socket2::{Domain, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    time::timeout,
};

use crate::{
    netns::Netns,
    probe::ATTEMPT_TIMEOUT,
    scenario::ContainerPort,
    scenario::{Protocol, ResolveExpectation},
    services::{PodEndpoint, Service},
};

/// The name of the container port a DNS pod serves DNS over UDP on.
pub const UDP_PORT_NAME: &str = "dns";
/// The name of the container port a DNS pod serves DNS over TCP on.
pub const TCP_PORT_NAME: &str = "dns-tcp";
/// The port DNS pods serve on, and the port of the DNS Service a `resolve` step queries.
pub const SERVICE_PORT: u16 = 53;
/// The cluster's domain.
const CLUSTER_DOMAIN: &str = "cluster.local";
/// `CoreDNS`'s default TTL for the `kubernetes` plugin's answers.
const TTL: u32 = 5;
/// The largest UDP message a server or client reads.
const MAX_UDP: usize = 4096;

/// The container ports `dns: true` gives a pod, as `CoreDNS`'s Deployment declares them.
#[must_use]
pub fn container_ports() -> [ContainerPort; 2] {
    [
        ContainerPort {
            name: Some(UDP_PORT_NAME.to_owned()),
            container_port: SERVICE_PORT,
            protocol: Protocol::Udp,
        },
        ContainerPort {
            name: Some(TCP_PORT_NAME.to_owned()),
            container_port: SERVICE_PORT,
            protocol: Protocol::Tcp,
        },
    ]
}

/// The names the cluster DNS knows, shared by every DNS server of a scenario and replaced
/// whenever the Services or pods change. Keys are lowercase, without the final dot.
#[derive(Clone, Debug, Default)]
pub struct Zone(Arc<RwLock<HashMap<String, Vec<IpAddr>>>>);

impl Zone {
    /// Replaces every record with those of `services` and `pods` as they are now.
    pub fn update<'a>(
        &self,
        services: impl IntoIterator<Item = &'a Service>,
        pods: &[PodEndpoint<'_>],
    ) {
        let mut records: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for service in services {
            records
                .entry(service_name(&service.spec.namespace, &service.spec.name))
                .or_default()
                .extend(service.cluster_ips.all());
        }
        for pod in pods {
            for address in pod.addresses.all() {
                records
                    .entry(pod_name(&pod.spec.namespace, address))
                    .or_default()
                    .push(address);
            }
        }
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = records;
    }

    fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// `<service>.<namespace>.svc.cluster.local`.
#[must_use]
pub fn service_name(namespace: &str, service: &str) -> String {
    format!("{service}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// `<address, dots and colons turned into dashes>.<namespace>.pod.cluster.local`.
#[must_use]
pub fn pod_name(namespace: &str, address: IpAddr) -> String {
    let dashed = address.to_string().replace(['.', ':'], "-");
    format!("{dashed}.{namespace}.pod.{CLUSTER_DOMAIN}")
}

/// A name written in a scenario, as an absolute DNS name.
pub fn parse_name(name: &str) -> Result<Name, String> {
    let absolute = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&absolute).map_err(|error| format!("{name:?} is not a DNS name: {error}"))
}

fn zone_key(name: &Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_owned()
}

/// The server's answer to the message in `request`; `None` when it is no DNS message at all.
fn respond(zone: &Zone, request: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_authoritative(true);
    let code = match (request.op_code(), request.queries()) {
        (OpCode::Query, [query]) => {
            response.add_query(query.clone());
            match zone.lookup(&zone_key(query.name())) {
                None => ResponseCode::NXDomain,
                Some(addresses) => {
                    for address in addresses {
                        let data = match (query.query_type(), address) {
                            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                            _ => continue,
                        };
                        response.add_answer(Record::from_rdata(query.name().clone(), TTL, data));
                    }
                    ResponseCode::NoError
                }
            }
        }
        (OpCode::Query, _) => ResponseCode::FormErr,
        _ => ResponseCode::NotImp,
    };
    response.set_response_code(code);
    response.to_vec().ok()
}

/// Answers queries on a UDP socket (a pod's `dns` port).
pub async fn serve_udp(socket: UdpSocket, zone: Zone) {
    let mut buffer = vec![0u8; MAX_UDP];
    loop {
        let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        if let Some(answer) = respond(&zone, &buffer[..length]) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

/// Answers queries on TCP connections (a pod's `dns-tcp` port): each message is preceded by
/// its length in two bytes, and a connection may carry several.
pub async fn serve_tcp(listener: TcpListener, zone: Zone) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            while let Ok(request) = read_framed(&mut stream).await {
                let Some(answer) = respond(&zone, &request) else {
                    return;
                };
                if write_framed(&mut stream, &answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let length = stream.read_u16().await?;
    let mut message = vec![0u8; usize::from(length)];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// What a query got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR, with the addresses of the asked type (maybe none).
    Addresses(Vec<IpAddr>),
    NxDomain,
    /// Any other response code.
    Failed(ResponseCode),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addresses(addresses) if addresses.is_empty() => f.write_str("no address"),
            Self::Addresses(addresses) => {
                let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                f.write_str(&addresses.join(", "))
            }
            Self::NxDomain => f.write_str("NXDOMAIN"),
            Self::Failed(code) => write!(f, "{code}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no answer within {}s", ATTEMPT_TIMEOUT.as_secs_f32())]
    Timeout,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("bad answer: {0}")]
    Malformed(String),
}

/// Whether what a `resolve` step got is what it expects: `blocked` means no answer at all.
#[must_use]
pub fn meets(expect: ResolveExpectation, got: &Result<Answer, ResolveError>) -> bool {
    match (expect, got) {
        (ResolveExpectation::Address(address), Ok(Answer::Addresses(addresses))) => {
            addresses.as_slice() == [address]
        }
        (ResolveExpectation::NxDomain, Ok(Answer::NxDomain))
        | (ResolveExpectation::Blocked, Err(_)) => true,
        _ => false,
    }
}

/// The query type a `resolve` step asks: AAAA when it expects an IPv6 address, A otherwise.
#[must_use]
pub fn query_type(expect: ResolveExpectation) -> RecordType {
    match expect {
        ResolveExpectation::Address(IpAddr::V6(_)) => RecordType::AAAA,
        _ => RecordType::A,
    }
}

fn query_message(id: u16, name: &Name, kind: RecordType) -> Result<Vec<u8>, ResolveError> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name.clone(), kind));
    message
        .to_vec()
        .map_err(|error| ResolveError::Malformed(error.to_string()))
}

/// Reads the answer to query `id` for `name`/`kind`; `Ok(None)` for a message that answers
/// another query (a late answer to an earlier one).
fn parse_answer(
    id: u16,
    name: &Name,
    kind: RecordType,
    bytes: &[u8],
) -> Result<Option<Answer>, ResolveError> {
    let message =
        Message::from_vec(bytes).map_err(|error| ResolveError::Malformed(error.to_string()))?;
    if message.message_type() != MessageType::Response || message.id() != id {
        return Ok(None);
    }
    let asked = match message.queries() {
        [query] => query.name().to_lowercase() == name.to_lowercase() && query.query_type() == kind,
        _ => false,
    };
    if !asked {
        return Err(ResolveError::Malformed(format!(
            "the answer does not repeat the question ({:?})",
            message.queries()
        )));
    }
    Ok(Some(match message.response_code() {
        ResponseCode::NoError => Answer::Addresses(
            message
                .answers()
                .iter()
                .filter_map(|record| match record.data() {
                    RData::A(a) if kind == RecordType::A => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) if kind == RecordType::AAAA => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect(),
        ),
        ResponseCode::NXDomain => Answer::NxDomain,
        other => Answer::Failed(other),
    }))
}

/// Asks `server` for `name`'s records of `kind` from `netns`, over UDP or TCP, within the
/// attempt timeout of probes.
pub async fn resolve(
    netns: &Netns,
    server: SocketAddr,
    protocol: Protocol,
    name: &Name,
    kind: RecordType,
) -> Result<Answer, ResolveError> {
    let id = fastrand::u16(..);
    let query = query_message(id, name, kind)?;
    let attempt = async {
        match protocol {
            Protocol::Udp => {
                let socket = netns.socket(Domain::for_address(server), Type::DGRAM, None)?;
                let socket = UdpSocket::from_std(socket.into())?;
                socket.connect(server).await?;
                socket.send(&query).await?;
                let mut buffer = vec![0u8; MAX_UDP];
                loop {
                    let length = socket.recv(&mut buffer).await?;
                    if let Some(answer) = parse_answer(id, name, kind, &buffer[..length])? {
                        return Ok(answer);
                    }
                }
            }
            Protocol::Tcp => {
                let socket = netns.socket(Domain::for_address(server), Type::STREAM, None)?;
                let mut stream = TcpSocket::from_std_stream(socket.into())
                    .connect(server)
                    .await?;
                write_framed(&mut stream, &query).await?;
                loop {
                    let answer = read_framed(&mut stream).await?;
                    if let Some(answer) = parse_answer(id, name, kind, &answer)? {
                        return Ok(answer);
                    }
                }
            }
            Protocol::Sctp => Err(ResolveError::Io(io::Error::from(
                io::ErrorKind::Unsupported,
            ))),
        }
    };
    timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .unwrap_or(Err(ResolveError::Timeout))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::{
        mtls::PodIdentity,
        node::Addresses,
        scenario::{IpFamily, Labels, PodSpec},
        services::{ServiceRegistry, ServiceSpec, parse_service},
    };

    fn zone() -> Zone {
        let zone = Zone::default();
        let mut registry = ServiceRegistry::new(&[IpFamily::IPv4, IpFamily::IPv6]);
        let spec: ServiceSpec = parse_service(
            "kube-system/kube-dns",
            serde_yaml::from_str(
                "apiVersion: v1\nkind: Service\nmetadata: { name: kube-dns }\nspec: { selector: { k8s-app: kube-dns }, clusterIPs: [10.96.0.10, 'fd00:10:96::a'], ports: [ { port: 53, protocol: UDP } ] }",
            )
            .unwrap(),
        )
        .unwrap();
        let service = registry.create(spec).unwrap().clone();
        let pod = PodSpec {
            namespace: "web".to_owned(),
            name: "a".to_owned(),
            labels: Labels::new(),
            ports: Vec::new(),
            identity: PodIdentity::default(),
        };
        let addresses = Addresses {
            v4: Some(Ipv4Addr::new(10, 244, 0, 11)),
            v6: Some("fd00:10:244::b".parse().unwrap()),
        };
        zone.update(
            [&service],
            &[PodEndpoint {
                spec: &pod,
                addresses: &addresses,
            }],
        );
        zone
    }

    fn ask(zone: &Zone, name: &str, kind: RecordType) -> Answer {
        let name = parse_name(name).unwrap();
        let answer = respond(zone, &query_message(7, &name, kind).unwrap()).unwrap();
        parse_answer(7, &name, kind, &answer).unwrap().unwrap()
    }

    #[test]
    fn services_and_pods_resolve_as_coredns_names_them() {
        let zone = zone();
        let v4 = |text: &str| IpAddr::V4(text.parse().unwrap());
        assert_eq!(
            ask(
                &zone,
                "kube-dns.kube-system.svc.cluster.local",
                RecordType::A
            ),
            Answer::Addresses(vec![v4("10.96.0.10")])
        );
        // Case-insensitive, with or without the final dot.
        assert_eq!(
            ask(
                &zone,
                "Kube-DNS.kube-system.svc.cluster.local.",
                RecordType::A
            ),
            Answer::Addresses(vec![v4("10.96.0.10")])
        );
        assert_eq!(
            ask(
                &zone,
                "kube-dns.kube-system.svc.cluster.local",
                RecordType::AAAA
            ),
            Answer::Addresses(vec![IpAddr::V6(Ipv6Addr::new(
                0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xa
            ))])
        );
        assert_eq!(
            ask(&zone, "10-244-0-11.web.pod.cluster.local", RecordType::A),
            Answer::Addresses(vec![v4("10.244.0.11")])
        );
        assert_eq!(
            ask(
                &zone,
                "fd00-10-244--b.web.pod.cluster.local",
                RecordType::AAAA
            ),
            Answer::Addresses(vec!["fd00:10:244::b".parse().unwrap()])
        );
        // A known name without records of the type: NOERROR, no answer.
        assert_eq!(
            ask(&zone, "10-244-0-11.web.pod.cluster.local", RecordType::MX),
            Answer::Addresses(Vec::new())
        );
        assert_eq!(
            ask(&zone, "nope.kube-system.svc.cluster.local", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(ask(&zone, "example.com", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn garbage_and_answers_are_not_answered() {
        let zone = zone();
        assert!(respond(&zone, b"\x00\x01").is_none());
        let name = parse_name("kube-dns.kube-system.svc.cluster.local").unwrap();
        let answer = respond(&zone, &query_message(1, &name, RecordType::A).unwrap()).unwrap();
        assert!(
            respond(&zone, &answer).is_none(),
            "answers are never answered"
        );
    }

    #[test]
    fn answers_to_other_queries_are_skipped_or_rejected() {
        let zone = zone();
        let name = parse_name("kube-dns.kube-system.svc.cluster.local").unwrap();
        let answer = respond(&zone, &query_message(1, &name, RecordType::A).unwrap()).unwrap();
        assert!(
            parse_answer(2, &name, RecordType::A, &answer)
                .unwrap()
                .is_none()
        );
        let other = parse_name("other.svc.cluster.local").unwrap();
        assert!(parse_answer(1, &other, RecordType::A, &answer).is_err());
        assert!(parse_answer(1, &name, RecordType::A, b"junk").is_err());
    }

    #[test]
    fn expectations() {
        let address = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let found = Ok(Answer::Addresses(vec![address]));
        assert!(meets(ResolveExpectation::Address(address), &found));
        assert!(!meets(ResolveExpectation::NxDomain, &found));
        assert!(!meets(ResolveExpectation::Blocked, &found));
        let two = Ok(Answer::Addresses(vec![address, address]));
        assert!(!meets(ResolveExpectation::Address(address), &two));
        assert!(meets(ResolveExpectation::NxDomain, &Ok(Answer::NxDomain)));
        assert!(!meets(ResolveExpectation::Blocked, &Ok(Answer::NxDomain)));
        assert!(meets(
            ResolveExpectation::Blocked,
            &Err(ResolveError::Timeout)
        ));
        assert!(!meets(
            ResolveExpectation::Address(address),
            &Err(ResolveError::Timeout)
        ));
        assert_eq!(
            query_type(ResolveExpectation::Address("fd00::1".parse().unwrap())),
            RecordType::AAAA
        );
        assert_eq!(query_type(ResolveExpectation::Blocked), RecordType::A);
    }
}
