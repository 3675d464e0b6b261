//! Service frontends: the (address, protocol, port) triples kube-proxy translates to a Service's
//! backends.
//!
//! The datapath judges a flow to a Service by the backend pod it was translated to; it needs the
//! frontends only to say which Service a translated flow was opened to (attribution). Each
//! frontend gets a small nonzero id, kept as long as the frontend exists, so the kernel map's
//! value and the events that carry it stay stable while other Services change. An id freed by
//! a removed frontend is given to the next new one, which keeps ids small.
//!
//! Which frontends a Service has:
//! - every cluster IP × every Service port (none for headless and ExternalName Services);
//! - every external IP and load-balancer IP × every Service port;
//! - every address of this node × every `nodePort`;
//! - nothing for an ExternalName Service, a DNS alias kube-proxy does not translate.
//!
//! Two Services claiming the same frontend is a conflict the API server prevents for cluster
//! IPs and node ports, but not for external IPs: the first Service by namespace and name keeps
//! it, and the conflict is reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use netwarden_model::{Protocol, Service, ServiceRef, ServiceType};

/// Id of one frontend in the datapath's frontend map: nonzero, small, stable while the
/// frontend exists.
pub type FrontendId = u32;

/// An address, protocol and port that kube-proxy translates to a Service's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The address clients connect to.
    pub address: IpAddr,
    /// The L4 protocol.
    pub protocol: Protocol,
    /// The port clients connect to.
    pub port: u16,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(address) => write!(f, "{address}:{}/{}", self.port, self.protocol),
            IpAddr::V6(address) => write!(f, "[{address}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Which of a Service's addresses a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// A cluster IP and a Service port.
    ClusterIp,
    /// A node address and a `nodePort`.
    NodePort,
    /// An address of `spec.externalIPs` and a Service port.
    ExternalIp,
    /// A load-balancer ingress IP and a Service port.
    LoadBalancer,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "cluster IP",
            Self::NodePort => "node port",
            Self::ExternalIp => "external IP",
            Self::LoadBalancer => "load-balancer IP",
        })
    }
}

/// What the datapath and attribution know of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrontendInfo {
    /// Its id, the value of its entry in the kernel map.
    pub id: FrontendId,
    /// The Service it leads to.
    pub service: ServiceRef,
    /// The name of the Service port (`None` for a single unnamed port).
    pub port_name: Option<String>,
    /// Which of the Service's addresses it is.
    pub kind: FrontendKind,
}

impl fmt::Display for FrontendInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Service {}", self.service)?;
        if let Some(name) = &self.port_name {
            write!(f, " port {name}")?;
        }
        write!(f, " ({})", self.kind)
    }
}

/// What one Service claims of a frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    port_name: Option<String>,
    kind: FrontendKind,
}

/// The frontends of every Service, maintained one Service at a time.
#[derive(Clone, Debug, Default)]
pub(crate) struct FrontendTable {
    by_service: BTreeMap<ServiceRef, BTreeMap<Frontend, Claim>>,
    claims: BTreeMap<Frontend, BTreeMap<ServiceRef, Claim>>,
    ids: BTreeMap<Frontend, FrontendId>,
    free_ids: BTreeSet<FrontendId>,
    highest_id: FrontendId,
    conflicts: BTreeMap<Frontend, String>,
}

