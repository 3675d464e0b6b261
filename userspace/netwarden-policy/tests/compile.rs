//! The compiler's output, read the way the datapath reads it.

use std::net::IpAddr;

use netwarden_model::{Cluster, PodRef};
use netwarden_policy::{
    Compiler, DatapathState, Direction, Frontend, FrontendKind,
    lookup::{Decision, decide},
};

const NODE: &str = "node-1";

fn cluster(yaml: &str) -> Cluster {
    let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", yaml);
    assert!(errors.is_empty(), "fixture has errors: {errors:?}");
    cluster
}

fn pod(namespace: &str, name: &str, labels: &str, ip: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\nspec: {{nodeName: {NODE}, containers: [{{name: c, ports: [{ports}]}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn at(namespace: &str, name: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn compile(yaml: &str) -> DatapathState {
    let mut compiler = Compiler::new(NODE);
    compiler.set_node_addresses(&[ip("172.18.0.2")]);
    compiler.sync(cluster(yaml)).clone()
}

const TCP: u8 = 6;
const UDP: u8 = 17;

#[test]
fn pods_no_policy_selects_are_not_restricted() {
    let state = compile(&pod("x", "a", "app: a", "10.0.0.1", ""));
    let decision = decide(
        &state,
        &at("x", "a"),
        Direction::Ingress,
        ip("192.0.2.1"),
        TCP,
        80,
    );
    assert_eq!(decision, Decision::AllowedNotIsolated);
}

#[test]
fn default_deny_then_allow_clients_from_any_namespace_on_a_named_port() {
    let mut yaml = String::new();
    yaml += &pod(
        "x",
        "server",
        "app: server",
        "10.0.0.1",
        "{name: http, containerPort: 8080}",
    );
    yaml += &pod("x", "client", "role: client", "10.0.0.2", "");
    yaml += &pod("y", "client", "role: client", "10.0.0.3", "");
    yaml += &pod("y", "other", "role: other", "10.0.0.4", "");
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}], ports: [{port: http}]}]\n";
    let state = compile(&yaml);
    let server = at("x", "server");
    for client in ["10.0.0.2", "10.0.0.3"] {
        assert!(
            matches!(
                decide(&state, &server, Direction::Ingress, ip(client), TCP, 8080),
                Decision::Allowed(_)
            ),
            "{client}"
        );
        assert_eq!(
            decide(&state, &server, Direction::Ingress, ip(client), TCP, 80),
            Decision::Denied,
            "{client} on another port"
        );
        assert_eq!(
            decide(&state, &server, Direction::Ingress, ip(client), UDP, 8080),
            Decision::Denied,
            "{client} over UDP"
        );
    }
    assert_eq!(
        decide(
            &state,
            &server,
            Direction::Ingress,
            ip("10.0.0.4"),
            TCP,
            8080
        ),
        Decision::Denied
    );
    assert_eq!(
        decide(
            &state,
            &at("x", "client"),
            Direction::Ingress,
            ip("10.0.0.3"),
            TCP,
            8080
        ),
        Decision::Denied,
        "deny covers the whole namespace"
    );
    assert_eq!(
        decide(&state, &server, Direction::Egress, ip("10.0.0.4"), TCP, 80),
        Decision::AllowedNotIsolated,
        "ingress policy leaves egress open"
    );
    assert_eq!(
        decide(
            &state,
            &server,
            Direction::Ingress,
            ip("172.18.0.2"),
            TCP,
            9999
        ),
        Decision::AllowedNode,
        "kubelet probes"
    );
}

#[test]
fn an_address_excepted_by_one_rule_but_allowed_by_another_is_allowed() {
    let mut yaml = pod("x", "a", "app: a", "10.0.0.1", "");
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: one, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]}]\n";
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: two, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 192.168.1.128/25}}], ports: [{port: 443}]}]\n";
    let state = compile(&yaml);
    let a = at("x", "a");
    assert!(decide(&state, &a, Direction::Ingress, ip("192.168.2.1"), UDP, 53).is_allowed());
    assert_eq!(
        decide(&state, &a, Direction::Ingress, ip("192.168.1.1"), TCP, 443),
        Decision::Denied,
        "excepted, and outside the /25"
    );
    assert!(
        decide(
            &state,
            &a,
            Direction::Ingress,
            ip("192.168.1.200"),
            TCP,
            443
        )
        .is_allowed(),
        "excepted by one, allowed by two"
    );
    assert_eq!(
        decide(&state, &a, Direction::Ingress, ip("192.168.1.200"), TCP, 80),
        Decision::Denied,
        "two allows only 443"
    );
    assert_eq!(
        decide(&state, &a, Direction::Ingress, ip("::1"), TCP, 443),
        Decision::Denied
    );
}

