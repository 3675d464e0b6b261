//! What the harness prints: connectivity matrices, scenario verdicts and latency statistics.

use std::{fmt::Write as _, time::Duration};

use crate::scenario::{ExpectedGrid, IpFamily};

/// The connectivity one probe observed in one family.
#[derive(Clone, Debug)]
pub struct ObservedGrid {
    pub family: IpFamily,
    /// `reached[row][column]`, `None` on the diagonal.
    pub reached: Vec<Vec<Option<bool>>>,
}

/// A cell whose observation differs from the expectation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub row: String,
    pub column: String,
    pub expected: bool,
    pub got: bool,
    pub family: IpFamily,
}

#[must_use]
pub fn cell(allowed: bool) -> char {
    if allowed { '.' } else { 'X' }
}

/// Every cell of every family that differs from `expected`.
#[must_use]
pub fn mismatches(expected: &ExpectedGrid, observed: &[ObservedGrid]) -> Vec<Mismatch> {
    let mut found = Vec::new();
    for grid in observed {
        for (row, cells) in grid.reached.iter().enumerate() {
            for (column, got) in cells.iter().enumerate() {
                let Some(got) = *got else { continue };
                let wanted = expected.allowed[row][column];
                if got != wanted {
                    found.push(Mismatch {
                        row: expected.endpoints[row].clone(),
                        column: expected.endpoints[column].clone(),
                        expected: wanted,
                        got,
                        family: grid.family,
                    });
                }
            }
        }
    }
    found
}

