//! The agent's HTTP endpoint on `--metrics-address`: `/healthz` and `/readyz` for the kubelet's
//! probes, `/metrics` for Prometheus.
//!
//! Ready means the agent has applied the cluster (after the initial sync of its caches) and
//! every local pod is enforced: a pod whose programs did not attach, whose map entry was not
//! written or whose interface is not found yet keeps it unready until a retry succeeds.
//! Healthy means its loop is running. A request is one line read and one response written:
//! nothing here needs an HTTP framework.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use netwarden_datapath::VerdictCounters;
use netwarden_identity::DecisionCounts;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::info;

use crate::metrics::{self, Metrics};

/// Set after an apply that left no local pod unenforced; cleared after one that did.
pub type Readiness = Arc<AtomicBool>;

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
                    "/readyz" if ready.load(Ordering::Acquire) => {
                        ("200 OK", text_plain, "ready\n".to_owned())
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        text_plain,
                        "not applied yet, or a local pod is not enforced\n".to_owned(),
                    ),
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
    use std::sync::{Arc, atomic::Ordering};

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
        ready.store(true, Ordering::Release);
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
