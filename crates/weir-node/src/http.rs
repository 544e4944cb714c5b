//! The node's HTTP endpoint: `GET /metrics` (Prometheus text format), `GET /health` (200 `ok`
//! once recovery is done, 200 `degraded: ...` while writes wait for disk space, 503 before and
//! after a failure and while stopping), `GET /api/status` (the status as JSON, see
//! [`crate::status`]) and the status page that draws it at `/` (also `/ui`). `HEAD` answers the
//! same headers without a body; anything else is 404 (or 405 for other methods).
//!
//! The page is one HTML file embedded in the binary (`status_page.html`): its script polls
//! `/api/status` every two seconds and draws its charts as SVG itself, so it loads nothing from
//! anywhere else (no CDN, no fonts, no chart library).
//!
//! axum routes the requests; the connections are hyper's HTTP/1 (keep-alive), accepted by our
//! own loop so that at most [`MAX_CONNECTIONS`] are open at once (a further client waits in the
//! listen backlog), a client that does not send a complete request head within
//! [`HEADER_TIMEOUT`] is dropped, and an accept error (`EMFILE`, say) is logged and waited out
//! instead of retried in a busy loop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/metrics` and `/health` read: the engine's registry (`receiver-node run`) or the pull
/// sink's counters (`receiver-node sink`).
pub trait StatusSource: Send + Sync {
    /// Every metric, as OpenMetrics text.
    fn prometheus_text(&self) -> String;
    /// The places waiting for disk space now (empty when none): `/health` is then degraded.
    fn waiting_for_space(&self) -> Vec<&'static str>;
    /// The `/api/status` document, without its `health` (added by the endpoint).
    fn status(&self) -> serde_json::Value;
    /// Called once a second: remembers the counters for the status's rates.
    fn tick(&self);
}

/// What the endpoint reports; filled in once recovery is done.
#[derive(Default)]
pub struct Status {
    /// The metrics, once recovery is done.
    pub metrics: Option<Arc<dyn StatusSource>>,
    /// A fatal error, if the engine failed.
    pub failure: Option<String>,
    /// Set while a graceful stop runs.
    pub stopping: bool,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("ready", &self.metrics.is_some())
            .field("failure", &self.failure)
            .field("stopping", &self.stopping)
            .finish()
    }
}

/// Shared status.
pub type SharedStatus = Arc<Mutex<Status>>;

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = weir::stream::metrics::CONTENT_TYPE;

async fn metrics(State(status): State<SharedStatus>) -> impl IntoResponse {
    match &weir::receiver::lock(&status).metrics {
        Some(m) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROMETHEUS)],
            m.prometheus_text(),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            "recovering\n".to_string(),
        ),
    }
}

async fn health(State(status): State<SharedStatus>) -> impl IntoResponse {
    let (code, body) = health_of(&weir::receiver::lock(&status));
    (code, [(header::CONTENT_TYPE, TEXT)], body)
}

/// What `/health` answers (its status code and line).
fn health_of(s: &Status) -> (StatusCode, String) {
    match (&s.failure, &s.metrics, s.stopping) {
        (Some(f), _, _) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {f}\n")),
        (None, _, true) => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_string()),
        (None, Some(m), false) => match m.waiting_for_space().as_slice() {
            [] => (StatusCode::OK, "ok\n".to_string()),
            // Alive and recovering by itself: not a reason to restart the node.
            places => (
                StatusCode::OK,
                format!(
                    "degraded: waiting for disk space ({}); nothing new is acknowledged until space is freed\n",
                    places.join(", ")
                ),
            ),
        },
        (None, None, false) => (StatusCode::SERVICE_UNAVAILABLE, "recovering\n".to_string()),
    }
}

/// `/api/status`: the source's document with `health` (the `/health` line) added; before
/// recovery is done, only `health`. Always 200: the document says what is wrong.
async fn api_status(State(status): State<SharedStatus>) -> impl IntoResponse {
    let (health, source) = {
        let s = weir::receiver::lock(&status);
        (health_of(&s).1, s.metrics.clone())
    };
    // Outside the lock: reading every metric takes a while.
    let mut doc = match source {
        Some(m) => m.status(),
        None => serde_json::json!({}),
    };
    if let Some(o) = doc.as_object_mut() {
        o.insert("health".into(), health.trim_end().into());
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        doc.to_string(),
    )
}

/// The status page (embedded; it loads nothing else).
const PAGE: &str = include_str!("status_page.html");

async fn page() -> impl IntoResponse {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Nothing from anywhere else: scripts and styles inline, data from this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        PAGE,
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, TEXT)],
        "not found: try / (the status page), /api/status, /metrics or /health\n",
    )
}

/// The routes (GET, and HEAD without a body, on `/`, `/ui`, `/api/status`, `/metrics` and
/// `/health`).
pub fn router(status: SharedStatus) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ui", get(page))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(status)
}

/// Binds `address` and serves until the task is aborted.
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
    tracing::info!(%address, "status page at http://{address}/, metrics at /metrics, health at /health");
    let ticker = status.clone();
    let sampling = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let source = weir::receiver::lock(&ticker).metrics.clone();
            if let Some(s) = source {
                s.tick();
            }
        }
    });
    let service = TowerToHyperService::new(router(status));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        let _sampling = AbortOnDrop(sampling);
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning on the error.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = service.clone();
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = conn.await;
                drop(slot);
            });
        }
    }))
}

/// Aborts the task when dropped (with the endpoint's task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Reads one response (head and `Content-Length` body) from `s`.
    async fn response(s: &mut TcpStream, head_only: bool) -> (String, String) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut byte).await.unwrap(),
                1,
                "connection closed early"
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0u8; if head_only { 0 } else { len }];
        s.read_exact(&mut body).await.unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    #[tokio::test]
    async fn head_keep_alive_and_errors_are_plain_http() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let status: SharedStatus = Arc::default();
        let server = serve(SocketAddr::from(([127, 0, 0, 1], port)), status.clone())
            .await
            .unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        // Several requests on one connection.
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s, false).await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert_eq!(body, "recovering\n");
        status.lock().unwrap().failure = Some("disk on fire".into());
        s.write_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = response(&mut s, true).await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        // HEAD: the headers of the GET (its length), no body: the next response follows at once.
        assert!(
            head.to_ascii_lowercase().contains("content-length: 21"),
            "{head}"
        );
        s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s, false).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert!(body.contains("/metrics"), "{body}");
        s.write_all(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = response(&mut s, false).await;
        assert!(head.starts_with("HTTP/1.1 405"), "{head}");
        server.abort();
    }

    #[tokio::test]
    async fn connections_are_bounded_and_a_freed_slot_serves_the_next_client() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = serve(SocketAddr::from(([127, 0, 0, 1], port)), Arc::default())
            .await
            .unwrap();
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        let mut next = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        next.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), next.read(&mut byte)).await;
        assert!(early.is_err(), "served beyond MAX_CONNECTIONS");
        drop(idle.pop());
        let (head, _) = tokio::time::timeout(Duration::from_secs(5), response(&mut next, false))
            .await
            .expect("the next client is served once a slot is free");
        // The byte read above was not consumed: the timeout cancelled the read.
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        server.abort();
    }
}
