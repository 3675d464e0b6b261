//! kube-proxy on the simulated node: the node namespace's netfilter programmed from the
//! Service and `EndpointSlice` objects the way kube-proxy programs a node, in its `iptables` or
//! its `nftables` mode.
//!
//! The rule text follows kube-proxy's own (`pkg/proxy/iptables/proxier.go` and
//! `pkg/proxy/nftables/proxier.go` in kubernetes/kubernetes): the same chains, names, hashes,
//! masquerade mark and endpoint choice, so that whatever netwarden sees on a real node it sees
//! here. What is left out is what a single-node cluster with `ClusterIP` and `NodePort` Services
//! and `externalTrafficPolicy: Cluster` never reaches: session affinity, `LoadBalancer` and
//! external IPs, topology and `Local` traffic policies, health-check node ports.
//!
//! Every change is one transaction (`iptables-restore` per family, one `nft -f`), so a probe
//! never meets half a ruleset.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use data_encoding::BASE32;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::{
    netns::{Netns, NetnsError},
    scenario::{IpFamily, Protocol},
    services::{EndpointSlice, SERVICE_CIDR_V4, SERVICE_CIDR_V6, Service},
};

/// The pod CIDRs of the simulated cluster (kube-proxy's `--cluster-cidr`, its "local
/// traffic detector"): traffic from elsewhere to a `ClusterIP` is masqueraded.
const POD_CIDR_V4: &str = "10.244.0.0/16";
const POD_CIDR_V6: &str = "fd00:10:244::/64";
/// kube-proxy's default `--masquerade-bit` 14.
const MASQUERADE_MARK: &str = "0x4000";

/// Which of kube-proxy's modes programs the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeProxyMode {
    #[default]
    Iptables,
    Nftables,
}

impl std::fmt::Display for KubeProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyError {
    #[error("cannot program the node's {mode} rules: {source}")]
    Program {
        mode: KubeProxyMode,
        source: NetnsError,
    },
}

/// One `ServicePort` of one family, with its endpoints: what kube-proxy's `ServicePortMap` and
/// `EndpointsMap` hold for it after reading the Service and its `EndpointSlices`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedPort {
    pub namespace: String,
    pub service: String,
    /// The `ServicePort`'s name, empty when it has none.
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints, sorted as kube-proxy sorts them (by their `ip:port` text).
    pub endpoints: Vec<SocketAddr>,
}

impl ProxiedPort {
    /// kube-proxy's `ServicePortName.String()`: `ns/name:port`, or `ns/name` for an unnamed port.
    fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.service)
        } else {
            format!("{}/{}:{}", self.namespace, self.service, self.port_name)
        }
    }

    fn protocol_lowercase(&self) -> String {
        self.protocol.to_string().to_lowercase()
    }
}

/// The `ServicePorts` of `family`, joined with the endpoints their `EndpointSlices` list for them
/// (a slice port matches a `ServicePort` by name and protocol, as in kube-proxy).
#[must_use]
pub fn proxied_ports<'a>(
    family: IpFamily,
    services: impl IntoIterator<Item = &'a Service>,
    slices: &[EndpointSlice],
) -> Vec<ProxiedPort> {
    let mut ports = Vec::new();
    for service in services {
        let Some(cluster_ip) = service.cluster_ips.get(family) else {
            continue;
        };
        let spec = &service.spec;
        for service_port in &spec.ports {
            let mut endpoints: Vec<SocketAddr> = slices
                .iter()
                .filter(|slice| {
                    slice.family == family
                        && slice.namespace == spec.namespace
                        && slice.service == spec.name
                })
                .flat_map(|slice| {
                    let port = slice.ports.iter().find(|port| {
                        port.name == service_port.name && port.protocol == service_port.protocol
                    });
                    slice.endpoints.iter().filter_map(move |endpoint| {
                        Some(SocketAddr::new(endpoint.address, port?.port))
                    })
                })
                .collect();
            endpoints.sort_by_key(ToString::to_string);
            endpoints.dedup();
            ports.push(ProxiedPort {
                namespace: spec.namespace.clone(),
                service: spec.name.clone(),
                port_name: service_port.name.clone().unwrap_or_default(),
                protocol: service_port.protocol,
                cluster_ip,
                port: service_port.port,
                node_port: service_port.node_port,
                endpoints,
            });
        }
    }
    ports
}

