//! Services and their `EndpointSlices`, kept the way the API server and kube's endpointslice
//! controller keep them: `ClusterIPs` (and nodePorts) are allocated when a Service is created,
//! and every Service's slices are recomputed from its selector whenever a pod appears,
//! disappears or is relabelled. Per-pod Services are the exception: they have no selector and
//! one slice naming their pod, so they keep reaching exactly that pod whatever its labels.
//!
//! The objects are written to the agent's manifest directory beside the Pods, and the same
//! in-memory objects feed the kube-proxy emulation (`kube_proxy`), so the node's netfilter and
//! the agent's input can never disagree.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::json;

use crate::{
    manifests::{ManifestError, ManifestWriter},
    node::{Addresses, NODE_NAME},
    scenario::{IpFamily, Labels, PodSpec, Protocol},
};

/// The Service CIDRs: outside the pod range (`10.244.0.0/16`, `fd00:10:244::/64`) as in a real
/// cluster, where `ClusterIPs` are routed nowhere and exist only in kube-proxy's rules.
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";
/// The first nodePort handed out (the API server's default range is 30000-32767).
const FIRST_NODE_PORT: u16 = 30_000;
/// `ClusterIPs` start above the `.1`/`::1` a cluster keeps for the `kubernetes` Service.
const FIRST_HOST: u16 = 10;

/// How a Service is exposed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
}

/// A `ServicePort`'s `targetPort`: a container port's number or name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One port of a Service, spelled as in the Service spec.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
    /// Absent means the same number as `port`, as the API server defaults it.
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// The container port this `ServicePort` reaches on `pod`, if the pod has it.
    fn resolve(&self, pod: &PodSpec) -> Option<u16> {
        match &self.target_port {
            None => Some(self.port),
            Some(TargetPort::Number(number)) => Some(*number),
            Some(TargetPort::Name(name)) => pod
                .ports
                .iter()
                .find(|port| port.name.as_ref() == Some(name) && port.protocol == self.protocol)
                .map(|port| port.container_port),
        }
    }
}

/// A Service as a scenario declares it (or as `services: per_pod` generates it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceType,
    pub backends: Backends,
    pub ports: Vec<ServicePort>,
    /// `ClusterIPs` the scenario asks for; the harness allocates the missing families.
    pub requested_ips: Vec<IpAddr>,
}

/// Which pods a Service's `EndpointSlices` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backends {
    /// The pods of its namespace its selector matches, kept by kube's endpointslice controller.
    Selector(Labels),
    /// One pod by name: a Service without a selector whose slice another controller keeps (here
    /// the harness), as Kubernetes allows.
    Pod(String),
}

impl ServiceSpec {
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The per-pod Service upstream's e2e suite creates for every server pod, with one
    /// `ServicePort` per container port, reaching it by name. Upstream selects the pod by
    /// `pod: <name>`, a label its tests never take away; here the Service names the pod
    /// itself, so that a scenario relabelling a pod any way it likes still reaches it through
    /// its Service, as its pod-IP expectations assume.
    #[must_use]
    pub fn per_pod(pod: &PodSpec) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            name: per_pod_name(&pod.namespace, &pod.name),
            kind: ServiceType::ClusterIP,
            backends: Backends::Pod(pod.name.clone()),
            ports: pod
                .ports
                .iter()
                .map(|port| ServicePort {
                    name: port.name.clone(),
                    protocol: port.protocol,
                    port: port.container_port,
                    target_port: Some(
                        port.name
                            .clone()
                            .map_or(TargetPort::Number(port.container_port), TargetPort::Name),
                    ),
                    node_port: None,
                })
                .collect(),
            requested_ips: Vec::new(),
        }
    }
}

/// The name of the per-pod Service of `namespace/pod`.
#[must_use]
pub fn per_pod_name(namespace: &str, pod: &str) -> String {
    format!("s-{namespace}-{pod}")
}

/// The spec of a Service manifest in a scenario's `services` map.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: RawMetadata,
    spec: RawServiceSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServiceSpec {
    #[serde(default, rename = "type")]
    kind: ServiceType,
    #[serde(default)]
    selector: Labels,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<IpAddr>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
}

