//! From API objects (k8s-openapi types, as the API server serves them) to the validated model.
//!
//! Validation follows the API server's: an object it would reject is rejected here with the
//! object and the field named, so the caller can keep enforcing the last good version.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1 as core,
        discovery::v1 as discovery,
        networking::v1::{self as networking, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1 as meta, util::intstr::IntOrString},
};

use crate::{
    cluster::{
        ALLOWED_PRINCIPALS_ANNOTATION, AddressType, ContainerPort, ENFORCEMENT_ANNOTATION,
        EndpointPort, EndpointSlice, EndpointSliceRef, Enforcement, MTLS_EXEMPT_PORTS_ANNOTATION,
        MTLS_LABEL, MTLS_STRICT, Namespace, NetworkPolicy, Node, Peer, Pod, PodMtls, PodRef,
        PolicyRef, PolicyTypes, PortRef, PortSpec, Protocol, Rule, Service, ServiceEndpoint,
        ServicePort, ServiceRef, ServiceType,
    },
    selector::{LabelSelector, Requirement},
};

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An object the API server would reject.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq, Hash)]
#[error("{kind} {object}: {field}: {problem}")]
pub struct ModelError {
    /// `Pod`, `Namespace`, `NetworkPolicy`, `Service`, `EndpointSlice`, `Node` or
    /// `ClusterNetworkPolicy`.
    pub kind: &'static str,
    /// `namespace/name`, or the name of a cluster-scoped object.
    pub object: String,
    /// The field path, as `kubectl explain` spells it.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The object a validation error names.
pub(crate) struct Ctx<'a> {
    pub(crate) kind: &'static str,
    pub(crate) object: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn error(&self, field: impl Into<String>, problem: impl Into<String>) -> ModelError {
        ModelError {
            kind: self.kind,
            object: self.object.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

pub(crate) fn name_of(
    kind: &'static str,
    metadata: &meta::ObjectMeta,
) -> Result<String, ModelError> {
    metadata
        .name
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| ModelError {
            kind,
            object: "<unnamed>".into(),
            field: "metadata.name".into(),
            problem: "is required".into(),
        })
}

fn namespace_of(
    kind: &'static str,
    metadata: &meta::ObjectMeta,
) -> Result<(String, String), ModelError> {
    let name = name_of(kind, metadata)?;
    let namespace = metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    Ok((namespace, name))
}

/// Validates a Namespace.
pub fn namespace(object: &core::Namespace) -> Result<Namespace, ModelError> {
    let name = name_of("Namespace", &object.metadata)?;
    let mut labels = object.metadata.labels.clone().unwrap_or_default();
    // The API server sets this label on every namespace and does not let it be changed.
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
    Ok(Namespace {
        name,
        labels: labels.into(),
    })
}

/// Validates a Node: its name, labels and the IP addresses of `status.addresses`.
pub fn node(object: &core::Node) -> Result<Node, ModelError> {
    let name = name_of("Node", &object.metadata)?;
    let ctx = Ctx {
        kind: "Node",
        object: &name,
    };
    let mut addresses = Vec::new();
    let listed = object
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_ref());
    for (index, address) in listed.into_iter().flatten().enumerate() {
        // `Hostname`, `InternalDNS` and `ExternalDNS` entries hold names, not addresses.
        if !matches!(address.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        let ip = parse_ip(
            &ctx,
            &format!("status.addresses[{index}].address"),
            &address.address,
        )?;
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    Ok(Node {
        name,
        labels: object.metadata.labels.clone().unwrap_or_default(),
        addresses,
    })
}

/// Validates a Pod.
pub fn pod(object: &core::Pod) -> Result<Pod, ModelError> {
    let (namespace, name) = namespace_of("Pod", &object.metadata)?;
    let display = format!("{namespace}/{name}");
    let ctx = Ctx {
        kind: "Pod",
        object: &display,
    };
    let spec = object.spec.as_ref();
    let status = object.status.as_ref();

    let mut ips = Vec::new();
    if let Some(pod_ips) = status.and_then(|status| status.pod_ips.as_ref()) {
        for (index, pod_ip) in pod_ips.iter().enumerate() {
            ips.push(parse_ip(
                &ctx,
                &format!("status.podIPs[{index}].ip"),
                &pod_ip.ip,
            )?);
        }
    }
    if let Some(pod_ip) = status.and_then(|status| status.pod_ip.as_ref()) {
        let ip = parse_ip(&ctx, "status.podIP", pod_ip)?;
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    // Terminated pods give their IPs back to the node's allocator.
    let terminated = status
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    if terminated {
        ips.clear();
    }
    ips.shrink_to_fit();

    let mut ports = Vec::new();
    for (c, container) in spec
        .map(|spec| spec.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{c}].ports[{p}]");
            let number = port_number(&ctx, &format!("{field}.containerPort"), port.container_port)?;
            let protocol = protocol(&ctx, &field, port.protocol.as_deref())?;
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: number,
                protocol,
            });
        }
    }

