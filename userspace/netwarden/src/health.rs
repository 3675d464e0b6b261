//! The agent's HTTP endpoint on `--metrics-address`: `/healthz` and `/readyz` for the kubelet's
//! probes, `/metrics` for Prometheus.
//!
//! Ready means the agent has applied the cluster (after the initial sync of its caches), no
//! watch of the Kubernetes API is stale, and every local pod is enforced (a pod whose programs
//! did not attach, whose map entry was not written or whose interface is not found yet keeps
//! it unready until a retry succeeds); healthy means its loop is running. A request is
//! one line read and one response written: nothing here needs an HTTP framework.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use anyhow::Context as _;
use netwarden_datapath::VerdictCounters;
use netwarden_identity::DecisionCounts;
use netwarden_kube::WatchHealth;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::info;

use crate::metrics::{self, Metrics};

/// What `/readyz` answers, shared by the apply loop (writer) and the server.
#[derive(Debug, Default)]
pub struct ReadinessState {
    /// Set once the first apply is done.
    applied: AtomicBool,
    /// Local pods the last apply left unenforced.
    unenforced: AtomicUsize,
    /// The watches that are stale, as of the last apply, in words.
    stale_watches: Mutex<Vec<String>>,
}

/// Shared [`ReadinessState`].
pub type Readiness = Arc<ReadinessState>;

impl ReadinessState {
    /// An apply is done, with the watches as they are now.
    pub fn applied(&self, watches: &[WatchHealth]) {
        let stale = watches
            .iter()
            .filter(|watch| !watch.healthy)
            .map(|watch| {
                format!(
                    "the watch of {} has failed for {} s",
                    watch.resource,
                    watch.failing_for.unwrap_or_default().as_secs()
                )
            })
            .collect();
        *self
            .stale_watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stale;
        self.applied.store(true, Ordering::Release);
    }

    /// How many local pods the apply about to be reported left unenforced.
    pub fn set_unenforced(&self, unenforced: usize) {
        self.unenforced.store(unenforced, Ordering::Release);
    }

    /// Whether `/readyz` answers 200.
    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        self.check().is_ok()
    }

    /// `Ok` when ready, else why not.
    fn check(&self) -> Result<(), String> {
        if !self.applied.load(Ordering::Acquire) {
            return Err("not applied yet".to_owned());
        }
        let unenforced = self.unenforced.load(Ordering::Acquire);
        if unenforced > 0 {
            return Err(format!(
                "{unenforced} local pods not enforced yet; retrying (see the status file)"
            ));
        }
        let stale = self
            .stale_watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "stale: {}; enforcing the last applied state",
                stale.join("; ")
            ))
        }
    }
}

/// Totals kept elsewhere that `/metrics` reads at every scrape.
#[derive(Clone, Default)]
pub struct ScrapeSources {
    /// The datapath's verdict counters.
    pub verdicts: Option<Arc<VerdictCounters>>,
    /// The identity check's decisions.
    pub identity_checks: Option<Arc<DecisionCounts>>,
}

impl ScrapeSources {
    fn observe(&self, metrics: &Metrics) {
        let Self {
            verdicts,
            identity_checks,
        } = self;
        if let Some(counters) = verdicts {
            metrics.observe_verdicts(&counters.read());
        }
        if let Some(counts) = identity_checks {
            metrics.observe_identity_checks(&counts.snapshot());
        }
    }
}

/// Serves the probes and the metrics on `address` until the runtime stops.
pub async fn serve(
    address: SocketAddr,
    ready: Readiness,
    metrics: Arc<Metrics>,
    sources: ScrapeSources,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    info!(%address, "serving /healthz, /readyz and /metrics");
    spawn(listener, ready, metrics, sources);
    Ok(())
}

/// Answers requests on `listener` on a task of its own.
fn spawn(listener: TcpListener, ready: Readiness, metrics: Arc<Metrics>, sources: ScrapeSources) {
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let ready = Arc::clone(&ready);
            let metrics = Arc::clone(&metrics);
            let sources = sources.clone();
            tokio::spawn(async move {
                let mut request = [0_u8; 512];
                let Ok(read) = stream.read(&mut request).await else {
                    return;
                };
                let line = String::from_utf8_lossy(&request[..read]);
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let text_plain = "text/plain; charset=utf-8";
                let (status, content_type, body) = match path {
                    "/healthz" => ("200 OK", text_plain, "ok\n".to_owned()),
                    "/readyz" => match ready.check() {
                        Ok(()) => ("200 OK", text_plain, "ready\n".to_owned()),
                        Err(why) => ("503 Service Unavailable", text_plain, format!("{why}\n")),
                    },
                    "/metrics" => {
                        sources.observe(&metrics);
                        ("200 OK", metrics::CONTENT_TYPE, metrics.render())
                    }
                    _ => ("404 Not Found", text_plain, "not found\n".to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use netwarden_kube::WatchHealth;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::{Readiness, ScrapeSources, spawn};
    use crate::metrics::Metrics;

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: node\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[test]
    fn a_local_pod_left_unenforced_keeps_the_agent_unready_and_says_so() {
        let ready = super::ReadinessState::default();
        ready.set_unenforced(2);
        ready.applied(&[]);
        assert_eq!(
            ready.check(),
            Err("2 local pods not enforced yet; retrying (see the status file)".to_owned())
        );
        ready.set_unenforced(0);
        ready.applied(&[]);
        assert_eq!(ready.check(), Ok(()));
    }

    #[tokio::test]
    async fn probes_and_metrics_are_served_on_one_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let ready = Readiness::default();
        let metrics = Arc::new(Metrics::new());
        spawn(
            listener,
            Arc::clone(&ready),
            Arc::clone(&metrics),
            ScrapeSources::default(),
        );

        assert!(
            get(address, "/healthz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
        assert!(
            get(address, "/readyz")
                .await
                .starts_with("HTTP/1.1 503 Service Unavailable\r\n")
        );
        let watch = |healthy: bool| WatchHealth {
            kind: "Pod",
            resource: "pods",
            last_success: None,
            failing_for: (!healthy).then_some(Duration::from_secs(75)),
            healthy,
        };
        ready.applied(&[watch(true)]);
        assert!(
            get(address, "/readyz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
        // A stale watch: not ready, and the probe says why.
        ready.applied(&[watch(false)]);
        let response = get(address, "/readyz").await;
        assert!(
            response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{response}"
        );
        assert!(
            response.ends_with(
                "stale: the watch of pods has failed for 75 s; enforcing the last applied state\n"
            ),
            "{response}"
        );
        ready.applied(&[watch(true)]);
        assert!(
            get(address, "/readyz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );

        metrics.observe_watch_restarts(2);
        let response = get(address, "/metrics").await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("\nnetwarden_watch_restarts_total 2\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));
        assert!(
            get(address, "/other")
                .await
                .starts_with("HTTP/1.1 404 Not Found\r\n")
        );
    }
}