/// Parses the Service manifest under `key` (`<namespace>/<name>`) of a scenario.
pub fn parse_service(key: &str, value: serde_yaml::Value) -> Result<ServiceSpec, String> {
    let raw: RawService =
        serde_yaml::from_value(value).map_err(|error| format!("service {key}: {error}"))?;
    let (namespace, name) = key
        .split_once('/')
        .ok_or_else(|| format!("service key {key:?} is not NAMESPACE/NAME"))?;
    if raw.api_version != "v1" || raw.kind != "Service" {
        return Err(format!(
            "service {key}: expected apiVersion v1, kind Service, got {} {}",
            raw.api_version, raw.kind
        ));
    }
    if raw.metadata.name != name
        || raw.metadata.namespace.as_deref().unwrap_or(namespace) != namespace
    {
        return Err(format!("service {key}: metadata names another object"));
    }
    let spec = raw.spec;
    if spec.selector.is_empty() {
        return Err(format!(
            "service {key}: a selector is required (the harness keeps EndpointSlices only for selected pods)"
        ));
    }
    if spec.ports.is_empty() {
        return Err(format!("service {key}: spec.ports is empty"));
    }
    for port in &spec.ports {
        if spec.ports.len() > 1 && port.name.is_none() {
            return Err(format!(
                "service {key}: every port of a multi-port Service needs a name"
            ));
        }
        if port.node_port.is_some() && spec.kind != ServiceType::NodePort {
            return Err(format!(
                "service {key}: nodePort on a Service that is not type NodePort"
            ));
        }
    }
    let mut requested_ips = spec.cluster_ips;
    if let Some(ip) = spec.cluster_ip
        && !requested_ips.contains(&ip)
    {
        requested_ips.insert(0, ip);
    }
    Ok(ServiceSpec {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        kind: spec.kind,
        backends: Backends::Selector(spec.selector),
        ports: spec.ports,
        requested_ips,
    })
}

/// A Service as the API server holds it once created: its `ClusterIPs` and nodePorts set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub spec: ServiceSpec,
    pub cluster_ips: Addresses,
}

impl Service {
    /// The `ServicePort` serving `port`/`protocol`.
    #[must_use]
    pub fn port(&self, port: u16, protocol: Protocol) -> Option<&ServicePort> {
        self.spec
            .ports
            .iter()
            .find(|candidate| candidate.port == port && candidate.protocol == protocol)
    }
}

/// One endpoint of a slice: a ready pod's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    /// The pod's name (its namespace is the Service's).
    pub pod: String,
}

/// A port of a slice: the `ServicePort`'s name and protocol with the resolved container port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

/// An `EndpointSlice` (discovery.k8s.io/v1): one address family, one set of resolved ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// Kept by kube's endpointslice controller (for a selector), or by the harness.
    pub by_selector: bool,
}

/// A published pod, as the endpointslice controller sees it.
#[derive(Clone, Copy, Debug)]
pub struct PodEndpoint<'a> {
    pub spec: &'a PodSpec,
    pub addresses: &'a Addresses,
}