    let labels = object.metadata.labels.clone().unwrap_or_default();
    let mtls = pod_mtls(&ctx, &labels, object.metadata.annotations.as_ref());
    Ok(Pod {
        id: PodRef { namespace, name },
        labels: labels.into(),
        node_name: spec
            .and_then(|spec| spec.node_name.as_deref())
            .map(Arc::from),
        ips,
        ports: ports.into(),
        host_network: spec.and_then(|spec| spec.host_network).unwrap_or(false),
        service_account: Arc::from(
            spec.and_then(|spec| spec.service_account_name.as_deref())
                .unwrap_or("default"),
        ),
        mtls: mtls.into(),
    })
}

/// Reads the pod's mTLS label and annotations. Never fails: a bad entry is reported and left
/// out, so the pod keeps being enforced, fail-closed (a bad port is not exempt, a bad
/// principal admits no one).
fn pod_mtls(ctx: &Ctx<'_>, labels: &ApiLabels, annotations: Option<&ApiLabels>) -> PodMtls {
    let mut mtls = PodMtls {
        strict_label: labels.get(MTLS_LABEL).map(String::as_str) == Some(MTLS_STRICT),
        ..PodMtls::default()
    };
    let Some(annotations) = annotations else {
        return mtls;
    };
    if let Some(ports) = annotations.get(MTLS_EXEMPT_PORTS_ANNOTATION) {
        let field = format!("metadata.annotations[{MTLS_EXEMPT_PORTS_ANNOTATION}]");
        for entry in list_entries(ports) {
            match entry.parse::<u16>() {
                Ok(port) if port != 0 => {
                    mtls.exempt_ports.insert(port);
                }
                _ => mtls.problems.push(ctx.error(
                    field.clone(),
                    format!("{entry:?} is not a port (1-65535); that port stays mTLS-strict"),
                )),
            }
        }
    }
    if let Some(principals) = annotations.get(ALLOWED_PRINCIPALS_ANNOTATION) {
        let field = format!("metadata.annotations[{ALLOWED_PRINCIPALS_ANNOTATION}]");
        let mut allowed = Vec::new();
        for entry in list_entries(principals) {
            match spiffe_id_problem(entry) {
                None => allowed.push(entry.to_owned()),
                Some(problem) => mtls.problems.push(ctx.error(
                    field.clone(),
                    format!("{entry:?} {problem}; it admits no one"),
                )),
            }
        }
        mtls.allowed_principals = Some(allowed);
    }
    mtls
}

/// The non-empty entries of a comma-separated annotation value (whitespace around them is
/// ignored, so the list may be spread over lines).
fn list_entries(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// What is wrong with `id` as an allowed-principal pattern, if anything: it must be
/// `spiffe://<trust domain>/<path>`, and `*` may only be a whole last path segment.
fn spiffe_id_problem(id: &str) -> Option<&'static str> {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Some("does not start with spiffe://");
    };
    let Some((trust_domain, path)) = rest.split_once('/') else {
        return Some("has no path after the trust domain");
    };
    if trust_domain.is_empty() || trust_domain.contains('*') {
        return Some("has no literal trust domain");
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.iter().any(|segment| segment.is_empty()) {
        return Some("has an empty path segment");
    }
    let (last, leading) = segments.split_last().unwrap_or((&"", &[]));
    if leading.iter().any(|segment| segment.contains('*')) || (last.contains('*') && *last != "*") {
        return Some("may use * only as the whole last path segment");
    }
    None
}

