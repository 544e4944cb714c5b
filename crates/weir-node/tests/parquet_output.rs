//! The `parquet` output of a real `receiver-node`, writing to a local directory and to moto's S3
//! server, read back with pyarrow (`read_parquet.py`) as a reader of the data would: only the
//! batch directories that hold `_SUCCESS`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_testkit::peers::s3::{self, S3Server, ACCESS_KEY, REGION, SECRET_KEY};
use weir_testkit::{
    frames_producer, free_port, metric, python_importing, send_frames, sigterm, wait_healthy,
    wait_until, workspace_root, Node, Scratch,
};

const NODE_ID: &str = "pq-node";

/// Where a test's node writes.
enum Dest<'a> {
    Dir(PathBuf),
    S3 {
        server: &'a S3Server,
        bucket: String,
    },
    /// `path` on a MiniDFSCluster at `url`; read back by copying it to `local` first.
    Hdfs {
        url: String,
        path: String,
        local: PathBuf,
    },
}

/// A client of the HDFS at `url`, and a runtime to drive it.
fn hdfs(url: &str) -> (hdfs_native::Client, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = hdfs_native::ClientBuilder::new()
        .with_url(url)
        .with_io_runtime(rt.handle().clone())
        .build()
        .unwrap();
    (client, rt)
}

/// Every file under `path` (relative names), with its contents.
fn hdfs_files(url: &str, path: &str) -> Vec<(String, Vec<u8>)> {
    let (client, rt) = hdfs(url);
    rt.block_on(async {
        let listing = match client.list_status(path, true).await {
            Ok(l) => l,
            Err(hdfs_native::HdfsError::FileNotFound(_)) => return Vec::new(),
            Err(e) => panic!("listing {url}{path}: {e}"),
        };
        let mut out = Vec::new();
        for f in listing.into_iter().filter(|f| !f.isdir) {
            let rel = f
                .path
                .strip_prefix(path)
                .unwrap_or(&f.path)
                .trim_start_matches('/')
                .to_string();
            // A temp file (`.<name>.tmp`) is named, not read: the node may rename it away
            // between the listing and the read; so may it remove a stale part.
            let hidden = rel.rsplit('/').next().is_some_and(|n| n.starts_with('.'));
            let bytes = if hidden {
                Vec::new()
            } else {
                let read = async {
                    let mut r = client.read(&f.path).await?;
                    r.read_bytes(r.file_length()).await
                };
                match read.await {
                    Ok(b) => b.to_vec(),
                    Err(e) if e.to_string().contains("FileNotFoundException") => continue,
                    Err(e) => panic!("reading {url}{}: {e}", f.path),
                }
            };
            out.push((rel, bytes));
        }
        out.sort();
        out
    })
}

