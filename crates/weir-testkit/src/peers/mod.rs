//! Real peers for the interoperability tests: an Apache Kafka broker or cluster in KRaft mode
//! ([`kafka`]), an Apache Flume agent, a Flume agent carrying Spark's sink ([`flume`]), and an
//! S3-compatible object store ([`s3`], moto's server from PyPI), and a PostgreSQL server
//! ([`postgres`], Debian's package), and an HDFS ([`hdfs`], Hadoop's MiniDFSCluster), and a
//! headless browser ([`browser`], Debian's Chromium driven by playwright-core from npm).
//!
//! Their jars come from Maven Central through the pinned lists in `interop/*.xml`, resolved by
//! `interop/fetch` into the git-ignored `interop/lib/<peer>/` (done here on first use, and by
//! `scripts/test` beforehand). Each peer runs under `interop/peer`, which kills it when the test
//! binary is gone, so a peer shared by a whole test binary (a `static`) never outlives it.
//!
//! A peer's output goes to `<dir>/log`. A peer dropped while its test panics keeps its directory
//! and says where it is; otherwise the directory is removed. [`LogsOnFailure`] does the same for
//! shared peers, which are never dropped.

pub mod browser;
pub mod flume;
pub mod hdfs;
pub mod kafka;
pub mod postgres;
pub mod s3;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::workspace_root;

/// `interop/lib/<peer>/*`, fetched first if missing. Panics with how to install what is needed.
pub fn classpath(peer: &str) -> String {
    static FETCH: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    let _one = FETCH
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let interop = workspace_root().join("interop");
    let lib = interop.join("lib").join(peer);
    let out = Command::new(interop.join("fetch"))
        .arg(peer)
        .stdout(Stdio::inherit())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "interop/fetch {peer} failed: the real-peer tests need Java 17 and Maven (Maven \
             Central reachable); install them (Debian: apt-get install openjdk-17-jdk-headless \
             maven) and run interop/fetch.\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("running interop/fetch: {e}"),
    }
    assert!(lib.is_dir(), "interop/fetch left no {}", lib.display());
    format!("{}/*", lib.display())
}

/// `java`, checked once; panics with how to install it.
pub fn java() -> PathBuf {
    static JAVA: OnceLock<PathBuf> = OnceLock::new();
    JAVA.get_or_init(|| {
        let java = std::env::var_os("JAVA_HOME")
            .map(|h| PathBuf::from(h).join("bin/java"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "java".into());
        let ok = Command::new(&java)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "no `java` found: the real-peer tests need Java 17 (Debian: apt-get install \
             openjdk-17-jdk-headless maven)"
        );
        java
    })
    .clone()
}

/// A fresh directory for one peer under `$WEIR_PEER_DIR` (default: `weir-peers` in the system's
/// temporary directory; a benchmark can point it at another disk, or tmpfs, so that the peers'
/// writes do not compete with the node's fsyncs). Directories left by test binaries that are
/// gone (named after their process id) are removed first.
pub fn peer_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let root = std::env::var_os("WEIR_PEER_DIR")
        .map_or_else(|| std::env::temp_dir().join("weir-peers"), PathBuf::from);
    let _ = fs::create_dir_all(&root);
    static PRUNE: OnceLock<()> = OnceLock::new();
    PRUNE.get_or_init(|| prune(&root));
    let dir = root.join(format!(
        "{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    fs::create_dir_all(&dir).expect("creating a peer directory");
    dir
}

fn prune(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if !alive && !e.path().join("keep").exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// One running peer process, a JVM or a Python server (under `interop/peer`). Dropping it
/// kills the process.
pub struct PeerProcess {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl PeerProcess {
    /// Starts `java <jvm_args> -cp <classpath> <main> <args>` with a heap of at most `heap_mb`,
    /// its output appended to `log`.
    pub fn start(
        name: &str,
        classpath: &str,
        heap_mb: u32,
        jvm_args: &[String],
        main: &str,
        args: &[String],
        log: &Path,
    ) -> PeerProcess {
        let mut command = vec![
            java().display().to_string(),
            format!("-Xmx{heap_mb}m"),
            "-XX:+UseSerialGC".into(),
        ];
        command.extend(jvm_args.iter().cloned());
        command.extend(["-cp".into(), classpath.into(), main.into()]);
        command.extend(args.iter().cloned());
        PeerProcess::command(name, &command, log)
    }

    /// Starts `command` (the program, then its arguments), its output appended to `log`.
    pub fn command(name: &str, command: &[String], log: &Path) -> PeerProcess {
        let wrapper = workspace_root().join("interop/peer");
        let child = Command::new(wrapper)
            .arg(std::process::id().to_string())
            .arg(log)
            .arg("--")
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        PeerProcess {
            name: name.into(),
            log: log.to_path_buf(),
            child,
        }
    }

    /// Waits until the log has a line containing `needle`; panics (with the log's tail) when the
    /// process ends first or after `timeout`. Lines before `from_line` are not looked at.
    pub fn wait_for_log(&mut self, needle: &str, from_line: usize, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            if log_lines(&self.log)
                .iter()
                .skip(from_line)
                .any(|l| l.contains(needle))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            if t0.elapsed() > timeout {
                panic!(
                    "{} did not log {needle:?} within {timeout:?}; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the peer where it is (SIGSTOP to the processes under the wrapper): connections stay
    /// open and nothing answers, as with a hung server or a partition. [`resume`](Self::resume)
    /// lets it go on.
    pub fn pause(&self) {
        self.signal_children("-STOP");
    }

    /// Continues a peer [`pause`](Self::pause)d (SIGCONT).
    pub fn resume(&self) {
        self.signal_children("-CONT");
    }

    fn signal_children(&self, sig: &str) {
        let ok = Command::new("pkill")
            .args([sig, "-P", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pkill {sig} -P: {} has no process to signal", self.name);
    }

    /// True while the JVM runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the JVM at once (SIGKILL, through the wrapper) and reaps it.
    pub fn kill(&mut self) {
        if !self.running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The lines of a log file so far (empty if it does not exist yet).
pub fn log_lines(log: &Path) -> Vec<String> {
    match fs::File::open(log) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

/// The last `n` lines of a log file.
pub fn tail(log: &Path, n: usize) -> String {
    let lines = log_lines(log);
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Keeps a peer's directory when the test holding this guard panics, and says where its logs
/// are. For per-test peers their own `Drop` does this; shared peers hand one out per test.
pub struct LogsOnFailure {
    pub what: String,
    pub dir: PathBuf,
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = fs::write(self.dir.join("keep"), b"");
            eprintln!(
                "{}'s logs are kept in {} (remove the folder when done)",
                self.what,
                self.dir.display()
            );
        }
    }
}
