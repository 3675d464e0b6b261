//! `netwarden diff OLD NEW`: the flows a change of manifests opens and closes, grouped by the
//! policy rule (or isolation) that makes the difference, as the reference evaluator judges them.
//!
//! Both sides are judged on the same flows ([`Universe::of`] both clusters); a flow one of whose
//! pods exists on one side only is not compared, since no policy change opened or closed it.
//! The exit code is 1 when the change closes a flow, so a CI job can stop a change that cuts
//! traffic off until someone looks; 0 otherwise; 2 on an error.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::PathBuf,
};

use anyhow::Context as _;
use netwarden_model::Cluster;
use netwarden_policy::evaluate::{SideVerdict, Verdict};
use serde::Serialize;

use crate::{
    flows::{Endpoint, FlowKey, PortProbe, Universe, judge},
    html,
    snapshot::{self, ManifestSource},
};

/// `netwarden diff`.
#[derive(clap::Args)]
pub struct DiffOptions {
    /// The manifests before the change: a directory, a file, or `-` for standard input.
    pub old: String,
    /// The manifests after the change: a directory, a file, or `-` for standard input.
    pub new: String,
    /// Manifests both sides share (the workloads, when OLD and NEW hold only policies): a
    /// directory or a file. Objects of OLD and NEW win over these.
    #[arg(long = "shared", value_name = "PATH")]
    pub shared: Vec<PathBuf>,
    /// Share the live cluster's Namespaces, Pods and Services (and EndpointSlices) with both
    /// sides (kubeconfig from `KUBECONFIG` or `~/.kube/config`, or in-cluster).
    #[arg(long)]
    pub cluster: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Also write a before/after connectivity page (HTML with SVG) to this file.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

/// How `diff` prints its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For a terminal.
    Text,
    /// One JSON object.
    Json,
    /// GitHub-flavoured Markdown, for a pull request comment or a job summary.
    Markdown,
}

/// Flows a change opened or closed for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    /// The rules, or the isolation, that made the difference.
    pub cause: String,
    /// The flows, in order.
    pub flows: Vec<FlowKey>,
}

/// What a change does to connectivity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Flows denied before and allowed after, by cause. A flow whose two sides both changed
    /// (the client's egress and the server's ingress) is in the group of each.
    pub opened: Vec<Group>,
    /// Flows allowed before and denied after, by cause, as `opened`.
    pub closed: Vec<Group>,
    /// How many flows were opened.
    #[serde(rename = "openedFlows")]
    pub opened_count: usize,
    /// How many flows were closed.
    #[serde(rename = "closedFlows")]
    pub closed_count: usize,
    /// How many flows were judged on both sides.
    pub compared: usize,
    /// Pods on one side only, whose flows were not compared.
    pub pods_only_in_old: Vec<String>,
    /// Pods on one side only, whose flows were not compared.
    pub pods_only_in_new: Vec<String>,
}

impl Diff {
    /// The process exit code: 1 when a flow was closed.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        i32::from(self.closed_count > 0)
    }
}