#[test]
fn end_port_ranges_and_egress_named_ports_that_differ_between_peers() {
    let mut yaml = pod("x", "client", "app: client", "10.0.0.1", "");
    yaml += &pod(
        "x",
        "web1",
        "app: web, v: one",
        "10.0.0.2",
        "{name: web, containerPort: 8080}",
    );
    yaml += &pod(
        "x",
        "web2",
        "app: web, v: two",
        "10.0.0.3",
        "{name: web, containerPort: 9090}",
    );
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: web}]\n  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]\n    ports: [{port: 32000, endPort: 32767, protocol: UDP}]\n";
    let state = compile(&yaml);
    let client = at("x", "client");
    assert!(
        decide(
            &state,
            &client,
            Direction::Egress,
            ip("10.0.0.2"),
            TCP,
            8080
        )
        .is_allowed()
    );
    assert_eq!(
        decide(
            &state,
            &client,
            Direction::Egress,
            ip("10.0.0.2"),
            TCP,
            9090
        ),
        Decision::Denied
    );
    assert!(
        decide(
            &state,
            &client,
            Direction::Egress,
            ip("10.0.0.3"),
            TCP,
            9090
        )
        .is_allowed()
    );
    assert_eq!(
        decide(
            &state,
            &client,
            Direction::Egress,
            ip("10.0.0.3"),
            TCP,
            8080
        ),
        Decision::Denied
    );
    for port in [32000, 32500, 32767] {
        assert!(
            decide(
                &state,
                &client,
                Direction::Egress,
                ip("198.51.100.7"),
                UDP,
                port
            )
            .is_allowed(),
            "{port}"
        );
    }
    for port in [31999, 32768] {
        assert_eq!(
            decide(
                &state,
                &client,
                Direction::Egress,
                ip("198.51.100.7"),
                UDP,
                port
            ),
            Decision::Denied,
            "{port}"
        );
    }
}

#[test]
fn peers_with_an_existing_label_set_share_identity_and_entries() {
    let mut yaml = pod("x", "server", "app: server", "10.0.0.1", "");
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n";
    let mut compiler = Compiler::new(NODE);
    let one = {
        let mut yaml = yaml.clone();
        yaml += &pod("x", "client-1", "app: client", "10.0.0.2", "");
        compiler.sync(cluster(&yaml)).clone()
    };
    yaml += &pod("x", "client-1", "app: client", "10.0.0.2", "");
    yaml += &pod("x", "client-2", "app: client", "10.0.0.3", "");
    let two = compiler.sync(cluster(&yaml)).clone();
    assert_eq!(
        one.policies, two.policies,
        "a new peer with a known label set changes no policy entry"
    );
    assert_eq!(
        one.endpoints[&at("x", "server")].ingress,
        two.endpoints[&at("x", "server")].ingress
    );
    assert_eq!(two.ipcache.len(), one.ipcache.len() + 1);
}

#[test]
fn services_of_a_manifest_become_frontends_with_stable_ids() {
    let mut yaml = pod(
        "x",
        "web",
        "app: web",
        "10.0.0.1",
        "{name: http, containerPort: 8080}",
    );
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {type: NodePort, clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: x}\nspec: {clusterIP: None, ports: [{port: 5432}]}\n";
    yaml += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{name: http, port: 8080}]\n";
    let mut compiler = Compiler::new(NODE);
    compiler.set_node_addresses(&[ip("172.18.0.2")]);
    let state = compiler.sync(cluster(&yaml)).clone();
    let frontends: Vec<String> = state
        .service_frontends
        .iter()
        .map(|(frontend, info)| format!("{frontend} -> {info}"))
        .collect();
    assert_eq!(
        frontends,
        [
            "10.96.0.10:80/TCP -> Service x/web port http (cluster IP)",
            "172.18.0.2:30080/TCP -> Service x/web port http (node port)",
        ]
    );
    let web = Frontend {
        address: ip("10.96.0.10"),
        protocol: netwarden_model::Protocol::Tcp,
        port: 80,
    };
    let id = state.service_frontends[&web].id;
    assert_ne!(id, 0);
    assert_eq!(state.frontend(id).map(|(frontend, _)| *frontend), Some(web));

    // The same manifests again change nothing; dropping the node port keeps the cluster IP's id.
    assert_eq!(
        compiler.sync(cluster(&yaml)).service_frontends,
        state.service_frontends
    );
    let without_node_port = yaml
        .replace("type: NodePort, ", "")
        .replace(", nodePort: 30080", "");
    let after = compiler.sync(cluster(&without_node_port));
    assert_eq!(after.service_frontends.len(), 1);
    assert_eq!(after.service_frontends[&web].id, id);
    assert_eq!(after.service_frontends[&web].kind, FrontendKind::ClusterIp);
}

