//! The Events the agent posts on NetworkPolicies it cannot enforce, against a mocked API server.
//!
//! As in `watch.rs`, the client's HTTP service is a `tower-test` mock: the test takes each
//! request, checks its method, path and body, and answers as the API server does (`201 Created`
//! with the stored object). Every step waits at most `STEP`.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{Client, Resource as _, client::Body};
use netwarden_kube::events::{DEFAULT_WINDOW, PolicyEvents, Unenforceable};
use netwarden_model::{PolicyRef, convert};
use serde_json::{Value, json};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(10);

type MockBody = BoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<MockBody>>;
type Respond = tower_test::mock::SendResponse<Response<MockBody>>;

fn start(window: Duration) -> (PolicyEvents, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    let events = PolicyEvents::start(Client::new(service, "default"), "node-1", window);
    (events, handle)
}

/// A NetworkPolicy as the API server serves it, with a CIDR the conversion rejects.
fn bad_policy() -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {
            "name": "bad", "namespace": "x", "uid": "0f6c1c8e-3b5e-4d8a-9a51-6f2a7c1d2e3f",
            "resourceVersion": "4711", "generation": 1,
            "creationTimestamp": "2026-11-24T05:00:00Z"
        },
        "spec": {
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}],
            "policyTypes": ["Ingress"]
        }
    }))
    .unwrap()
}

/// The next request, which must be an Event created in `namespace`; answers it as the API
/// server does and returns its body.
async fn next_event(handle: &mut Handle, namespace: &str) -> Value {
    let (request, respond) = timeout(STEP, handle.next_request())
        .await
        .expect("no Event posted in time")
        .expect("the client is gone");
    assert_eq!(request.method(), Method::POST, "{}", request.uri());
    assert_eq!(
        request.uri().path(),
        format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events")
    );
    answer(request, respond).await
}

/// Answers an Event request with the object as stored, and returns the request's body without
/// its generated name and time.
async fn answer(request: Request<Body>, respond: Respond) -> Value {
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let mut event: Value = serde_json::from_slice(&body).unwrap();
    let mut stored = event.clone();
    stored["metadata"]["uid"] = json!("event-uid");
    stored["metadata"]["resourceVersion"] = json!("4712");
    respond.send_response(
        Response::builder()
            .status(201)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(stored.to_string())).boxed())
            .unwrap(),
    );
    // Generated from the clock: checked here, left out of what the callers compare.
    let name = event["metadata"].as_object_mut().unwrap().remove("name");
    assert!(
        name.as_ref()
            .and_then(Value::as_str)
            .is_some_and(|name| name.starts_with("bad.")),
        "{name:?}"
    );
    let event_time = event.as_object_mut().unwrap().remove("eventTime");
    assert!(
        event_time.as_ref().is_some_and(Value::is_string),
        "{event_time:?}"
    );
    event
}

#[tokio::test]
async fn an_invalid_policy_gets_one_warning_naming_the_field_and_the_node() {
    let (mut events, mut api) = start(DEFAULT_WINDOW);
    let policy = bad_policy();
    // The same conversion the source runs, and the same conversion of its error.
    let error = convert::network_policy(&policy).expect_err("the CIDR is invalid");
    let problem = Unenforceable::invalid(&error).expect("a NetworkPolicy error");

    assert!(events.post(policy.object_ref(&()), &problem));
    let event = next_event(&mut api, "x").await;
    assert_eq!(
        event,
        json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"namespace": "x"},
            "type": "Warning",
            "reason": "InvalidField",
            "action": "KeepLastValidVersion",
            "note": format!(
                "spec.ingress[0].from[0].ipBlock.cidr: {}; its last valid version is enforced \
                 instead, or, if it never had one, its namespace is isolated both ways \
                 (node node-1)",
                error.problem
            ),
            "regarding": {
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "namespace": "x", "name": "bad",
                "uid": "0f6c1c8e-3b5e-4d8a-9a51-6f2a7c1d2e3f"
            },
            "reportingController": "netwarden",
            "reportingInstance": "node-1"
        })
    );

    // The agent finds the same problem at every apply: nothing more is posted in the window.
    assert!(!events.post(policy.object_ref(&()), &problem));
    // Another reason on the same policy is another Event; it is the next request, so the
    // repeat above posted nothing.
    let over = Unenforceable::over_capacity(
        PolicyRef {
            namespace: "x".into(),
            name: "bad".into(),
        },
        "spec.ingress",
        "x/a",
        "policy 7: policy map is full or failing (out of memory); 300 entries needed",
    );
    assert!(events.post(policy.object_ref(&()), &over));
    let event = next_event(&mut api, "x").await;
    assert_eq!(event["reason"], "OverCapacity");
    assert_eq!(event["action"], "LockDownEndpoint");
    assert_eq!(event["type"], "Warning");
    assert_eq!(
        event["note"],
        "spec.ingress: the rules selecting pod x/a do not fit the datapath's maps (policy 7: \
         policy map is full or failing (out of memory); 300 entries needed); the pod is locked \
         down, only node traffic reaches or leaves it (node node-1)"
    );
    assert_eq!(event["regarding"]["name"], "bad");
    assert!(!events.post(policy.object_ref(&()), &over));
}

