//! The one interpreter of scenario steps, over the backends that can play them.
//!
//! A backend answers two questions. [`Capabilities`]: can it run this scenario's model, and
//! what does it do with each step (play it, leave it out, or give up on the scenario)? Those
//! answers are asked before anything is built, so a scenario a backend cannot run costs
//! nothing and is reported with the reason. [`Driver`]: how it makes each change and each
//! check. [`plan`] and [`play`] are the only places that walk a scenario's steps; a backend
//! never decides what a step means or in which order things happen, only how its world does
//! them.
//!
//! Backends: the simulated node in network namespaces with the real agent (`runner`), and a
//! kind cluster driven through kubectl (`kind`).

use indexmap::IndexMap;

use crate::{
    explain::Explain,
    mtls::{ExpectAgentLog, IdentityCheck, MtlsProbe},
    observe::Observe,
    scenario::{
        ConnectionExpectation, ContainerPort, Delivery, Dial, Labels, ProbeVia, Protocol, Quote,
        Resolve, RestartMode, Scenario, SpoofedSource, Step,
    },
};

/// What a backend does with one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    /// The backend plays the step.
    Play,
    /// The step means nothing here (an agent's log when no agent runs): it is left out and the
    /// scenario goes on.
    Skip(String),
    /// The backend cannot give what the step needs: the whole scenario is skipped, because
    /// what comes after the step would be judged on a world that is not the scenario's.
    Unsupported(String),
}

/// What a backend can run; asked before any of a scenario is built.
pub trait Capabilities {
    /// Why the scenario's model (families, hosts, agent arguments, Services) cannot run here,
    /// if it cannot.
    fn unsupported_model(&self, scenario: &Scenario) -> Option<String>;

    /// What the backend does with `step`.
    fn supports(&self, step: &Step) -> Support;
}

/// A scenario's steps as a backend will play them.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Per step, in order: why it is left out, or `None` when it is played.
    left_out: Vec<Option<String>>,
}

/// Why a scenario cannot run on a backend.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CannotRun(pub String);

/// Asks `backend` about the model, then about every step. The first step it cannot play
/// makes the whole scenario unrunnable, named with the step.
pub fn plan(backend: &impl Capabilities, scenario: &Scenario) -> Result<Plan, CannotRun> {
    if let Some(reason) = backend.unsupported_model(scenario) {
        return Err(CannotRun(reason));
    }
    let mut left_out = Vec::with_capacity(scenario.steps.len());
    for step in &scenario.steps {
        match backend.supports(step) {
            Support::Play => left_out.push(None),
            Support::Skip(reason) => left_out.push(Some(reason)),
            Support::Unsupported(reason) => return Err(CannotRun(format!("{step}: {reason}"))),
        }
    }
    Ok(Plan { left_out })
}

/// The step being played: its 1-based number and the step, for the backend's messages.
#[derive(Clone, Copy, Debug)]
pub struct At<'a> {
    pub number: usize,
    pub step: &'a Step,
}

/// An `add_pod` step's fields.
#[derive(Clone, Copy, Debug)]
pub struct NewPod<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    pub labels: &'a Labels,
    /// `None`: the model's default ports.
    pub ports: Option<&'a [ContainerPort]>,
    /// The endpoint whose addresses the pod takes over.
    pub reuse_ip_of: Option<&'a str>,
    /// Whether the Pod object is written now (or by a later `publish_pod`).
    pub publish: bool,
}

/// A `send_spoofed` step's fields.
#[derive(Clone, Copy, Debug)]
pub struct Spoofed<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub source: &'a SpoofedSource,
    /// `None`: a raw IP datagram; `Some(n)`: an Ethernet frame inside `n` VLAN-0 tags.
    pub frame_tags: Option<u8>,
    pub expect: Delivery,
}

/// What changed the cluster, for what the backend waits for afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Objects were written or deleted, or pods wired or removed.
    Objects,
    /// The agent was restarted.
    AgentRestart,
}

/// A step the interpreter handed to a backend whose [`Capabilities`] said it plays it, yet the
/// backend has no way to: the two disagree.
#[derive(Debug, thiserror::Error)]
#[error("{op} is not played by this backend, yet its capabilities did not rule it out")]
pub struct NotPlayable {
    pub op: &'static str,
}

/// What a check found wrong: finished lines of the scenario's report, in order.
pub type Findings = Vec<String>;