/// Two pods with policies of their own (one with ipBlock prefixes), on this node.
fn two_isolated_pods() -> String {
    let mut yaml = pod("x", "a", "app: a", "10.0.0.1", "");
    yaml.push_str(&pod("x", "b", "app: b", "10.0.0.2", ""));
    yaml.push_str(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]
",
    );
    yaml
}

#[test]
fn a_restarted_compiler_reuses_the_pinned_id_of_each_unchanged_policy() {
    // The previous agent saw a policy come and go first.
    let mut previous = Compiler::new(NODE);
    let mut history = two_isolated_pods();
    history.push_str(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: early, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, ingress: [{ports: [{port: 1}]}]}
",
    );
    previous.sync(cluster(&history));
    let pinned = previous.sync(cluster(&two_isolated_pods())).clone();
    assert_eq!(pinned.policies.len(), 2);
    // Rule ids derive from the rules' origin, whatever the history.
    let fresh = Compiler::new(NODE)
        .sync(cluster(&two_isolated_pods()))
        .clone();
    let rules = |state: &DatapathState| {
        let mut rules: Vec<_> = state
            .policies
            .values()
            .flat_map(|policy| policy.entries.values())
            .map(|decided| decided.below.rule)
            .map(|id| (id, state.rules[&id].to_string()))
            .collect();
        rules.sort();
        rules
    };
    assert_eq!(rules(&fresh), rules(&pinned));

    let mut restarted = Compiler::new(NODE);
    restarted.adopt_pinned_policies(pinned.policies.clone());
    let state = restarted.sync(cluster(&two_isolated_pods())).clone();
    let ids = |state: &DatapathState| -> Vec<_> {
        state
            .endpoints
            .values()
            .map(|endpoint| (endpoint.ingress, endpoint.egress))
            .collect()
    };
    assert_eq!(ids(&state), ids(&pinned));
    let keys = |state: &DatapathState| -> Vec<_> {
        state
            .policies
            .iter()
            .map(|(id, policy)| {
                (
                    *id,
                    policy.entries.keys().copied().collect::<Vec<_>>(),
                    policy.cidrs.clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        keys(&state),
        keys(&pinned),
        "same ids, same entries and prefixes"
    );

    // Ids are offered once: a policy compiled later gets a new id above the pinned ones.
    let mut more = two_isolated_pods();
    more.push_str(&pod("x", "c", "app: c", "10.0.0.3", ""));
    more.push_str(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c, namespace: x}
spec: {podSelector: {matchLabels: {app: c}}, ingress: [{ports: [{port: 443}]}]}
",
    );
    let state = restarted.sync(cluster(&more));
    let highest_pinned = pinned.policies.keys().max().copied().unwrap();
    let c = state.endpoints[&at("x", "c")].ingress.unwrap();
    assert!(c > highest_pinned, "{c} > {highest_pinned}");
}

/// Found by the `compiler` fuzz target: the agent sets the node's addresses before every
/// sync, and setting them forgot the pinned policies before the first sync could adopt them,
/// so a restarted agent installed every policy a second time under a new id.
#[test]
fn a_restarted_agent_keeps_the_pinned_ids_though_it_sets_the_node_addresses_first() {
    let node = [ip("172.18.0.2")];
    let mut previous = Compiler::new(NODE);
    previous.set_node_addresses(&node);
    let pinned = previous.sync(cluster(&two_isolated_pods())).clone();

    let mut restarted = Compiler::new(NODE);
    restarted.resume(
        pinned
            .identities
            .iter()
            .map(|(id, info)| (info.digest(), *id))
            .collect(),
        pinned.policies.keys().copied().max().unwrap(),
    );
    restarted.adopt_pinned_policies(pinned.policies.clone());
    restarted.set_node_addresses(&node);
    let state = restarted.sync(cluster(&two_isolated_pods()));
    assert_eq!(state.policies, pinned.policies, "same ids, same content");
    assert_eq!(state.endpoints, pinned.endpoints);
}

/// Found by the `compiler` fuzz target: the rule table kept every rule ever compiled, so it
/// grew with each policy that came and went, and differed from what a restarted agent holds.
#[test]
fn the_rule_table_holds_exactly_the_rules_that_policy_entries_name() {
    let named = |state: &DatapathState| {
        let mut named: Vec<String> = state
            .policies
            .values()
            .flat_map(|policy| policy.entries.values())
            .flat_map(|decided| [decided.admin.rule, decided.below.rule])
            .filter(|id| *id != 0)
            .map(|id| state.rules[&id].to_string())
            .collect();
        named.sort();
        named.dedup();
        named
    };
    let table = |state: &DatapathState| {
        let mut table: Vec<String> = state.rules.values().map(ToString::to_string).collect();
        table.sort();
        table
    };
    // A rule that allows nothing (its peer selects no pod) is named by no entry.
    let mut with_a_rule_allowing_nothing = two_isolated_pods();
    with_a_rule_allowing_nothing.push_str(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: nobody, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {app: none}}}]}]}