fn pod_cidr(family: IpFamily) -> &'static str {
    match family {
        IpFamily::IPv4 => POD_CIDR_V4,
        IpFamily::IPv6 => POD_CIDR_V6,
    }
}

/// The Service CIDR of `family`: the node routes it to its dummy interface, as a node routes
/// it to its default gateway, so that a `hostNetwork` client can even send to a `ClusterIP`
/// (kube-proxy's OUTPUT rules translate it before the packet leaves).
#[must_use]
pub fn service_cidr(family: IpFamily) -> &'static str {
    match family {
        IpFamily::IPv4 => SERVICE_CIDR_V4,
        IpFamily::IPv6 => SERVICE_CIDR_V6,
    }
}

/// base32(sha256(text)), kube-proxy's chain-name hash before truncation.
fn hash(text: &str) -> String {
    BASE32.encode(&Sha256::digest(text.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// iptables mode

/// `KUBE-SVC-`/`KUBE-EXT-` suffix: kube-proxy's `portProtoHash` (16 characters).
fn iptables_port_hash(port: &ProxiedPort) -> String {
    hash(&format!(
        "{}{}",
        port.port_name_string(),
        port.protocol_lowercase()
    ))[..16]
        .to_owned()
}

/// `KUBE-SEP-` suffix: kube-proxy's `servicePortEndpointChainName` hash.
fn iptables_endpoint_hash(port: &ProxiedPort, endpoint: SocketAddr) -> String {
    hash(&format!(
        "{}{}{endpoint}",
        port.port_name_string(),
        port.protocol_lowercase()
    ))[..16]
        .to_owned()
}

/// The input of `iptables-restore` (or `ip6tables-restore`) for `family`: the whole `filter`
/// and `nat` tables of the node, which belong to the emulated kube-proxy.
#[must_use]
#[expect(clippy::too_many_lines, reason = "one ruleset, in kube-proxy's order")]
pub fn iptables_rules(family: IpFamily, ports: &[ProxiedPort]) -> String {
    let cidr = pod_cidr(family);
    let filter_chains = [
        ":INPUT ACCEPT [0:0]".to_owned(),
        ":FORWARD ACCEPT [0:0]".to_owned(),
        ":OUTPUT ACCEPT [0:0]".to_owned(),
        ":KUBE-SERVICES - [0:0]".to_owned(),
        ":KUBE-EXTERNAL-SERVICES - [0:0]".to_owned(),
        ":KUBE-FORWARD - [0:0]".to_owned(),
    ];
    // kube-proxy's jumps into its filter chains: new connections to a Service without
    // endpoints are rejected there, before (and instead of) reaching the nat table's rules.
    let mut filter_rules = vec![
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES".to_owned(),
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES".to_owned(),
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        // KUBE-FORWARD: forwarded packets conntrack calls INVALID are dropped (a real
        // difference from nftables mode, which has no such rule); the rest is accepted, as
        // the node's FORWARD policy would anyway.
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD".to_owned(),
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_owned(),
        format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT"),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
    ];
    let mut nat_chains = vec![
        ":PREROUTING ACCEPT [0:0]".to_owned(),
        ":INPUT ACCEPT [0:0]".to_owned(),
        ":OUTPUT ACCEPT [0:0]".to_owned(),
        ":POSTROUTING ACCEPT [0:0]".to_owned(),
        ":KUBE-SERVICES - [0:0]".to_owned(),
        ":KUBE-NODEPORTS - [0:0]".to_owned(),
        ":KUBE-POSTROUTING - [0:0]".to_owned(),
        ":KUBE-MARK-MASQ - [0:0]".to_owned(),
    ];
    let mut nat_rules = vec![
        // The portal jumps: packets arriving (PREROUTING) and sent by the node itself (OUTPUT).
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".to_owned(),
        // Marking asks for masquerade; KUBE-POSTROUTING does it once, clearing the mark so a
        // re-traversal (a packet looping through the node again) is not masqueraded twice.
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"),
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
    ];
    for port in ports {
        let name = port.port_name_string();
        let protocol = port.protocol_lowercase();
        let matcher = format!("-m {protocol} -p {protocol}");
        let cluster_ip = port.cluster_ip;
        let service_port = port.port;
        if port.endpoints.is_empty() {
            // No endpoints: REJECT in filter (kube-proxy writes no nat chains for the port).
            filter_rules.push(format!(
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" {matcher} -d {cluster_ip} --dport {service_port} -j REJECT"
            ));
            if let Some(node_port) = port.node_port {
                filter_rules.push(format!(
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" -m addrtype --dst-type LOCAL {matcher} --dport {node_port} -j REJECT"
                ));
            }
            continue;
        }
        let hash = iptables_port_hash(port);
        let service_chain = format!("KUBE-SVC-{hash}");
        nat_chains.push(format!(":{service_chain} - [0:0]"));
        nat_rules.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" {matcher} -d {cluster_ip} --dport {service_port} -j {service_chain}"
        ));
        if let Some(node_port) = port.node_port {
            // NodePorts go through the EXT chain, which masquerades (externalTrafficPolicy
            // Cluster: the endpoint may sit on another node) before the SVC chain.
            let external_chain = format!("KUBE-EXT-{hash}");
            nat_chains.push(format!(":{external_chain} - [0:0]"));
            nat_rules.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment {name} {matcher} --dport {node_port} -j {external_chain}"
            ));
            nat_rules.push(format!(
                "-A {external_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            nat_rules.push(format!("-A {external_chain} -j {service_chain}"));
        }
        // Off-cluster sources (the node itself, external hosts) reaching a ClusterIP are
        // masqueraded, so the endpoint's reply comes back through this node.
        nat_rules.push(format!(
            "-A {service_chain} -m comment --comment \"{name} cluster IP\" {matcher} -d {cluster_ip} --dport {service_port} ! -s {cidr} -j KUBE-MARK-MASQ"
        ));
        let count = port.endpoints.len();
        for (index, endpoint) in port.endpoints.iter().enumerate() {
            let endpoint_chain = format!("KUBE-SEP-{}", iptables_endpoint_hash(port, *endpoint));
            nat_chains.push(format!(":{endpoint_chain} - [0:0]"));
            // Endpoint i of n is chosen with probability 1/(n-i) among those left, so each is
            // chosen with 1/n overall; the last takes whatever remains.
            let remaining = count - index;
            let choice = if remaining > 1 {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / f64::from(u32::try_from(remaining).unwrap_or(u32::MAX))
                )
            } else {
                String::new()
            };
            nat_rules.push(format!(
                "-A {service_chain} -m comment --comment \"{name} -> {endpoint}\" {choice}-j {endpoint_chain}"
            ));
            // Hairpin: an endpoint reaching itself through the Service must see the reply come
            // from the ClusterIP, so its own address is masqueraded.
            nat_rules.push(format!(
                "-A {endpoint_chain} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                endpoint.ip()
            ));
            nat_rules.push(format!(
                "-A {endpoint_chain} -m comment --comment {name} {matcher} -j DNAT --to-destination {endpoint}"
            ));
        }
    }
    nat_rules.push(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            .to_owned(),
    );
    let mut text = String::from("*filter\n");
    for line in filter_chains.iter().chain(&filter_rules) {
        let _ = writeln!(text, "{line}");
    }
    text.push_str("COMMIT\n*nat\n");
    for line in nat_chains.iter().chain(&nat_rules) {
        let _ = writeln!(text, "{line}");
    }
    text.push_str("COMMIT\n");
    text
}

