//! An S3-compatible object store for the tests: moto's server (`moto[server]` from PyPI, pinned
//! in `interop/python-requirements.txt`, installed into the repository's `.venv` by
//! `scripts/test`), on loopback, in memory.
//!
//! Why moto: it is on PyPI (no binary to build or download), starts in about a second, and
//! implements the conditional writes the replica's fencing relies on: `If-None-Match: *`
//! (create only if absent) and `If-Match: <etag>` (replace only that version), answering 412
//! otherwise. `tests/s3_peer.rs` checks exactly that, concurrent writers included, before any
//! weir test trusts it. It keeps everything in memory: a test that needs the store to be
//! unreachable interrupts the connection to it rather than restarting it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{peer_dir, LogsOnFailure, PeerProcess};
use crate::free_port;

/// The access key and secret moto accepts (it checks no signatures).
pub const ACCESS_KEY: &str = "weir-test";
/// See [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "weir-test-secret";
/// The region the tests use.
pub const REGION: &str = "us-east-1";

/// A running moto server. Dropping it stops the server.
pub struct S3Server {
    port: u16,
    dir: PathBuf,
    process: PeerProcess,
}

impl S3Server {
    /// Starts moto's server on a free loopback port and waits until it answers. Panics with how
    /// to install it if the interpreter lacks it.
    pub fn start() -> S3Server {
        let python = crate::python_importing(
            "moto.server, flask",
            "moto's server, which the object-store tests use as their S3 peer",
        );
        let dir = peer_dir("s3");
        let port = free_port();
        let log = dir.join("log");
        let mut process = PeerProcess::command(
            "moto S3 server",
            &[
                python.display().to_string(),
                "-m".into(),
                "moto.server".into(),
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            &log,
        );
        let t0 = Instant::now();
        while request(port, "GET", "/").is_none() {
            assert!(
                process.running(),
                "moto's server exited; its log {}:\n{}",
                log.display(),
                super::tail(&log, 40)
            );
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto's server did not answer within 60 s; its log {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server { port, dir, process }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` (path-style; a name of 3 to 63 lower-case letters, digits and `-`).
    pub fn create_bucket(&self, bucket: &str) {
        let status = request(self.port, "PUT", &format!("/{bucket}"));
        assert_eq!(status, Some(200), "creating bucket {bucket}");
    }

    /// Stops the server where it is (SIGSTOP): requests hang until [`resume`](Self::resume).
    /// Its contents stay (moto keeps them in memory: a restart would lose them).
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Lets a [`pause`](Self::pause)d server answer again.
    pub fn resume(&self) {
        self.process.resume();
    }

    /// A guard that keeps the server's log if the test holding it fails.
    pub fn logs_on_failure(&self) -> LogsOnFailure {
        LogsOnFailure {
            what: "the S3 server".into(),
            dir: self.dir.clone(),
        }
    }
}

/// The server shared by a whole test binary, started on first use.
pub fn shared() -> &'static S3Server {
    static SERVER: OnceLock<S3Server> = OnceLock::new();
    SERVER.get_or_init(S3Server::start)
}

/// One HTTP request without a body to 127.0.0.1:`port`: its status, or `None` if the server
/// did not answer.
fn request(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}