",
    );
    let mut compiler = Compiler::new(NODE);
    compiler.set_node_addresses(&[ip("172.18.0.2")]);
    let state = compiler.sync(cluster(&with_a_rule_allowing_nothing));
    assert_eq!(table(state), named(state));
    assert!(!table(state).iter().any(|rule| rule.contains("x/nobody")));

    // A deleted policy's rules leave the table.
    let state = compiler.sync(cluster(&pod("x", "a", "app: a", "10.0.0.1", "")));
    assert_eq!(table(state), Vec::<String>::new());
}

#[test]
fn a_pinned_policy_equal_but_for_rule_ids_keeps_its_id() {
    let previous = Compiler::new(NODE)
        .sync(cluster(&two_isolated_pods()))
        .clone();
    // As an older build, which numbered rules in the order it met them, left them.
    let renumbered = previous.policies.iter().map(|(id, policy)| {
        let mut policy = policy.clone();
        for decided in policy.entries.values_mut() {
            decided.below.rule = decided.below.rule.wrapping_add(1) & 0xff;
        }
        (*id + 10, policy)
    });
    let mut restarted = Compiler::new(NODE);
    restarted.adopt_pinned_policies(renumbered);
    let state = restarted.sync(cluster(&two_isolated_pods()));
    let mut ids: Vec<_> = state.policies.keys().map(|id| id - 10).collect();
    ids.sort_unstable();
    assert_eq!(ids, previous.policies.keys().copied().collect::<Vec<_>>());
    // The content is the compiler's own: the datapath rewrites the rule ids in place.
    assert_eq!(
        state.policies.values().collect::<Vec<_>>(),
        previous.policies.values().collect::<Vec<_>>()
    );
}

#[test]
fn a_direction_only_audit_mode_policies_isolate_is_audited_and_enforced_ones_win() {
    let audit = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x, annotations: {{netwarden.dev/enforcement: audit}}}}\nspec: {spec}\n"
        )
    };
    let mut yaml = pod("x", "a", "app: a", "10.0.0.1", "");
    yaml += &pod("x", "b", "app: b", "10.0.0.2", "");
    yaml += &audit("audit-ingress", "{podSelector: {}, policyTypes: [Ingress]}");
    yaml += &audit(
        "audit-egress-a",
        "{podSelector: {matchLabels: {app: a}}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}]}]}",
    );
    yaml += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: enforced-egress-a, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Egress]}\n";
    let state = compile(&yaml);
    let a = &state.endpoints[&at("x", "a")];
    let b = &state.endpoints[&at("x", "b")];
    // Ingress: only the audit-mode policy isolates either pod.
    assert!(a.ingress.is_some() && a.ingress_audit);
    assert!(b.ingress.is_some() && b.ingress_audit);
    // a's egress: the enforced policy isolates it, and the audit-mode one (which would allow
    // more) is left out of what is enforced.
    assert!(a.egress.is_some() && !a.egress_audit);
    assert_eq!(
        a.egress_isolated_by,
        vec![netwarden_model::PolicyRef {
            namespace: "x".into(),
            name: "enforced-egress-a".into(),
        }]
    );
    // b's egress: nothing isolates it.
    assert!(b.egress.is_none() && !b.egress_audit);
    // What the kernel decides: an audited pass on ingress, a drop on a's enforced egress.
    assert_eq!(
        decide(
            &state,
            &at("x", "b"),
            Direction::Ingress,
            ip("10.0.0.1"),
            TCP,
            80
        ),
        Decision::Audited
    );
    assert_eq!(
        decide(
            &state,
            &at("x", "a"),
            Direction::Egress,
            ip("10.0.0.2"),
            TCP,
            80
        ),
        Decision::Denied
    );

    // The agent's --audit audits even the enforced policy.
    let mut compiler = Compiler::new(NODE).auditing_everything(true);
    compiler.set_node_addresses(&[ip("172.18.0.2")]);
    let state = compiler.sync(cluster(&yaml)).clone();
    let a = &state.endpoints[&at("x", "a")];
    assert!(a.egress_audit && a.ingress_audit);
    assert_eq!(a.egress_isolated_by.len(), 2);
}

#[test]
fn an_unknown_enforcement_mode_is_an_error_naming_the_field() {
    let yaml = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x, annotations: {netwarden.dev/enforcement: warn}}\nspec: {podSelector: {}}\n";
    let (_, errors) = netwarden_model::cluster_of_stream("cluster.yaml", yaml);
    let text = format!("{errors:?}");
    assert!(
        text.contains("metadata.annotations[netwarden.dev/enforcement]") && text.contains("warn"),
        "{text}"
    );
}
