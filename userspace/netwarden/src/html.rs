//! Connectivity matrices as a self-contained page: inline CSS and SVG, no script and nothing
//! fetched, so the file opens anywhere (a CI artifact, an air-gapped laptop). Each cell's
//! `<title>` is its tooltip: the verdict on each port and the rules behind it.

use std::fmt::Write as _;

use netwarden_model::Cluster;

use crate::{
    flows::Universe,
    matrix::{Cell, Matrix, Reach},
};

const CELL: usize = 26;
/// Approximate width of a character of the labels' font, to size the label margins.
const CHAR_WIDTH: usize = 8;

/// A page with one matrix.
#[must_use]
pub fn matrix_page(matrix: &Matrix) -> String {
    let ports: Vec<String> = matrix.ports.iter().map(ToString::to_string).collect();
    let title = format!("netwarden connectivity on {}", ports.join(", "));
    page(&title, &[svg(matrix, None, "matrix")])
}

/// A page with the matrix before and after a change on every port that matters, the cells
/// whose reach changed outlined in both.
#[must_use]
pub fn diff_page(universe: &Universe, before: &Cluster, after: &Cluster) -> String {
    let before = Matrix::build(before, universe, &universe.ports);
    let after = Matrix::build(after, universe, &universe.ports);
    page(
        "netwarden diff: connectivity before and after",
        &[
            svg(&before, Some(&after), "before"),
            svg(&after, Some(&before), "after"),
        ],
    )
}

fn page(title: &str, sections: &[String]) -> String {
    let title = escape(title);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
section {{ display: inline-block; vertical-align: top; margin-right: 2em; }}
svg text {{ font: 12px monospace; fill: #222; }}
rect.allowed {{ fill: #2e7d32; }}
rect.partial {{ fill: #f9a825; }}
rect.denied {{ fill: #c62828; }}
rect.none {{ fill: #e0e0e0; }}
rect.changed {{ stroke: #1565c0; stroke-width: 4; }}
rect:hover {{ opacity: 0.7; }}
.legend span {{ display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 0.3em 0 1em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="legend">Rows connect to columns.<span style="background:#2e7d32"></span>allowed<span style="background:#f9a825"></span>allowed on some ports<span style="background:#c62828"></span>denied<span style="background:#e0e0e0"></span>no flow<span style="border:3px solid #1565c0;width:0.6em;height:0.6em"></span>changed. Hover a cell for the rules.</p>
"#
    );
    for section in sections {
        out.push_str(section);
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// One matrix as an SVG grid; with `other`, cells whose reach differs in it are outlined.
fn svg(matrix: &Matrix, other: Option<&Matrix>, name: &str) -> String {
    let labels: Vec<String> = matrix.endpoints.iter().map(ToString::to_string).collect();
    let margin = labels.iter().map(String::len).max().unwrap_or(0) * CHAR_WIDTH + 10;
    let count = labels.len();
    // Column labels are written at 45 degrees, so they need about as much height as width.
    let top = margin * 3 / 4;
    let width = margin + count * CELL + top;
    let height = top + count * CELL + 10;
    let mut out = format!(
        "<section id=\"{name}\"><h2>{name}</h2>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" data-name=\"{name}\">\n"
    );
    for (index, label) in labels.iter().enumerate() {
        let y = top + index * CELL + CELL / 2 + 4;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{y}\" text-anchor=\"end\">{}</text>",
            margin - 6,
            escape(label)
        );
        let x = margin + index * CELL + CELL / 2;
        let _ = writeln!(
            out,
            "<text transform=\"translate({x},{}) rotate(-45)\">{}</text>",
            top - 6,
            escape(label)
        );
    }
    for (row, cells) in matrix.cells.iter().enumerate() {
        for (column, cell) in cells.iter().enumerate() {
            let reach = cell.as_ref().map(Cell::reach);
            let class = match reach {
                None => "none",
                Some(Reach::All) => "allowed",
                Some(Reach::Some) => "partial",
                Some(Reach::None) => "denied",
            };
            let changed = other.is_some_and(|other| {
                other.cells[row][column].as_ref().map(Cell::reach) != reach
                    || other.cells[row][column].as_ref().map(|cell| &cell.allowed)
                        != cell.as_ref().map(|cell| &cell.allowed)
            });
            let title = match cell {
                None => format!("{} -> {}: no flow", labels[row], labels[column]),
                Some(cell) => format!(
                    "{} -> {}\n{}",
                    labels[row],
                    labels[column],
                    cell.explanation.join("\n")
                ),
            };
            let _ = writeln!(
                out,
                "<rect class=\"{class}{}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"><title>{}</title></rect>",
                if changed { " changed" } else { "" },
                margin + column * CELL + 1,
                top + row * CELL + 1,
                CELL - 2,
                CELL - 2,
                escape(&title)
            );
        }
    }
    out.push_str("</svg></section>\n");
    out
}

/// Escapes text for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{diff_page, escape, matrix_page};
    use crate::{flows::Universe, matrix::Matrix};

    const PODS: &str = r"
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
    const DENY_WEB: &str = r"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {matchLabels: {app: web}}}
";

    fn cluster(text: &str) -> netwarden_model::Cluster {
        let (cluster, errors) = netwarden_model::cluster_of_stream("c.yaml", text);
        assert!(errors.is_empty(), "{errors:?}");
        cluster
    }

    #[test]
    fn a_page_has_a_cell_per_pair_coloured_by_verdict_with_the_rules_as_tooltip() {
        let cluster = cluster(&format!("{PODS}{DENY_WEB}"));
        let universe = Universe::of(&[&cluster]);
        let page = matrix_page(&Matrix::build(&cluster, &universe, &universe.ports));
        // Two pods and the outside: 3 x 3 cells.
        assert_eq!(page.matches("<rect ").count(), 9);
        assert_eq!(page.matches("class=\"denied\"").count(), 2, "{page}");
        assert!(page.contains(
            "<title>x/client -&gt; x/web\nTCP 80: DENIED\n  egress of x/client (10.0.0.2): allowed, no NetworkPolicy isolates it in this direction\n  ingress of x/web (10.0.0.1): DENIED, isolated by NetworkPolicy x/deny; no rule allows TCP from x/client (10.0.0.2) to port 80"
        ), "{page}");
        assert!(!page.contains("<script"));
    }

    #[test]
    fn a_diff_page_outlines_the_cells_that_changed_in_both_pictures() {
        let before = cluster(PODS);
        let after = cluster(&format!("{PODS}{DENY_WEB}"));
        let universe = Universe::of(&[&before, &after]);
        let page = diff_page(&universe, &before, &after);
        assert_eq!(page.matches("<svg ").count(), 2);
        // client -> web and outside -> web, in each picture.
        assert_eq!(page.matches(" changed\"").count(), 4, "{page}");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
