//! What weir's integration tests share, written once: a recording receiver host
//! ([`RecordingHost`]), finding the workspace's binaries and Python peers, starting and stopping a
//! node process, free ports, waiting for a condition, a plain HTTP GET, tracing for tests, and
//! starting an engine whose data directory a moment ago belonged to another.
//!
//! Dev-only: no crate depends on it outside `[dev-dependencies]`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use weir::StreamingContext;

mod host;
pub mod peers;
pub mod tls;

/// A test's directory (`weir-<name>-XXXXXX` in the temporary directory): node data, outputs,
/// configurations and logs. Removed when the test passes; when it panics, kept (its path
/// printed) with the last lines of every `*.log` in it printed.
pub struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    /// A new, empty directory.
    pub fn new(name: &str) -> Scratch {
        Scratch(Some(
            tempfile::Builder::new()
                .prefix(&format!("weir-{name}-"))
                .tempdir()
                .expect("creating a temporary directory"),
        ))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("kept only on drop").path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(dir) = self.0.take().map(tempfile::TempDir::keep) else {
            return;
        };
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                eprintln!(
                    "--- last lines of {}:\n{}",
                    e.path().display(),
                    peers::tail(&e.path(), 15)
                );
            }
        }
        eprintln!(
            "the test's directory is kept in {} (remove it when done)",
            dir.display()
        );
    }
}

pub use host::RecordingHost;

/// The workspace root (where `Cargo.toml`, `examples/` and `.venv` are).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .expect("crates/weir-testkit is two levels below the workspace root")
        .to_path_buf()
}

/// The path of one of the workspace's binaries (`receiver-node`, `crash-harness`), in the target
/// directory the running test was built in. `cargo test` on the workspace builds every binary
/// first; when only one package's tests were built and the binary is missing, it is built here
/// (same profile) so that a test never runs against nothing.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    if !bin.exists() {
        static BUILD: OnceLock<()> = OnceLock::new();
        BUILD.get_or_init(|| {
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.current_dir(workspace_root()).args(["build", "--bins"]);
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build --bins");
            assert!(status.success(), "cargo build --bins failed");
        });
    }
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

/// A port free on 127.0.0.1 at the time of asking, and never handed out before in this
/// process: a peer stopped by one test (a killed broker, to be restarted on its port) does not
/// have its port given to a test running beside it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("binding 127.0.0.1:0")
            .local_addr()
            .expect("a bound socket's address")
            .port();
        if weir_receiver::lock(&GIVEN).insert(port) {
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for async tests: polls every 10 ms, panics naming `what` after `timeout`.
pub async fn wait_until_async(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `tracing` output to the test's captured output, filtered by `RUST_LOG` (errors only
/// when it is unset). Call it at the start of a test; later calls do nothing.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Waits (up to 30 s) until a node's `/health` on 127.0.0.1:`port` answers 200.
pub fn wait_healthy(port: u16) {
    wait_until("/health", Duration::from_secs(30), || {
        http_get(port, "/health").is_some_and(|(c, _)| c == 200)
    });
}

/// A metric of `/metrics` on 127.0.0.1:`port` (the sum of its series), or `None` if absent or
/// the request failed.
pub fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, body) = http_get(port, "/metrics")?;
    let mut found = None;
    for l in body.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0) += v as u64;
    }
    found
}

/// `GET path` on 127.0.0.1:`port` (one request, `Connection: close`): the status and body, or
/// `None` if the connection or the response failed.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

/// A `receiver-node` process, killed (and reaped) when dropped.
pub struct Node(pub Child);

impl Node {
    /// Starts `receiver-node run --config config` with its output discarded.
    pub fn spawn(config: &Path) -> Node {
        Node::start("run", config, None)
    }

