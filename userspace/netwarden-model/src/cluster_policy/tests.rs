use super::{
    Action, ClusterPeer, ClusterPort, ClusterRule, ClusterSubject, MAX_RULES, Tier, api, convert,
    priority_ties,
};
use crate::{
    Cluster, ModelError, Protocol,
    selector::{LabelSelector, Requirement},
};

fn parse(yaml: &str) -> Result<super::ClusterNetworkPolicy, ModelError> {
    let object: api::ClusterNetworkPolicy =
        serde_yaml::from_str(yaml).expect("test manifest parses");
    convert(&object)
}

fn message(yaml: &str) -> String {
    parse(yaml).expect_err("the policy is invalid").to_string()
}

/// A policy `p` of tier Admin and priority 10 over namespace `x` with these rules.
fn with_rules(rules: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: p}}
spec:
  tier: Admin
  priority: 10
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}}}
{rules}"
    )
}

fn label(key: &str, value: &str) -> LabelSelector {
    LabelSelector {
        requirements: vec![Requirement::In(key.into(), vec![value.into()])],
    }
}

#[test]
fn a_policy_with_every_peer_kind_and_protocol_is_read() {
    let policy = parse(
        "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard}
spec:
  tier: Baseline
  priority: 1000
  subject:
    pods:
      namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchExpressions: [{key: app, operator: Exists}]}
  ingress:
  - name: from-monitoring
    action: Accept
    from: [{namespaces: {matchLabels: {role: monitoring}}}]
    protocols: [{tcp: {destinationPort: {number: 9090}}}, {destinationNamedPort: metrics}]
  - action: Pass
    from: [{pods: {podSelector: {matchLabels: {app: debug}}}}]
  egress:
  - action: Deny
    to:
    - networks: [10.0.0.7/8, 'fd00::/8']
    - nodes: {matchLabels: {kubernetes.io/os: linux}}
    - pods: {namespaceSelector: {}, podSelector: {}}
    protocols: [{udp: {destinationPort: {range: {start: 30000, end: 32767}}}}, {sctp: {destinationPort: {number: 9}}}]
status: {conditions: []}",
    )
    .unwrap();
    assert_eq!(policy.name, "guard");
    assert_eq!(policy.tier, Tier::Baseline);
    assert_eq!(policy.priority, 1000);
    assert_eq!(
        policy.subject,
        ClusterSubject::Pods {
            namespace_selector: label("team", "a"),
            pod_selector: LabelSelector {
                requirements: vec![Requirement::Exists("app".into())]
            },
        }
    );
    assert_eq!(
        policy.ingress,
        [
            ClusterRule {
                name: Some("from-monitoring".into()),
                action: Action::Accept,
                peers: vec![ClusterPeer::Namespaces(label("role", "monitoring"))],
                ports: vec![
                    ClusterPort::Range {
                        protocol: Protocol::Tcp,
                        first: 9090,
                        last: 9090
                    },
                    ClusterPort::Named("metrics".into()),
                ],
            },
            ClusterRule {
                name: None,
                action: Action::Pass,
                peers: vec![ClusterPeer::Pods {
                    namespace_selector: LabelSelector::everything(),
                    pod_selector: label("app", "debug"),
                }],
                ports: vec![],
            },
        ]
    );
    assert_eq!(
        policy.egress,
        [ClusterRule {
            name: None,
            action: Action::Deny,
            peers: vec![
                ClusterPeer::Networks(vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "fd00::/8".parse().unwrap()
                ]),
                ClusterPeer::Nodes(label("kubernetes.io/os", "linux")),
                ClusterPeer::Pods {
                    namespace_selector: LabelSelector::everything(),
                    pod_selector: LabelSelector::everything(),
                },
            ],
            ports: vec![
                ClusterPort::Range {
                    protocol: Protocol::Udp,
                    first: 30000,
                    last: 32767
                },
                ClusterPort::Range {
                    protocol: Protocol::Sctp,
                    first: 9,
                    last: 9
                },
            ],
        }]
    );
    assert!(policy.problems.is_empty(), "{:?}", policy.problems);
}