/// The `EndpointSlices` of `service` for the pods that exist now. Like kube's controller, pods
/// whose named ports resolve differently land in different slices, a pod lacking a named port
/// is left out of that port, and a Service selecting nothing keeps one empty slice per family.
#[must_use]
pub fn endpoint_slices(service: &Service, pods: &[PodEndpoint<'_>]) -> Vec<EndpointSlice> {
    let spec = &service.spec;
    let mut slices = Vec::new();
    for family in [IpFamily::IPv4, IpFamily::IPv6] {
        if service.cluster_ips.get(family).is_none() {
            continue;
        }
        let mut groups: BTreeMap<Vec<SlicePort>, Vec<SliceEndpoint>> = BTreeMap::new();
        for pod in pods {
            let selected = pod.spec.namespace == spec.namespace
                && match &spec.backends {
                    Backends::Selector(selector) => selector
                        .iter()
                        .all(|(key, value)| pod.spec.labels.get(key) == Some(value)),
                    Backends::Pod(name) => pod.spec.name == *name,
                };
            let Some(address) = pod.addresses.get(family) else {
                continue;
            };
            if !selected {
                continue;
            }
            let ports: Vec<SlicePort> = spec
                .ports
                .iter()
                .filter_map(|port| {
                    Some(SlicePort {
                        name: port.name.clone(),
                        protocol: port.protocol,
                        port: port.resolve(pod.spec)?,
                    })
                })
                .collect();
            groups.entry(ports).or_default().push(SliceEndpoint {
                address,
                pod: pod.spec.name.clone(),
            });
        }
        if groups.is_empty() {
            groups.insert(Vec::new(), Vec::new());
        }
        let suffix = match family {
            IpFamily::IPv4 => "ipv4",
            IpFamily::IPv6 => "ipv6",
        };
        for (index, (ports, mut endpoints)) in groups.into_iter().enumerate() {
            endpoints.sort();
            slices.push(EndpointSlice {
                name: format!("{}-{suffix}-{index}", spec.name),
                namespace: spec.namespace.clone(),
                service: spec.name.clone(),
                family,
                ports,
                endpoints,
                by_selector: matches!(spec.backends, Backends::Selector(_)),
            });
        }
    }
    slices
}

/// Allocates `ClusterIPs` and nodePorts, and keeps the Service and `EndpointSlice` files of the
/// manifest directory in step with the pods.
#[derive(Debug)]
pub struct ServiceRegistry {
    families: Vec<IpFamily>,
    services: IndexMap<String, Service>,
    next_host: u16,
    next_node_port: u16,
    /// File name to the text last written, so unchanged objects are not rewritten.
    written: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the Service range is exhausted")]
    Exhausted,
}

impl ServiceRegistry {
    #[must_use]
    pub fn new(families: &[IpFamily]) -> Self {
        Self {
            families: families.to_vec(),
            services: IndexMap::new(),
            next_host: FIRST_HOST,
            next_node_port: FIRST_NODE_PORT,
            written: HashMap::new(),
        }
    }

    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// Creates the Service, allocating what the spec leaves out, as the API server does.
    pub fn create(&mut self, mut spec: ServiceSpec) -> Result<&Service, ServiceError> {
        let mut cluster_ips = Addresses::default();
        for ip in &spec.requested_ips {
            match ip {
                IpAddr::V4(v4) => cluster_ips.v4 = Some(*v4),
                IpAddr::V6(v6) => cluster_ips.v6 = Some(*v6),
            }
        }
        let host = self.next_host;
        self.next_host = host.checked_add(1).ok_or(ServiceError::Exhausted)?;
        if self.families.contains(&IpFamily::IPv4) && cluster_ips.v4.is_none() {
            let [high, low] = host.to_be_bytes();
            cluster_ips.v4 = Some(Ipv4Addr::new(10, 96, high, low));
        }
        if self.families.contains(&IpFamily::IPv6) && cluster_ips.v6.is_none() {
            cluster_ips.v6 = Some(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, host));
        }
        if spec.kind == ServiceType::NodePort {
            for port in &mut spec.ports {
                if port.node_port.is_none() {
                    port.node_port = Some(self.next_node_port);
                    self.next_node_port += 1;
                }
            }
        }
        let key = spec.key();
        self.services
            .insert(key.clone(), Service { spec, cluster_ips });
        Ok(&self.services[&key])
    }

    pub fn delete(&mut self, key: &str) -> Option<Service> {
        self.services.shift_remove(key)
    }

    /// Recomputes every slice from `pods` and writes what changed (Services, slices; deleting
    /// the files of objects that no longer exist). Returns the slices of every Service.
    pub fn sync(
        &mut self,
        writer: &ManifestWriter,
        pods: &[PodEndpoint<'_>],
    ) -> Result<Vec<EndpointSlice>, ServiceError> {
        let mut wanted: Vec<(String, serde_json::Value)> = Vec::new();
        let mut all_slices = Vec::new();
        for service in self.services.values() {
            wanted.push((
                format!("svc-{}-{}.yaml", service.spec.namespace, service.spec.name),
                service_object(service),
            ));
            for slice in endpoint_slices(service, pods) {
                wanted.push((
                    format!("eps-{}-{}.yaml", slice.namespace, slice.name),
                    slice_object(&slice),
                ));
                all_slices.push(slice);
            }
        }
        let mut current = HashMap::new();
        for (file, object) in wanted {
            let text = object.to_string();
            if self.written.get(&file) != Some(&text) {
                writer.object(&file, &object)?;
            }
            current.insert(file, text);
        }
        for file in self.written.keys() {
            if !current.contains_key(file) {
                writer.remove(file)?;
            }
        }
        self.written = current;
        Ok(all_slices)
    }
}

/// The Service object as the API server serves it.
#[must_use]
pub fn service_object(service: &Service) -> serde_json::Value {
    let spec = &service.spec;
    let ips: Vec<String> = service
        .cluster_ips
        .all()
        .iter()
        .map(ToString::to_string)
        .collect();
    let families: Vec<String> = [IpFamily::IPv4, IpFamily::IPv6]
        .into_iter()
        .filter(|family| service.cluster_ips.get(*family).is_some())
        .map(|family| family.to_string())
        .collect();
    let ports: Vec<serde_json::Value> = spec
        .ports
        .iter()
        .map(|port| {
            let mut value = json!({
                "protocol": port.protocol.to_string(),
                "port": port.port,
                "targetPort": match &port.target_port {
                    None => json!(port.port),
                    Some(TargetPort::Number(number)) => json!(number),
                    Some(TargetPort::Name(name)) => json!(name),
                },
            });
            if let Some(name) = &port.name {
                value["name"] = json!(name);
            }
            if let Some(node_port) = port.node_port {
                value["nodePort"] = json!(node_port);
            }
            value
        })
        .collect();
    let mut object = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": spec.name, "namespace": spec.namespace },
        "spec": {
            "type": match spec.kind {
                ServiceType::ClusterIP => "ClusterIP",
                ServiceType::NodePort => "NodePort",
            },
            "clusterIP": ips.first(),
            "clusterIPs": ips,
            "ipFamilies": families,
            "ipFamilyPolicy": if ips.len() > 1 { "RequireDualStack" } else { "SingleStack" },
            "ports": ports,
        },
    });
    if let Backends::Selector(selector) = &spec.backends {
        object["spec"]["selector"] = json!(selector);
    }
    object
}