// ---------------------------------------------------------------------------------------------
// nftables mode

/// kube-proxy's `hashAndTruncate`: 8 hash characters, a dash, then the readable name.
fn nft_hashed(name: &str) -> String {
    format!("{}-{name}", &hash(name)[..8])
}

fn nft_service_chain(port: &ProxiedPort) -> String {
    format!(
        "service-{}",
        nft_hashed(&format!(
            "{}/{}/{}/{}",
            port.namespace,
            port.service,
            port.protocol_lowercase(),
            port.port_name
        ))
    )
}

fn nft_external_chain(port: &ProxiedPort) -> String {
    nft_service_chain(port).replacen("service-", "external-", 1)
}

/// `endpoint-HASH-ns/svc/proto/port__IP/PORT`; an IPv6 address's colons become dots, which a
/// chain name may hold.
fn nft_endpoint_chain(port: &ProxiedPort, endpoint: SocketAddr) -> String {
    let address = endpoint.ip().to_string().replace(':', ".");
    format!(
        "endpoint-{}",
        nft_hashed(&format!(
            "{}/{}/{}/{}__{address}/{}",
            port.namespace,
            port.service,
            port.protocol_lowercase(),
            port.port_name,
            endpoint.port()
        ))
    )
}

/// The `nft -f` input that replaces `table ip kube-proxy` (or `ip6`) in one transaction.
/// Everything is declared before it is referenced: chains, then maps and their elements,
/// then rules.
#[must_use]
#[expect(clippy::too_many_lines, reason = "one ruleset, in kube-proxy's order")]
pub fn nftables_ruleset(family: IpFamily, ports: &[ProxiedPort]) -> String {
    let (ip, address_type, no_localhost) = match family {
        IpFamily::IPv4 => ("ip", "ipv4_addr", "ip daddr != 127.0.0.0/8"),
        IpFamily::IPv6 => ("ip6", "ipv6_addr", "ip6 daddr != ::1"),
    };
    let cidr = pod_cidr(family);
    let table = format!("{ip} kube-proxy");
    let mut chains: Vec<String> = Vec::new();
    let mut elements: Vec<String> = Vec::new();
    let mut rules: Vec<String> = Vec::new();
    let mut text = String::new();
    // Create-then-delete makes the delete valid whether or not the table exists yet.
    let _ = writeln!(
        text,
        "add table {table} {{ comment \"rules for kube-proxy\" ; }}"
    );
    let _ = writeln!(text, "delete table {table}");
    let _ = writeln!(
        text,
        "add table {table} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // kube-proxy's base chains: filtering sees pre-DNAT addresses (dstnat - 10), then DNAT at
    // dstnat on the way in and out, masquerade at srcnat. kube-proxy writes the names; nft
    // before 1.0.7 takes `dstnat` only on the prerouting hook, so the numbers are written
    // (dstnat is -100, srcnat 100).
    for (name, kind, hook, priority) in [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ] {
        chains.push(format!(
            "add chain {table} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        ));
    }
    for name in [
        "endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "mark-for-masquerade",
        "reject-chain",
    ] {
        chains.push(format!("add chain {table} {name}"));
    }
    // The jumps from base chains, as kube-proxy's `nftablesJumpChains`.
    for (from, condition, to) in [
        ("filter-input", "ct state new ", "endpoints-check"),
        ("filter-forward", "ct state new ", "endpoints-check"),
        ("filter-output", "ct state new ", "endpoints-check"),
        ("filter-prerouting", "ct state new ", "firewall-check"),
        ("filter-output", "ct state new ", "firewall-check"),
        ("nat-output", "", "services"),
        ("nat-prerouting", "", "services"),
        ("nat-postrouting", "", "masquerading"),
    ] {
        rules.push(format!("add rule {table} {from} {condition}jump {to}"));
    }
    rules.extend([
        format!("add rule {table} mark-for-masquerade mark set mark or {MASQUERADE_MARK}"),
        format!("add rule {table} masquerading mark and {MASQUERADE_MARK} == 0 return"),
        format!("add rule {table} masquerading mark set mark xor {MASQUERADE_MARK}"),
        format!("add rule {table} masquerading masquerade fully-random"),
        format!("add rule {table} reject-chain reject"),
        format!(
            "add rule {table} endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ),
        format!(
            "add rule {table} endpoints-check fib daddr type local {no_localhost} meta l4proto . th dport vmap @no-endpoint-nodeports"
        ),
        format!(
            "add rule {table} firewall-check {ip} daddr . meta l4proto . th dport vmap @firewall-ips"
        ),
        format!(
            "add rule {table} services {ip} daddr . meta l4proto . th dport vmap @service-ips"
        ),
        // Every local address takes NodePorts (kube-proxy's default `--nodeport-addresses`).
        format!(
            "add rule {table} services fib daddr type local {no_localhost} meta l4proto . th dport vmap @service-nodeports"
        ),
    ]);
    let maps = [
        (
            "no-endpoint-services",
            format!("{address_type} . inet_proto . inet_service : verdict"),
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service : verdict".to_owned(),
        ),
        (
            "firewall-ips",
            format!("{address_type} . inet_proto . inet_service : verdict"),
        ),
        (
            "service-ips",
            format!("{address_type} . inet_proto . inet_service : verdict"),
        ),
        (
            "service-nodeports",
            "inet_proto . inet_service : verdict".to_owned(),
        ),
    ];
    for port in ports {
        let protocol = port.protocol_lowercase();
        let cluster_ip = port.cluster_ip;
        let service_port = port.port;
        if port.endpoints.is_empty() {
            elements.push(format!(
                "add element {table} no-endpoint-services {{ {cluster_ip} . {protocol} . {service_port} : goto reject-chain }}"
            ));
            if let Some(node_port) = port.node_port {
                elements.push(format!(
                    "add element {table} no-endpoint-nodeports {{ {protocol} . {node_port} : goto reject-chain }}"
                ));
            }
            continue;
        }
        let service_chain = nft_service_chain(port);
        chains.push(format!("add chain {table} {service_chain}"));
        elements.push(format!(
            "add element {table} service-ips {{ {cluster_ip} . {protocol} . {service_port} : goto {service_chain} }}"
        ));
        // Off-cluster sources to the ClusterIP are masqueraded (the local traffic detector).
        rules.push(format!(
            "add rule {table} {service_chain} {ip} daddr {cluster_ip} {protocol} dport {service_port} {ip} saddr != {cidr} jump mark-for-masquerade"
        ));
        if let Some(node_port) = port.node_port {
            let external_chain = nft_external_chain(port);
            chains.push(format!("add chain {table} {external_chain}"));
            elements.push(format!(
                "add element {table} service-nodeports {{ {protocol} . {node_port} : goto {external_chain} }}"
            ));
            rules.push(format!(
                "add rule {table} {external_chain} jump mark-for-masquerade"
            ));
            rules.push(format!(
                "add rule {table} {external_chain} goto {service_chain}"
            ));
        }
        let mut choices = Vec::new();
        for (index, endpoint) in port.endpoints.iter().enumerate() {
            let endpoint_chain = nft_endpoint_chain(port, *endpoint);
            chains.push(format!("add chain {table} {endpoint_chain}"));
            choices.push(format!("{index} : goto {endpoint_chain}"));
            // Hairpin: an endpoint dialling its own Service is masqueraded.
            rules.push(format!(
                "add rule {table} {endpoint_chain} {ip} saddr {} jump mark-for-masquerade",
                endpoint.ip()
            ));
            rules.push(format!(
                "add rule {table} {endpoint_chain} meta l4proto {protocol} dnat to {endpoint}"
            ));
        }
        rules.push(format!(
            "add rule {table} {service_chain} numgen random mod {} vmap {{ {} }}",
            port.endpoints.len(),
            choices.join(", ")
        ));
    }
    for line in &chains {
        let _ = writeln!(text, "{line}");
    }
    for (name, kind) in maps {
        let _ = writeln!(text, "add map {table} {name} {{ type {kind} ; }}");
    }
    for line in elements.iter().chain(&rules) {
        let _ = writeln!(text, "{line}");
    }
    text
}

/// Programs the node as kube-proxy in `mode` would, for the families of the model. Remembers
/// what it last wrote and skips identical rulesets.
#[derive(Debug)]
pub struct KubeProxy {
    mode: KubeProxyMode,
    families: Vec<IpFamily>,
    routed: bool,
    last: Option<Vec<String>>,
}

impl KubeProxy {
    #[must_use]
    pub fn new(mode: KubeProxyMode, families: &[IpFamily]) -> Self {
        Self {
            mode,
            families: families.to_vec(),
            routed: false,
            last: None,
        }
    }

    /// Replaces the node's rules with those of `services` and `slices`.
    pub async fn program(
        &mut self,
        node: &Netns,
        services: &[&Service],
        slices: &[EndpointSlice],
    ) -> Result<(), KubeProxyError> {
        let error = |source| KubeProxyError::Program {
            mode: self.mode,
            source,
        };
        if !self.routed {
            let routes: Vec<String> = self
                .families
                .iter()
                .map(|family| format!("route add {} dev node0", service_cidr(*family)))
                .collect();
            node.ip_batch(&routes).await.map_err(error)?;
            self.routed = true;
        }
        let texts: Vec<String> = self
            .families
            .iter()
            .map(|family| {
                let ports = proxied_ports(*family, services.iter().copied(), slices);
                match self.mode {
                    KubeProxyMode::Iptables => iptables_rules(*family, &ports),
                    KubeProxyMode::Nftables => nftables_ruleset(*family, &ports),
                }
            })
            .collect();
        if self.last.as_ref() == Some(&texts) {
            return Ok(());
        }
        match self.mode {
            KubeProxyMode::Iptables => {
                for (family, text) in self.families.iter().zip(&texts) {
                    let program = match family {
                        IpFamily::IPv4 => "iptables-restore",
                        IpFamily::IPv6 => "ip6tables-restore",
                    };
                    node.run(program, &["-w", "5"], text).await.map_err(error)?;
                }
            }
            KubeProxyMode::Nftables => {
                node.run("nft", &["-f", "-"], &texts.concat())
                    .await
                    .map_err(error)?;
            }
        }
        self.last = Some(texts);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(endpoints: &[&str], node_port: Option<u16>) -> ProxiedPort {
        let endpoints: Vec<SocketAddr> =
            endpoints.iter().map(|text| text.parse().unwrap()).collect();
        let cluster_ip = if endpoints.first().is_some_and(SocketAddr::is_ipv6) {
            "fd00:10:96::a".parse().unwrap()
        } else {
            "10.96.0.10".parse().unwrap()
        };
        ProxiedPort {
            namespace: "x".to_owned(),
            service: "s-x-a".to_owned(),
            port_name: "serve-80-tcp".to_owned(),
            protocol: Protocol::Tcp,
            cluster_ip,
            port: 80,
            node_port,
            endpoints,
        }
    }

    fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
        text.lines().filter(|line| line.contains(needle)).collect()
    }

    #[test]
    fn iptables_one_endpoint() {
        let rules = iptables_rules(IpFamily::IPv4, &[port(&["10.244.0.11:80"], None)]);
        let service_chain = format!("KUBE-SVC-{}", iptables_port_hash(&port(&[], None)));
        assert_eq!(service_chain.len(), "KUBE-SVC-".len() + 16);
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"x/s-x-a:serve-80-tcp cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j {service_chain}"
        )), "{rules}");
        assert!(rules.contains(&format!(
            "-A {service_chain} -m comment --comment \"x/s-x-a:serve-80-tcp cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"
        )));
        let jumps = lines_with(
            &rules,
            &format!(
                "-A {service_chain} -m comment --comment \"x/s-x-a:serve-80-tcp -> 10.244.0.11:80\""
            ),
        );
        assert_eq!(jumps.len(), 1);
        assert!(
            !jumps[0].contains("statistic"),
            "a single endpoint is always chosen"
        );
        assert_eq!(
            lines_with(&rules, "-j DNAT --to-destination 10.244.0.11:80").len(),
            1
        );
        assert_eq!(
            lines_with(&rules, "-s 10.244.0.11 -j KUBE-MARK-MASQ").len(),
            1,
            "hairpin"
        );
        assert!(rules.contains("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"));
        assert!(rules.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"));
        assert!(rules.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"));
        assert!(rules.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(rules.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(
            rules
                .lines()
                .rfind(|line| line.starts_with("-A KUBE-SERVICES"))
                .unwrap()
                .contains("-j KUBE-NODEPORTS"),
            "nodeports come last"
        );
        assert!(!rules.contains("REJECT"));
        assert!(rules.starts_with("*filter\n") && rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn iptables_two_endpoints_split_evenly() {
        let rules = iptables_rules(
            IpFamily::IPv4,
            &[port(&["10.244.0.11:80", "10.244.0.12:80"], None)],
        );
        let choices = lines_with(&rules, "-> 10.244.0.1");
        assert_eq!(choices.len(), 2);
        assert!(
            choices[0]
                .contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-")
        );
        assert!(!choices[1].contains("statistic"));
        assert_eq!(lines_with(&rules, ":KUBE-SEP-").len(), 2);
        let first = iptables_endpoint_hash(&port(&[], None), "10.244.0.11:80".parse().unwrap());
        let second = iptables_endpoint_hash(&port(&[], None), "10.244.0.12:80".parse().unwrap());
        assert_ne!(first, second);
        let three = iptables_rules(
            IpFamily::IPv4,
            &[port(
                &["10.244.0.11:80", "10.244.0.12:80", "10.244.0.13:80"],
                None,
            )],
        );
        assert!(three.contains("--probability 0.3333333333"));
    }

    #[test]
    fn iptables_no_endpoints_rejects_in_filter() {
        let rules = iptables_rules(IpFamily::IPv4, &[port(&[], Some(30_000))]);
        assert!(rules.contains("-A KUBE-SERVICES -m comment --comment \"x/s-x-a:serve-80-tcp has no endpoints\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j REJECT"));
        assert!(rules.contains("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"x/s-x-a:serve-80-tcp has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30000 -j REJECT"));
        assert!(
            !rules.contains("KUBE-SVC-"),
            "no nat chains for a port without endpoints"
        );
    }

    #[test]
    fn iptables_node_port() {
        let rules = iptables_rules(IpFamily::IPv4, &[port(&["10.244.0.11:80"], Some(30_000))]);
        let hash = iptables_port_hash(&port(&[], None));
        assert!(rules.contains(&format!("-A KUBE-NODEPORTS -m comment --comment x/s-x-a:serve-80-tcp -m tcp -p tcp --dport 30000 -j KUBE-EXT-{hash}")));
        assert!(rules.contains(&format!("-A KUBE-EXT-{hash} -m comment --comment \"masquerade traffic for x/s-x-a:serve-80-tcp external destinations\" -j KUBE-MARK-MASQ")));
        assert!(rules.contains(&format!("-A KUBE-EXT-{hash} -j KUBE-SVC-{hash}")));
    }

    #[test]
    fn iptables_ipv6() {
        let rules = iptables_rules(IpFamily::IPv6, &[port(&["[fd00:10:244::b]:80"], None)]);
        assert!(
            rules.contains("-d fd00:10:96::a --dport 80 ! -s fd00:10:244::/64 -j KUBE-MARK-MASQ")
        );
        assert!(rules.contains("-j DNAT --to-destination [fd00:10:244::b]:80"));
        assert!(rules.contains("-s fd00:10:244::b -j KUBE-MARK-MASQ"));
    }

    #[test]
    fn nftables_one_and_two_endpoints() {
        let one = nftables_ruleset(IpFamily::IPv4, &[port(&["10.244.0.11:80"], None)]);
        let chain = nft_service_chain(&port(&[], None));
        assert!(
            chain.starts_with("service-") && chain.ends_with("-x/s-x-a/tcp/serve-80-tcp"),
            "{chain}"
        );
        assert!(one.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {chain} }}"
        )));
        assert!(one.contains(&format!("add rule ip kube-proxy {chain} ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade")));
        let endpoint = nft_endpoint_chain(&port(&[], None), "10.244.0.11:80".parse().unwrap());
        assert!(
            endpoint.ends_with("-x/s-x-a/tcp/serve-80-tcp__10.244.0.11/80"),
            "{endpoint}"
        );
        assert!(one.contains(&format!(
            "add rule ip kube-proxy {chain} numgen random mod 1 vmap {{ 0 : goto {endpoint} }}"
        )));
        assert!(one.contains(&format!(
            "add rule ip kube-proxy {endpoint} ip saddr 10.244.0.11 jump mark-for-masquerade"
        )));
        assert!(one.contains(&format!(
            "add rule ip kube-proxy {endpoint} meta l4proto tcp dnat to 10.244.0.11:80"
        )));
        assert!(one.contains(
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
        ));
        assert!(one.contains(
            "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }"
        ));
        assert!(one.contains("add rule ip kube-proxy masquerading masquerade fully-random"));
        // Chains exist before any element or rule names them.
        let first_reference = one.find(&format!("goto {chain}")).unwrap();
        assert!(
            one.find(&format!("add chain ip kube-proxy {chain}"))
                .unwrap()
                < first_reference
        );
        let two = nftables_ruleset(
            IpFamily::IPv4,
            &[port(&["10.244.0.11:80", "10.244.0.12:80"], None)],
        );
        let line = lines_with(&two, "numgen random mod 2 vmap");
        assert_eq!(line.len(), 1);
        assert!(line[0].contains("0 : goto endpoint-") && line[0].contains(", 1 : goto endpoint-"));
    }

    #[test]
    fn nftables_no_endpoints_and_node_port() {
        let none = nftables_ruleset(IpFamily::IPv4, &[port(&[], Some(30_000))]);
        assert!(none.contains("add element ip kube-proxy no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }"));
        assert!(none.contains(
            "add element ip kube-proxy no-endpoint-nodeports { tcp . 30000 : goto reject-chain }"
        ));
        assert!(!none.contains("add chain ip kube-proxy service-"));
        let node_port =
            nftables_ruleset(IpFamily::IPv4, &[port(&["10.244.0.11:80"], Some(30_000))]);
        let external = nft_external_chain(&port(&[], None));
        assert!(node_port.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30000 : goto {external} }}"
        )));
        assert!(node_port.contains(&format!(
            "add rule ip kube-proxy {external} jump mark-for-masquerade"
        )));
        assert!(node_port.contains("services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"));
    }

    #[test]
    fn nftables_ipv6() {
        let rules = nftables_ruleset(IpFamily::IPv6, &[port(&["[fd00:10:244::b]:80"], None)]);
        assert!(rules.contains("add table ip6 kube-proxy"));
        assert!(rules.contains("ip6 daddr fd00:10:96::a tcp dport 80 ip6 saddr != fd00:10:244::/64 jump mark-for-masquerade"));
        assert!(rules.contains("dnat to [fd00:10:244::b]:80"));
        let endpoint = nft_endpoint_chain(&port(&[], None), "[fd00:10:244::b]:80".parse().unwrap());
        assert!(endpoint.ends_with("__fd00.10.244..b/80"), "{endpoint}");
    }

    #[test]
    fn proxied_ports_join_services_and_slices() {
        use crate::{
            node::Addresses,
            scenario::{ContainerPort, PodSpec},
            services::{PodEndpoint, ServiceRegistry, ServiceSpec, endpoint_slices},
        };
        let pod = PodSpec {
            namespace: "x".to_owned(),
            name: "a".to_owned(),
            labels: [("pod".to_owned(), "a".to_owned())].into(),
            ports: vec![
                ContainerPort {
                    name: Some("serve-80-tcp".to_owned()),
                    container_port: 80,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("serve-80-udp".to_owned()),
                    container_port: 80,
                    protocol: Protocol::Udp,
                },
            ],
            identity: crate::mtls::PodIdentity::default(),
        };
        let addresses = Addresses {
            v4: Some("10.244.0.11".parse().unwrap()),
            v6: Some("fd00:10:244::b".parse().unwrap()),
        };
        let mut registry = ServiceRegistry::new(&[IpFamily::IPv4, IpFamily::IPv6]);
        let service = registry.create(ServiceSpec::per_pod(&pod)).unwrap().clone();
        let slices = endpoint_slices(
            &service,
            &[PodEndpoint {
                spec: &pod,
                addresses: &addresses,
            }],
        );
        let v6 = proxied_ports(IpFamily::IPv6, [&service], &slices);
        assert_eq!(v6.len(), 2);
        assert_eq!(v6[1].protocol, Protocol::Udp);
        assert_eq!(
            v6[1].endpoints,
            ["[fd00:10:244::b]:80".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(v6[0].cluster_ip, "fd00:10:96::a".parse::<IpAddr>().unwrap());
        let empty = proxied_ports(IpFamily::IPv4, [&service], &[]);
        assert!(empty.iter().all(|port| port.endpoints.is_empty()));
    }
}
