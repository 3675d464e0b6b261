//! `netwarden matrix`: who can reach whom, as the reference evaluator judges it, for one port or
//! for every port that matters ([`crate::flows`]), as text or as a page with an SVG grid whose
//! cells show the rules behind them on hover.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context as _;
use netwarden_model::{Cluster, Protocol};

use crate::{
    explain,
    flows::{Endpoint, FlowKey, PortProbe, Universe, judge},
    html,
    snapshot::{self, ManifestSource},
};

/// `netwarden matrix`.
#[derive(clap::Args)]
pub struct MatrixOptions {
    /// Manifests describing the cluster: a directory, a file, or `-` for standard input;
    /// repeat it to read several (the first to hold an object wins).
    #[arg(long, required_unless_present = "cluster")]
    pub manifests: Vec<String>,
    /// Read the live cluster instead (kubeconfig from `KUBECONFIG` or `~/.kube/config`, or
    /// in-cluster).
    #[arg(long, conflicts_with = "manifests")]
    pub cluster: bool,
    /// One destination port; every port that matters when absent.
    #[arg(long)]
    pub port: Option<u16>,
    /// The protocol of `--port`: TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP", requires = "port")]
    pub protocol: String,
    /// Also write the matrix as a page (HTML with SVG) to this file.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

/// The verdicts between every pair of endpoints on some ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    /// Rows (clients) and columns (servers) alike.
    pub endpoints: Vec<Endpoint>,
    /// The ports tried.
    pub ports: Vec<PortProbe>,
    /// `cells[row][column]`; `None` where no flow is judged (an endpoint with itself, two
    /// outside addresses, two address families).
    pub cells: Vec<Vec<Option<Cell>>>,
}

/// The verdicts between one client and one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// Ports on which the flow is allowed.
    pub allowed: Vec<PortProbe>,
    /// Ports on which it is denied.
    pub denied: Vec<PortProbe>,
    /// Each port's verdict and the rules behind it, as `netwarden explain` says them.
    pub explanation: Vec<String>,
}

/// What a cell shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Allowed on every port tried.
    All,
    /// Allowed on some ports only.
    Some,
    /// Denied on every port tried.
    None,
}

impl Cell {
    /// Allowed on all, some or none of the ports.
    #[must_use]
    pub fn reach(&self) -> Reach {
        match (self.allowed.is_empty(), self.denied.is_empty()) {
            (false, true) => Reach::All,
            (false, false) => Reach::Some,
            (true, _) => Reach::None,
        }
    }
}

impl Matrix {
    /// Judges every flow of `universe`'s endpoints on `ports` in `cluster`.
    #[must_use]
    pub fn build(cluster: &Cluster, universe: &Universe, ports: &[PortProbe]) -> Self {
        let endpoints = universe.endpoints.clone();
        let cells = endpoints
            .iter()
            .map(|source| {
                endpoints
                    .iter()
                    .map(|destination| cell(cluster, source, destination, ports))
                    .collect()
            })
            .collect();
        Self {
            endpoints,
            ports: ports.to_vec(),
            cells,
        }
    }
}

fn cell(
    cluster: &Cluster,
    source: &Endpoint,
    destination: &Endpoint,
    ports: &[PortProbe],
) -> Option<Cell> {
    if source == destination || !(source.is_pod() || destination.is_pod()) {
        return None;
    }
    let mut result = Cell {
        allowed: Vec::new(),
        denied: Vec::new(),
        explanation: Vec::new(),
    };
    for port in ports {
        let flow = FlowKey {
            source: source.clone(),
            destination: destination.clone(),
            port: *port,
        };
        let verdict = judge(cluster, &flow)?;
        let allowed = verdict.allowed();
        result.explanation.push(format!(
            "{port}: {}",
            if allowed { "ALLOWED" } else { "DENIED" }
        ));
        let (source_ip, destination_ip) = (source.address(cluster)?, destination.address(cluster)?);
        result.explanation.extend(
            explain::verdict_lines(
                cluster,
                &verdict,
                source_ip,
                destination_ip,
                port.port,
                port.protocol,
            )
            .into_iter()
            .map(|line| format!("  {line}")),
        );
        if allowed {
            result.allowed.push(*port);
        } else {
            result.denied.push(*port);
        }
    }
    Some(result)
}