impl FrontendTable {
    /// Replaces what `id` claims with the frontends of `service` (none when it is deleted), and
    /// brings `frontends` up to date for every frontend that changed hands.
    pub(crate) fn set_service(
        &mut self,
        id: &ServiceRef,
        service: Option<&Service>,
        node_addresses: &BTreeSet<IpAddr>,
        frontends: &mut BTreeMap<Frontend, FrontendInfo>,
    ) {
        let new = service
            .map(|service| frontends_of(service, node_addresses))
            .unwrap_or_default();
        let old = if new.is_empty() {
            self.by_service.remove(id).unwrap_or_default()
        } else {
            self.by_service
                .insert(id.clone(), new.clone())
                .unwrap_or_default()
        };
        if old == new {
            return;
        }
        let mut touched = BTreeSet::new();
        for frontend in old.keys() {
            if let Some(claims) = self.claims.get_mut(frontend) {
                claims.remove(id);
                if claims.is_empty() {
                    self.claims.remove(frontend);
                }
            }
            touched.insert(*frontend);
        }
        for (frontend, claim) in new {
            self.claims
                .entry(frontend)
                .or_default()
                .insert(id.clone(), claim);
            touched.insert(frontend);
        }
        for frontend in touched {
            self.refresh(frontend, frontends);
        }
    }

    /// Frontends claimed by more than one Service, one message each.
    pub(crate) fn conflicts(&self) -> impl Iterator<Item = &String> {
        self.conflicts.values()
    }

    /// Sets the entry of `frontend` from its first claimant, or removes it and frees its id.
    fn refresh(&mut self, frontend: Frontend, frontends: &mut BTreeMap<Frontend, FrontendInfo>) {
        let Some(claims) = self.claims.get(&frontend) else {
            frontends.remove(&frontend);
            self.conflicts.remove(&frontend);
            if let Some(id) = self.ids.remove(&frontend) {
                self.free_ids.insert(id);
            }
            return;
        };
        let mut claimants = claims.iter();
        let (owner, claim) = claimants.next().expect("claims are never left empty");
        match claimants.next() {
            Some((other, _)) => {
                self.conflicts.insert(
                    frontend,
                    format!(
                        "Service {other}: {frontend} is also a frontend of Service {owner}; using {owner}"
                    ),
                );
            }
            None => {
                self.conflicts.remove(&frontend);
            }
        }
        let free_ids = &mut self.free_ids;
        let highest_id = &mut self.highest_id;
        let id = *self.ids.entry(frontend).or_insert_with(|| {
            free_ids.pop_first().unwrap_or_else(|| {
                *highest_id += 1;
                *highest_id
            })
        });
        frontends.insert(
            frontend,
            FrontendInfo {
                id,
                service: owner.clone(),
                port_name: claim.port_name.clone(),
                kind: claim.kind,
            },
        );
    }
}