/// How a backend plays each step. Changes return once made; [`Driver::settle`] then waits for
/// them to take effect. Checks return what they found wrong and fail only when they could not
/// check at all.
///
/// The harness-only ops default to [`NotPlayable`]: a backend that leaves them out says so in
/// its [`Capabilities`], and the interpreter never calls them.
pub trait Driver {
    type Error: From<NotPlayable>;

    /// Announces a step before it is played (or left out, with `left_out`).
    fn begin_step(&mut self, at: At<'_>, left_out: Option<&str>);

    /// Builds the model: namespaces, pods and hosts, the agent, and waits until it is ready.
    async fn set_up(&mut self) -> Result<(), Self::Error>;

    /// `create_policy` and `update_policy`: writes the policy with its placeholders filled.
    async fn write_policy(&mut self, policy: &str) -> Result<(), Self::Error>;
    async fn delete_policy(&mut self, policy: &str) -> Result<(), Self::Error>;
    async fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), Self::Error>;
    /// Sets the complete new label sets of the pods and namespaces named.
    async fn relabel(
        &mut self,
        pod_labels: &IndexMap<String, Labels>,
        namespace_labels: &IndexMap<String, Labels>,
    ) -> Result<(), Self::Error>;
    async fn add_pod(&mut self, pod: NewPod<'_>) -> Result<(), Self::Error>;
    async fn delete_pod(&mut self, pod: &str) -> Result<(), Self::Error>;
    async fn restart_agent(&mut self, mode: RestartMode) -> Result<(), Self::Error>;
    /// After every change: waits until it has taken effect, as far as the backend can see.
    async fn settle(&mut self, change: Change) -> Result<(), Self::Error>;

    async fn probe(&mut self, at: At<'_>) -> Result<Findings, Self::Error>;

    async fn publish_pod(&mut self, _pod: &str) -> Result<(), Self::Error> {
        Err(NotPlayable { op: "publish_pod" }.into())
    }
    async fn create_service(&mut self, _service: &str) -> Result<(), Self::Error> {
        Err(NotPlayable {
            op: "create_service",
        }
        .into())
    }
    async fn delete_service(&mut self, _service: &str) -> Result<(), Self::Error> {
        Err(NotPlayable {
            op: "delete_service",
        }
        .into())
    }
    async fn dial(&mut self, _at: At<'_>, _dial: &Dial) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "dial" }.into())
    }
    async fn resolve(&mut self, _at: At<'_>, _resolve: &Resolve) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "resolve" }.into())
    }
    async fn open_connection(
        &mut self,
        _name: &str,
        _ends: (&str, &str),
        _port: u16,
        _protocol: Protocol,
        _via: ProbeVia,
    ) -> Result<(), Self::Error> {
        Err(NotPlayable {
            op: "open_connection",
        }
        .into())
    }
    async fn check_connection(
        &mut self,
        _at: At<'_>,
        _name: &str,
        _expect: ConnectionExpectation,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable {
            op: "check_connection",
        }
        .into())
    }
    async fn send_spoofed(
        &mut self,
        _at: At<'_>,
        _spoofed: Spoofed<'_>,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "send_spoofed" }.into())
    }
    async fn icmp_error(
        &mut self,
        _at: At<'_>,
        _connection: &str,
        _quote: Quote,
        _expect: Delivery,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "icmp_error" }.into())
    }
    async fn mtls_probe(
        &mut self,
        _at: At<'_>,
        _probe: &MtlsProbe,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "mtls_probe" }.into())
    }
    async fn identity_check(
        &mut self,
        _at: At<'_>,
        _check: &IdentityCheck,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable {
            op: "identity_check",
        }
        .into())
    }
    async fn expect_agent_log(
        &mut self,
        _at: At<'_>,
        _expect: &ExpectAgentLog,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable {
            op: "expect_agent_log",
        }
        .into())
    }
    /// `observe`: what the agent's observe endpoint reports, checked against what the step
    /// expects.
    async fn observe_flows(
        &mut self,
        _at: At<'_>,
        _observe: &Observe,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "observe" }.into())
    }
    /// `explain`: the agent's explanation of a flow, checked against what the step expects.
    async fn explain_flow(
        &mut self,
        _at: At<'_>,
        _explain: &Explain,
    ) -> Result<Findings, Self::Error> {
        Err(NotPlayable { op: "explain" }.into())
    }
}