#[tokio::test]
async fn the_same_problem_is_posted_again_once_the_window_has_passed() {
    let window = Duration::from_millis(300);
    let (mut events, mut api) = start(window);
    let policy = bad_policy();
    let problem = Unenforceable::invalid(&convert::network_policy(&policy).unwrap_err()).unwrap();

    assert!(events.post(policy.object_ref(&()), &problem));
    next_event(&mut api, "x").await;
    assert!(!events.post(policy.object_ref(&()), &problem));
    tokio::time::sleep(window).await;
    assert!(events.post(policy.object_ref(&()), &problem));
    // Within kube-rs's 6-minute series cache a repeat patches the first Event (its count);
    // with the default 10-minute window that cannot happen, but the RBAC grants `patch` for it.
    let (request, respond) = timeout(STEP, api.next_request())
        .await
        .expect("no Event posted after the window")
        .expect("the client is gone");
    assert_eq!(request.method(), Method::PATCH, "{}", request.uri());
    let path = request.uri().path().to_owned();
    assert!(
        path.starts_with("/apis/events.k8s.io/v1/namespaces/x/events/bad."),
        "{path}"
    );
    let event = answer(request, respond).await;
    assert_eq!(event["reason"], "InvalidField");
    assert_eq!(event["series"]["count"], 2);
}

#[test]
fn only_network_policies_make_events() {
    let error = netwarden_model::ModelError {
        kind: "Pod",
        object: "x/a".into(),
        field: "status.podIP".into(),
        problem: "not an IP address".into(),
    };
    assert_eq!(Unenforceable::invalid(&error), None);
}

#[test]
fn cluster_network_policies_report_what_they_enforce_otherwise_and_their_priority_ties() {
    let manifests = r"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: a}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
  - action: Accept
    to: [{domainNames: ['*.example.com']}, {networks: ['10.0.0.0/8']}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: b}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: c}
spec:
  tier: Baseline
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
";
    let (cluster, errors) = netwarden_model::cluster_of_stream("cluster-policies.yaml", manifests);
    assert!(errors.is_empty(), "{errors:?}");
    let problems = Unenforceable::cluster_policies(&cluster);
    let summary: Vec<(String, &str, String)> = problems
        .iter()
        .map(|problem| {
            (
                problem.policy.to_string(),
                problem.reason.as_str(),
                problem.field.clone(),
            )
        })
        .collect();
    let cluster_scoped = |name: &str| {
        PolicyRef {
            namespace: String::new(),
            name: name.into(),
        }
        .to_string()
    };
    assert_eq!(
        summary,
        [
            (
                cluster_scoped("a"),
                "NotEnforcedAsWritten",
                "spec.egress[0].to[0]".to_owned()
            ),
            (
                cluster_scoped("a"),
                "PriorityTie",
                "spec.priority".to_owned()
            ),
            (
                cluster_scoped("b"),
                "PriorityTie",
                "spec.priority".to_owned()
            ),
        ],
        "the Baseline policy of the same priority ties with neither"
    );
}