impl Dest<'_> {
    fn s3<'a>(server: &'a S3Server, bucket: &str, create: bool) -> Dest<'a> {
        if create {
            server.create_bucket(bucket);
        }
        Dest::S3 {
            server,
            bucket: bucket.into(),
        }
    }

    /// The output's destination keys.
    fn toml(&self) -> String {
        match self {
            Dest::Dir(p) => format!("path = {:?}\n", p.display().to_string()),
            Dest::S3 { server, bucket } => format!(
                "[output.object_store]\nendpoint = {:?}\nbucket = {bucket:?}\nprefix = \"out\"\n\
                 region = {REGION:?}\naccess_key_id = {ACCESS_KEY:?}\n\
                 secret_access_key = {SECRET_KEY:?}\nrequest_timeout_ms = 1000\n",
                server.endpoint()
            ),
            Dest::Hdfs { url, path, .. } => {
                format!("[output.hdfs]\nurl = {url:?}\npath = {path:?}\n")
            }
        }
    }

    /// Everything complete in it, read by pyarrow.
    fn read(&self) -> Value {
        let script = workspace_root().join("crates/weir-node/tests/read_parquet.py");
        let mut cmd = Command::new(python_importing(
            "pyarrow, pyarrow.parquet, pyarrow.fs",
            "pyarrow, which the parquet tests read files back with",
        ));
        cmd.arg(script);
        match self {
            Dest::Dir(p) => {
                cmd.arg("local").arg(p);
            }
            Dest::Hdfs { url, path, local } => {
                let _ = std::fs::remove_dir_all(local);
                for (name, bytes) in hdfs_files(url, path) {
                    let f = local.join(name);
                    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                    std::fs::write(f, bytes).unwrap();
                }
                std::fs::create_dir_all(local).unwrap();
                cmd.arg("local").arg(local);
            }
            Dest::S3 { server, bucket } => {
                cmd.args([
                    "s3",
                    &server.endpoint(),
                    bucket,
                    "out",
                    ACCESS_KEY,
                    SECRET_KEY,
                    REGION,
                ]);
            }
        }
        let out = cmd.output().expect("running read_parquet.py");
        assert!(
            out.status.success(),
            "read_parquet.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("read_parquet.py prints JSON")
    }

    /// Every file under the root (relative paths; object keys below the prefix).
    fn files(&self) -> Vec<String> {
        match self {
            Dest::Dir(root) => {
                let mut v = Vec::new();
                walk(root, root, &mut v);
                v.sort();
                v
            }
            Dest::Hdfs { url, path, .. } => hdfs_files(url, path)
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
            Dest::S3 { server, bucket } => {
                let store = object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(server.endpoint())
                    .with_bucket_name(bucket)
                    .with_region(REGION)
                    .with_access_key_id(ACCESS_KEY)
                    .with_secret_access_key(SECRET_KEY)
                    .with_allow_http(true)
                    .build()
                    .unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let prefix = object_store::path::Path::from("out");
                let metas: Vec<_> = rt
                    .block_on(futures_util::TryStreamExt::try_collect::<Vec<_>>(
                        object_store::ObjectStore::list(&store, Some(&prefix)),
                    ))
                    .unwrap();
                let mut v: Vec<String> = metas
                    .into_iter()
                    .map(|m| m.location.to_string()["out/".len()..].to_string())
                    .collect();
                v.sort();
                v
            }
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

/// A node's configuration: a `frames` receiver on `port`, metrics on `mport`, and a parquet
/// output to `dest` with `extra` keys (top-level keys of the output table).
fn write_config(scratch: &Path, port: u16, mport: u16, dest: &Dest, extra: &str) -> PathBuf {
    let cfg = scratch.join("node.toml");
    // Keys before tables.
    let (before, after) = match dest {
        Dest::Dir(_) => (dest.toml(), String::new()),
        Dest::S3 { .. } | Dest::Hdfs { .. } => (String::new(), dest.toml()),
    };
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nnode_id = {NODE_ID:?}\n\
             [engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\njob_retry_max_ms = 300\n\
             [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\n\
             address = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
             [metrics]\naddress = \"127.0.0.1:{mport}\"\n\
             [[output]]\ntype = \"parquet\"\n{before}{extra}\n{after}",
            scratch.join("data").display().to_string(),
        ),
    )
    .unwrap();
    cfg
}

fn start(cfg: &Path, scratch: &Path, mport: u16) -> Node {
    let node = Node::start("run", cfg, Some(&scratch.join("node.log")));
    wait_healthy(mport);
    node
}

/// SIGKILL: no drain (a batch that keeps failing would hold a drain).
fn kill(mut node: Node) {
    node.0.kill().unwrap();
    node.0.wait().unwrap();
}

fn stop(mut node: Node) {
    sigterm(&node.0);
    let status = node.wait_exit(Duration::from_secs(30), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
}

/// The payloads of `read`'s rows, each with how many times it is there.
fn payload_counts(read: &Value) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in read["rows"].as_array().unwrap() {
        *m.entry(r["payload"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

/// Waits until every one of `want` has been read back from `dest` (in complete batches).
fn wait_for_all(dest: &Dest, want: &[String]) -> Value {
    let t0 = Instant::now();
    loop {
        let read = dest.read();
        let have = payload_counts(&read);
        let missing = want.iter().filter(|p| !have.contains_key(*p)).count();
        if missing == 0 {
            return read;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{missing} of {} records never appeared in complete batches",
            want.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every acknowledged record once; each batch's files are those its marker lists and nothing
/// else; the columns name the node and receiver, batch_time is the directory's.
fn check_exactly_once(dest: &Dest, read: &Value, sent: &[String]) {
    let have = payload_counts(read);
    for p in sent {
        assert_eq!(have.get(p), Some(&1), "{p} must be there exactly once");
    }
    assert_eq!(have.len(), sent.len(), "records nobody sent");
    let mut records = 0;
    for b in read["batches"].as_array().unwrap() {
        let marker = &b["marker"];
        let mut listed: Vec<String> = marker["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        listed.push("_SUCCESS".into());
        listed.sort();
        let present: Vec<String> = b["present"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        assert_eq!(present, listed, "batch {}", b["dir"]);
        assert_eq!(marker["node"], NODE_ID);
        records += marker["records"].as_u64().unwrap();
    }
    assert_eq!(records as usize, sent.len(), "the markers' record counts");
    for r in read["rows"].as_array().unwrap() {
        let dir = r["_dir"].as_str().unwrap();
        let time: u64 = dir.rsplit("batch=").next().unwrap().parse().unwrap();
        assert_eq!(r["batch_time"].as_u64(), Some(time), "{r}");
        assert!(
            dir.starts_with(&format!("date={}/node={NODE_ID}/batch=", date(time))),
            "{dir}"
        );
        assert_eq!(r["node"], NODE_ID);
        assert_eq!(r["receiver"], "frames");
        // A socket connection's records have no position, no key, no headers.
        assert!(r["stream"].is_null() && r["partition"].is_null() && r["offset"].is_null());
        assert!(r["key"].is_null());
        assert_eq!(r["headers"], serde_json::json!({}));
    }
    let schema = &read["schema"];
    assert_eq!(schema["payload"], "binary");
    assert_eq!(schema["batch_time"], "timestamp[ms, tz=UTC]");
    assert_eq!(schema["offset"], "int64");
    assert_eq!(schema["partition"], "int32");
    // pyarrow names the map's entries field after the column: map<string, binary ('headers')>.
    assert!(
        schema["headers"]
            .as_str()
            .unwrap()
            .starts_with("map<string, binary"),
        "{schema}"
    );
    // No temporary file is left, and every file is in a complete batch.
    for f in dest.files() {
        assert!(!f.contains(".tmp"), "{f}");
        let dir = f.rsplit_once('/').unwrap().0;
        assert!(
            read["batches"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["dir"] == dir),
            "{f} is in no complete batch"
        );
    }
}

fn date(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string()
}

/// 3000 records through a node into `dest`, split into small files; the node drains on
/// SIGTERM; everything is read back.
fn every_acknowledged_record_once(scratch: &Scratch, dest: &Dest) {
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(
        scratch.path(),
        port,
        mport,
        dest,
        "max_file_bytes = 1000\ncompression = \"snappy\"",
    );
    let node = start(&cfg, scratch.path(), mport);
    let acked = AtomicUsize::new(0);
    let sent = frames_producer(&AtomicU16::new(port), "rec", 3000, &acked);
    stop(node);
    // Stopping drops the output with its client runtime: no panic on the way out.
    let log = std::fs::read_to_string(scratch.path().join("node.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    let read = dest.read();
    assert!(read["incomplete"].as_array().unwrap().is_empty(), "{read}");
    check_exactly_once(dest, &read, &sent);
    // Some batches were split into several files.
    assert!(
        read["batches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["marker"]["files"].as_array().unwrap().len() > 1),
        "no batch was split"
    );
}

#[test]
fn a_node_writes_every_acknowledged_record_once_to_a_local_directory() {
    let scratch = Scratch::new("parquet-local");
    let dest = Dest::Dir(scratch.path().join("out"));
    every_acknowledged_record_once(&scratch, &dest);
}

#[test]
fn a_node_writes_every_acknowledged_record_once_to_object_storage() {
    let server = s3::shared();
    let _logs = server.logs_on_failure();
    let scratch = Scratch::new("parquet-s3");
    let dest = Dest::s3(server, "parquet-once", true);
    every_acknowledged_record_once(&scratch, &dest);
}

#[test]
fn real_hdfs_a_node_writes_every_acknowledged_record_once_to_a_minidfscluster() {
    let cluster = weir_testkit::peers::hdfs::shared();
    let _logs = cluster.logs_on_failure();
    let scratch = Scratch::new("parquet-hdfs");
    let dest = Dest::Hdfs {
        url: cluster.url(),
        path: "/weir/once".into(),
        local: scratch.path().join("copy"),
    };
    every_acknowledged_record_once(&scratch, &dest);
}

#[test]
fn real_hdfs_a_batch_interrupted_by_sigkill_is_written_again_without_duplicates() {
    let cluster = weir_testkit::peers::hdfs::shared();
    let _logs = cluster.logs_on_failure();
    let scratch = Scratch::new("parquet-hdfs-kill");
    let dest = Dest::Hdfs {
        url: cluster.url(),
        path: "/weir/killed".into(),
        local: scratch.path().join("copy"),
    };
    let (read, _) = killed_and_restarted(&scratch, &dest, None);
    // No temp file left behind in a complete batch, and no file twice.
    let files = dest.files();
    assert!(
        !files.iter().any(|f| f.ends_with(".tmp")
            && files.contains(&format!("{}/_SUCCESS", f.rsplit_once('/').unwrap().0))),
        "{files:?}"
    );
    assert!(!read["batches"].as_array().unwrap().is_empty());
}

/// Kills the node (SIGKILL) while it writes and starts it again on the same data directory:
/// recovery runs the interrupted batches again. With `pause`, the S3 server is stopped
/// (SIGSTOP) just before the kill, so that the node is killed in the middle of a request (most
/// likely between two files of a batch), and resumed before the restart. Returns what is read
/// back at the end, and how many batch directories had files but no marker after the kill.
fn killed_and_restarted(
    scratch: &Scratch,
    dest: &Dest,
    pause: Option<&S3Server>,
) -> (Value, usize) {
    let (port, mport) = (free_port(), free_port());
    // With the pause, small files: many requests per batch, so that the node is most likely
    // in the middle of a batch when the server stops.
    let files = if pause.is_some() {
        "max_file_bytes = 100"
    } else {
        "max_file_bytes = 2000"
    };
    let cfg = write_config(scratch.path(), port, mport, dest, files);
    let mut node = start(&cfg, scratch.path(), mport);
    let acked = AtomicUsize::new(0);
    let at = AtomicU16::new(port);
    let total = 4000;
    let mut interrupted = 0;
    let sent = std::thread::scope(|s| {
        let producer = s.spawn(|| frames_producer(&at, "k", total, &acked));
        wait_until("the first files", Duration::from_secs(60), || {
            dest.files().iter().any(|f| f.ends_with(".parquet"))
        });
        wait_until(
            "a third of the records acknowledged",
            Duration::from_secs(60),
            || acked.load(SeqCst) >= total / 3,
        );
        if let Some(server) = pause {
            // Stopped while a batch has files but no marker yet, if that is seen in time.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                let files = dest.files();
                let partial = files.iter().any(|f| {
                    let dir = f.rsplit_once('/').unwrap().0;
                    !files.contains(&format!("{dir}/_SUCCESS"))
                });
                if partial {
                    break;
                }
            }
            server.pause();
            std::thread::sleep(Duration::from_millis(300));
        }
        node.0.kill().unwrap();
        node.0.wait().unwrap();
        if let Some(server) = pause {
            server.resume();
        }
        let read = dest.read();
        interrupted = read["incomplete"].as_array().unwrap().len();
        eprintln!(
            "after the kill: {} complete batches, {interrupted} interrupted: {}",
            read["batches"].as_array().unwrap().len(),
            read["incomplete"]
        );
        node = start(&cfg, scratch.path(), mport);
        producer.join().unwrap()
    });
    let read = wait_for_all(dest, &sent);
    stop(node);
    let read_after = dest.read();
    assert_eq!(
        read_after["rows"].as_array().unwrap().len(),
        read["rows"].as_array().unwrap().len()
    );
    check_exactly_once(dest, &read_after, &sent);
    (read_after, interrupted)
}

#[test]
fn a_batch_interrupted_by_sigkill_is_written_again_without_duplicates_in_a_directory() {
    let scratch = Scratch::new("parquet-rerun-dir");
    let root = scratch.path().join("out");
    let dest = Dest::Dir(root.clone());
    // So that a batch is surely interrupted between its files and its marker, the marker's
    // temporary file of the next few batches is made impossible to create (a directory in its
    // place) until the node is killed: those batches write their files, fail at the marker and
    // are retried until the kill; after the restart they run again.
    let blocked: std::cell::RefCell<Vec<PathBuf>> = Default::default();
    let block = || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for i in 1..=10 {
            let t = (now / 200 + i) * 200;
            let d = root.join(format!(
                "date={}/node={NODE_ID}/batch={t}/._SUCCESS.tmp",
                date(t)
            ));
            std::fs::create_dir_all(&d).unwrap();
            blocked.borrow_mut().push(d);
        }
    };
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(scratch.path(), port, mport, &dest, "max_file_bytes = 2000");
    let mut node = start(&cfg, scratch.path(), mport);
    let acked = AtomicUsize::new(0);
    let at = AtomicU16::new(port);
    let total = 6000;
    let sent = std::thread::scope(|s| {
        let producer = s.spawn(|| frames_producer(&at, "k", total, &acked));
        wait_until("the first files", Duration::from_secs(60), || {
            dest.files().iter().any(|f| f.ends_with(".parquet"))
        });
        block();
        wait_until("a marker failing", Duration::from_secs(60), || {
            metric(mport, "weir_output_failures_total").unwrap_or(0) >= 2
        });
        node.0.kill().unwrap();
        node.0.wait().unwrap();
        // Batch directories with files and no marker: what the restart must complete.
        let interrupted: Vec<String> = dest.read()["incomplete"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        let with_files = interrupted.iter().filter(|d| {
            std::fs::read_dir(root.join(d))
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        });
        assert!(
            with_files.count() >= 1,
            "no batch was interrupted: {interrupted:?}"
        );
        for d in blocked.borrow().iter() {
            std::fs::remove_dir(d).unwrap();
        }
        node = start(&cfg, scratch.path(), mport);
        producer.join().unwrap()
    });
    wait_for_all(&dest, &sent);
    stop(node);
    let read = dest.read();
    assert!(read["incomplete"].as_array().unwrap().is_empty(), "{read}");
    check_exactly_once(&dest, &read, &sent);
    // And the simplest form of it: killed at some moment, restarted.
    let scratch = Scratch::new("parquet-rerun-dir-2");
    let dest = Dest::Dir(scratch.path().join("out"));
    killed_and_restarted(&scratch, &dest, None);
}

#[test]
fn a_batch_interrupted_by_sigkill_is_written_again_without_duplicates_on_object_storage() {
    // A server of its own: this test stops it for a moment.
    let server = S3Server::start();
    let _logs = server.logs_on_failure();
    let scratch = Scratch::new("parquet-rerun-s3");
    let dest = Dest::s3(&server, "parquet-rerun", true);
    let (read, interrupted) = killed_and_restarted(&scratch, &dest, Some(&server));
    assert!(
        interrupted >= 1,
        "the kill interrupted no batch (the server was stopped between batches)"
    );
    // Every object is a batch's marker or one of the files it lists (no second copy of a file
    // under another name).
    let mut expected = Vec::new();
    for b in read["batches"].as_array().unwrap() {
        let dir = b["dir"].as_str().unwrap();
        expected.push(format!("{dir}/_SUCCESS"));
        for f in b["marker"]["files"].as_array().unwrap() {
            expected.push(format!("{dir}/{}", f.as_str().unwrap()));
        }
    }
    expected.sort();
    assert_eq!(dest.files(), expected);
}

#[test]
fn json_fields_become_typed_columns_and_records_that_are_not_json_become_dead_letters() {
    let scratch = Scratch::new("parquet-json");
    let dest = Dest::Dir(scratch.path().join("out"));
    let dead = scratch.path().join("dead");
    let (port, mport) = (free_port(), free_port());
    let columns = "payload = \"json\"\n\
                   [output.columns]\n\
                   user = { pointer = \"/user/id\", type = \"int64\" }\n\
                   amount = { pointer = \"/amount\", type = \"float64\" }\n\
                   ok = { pointer = \"/ok\", type = \"bool\" }\n\
                   at = { pointer = \"/at\", type = \"timestamp_ms\" }\n";
    // Dead letters configured: the batch completes without the bad records.
    let cfg = write_config(
        scratch.path(),
        port,
        mport,
        &dest,
        &format!(
            "dead_letter = {{ type = \"dir\", path = {:?} }}\n{columns}",
            dead.display().to_string()
        ),
    );
    let node = start(&cfg, scratch.path(), mport);
    let mut payloads = Vec::new();
    let mut bad = Vec::new();
    for i in 0..1000i64 {
        if i % 100 == 7 {
            let p = format!("not json {i}");
            bad.push(p.clone());
            payloads.push(p.into_bytes());
        } else if i % 100 == 8 {
            let p = format!("{{\"user\":{{\"id\":\"u{i}\"}}}}");
            bad.push(p.clone());
            payloads.push(p.into_bytes());
        } else {
            let amount = if i % 3 == 0 {
                "null".to_string()
            } else {
                format!("{i}.5")
            };
            payloads.push(
                format!(
                    "{{\"user\":{{\"id\":{i}}},\"amount\":{amount},\"ok\":{},\"at\":{}}}",
                    i % 2 == 0,
                    1_700_000_000_000 + i
                )
                .into_bytes(),
            );
        }
    }
    for chunk in payloads.chunks(100) {
        send_frames(port, chunk);
    }
    let good: Vec<String> = payloads
        .iter()
        .map(|p| String::from_utf8(p.clone()).unwrap())
        .filter(|p| !bad.contains(p))
        .collect();
    let read = wait_for_all(&dest, &good);
    // The dead letters, each once, with a reason naming what was wrong.
    let mut dead_lines: BTreeMap<String, String> = BTreeMap::new();
    wait_until("the dead letters", Duration::from_secs(30), || {
        dead_lines.clear();
        for e in std::fs::read_dir(&dead).into_iter().flatten().flatten() {
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                let v: Value = serde_json::from_str(l).unwrap();
                let payload = v["record"]["payload"].as_str().unwrap().to_string();
                let old = dead_lines.insert(payload, v["reason"].as_str().unwrap().to_string());
                assert!(old.is_none(), "a dead letter twice: {l}");
            }
        }
        dead_lines.len() == bad.len()
    });
    for (payload, reason) in &dead_lines {
        assert!(bad.contains(payload), "{payload}");
        if payload.starts_with("not json") {
            assert!(reason.contains("payload is not JSON"), "{reason}");
        } else {
            assert!(
                reason.contains("column `user`") && reason.contains("expected int64"),
                "{reason}"
            );
        }
    }
    assert_eq!(
        metric(mport, "weir_output_dead_letters_total"),
        Some(bad.len() as u64)
    );
    stop(node);
    let read_after = dest.read();
    assert_eq!(read_after["rows"], read["rows"]);
    let have = payload_counts(&read);
    assert_eq!(have.len(), good.len());
    assert!(have.values().all(|n| *n == 1));
    let schema = &read["schema"];
    assert_eq!(schema["payload"], "string");
    assert_eq!(schema["user"], "int64");
    assert_eq!(schema["amount"], "double");
    assert_eq!(schema["ok"], "bool");
    assert_eq!(schema["at"], "timestamp[ms, tz=UTC]");
    for r in read["rows"].as_array().unwrap() {
        let p: Value = serde_json::from_str(r["payload"].as_str().unwrap()).unwrap();
        let i = p["user"]["id"].as_i64().unwrap();
        assert_eq!(r["user"].as_i64(), Some(i));
        if i % 3 == 0 {
            assert!(r["amount"].is_null(), "{r}");
        } else {
            assert_eq!(r["amount"].as_f64(), Some(i as f64 + 0.5));
        }
        assert_eq!(r["ok"].as_bool(), Some(i % 2 == 0));
        assert_eq!(r["at"].as_i64(), Some(1_700_000_000_000 + i));
        assert_eq!(r["node"], NODE_ID);
    }
    // Every batch's marker counts its dead letters.
    let dead_in_markers: u64 = read["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["marker"]["dead_letters"].as_u64().unwrap())
        .sum();
    assert_eq!(dead_in_markers, bad.len() as u64);
}

#[test]
fn without_a_dead_letter_output_a_rejected_record_holds_its_batch_until_one_is_configured() {
    let scratch = Scratch::new("parquet-reject");
    let dest = Dest::Dir(scratch.path().join("out"));
    let dead = scratch.path().join("dead");
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(scratch.path(), port, mport, &dest, "payload = \"json\"");
    let node = start(&cfg, scratch.path(), mport);
    send_frames(port, &[b"{\"fine\":1}".to_vec(), b"<not json>".to_vec()]);
    wait_until("failed writes", Duration::from_secs(30), || {
        metric(mport, "weir_output_failures_total").unwrap_or(0) >= 3
    });
    // The batch is retried, never completed: no marker anywhere, nothing for a reader.
    assert!(
        !dest.files().iter().any(|f| f.ends_with("_SUCCESS")),
        "{:?}",
        dest.files()
    );
    assert!(dest.read()["rows"].as_array().unwrap().is_empty());
    assert_eq!(metric(mport, "weir_batch_records_total").unwrap_or(0), 0);
    let log = std::fs::read_to_string(scratch.path().join("node.log")).unwrap();
    assert!(
        log.contains("rejected and no dead_letter output is configured")
            && log.contains("payload is not JSON"),
        "{log}"
    );
    kill(node);
    // With a dead-letter output, the same batch completes on the restart.
    let cfg = write_config(
        scratch.path(),
        port,
        mport,
        &dest,
        &format!(
            "payload = \"json\"\ndead_letter = {{ type = \"dir\", path = {:?} }}",
            dead.display().to_string()
        ),
    );
    let node = start(&cfg, scratch.path(), mport);
    let read = wait_for_all(&dest, &["{\"fine\":1}".to_string()]);
    assert_eq!(read["rows"].as_array().unwrap().len(), 1);
    wait_until("the dead letter", Duration::from_secs(30), || {
        std::fs::read_dir(&dead)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains("<not json>") && t.contains("payload is not JSON"))
            })
    });
    stop(node);
}

#[test]
fn while_the_bucket_is_missing_or_the_server_does_not_answer_batches_wait_and_nothing_is_lost() {
    // A server of its own: this test stops it.
    let server = S3Server::start();
    let _logs = server.logs_on_failure();
    let scratch = Scratch::new("parquet-down");
    // The bucket does not exist yet.
    let dest = Dest::s3(&server, "parquet-down", false);
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(scratch.path(), port, mport, &dest, "");
    let node = start(&cfg, scratch.path(), mport);
    let first: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("first-{i}").into_bytes())
        .collect();
    send_frames(port, &first);
    wait_until("failed writes", Duration::from_secs(30), || {
        metric(mport, "weir_output_failures_total").unwrap_or(0) >= 2
    });
    let log_path = scratch.path().join("node.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("s3://parquet-down/out/date=") && log.contains("NoSuchBucket"),
        "the error names the bucket, the key and the cause: {log}"
    );
    assert_eq!(metric(mport, "weir_batch_records_total").unwrap_or(0), 0);
    // Fixed: the batch completes.
    server.create_bucket("parquet-down");
    let mut want: Vec<String> = (0..500).map(|i| format!("first-{i}")).collect();
    wait_for_all(&dest, &want);

    // The server stops answering (SIGSTOP) while records come in.
    let failures = metric(mport, "weir_output_failures_total").unwrap();
    server.pause();
    let second: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("second-{i}").into_bytes())
        .collect();
    send_frames(port, &second);
    let t0 = Instant::now();
    wait_until(
        "failed writes while paused",
        Duration::from_secs(60),
        || metric(mport, "weir_output_failures_total").unwrap_or(0) >= failures + 2,
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("batch step failed"))
        .unwrap()
        .to_string();
    assert!(
        last.contains("s3://parquet-down/out/") && last.contains("parquet output"),
        "{last}"
    );
    eprintln!(
        "two failed writes {} ms after the pause; the last error: {last}",
        t0.elapsed().as_millis()
    );
    server.resume();
    want.extend((0..500).map(|i| format!("second-{i}")));
    wait_for_all(&dest, &want);
    stop(node);
    let read = dest.read();
    assert!(read["incomplete"].as_array().unwrap().is_empty(), "{read}");
    check_exactly_once(&dest, &read, &want);
}