/// The `EndpointSlice` object as kube's endpointslice controller writes it.
#[must_use]
pub fn slice_object(slice: &EndpointSlice) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = slice
        .ports
        .iter()
        .map(|port| {
            let mut value = json!({ "protocol": port.protocol.to_string(), "port": port.port });
            if let Some(name) = &port.name {
                value["name"] = json!(name);
            }
            value
        })
        .collect();
    let endpoints: Vec<serde_json::Value> = slice
        .endpoints
        .iter()
        .map(|endpoint| {
            json!({
                "addresses": [endpoint.address.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": NODE_NAME,
                "targetRef": { "kind": "Pod", "namespace": slice.namespace, "name": endpoint.pod },
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice.name,
            "namespace": slice.namespace,
            "labels": {
                "kubernetes.io/service-name": slice.service,
                "endpointslice.kubernetes.io/managed-by": if slice.by_selector {
                    "endpointslice-controller.k8s.io"
                } else {
                    "netwarden-e2e"
                },
            },
        },
        "addressType": slice.family.to_string(),
        "endpoints": endpoints,
        "ports": ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ContainerPort;

    fn pod(namespace: &str, name: &str, labels: &[(&str, &str)], ports: &[(&str, u16)]) -> PodSpec {
        PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            ports: ports
                .iter()
                .map(|(name, number)| ContainerPort {
                    name: Some((*name).to_owned()),
                    container_port: *number,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            identity: crate::mtls::PodIdentity::default(),
        }
    }

    fn v4(last: u8) -> Addresses {
        Addresses {
            v4: Some(Ipv4Addr::new(10, 244, 0, last)),
            v6: Some(Ipv6Addr::new(
                0xfd00,
                0x10,
                0x244,
                0,
                0,
                0,
                0,
                u16::from(last),
            )),
        }
    }

    #[test]
    fn per_pod_service_selects_its_pod_and_resolves_named_ports() {
        let a = pod(
            "x",
            "a",
            &[("pod", "a")],
            &[("serve-80-tcp", 80), ("serve-81-tcp", 81)],
        );
        let b = pod("x", "b", &[("pod", "b")], &[("serve-80-tcp", 80)]);
        let mut registry = ServiceRegistry::new(&[IpFamily::IPv4]);
        let service = registry.create(ServiceSpec::per_pod(&a)).unwrap().clone();
        assert_eq!(service.spec.name, "s-x-a");
        assert_eq!(service.cluster_ips.v4, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(service.cluster_ips.v6, None, "single-stack model");
        let (address_a, address_b) = (v4(11), v4(12));
        let pods = [
            PodEndpoint {
                spec: &a,
                addresses: &address_a,
            },
            PodEndpoint {
                spec: &b,
                addresses: &address_b,
            },
        ];
        let slices = endpoint_slices(&service, &pods);
        assert_eq!(slices.len(), 1);
        assert_eq!(
            slices[0].endpoints,
            [SliceEndpoint {
                address: "10.244.0.11".parse().unwrap(),
                pod: "a".to_owned()
            }]
        );
        assert_eq!(slices[0].ports.len(), 2);
        assert_eq!(slices[0].ports[1].port, 81);
        let object = slice_object(&slices[0]);
        assert_eq!(
            object["metadata"]["labels"]["kubernetes.io/service-name"],
            "s-x-a"
        );
        assert_eq!(object["addressType"], "IPv4");
        assert_eq!(object["endpoints"][0]["targetRef"]["name"], "a");
        assert_eq!(object["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(
            object["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
            "netwarden-e2e"
        );
        let object = service_object(&service);
        assert_eq!(object["spec"]["ports"][0]["targetPort"], "serve-80-tcp");
        assert_eq!(object["spec"]["clusterIPs"][0], "10.96.0.10");
        assert!(
            object["spec"].get("selector").is_none(),
            "named, not selected"
        );
        // Relabelling the pod keeps it behind its Service.
        let mut relabelled = a.clone();
        relabelled.labels.clear();
        let slices = endpoint_slices(
            &service,
            &[PodEndpoint {
                spec: &relabelled,
                addresses: &address_a,
            }],
        );
        assert_eq!(slices[0].endpoints.len(), 1);
    }

    #[test]
    fn slices_follow_labels_and_split_on_resolved_ports() {
        let a = pod("x", "a", &[("app", "web")], &[("http", 80)]);
        let b = pod("x", "b", &[("app", "web")], &[("http", 8080)]);
        let c = pod("x", "c", &[("app", "db")], &[("http", 80)]);
        let other = pod("y", "a", &[("app", "web")], &[("http", 80)]);
        let spec = parse_service(
            "x/web",
            serde_yaml::from_str(
                "{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, targetPort: http}]}}",
            )
            .unwrap(),
        )
        .unwrap();
        let mut registry = ServiceRegistry::new(&[IpFamily::IPv4, IpFamily::IPv6]);
        let service = registry.create(spec).unwrap().clone();
        assert_eq!(service.spec.ports[0].node_port, Some(30_000));
        let addresses = [v4(11), v4(12), v4(13), v4(14)];
        let pods: Vec<PodEndpoint<'_>> = [&a, &b, &c, &other]
            .into_iter()
            .zip(&addresses)
            .map(|(spec, addresses)| PodEndpoint { spec, addresses })
            .collect();
        let slices = endpoint_slices(&service, &pods);
        // Two resolved port sets times two families; the db pod and the other namespace are out.
        assert_eq!(slices.len(), 4);
        assert!(slices.iter().all(|slice| slice.endpoints.len() == 1));
        assert_eq!(slices[0].ports[0].port, 80);
        assert_eq!(slices[1].ports[0].port, 8080);
        assert_eq!(slices[2].family, IpFamily::IPv6);
        let nothing = endpoint_slices(&service, &pods[2..3]);
        assert_eq!(nothing.len(), 2, "an empty slice per family");
        assert!(nothing.iter().all(|slice| slice.endpoints.is_empty()));
    }

    #[test]
    fn sync_writes_changes_and_removes_stale_slices() {
        let dir = tempfile::tempdir().unwrap();
        let writer = ManifestWriter::new(dir.path());
        let a = pod("x", "a", &[("pod", "a")], &[("serve-80-tcp", 80)]);
        let address = v4(11);
        let mut registry = ServiceRegistry::new(&[IpFamily::IPv4]);
        registry.create(ServiceSpec::per_pod(&a)).unwrap();
        let slices = registry
            .sync(
                &writer,
                &[PodEndpoint {
                    spec: &a,
                    addresses: &address,
                }],
            )
            .unwrap();
        assert_eq!(slices[0].endpoints.len(), 1);
        assert!(dir.path().join("eps-x-s-x-a-ipv4-0.yaml").exists());
        assert!(dir.path().join("svc-x-s-x-a.yaml").exists());
        registry.delete("x/s-x-a");
        registry.sync(&writer, &[]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_service_manifests_are_rejected() {
        let parse = |text: &str| parse_service("x/web", serde_yaml::from_str(text).unwrap());
        assert!(parse("{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {ports: [{port: 80}]}}").unwrap_err().contains("selector"));
        assert!(parse("{apiVersion: v1, kind: Service, metadata: {name: other}, spec: {selector: {a: b}, ports: [{port: 80}]}}").is_err());
        assert!(parse("{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {selector: {a: b}, ports: [{port: 80, nodePort: 30001}]}}").unwrap_err().contains("NodePort"));
        assert!(parse("{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {selector: {a: b}, ports: [{port: 80, tagetPort: 1}]}}").is_err());
    }
}
