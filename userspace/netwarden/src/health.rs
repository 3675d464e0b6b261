//! The agent's HTTP endpoint on `--metrics-address`: `/healthz` and `/readyz` for the kubelet's
//! probes, `/metrics` for Prometheus.
//!
//! Ready means the agent has applied the cluster once (after the initial sync of its caches);
//! healthy means its loop is running. A request is one line read and one response written:
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
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::info;

use crate::metrics::{self, Metrics};

/// Set once the first apply is done.
pub type Readiness = Arc<AtomicBool>;

/// Serves the probes and the metrics on `address` until the runtime stops. `counters` are read
/// at every scrape.
pub async fn serve(
    address: SocketAddr,
    ready: Readiness,
    metrics: Arc<Metrics>,
    counters: Option<Arc<VerdictCounters>>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    info!(%address, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let ready = Arc::clone(&ready);
            let metrics = Arc::clone(&metrics);
            let counters = counters.clone();
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
                        "not applied yet\n".to_owned(),
                    ),
                    "/metrics" => {
                        if let Some(counters) = &counters {
                            metrics.observe_verdicts(&counters.read());
                        }
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
    Ok(())
}
