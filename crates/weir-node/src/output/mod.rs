//! Outputs: where `receiver-node` writes each batch. Every output kind is here: its `type`
//! name and settings ([`OutputConfig`]), their validation, and how it writes a batch
//! ([`Output`]); adding an output touches this file (and its connector crate, if any).
//!
//! Every output counts what it writes ([`metrics`]) and can send the records its destination
//! rejects to a dead-letter output ([`dead_letter`]). Outputs that write where several nodes
//! may write too key everything by batch time **and** `node_id`.

pub mod dead_letter;
pub mod metrics;
pub mod parquet;
pub mod postgres;

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use weir_kafka::{KafkaOutput, KafkaOutputError, Sent, TransactionalOutput};
use weir_receiver::Record;

use serde::{Deserialize, Serialize};
use weir::batch::{Batch, BatchError};
use weir::identity::{Identity, IdentityError};
use weir::tracker::BlockRef;

use dead_letter::DeadLetters;
pub use metrics::{OutputStats, Written};

/// How records are written by an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// One record's payload per line (payloads containing newlines are written as they are).
    #[default]
    Lines,
    /// One JSON object per record: payload (UTF-8, or base64 in `payload_base64`), key,
    /// headers, source position and receiver name.
    Jsonl,
}

/// One `[[output]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputConfig {
    /// One file per batch in `path`, named by batch time and node
    /// (`batch-<ms since epoch, 16 digits>-<node_id>.txt` or `.jsonl`), written atomically (temp
    /// file, fsync, rename, fsync directory); a re-run batch rewrites the same file with the same
    /// contents. Empty batches write no file. At start the node claims its `node_id` in the
    /// directory (`.weir-node-<node_id>.json`) and refuses to start if another data directory
    /// holds that claim, so nodes sharing the directory never overwrite each other's batches.
    Dir {
        /// The directory (created if missing).
        path: PathBuf,
        /// Record format.
        #[serde(default)]
        format: OutputFormat,
    },
    /// Reads every record of the batch back (checksums verified) and writes nothing: for
    /// benchmarks (like Spark's per-batch `count()`) and for nodes that only ingest.
    Discard,
    /// Every record on standard output (for trying things out).
    Stdout {
        /// Record format.
        #[serde(default)]
        format: OutputFormat,
    },
    /// Every record (payload, key, headers) produced to a Kafka topic by an idempotent
    /// producer (`acks=all`); the batch succeeds only when every record is acknowledged. A
    /// re-run batch is produced again: at-least-once per batch, unless `exactly_once = true`
    /// (one transaction per batch, re-runs skipped; see `weir_kafka::exactly_once`). See
    /// weir-kafka's `KafkaOutputConfig` for the keys.
    Kafka(weir_kafka::KafkaOutputConfig),
    /// One Parquet file per batch (split when large) in a local directory or on object storage,
    /// under deterministic names with a completion marker per batch; see
    /// [`parquet::ParquetConfig`].
    Parquet(parquet::ParquetConfig),
    /// Rows in a PostgreSQL table, one transaction per batch that also records the batch (and
    /// node) in a bookkeeping table, so a re-run batch is skipped; see
    /// [`postgres::PostgresConfig`].
    Postgres(postgres::PostgresConfig),
}

impl OutputConfig {
    /// A short description for job names, logs and the status page, e.g. `dir out/` or
    /// `kafka topic events`.
    pub fn describe(&self) -> String {
        match self {
            OutputConfig::Dir { path, .. } => format!("dir {}", path.display()),
            OutputConfig::Stdout { .. } => "stdout".into(),
            OutputConfig::Discard => "discard".into(),
            OutputConfig::Kafka(c) if c.exactly_once => {
                format!("kafka topic {} (exactly once)", c.topic)
            }
            OutputConfig::Kafka(c) => format!("kafka topic {}", c.topic),
            OutputConfig::Parquet(c) => format!("parquet {}", c.destination()),
            OutputConfig::Postgres(c) => format!("postgres table {}", c.table),
        }
    }

