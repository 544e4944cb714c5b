//! An HDFS for the tests: Apache Hadoop's MiniDFSCluster (one NameNode and one DataNode in one
//! JVM; `org.apache.hadoop:hadoop-client-minicluster`, pinned in `interop/hdfs.xml`), started by
//! `interop/MiniDfs.java` with its NameNode on a free loopback port and its storage in a peer
//! directory.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::{classpath, peer_dir, LogsOnFailure, PeerProcess};
use crate::{free_port, workspace_root};

/// A running MiniDFSCluster. Dropping it stops it.
pub struct HdfsCluster {
    port: u16,
    dir: PathBuf,
    process: PeerProcess,
}

impl HdfsCluster {
    /// Starts the cluster and waits (up to 120 s) until it takes writes. Panics with how to
    /// install what is missing (Java 17 and Maven, for `interop/fetch hdfs`).
    pub fn start() -> HdfsCluster {
        let cp = classpath("hdfs");
        let dir = peer_dir("hdfs");
        let port = free_port();
        let log = dir.join("log");
        let source = workspace_root().join("interop/MiniDfs.java");
        let mut process = PeerProcess::start(
            "MiniDFSCluster",
            &cp,
            768,
            &[],
            &source.display().to_string(),
            &[port.to_string(), dir.join("data").display().to_string()],
            &log,
        );
        process.wait_for_log("MiniDfs ready", 0, Duration::from_secs(120));
        HdfsCluster { port, dir, process }
    }

    /// `hdfs://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("hdfs://127.0.0.1:{}", self.port)
    }

    /// Stops the cluster where it is (SIGSTOP): requests hang until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Lets a [`pause`](Self::pause)d cluster answer again.
    pub fn resume(&self) {
        self.process.resume();
    }

    /// A guard that keeps the cluster's log if the test holding it fails.
    pub fn logs_on_failure(&self) -> LogsOnFailure {
        LogsOnFailure {
            what: "the MiniDFSCluster".into(),
            dir: self.dir.clone(),
        }
    }
}

/// The cluster shared by a whole test binary, started on first use.
pub fn shared() -> &'static HdfsCluster {
    static CLUSTER: OnceLock<HdfsCluster> = OnceLock::new();
    CLUSTER.get_or_init(HdfsCluster::start)
}