/// Validates a NetworkPolicy and applies the API server's defaulting of `policyTypes`.
pub fn network_policy(object: &networking::NetworkPolicy) -> Result<NetworkPolicy, ModelError> {
    let (namespace, name) = namespace_of("NetworkPolicy", &object.metadata)?;
    let display = format!("{namespace}/{name}");
    let ctx = Ctx {
        kind: "NetworkPolicy",
        object: &display,
    };
    let spec = object.spec.clone().unwrap_or_default();

    let pod_selector = selector(&ctx, "spec.podSelector", spec.pod_selector.as_ref())?;
    let ingress = rules(
        &ctx,
        "spec.ingress",
        "from",
        spec.ingress.unwrap_or_default(),
        |rule| (rule.from, rule.ports),
    )?;
    let egress = rules(
        &ctx,
        "spec.egress",
        "to",
        spec.egress.unwrap_or_default(),
        |rule| (rule.to, rule.ports),
    )?;

    let policy_types = match spec.policy_types.as_deref() {
        // Defaulting, as pkg/apis/networking/v1/defaults.go does it: Ingress always, Egress only
        // when there are egress rules (an empty `egress: []` does not count).
        None | Some([]) => PolicyTypes {
            ingress: true,
            egress: !egress.is_empty(),
        },
        Some(types) => {
            let mut policy_types = PolicyTypes {
                ingress: false,
                egress: false,
            };
            for (index, policy_type) in types.iter().enumerate() {
                match policy_type.as_str() {
                    "Ingress" => policy_types.ingress = true,
                    "Egress" => policy_types.egress = true,
                    other => {
                        return Err(ctx.error(
                            format!("spec.policyTypes[{index}]"),
                            format!("{other:?} is neither Ingress nor Egress"),
                        ));
                    }
                }
            }
            policy_types
        }
    };

    let enforcement = match object
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(ENFORCEMENT_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("enforce") => Enforcement::Enforce,
        Some("audit") => Enforcement::Audit,
        Some(other) => {
            return Err(ctx.error(
                format!("metadata.annotations[{ENFORCEMENT_ANNOTATION}]"),
                format!("{other:?} is neither \"enforce\" nor \"audit\""),
            ));
        }
    };

    Ok(NetworkPolicy {
        id: PolicyRef { namespace, name },
        pod_selector,
        policy_types,
        enforcement,
        ingress,
        egress,
    })
}

/// Validates a Service and applies the API server's defaulting (type `ClusterIP`, protocol
/// TCP, `targetPort` equal to `port`).
pub fn service(object: &core::Service) -> Result<Service, ModelError> {
    let (namespace, name) = namespace_of("Service", &object.metadata)?;
    let display = format!("{namespace}/{name}");
    let ctx = Ctx {
        kind: "Service",
        object: &display,
    };
    let empty = core::ServiceSpec::default();
    let spec = object.spec.as_ref().unwrap_or(&empty);

    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return Err(ctx.error("spec.type", format!("unknown Service type {other:?}")));
        }
    };

    let mut cluster_ips = Vec::new();
    if service_type != ServiceType::ExternalName {
        // `clusterIPs` holds `clusterIP` as its first entry when both are set.
        let listed: Vec<(String, &str)> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(index, ip)| (format!("spec.clusterIPs[{index}]"), ip.as_str()))
                .collect(),
            (_, Some(ip)) => vec![("spec.clusterIP".to_owned(), ip.as_str())],
            _ => Vec::new(),
        };
        for (field, text) in listed {
            // "None" is a headless Service, "" one whose address is not allocated yet: neither
            // has an address to translate.
            if text != "None" && !text.is_empty() {
                cluster_ips.push(parse_ip(&ctx, &field, text)?);
            }
        }
    }

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, text)| parse_ip(&ctx, &format!("spec.externalIPs[{index}]"), text))
        .collect::<Result<_, _>>()?;

    let mut load_balancer_ips = Vec::new();
    let ingress = object
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref());
    for (index, point) in ingress.into_iter().flatten().enumerate() {
        if let Some(text) = &point.ip {
            let field = format!("status.loadBalancer.ingress[{index}].ip");
            load_balancer_ips.push(parse_ip(&ctx, &field, text)?);
        }
    }

    let has_node_ports = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{index}]");
        let number = port_number(&ctx, &format!("{field}.port"), port.port)?;
        let protocol = protocol(&ctx, &field, port.protocol.as_deref())?;
        let target_port = match &port.target_port {
            None => PortRef::Number(number),
            Some(target) => port_ref(&ctx, &format!("{field}.targetPort"), target)?,
        };
        let node_port = match port.node_port {
            // Unset, or 0: the API server allocates one (the object as read has none yet).
            None | Some(0) => None,
            Some(_) if !has_node_ports => {
                return Err(ctx.error(
                    format!("{field}.nodePort"),
                    format!("may not be set for type {service_type}"),
                ));
            }
            Some(node_port) => Some(port_number(&ctx, &format!("{field}.nodePort"), node_port)?),
        };
        ports.push(ServicePort {
            name: port.name.clone().filter(|name| !name.is_empty()),
            protocol,
            port: number,
            target_port,
            node_port,
        });
    }

    Ok(Service {
        id: ServiceRef { namespace, name },
        service_type,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
    })
}

