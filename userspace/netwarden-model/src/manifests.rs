//! The manifest-directory source: Namespace, Pod, NetworkPolicy, Service, EndpointSlice, Node
//! and ClusterNetworkPolicy objects in YAML or JSON files.
//!
//! Files may hold several documents (`---`) and `kind: List` objects. A file that does not parse
//! keeps contributing its last good objects, and an object that does not validate keeps its last
//! good version, the way the API server keeps an object when it rejects an update: enforcement
//! never loosens because of a typo. A NetworkPolicy that never validated isolates its namespace
//! in both directions until it is fixed (fail closed); a ClusterNetworkPolicy that never
//! validated denies its subject's pods everything, before every other Admin policy
//! ([`ClusterNetworkPolicy::lockdown`]). An invalid Service, EndpointSlice or Node is
//! reported and left out: a Service only names addresses that lead to pods, so one missing
//! opens nothing.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs,
    hash::{BuildHasher as _, RandomState},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use hashbrown::hash_table;
use k8s_openapi::api::{
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
};
use serde::Deserialize as _;
use sha2::{Digest as _, Sha256};

use crate::{
    cluster::{
        Cluster, ClusterView, EndpointSlice, Namespace, NetworkPolicy, Node, Pod, PodRef, PodsView,
        PolicyRef, Service,
    },
    cluster_policy::{self, ClusterNetworkPolicy, ClusterSubject},
    convert,
    intern::PodInterner,
};

/// A file or object of the directory that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The directory could not be listed.
    #[error("cannot list {}: {source}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A document is not valid YAML, or not a valid object of its kind.
    #[error("{file}: document {document}: {problem}")]
    Parse {
        /// The file, relative to the directory.
        file: String,
        /// The document's index in the file, from 0.
        document: usize,
        /// What is wrong, with the field path.
        problem: String,
    },
    /// An object failed validation.
    #[error("{file}: {source}")]
    Invalid {
        /// The file, relative to the directory.
        file: String,
        /// The validation error, naming object and field.
        source: convert::ModelError,
    },
    /// The same object appears in two files.
    #[error("{kind} {object} appears in both {first} and {second}; using {first}")]
    Duplicate {
        /// Its kind.
        kind: &'static str,
        /// Its namespace/name.
        object: String,
        /// The file whose copy is used.
        first: String,
        /// The file whose copy is ignored.
        second: String,
    },
}

/// An object of a file, validated as soon as it is read: the API types are large, and only
/// the model is kept (10,000 pods in a few MiB instead of tens).
#[derive(Clone, Debug)]
enum Parsed {
    // Every variant boxes its object: the largest decides the size of each of the 150,000
    // pods' entries.
    Namespace(String, Box<Result<Namespace, convert::ModelError>>),
    Pod(String, Box<Result<Pod, convert::ModelError>>),
    NetworkPolicy(
        PolicyRef,
        Box<Result<Arc<NetworkPolicy>, convert::ModelError>>,
    ),
    Service(String, Box<Result<Service, convert::ModelError>>),
    EndpointSlice(String, Box<Result<EndpointSlice, convert::ModelError>>),
    Node(String, Box<Result<Node, convert::ModelError>>),
    /// The name, the policy or why not and the subject to lock down if it never validated.
    ClusterNetworkPolicy(
        String,
        Box<Result<ClusterNetworkPolicy, (convert::ModelError, Option<ClusterSubject>)>>,
    ),
}