    /// The `type` value.
    pub fn type_name(&self) -> &'static str {
        match self {
            OutputConfig::Dir { .. } => "dir",
            OutputConfig::Discard => "discard",
            OutputConfig::Stdout { .. } => "stdout",
            OutputConfig::Kafka(_) => "kafka",
            OutputConfig::Parquet(_) => "parquet",
            OutputConfig::Postgres(_) => "postgres",
        }
    }

    /// The dead-letter output configured for it, if any.
    pub fn dead_letter(&self) -> Option<&dead_letter::DeadLetterConfig> {
        match self {
            OutputConfig::Parquet(c) => c.dead_letter.as_ref(),
            OutputConfig::Postgres(c) => c.dead_letter.as_ref(),
            OutputConfig::Kafka(c) => c.dead_letter.as_ref(),
            _ => None,
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            OutputConfig::Dir { path, .. } if path.as_os_str().is_empty() => {
                Err("`path` must not be empty".into())
            }
            OutputConfig::Kafka(c) => c.validate(),
            OutputConfig::Parquet(c) => c.validate(),
            OutputConfig::Postgres(c) => c.validate(),
            _ => Ok(()),
        }
    }
}

/// Why an output failed (the batch is then retried, never marked complete).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Reading the batch failed.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// Writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Producing to Kafka failed.
    #[error(transparent)]
    Kafka(#[from] KafkaOutputError),
    /// The node's id could not be claimed in a `dir` output (see [`weir::identity`]).
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Records the destination could not accept, with no dead-letter output configured.
    #[error("{count} record(s) rejected and no dead_letter output is configured (the batch is retried): first reason: {reason}")]
    Rejected {
        /// How many.
        count: usize,
        /// The first one's reason.
        reason: String,
    },
    /// Writing to the destination failed (connection, authentication, a server error).
    #[error("{0}")]
    Destination(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OutputError + 'a {
    move |source| OutputError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The file a `dir` output of node `node_id` writes batch `time` to:
/// `batch-<time, 16 digits>-<node_id>.<txt|jsonl>`. Batch times coincide across nodes (they are
/// multiples of the batch interval), so the node id is what keeps nodes sharing a directory from
/// replacing each other's files; the time comes first so that names sort by time.
pub fn batch_file_name(time: u64, node_id: &str, format: OutputFormat) -> String {
    let ext = match format {
        OutputFormat::Lines => "txt",
        OutputFormat::Jsonl => "jsonl",
    };
    format!("batch-{time:016}-{node_id}.{ext}")
}

/// The Kafka output's header naming the node that produced a record.
pub const NODE_HEADER: &str = "weir.node";
/// The Kafka output's header holding the record's batch time (decimal ms since the epoch):
/// with [`NODE_HEADER`], it tells a consumer which batch a record belongs to, so that a batch
/// produced again can be recognised.
pub const BATCH_TIME_HEADER: &str = "weir.batch_time";

/// Writes one record in `format`; `jsonl` names the receiver and the node.
pub fn write_record(
    out: &mut dyn Write,
    format: OutputFormat,
    receiver: &str,
    node_id: &str,
    r: &Record,
) -> io::Result<()> {
    match format {
        OutputFormat::Lines => {
            out.write_all(&r.payload)?;
            out.write_all(b"\n")
        }
        OutputFormat::Jsonl => {
            out.write_all(b"{\"receiver\":")?;
            serde_json::to_writer(&mut *out, receiver)?;
            out.write_all(b",\"node\":")?;
            serde_json::to_writer(&mut *out, node_id)?;
            write_bytes_field(out, "payload", &r.payload)?;
            if let Some(k) = &r.key {
                write_bytes_field(out, "key", k)?;
            }
            if !r.headers.is_empty() {
                out.write_all(b",\"headers\":{")?;
                for (i, h) in r.headers.iter().enumerate() {
                    if i > 0 {
                        out.write_all(b",")?;
                    }
                    serde_json::to_writer(&mut *out, &h.name)?;
                    out.write_all(b":")?;
                    match std::str::from_utf8(&h.value) {
                        Ok(s) => serde_json::to_writer(&mut *out, s)?,
                        Err(_) => write!(out, "{{\"base64\":\"{}\"}}", base64(&h.value))?,
                    }
                }
                out.write_all(b"}")?;
            }
            if let Some(p) = &r.position {
                out.write_all(b",\"position\":{\"stream\":")?;
                serde_json::to_writer(&mut *out, &*p.stream)?;
                write!(
                    out,
                    ",\"partition\":{},\"offset\":{}}}",
                    p.partition, p.offset
                )?;
            }
            out.write_all(b"}\n")
        }
    }
}

/// `,"name":"text"` for UTF-8 bytes, else `,"name_base64":"..."`.
fn write_bytes_field(out: &mut dyn Write, name: &str, bytes: &[u8]) -> io::Result<()> {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            write!(out, ",\"{name}\":")?;
            serde_json::to_writer(&mut *out, s)?;
            Ok(())
        }
        Err(_) => write!(out, ",\"{name}_base64\":\"{}\"", base64(bytes)),
    }
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Writes every record of `batch` in `format`; returns what was written.
fn write_batch(
    out: &mut dyn Write,
    batch: &Batch,
    format: OutputFormat,
) -> Result<Written, OutputError> {
    let node_id = batch.node_id();
    let mut w = Written::default();
    batch.for_each_block(|block: &BlockRef, records| {
        for r in records {
            write_record(out, format, &block.receiver, node_id, &r)
                .map_err(io_err("write", Path::new("<output>")))?;
            w.records += 1;
            w.bytes += r.payload.len() as u64;
        }
        Ok::<(), OutputError>(())
    })?;
    Ok(w)
}

/// An output, built once from its configuration when the node starts (a Kafka output holds
/// its producer for the life of the node, a PostgreSQL output its connection).
#[derive(Debug)]
pub struct Output {
    config: OutputConfig,
    /// Its place in the configuration (1-based): its metrics label and dead-letter file names.
    position: usize,
    kafka: Option<KafkaOutput>,
    /// The producer of a `kafka` output with `exactly_once`.
    kafka_tx: Option<TransactionalOutput>,
    parquet: Option<parquet::ParquetOutput>,
    postgres: Option<postgres::PostgresOutput>,
    dead_letters: DeadLetters,
    stats: Arc<OutputStats>,
    /// The node whose id a `dir` output claims before its first write, and whether it has.
    claim: Option<(Identity, AtomicBool)>,
}

impl Output {
    /// Builds output number `position` (1-based) of the configuration (for `kafka`: creates
    /// the producer; nothing connects anywhere yet).
    ///
    /// # Errors
    /// A description of why the configuration is refused.
    pub fn new(config: &OutputConfig, position: usize) -> Result<Output, String> {
        config.validate()?;
        let kafka = match config {
            OutputConfig::Kafka(c) if !c.exactly_once => {
                Some(KafkaOutput::new(c.clone()).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        let kafka_tx = match config {
            OutputConfig::Kafka(c) if c.exactly_once => {
                Some(TransactionalOutput::new(c.clone()).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        let parquet = match config {
            OutputConfig::Parquet(c) => Some(parquet::ParquetOutput::new(c)?),
            _ => None,
        };
        let postgres = match config {
            OutputConfig::Postgres(c) => Some(postgres::PostgresOutput::new(c)?),
            _ => None,
        };
        let mut out = Output {
            config: config.clone(),
            position,
            kafka,
            kafka_tx,
            parquet,
            postgres,
            dead_letters: DeadLetters::new(None, position, String::new())?,
            stats: Arc::default(),
            claim: None,
        };
        out.dead_letters =
            DeadLetters::new(config.dead_letter().cloned(), position, out.describe())?;
        Ok(out)
    }

    /// Makes a `dir` output claim `identity`'s node id in its directory before it writes
    /// anything (see [`weir::identity::claim_dir`]); [`claim`](Self::claim) tries at once.
    #[must_use]
    pub fn claiming(mut self, identity: Identity) -> Self {
        self.claim = Some((identity, AtomicBool::new(false)));
        self
    }

    /// Claims the node id in a `dir` output's directory, unless done already (a no-op for
    /// other outputs, or without [`claiming`](Self::claiming)).
    ///
    /// # Errors
    /// [`IdentityError::Claimed`] if another node holds the id there; I/O errors (the output
    /// then tries again before its next write).
    pub fn claim(&self) -> Result<(), IdentityError> {
        let (OutputConfig::Dir { path, .. }, Some((identity, done))) = (&self.config, &self.claim)
        else {
            return Ok(());
        };
        if done.load(Relaxed) {
            return Ok(());
        }
        // The instance as recorded now: a node adopting another's replicated state (see
        // `weir::replica`) takes over that node's instance, and with it its claims.
        let mut identity = identity.clone();
        if let Ok(now) = weir::identity::peek(&identity.data_dir, Some(&identity.node_id)) {
            if !now.instance.is_empty() {
                identity.instance = now.instance;
            }
        }
        weir::identity::claim_dir(path, &identity)?;
        done.store(true, Relaxed);
        Ok(())
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &OutputConfig {
        &self.config
    }

    /// Its place in the configuration (1-based).
    pub fn position(&self) -> usize {
        self.position
    }

    /// The Kafka producer of a `kafka` output.
    pub fn kafka(&self) -> Option<&KafkaOutput> {
        self.kafka.as_ref()
    }

    /// What it has written.
    pub fn stats(&self) -> &Arc<OutputStats> {
        &self.stats
    }

    /// A short description for job names and logs, e.g. `dir out/` or `kafka topic events`.
    pub fn describe(&self) -> String {
        self.config.describe()
    }

    /// Writes `batch` to the output and counts it. Blocking.
    ///
    /// # Errors
    /// [`OutputError`]; the batch is then not complete and is retried.
    pub fn write(&self, batch: &Batch) -> Result<(), OutputError> {
        let t0 = Instant::now();
        match self.write_batch(batch) {
            Ok(w) => {
                if w.skipped {
                    tracing::info!(output = self.position, batch = batch.time(), destination = %self.describe(),
                        "batch already at the destination (a re-run): skipped");
                }
                self.stats.succeeded(w, t0.elapsed());
                Ok(())
            }
            Err(e) => {
                self.stats.failed(&e.to_string());
                Err(e)
            }
        }
    }

    fn write_batch(&self, batch: &Batch) -> Result<Written, OutputError> {
        match (&self.config, &self.kafka) {
            (OutputConfig::Stdout { format }, _) => {
                let stdout = io::stdout();
                let mut out = BufWriter::new(stdout.lock());
                let w = write_batch(&mut out, batch, *format)?;
                out.flush()
                    .map_err(io_err("write", Path::new("<stdout>")))?;
                Ok(w)
            }
            (OutputConfig::Discard, _) => {
                let counts = batch.map_partitions(|it| {
                    it.fold((0u64, 0u64), |(n, b), r| {
                        (n + 1, b + r.payload.len() as u64)
                    })
                })?;
                let (n, b) = counts
                    .into_iter()
                    .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2));
                debug_assert_eq!(n, batch.count());
                Ok(Written::records(n, b))
            }
            // An empty batch writes no file: a file per idle second helps nobody, and a re-run
            // of an empty batch is empty too.
            (OutputConfig::Dir { .. }, _) if batch.is_empty() => Ok(Written::default()),
            (OutputConfig::Dir { path, format }, _) => {
                self.claim()?;
                let name = batch_file_name(batch.time(), batch.node_id(), *format);
                let mut w = Written::default();
                write_atomically(path, &name, |out| {
                    w = write_batch(out, batch, *format)?;
                    Ok(())
                })?;
                Ok(w)
            }
            (OutputConfig::Kafka(_), _) if batch.is_empty() => Ok(Written::default()),
            (OutputConfig::Kafka(_), None) if self.kafka_tx.is_some() => {
                self.write_transaction(batch)
            }
            (OutputConfig::Kafka(_), Some(kafka)) => {
                let time = batch.time().to_string();
                let mut delivery = kafka.batch()?.with_headers(&[
                    (NODE_HEADER, batch.node_id().as_bytes()),
                    (BATCH_TIME_HEADER, time.as_bytes()),
                ]);
                let mut bytes = 0;
                let mut rejects = dead_letter::Rejects::default();
                batch.for_each_block(|block, records| {
                    for r in records {
                        match delivery.send(&r) {
                            Ok(()) => bytes += r.payload.len() as u64,
                            Err(e) if e.is_too_large() => {
                                let reason = format!(
                                    "Kafka: the record ({} bytes of payload) is larger than the \
                                     producer's message.max.bytes",
                                    r.payload.len()
                                );
                                rejects.push(&block.receiver, r, reason);
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok::<(), OutputError>(())
                })?;
                self.dead_letters.settle(batch, &rejects)?;
                let delivered = delivery.finish()?;
                tracing::debug!(time = batch.time(), records = delivered, topic = %kafka.config().topic, "batch delivered to Kafka");
                Ok(Written {
                    dead_letters: rejects.len() as u64,
                    ..Written::records(delivered, bytes)
                })
            }
            (OutputConfig::Kafka(c), None) => Err(OutputError::Kafka(KafkaOutputError::Create(
                format!("the output for topic {:?} was not built", c.topic),
            ))),
            (OutputConfig::Parquet(_), _) => match &self.parquet {
                Some(p) => p.write(batch, &self.dead_letters),
                None => Err(OutputError::Destination(
                    "the parquet output was not built".into(),
                )),
            },
            (OutputConfig::Postgres(_), _) => match &self.postgres {
                Some(p) => p.write(batch, &self.dead_letters),
                None => Err(OutputError::Destination(
                    "the postgres output was not built".into(),
                )),
            },
        }
    }
}

impl Output {
    /// A `kafka` output with `exactly_once`: the batch in one transaction (see
    /// [`weir_kafka::exactly_once`]); skipped when the batches topic shows it committed.
    fn write_transaction(&self, batch: &Batch) -> Result<Written, OutputError> {
        let out = self
            .kafka_tx
            .as_ref()
            .expect("called for a transactional output");
        let Some(mut tx) = out.begin(batch.node_id(), batch.time())? else {
            return Ok(Written {
                skipped: true,
                ..Written::default()
            });
        };
        let mut w = Written::default();
        let mut rejects = dead_letter::Rejects::default();
        batch.for_each_block(|block, records| {
            for r in records {
                match tx.send(&r)? {
                    Sent::Sent => {
                        w.records += 1;
                        w.bytes += r.payload.len() as u64;
                    }
                    Sent::Rejected(reason) => rejects.push(&block.receiver, r, reason),
                }
            }
            Ok::<(), OutputError>(())
        })?;
        // Before the commit: after it, a crash would lose them (the re-run is skipped). On an
        // error the transaction is dropped, which aborts it.
        self.dead_letters.settle(batch, &rejects)?;
        tx.commit(w.records, rejects.len() as u64)?;
        w.dead_letters = rejects.len() as u64;
        Ok(w)
    }
}

/// A runtime an output owns for its client (PostgreSQL, object storage, HDFS): `write` is
/// called from blocking threads and drives it with `block_on`. Dropped without blocking: the
/// output's last reference may go in an asynchronous context (the node's shutdown), where
/// dropping a runtime the usual way panics.
pub struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    /// A runtime with `workers` worker threads (0: a current-thread runtime) named `name`.
    ///
    /// # Errors
    /// Why it could not be started.
    pub fn new(name: &str, workers: usize) -> Result<IoRuntime, String> {
        let mut b = if workers == 0 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers);
            b
        };
        b.thread_name(name)
            .enable_all()
            .build()
            .map(|rt| IoRuntime(Some(rt)))
            .map_err(|e| format!("starting the {name} runtime: {e}"))
    }
}

impl std::ops::Deref for IoRuntime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for IoRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoRuntime")
    }
}

/// Writes the file `name` in `dir` (created if missing) atomically: a temp file, `fill`, fsync,
/// rename, fsync the directory. A reader sees the whole file or none, and a re-run writes the
/// same name with the same contents. A failed attempt removes its temp file (on a full disk,
/// that is the space the retry needs). `fill`'s I/O errors name the temp file.
///
/// # Errors
/// [`OutputError::Io`] naming the step and the file, or `fill`'s error.
pub fn write_atomically(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(name);
    let written = write_file(dir, &tmp, &dest, fill);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_file(
    dir: &Path,
    tmp: &Path,
    dest: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_err("create", tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    match fill(&mut out) {
        Ok(()) => {}
        Err(OutputError::Io { what, source, .. }) => {
            return Err(OutputError::Io {
                what,
                path: tmp.to_path_buf(),
                source,
            })
        }
        Err(e) => return Err(e),
    }
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .map_err(io_err("write", tmp))?;
    file.sync_all().map_err(io_err("fsync", tmp))?;
    drop(file);
    std::fs::rename(tmp, dest).map_err(io_err("rename into", dest))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    Ok(())
}

impl From<io::Error> for OutputError {
    fn from(source: io::Error) -> Self {
        OutputError::Io {
            what: "write",
            path: PathBuf::from("<output>"),
            source,
        }
    }
}

/// Every output's counters (`weir_output_*`) and a `kafka` output's delivery counters.
impl weir_receiver::ConnectorStats for Output {
    fn report(&self, out: &mut dyn FnMut(weir_receiver::Stat<'_>)) {
        self.stats.report(out);
        if let Some(k) = self.kafka() {
            k.report(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_receiver::Position;

    #[test]
    fn base64_matches_the_standard_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn batch_files_are_named_by_time_then_node() {
        assert_eq!(
            batch_file_name(1_700_000_000_000, "edge-2", OutputFormat::Jsonl),
            "batch-0001700000000000-edge-2.jsonl"
        );
        assert_eq!(
            batch_file_name(5, "a", OutputFormat::Lines),
            "batch-0000000000000005-a.txt"
        );
    }

    #[test]
    fn jsonl_carries_payload_key_headers_position_and_receiver() {
        let r = Record::new("a \"quoted\"\nline")
            .with_key(vec![0xff, 0x00])
            .with_header("h", "v")
            .with_position(Position::offset("t", 3, 42));
        let mut out = Vec::new();
        write_record(&mut out, OutputFormat::Jsonl, "recv", "n-1", &r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["receiver"], "recv");
        assert_eq!(v["node"], "n-1");
        assert_eq!(v["payload"], "a \"quoted\"\nline");
        assert_eq!(v["key_base64"], "/wA=");
        assert_eq!(v["headers"]["h"], "v");
        assert_eq!(v["position"]["stream"], "t");
        assert_eq!(v["position"]["partition"], 3);
        assert_eq!(v["position"]["offset"], 42);
        let mut out = Vec::new();
        write_record(
            &mut out,
            OutputFormat::Lines,
            "recv",
            "n-1",
            &Record::new("x"),
        )
        .unwrap();
        assert_eq!(out, b"x\n");
    }
}