/// Why playing a scenario stopped.
#[derive(Debug, thiserror::Error)]
pub enum PlayError<E> {
    /// Building the model failed.
    #[error("{0}")]
    SetUp(E),
    /// A step could not be played (not: a check found something wrong).
    #[error("step {number} ({step}): {source}")]
    Step {
        number: usize,
        /// The step as the scenario's report shows it.
        step: String,
        source: E,
    },
}

/// Plays `scenario` on `driver` as `plan` says: the model, then every step in order, each
/// change followed by [`Driver::settle`]. Returns what the checks found wrong, or, when a
/// step could not be played, what they had found before it with the error.
pub async fn play<D: Driver>(
    driver: &mut D,
    scenario: &Scenario,
    plan: &Plan,
) -> (Findings, Result<(), PlayError<D::Error>>) {
    debug_assert_eq!(plan.left_out.len(), scenario.steps.len(), "planned for it");
    let mut findings = Findings::new();
    if let Err(error) = driver.set_up().await {
        return (findings, Err(PlayError::SetUp(error)));
    }
    for (index, (step, left_out)) in scenario.steps.iter().zip(&plan.left_out).enumerate() {
        let at = At {
            number: index + 1,
            step,
        };
        driver.begin_step(at, left_out.as_deref());
        if left_out.is_some() {
            continue;
        }
        match play_step(driver, at).await {
            Ok(found) => findings.extend(found),
            Err(source) => {
                let error = PlayError::Step {
                    number: at.number,
                    step: step.to_string(),
                    source,
                };
                return (findings, Err(error));
            }
        }
    }
    (findings, Ok(()))
}

async fn play_step<D: Driver>(driver: &mut D, at: At<'_>) -> Result<Findings, D::Error> {
    match make_change(driver, at.step).await? {
        Some(change) => {
            driver.settle(change).await?;
            Ok(Findings::new())
        }
        None => check(driver, at).await,
    }
}

/// Makes `step`'s change; `None` when the step is a check.
async fn make_change<D: Driver>(driver: &mut D, step: &Step) -> Result<Option<Change>, D::Error> {
    match step {
        Step::CreatePolicy { policy } | Step::UpdatePolicy { policy } => {
            driver.write_policy(policy).await?;
        }
        Step::DeletePolicy { policy } => driver.delete_policy(policy).await?,
        Step::DeleteAllPolicies { namespaces } => driver.delete_all_policies(namespaces).await?,
        Step::Relabel {
            pod_labels,
            namespace_labels,
        } => driver.relabel(pod_labels, namespace_labels).await?,
        Step::AddPod {
            pod,
            labels,
            ports,
            reuse_ip_of,
            publish,
        } => {
            let new = NewPod {
                key: pod,
                labels,
                ports: ports.as_deref(),
                reuse_ip_of: reuse_ip_of.as_deref(),
                publish: *publish,
            };
            driver.add_pod(new).await?;
        }
        Step::PublishPod { pod } => driver.publish_pod(pod).await?,
        Step::DeletePod { pod } => driver.delete_pod(pod).await?,
        Step::CreateService { service } => driver.create_service(service).await?,
        Step::DeleteService { service } => driver.delete_service(service).await?,
        Step::RestartAgent { mode } => {
            driver.restart_agent(*mode).await?;
            return Ok(Some(Change::AgentRestart));
        }
        Step::OpenConnection { .. }
        | Step::CheckConnection { .. }
        | Step::Probe { .. }
        | Step::Dial(_)
        | Step::Resolve(_)
        | Step::SendSpoofed { .. }
        | Step::IcmpError { .. }
        | Step::MtlsProbe(_)
        | Step::IdentityCheck(_)
        | Step::ExpectAgentLog(_)
        | Step::Observe(_)
        | Step::Explain(_) => return Ok(None),
    }
    Ok(Some(Change::Objects))
}