impl Parsed {
    /// The object's kind and its key, for the duplicate check: borrowed where the object holds
    /// it, since every apply checks every object (150,000 pods' keys copied at each apply).
    fn kind_and_key(&self) -> (&'static str, Cow<'_, str>) {
        match self {
            Self::Namespace(key, _) => ("Namespace", Cow::Borrowed(key)),
            Self::Pod(key, _) => ("Pod", Cow::Borrowed(key)),
            Self::NetworkPolicy(id, _) => ("NetworkPolicy", Cow::Owned(id.to_string())),
            Self::Service(key, _) => ("Service", Cow::Borrowed(key)),
            Self::EndpointSlice(key, _) => ("EndpointSlice", Cow::Borrowed(key)),
            Self::Node(key, _) => ("Node", Cow::Borrowed(key)),
            Self::ClusterNetworkPolicy(key, _) => (cluster_policy::KIND, Cow::Borrowed(key)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified_ns: i128,
    len: u64,
    inode: u64,
}

#[derive(Debug)]
struct ManifestFile {
    stamp: Stamp,
    content_sha: [u8; 32],
    objects: Vec<Parsed>,
    errors: Vec<ManifestError>,
}

/// A watched directory of manifests and what was last read from it.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    files: BTreeMap<String, ManifestFile>,
    last_good_policies: HashMap<PolicyRef, Arc<NetworkPolicy>>,
    last_good_cluster_policies: HashMap<String, ClusterNetworkPolicy>,
    /// What the pods have in common, one copy of each.
    shared: PodInterner,
}

impl ManifestDir {
    /// A source for `root`; nothing is read until [`ManifestDir::refresh`].
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
            last_good_policies: HashMap::new(),
            last_good_cluster_policies: HashMap::new(),
            shared: PodInterner::default(),
        }
    }