/// The frontends of `service` on a node with `node_addresses`. One address listed twice (a
/// cluster IP also given as an external IP) is claimed once, by its first kind.
fn frontends_of(service: &Service, node_addresses: &BTreeSet<IpAddr>) -> BTreeMap<Frontend, Claim> {
    let Service {
        id: _,
        service_type,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        selector: _,
    } = service;
    let mut frontends = BTreeMap::new();
    if *service_type == ServiceType::ExternalName {
        // A DNS alias: kube-proxy translates nothing, whatever addresses it lists.
        return frontends;
    }
    let mut claim = |address: IpAddr, protocol, port, port_name: &Option<String>, kind| {
        frontends
            .entry(Frontend {
                address,
                protocol,
                port,
            })
            .or_insert_with(|| Claim {
                port_name: port_name.clone(),
                kind,
            });
    };
    let by_port = [
        (cluster_ips, FrontendKind::ClusterIp),
        (external_ips, FrontendKind::ExternalIp),
        (load_balancer_ips, FrontendKind::LoadBalancer),
    ];
    for (addresses, kind) in by_port {
        for address in addresses {
            for port in ports {
                claim(*address, port.protocol, port.port, &port.name, kind);
            }
        }
    }
    for port in ports {
        let Some(node_port) = port.node_port else {
            continue;
        };
        for address in node_addresses {
            claim(
                *address,
                port.protocol,
                node_port,
                &port.name,
                FrontendKind::NodePort,
            );
        }
    }
    frontends
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::IpAddr,
    };

    use netwarden_model::{PortRef, Protocol, Service, ServicePort, ServiceRef, ServiceType};
    use proptest::{collection::vec, prelude::*, sample::subsequence};

    use super::{Frontend, FrontendInfo, FrontendKind};
    use crate::{Change, Compiler};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn service_ref(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "x".into(),
            name: name.into(),
        }
    }

    fn port(name: &str, protocol: Protocol, port: u16, node_port: Option<u16>) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            protocol,
            port,
            target_port: PortRef::Number(8080),
            node_port,
        }
    }

    fn service(name: &str, service_type: ServiceType, cluster_ips: &[&str]) -> Service {
        Service {
            id: service_ref(name),
            service_type,
            cluster_ips: cluster_ips.iter().map(|text| ip(text)).collect(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports: vec![port("http", Protocol::Tcp, 80, None)],
            selector: BTreeMap::new(),
        }
    }

    fn apply(compiler: &mut Compiler, service: Service) -> BTreeMap<Frontend, FrontendInfo> {
        compiler
            .update([Change::Service(service.id.clone(), Some(service))])
            .service_frontends
            .clone()
    }

    /// The frontends without their ids, for comparisons.
    fn described(
        frontends: &BTreeMap<Frontend, FrontendInfo>,
    ) -> Vec<(String, String, Option<String>, FrontendKind)> {
        frontends
            .iter()
            .map(|(frontend, info)| {
                (
                    frontend.to_string(),
                    info.service.to_string(),
                    info.port_name.clone(),
                    info.kind,
                )
            })
            .collect()
    }

    #[test]
    fn every_address_of_a_service_times_its_ports_is_a_frontend() {
        let mut compiler = Compiler::new("node-1");
        compiler.set_node_addresses(&[ip("172.18.0.2"), ip("fc00::2")]);
        let mut web = service(
            "web",
            ServiceType::LoadBalancer,
            &["10.96.0.10", "fd00:96::10"],
        );
        web.external_ips = vec![ip("192.0.2.7"), ip("10.96.0.10")];
        web.load_balancer_ips = vec![ip("198.51.100.1")];
        web.ports = vec![
            port("http", Protocol::Tcp, 80, Some(30080)),
            port("dns", Protocol::Udp, 53, None),
        ];
        let frontends = apply(&mut compiler, web);
        let entry = |frontend: &str, port: &str, kind| {
            (
                frontend.to_owned(),
                "x/web".to_owned(),
                Some(port.to_owned()),
                kind,
            )
        };
        assert_eq!(
            described(&frontends),
            [
                entry("10.96.0.10:80/TCP", "http", FrontendKind::ClusterIp),
                entry("10.96.0.10:53/UDP", "dns", FrontendKind::ClusterIp),
                entry("172.18.0.2:30080/TCP", "http", FrontendKind::NodePort),
                entry("192.0.2.7:80/TCP", "http", FrontendKind::ExternalIp),
                entry("192.0.2.7:53/UDP", "dns", FrontendKind::ExternalIp),
                entry("198.51.100.1:80/TCP", "http", FrontendKind::LoadBalancer),
                entry("198.51.100.1:53/UDP", "dns", FrontendKind::LoadBalancer),
                entry("[fc00::2]:30080/TCP", "http", FrontendKind::NodePort),
                entry("[fd00:96::10]:80/TCP", "http", FrontendKind::ClusterIp),
                entry("[fd00:96::10]:53/UDP", "dns", FrontendKind::ClusterIp),
            ]
        );
        let ids: BTreeSet<u32> = frontends.values().map(|info| info.id).collect();
        assert_eq!(
            ids,
            (1..=10).collect(),
            "ids are small, nonzero and distinct"
        );
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        let mut compiler = Compiler::new("node-1");
        assert!(apply(&mut compiler, service("db", ServiceType::ClusterIp, &[])).is_empty());
        let mut alias = service("ext", ServiceType::ExternalName, &[]);
        alias.external_ips = vec![ip("192.0.2.7")];
        assert!(apply(&mut compiler, alias).is_empty());
    }

    #[test]
    fn ids_stay_while_other_services_change_and_freed_ids_are_reused() {
        let mut compiler = Compiler::new("node-1");
        apply(
            &mut compiler,
            service("a", ServiceType::ClusterIp, &["10.96.0.1"]),
        );
        let frontends = apply(
            &mut compiler,
            service("b", ServiceType::ClusterIp, &["10.96.0.2"]),
        );
        let id_of = |frontends: &BTreeMap<Frontend, FrontendInfo>, address: &str| {
            frontends
                .iter()
                .find(|(frontend, _)| frontend.address == ip(address))
                .map(|(_, info)| info.id)
        };
        assert_eq!(id_of(&frontends, "10.96.0.1"), Some(1));
        assert_eq!(id_of(&frontends, "10.96.0.2"), Some(2));

        let frontends = compiler
            .update([Change::Service(service_ref("a"), None)])
            .service_frontends
            .clone();
        assert_eq!(id_of(&frontends, "10.96.0.1"), None);
        assert_eq!(id_of(&frontends, "10.96.0.2"), Some(2), "b keeps its id");

        let frontends = apply(
            &mut compiler,
            service("c", ServiceType::ClusterIp, &["10.96.0.3"]),
        );
        assert_eq!(id_of(&frontends, "10.96.0.3"), Some(1), "a's id is reused");
        let (frontend, info) = compiler.state().frontend(2).expect("id 2 exists");
        assert_eq!(
            (frontend.address, info.service.name.as_str()),
            (ip("10.96.0.2"), "b")
        );
        assert!(compiler.state().frontend(3).is_none());
    }

    #[test]
    fn node_ports_follow_the_node_addresses() {
        let mut compiler = Compiler::new("node-1");
        let mut web = service("web", ServiceType::NodePort, &["10.96.0.10"]);
        web.ports = vec![port("http", Protocol::Tcp, 80, Some(30080))];
        apply(&mut compiler, web);
        let node_port_addresses = |compiler: &Compiler| -> Vec<IpAddr> {
            compiler
                .state()
                .service_frontends
                .iter()
                .filter(|(_, info)| info.kind == FrontendKind::NodePort)
                .map(|(frontend, _)| frontend.address)
                .collect()
        };
        assert!(node_port_addresses(&compiler).is_empty());
        compiler.set_node_addresses(&[ip("172.18.0.2")]);
        assert_eq!(node_port_addresses(&compiler), [ip("172.18.0.2")]);
        compiler.set_node_addresses(&[ip("172.18.0.3")]);
        assert_eq!(node_port_addresses(&compiler), [ip("172.18.0.3")]);
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first_service_and_is_reported() {
        let mut compiler = Compiler::new("node-1");
        let mut second = service("b", ServiceType::ClusterIp, &["10.96.0.2"]);
        second.external_ips = vec![ip("192.0.2.7")];
        apply(&mut compiler, second);
        let mut first = service("a", ServiceType::ClusterIp, &["10.96.0.1"]);
        first.external_ips = vec![ip("192.0.2.7")];
        let frontends = apply(&mut compiler, first);
        let shared = Frontend {
            address: ip("192.0.2.7"),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert_eq!(frontends[&shared].service, service_ref("a"));
        assert_eq!(
            compiler.state().warnings,
            ["Service x/b: 192.0.2.7:80/TCP is also a frontend of Service x/a; using x/a"]
        );
        let frontends = compiler
            .update([Change::Service(service_ref("a"), None)])
            .service_frontends
            .clone();
        assert_eq!(frontends[&shared].service, service_ref("b"));
        assert!(compiler.state().warnings.is_empty());
    }

    const ADDRESSES: [&str; 4] = ["10.96.0.1", "10.96.0.2", "fd00::1", "192.0.2.7"];
    const NODE_ADDRESSES: [&str; 3] = ["172.18.0.2", "172.18.0.3", "fc00::2"];

    fn addresses() -> impl Strategy<Value = Vec<IpAddr>> {
        subsequence(&ADDRESSES[..], 0..=2)
            .prop_map(|picked| picked.into_iter().map(ip).collect::<Vec<_>>())
    }

    fn arbitrary_service(name: &'static str) -> impl Strategy<Value = Option<Service>> {
        let ports = vec(
            (
                prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
                prop_oneof![Just(53_u16), Just(80)],
                proptest::option::of(prop_oneof![Just(30053_u16), Just(30080)]),
            ),
            0..=2,
        );
        let service_type = prop_oneof![
            Just(ServiceType::ClusterIp),
            Just(ServiceType::NodePort),
            Just(ServiceType::ExternalName)
        ];
        proptest::option::of((service_type, addresses(), addresses(), ports).prop_map(
            move |(service_type, cluster_ips, external_ips, ports)| {
                Service {
                    id: service_ref(name),
                    service_type,
                    cluster_ips,
                    external_ips,
                    load_balancer_ips: Vec::new(),
                    ports: ports
                        .into_iter()
                        .enumerate()
                        .map(|(index, (protocol, number, node_port))| {
                            port(&format!("p{index}"), protocol, number, node_port)
                        })
                        .collect(),
                    selector: BTreeMap::new(),
                }
            },
        ))
    }

    #[derive(Clone, Debug)]
    enum Step {
        Service(ServiceRef, Option<Service>),
        NodeAddresses(Vec<IpAddr>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => prop_oneof![arbitrary_service("a"), arbitrary_service("b"), arbitrary_service("c")]
                .prop_map(|service| {
                    let id = service.as_ref().map_or_else(|| service_ref("a"), |s| s.id.clone());
                    Step::Service(id, service)
                }),
            1 => subsequence(&NODE_ADDRESSES[..], 0..=3)
                .prop_map(|picked| Step::NodeAddresses(picked.into_iter().map(ip).collect())),
        ]
    }

    proptest! {
        /// After every change, the incremental table equals one built from scratch, ids are
        /// distinct and nonzero, and a frontend that stayed keeps its id.
        #[test]
        fn incremental_frontends_equal_frontends_from_scratch(steps in vec(step(), 1..=12)) {
            let mut incremental = Compiler::new("node-1");
            let mut services: BTreeMap<ServiceRef, Service> = BTreeMap::new();
            let mut node_addresses = Vec::new();
            let mut before = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Service(id, service) => {
                        match &service {
                            Some(service) => services.insert(id.clone(), service.clone()),
                            None => services.remove(&id),
                        };
                        incremental.update([Change::Service(id, service)]);
                    }
                    Step::NodeAddresses(addresses) => {
                        incremental.set_node_addresses(&addresses);
                        node_addresses = addresses;
                    }
                }
                let mut scratch = Compiler::new("node-1");
                scratch.set_node_addresses(&node_addresses);
                scratch.update(
                    services
                        .iter()
                        .rev()
                        .map(|(id, service)| Change::Service(id.clone(), Some(service.clone()))),
                );
                let now = incremental.state().service_frontends.clone();
                prop_assert_eq!(described(&now), described(&scratch.state().service_frontends));
                prop_assert_eq!(&incremental.state().warnings, &scratch.state().warnings);
                let ids: BTreeSet<u32> = now.values().map(|info| info.id).collect();
                prop_assert_eq!(ids.len(), now.len());
                prop_assert!(!ids.contains(&0));
                for (frontend, info) in &now {
                    if let Some(old) = before.get(frontend) {
                        prop_assert_eq!(*old, info.id);
                    }
                }
                before = now.iter().map(|(frontend, info)| (*frontend, info.id)).collect();
            }
        }
    }
}