/// Validates an EndpointSlice.
pub fn endpoint_slice(object: &discovery::EndpointSlice) -> Result<EndpointSlice, ModelError> {
    let (namespace, name) = namespace_of("EndpointSlice", &object.metadata)?;
    let display = format!("{namespace}/{name}");
    let ctx = Ctx {
        kind: "EndpointSlice",
        object: &display,
    };
    let service_name = object
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|service| !service.is_empty())
        .ok_or_else(|| {
            ctx.error(
                format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                "is required: the slice belongs to no Service",
            )
        })?;
    let address_type = match object.address_type.as_str() {
        "IPv4" => AddressType::Ipv4,
        "IPv6" => AddressType::Ipv6,
        "FQDN" => AddressType::Fqdn,
        other => {
            return Err(ctx.error(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ));
        }
    };

    let mut endpoints = Vec::new();
    for (index, endpoint) in object.endpoints.iter().enumerate() {
        let field = format!("endpoints[{index}]");
        let mut addresses = Vec::new();
        if address_type != AddressType::Fqdn {
            for (a, text) in endpoint.addresses.iter().enumerate() {
                let address_field = format!("{field}.addresses[{a}]");
                let address = parse_ip(&ctx, &address_field, text)?;
                if address.is_ipv4() != (address_type == AddressType::Ipv4) {
                    return Err(ctx.error(
                        address_field,
                        format!("{address} is not of addressType {}", object.address_type),
                    ));
                }
                addresses.push(address);
            }
        }
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .and_then(|target| {
                target.name.clone().map(|pod_name| PodRef {
                    namespace: target
                        .namespace
                        .clone()
                        .unwrap_or_else(|| namespace.clone()),
                    name: pod_name,
                })
            });
        endpoints.push(ServiceEndpoint {
            addresses,
            ready: endpoint
                .conditions
                .as_ref()
                .and_then(|conditions| conditions.ready)
                .unwrap_or(true),
            pod,
            node_name: endpoint.node_name.clone(),
        });
    }

    let mut ports = Vec::new();
    for (index, port) in object.ports.iter().flatten().enumerate() {
        let field = format!("ports[{index}]");
        let Some(number) = port.port else {
            continue;
        };
        ports.push(EndpointPort {
            name: port.name.clone().filter(|name| !name.is_empty()),
            protocol: protocol(&ctx, &field, port.protocol.as_deref())?,
            port: port_number(&ctx, &format!("{field}.port"), number)?,
        });
    }

    Ok(EndpointSlice {
        id: EndpointSliceRef {
            namespace: namespace.clone(),
            name,
        },
        service: ServiceRef {
            namespace,
            name: service_name.clone(),
        },
        address_type,
        endpoints,
        ports,
    })
}

/// A port by number or by name, as `targetPort` spells it.
fn port_ref(ctx: &Ctx<'_>, field: &str, port: &IntOrString) -> Result<PortRef, ModelError> {
    match port {
        IntOrString::Int(number) => Ok(PortRef::Number(port_number(ctx, field, *number)?)),
        IntOrString::String(text) => match text.parse::<i32>() {
            // The API server stores "80" as a name; it is not a valid IANA_SVC_NAME, so reject it.
            Ok(_) => Err(ctx.error(field, format!("{text:?} is a number written as a string"))),
            Err(_) if valid_port_name(text) => Ok(PortRef::Name(text.clone())),
            Err(_) => Err(ctx.error(field, format!("{text:?} is not a valid port name"))),
        },
    }
}