    /// The directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads every file whose size, inode or modification time changed and forgets deleted
    /// ones. Returns whether anything changed.
    pub fn refresh(&mut self) -> Result<bool, ManifestError> {
        let listed = list(&self.root)?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|name, _| listed.contains_key(name));
        changed |= self.files.len() != before;
        for (name, stamp) in listed {
            if self
                .files
                .get(&name)
                .is_some_and(|file| file.stamp == stamp)
            {
                continue;
            }
            let Ok(bytes) = fs::read(self.root.join(&name)) else {
                // Deleted or renamed between listing and reading: the next event catches up.
                continue;
            };
            let content_sha: [u8; 32] = Sha256::digest(&bytes).into();
            if self
                .files
                .get(&name)
                .is_some_and(|file| file.content_sha == content_sha)
            {
                if let Some(file) = self.files.get_mut(&name) {
                    file.stamp = stamp;
                }
                continue;
            }
            let (mut objects, errors) = parse_file(&name, &bytes);
            self.share(&mut objects);
            let objects = if objects.is_empty() && !errors.is_empty() {
                // Keep what the file held when it last parsed.
                self.files
                    .get(&name)
                    .map(|file| file.objects.clone())
                    .unwrap_or_default()
            } else {
                objects
            };
            self.files.insert(
                name,
                ManifestFile {
                    stamp,
                    content_sha,
                    objects,
                    errors,
                },
            );
            changed = true;
        }
        if changed {
            self.shared.forget_unused();
        }
        Ok(changed)
    }

    /// Makes the pods of `objects` share what they have in common with the pods already read.
    fn share(&mut self, objects: &mut Vec<Parsed>) {
        objects.shrink_to_fit();
        for object in objects {
            if let Parsed::Pod(_, pod) = object
                && let Ok(pod) = pod.as_mut()
            {
                self.shared.share(pod);
            }
        }
    }

    /// Digest of the directory content as last read: two reads of the same files give the same
    /// digest. The agent reports it with every applied state; see [`ManifestDir::digest_of`].
    #[must_use]
    pub fn digest(&self) -> String {
        digest_entries(
            self.files
                .iter()
                .map(|(name, file)| (name.as_str(), file.content_sha)),
        )
    }

    /// The digest that [`ManifestDir::digest`] gives once the agent has read `root` as it is
    /// now, so a test can wait for exactly the state it wrote.
    pub fn digest_of(root: &Path) -> Result<String, ManifestError> {
        let mut entries = Vec::new();
        for name in list(root)?.into_keys() {
            let Ok(bytes) = fs::read(root.join(&name)) else {
                continue;
            };
            entries.push((name, Sha256::digest(&bytes).into()));
        }
        Ok(digest_entries(
            entries.iter().map(|(name, sha)| (name.as_str(), *sha)),
        ))
    }

    /// The cluster the directory describes, and every problem found on the way.
    pub fn cluster(&mut self) -> (Cluster, Vec<ManifestError>) {
        let (view, errors) = self.cluster_view();
        (view.into_cluster(), errors)
    }

    /// The cluster the directory describes, with its pods borrowed from what was read rather
    /// than copied, and every problem found on the way.
    pub fn cluster_view(&mut self) -> (ClusterView<'_>, Vec<ManifestError>) {
        let mut cluster = Cluster::default();
        let mut pods = Vec::new();
        let mut errors = Vec::new();
        let mut first_seen = FirstSeen::new(&self.files);
        let mut seen_policies = HashSet::new();
        let mut seen_cluster_policies = HashSet::new();
        for (file_index, (name, file)) in self.files.iter().enumerate() {
            errors.extend(file.errors.iter().map(clone_error));
            for (object_index, object) in file.objects.iter().enumerate() {
                if let Some(duplicate) = first_seen.duplicate((file_index, object_index)) {
                    errors.push(duplicate);
                    continue;
                }
                let invalid = |source: &convert::ModelError| ManifestError::Invalid {
                    file: name.clone(),
                    source: source.clone(),
                };
                match object {
                    Parsed::Namespace(_, namespace) => match namespace.as_ref() {
                        Ok(ns) => {
                            cluster.namespaces.insert(ns.name.clone(), ns.clone());
                        }
                        Err(source) => errors.push(invalid(source)),
                    },
                    Parsed::Pod(_, pod) => match pod.as_ref() {
                        Ok(pod) => {
                            pods.push((&pod.id, pod));
                        }
                        Err(source) => errors.push(invalid(source)),
                    },
                    Parsed::Service(_, service) => match service.as_ref() {
                        Ok(service) => {
                            cluster.services.insert(service.id.clone(), service.clone());
                        }
                        Err(source) => errors.push(invalid(source)),
                    },
                    Parsed::EndpointSlice(_, slice) => match slice.as_ref() {
                        Ok(slice) => {
                            cluster
                                .endpoint_slices
                                .insert(slice.id.clone(), slice.clone());
                        }
                        Err(source) => errors.push(invalid(source)),
                    },
                    Parsed::Node(_, node) => match node.as_ref() {
                        Ok(node) => {
                            cluster.nodes.insert(node.name.clone(), node.clone());
                        }
                        Err(source) => errors.push(invalid(source)),
                    },
                    Parsed::ClusterNetworkPolicy(policy_name, policy) => {
                        seen_cluster_policies.insert(policy_name.as_str());
                        let enforced = cluster_policy_to_enforce(
                            &mut self.last_good_cluster_policies,
                            policy_name,
                            policy,
                        );
                        cluster
                            .cluster_policies
                            .insert(policy_name.clone(), enforced);
                        if let Err((source, _)) = policy.as_ref() {
                            errors.push(invalid(source));
                        }
                    }
                    Parsed::NetworkPolicy(id, policy) => {
                        seen_policies.insert(id);
                        match policy.as_ref() {
                            Ok(valid) => {
                                // Replaced only when it changed, so an unchanged policy's key is
                                // not copied at every apply.
                                if self.last_good_policies.get(id) != Some(valid) {
                                    self.last_good_policies
                                        .insert(id.clone(), Arc::clone(valid));
                                }
                                cluster.policies.insert(id.clone(), Arc::clone(valid));
                            }
                            Err(source) => {
                                let fallback =
                                    self.last_good_policies.get(id).cloned().unwrap_or_else(|| {
                                        Arc::new(NetworkPolicy::lockdown(id.clone()))
                                    });
                                cluster.policies.insert(id.clone(), fallback);
                                errors.push(invalid(source));
                            }
                        }
                    }
                }
            }
        }
        self.last_good_policies
            .retain(|id, _| seen_policies.contains(id));
        self.last_good_cluster_policies
            .retain(|name, _| seen_cluster_policies.contains(name.as_str()));
        sort_keeping_the_last_of_each(&mut pods);
        let view = ClusterView {
            rest: cluster,
            pods: PodsView::Borrowed(pods),
        };
        (view, errors)
    }
}