#[test]
fn the_crd_validation_is_applied_and_names_the_field() {
    let base = |spec: &str| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    };
    let subject = "  subject: {namespaces: {}}\n";
    assert_eq!(
        message(&base(&format!(
            "  tier: Admin\n  priority: 1001\n{subject}"
        ))),
        "ClusterNetworkPolicy p: spec.priority: 1001 is not within 0-1000"
    );
    assert_eq!(
        message(&base(&format!("  tier: Admin\n  priority: -1\n{subject}"))),
        "ClusterNetworkPolicy p: spec.priority: -1 is not within 0-1000"
    );
    assert_eq!(
        message(&base(&format!("  tier: Admin\n{subject}"))),
        "ClusterNetworkPolicy p: spec.priority: is required"
    );
    assert_eq!(
        message(&base(&format!(
            "  tier: Developer\n  priority: 1\n{subject}"
        ))),
        "ClusterNetworkPolicy p: spec.tier: \"Developer\" is neither Admin nor Baseline"
    );
    assert_eq!(
        message(&base(
            "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}, pods: {podSelector: {}}}\n"
        )),
        "ClusterNetworkPolicy p: spec.subject: sets namespaces and pods: exactly one is allowed"
    );
    assert_eq!(
        message(&base(
            "  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}}}\n"
        )),
        "ClusterNetworkPolicy p: spec.subject.pods.podSelector: is required"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Allow, to: [{namespaces: {}}]}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0].action: \"Allow\" is not Accept, Deny or Pass"
    );
    assert_eq!(
        message(&with_rules("  ingress: [{action: Deny, from: []}]")),
        "ClusterNetworkPolicy p: spec.ingress[0].from: must have at least one item"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Deny, to: [{namespaces: {}, networks: [10.0.0.0/8]}]}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0].to[0]: sets namespaces and networks: exactly one field is allowed"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Deny, to: [{networks: [10.0.0.0/33]}]}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0].to[0].networks[0]: \"10.0.0.0/33\" is not a CIDR"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Accept, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: http}]}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0]: networks/nodes/domainNames peer cannot be set with destinationNamedPort: only pods have named ports"
    );
    assert_eq!(
        message(&with_rules(
            "  ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 90, end: 80}}}}]}]"
        )),
        "ClusterNetworkPolicy p: spec.ingress[0].protocols[0].tcp.destinationPort.range: start 90 must be less than end 80"
    );
    assert_eq!(
        message(&with_rules(
            "  ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 0}}}]}]"
        )),
        "ClusterNetworkPolicy p: spec.ingress[0].protocols[0].tcp.destinationPort.number: 0 is not a port (1-65535)"
    );
    assert_eq!(
        message(&with_rules(
            "  ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}, udp: {destinationPort: {number: 53}}}]}]"
        )),
        "ClusterNetworkPolicy p: spec.ingress[0].protocols[0]: sets tcp and udp: exactly one field is allowed"
    );
    assert_eq!(
        message(&with_rules(&format!(
            "  ingress: [{{name: {}, action: Deny, from: [{{namespaces: {{}}}}]}}]",
            "n".repeat(101)
        ))),
        "ClusterNetworkPolicy p: spec.ingress[0].name: is longer than 100 characters"
    );
}

#[test]
fn more_than_25_rules_in_a_direction_are_rejected() {
    let rule = "  - {action: Deny, to: [{namespaces: {}}]}\n";
    let at_most = with_rules(&format!("  egress:\n{}", rule.repeat(MAX_RULES)));
    assert_eq!(parse(&at_most).unwrap().egress.len(), MAX_RULES);
    let over = with_rules(&format!("  egress:\n{}", rule.repeat(MAX_RULES + 1)));
    assert_eq!(
        message(&over),
        "ClusterNetworkPolicy p: spec.egress: has 26 rules; at most 25 are allowed"
    );
}

#[test]
fn unknown_fields_outside_peers_and_protocols_make_the_object_invalid() {
    assert_eq!(
        message(&with_rules("  ingres: []")),
        "ClusterNetworkPolicy p: spec.ingres: unknown field"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Deny, to: [{namespaces: {matchLabel: {a: b}}}]}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0].to[0].namespaces.matchLabel: unknown field",
        "a misspelt selector must not select everything"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Deny, to: [{namespaces: {}}], match: all}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0].match: unknown field"
    );
    assert_eq!(
        message(
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: p}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}"
        ),
        "ClusterNetworkPolicy p: apiVersion: \"policy.networking.k8s.io/v1alpha1\" is not policy.networking.k8s.io/v1alpha2"
    );
}

/// Found by the `watch` fuzz target: an unknown field with an empty name was reported under
/// an empty field path (`ClusterNetworkPolicy p: : unknown field`).
#[test]
fn unknown_fields_that_are_not_plain_names_are_quoted() {
    assert_eq!(
        message(&with_rules("  '': 1")),
        "ClusterNetworkPolicy p: spec[\"\"]: unknown field"
    );
    assert_eq!(
        message(&format!("'': 1\n{}", with_rules(""))),
        "ClusterNetworkPolicy p: [\"\"]: unknown field"
    );
    assert_eq!(
        message(&with_rules(
            "  egress: [{action: Deny, to: [{namespaces: {a.b: 1}}]}]"
        )),
        "ClusterNetworkPolicy p: spec.egress[0].to[0].namespaces[\"a.b\"]: unknown field"
    );
}