fn rules<R>(
    ctx: &Ctx<'_>,
    field: &str,
    peers_field: &str,
    rules: Vec<R>,
    split: impl Fn(
        R,
    ) -> (
        Option<Vec<NetworkPolicyPeer>>,
        Option<Vec<NetworkPolicyPort>>,
    ),
) -> Result<Vec<Rule>, ModelError> {
    rules
        .into_iter()
        .enumerate()
        .map(|(index, rule)| {
            let (peers, ports) = split(rule);
            let rule_field = format!("{field}[{index}]");
            let peers = peers
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(p, peer)| self::peer(ctx, &format!("{rule_field}.{peers_field}[{p}]"), peer))
                .collect::<Result<_, _>>()?;
            let ports = ports
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(p, port)| port_spec(ctx, &format!("{rule_field}.ports[{p}]"), port))
                .collect::<Result<_, _>>()?;
            Ok(Rule { peers, ports })
        })
        .collect()
}

fn peer(ctx: &Ctx<'_>, field: &str, peer: &NetworkPolicyPeer) -> Result<Peer, ModelError> {
    match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
        (Some(block), None, None) => {
            let cidr = parse_cidr(ctx, &format!("{field}.ipBlock.cidr"), &block.cidr)?;
            let mut except = Vec::new();
            for (index, text) in block.except.iter().flatten().enumerate() {
                let except_field = format!("{field}.ipBlock.except[{index}]");
                let net = parse_cidr(ctx, &except_field, text)?;
                // The API server requires each except to lie strictly inside the cidr.
                if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
                    return Err(
                        ctx.error(except_field, format!("{net} is not strictly within {cidr}"))
                    );
                }
                except.push(net);
            }
            Ok(Peer::IpBlock { cidr, except })
        }
        (Some(_), _, _) => Err(ctx.error(
            field,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        (None, None, None) => Err(ctx.error(
            field,
            "must specify podSelector, namespaceSelector or ipBlock",
        )),
        (None, pods, namespaces) => Ok(Peer::Pods {
            pod_selector: pods
                .as_ref()
                .map(|selector_| selector(ctx, &format!("{field}.podSelector"), Some(selector_)))
                .transpose()?,
            namespace_selector: namespaces
                .as_ref()
                .map(|selector_| {
                    selector(ctx, &format!("{field}.namespaceSelector"), Some(selector_))
                })
                .transpose()?,
        }),
    }
}

fn port_spec(ctx: &Ctx<'_>, field: &str, port: &NetworkPolicyPort) -> Result<PortSpec, ModelError> {
    let protocol = protocol(ctx, field, port.protocol.as_deref())?;
    let number_or_name = port
        .port
        .as_ref()
        .map(|port| port_ref(ctx, &format!("{field}.port"), port))
        .transpose()?;
    let end_port = match (port.end_port, &number_or_name) {
        (None, _) => None,
        (Some(end), Some(PortRef::Number(start))) => {
            let end = port_number(ctx, &format!("{field}.endPort"), end)?;
            if end < *start {
                return Err(ctx.error(
                    format!("{field}.endPort"),
                    format!("{end} is below port {start}"),
                ));
            }
            Some(end)
        }
        (Some(_), _) => {
            return Err(ctx.error(format!("{field}.endPort"), "requires a numeric port"));
        }
    };
    Ok(PortSpec {
        protocol,
        port: number_or_name,
        end_port,
    })
}

fn valid_port_name(name: &str) -> bool {
    // IANA_SVC_NAME: at most 15 lowercase alphanumerics or '-', with a letter, no leading,
    // trailing or doubled '-'.
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

pub(crate) fn selector(
    ctx: &Ctx<'_>,
    field: &str,
    selector: Option<&meta::LabelSelector>,
) -> Result<LabelSelector, ModelError> {
    let Some(selector) = selector else {
        return Ok(LabelSelector::everything());
    };
    let mut requirements: Vec<Requirement> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| Requirement::In(key.clone(), vec![value.clone()]))
        .collect();
    for (index, expression) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("{field}.matchExpressions[{index}]");
        let values = expression.values.clone().unwrap_or_default();
        let key = expression.key.clone();
        let requirement = match expression.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(ctx.error(
                    format!("{field}.values"),
                    format!("must be non-empty for {}", expression.operator),
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(ctx.error(
                    format!("{field}.values"),
                    format!("must be empty for {}", expression.operator),
                ));
            }
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            other => {
                return Err(ctx.error(
                    format!("{field}.operator"),
                    format!("unknown operator {other:?}"),
                ));
            }
        };
        requirements.push(requirement);
    }
    Ok(LabelSelector { requirements })
}

