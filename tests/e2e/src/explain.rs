//! The `explain` step: `netwarden explain --agent` asked about a flow on the state the running
//! agent applied, and `netwarden explain --manifests` on the manifests the agent reads, their
//! lines printed (verbose runs) and their verdicts checked against what the scenario expects,
//! which the probes check on the datapath: the explanation an operator gets, live or offline,
//! must agree with what the kernel does.

use std::{fmt, net::IpAddr};

use serde::Deserialize;

use crate::{cli::CliError, scenario::Protocol};

/// Whether the agent must say the flow is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExplainExpectation {
    Allowed,
    Denied,
}

/// One flow to explain: to a pod or external host (`to`), or to a Service (`service`,
/// judged at each of its ready backends).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Explain {
    /// A pod (`namespace/name`) or an external host.
    pub from: String,
    /// A pod or an external host.
    pub to: Option<String>,
    /// A Service, `namespace/name` (the port is then the Service port).
    pub service: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    pub expect: ExplainExpectation,
}

impl fmt::Display for Explain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = match (&self.to, &self.service) {
            (Some(to), _) => to.clone(),
            (None, Some(service)) => format!("service {service}"),
            (None, None) => "?".to_owned(),
        };
        write!(
            f,
            "{} -> {to} {}/{} (expect {})",
            self.from,
            self.protocol,
            self.port,
            format!("{:?}", self.expect).to_lowercase()
        )
    }
}

/// What `netwarden explain -o json` prints.
#[derive(Debug, Deserialize)]
struct Explanation {
    allowed: bool,
    lines: Vec<String>,
}

impl Explain {
    /// The CLI's arguments after `explain --agent SOCKET`: external hosts, which the agent knows
    /// no name of, by their address (`address_of_host`).
    #[must_use]
    pub fn args(&self, address_of_host: &dyn Fn(&str) -> Option<IpAddr>) -> Vec<String> {
        let endpoint = |key: &str| {
            if key.contains('/') {
                key.to_owned()
            } else {
                address_of_host(key).map_or_else(|| key.to_owned(), |address| address.to_string())
            }
        };
        let mut args = vec!["--from".to_owned(), endpoint(&self.from)];
        match (&self.to, &self.service) {
            (Some(to), _) => args.extend(["--to".to_owned(), endpoint(to)]),
            (None, Some(service)) => args.extend(["--to-service".to_owned(), service.clone()]),
            (None, None) => {}
        }
        args.extend([
            "--port".to_owned(),
            self.port.to_string(),
            "--protocol".to_owned(),
            self.protocol.to_string(),
        ]);
        args
    }

    /// What is wrong with the agent's answer (`-o json`), if anything.
    pub fn mismatch(&self, json: &str, command: &str) -> Result<Option<String>, CliError> {
        let explanation: Explanation =
            serde_json::from_str(json).map_err(|source| CliError::Unreadable {
                command: command.to_owned(),
                text: json.to_owned(),
                source,
            })?;
        let wanted = self.expect == ExplainExpectation::Allowed;
        Ok((explanation.allowed != wanted).then(|| {
            format!(
                "the agent explains it {}: {}",
                if explanation.allowed {
                    "allowed"
                } else {
                    "denied"
                },
                explanation.lines.join(" / ")
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain(expect: ExplainExpectation) -> Explain {
        Explain {
            from: "internet".to_owned(),
            to: Some("web/backend".to_owned()),
            service: None,
            port: 8080,
            protocol: Protocol::Tcp,
            expect,
        }
    }

    #[test]
    fn hosts_are_named_by_address_and_pods_by_name() {
        let host = |key: &str| (key == "internet").then(|| "198.18.16.2".parse().unwrap());
        assert_eq!(
            explain(ExplainExpectation::Denied).args(&host).join(" "),
            "--from 198.18.16.2 --to web/backend --port 8080 --protocol TCP"
        );
        let to_service = Explain {
            from: "web/debug".to_owned(),
            to: None,
            service: Some("web/backend".to_owned()),
            port: 80,
            ..explain(ExplainExpectation::Denied)
        };
        assert_eq!(
            to_service.args(&host).join(" "),
            "--from web/debug --to-service web/backend --port 80 --protocol TCP"
        );
        assert_eq!(
            to_service.to_string(),
            "web/debug -> service web/backend TCP/80 (expect denied)"
        );
    }

    #[test]
    fn a_verdict_other_than_the_expected_one_is_a_mismatch() {
        let denied = r#"{"allowed":false,"lines":["TCP 198.18.16.2 -> web/backend (10.244.0.12) port 8080: DENIED","  ingress of web/backend: DENIED"]}"#;
        let expect_denied = explain(ExplainExpectation::Denied);
        assert_eq!(expect_denied.mismatch(denied, "c").unwrap(), None);
        let problem = explain(ExplainExpectation::Allowed)
            .mismatch(denied, "c")
            .unwrap()
            .unwrap();
        assert!(
            problem.starts_with("the agent explains it denied: TCP 198.18.16.2"),
            "{problem}"
        );
        assert!(matches!(
            expect_denied.mismatch("DENIED", "c"),
            Err(CliError::Unreadable { .. })
        ));
    }
}
