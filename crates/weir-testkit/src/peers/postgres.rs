//! A real PostgreSQL server for the tests: Debian's `postgresql` package (`initdb` and
//! `postgres` from `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`; or
//! `$WEIR_PG_BIN`), a fresh cluster in a peer directory, listening on a free loopback port.
//!
//! TCP connections need the password ([`PASSWORD`], SCRAM); the server's own socket (in its
//! directory) trusts local users, which is how [`PostgresServer::psql`] runs SQL. PostgreSQL
//! refuses to run as root: when the tests run as root, the cluster belongs to the `postgres`
//! user that the Debian package creates, and the server runs as that user (`setpriv`, which
//! executes it in place, so the peer wrapper's kill reaches the server itself).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{peer_dir, LogsOnFailure, PeerProcess};
use crate::free_port;

/// The superuser the tests connect as.
pub const USER: &str = "weir";
/// Its password (TCP connections use SCRAM-SHA-256).
pub const PASSWORD: &str = "weir-test-password";
/// The database the tests use.
pub const DATABASE: &str = "postgres";

/// A running PostgreSQL server. Dropping it stops the server.
pub struct PostgresServer {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    command: Vec<String>,
    process: Option<PeerProcess>,
    /// With TLS: the CA that signed the server's certificate.
    ca: Option<PathBuf>,
}

const INSTALL: &str = "the PostgreSQL tests need a PostgreSQL server installed (Debian: apt-get install \
                       postgresql), or $WEIR_PG_BIN set to the directory holding initdb and postgres";

/// The directory holding `initdb` and `postgres`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WEIR_PG_BIN") {
        return PathBuf::from(d);
    }
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if o.status.success() && d.join("postgres").exists() {
            return d;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!("no PostgreSQL server found: {INSTALL}"),
    }
}

/// True when running as root (PostgreSQL must then run as another user).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `command` as the `postgres` user when running as root.
fn as_server_user(program: &Path, args: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    if is_root() {
        v.extend(
            [
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ]
            .map(String::from),
        );
    }
    v.push(program.display().to_string());
    v.extend(args.iter().cloned());
    v
}

fn run(what: &str, command: &[String]) {
    let out = Command::new(&command[0])
        .args(&command[1..])
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}: {INSTALL}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PostgresServer {
    /// Creates a cluster and starts its server; waits until it accepts connections. Panics with
    /// how to install PostgreSQL if it is missing.
    pub fn start() -> PostgresServer {
        PostgresServer::start_with(false)
    }

    /// A server that takes TCP connections **only over TLS** (`hostssl` in `pg_hba.conf`), its
    /// certificate for `127.0.0.1` signed by a CA made here ([`ca_file`](Self::ca_file));
    /// needs `openssl`.
    pub fn start_tls() -> PostgresServer {
        PostgresServer::start_with(true)
    }

    /// The CA certificate (PEM) of a [`start_tls`](Self::start_tls) server.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    fn start_with(tls: bool) -> PostgresServer {
        let bin = bin_dir();
        let dir = peer_dir("postgres");
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("writing the password file");
        if is_root() {
            run(
                "chown of the PostgreSQL peer directory",
                &["chown", "-R", "postgres:", &dir.display().to_string()].map(String::from),
            );
        }
        run(
            "initdb",
            &as_server_user(
                &bin.join("initdb"),
                &[
                    "-D".into(),
                    data.display().to_string(),
                    "-U".into(),
                    USER.into(),
                    format!("--pwfile={}", pwfile.display()),
                    "--auth-local=trust".into(),
                    "--auth-host=scram-sha-256".into(),
                    "-E".into(),
                    "UTF8".into(),
                    "--locale=C".into(),
                    "--no-sync".into(),
                ],
            ),
        );
        let mut ssl_args: Vec<String> = Vec::new();
        let ca = if tls {
            let ca = make_certificates(&dir);
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).expect("reading pg_hba.conf");
            let text: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, text).expect("writing pg_hba.conf");
            for a in [
                "ssl=on".to_string(),
                format!("ssl_cert_file={}", dir.join("server.crt").display()),
                format!("ssl_key_file={}", dir.join("server.key").display()),
            ] {
                ssl_args.extend(["-c".to_string(), a]);
            }
            if is_root() {
                run(
                    "chown of the PostgreSQL peer directory",
                    &["chown", "-R", "postgres:", &dir.display().to_string()].map(String::from),
                );
            }
            Some(ca)
        } else {
            None
        };
        let port = free_port();
        let mut args: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-k".into(),
            dir.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "max_connections=50".into(),
            "-c".into(),
            "shared_buffers=64MB".into(),
        ];
        args.extend(ssl_args);
        let command = as_server_user(&bin.join("postgres"), &args);
        let mut server = PostgresServer {
            port,
            dir,
            bin,
            command,
            process: None,
            ca,
        };
        server.restart();
        server
    }

    /// Kills the server (SIGKILL: its sessions end; what was committed stays on disk).
    pub fn kill(&mut self) {
        self.process = None;
        // The postmaster's children notice its death and exit; wait until the port is free.
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "PostgreSQL still answers 30 s after being killed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server (again, after [`kill`](Self::kill)) on the same data and port, and
    /// waits until it accepts connections.
    pub fn restart(&mut self) {
        let log = self.dir.join("log");
        self.process = Some(PeerProcess::command("PostgreSQL", &self.command, &log));
        let port = self.port;
        let t0 = Instant::now();
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "PostgreSQL did not accept connections within 60 s; its log {}:\n{}",
                log.display(),
                super::tail(&log, 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL without the password: `postgresql://weir@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Runs `sql` with `psql` over the server's own socket and returns its output (unaligned,
    /// tuples only: one line per row, fields separated by `|`). Panics if psql fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .psql_command(&["-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// `psql` connected to the server (tuples only, unaligned, stop on error), for more
    /// arguments: `-c SQL`, `-f FILE`, or a `\copy` with its input on stdin.
    pub fn psql_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        if !self.bin.join("psql").exists() {
            c = Command::new("psql");
        }
        c.args([
            "-h",
            &self.dir.display().to_string(),
            "-p",
            &self.port.to_string(),
            "-U",
            USER,
            "-d",
            DATABASE,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(args);
        c
    }

    /// The number `sql` returns (one row, one column).
    pub fn count(&self, sql: &str) -> u64 {
        let out = self.psql(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql:?} returned {out:?}, not a number"))
    }

    /// Like [`count`](Self::count), `None` if the query fails (a table not created yet).
    pub fn try_count(&self, sql: &str) -> Option<u64> {
        let out = self.psql_command(&["-c", sql]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// A guard that keeps the server's log if the test holding it fails.
    pub fn logs_on_failure(&self) -> LogsOnFailure {
        LogsOnFailure {
            what: "PostgreSQL".into(),
            dir: self.dir.clone(),
        }
    }
}

/// A CA and a certificate for `127.0.0.1` signed by it, in `dir` ([`crate::tls::TestPki`]:
/// `server.crt`, `server.key`, the key readable by its owner only, as PostgreSQL demands).
/// Returns the CA's file.
fn make_certificates(dir: &Path) -> PathBuf {
    crate::tls::TestPki::create(dir).ca
}

/// The server shared by a whole test binary, started on first use.
pub fn shared() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(PostgresServer::start)
}