/// The `protocol` field under `field`: TCP when unset, as the API server defaults it.
fn protocol(ctx: &Ctx<'_>, field: &str, name: Option<&str>) -> Result<Protocol, ModelError> {
    match name {
        None => Ok(Protocol::Tcp),
        Some(name) => Protocol::from_api(name).ok_or_else(|| {
            ctx.error(
                format!("{field}.protocol"),
                format!("unsupported protocol {name:?}"),
            )
        }),
    }
}

pub(crate) fn port_number(ctx: &Ctx<'_>, field: &str, number: i32) -> Result<u16, ModelError> {
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| ctx.error(field, format!("{number} is not a port (1-65535)")))
}

pub(crate) fn parse_ip(ctx: &Ctx<'_>, field: &str, text: &str) -> Result<IpAddr, ModelError> {
    text.parse()
        .map_err(|_| ctx.error(field, format!("{text:?} is not an IP address")))
}

pub(crate) fn parse_cidr(ctx: &Ctx<'_>, field: &str, text: &str) -> Result<IpNet, ModelError> {
    let net: IpNet = text
        .parse()
        .map_err(|_| ctx.error(field, format!("{text:?} is not a CIDR")))?;
    Ok(net.trunc())
}

/// Labels keyed as the API serves them.
pub type ApiLabels = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::NetworkPolicy as ApiPolicy;

    use std::net::IpAddr;

    use super::network_policy;
    use crate::cluster::{
        AddressType, EndpointPort, Peer, PodRef, PortRef, Protocol, ServiceEndpoint, ServicePort,
        ServiceRef, ServiceType,
    };

    fn policy(yaml: &str) -> ApiPolicy {
        serde_yaml::from_str(yaml).expect("test manifest parses")
    }

    fn pod(yaml: &str) -> k8s_openapi::api::core::v1::Pod {
        serde_yaml::from_str(yaml).expect("test manifest parses")
    }

    #[test]
    fn the_mtls_label_and_annotations_are_read() {
        let parsed = super::pod(&pod(
            "metadata:\n  name: a\n  namespace: x\n  labels: {netwarden.dev/mtls: strict}\n  annotations:\n    netwarden.dev/mtls-exempt-ports: '8080, 9090'\n    netwarden.dev/allowed-principals: 'spiffe://cluster.local/ns/x/sa/web, spiffe://cluster.local/ns/y/sa/*'\nspec: {serviceAccountName: api, containers: []}",
        ))
        .unwrap();
        assert!(parsed.mtls.strict_label);
        assert_eq!(
            parsed.mtls.exempt_ports.iter().copied().collect::<Vec<_>>(),
            [8080, 9090]
        );
        assert_eq!(
            parsed.mtls.allowed_principals.as_deref(),
            Some(
                &[
                    "spiffe://cluster.local/ns/x/sa/web".to_owned(),
                    "spiffe://cluster.local/ns/y/sa/*".to_owned()
                ][..]
            )
        );
        assert!(parsed.mtls.problems.is_empty());
        assert_eq!(parsed.service_account, "api".into());
    }

    #[test]
    fn a_pod_without_the_label_or_a_service_account_is_not_strict_and_runs_as_default() {
        let parsed = super::pod(&pod(
            "metadata: {name: a, namespace: x, labels: {netwarden.dev/mtls: permissive}}\nspec: {containers: []}",
        ))
        .unwrap();
        assert!(!parsed.mtls.strict_label);
        assert_eq!(parsed.mtls.allowed_principals, None);
        assert_eq!(parsed.service_account, "default".into());
    }

    #[test]
    fn invalid_annotation_entries_are_reported_and_fail_closed() {
        let parsed = super::pod(&pod(
            "metadata:\n  name: a\n  namespace: x\n  annotations:\n    netwarden.dev/mtls-exempt-ports: '80,http,0,70000'\n    netwarden.dev/allowed-principals: 'cluster.local/ns/x/sa/a,spiffe://cluster.local/ns/*/sa/a'\nspec: {containers: []}",
        ))
        .unwrap();
        assert_eq!(
            parsed.mtls.exempt_ports.iter().copied().collect::<Vec<_>>(),
            [80]
        );
        assert_eq!(parsed.mtls.allowed_principals, Some(vec![]));
        let messages: Vec<String> = parsed
            .mtls
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            messages,
            [
                "Pod x/a: metadata.annotations[netwarden.dev/mtls-exempt-ports]: \"http\" is not a port (1-65535); that port stays mTLS-strict",
                "Pod x/a: metadata.annotations[netwarden.dev/mtls-exempt-ports]: \"0\" is not a port (1-65535); that port stays mTLS-strict",
                "Pod x/a: metadata.annotations[netwarden.dev/mtls-exempt-ports]: \"70000\" is not a port (1-65535); that port stays mTLS-strict",
                "Pod x/a: metadata.annotations[netwarden.dev/allowed-principals]: \"cluster.local/ns/x/sa/a\" does not start with spiffe://; it admits no one",
                "Pod x/a: metadata.annotations[netwarden.dev/allowed-principals]: \"spiffe://cluster.local/ns/*/sa/a\" may use * only as the whole last path segment; it admits no one",
            ]
        );
    }

    fn service(yaml: &str) -> Result<crate::Service, crate::ModelError> {
        super::service(&serde_yaml::from_str(yaml).expect("test manifest parses"))
    }

    fn endpoint_slice(yaml: &str) -> Result<crate::EndpointSlice, crate::ModelError> {
        super::endpoint_slice(&serde_yaml::from_str(yaml).expect("test manifest parses"))
    }

    #[test]
    fn a_service_is_read_with_the_api_servers_defaults() {
        let parsed = service(
            "metadata: {name: web, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:96::10']
  externalIPs: [192.0.2.7]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {hostname: lb.example}]}}",
        )
        .unwrap();
        assert_eq!(
            parsed.id,
            ServiceRef {
                namespace: "x".into(),
                name: "web".into()
            }
        );
        assert_eq!(parsed.service_type, ServiceType::LoadBalancer);
        assert_eq!(
            parsed.cluster_ips,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        assert_eq!(
            parsed.external_ips,
            ["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            parsed.load_balancer_ips,
            ["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            parsed.ports,
            [
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: PortRef::Name("http".into()),
                    node_port: Some(30080),
                },
                ServicePort {
                    name: Some("dns".into()),
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: PortRef::Number(53),
                    node_port: None,
                },
            ]
        );
        assert_eq!(parsed.selector["app"], "web");
    }

    #[test]
    fn headless_and_external_name_services_have_no_cluster_ip() {
        let headless = service(
            "metadata: {name: db, namespace: x}
spec: {clusterIP: None, ports: [{port: 5432}]}",
        )
        .unwrap();
        assert_eq!(headless.service_type, ServiceType::ClusterIp);
        assert!(headless.cluster_ips.is_empty());
        let alias = service(
            "metadata: {name: ext, namespace: x}
spec: {type: ExternalName, externalName: example.com, clusterIP: 10.96.0.1}",
        )
        .unwrap();
        assert!(alias.cluster_ips.is_empty());
    }

    #[test]
    fn service_errors_name_the_object_and_field() {
        let message = |yaml: &str| service(yaml).unwrap_err().to_string();
        assert_eq!(
            message(
                "metadata: {name: web, namespace: x}
spec: {ports: [{port: 80}, {port: 70000}]}"
            ),
            "Service x/web: spec.ports[1].port: 70000 is not a port (1-65535)"
        );
        assert_eq!(
            message(
                "metadata: {name: web, namespace: x}
spec: {clusterIPs: [10.96.0.300]}"
            ),
            "Service x/web: spec.clusterIPs[0]: \"10.96.0.300\" is not an IP address"
        );
        assert_eq!(
            message(
                "metadata: {name: web, namespace: x}
spec: {ports: [{port: 80, targetPort: '8080'}]}"
            ),
            "Service x/web: spec.ports[0].targetPort: \"8080\" is a number written as a string"
        );
        assert_eq!(
            message(
                "metadata: {name: web, namespace: x}
spec: {ports: [{port: 80, nodePort: 30080}]}"
            ),
            "Service x/web: spec.ports[0].nodePort: may not be set for type ClusterIP"
        );
        assert_eq!(
            message(
                "metadata: {name: web, namespace: x}
spec: {type: Magic}"
            ),
            "Service x/web: spec.type: unknown Service type \"Magic\""
        );
        assert_eq!(
            message(
                "metadata: {name: web, namespace: x}
spec: {ports: [{port: 80, protocol: ICMP}]}"
            ),
            "Service x/web: spec.ports[0].protocol: unsupported protocol \"ICMP\""
        );
    }

    #[test]
    fn an_endpoint_slice_is_read_with_its_service_pods_and_readiness() {
        let parsed = endpoint_slice(
            "metadata: {name: web-abc, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.1], nodeName: n1, targetRef: {kind: Pod, name: web-1, namespace: x}}
- {addresses: [10.0.0.2], conditions: {ready: false}, targetRef: {kind: Pod, name: web-2}}
- {addresses: [10.0.0.3], conditions: {serving: true}}
ports: [{name: http, port: 8080}, {name: all}]",
        )
        .unwrap();
        assert_eq!(parsed.service.to_string(), "x/web");
        assert_eq!(parsed.address_type, AddressType::Ipv4);
        assert_eq!(
            parsed.endpoints[0],
            ServiceEndpoint {
                addresses: vec!["10.0.0.1".parse().unwrap()],
                ready: true,
                pod: Some(PodRef {
                    namespace: "x".into(),
                    name: "web-1".into()
                }),
                node_name: Some("n1".into()),
            }
        );
        assert!(!parsed.endpoints[1].ready);
        assert_eq!(parsed.endpoints[1].pod.as_ref().unwrap().namespace, "x");
        assert!(parsed.endpoints[2].ready && parsed.endpoints[2].pod.is_none());
        assert_eq!(
            parsed.ports,
            [EndpointPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );
    }

    #[test]
    fn endpoint_slice_errors_name_the_object_and_field() {
        let message = |yaml: &str| endpoint_slice(yaml).unwrap_err().to_string();
        assert_eq!(
            message(
                "metadata: {name: s, namespace: x}
addressType: IPv4
endpoints: []"
            ),
            "EndpointSlice x/s: metadata.labels[kubernetes.io/service-name]: is required: the slice belongs to no Service"
        );
        assert_eq!(
            message(
                "metadata: {name: s, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}, {addresses: ['fd00::1']}]"
            ),
            "EndpointSlice x/s: endpoints[1].addresses[0]: fd00::1 is not of addressType IPv4"
        );
        assert_eq!(
            message(
                "metadata: {name: s, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
ports: [{port: 0}]"
            ),
            "EndpointSlice x/s: ports[0].port: 0 is not a port (1-65535)"
        );
    }

    #[test]
    fn policy_types_default_like_the_api_server() {
        let only_ingress = network_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: []}",
        ))
        .unwrap();
        assert!(only_ingress.policy_types.ingress && !only_ingress.policy_types.egress);
        let both = network_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: [{}]}",
        ))
        .unwrap();
        assert!(both.policy_types.ingress && both.policy_types.egress);
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let error = network_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
        ))
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "NetworkPolicy x/p: spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not a CIDR"
        );
        let error = network_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress: [{ports: [{port: 80, endPort: 79}]}]",
        ))
        .unwrap_err();
        assert_eq!(error.field, "spec.egress[0].ports[0].endPort");
    }

    #[test]
    fn except_outside_cidr_is_rejected_and_names_are_kept() {
        let error = network_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]",
        ))
        .unwrap_err();
        assert_eq!(error.field, "spec.ingress[0].from[0].ipBlock.except[0]");
        let parsed = network_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.7/16}}], ports: [{port: http}]}]",
        ))
        .unwrap();
        assert_eq!(
            parsed.ingress[0].peers[0],
            Peer::IpBlock {
                cidr: "10.0.0.0/16".parse().unwrap(),
                except: vec![]
            }
        );
        assert_eq!(
            parsed.ingress[0].ports[0].port,
            Some(PortRef::Name("http".into()))
        );
    }
}