    /// Starts `receiver-node <command> --config config` (`run` or `sink`), its output appended
    /// to `log`, or discarded.
    pub fn start(command: &str, config: &Path, log: Option<&Path>) -> Node {
        let (out, err) = match log {
            Some(log) => {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .expect("opening the node's log");
                let err = out.try_clone().expect("cloning the log's handle");
                (Stdio::from(out), Stdio::from(err))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        Node(
            Command::new(cargo_bin("receiver-node"))
                .args([command, "--config"])
                .arg(config)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("starting receiver-node"),
        )
    }

    /// Waits for the process to exit; panics with `what` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().expect("try_wait") {
                return s;
            }
            assert!(t0.elapsed() < timeout, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python interpreter with Apache `avro` for the Flume peers: `WEIR_PYTHON`, else the
/// workspace's `.venv` (which `scripts/test` creates). Panics with the way to install it.
pub fn python() -> PathBuf {
    python_importing(
        "avro.io, avro.ipc, avro.protocol",
        "Python's `avro` package, which the Flume peers need",
    )
}

/// The tests' Python interpreter (`WEIR_PYTHON`, else the workspace's `.venv`), checked to
/// `import` the comma-separated `modules`; panics naming `what` and how to install it.
pub fn python_importing(modules: &str, what: &str) -> PathBuf {
    let python = std::env::var_os("WEIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import {what}. Install the pinned Python peers from the repository root \
         with:\n    interop/python-peers\n(or run scripts/test, or point WEIR_PYTHON at an \
         interpreter that has them: interop/python-requirements.txt)",
        python.display()
    );
    python
}

/// A Flume peer script (`connectors/flume/peers/<name>`).
pub fn flume_peer(name: &str) -> PathBuf {
    workspace_root().join("connectors/flume/peers").join(name)
}

/// Starts a context built by `ctx`, retrying while the data directory is still locked by an
/// engine dropped a moment ago (its last tasks end asynchronously).
pub async fn start(ctx: impl Fn() -> StreamingContext) -> weir::stream::RunningContext {
    for _ in 0..100 {
        match ctx().start().await {
            Ok(r) => return r,
            Err(e) if e.is_locked() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("start: {e}"),
        }
    }
    panic!("the data directory stayed locked");
}

/// Sends `payloads` as frames (`len: u32 BE | payload`) to a `frames` socket receiver on
/// 127.0.0.1:`port` over one connection (waiting up to 30 s for it to listen) and waits until
/// the node has acknowledged them all (its cumulative 8-byte counts).
pub fn send_frames<P: AsRef<[u8]>>(port: u16, payloads: &[P]) {
    wait_until("the node listening", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the node");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    let mut frames = Vec::new();
    for p in payloads {
        let p = p.as_ref();
        frames.extend_from_slice(&(p.len() as u32).to_be_bytes());
        frames.extend_from_slice(p);
    }
    s.write_all(&frames).expect("sending the frames");
    let mut acked = 0;
    while acked < payloads.len() as u64 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).expect("an acknowledgement");
        acked = u64::from_be_bytes(b);
    }
}

/// A `frames` producer: sends `prefix-<i>` for i in `0..total` in chunks, reads the node's
/// cumulative acknowledgements, reconnects after a broken connection (the node was killed) and
/// resends whatever was not acknowledged; each connection goes to the port `port` holds then
/// (a test moves it to another node). Returns the records, all acknowledged.
pub fn frames_producer(
    port: &std::sync::atomic::AtomicU16,
    prefix: &str,
    total: usize,
    acked_count: &std::sync::atomic::AtomicUsize,
) -> Vec<String> {
    use std::sync::atomic::Ordering::SeqCst;
    let records: Vec<String> = (0..total).map(|i| format!("{prefix}-{i}")).collect();
    let mut next = 0; // the first record not acknowledged yet
    let t0 = Instant::now();
    let mut conn: Option<TcpStream> = None;
    while next < total {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{prefix}: only {next} of {total} acknowledged"
        );
        let Some(s) = conn.as_mut() else {
            match TcpStream::connect(("127.0.0.1", port.load(std::sync::atomic::Ordering::SeqCst)))
            {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    conn = Some(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
            continue;
        };
        // One chunk on a fresh count: acknowledgements count this connection's records.
        let chunk = &records[next..(next + 100).min(total)];
        let mut frames = Vec::new();
        for r in chunk {
            frames.extend_from_slice(&(r.len() as u32).to_be_bytes());
            frames.extend_from_slice(r.as_bytes());
        }
        let mut ok = s.write_all(&frames).is_ok();
        let mut acked = 0usize;
        while ok && acked < chunk.len() {
            let mut b = [0u8; 8];
            match s.read_exact(&mut b) {
                Ok(()) => {
                    acked = u64::from_be_bytes(b) as usize;
                    acked_count.store(next + acked.min(chunk.len()), SeqCst);
                }
                Err(_) => ok = false,
            }
        }
        next += acked.min(chunk.len());
        acked_count.store(next, SeqCst);
        // A fresh connection per chunk keeps the cumulative count simple to reason about.
        conn = None;
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    records
}