/// Records that `object` comes from `file`, or the error naming the file that held it first.
/// Sorts `pods` by namespace and name, and of two pods with one name (keys the duplicate check
/// tells apart, such as an unset namespace and `default`) keeps the one read last, as a map
/// would: the sort is stable.
fn sort_keeping_the_last_of_each(pods: &mut Vec<(&PodRef, &Pod)>) {
    pods.sort_by_key(|&(id, _)| id);
    pods.dedup_by(|(later_id, later), (id, kept)| {
        let same = later_id == id;
        if same {
            *kept = *later;
        }
        same
    });
}

/// The first object read of each kind and key, kept as its place (file, object) in what was
/// read: the check runs over every object at every apply, and a map from each key to its file
/// took 64 bytes an object (21 MiB at 150,000 pods, twice that while it grew).
struct FirstSeen<'a> {
    files: Vec<(&'a str, &'a [Parsed])>,
    places: hashbrown::HashTable<(usize, usize)>,
    hasher: RandomState,
}

impl<'a> FirstSeen<'a> {
    fn new(files: &'a BTreeMap<String, ManifestFile>) -> Self {
        let files: Vec<(&str, &[Parsed])> = files
            .iter()
            .map(|(name, file)| (name.as_str(), file.objects.as_slice()))
            .collect();
        let objects = files.iter().map(|(_, objects)| objects.len()).sum();
        Self {
            files,
            places: hashbrown::HashTable::with_capacity(objects),
            hasher: RandomState::new(),
        }
    }

    /// Records the object at `place` (file, object, in reading order). The error naming both
    /// files when an earlier one had its kind and key.
    fn duplicate(&mut self, place: (usize, usize)) -> Option<ManifestError> {
        let Self {
            files,
            places,
            hasher,
        } = self;
        let object_at = |(file, object): (usize, usize)| &files[file].1[object];
        let key = object_at(place).kind_and_key();
        let found = places.entry(
            hasher.hash_one(&key),
            |&seen| object_at(seen).kind_and_key() == key,
            |&seen| hasher.hash_one(object_at(seen).kind_and_key()),
        );
        match found {
            hash_table::Entry::Occupied(first) => Some(ManifestError::Duplicate {
                kind: key.0,
                object: key.1.into_owned(),
                first: files[first.get().0].0.to_owned(),
                second: files[place.0].0.to_owned(),
            }),
            hash_table::Entry::Vacant(vacant) => {
                vacant.insert(place);
                None
            }
        }
    }
}

/// What to enforce for a ClusterNetworkPolicy as read: itself when valid (and remembered in
/// `last_good`), else its last good version, else its lockdown.
fn cluster_policy_to_enforce(
    last_good: &mut HashMap<String, ClusterNetworkPolicy>,
    name: &str,
    policy: &Result<ClusterNetworkPolicy, (convert::ModelError, Option<ClusterSubject>)>,
) -> ClusterNetworkPolicy {
    match policy {
        Ok(valid) => {
            last_good.insert(name.to_owned(), valid.clone());
            valid.clone()
        }
        Err((_, subject)) => last_good
            .get(name)
            .cloned()
            .unwrap_or_else(|| ClusterNetworkPolicy::lockdown(name.to_owned(), subject.clone())),
    }
}

/// The cluster one YAML stream describes, read exactly as a directory holding only that
/// stream, in a file called `name`, would be; with every problem found on the way. For
/// fixtures and one-off inputs: no file is written.
#[must_use]
pub fn cluster_of_stream(name: &str, text: &str) -> (Cluster, Vec<ManifestError>) {
    cluster_of_bytes(name, text.as_bytes())
}