/// Runs `matrix`.
pub fn run(options: &MatrixOptions) -> anyhow::Result<()> {
    let MatrixOptions {
        manifests,
        cluster: live,
        port,
        protocol,
        html: html_path,
    } = options;
    let mut cluster = if *live {
        crate::live::cluster().context("reading the live cluster")?
    } else {
        let mut cluster = Cluster::default();
        for manifests in manifests {
            let source = ManifestSource::parse(manifests);
            let read = snapshot::load(&source).with_context(|| format!("reading {source}"))?;
            snapshot::merge_shared(&mut cluster, &read);
        }
        cluster
    };
    snapshot::address_unaddressed_pods(&mut cluster);
    let universe = Universe::of(&[&cluster]);
    let ports = match port {
        Some(port) => {
            let protocol = Protocol::from_api(&protocol.to_ascii_uppercase())
                .with_context(|| format!("--protocol {protocol:?}: expected TCP, UDP or SCTP"))?;
            vec![PortProbe {
                protocol,
                port: *port,
                any_other: false,
            }]
        }
        None => universe.ports.clone(),
    };
    let matrix = Matrix::build(&cluster, &universe, &ports);
    print!("{}", text(&matrix));
    if let Some(path) = html_path {
        let page = html::matrix_page(&matrix);
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The matrix as text: client rows, server columns; `.` allowed, `X` denied, `~` allowed on
/// some ports (listed below the grid), `-` no flow. Columns are numbered, since the labels are
/// long; the number is the row's.
#[must_use]
pub fn text(matrix: &Matrix) -> String {
    let ports: Vec<String> = matrix.ports.iter().map(ToString::to_string).collect();
    let mut out = format!("connectivity on {}\n", ports.join(", "));
    let labels: Vec<String> = matrix
        .endpoints
        .iter()
        .enumerate()
        .map(|(index, endpoint)| format!("{:>2} {endpoint}", index + 1))
        .collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0);
    let _ = write!(out, "{:<width$} ", "from \\ to");
    for index in 1..=matrix.endpoints.len() {
        let _ = write!(out, "{index:>3}");
    }
    out.push('\n');
    let mut partial = Vec::new();
    for (row, label) in labels.iter().enumerate() {
        let _ = write!(out, "{label:<width$} ");
        for (column, cell) in matrix.cells[row].iter().enumerate() {
            let mark = match cell.as_ref().map(Cell::reach) {
                None => "-",
                Some(Reach::All) => ".",
                Some(Reach::None) => "X",
                Some(Reach::Some) => {
                    partial.push((row, column));
                    "~"
                }
            };
            let _ = write!(out, "{mark:>3}");
        }
        out.push('\n');
    }
    for (row, column) in partial {
        let Some(cell) = &matrix.cells[row][column] else {
            continue;
        };
        let allowed: Vec<String> = cell.allowed.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "~ {} -> {}: allowed on {} only",
            matrix.endpoints[row].short(),
            matrix.endpoints[column].short(),
            allowed.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use netwarden_model::Protocol;

    use super::{Matrix, Reach, text};
    use crate::flows::{PortProbe, Universe};

    const CLUSTER: &str = r"
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
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
";

    fn matrix(ports: Option<&[PortProbe]>) -> Matrix {
        let (cluster, errors) = netwarden_model::cluster_of_stream("c.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        let universe = Universe::of(&[&cluster]);
        let ports = ports.map_or_else(|| universe.ports.clone(), <[PortProbe]>::to_vec);
        Matrix::build(&cluster, &universe, &ports)
    }

    const HTTP: PortProbe = PortProbe {
        protocol: Protocol::Tcp,
        port: 80,
        any_other: false,
    };

    #[test]
    fn one_port_shows_allowed_and_denied_cells_with_the_rule() {
        let matrix = matrix(Some(&[HTTP]));
        assert_eq!(
            text(&matrix),
            [
                "connectivity on TCP 80",
                r"from \ to                                 1  2  3",
                " 1 x/client                               -  .  .",
                " 2 x/web                                  .  -  .",
                " 3 203.0.113.10 (outside every ipBlock)   .  X  -",
                "",
            ]
            .join("\n")
        );
        let client_to_web = matrix.cells[0][1].as_ref().unwrap();
        assert_eq!(client_to_web.reach(), Reach::All);
        assert!(
            client_to_web.explanation.iter().any(|line| line.contains(
                "ingress of x/web (10.0.0.1): allowed by NetworkPolicy x/web spec.ingress[0].from[0].ports[0]"
            )),
            "{:?}",
            client_to_web.explanation
        );
        let outside_to_web = matrix.cells[2][1].as_ref().unwrap();
        assert_eq!(outside_to_web.reach(), Reach::None);
    }

    #[test]
    fn every_port_marks_partial_cells_and_lists_what_they_allow() {
        let matrix = matrix(None);
        let report = text(&matrix);
        assert!(
            report.contains("~ x/client -> x/web: allowed on TCP 80 only\n"),
            "{report}"
        );
        assert_eq!(matrix.cells[0][1].as_ref().unwrap().reach(), Reach::Some);
    }
}
