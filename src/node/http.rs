//! A minimal HTTP/1.1 endpoint: `GET /metrics` (Prometheus text format) and `GET /health`
//! (200 `ok` once recovery is done, 200 `degraded: ...` while writes wait for disk space, 503
//! before and after a failure). Nothing else is served.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::stream::MetricsRegistry;

/// What the endpoint reports; filled in once the engine is up.
#[derive(Debug, Default)]
pub struct Status {
    /// The engine's metrics, once recovery is done.
    pub metrics: Option<MetricsRegistry>,
    /// A fatal error, if the engine failed.
    pub failure: Option<String>,
    /// Set while a graceful stop runs.
    pub stopping: bool,
}

/// Shared status.
pub type SharedStatus = Arc<Mutex<Status>>;

/// Binds `address` and serves until the task is dropped.
///
/// # Errors
/// The bind error, naming the address.
pub async fn serve(
    address: SocketAddr,
    status: SharedStatus,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| format!("metrics endpoint: cannot listen on {address}: {e}"))?;
    tracing::info!(%address, "metrics at http://{address}/metrics, health at /health");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, status)).await;
            });
        }
    }))
}

async fn handle(mut stream: TcpStream, status: SharedStatus) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (we ignore any body).
    loop {
        let r = stream.read(&mut buf[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..n].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
        if n == buf.len() {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    let (code, body, kind) = {
        let s = crate::wal::lock(&status);
        match path {
            "/metrics" => match &s.metrics {
                Some(m) => (200, m.prometheus_text(), "text/plain; version=0.0.4"),
                None => (503, "recovering\n".to_string(), "text/plain"),
            },
            "/health" => match (&s.failure, &s.metrics, s.stopping) {
                (Some(f), _, _) => (503, format!("failed: {f}\n"), "text/plain"),
                (None, _, true) => (503, "stopping\n".to_string(), "text/plain"),
                (None, Some(m), false) => match m.waiting_for_space().as_slice() {
                    [] => (200, "ok\n".to_string(), "text/plain"),
                    // Alive and recovering by itself: not a reason to restart the node.
                    places => (
                        200,
                        format!(
                            "degraded: waiting for disk space ({}); nothing new is acknowledged until space is freed\n",
                            places.join(", ")
                        ),
                        "text/plain",
                    ),
                },
                (None, None, false) => (503, "recovering\n".to_string(), "text/plain"),
            },
            _ => (
                404,
                "not found: try /metrics or /health\n".to_string(),
                "text/plain",
            ),
        }
    };
    respond(&mut stream, code, kind, &body).await
}

async fn respond(stream: &mut TcpStream, code: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
