//! `/healthz` and `/readyz` for the kubelet's probes.
//!
//! Ready means the agent has applied the cluster once (after the initial sync of its caches);
//! healthy means its loop is running. Prometheus metrics are not served yet.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::info;

/// Set once the first apply is done.
pub type Readiness = Arc<AtomicBool>;

/// Serves the probes on `address` until the runtime stops.
pub async fn serve(address: SocketAddr, ready: Readiness) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    info!(%address, "serving /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let ready = Arc::clone(&ready);
            tokio::spawn(async move {
                let mut request = [0_u8; 512];
                let Ok(read) = stream.read(&mut request).await else {
                    return;
                };
                let line = String::from_utf8_lossy(&request[..read]);
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/healthz" => ("200 OK", "ok\n"),
                    "/readyz" if ready.load(Ordering::Acquire) => ("200 OK", "ready\n"),
                    "/readyz" => ("503 Service Unavailable", "not applied yet\n"),
                    _ => ("404 Not Found", "not found\n"),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(())
}