/// [`cluster_of_stream`] on a file's bytes, as they are read from disk: bytes that are not
/// UTF-8 are reported like any other file that does not parse.
#[must_use]
pub fn cluster_of_bytes(name: &str, bytes: &[u8]) -> (Cluster, Vec<ManifestError>) {
    let (objects, errors) = parse_file(name, bytes);
    let mut dir = ManifestDir::new(PathBuf::new());
    dir.files.insert(
        name.to_owned(),
        ManifestFile {
            stamp: Stamp {
                modified_ns: 0,
                len: 0,
                inode: 0,
            },
            content_sha: [0; 32],
            objects,
            errors,
        },
    );
    dir.cluster()
}

fn object_key(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.as_deref().unwrap_or_default()
    )
}

fn split_key(key: &str) -> (String, String) {
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
    (namespace.to_owned(), name.to_owned())
}

/// The `PodRef` of a `namespace/name` string.
#[must_use]
pub fn pod_ref(key: &str) -> PodRef {
    let (namespace, name) = split_key(key);
    PodRef { namespace, name }
}

fn clone_error(error: &ManifestError) -> ManifestError {
    match error {
        ManifestError::Parse {
            file,
            document,
            problem,
        } => ManifestError::Parse {
            file: file.clone(),
            document: *document,
            problem: problem.clone(),
        },
        other => ManifestError::Parse {
            file: String::new(),
            document: 0,
            problem: other.to_string(),
        },
    }
}

fn list(root: &Path) -> Result<BTreeMap<String, Stamp>, ManifestError> {
    let list_error = |source| ManifestError::List {
        path: root.to_owned(),
        source,
    };
    let mut listed = BTreeMap::new();
    for entry in fs::read_dir(root).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        // Dot files are editors' and writers' temporaries: they are renamed into place when done.
        if name.starts_with('.') || !is_manifest {
            continue;
        }
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        let stamp = Stamp {
            modified_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
            len: metadata.len(),
            inode: metadata.ino(),
        };
        listed.insert(name, stamp);
    }
    Ok(listed)
}

fn digest_entries<'a>(entries: impl Iterator<Item = (&'a str, [u8; 32])>) -> String {
    let mut hasher = Sha256::new();
    for (name, sha) in entries {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(sha);
    }
    let mut hex = String::with_capacity(64);
    for byte in hasher.finalize() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn parse_file(name: &str, bytes: &[u8]) -> (Vec<Parsed>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            errors.push(ManifestError::Parse {
                file: name.to_owned(),
                document: 0,
                problem: error.to_string(),
            });
            return (objects, errors);
        }
    };
    for (document, deserializer) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(deserializer) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(error) => {
                errors.push(ManifestError::Parse {
                    file: name.to_owned(),
                    document,
                    problem: error.to_string(),
                });
                // A YAML syntax error ends the stream.
                break;
            }
        };
        if let Err(problem) = push_objects(value, &mut objects) {
            errors.push(ManifestError::Parse {
                file: name.to_owned(),
                document,
                problem,
            });
        }
    }
    (objects, errors)
}