/// Runs `diff` and returns the exit code.
pub fn run(options: &DiffOptions) -> anyhow::Result<i32> {
    let DiffOptions {
        old,
        new,
        shared,
        cluster,
        format,
        html: html_path,
    } = options;
    let (old_source, new_source) = (ManifestSource::parse(old), ManifestSource::parse(new));
    anyhow::ensure!(
        !(old_source == ManifestSource::Stdin && new_source == ManifestSource::Stdin),
        "only one of OLD and NEW can be standard input"
    );
    let mut shared_cluster = Cluster::default();
    for path in shared {
        let cluster = snapshot::load(&ManifestSource::Path(path.clone()))?;
        snapshot::merge_shared(&mut shared_cluster, &cluster);
    }
    if *cluster {
        let live = crate::live::workloads().context("reading the live cluster")?;
        snapshot::merge_shared(&mut shared_cluster, &live);
    }
    let side = |source: &ManifestSource| -> anyhow::Result<Cluster> {
        let mut cluster = snapshot::load(source).with_context(|| format!("reading {source}"))?;
        snapshot::merge_shared(&mut cluster, &shared_cluster);
        snapshot::address_unaddressed_pods(&mut cluster);
        Ok(cluster)
    };
    let before = side(&old_source)?;
    let after = side(&new_source)?;
    let diff = compare(&before, &after);
    let rendered = match format {
        Format::Text => text(&diff),
        Format::Json => serde_json::to_string_pretty(&diff)? + "\n",
        Format::Markdown => markdown(&diff),
    };
    print!("{rendered}");
    if let Some(path) = html_path {
        let universe = Universe::of(&[&before, &after]);
        let page = html::diff_page(&universe, &before, &after);
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(diff.exit_code())
}

/// Compares the verdicts of `before` and `after` on every flow of both.
#[must_use]
pub fn compare(before: &Cluster, after: &Cluster) -> Diff {
    let universe = Universe::of(&[before, after]);
    let mut opened: BTreeMap<String, Vec<FlowKey>> = BTreeMap::new();
    let mut closed: BTreeMap<String, Vec<FlowKey>> = BTreeMap::new();
    let mut compared = 0;
    let (mut opened_count, mut closed_count) = (0, 0);
    for flow in universe.flows() {
        let (Some(old), Some(new)) = (judge(before, &flow), judge(after, &flow)) else {
            continue;
        };
        compared += 1;
        let groups = match (old.allowed(), new.allowed()) {
            (false, true) => {
                opened_count += 1;
                &mut opened
            }
            (true, false) => {
                closed_count += 1;
                &mut closed
            }
            _ => continue,
        };
        for cause in causes(&old, &new, &flow) {
            groups.entry(cause).or_default().push(flow.clone());
        }
    }
    let only_in = |one: &Cluster, other: &Cluster| {
        one.pods
            .keys()
            .filter(|pod| !other.pods.contains_key(*pod))
            .map(ToString::to_string)
            .collect()
    };
    let groups = |map: BTreeMap<String, Vec<FlowKey>>| {
        map.into_iter()
            .map(|(cause, flows)| Group { cause, flows })
            .collect()
    };
    Diff {
        opened: groups(opened),
        closed: groups(closed),
        opened_count,
        closed_count,
        compared,
        pods_only_in_old: only_in(before, after),
        pods_only_in_new: only_in(after, before),
    }
}

/// Why a flow's verdict changed: for each side whose verdict flipped, the rules that now allow
/// it, or the policies that now isolate it and the rules that no longer allow it.
fn causes(old: &Verdict, new: &Verdict, flow: &FlowKey) -> Vec<String> {
    let sides = [
        ("egress", &flow.source, &old.egress, &new.egress),
        ("ingress", &flow.destination, &old.ingress, &new.ingress),
    ];
    let mut reasons = Vec::new();
    for (direction, pod, old, new) in sides {
        if old.allows() == new.allows() {
            continue;
        }
        let pod = pod.short();
        reasons.push(match (old, new) {
            (_, SideVerdict::Allowed(rules)) => format!("allowed by {}", join(rules)),
            (_, SideVerdict::ClusterAccepted(rule)) => format!("allowed by {rule}"),
            (SideVerdict::ClusterDenied(rule), _) => {
                format!("{direction} of {pod} no longer denied by {rule}")
            }
            (_, SideVerdict::ClusterDenied(rule)) => {
                format!("{direction} of {pod} denied by {rule}")
            }
            (SideVerdict::Denied(policies), _) => format!(
                "{direction} of {pod} no longer isolated by {}",
                join_policies(policies)
            ),
            (SideVerdict::Allowed(rules), SideVerdict::Denied(policies)) => format!(
                "no longer allowed by {} ({direction} isolated by {})",
                join(rules),
                join_policies(policies)
            ),
            (_, SideVerdict::Denied(policies)) => format!(
                "{direction} of {pod} isolated by {} and no rule allows it",
                join_policies(policies)
            ),
            _ => format!("{direction} of {pod} changed"),
        });
    }
    reasons
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_policies(policies: &[netwarden_model::PolicyRef]) -> String {
    let names: Vec<String> = policies
        .iter()
        .map(|policy| format!("NetworkPolicy {policy}"))
        .collect();
    names.join(", ")
}

/// A group's flows, one line per source and destination with their ports.
fn flow_lines(flows: &[FlowKey]) -> Vec<(String, String, String)> {
    let mut by_pair: BTreeMap<(&Endpoint, &Endpoint), BTreeSet<PortProbe>> = BTreeMap::new();
    for flow in flows {
        by_pair
            .entry((&flow.source, &flow.destination))
            .or_default()
            .insert(flow.port);
    }
    by_pair
        .into_iter()
        .map(|((source, destination), ports)| {
            let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
            (
                source.to_string(),
                destination.to_string(),
                ports.join(", "),
            )
        })
        .collect()
}

fn headline(diff: &Diff) -> String {
    let listed: usize = diff
        .opened
        .iter()
        .chain(&diff.closed)
        .map(|group| group.flows.len())
        .sum();
    let both_sides = if listed > diff.opened_count + diff.closed_count {
        "; a flow both of whose sides changed is listed under each"
    } else {
        ""
    };
    format!(
        "{} flows opened, {} closed ({} compared{both_sides})",
        diff.opened_count, diff.closed_count, diff.compared
    )
}

/// The plain-text report.
#[must_use]
pub fn text(diff: &Diff) -> String {
    let mut out = format!("netwarden diff: {}\n", headline(diff));
    for (verb, groups) in [("OPENED", &diff.opened), ("CLOSED", &diff.closed)] {
        for group in groups {
            let _ = writeln!(
                out,
                "\n{verb} ({} flows): {}",
                group.flows.len(),
                group.cause
            );
            for (source, destination, ports) in flow_lines(&group.flows) {
                let _ = writeln!(out, "  {source} -> {destination}: {ports}");
            }
        }
    }
    out.push_str(&one_side_pods(diff, ""));
    out
}

/// The Markdown report: a heading with the counts, then a table per group.
#[must_use]
pub fn markdown(diff: &Diff) -> String {
    let mark = if diff.closed_count > 0 {
        ":warning:"
    } else {
        ":white_check_mark:"
    };
    let mut out = format!("### {mark} netwarden diff: {}\n", headline(diff));
    for (verb, groups) in [("Opened", &diff.opened), ("Closed", &diff.closed)] {
        for group in groups {
            let _ = writeln!(
                out,
                "\n**{verb}** ({} flows): {}\n\n| from | to | ports |\n|---|---|---|",
                group.flows.len(),
                escape_markdown(&group.cause)
            );
            for (source, destination, ports) in flow_lines(&group.flows) {
                let _ = writeln!(
                    out,
                    "| `{source}` | `{destination}` | {} |",
                    escape_markdown(&ports)
                );
            }
        }
    }
    out.push_str(&one_side_pods(diff, "\n"));
    out
}

fn one_side_pods(diff: &Diff, lead: &str) -> String {
    let mut out = String::new();
    for (side, pods) in [
        ("old", &diff.pods_only_in_old),
        ("new", &diff.pods_only_in_new),
    ] {
        if !pods.is_empty() {
            let _ = writeln!(
                out,
                "{lead}\nonly in {side} (flows not compared): {}",
                pods.join(", ")
            );
        }
    }
    out
}

/// Characters that would break a table cell or start emphasis.
fn escape_markdown(text: &str) -> String {
    text.replace('|', "\\|")
        .replace('*', "\\*")
        .replace('_', "\\_")
}

#[cfg(test)]
mod tests {
    use super::{compare, markdown, text};

    const PODS: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: x, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.2}
";

    const ALLOW_CLIENT: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
";

    const ALLOW_CLIENT_AND_OFFICE: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
    ports: [{port: 80}]
";

    fn cluster(policies: &str) -> netwarden_model::Cluster {
        let (cluster, errors) =
            netwarden_model::cluster_of_stream("c.yaml", &format!("{PODS}\n---\n{policies}"));
        assert!(errors.is_empty(), "{errors:?}");
        cluster
    }

    #[test]
    fn adding_an_isolating_policy_closes_flows_grouped_by_the_isolation_and_exits_1() {
        let diff = compare(&cluster(""), &cluster(ALLOW_CLIENT));
        assert_eq!(diff.opened_count, 0);
        assert_eq!(diff.exit_code(), 1);
        let causes: Vec<&str> = diff.closed.iter().map(|g| g.cause.as_str()).collect();
        assert_eq!(
            causes,
            ["ingress of x/web isolated by NetworkPolicy x/web and no rule allows it"]
        );
        let report = text(&diff);
        // The client keeps port 80; every other port of x/web closes, and everything from
        // outside.
        assert!(
            report.contains("  x/client -> x/web: TCP any other port, UDP any other port\n"),
            "{report}"
        );
        assert!(
            report.contains(
                "  203.0.113.10 (outside every ipBlock) -> x/web: TCP 80, TCP any other port, UDP any other port\n"
            ),
            "{report}"
        );
        assert!(!report.contains("x/client -> x/web: TCP 80"), "{report}");
    }

    #[test]
    fn a_new_ip_block_rule_opens_flows_from_its_piece_of_the_outside_only() {
        let diff = compare(&cluster(ALLOW_CLIENT), &cluster(ALLOW_CLIENT_AND_OFFICE));
        assert_eq!(diff.closed_count, 0);
        assert_eq!(diff.exit_code(), 0);
        assert_eq!(diff.opened.len(), 1);
        let group = &diff.opened[0];
        assert_eq!(
            group.cause,
            "allowed by NetworkPolicy x/web spec.ingress[1].from[0].ports[0]"
        );
        let flows: Vec<String> = group.flows.iter().map(ToString::to_string).collect();
        assert_eq!(
            flows,
            ["192.168.0.1 (ipBlock 192.168.0.0/16) -> x/web TCP 80"]
        );
        // The reverse change closes the same flow, for the reason it was open.
        let back = compare(&cluster(ALLOW_CLIENT_AND_OFFICE), &cluster(ALLOW_CLIENT));
        assert_eq!(back.exit_code(), 1);
        assert_eq!(
            back.closed[0].cause,
            "no longer allowed by NetworkPolicy x/web spec.ingress[1].from[0].ports[0] (ingress isolated by NetworkPolicy x/web)"
        );
    }

    #[test]
    fn removing_a_policy_opens_what_it_isolated_and_markdown_renders_tables() {
        let diff = compare(&cluster(ALLOW_CLIENT), &cluster(""));
        assert_eq!(diff.closed_count, 0);
        assert_eq!(
            diff.opened[0].cause,
            "ingress of x/web no longer isolated by NetworkPolicy x/web"
        );
        let report = markdown(&diff);
        assert!(
            report.starts_with(
                "### :white_check_mark: netwarden diff: 5 flows opened, 0 closed (18 compared)\n"
            ),
            "{report}"
        );
        assert!(
            report.contains("| `x/client` | `x/web` | TCP any other port, UDP any other port |"),
            "{report}"
        );
    }

    #[test]
    fn pods_on_one_side_only_are_listed_not_compared() {
        let extra = r"
apiVersion: v1
kind: Pod
metadata: {name: new, namespace: x}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.3}
";
        let diff = compare(&cluster(""), &cluster(extra));
        assert_eq!(diff.opened_count + diff.closed_count, 0);
        assert_eq!(diff.pods_only_in_new, ["x/new"]);
        assert!(text(&diff).contains("only in new (flows not compared): x/new"));
    }
}