/// A matrix with client rows and server columns: `.` reached, `X` blocked, `-` the pod itself,
/// and cells that differ from the expectation marked with `!` (and red on a terminal).
#[must_use]
pub fn render_grid(
    title: &str,
    expected: &ExpectedGrid,
    observed: &ObservedGrid,
    color: bool,
) -> String {
    let labels = &expected.endpoints;
    let row_width = labels
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("from \\ to".len());
    let widths: Vec<usize> = labels.iter().map(|label| label.len().max(3)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = write!(out, "  {:<row_width$} ", "from \\ to");
    for (label, width) in labels.iter().zip(&widths) {
        let _ = write!(out, " {label:^width$}");
    }
    out.push('\n');
    for (row, label) in labels.iter().enumerate() {
        let _ = write!(out, "  {label:<row_width$} ");
        for (column, width) in widths.iter().enumerate() {
            let (text, wrong) = match observed.reached[row][column] {
                None => ("-".to_owned(), false),
                Some(got) => {
                    let wrong = got != expected.allowed[row][column];
                    (
                        format!("{}{}", cell(got), if wrong { "!" } else { "" }),
                        wrong,
                    )
                }
            };
            let padded = format!("{text:^width$}");
            if wrong && color {
                let _ = write!(out, " \x1b[1;31m{padded}\x1b[0m");
            } else {
                let _ = write!(out, " {padded}");
            }
        }
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip(String),
}

/// How one scenario went.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: String,
    pub verdict: Verdict,
    /// Differing cells, failed checks and errors, one line each.
    pub details: Vec<String>,
    pub agent_log_tail: Option<String>,
    /// Apply-to-enforced latency of every change step but restarts.
    pub latencies: Vec<Duration>,
    /// From each `restart_agent` to the new agent's first apply (enforcement never stopped:
    /// the pinned programs kept running).
    pub restart_latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl Outcome {
    #[must_use]
    pub fn failed(name: String, detail: String) -> Self {
        Self {
            name,
            verdict: Verdict::Fail,
            details: vec![detail],
            agent_log_tail: None,
            latencies: Vec::new(),
            restart_latencies: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// The verdict line, then (for failures) what went wrong and the agent's last words.
    #[must_use]
    pub fn render(&self, verbose: bool) -> String {
        let mut out = match &self.verdict {
            Verdict::Pass => format!("PASS {}", self.name),
            Verdict::Fail => format!("FAIL {}", self.name),
            Verdict::Skip(reason) => format!("SKIP {}: {reason}", self.name),
        };
        if verbose {
            let _ = write!(out, " ({:.1}s)", self.elapsed.as_secs_f64());
        }
        out.push('\n');
        if self.verdict == Verdict::Fail {
            for detail in &self.details {
                let _ = writeln!(out, "  {detail}");
            }
            if let Some(tail) = self
                .agent_log_tail
                .as_deref()
                .filter(|tail| !tail.is_empty())
            {
                out.push_str("  agent log (last lines):\n");
                for line in tail.lines() {
                    let _ = writeln!(out, "    | {line}");
                }
            }
        }
        out
    }
}

/// `apply-to-enforced latency: steps=N p50=X.Yms p99=X.Yms max=X.Yms`.
#[must_use]
pub fn latency_line(samples: &[Duration]) -> String {
    distribution_line("apply-to-enforced latency", samples)
}

/// `restart-to-reconciled latency: steps=N p50=… p99=… max=…`.
#[must_use]
pub fn restart_latency_line(samples: &[Duration]) -> String {
    distribution_line("restart-to-reconciled latency", samples)
}

fn distribution_line(what: &str, samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let milliseconds = |duration: Duration| duration.as_secs_f64() * 1000.0;
    format!(
        "{what}: steps={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
        sorted.len(),
        milliseconds(percentile(&sorted, 50)),
        milliseconds(percentile(&sorted, 99)),
        milliseconds(sorted.last().copied().unwrap_or_default()),
    )
}

/// Nearest-rank percentile of sorted samples; zero when there are none.
pub fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// `N passed, M failed[, K skipped]`.
#[must_use]
pub fn summary_line(outcomes: &[Outcome]) -> String {
    let count = |wanted: fn(&Verdict) -> bool| {
        outcomes
            .iter()
            .filter(|outcome| wanted(&outcome.verdict))
            .count()
    };
    let passed = count(|verdict| *verdict == Verdict::Pass);
    let failed = count(|verdict| *verdict == Verdict::Fail);
    let skipped = count(|verdict| matches!(verdict, Verdict::Skip(_)));
    let mut line = format!("{passed} passed, {failed} failed");
    if skipped > 0 {
        let _ = write!(line, ", {skipped} skipped");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> ExpectedGrid {
        ExpectedGrid {
            endpoints: vec!["x/a".to_owned(), "x/b".to_owned()],
            allowed: vec![vec![true, false], vec![true, true]],
        }
    }

    #[test]
    fn mismatches_name_cells_and_families() {
        let observed = ObservedGrid {
            family: IpFamily::IPv6,
            reached: vec![vec![None, Some(true)], vec![Some(true), None]],
        };
        let found = mismatches(&grid(), std::slice::from_ref(&observed));
        assert_eq!(
            found,
            [Mismatch {
                row: "x/a".to_owned(),
                column: "x/b".to_owned(),
                expected: false,
                got: true,
                family: IpFamily::IPv6
            }]
        );
        let rendered = render_grid("t", &grid(), &observed, false);
        assert!(rendered.contains(".!"), "{rendered}");
        assert!(rendered.lines().nth(1).unwrap().contains("x/a"));
    }

    #[test]
    fn latency_percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(
            latency_line(&samples),
            "apply-to-enforced latency: steps=100 p50=50.0ms p99=99.0ms max=100.0ms"
        );
        assert_eq!(
            latency_line(&[]),
            "apply-to-enforced latency: steps=0 p50=0.0ms p99=0.0ms max=0.0ms"
        );
        assert_eq!(
            latency_line(&[Duration::from_micros(1500)]),
            "apply-to-enforced latency: steps=1 p50=1.5ms p99=1.5ms max=1.5ms"
        );
    }

    #[test]
    fn summary_counts_skips_only_when_present() {
        let mut outcome = Outcome::failed("a".to_owned(), "boom".to_owned());
        assert_eq!(
            summary_line(std::slice::from_ref(&outcome)),
            "0 passed, 1 failed"
        );
        outcome.verdict = Verdict::Skip("no IPv6".to_owned());
        assert_eq!(summary_line(&[outcome]), "0 passed, 0 failed, 1 skipped");
    }
}