#[test]
fn unknown_peer_types_fail_closed_as_upstream_demands() {
    let policy = parse(&with_rules(
        "  egress:
  - {action: Accept, to: [{namespaces: {}}, {services: [{name: web}]}]}
  - {name: pass-unknown, action: Pass, to: [{futurePeer: {}}]}
  - {action: Deny, to: [{}]}
  ingress:
  - {action: Accept, from: [{networks: [10.0.0.0/8]}]}",
    ))
    .unwrap();
    // Accept: the peer it cannot read accepts nothing; the others still do.
    assert_eq!(
        policy.egress[0],
        ClusterRule {
            name: None,
            action: Action::Accept,
            peers: vec![ClusterPeer::Namespaces(LabelSelector::everything())],
            ports: vec![],
        }
    );
    // Pass and Deny: the whole rule denies everything.
    assert_eq!(
        policy.egress[1],
        ClusterRule::deny_everything(Some("pass-unknown".into()))
    );
    assert_eq!(policy.egress[2], ClusterRule::deny_everything(None));
    // `networks` is no ingress peer: an Accept through it accepts nothing.
    assert!(policy.ingress[0].peers.is_empty());
    let messages: Vec<String> = policy.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "ClusterNetworkPolicy p: spec.ingress[0].from[0]: peer type networks is not known to netwarden; this rule accepts nothing through it",
            "ClusterNetworkPolicy p: spec.egress[0].to[1]: peer type services is not known to netwarden; this rule accepts nothing through it",
            "ClusterNetworkPolicy p: spec.egress[1].to[0]: peer type futurePeer is not known to netwarden; this rule denies everything instead",
            "ClusterNetworkPolicy p: spec.egress[2].to[0]: the peer sets no field netwarden knows; this rule denies everything instead",
        ]
    );
}

#[test]
fn unknown_protocols_fail_closed_as_upstream_demands() {
    let policy = parse(&with_rules(
        "  egress:
  - {action: Accept, to: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}, {icmp: {type: 8}}]}
  - {action: Deny, to: [{namespaces: {}}], protocols: [{quic: {destinationPort: {number: 443}}}]}",
    ))
    .unwrap();
    assert!(
        policy.egress[0].peers.is_empty(),
        "an Accept rule with a protocol it cannot read matches nothing"
    );
    assert_eq!(policy.egress[1], ClusterRule::deny_everything(None));
    assert_eq!(policy.problems.len(), 2);
    assert_eq!(
        policy.problems[0].field, "spec.egress[0].protocols[1]",
        "{:?}",
        policy.problems
    );
}

#[test]
fn domain_names_are_rejected_with_a_clear_error_and_enforced_without_their_accept() {
    let policy = parse(&with_rules(
        "  egress:
  - {action: Accept, to: [{domainNames: ['*.example.com']}, {networks: [192.0.2.0/24]}]}
  - {action: Deny, to: [{domainNames: [example.org]}]}",
    ))
    .unwrap();
    assert_eq!(
        policy.egress[0].peers,
        [ClusterPeer::Networks(vec!["192.0.2.0/24".parse().unwrap()])]
    );
    assert_eq!(policy.egress[1], ClusterRule::deny_everything(None));
    assert_eq!(
        policy.problems[0].to_string(),
        "ClusterNetworkPolicy p: spec.egress[0].to[0]: domainNames is not supported by netwarden; this rule accepts nothing through it"
    );
    assert_eq!(
        policy.problems[1].to_string(),
        "ClusterNetworkPolicy p: spec.egress[1].to[0]: domainNames is not supported by netwarden; this rule denies everything instead"
    );
}

#[test]
fn equal_priorities_in_a_tier_are_listed_as_ties_first_by_name() {
    let (cluster, errors) = crate::cluster_of_stream(
        "cnp.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: zeta}
spec: {tier: Admin, priority: 5, subject: {namespaces: {}}}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: alpha}
spec: {tier: Admin, priority: 5, subject: {namespaces: {}}}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: other-tier}
spec: {tier: Baseline, priority: 5, subject: {namespaces: {}}}
",
    );
    assert!(errors.is_empty(), "{errors:?}");
    let ties = priority_ties(&cluster);
    assert_eq!(ties.len(), 1, "{ties:?}");
    assert_eq!(
        ties[0].to_string(),
        "ClusterNetworkPolicies alpha and zeta are both Admin tier, priority 5: where both match a connection, alpha decides (the first by name; upstream leaves it undefined)"
    );
    assert!(priority_ties(&Cluster::default()).is_empty());
}
