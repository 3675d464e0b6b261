//! Where the agent reads the cluster from: a directory of manifests, or the Kubernetes API.
//! Both yield the same validated model; everything after ingestion is one code path.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use netwarden_kube::{
    KubeSource, WatchHealth,
    events::{self, PolicyEvents, Unenforceable},
};
use netwarden_model::{Cluster, ClusterView, ManifestDir};
use notify::Watcher as _;
use tokio::sync::mpsc;
use tracing::error;

/// The agent's source of Namespaces, Pods and NetworkPolicies.
pub enum Input {
    /// A directory of manifests, followed with inotify.
    Manifests {
        /// What was read.
        dir: Box<ManifestDir>,
        /// Keeps the inotify watch alive.
        _watcher: notify::RecommendedWatcher,
        /// Fires on every change to the directory.
        changes: mpsc::UnboundedReceiver<()>,
    },
    /// The Kubernetes API, watched with kube-rs.
    Kubernetes {
        /// The watchers' caches.
        source: Box<KubeSource>,
        /// Events on the NetworkPolicies this node cannot enforce.
        events: PolicyEvents,
    },
}

impl Input {
    /// Follows the manifests in `dir`.
    pub fn manifests(dir: &Path) -> anyhow::Result<Self> {
        let (sender, changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let read_again = match &event {
                    // An overflowed inotify queue or a watcher error may have lost changes: the
                    // directory is read whole on every wake, so waking is enough.
                    Err(_) => true,
                    Ok(event) if event.need_rescan() => true,
                    // Our own reads show up as access events; only changes matter.
                    Ok(event) => !event.kind.is_access() && !event.kind.is_other(),
                };
                if read_again {
                    let _ = sender.send(());
                }
            })
            .context("creating the file watcher")?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self::Manifests {
            dir: Box::new(ManifestDir::new(dir)),
            _watcher: watcher,
            changes,
        })
    }

    /// Watches the cluster the in-cluster configuration or `KUBECONFIG` points at, and waits
    /// for the first complete list of every kind: applying an empty cluster would open every
    /// pod. Events it posts name `node`. A watcher failing for `stale_after` is reported stale.
    pub async fn kubernetes(
        node: &str,
        kubeconfig: Option<&Path>,
        stale_after: Duration,
    ) -> anyhow::Result<Self> {
        let client = netwarden_kube::client(kubeconfig)
            .await
            .context("connecting to the Kubernetes API")?;
        let mut source = KubeSource::start(client.clone()).with_stale_after(stale_after);
        source.synced().await;
        Ok(Self::Kubernetes {
            source: Box::new(source),
            events: PolicyEvents::start(client, node, events::DEFAULT_WINDOW),
        })
    }

    /// Waits for the next change. Cancel-safe.
    pub async fn changed(&mut self) {
        match self {
            Self::Manifests { changes, .. } => {
                if changes.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            Self::Kubernetes { source, .. } => source.changed().await,
        }
    }

    /// Takes whatever other changes are queued, so one apply covers them. Returns whether
    /// there were any.
    pub fn drain(&mut self) -> bool {
        let mut any = false;
        if let Self::Manifests { changes, .. } = self {
            while changes.try_recv().is_ok() {
                any = true;
            }
        }
        any
    }

    /// Re-reads what changed (the directory; the API caches are always current). Returns
    /// whether the content changed, or `None` when it could not be read and the last applied
    /// state must stay.
    pub fn refresh(&mut self) -> Option<bool> {
        match self {
            Self::Manifests { dir, .. } => match dir.refresh() {
                Ok(changed) => Some(changed),
                Err(error) => {
                    error!(%error, "cannot read the manifests; keeping the last applied state");
                    None
                }
            },
            Self::Kubernetes { .. } => Some(false),
        }
    }

    /// The cluster, and every problem with it (each naming its object and field).
    pub fn cluster(&mut self) -> (Cluster, Vec<String>) {
        match self {
            Self::Manifests { dir, .. } => {
                let (cluster, errors) = dir.cluster();
                (cluster, errors.iter().map(ToString::to_string).collect())
            }
            Self::Kubernetes { source, events } => {
                let (cluster, errors) = source.cluster();
                // Posted at every apply; the rate limit keeps it to one per policy and window.
                let mut problems = Unenforceable::from_errors(&errors);
                problems.extend(Unenforceable::cluster_policies(&cluster));
                source.report(events, &problems);
                (cluster, errors.iter().map(ToString::to_string).collect())
            }
        }
    }

    /// [`Input::cluster`], with the pods borrowed from a source that keeps the model (the
    /// manifest directory): what the agent compiles from.
    pub fn cluster_view(&mut self) -> (ClusterView<'_>, Vec<String>) {
        match self {
            Self::Manifests { dir, .. } => {
                let (view, errors) = dir.cluster_view();
                (view, errors.iter().map(ToString::to_string).collect())
            }
            Self::Kubernetes { .. } => {
                let (cluster, errors) = self.cluster();
                (ClusterView::from(cluster), errors)
            }
        }
    }

    /// The cluster as the source holds it now, for an explain query: what the last apply
    /// compiled, unless a change is waiting (the agent applies a change it has seen before it
    /// answers a query). Posts no Events; problems are the apply's to report.
    pub fn snapshot(&mut self) -> Cluster {
        match self {
            Self::Manifests { dir, .. } => dir.cluster().0,
            Self::Kubernetes { source, .. } => source.cluster().0,
        }
    }

    /// Identifies the input the applied state reflects.
    pub fn digest(&self) -> String {
        match self {
            Self::Manifests { dir, .. } => dir.digest(),
            Self::Kubernetes { source, .. } => source.digest(),
        }
    }

    /// How many times the Kubernetes watchers recovered from an error (0 for a directory).
    pub fn watch_restarts(&self) -> u64 {
        match self {
            Self::Manifests { .. } => 0,
            Self::Kubernetes { source, .. } => source.restarts(),
        }
    }

    /// How the Kubernetes watchers are doing (none for a directory, which has no watch to
    /// lose: inotify reports every change).
    pub fn watch_health(&self) -> Vec<WatchHealth> {
        match self {
            Self::Manifests { .. } => Vec::new(),
            Self::Kubernetes { source, .. } => source.watch_health(),
        }
    }

    /// For the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Manifests { dir, .. } => format!("manifests in {}", dir.root().display()),
            Self::Kubernetes { .. } => "the Kubernetes API".to_owned(),
        }
    }

    /// Reports policies the datapath could not enforce (the log has them already; the
    /// Kubernetes source also posts Events on them).
    pub fn report_unenforceable(&mut self, problems: &[Unenforceable]) {
        if let Self::Kubernetes { source, events } = self {
            source.report(events, problems);
        }
    }
}
