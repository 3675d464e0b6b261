//! What the Kubernetes source's pod cache costs per pod at a cluster's size: each generated pod
//! is made the object an API server serves (managed fields, owner references, the full spec and
//! status a kubelet reports) and applied to the source's own cache (`netwarden_kube::PodCache`,
//! which converts it to the model as it arrives). The heap it keeps is the cost; the same
//! objects kept whole in a kube-rs reflector store, on a sample, show what converting saves.

use k8s_openapi::api::core::v1::Pod as ApiPod;
use kube::runtime::{reflector, watcher};
use netwarden_kube::PodCache;
use netwarden_model::{Cluster, Pod};
use serde_json::{Value, json};

use crate::heap;

/// Pods kept whole to measure what converting saves (all of them would take gigabytes at
/// 150,000 pods).
const WHOLE_SAMPLE: usize = 2_000;

/// The pod cache's heap.
pub struct CacheMemory {
    /// Pods cached.
    pub pods: usize,
    /// Heap the source's cache keeps, in all.
    pub cached_bytes: u64,
    /// Heap per pod kept whole in a reflector store (from a sample), for comparison.
    pub whole_bytes_per_pod: u64,
}

impl CacheMemory {
    /// Heap per pod in the source's cache.
    #[must_use]
    pub fn cached_bytes_per_pod(&self) -> u64 {
        self.cached_bytes / self.pods.max(1) as u64
    }
}

/// Builds the pod cache of `cluster` and measures it.
pub fn measure(cluster: &Cluster) -> anyhow::Result<CacheMemory> {
    let (cached_bytes, cache) = heap::kept_by(|| -> anyhow::Result<PodCache> {
        let cache = PodCache::default();
        for (index, pod) in cluster.pods.values().enumerate() {
            let object: ApiPod = serde_json::from_value(api_object(pod, index))?;
            cache.apply(&watcher::Event::Apply(object));
        }
        Ok(cache)
    });
    let pods = cache?.len();
    let (whole_bytes, whole) = heap::kept_by(|| -> anyhow::Result<reflector::Store<ApiPod>> {
        let (store, mut writer) = reflector::store();
        for (index, pod) in cluster.pods.values().take(WHOLE_SAMPLE).enumerate() {
            let object: ApiPod = serde_json::from_value(api_object(pod, index))?;
            writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        Ok(store)
    });
    let sampled = whole?.state().len();
    Ok(CacheMemory {
        pods,
        cached_bytes,
        whole_bytes_per_pod: whole_bytes / sampled.max(1) as u64,
    })
}

/// `pod` as `GET /api/v1/pods` returns a Deployment's running pod.
#[expect(
    clippy::too_many_lines,
    reason = "one literal API object, read top to bottom"
)]
fn api_object(pod: &Pod, index: usize) -> Value {
    let uid = |salt: usize| {
        format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            index,
            salt,
            index * 7 + salt
        )
    };
    let replica_set = format!("{}-7d9f8c6b5", pod.labels["app"]);
    let mut labels = serde_json::to_value(&*pod.labels).expect("labels serialize");
    labels["pod-template-hash"] = json!("7d9f8c6b5");
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|port| json!({"name": port.name, "containerPort": port.port, "protocol": port.protocol.to_string()}))
        .collect();
    let ips: Vec<Value> = pod
        .ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let time = "2026-01-01T00:00:00Z";
    let condition = |kind: &str| json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": time});
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.id.name,
            "generateName": format!("{replica_set}-"),
            "namespace": pod.id.namespace,
            "uid": uid(0),
            "resourceVersion": (1_000_000 + index).to_string(),
            "creationTimestamp": time,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": time},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": replica_set, "uid": uid(1),
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": time, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}},
                              "f:ownerReferences": {}},
                              "f:spec": {"f:containers": {}, "f:dnsPolicy": {}, "f:restartPolicy": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": time,
                 "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {},
                              "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {},
                              "f:startTime": {}}}}
            ]
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "registry.example/app:1.2.3",
                "ports": ports,
                "env": [{"name": "LOG_LEVEL", "value": "info"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
                                   "periodSeconds": 10, "timeoutSeconds": 1,
                                   "successThreshold": 1, "failureThreshold": 3},
                "volumeMounts": [{"name": "kube-api-access", "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
            ]}}],
            "nodeName": pod.node_name,
            "serviceAccountName": pod.service_account,
            "serviceAccount": pod.service_account,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running",
            "conditions": [condition("PodReadyToStartContainers"), condition("Initialized"),
                           condition("Ready"), condition("ContainersReady"), condition("PodScheduled")],
            "hostIP": "172.18.0.3",
            "hostIPs": [{"ip": "172.18.0.3"}],
            "podIP": pod.ips[0].to_string(),
            "podIPs": ips,
            "startTime": time,
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.example/app:1.2.3",
                "imageID": "registry.example/app@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945",
                "containerID": format!("containerd://{:064x}", index),
                "state": {"running": {"startedAt": time}}, "lastState": {}
            }],
            "qosClass": "Burstable"
        }
    })
}