/// Plays a step that changes nothing the agent watches: a check, or opening a connection to
/// check later.
async fn check<D: Driver>(driver: &mut D, at: At<'_>) -> Result<Findings, D::Error> {
    match at.step {
        Step::OpenConnection {
            name,
            from,
            to,
            port,
            protocol,
            via,
        } => {
            driver
                .open_connection(name, (from, to), *port, *protocol, *via)
                .await?;
            Ok(Findings::new())
        }
        Step::CheckConnection { name, expect } => driver.check_connection(at, name, *expect).await,
        Step::Probe { .. } => driver.probe(at).await,
        Step::Dial(dial) => driver.dial(at, dial).await,
        Step::Resolve(resolve) => driver.resolve(at, resolve).await,
        Step::SendSpoofed {
            from,
            to,
            source,
            frame_tags,
            expect,
        } => {
            let spoofed = Spoofed {
                from,
                to,
                source,
                frame_tags: *frame_tags,
                expect: *expect,
            };
            driver.send_spoofed(at, spoofed).await
        }
        Step::IcmpError {
            connection,
            quote,
            expect,
        } => driver.icmp_error(at, connection, *quote, *expect).await,
        Step::MtlsProbe(probe) => driver.mtls_probe(at, probe).await,
        Step::IdentityCheck(check) => driver.identity_check(at, check).await,
        Step::ExpectAgentLog(expect) => driver.expect_agent_log(at, expect).await,
        Step::Observe(observe) => driver.observe_flows(at, observe).await,
        Step::Explain(explain) => driver.explain_flow(at, explain).await,
        Step::CreatePolicy { .. }
        | Step::UpdatePolicy { .. }
        | Step::DeletePolicy { .. }
        | Step::DeleteAllPolicies { .. }
        | Step::Relabel { .. }
        | Step::AddPod { .. }
        | Step::PublishPod { .. }
        | Step::DeletePod { .. }
        | Step::CreateService { .. }
        | Step::DeleteService { .. }
        | Step::RestartAgent { .. } => unreachable!("make_change made it"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::scenario;

    /// Two pods, a policy and one step of every kind the fake below tells apart.
    const SCENARIO: &str = r"
format: netwarden-scenario/v1
name: fake
model:
  namespaces: { x: {} }
  container_ports: [ { name: http, containerPort: 80, protocol: TCP } ]
  pods:
    x/a: { labels: { app: a } }
    x/b: {}
policies:
  x/deny:
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: { name: deny }
    spec: { podSelector: {}, ingress: [] }
steps:
- { op: probe, port: 80, expect: { grid: { x/a: '.X', x/b: 'X.' } } }
- { op: create_policy, policy: x/deny }
- { op: expect_agent_log, contains: [deny] }
- { op: restart_agent, mode: graceful }
- { op: probe, port: 80, expect: { grid: { x/a: '..', x/b: '..' } } }
- { op: delete_policy, policy: x/deny }
";

    fn scenario() -> Scenario {
        scenario::parse(Path::new("fake.yaml"), SCENARIO).unwrap()
    }

    /// A backend that records what it is asked, leaves out `expect_agent_log` (as the netns
    /// backend does without an agent), cannot play the op named in `unsupported`, and fails
    /// the step numbered `failing`.
    #[derive(Default)]
    struct Fake {
        unsupported: Option<&'static str>,
        failing: Option<usize>,
        calls: Vec<String>,
        current: usize,
    }

    #[derive(Debug, thiserror::Error)]
    enum FakeError {
        #[error("the fake failed")]
        Failed,
        #[error(transparent)]
        NotPlayable(#[from] NotPlayable),
    }

    impl Fake {
        fn call(&mut self, what: String) -> Result<(), FakeError> {
            self.calls.push(what);
            if self.failing == Some(self.current) {
                return Err(FakeError::Failed);
            }
            Ok(())
        }
    }

    impl Capabilities for Fake {
        fn unsupported_model(&self, scenario: &Scenario) -> Option<String> {
            (scenario.model.pods.len() > 2).then(|| "too many pods".to_owned())
        }

        fn supports(&self, step: &Step) -> Support {
            if self.unsupported == Some(step.op()) {
                Support::Unsupported("not here".to_owned())
            } else if matches!(step, Step::ExpectAgentLog(_)) {
                Support::Skip("no agent".to_owned())
            } else {
                Support::Play
            }
        }
    }

    impl Driver for Fake {
        type Error = FakeError;

        fn begin_step(&mut self, at: At<'_>, left_out: Option<&str>) {
            self.current = at.number;
            self.calls.push(match left_out {
                Some(reason) => format!("{} left out: {reason}", at.number),
                None => format!("{} {}", at.number, at.step.op()),
            });
        }
        async fn set_up(&mut self) -> Result<(), FakeError> {
            self.call("set_up".to_owned())
        }
        async fn write_policy(&mut self, policy: &str) -> Result<(), FakeError> {
            self.call(format!("write {policy}"))
        }
        async fn delete_policy(&mut self, policy: &str) -> Result<(), FakeError> {
            self.call(format!("delete {policy}"))
        }
        async fn delete_all_policies(&mut self, _: &[String]) -> Result<(), FakeError> {
            self.call("delete all".to_owned())
        }
        async fn relabel(
            &mut self,
            _: &IndexMap<String, Labels>,
            _: &IndexMap<String, Labels>,
        ) -> Result<(), FakeError> {
            self.call("relabel".to_owned())
        }
        async fn add_pod(&mut self, pod: NewPod<'_>) -> Result<(), FakeError> {
            self.call(format!("add {}", pod.key))
        }
        async fn delete_pod(&mut self, pod: &str) -> Result<(), FakeError> {
            self.call(format!("delete pod {pod}"))
        }
        async fn restart_agent(&mut self, mode: RestartMode) -> Result<(), FakeError> {
            self.call(format!("restart {mode:?}"))
        }
        async fn settle(&mut self, change: Change) -> Result<(), FakeError> {
            self.calls.push(format!("settle {change:?}"));
            Ok(())
        }
        async fn probe(&mut self, at: At<'_>) -> Result<Findings, FakeError> {
            self.call("probe".to_owned())?;
            Ok(vec![format!("step {} found something", at.number)])
        }
    }

    fn run(fake: &mut Fake) -> Result<(Findings, Result<(), PlayError<FakeError>>), CannotRun> {
        let scenario = scenario();
        let plan = plan(fake, &scenario)?;
        Ok(futures::executor::block_on(play(fake, &scenario, &plan)))
    }

    #[test]
    fn every_change_is_settled_and_left_out_steps_are_announced_not_played() {
        let mut fake = Fake::default();
        let (findings, result) = run(&mut fake).unwrap();
        result.unwrap();
        assert_eq!(
            fake.calls,
            [
                "set_up",
                "1 probe",
                "probe",
                "2 create_policy",
                "write x/deny",
                "settle Objects",
                "3 left out: no agent",
                "4 restart_agent",
                "restart Graceful",
                "settle AgentRestart",
                "5 probe",
                "probe",
                "6 delete_policy",
                "delete x/deny",
                "settle Objects",
            ]
        );
        assert_eq!(
            findings,
            ["step 1 found something", "step 5 found something"]
        );
    }

    #[test]
    fn a_step_the_backend_cannot_play_rules_the_scenario_out_before_anything_is_built() {
        let mut fake = Fake {
            unsupported: Some("restart_agent"),
            ..Fake::default()
        };
        let error = run(&mut fake).map(|_| ()).unwrap_err();
        assert_eq!(error.to_string(), "restart_agent (graceful): not here");
        assert!(fake.calls.is_empty(), "{:?}", fake.calls);
    }

    #[test]
    fn a_model_the_backend_cannot_run_is_ruled_out_first() {
        let mut scenario = scenario();
        let extra = scenario.model.pods["x/b"].clone();
        scenario.model.pods.insert("x/c".to_owned(), extra);
        assert_eq!(
            plan(&Fake::default(), &scenario),
            Err(CannotRun("too many pods".to_owned()))
        );
    }

    #[test]
    fn a_step_that_fails_stops_the_scenario_with_its_number_and_what_was_found_before() {
        let mut fake = Fake {
            failing: Some(4),
            ..Fake::default()
        };
        let (findings, result) = run(&mut fake).unwrap();
        let error = result.unwrap_err();
        assert_eq!(
            error.to_string(),
            "step 4 (restart_agent (graceful)): the fake failed"
        );
        assert_eq!(findings, ["step 1 found something"]);
        assert_eq!(fake.calls.last().unwrap(), "restart Graceful");
    }

    #[test]
    fn an_op_a_backend_does_not_implement_is_an_error_not_a_pass() {
        let mut fake = Fake::default();
        let mut scenario = scenario();
        scenario.steps = vec![Step::PublishPod {
            pod: "x/b".to_owned(),
        }];
        let plan = plan(&fake, &scenario).unwrap();
        let (_, result) = futures::executor::block_on(play(&mut fake, &scenario, &plan));
        assert!(
            matches!(
                result,
                Err(PlayError::Step {
                    source: FakeError::NotPlayable(NotPlayable { op: "publish_pod" }),
                    ..
                })
            ),
            "{result:?}"
        );
    }
}