fn push_objects(value: serde_yaml::Value, objects: &mut Vec<Parsed>) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = value
        .get("metadata")
        .and_then(|metadata| metadata.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let describe = |error: serde_path_to_error::Error<serde_yaml::Error>| {
        format!("{kind} {name}: {}: {}", error.path(), error.inner())
    };
    match kind.as_str() {
        "List"
        | "NamespaceList"
        | "PodList"
        | "NetworkPolicyList"
        | "ServiceList"
        | "EndpointSliceList"
        | "NodeList"
        | "ClusterNetworkPolicyList" => {
            let items = value
                .get("items")
                .and_then(serde_yaml::Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for item in items {
                push_objects(item, objects)?;
            }
        }
        "Namespace" => {
            let namespace: core::Namespace =
                serde_path_to_error::deserialize(value).map_err(describe)?;
            let key = namespace.metadata.name.clone().unwrap_or_default();
            objects.push(Parsed::Namespace(
                key,
                Box::new(convert::namespace(&namespace)),
            ));
        }
        "Pod" => {
            let pod: core::Pod = serde_path_to_error::deserialize(value).map_err(describe)?;
            objects.push(Parsed::Pod(
                object_key(&pod.metadata),
                Box::new(convert::pod(&pod)),
            ));
        }
        "NetworkPolicy" => {
            let policy: networking::NetworkPolicy =
                serde_path_to_error::deserialize(value).map_err(describe)?;
            // From the metadata, not from `object_key` split at its first '/': a namespace
            // holding a '/' (which the API server would reject) would move the policy, or its
            // lockdown, to another namespace.
            let id = PolicyRef {
                namespace: policy
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                name: policy.metadata.name.clone().unwrap_or_default(),
            };
            objects.push(Parsed::NetworkPolicy(
                id,
                Box::new(convert::network_policy(&policy).map(Arc::new)),
            ));
        }
        "Service" => {
            let service: core::Service =
                serde_path_to_error::deserialize(value).map_err(describe)?;
            objects.push(Parsed::Service(
                object_key(&service.metadata),
                Box::new(convert::service(&service)),
            ));
        }
        "EndpointSlice" => {
            let slice: discovery::EndpointSlice =
                serde_path_to_error::deserialize(value).map_err(describe)?;
            objects.push(Parsed::EndpointSlice(
                object_key(&slice.metadata),
                Box::new(convert::endpoint_slice(&slice)),
            ));
        }
        "Node" => {
            let node: core::Node = serde_path_to_error::deserialize(value).map_err(describe)?;
            let key = node.metadata.name.clone().unwrap_or_default();
            objects.push(Parsed::Node(key, Box::new(convert::node(&node))));
        }
        cluster_policy::KIND => {
            let policy: cluster_policy::api::ClusterNetworkPolicy =
                serde_path_to_error::deserialize(value).map_err(describe)?;
            let key = policy.metadata.name.clone().unwrap_or_default();
            let converted = cluster_policy::convert(&policy)
                .map_err(|error| (error, cluster_policy::subject_of(&policy)));
            objects.push(Parsed::ClusterNetworkPolicy(key, Box::new(converted)));
        }
        // Other kinds (Deployments, ConfigMaps...) may share the directory; they do not affect
        // policy.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{fs, sync::Arc};

    use super::ManifestDir;

    #[test]
    fn reads_multi_document_files_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("app.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}\n",
        )
        .unwrap();
        let mut source = ManifestDir::new(dir.path());
        assert!(source.refresh().unwrap());
        let (cluster, errors) = source.cluster();
        assert!(errors.is_empty(), "{errors:?}");
        let pod = cluster.pods.values().next().unwrap();
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(
            cluster.namespaces["x"].labels["kubernetes.io/metadata.name"],
            "x"
        );
        assert_eq!(source.digest(), ManifestDir::digest_of(dir.path()).unwrap());
        assert!(!source.refresh().unwrap(), "nothing changed");

        fs::remove_file(dir.path().join("app.yaml")).unwrap();
        assert!(source.refresh().unwrap());
        assert!(source.cluster().0.pods.is_empty());
    }

    #[test]
    fn pods_share_what_they_have_in_common_and_a_repeated_pod_is_reported() {
        let pod = |name: &str, app: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\nspec: {{nodeName: n1, serviceAccountName: web, containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]}}\nstatus: {{podIP: 10.0.0.{}}}\n",
                name.len()
            )
        };
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), pod("a", "web")).unwrap();
        fs::write(
            dir.path().join("b.yaml"),
            format!("{}---\n{}", pod("bb", "web"), pod("a", "other")),
        )
        .unwrap();
        let mut source = ManifestDir::new(dir.path());
        source.refresh().unwrap();
        let (view, errors) = source.cluster_view();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].contains("a.yaml") && messages[0].contains("b.yaml"),
            "{messages:?}"
        );
        let pods: Vec<_> = view.pods.iter().map(|(_, pod)| pod).collect();
        assert_eq!(pods.len(), 2);
        let (a, bb) = (pods[0], pods[1]);
        assert_eq!(
            a.labels["app"], "web",
            "the first copy of a repeated pod is used"
        );
        assert!(Arc::ptr_eq(&a.labels, &bb.labels));
        assert!(Arc::ptr_eq(&a.ports, &bb.ports));
        assert!(Arc::ptr_eq(&a.mtls, &bb.mtls));
        assert!(Arc::ptr_eq(&a.service_account, &bb.service_account));
        assert!(Arc::ptr_eq(
            a.node_name.as_ref().unwrap(),
            bb.node_name.as_ref().unwrap()
        ));

        fs::write(dir.path().join("b.yaml"), pod("bb", "api")).unwrap();
        source.refresh().unwrap();
        let (view, errors) = source.cluster_view();
        assert!(errors.is_empty(), "{errors:?}");
        let pods: Vec<_> = view.pods.iter().map(|(_, pod)| pod).collect();
        assert_eq!(pods[1].labels["app"], "api");
        assert!(!Arc::ptr_eq(&pods[0].labels, &pods[1].labels));
        assert!(Arc::ptr_eq(&pods[0].ports, &pods[1].ports));
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects_and_reports_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("np.yaml");
        fs::write(&path, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n").unwrap();
        let mut source = ManifestDir::new(dir.path());
        source.refresh().unwrap();
        assert_eq!(source.cluster().0.policies.len(), 1);

        fs::write(&path, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {matchLabels: 7}}\n").unwrap();
        source.refresh().unwrap();
        let (cluster, errors) = source.cluster();
        assert_eq!(
            cluster.policies.len(),
            1,
            "the last good policy stays enforced"
        );
        let message = errors[0].to_string();
        assert!(
            message.contains("np.yaml")
                && message.contains("NetworkPolicy deny")
                && message.contains("spec.podSelector.matchLabels"),
            "{message}"
        );
    }

    #[test]
    fn services_and_endpoint_slices_are_read_and_bad_ones_reported_and_left_out() {
        let (cluster, errors) = super::cluster_of_stream(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-abc, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1], targetRef: {kind: Pod, name: web-1}}]\nports: [{name: http, port: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: x}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 70000}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan, namespace: x}\naddressType: IPv4\nendpoints: []\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: 10.96.0.12}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: api-abc, namespace: x, labels: {kubernetes.io/service-name: api}}\naddressType: IPv4\nendpoints: []\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-abc, namespace: y, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\n",
        );
        let web = crate::ServiceRef {
            namespace: "x".into(),
            name: "web".into(),
        };
        assert_eq!(
            cluster.services.keys().collect::<Vec<_>>(),
            [&web],
            "the bad Service is not a frontend"
        );
        assert_eq!(
            cluster.services[&web].cluster_ips,
            ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()],
            "the first copy of a duplicate is used"
        );
        assert_eq!(cluster.endpoint_slices.len(), 3);
        let slices: Vec<_> = cluster.endpoint_slices_of(&web).collect();
        assert_eq!(slices.len(), 1, "only x/web's slice: {slices:?}");
        assert_eq!(slices[0].ports[0].port, 8080);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "svc.yaml: Service x/bad: spec.ports[0].port: 70000 is not a port (1-65535)",
                "svc.yaml: EndpointSlice x/orphan: metadata.labels[kubernetes.io/service-name]: is required: the slice belongs to no Service",
                "Service x/web appears in both svc.yaml and svc.yaml; using svc.yaml",
            ]
        );
    }

    #[test]
    fn an_invalid_policy_without_a_good_version_locks_its_namespace_down() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("np.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{ports: [{port: 70000}]}]}\n",
        )
        .unwrap();
        let mut source = ManifestDir::new(dir.path());
        source.refresh().unwrap();
        let (cluster, errors) = source.cluster();
        let policy = cluster.policies.values().next().unwrap();
        assert!(
            policy.pod_selector.is_everything()
                && policy.policy_types.ingress
                && policy.policy_types.egress
        );
        assert!(policy.ingress.is_empty() && policy.egress.is_empty());
        assert!(
            errors[0]
                .to_string()
                .contains("spec.ingress[0].ports[0].port"),
            "{}",
            errors[0]
        );
    }

    const GOOD_CNP: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec: {tier: Baseline, priority: 20, subject: {namespaces: {matchLabels: {team: a}}}, egress: [{action: Deny, to: [{networks: [0.0.0.0/0]}]}]}\n";
    const BAD_CNP: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec: {tier: Baseline, priority: 2000, subject: {namespaces: {matchLabels: {team: a}}}}\n";

    #[test]
    fn nodes_and_cluster_network_policies_are_read() {
        let (cluster, errors) = super::cluster_of_stream(
            "cluster.yaml",
            &format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{kubernetes.io/os: linux}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 172.18.0.2}}, {{type: Hostname, address: n1}}, {{type: InternalIP, address: 'fc00::2'}}]}}\n---\n{GOOD_CNP}"
            ),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let node = &cluster.nodes["n1"];
        assert_eq!(
            node.addresses,
            [
                "172.18.0.2".parse::<std::net::IpAddr>().unwrap(),
                "fc00::2".parse().unwrap()
            ]
        );
        assert_eq!(node.labels["kubernetes.io/os"], "linux");
        let policy = &cluster.cluster_policies["guard"];
        assert_eq!(policy.tier, crate::Tier::Baseline);
        assert_eq!(policy.priority, 20);
    }

    #[test]
    fn an_invalid_cluster_policy_keeps_its_last_good_version_or_locks_its_subject_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cnp.yaml");
        fs::write(&path, BAD_CNP).unwrap();
        let mut source = ManifestDir::new(dir.path());
        source.refresh().unwrap();
        let (cluster, errors) = source.cluster();
        let locked = &cluster.cluster_policies["guard"];
        assert_eq!(
            *locked,
            crate::ClusterNetworkPolicy::lockdown(
                "guard".into(),
                Some(crate::ClusterSubject::Namespaces(crate::LabelSelector {
                    requirements: vec![crate::Requirement::In("team".into(), vec!["a".into()])]
                }))
            ),
            "never valid: its subject is denied everything, first of the Admin tier"
        );
        assert_eq!(
            errors[0].to_string(),
            "cnp.yaml: ClusterNetworkPolicy guard: spec.priority: 2000 is not within 0-1000"
        );

        fs::write(&path, GOOD_CNP).unwrap();
        source.refresh().unwrap();
        assert_eq!(source.cluster().0.cluster_policies["guard"].priority, 20);
        fs::write(&path, format!("{BAD_CNP}# edited\n")).unwrap();
        source.refresh().unwrap();
        let (cluster, errors) = source.cluster();
        assert_eq!(
            cluster.cluster_policies["guard"].priority, 20,
            "the last good version stays enforced"
        );
        assert_eq!(errors.len(), 1);
    }

    /// Found by the `manifest` fuzz target: the policy's key was its `namespace/name` split at
    /// the first '/', so a namespace with a '/' put the policy (or the lockdown of an invalid
    /// one) under another namespace.
    #[test]
    fn a_policy_stays_in_its_namespace_whatever_its_name_holds() {
        let (cluster, errors) = super::cluster_of_stream(
            "np.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a/b}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q, namespace: c/d}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n",
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        let keys: Vec<String> = cluster.policies.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["a/b/p", "c/d/q"]);
        for (id, policy) in &cluster.policies {
            assert_eq!(&policy.id, id);
        }
        assert_eq!(cluster.policies.keys().next().unwrap().namespace, "a/b");
        assert_eq!(
            cluster.policies.keys().nth(1).unwrap().namespace,
            "c/d",
            "the lockdown isolates the policy's own namespace"
        );
    }
}
