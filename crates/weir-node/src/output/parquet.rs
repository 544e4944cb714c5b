//! The `parquet` output: each batch as Apache Parquet files in a local directory or on
//! S3-compatible object storage, with a completion marker per batch.
//!
//! ```toml
//! [[output]]
//! type = "parquet"
//! path = "/var/lib/weir/parquet"      # or an [output.object_store] table, not both
//! compression = "zstd"                # zstd (default), snappy, none
//! max_file_bytes = 134217728          # payload bytes per file (default 128 MiB)
//! row_group_rows = 1048576            # rows per row group (default 1 Mi)
//! payload = "binary"                  # binary (default), text, json
//! ```
//!
//! # Layout
//!
//! ```text
//! <root>/date=<YYYY-MM-DD>/node=<node_id>/batch=<batch time, ms>/part-00000.parquet
//!                                                                part-00001.parquet ...
//!                                                                _SUCCESS
//! ```
//!
//! `<root>` is `path`, or `s3://<bucket>/<prefix>` (prefix default `weir`). The date is the
//! batch time's UTC date. Batch times coincide across nodes (the same clock grid), so the
//! `node_id` in the path is what keeps nodes sharing a directory or a bucket apart.
//!
//! A batch is split into files by payload size: records go to `part-00000` until its payload
//! bytes reach `max_file_bytes`, then to `part-00001`, and so on, in log order: the split
//! depends only on the records, so a re-run batch produces the same files.
//!
//! **Readers must read only batch directories that hold `_SUCCESS`**, and in them the files
//! `_SUCCESS` lists (they are the directory's `part-*.parquet` files). `_SUCCESS` is written
//! last, after every file of the batch; a directory without it is a batch being written (or one
//! a crash interrupted, which the node writes again when it restarts). It holds a small JSON
//! object: `{"files": [...], "records": N, "bytes": B, "dead_letters": D, "node": "...",
//! "batch_time": T}` (`bytes`: payload bytes).
//!
//! # Columns
//!
//! | column       | type                          |                                        |
//! |--------------|-------------------------------|----------------------------------------|
//! | `payload`    | binary; string for `text`/`json` | the record's bytes                  |
//! | `key`        | binary, nullable              | the record's key                       |
//! | `headers`    | map<string, binary>           | the record's headers (empty if none)   |
//! | `receiver`   | string                        | the receiver that stored it            |
//! | `node`       | string                        | the node that ran the batch            |
//! | `stream`     | string, nullable              | topic / sink / connection (position)   |
//! | `partition`  | int32, nullable               | partition (position)                   |
//! | `offset`     | int64, nullable               | offset or sequence number (position)   |
//! | `batch_time` | timestamp (ms, UTC)           | the batch's time                       |
//!
//! Records without a position (the socket receiver's) have `stream`, `partition` and `offset`
//! null.
//!
//! `payload = "text"`: the payload must be UTF-8; one that is not is a rejected record (see
//! below). `payload = "json"`: the payload must be JSON, and `[output.columns]` adds a typed,
//! nullable column per entry, after the columns above in name order:
//!
//! ```toml
//! [output.columns]
//! user = { pointer = "/user/id", type = "int64" }
//! amount = { pointer = "/amount", type = "float64" }
//! at = { pointer = "/ts", type = "timestamp_ms" }
//! ```
//!
//! `pointer` is an RFC 6901 JSON pointer into the payload; `type` one of `int64` (a JSON
//! integer), `float64` (any JSON number), `bool`, `string` (a JSON string), `timestamp_ms` (an
//! integer of ms since the epoch, or an RFC 3339 string; stored as timestamp ms UTC), `json`
//! (any value, stored as its JSON text). A missing field, or JSON `null`, is null. A payload that
//! is not JSON, or a value of another type than its column's, is a rejected record, with a
//! reason naming the column.
//!
//! # Rejected records
//!
//! Rejected records go to the output's `dead_letter` output (`dead_letter = { type = "dir", path
//! = "..." }`, see [`super::dead_letter`]), written before `_SUCCESS`; the batch then completes
//! without them. Without a dead-letter output the batch fails with the first reason and is
//! retried, as any failed batch is (and is not completed until the configuration changes).
//!
//! # Exactly once
//!
//! A batch re-run after a crash has the same time and the same records, so the same files: a
//! local file is written atomically (temp file, fsync, rename, fsync directory) and a re-run
//! rewrites the same bytes; on object storage the Parquet bytes are deterministic (the writer
//! records no time), each object is created only if absent (`If-None-Match: *`; found there, it
//! is the earlier attempt's), and files above 32 MiB go up as a multipart upload once a `HEAD`
//! shows them absent. If `_SUCCESS` is there when a batch starts, the batch is skipped. Files of
//! an earlier attempt that the batch no longer has (after `max_file_bytes` changed, say) are
//! removed before `_SUCCESS` is written. Empty batches write nothing.
//!
//! Errors (an unreachable endpoint, wrong credentials, a missing bucket) fail the batch with a
//! message naming the bucket and key; the engine retries it with backoff, and nothing is
//! acknowledged as written meanwhile. Building the output connects nowhere (`check-config`
//! does no network I/O).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, MapBuilder,
    MapFieldNames, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as KeyPath;
use object_store::{
    Error as OsError, ObjectStore, ObjectStoreExt, PutMode, PutOptions, WriteMultipart,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weir::batch::Batch;
use weir::replica::object_store::{build_s3, explain, ObjectStoreConfig};
use weir_receiver::Record;

use super::dead_letter::{DeadLetterConfig, DeadLetters, Rejects};
use super::{write_atomically, OutputError, Written};

/// The completion marker's name, in each batch directory.
pub const SUCCESS: &str = "_SUCCESS";
/// Files larger than this go to object storage as a multipart upload.
pub const MULTIPART_ABOVE: usize = 32 << 20;
/// A multipart upload's part size.
const PART_SIZE: usize = 8 << 20;
/// Rows gathered in Arrow arrays before they go to the Parquet writer (which cuts row groups at
/// `row_group_rows`): what the output holds uncompressed.
const CHUNK_ROWS: usize = 8192;

/// The columns every file has, in order; `[output.columns]` names must differ from them.
pub const FIXED_COLUMNS: [&str; 9] = [
    "payload",
    "key",
    "headers",
    "receiver",
    "node",
    "stream",
    "partition",
    "offset",
    "batch_time",
];

/// `[[output]] type = "parquet"`: see the [module documentation](self) for the layout, the
/// columns and the completion marker. Exactly one of `path`, `object_store` and `hdfs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// A local directory (created if missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `[output.object_store]`: an S3-compatible bucket (`bucket`, `prefix` (default `weir`),
    /// `endpoint`, `region`, `access_key_id`, `secret_access_key`, `allow_http`,
    /// `request_timeout_ms`), as for `[engine.replication]`; keys not given come from the
    /// `AWS_*` environment variables. The secret is never printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStoreConfig>,
    /// `[output.hdfs]`: an HDFS directory (`url = "hdfs://namenode:8020"`, `path = "/weir/events"`),
    /// written with the pure-Rust `hdfs-native` client (no JVM, no libhdfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdfs: Option<HdfsConfig>,
    /// Compression of every column. Default `zstd`.
    #[serde(default)]
    pub compression: ParquetCompression,
    /// A file's payload bytes: a larger batch is split into `part-00000`, `part-00001`, ... at
    /// the record where this is reached. Default 128 MiB.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Rows per row group at most. Default 1048576.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// The `payload` column: `binary` (default), `text` (UTF-8 required), `json` (JSON
    /// required; `columns` extract typed fields).
    #[serde(default)]
    pub payload: PayloadType,
    /// `[output.columns]` (with `payload = "json"`): column name -> `{ pointer = "/a/b", type =
    /// "int64" | "float64" | "bool" | "string" | "timestamp_ms" | "json" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, JsonColumn>,
    /// Where rejected records go (`{ type = "dir", path = "..." }`); without it, a batch with a
    /// rejected record fails and is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
}

/// `[output.hdfs]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HdfsConfig {
    /// The NameNode (`hdfs://host:port`), or a name service configured in the Hadoop
    /// configuration files that `HADOOP_CONF_DIR` points to (`hdfs://ns`). Required.
    pub url: String,
    /// The directory files go under (absolute, created if missing). Required.
    pub path: String,
}

fn default_max_file_bytes() -> u64 {
    128 << 20
}

fn default_row_group_rows() -> usize {
    1 << 20
}

/// `compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParquetCompression {
    /// Zstandard, level 1 (the default).
    #[default]
    Zstd,
    /// Snappy.
    Snappy,
    /// None.
    None,
}

/// `payload`: the `payload` column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadType {
    /// Binary, as received (the default).
    #[default]
    Binary,
    /// A UTF-8 string; a payload that is not UTF-8 is rejected.
    Text,
    /// A string holding JSON; a payload that is not JSON is rejected. `columns` apply.
    Json,
}

/// One `[output.columns]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonColumn {
    /// An RFC 6901 JSON pointer (`/user/id`; `""` is the whole payload).
    pub pointer: String,
    /// The column's type.
    #[serde(rename = "type")]
    pub kind: ColumnType,
}

/// A typed column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// A JSON integer (fitting 64 bits, signed).
    Int64,
    /// A JSON number.
    Float64,
    /// `true` or `false`.
    Bool,
    /// A JSON string.
    String,
    /// An integer of ms since the Unix epoch, or an RFC 3339 string; timestamp (ms, UTC).
    TimestampMs,
    /// Any JSON value, stored as its JSON text.
    Json,
}

impl ColumnType {
    fn name(self) -> &'static str {
        match self {
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Bool => "bool",
            ColumnType::String => "string",
            ColumnType::TimestampMs => "timestamp_ms",
            ColumnType::Json => "json",
        }
    }

    fn data_type(self) -> DataType {
        match self {
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::String | ColumnType::Json => DataType::Utf8,
            ColumnType::TimestampMs => utc_ms(),
        }
    }
}

fn utc_ms() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

impl ParquetConfig {
    /// Where it writes, for logs: the directory, or `s3://<bucket>/<prefix>`.
    pub fn destination(&self) -> String {
        match (&self.path, &self.object_store, &self.hdfs) {
            (Some(p), _, _) => p.display().to_string(),
            (None, Some(o), _) if o.prefix.is_empty() => format!("s3://{}", o.bucket),
            (None, Some(o), _) => format!("s3://{}/{}", o.bucket, o.prefix),
            (None, None, Some(h)) => format!("{}{}", h.url.trim_end_matches('/'), h.path),
            (None, None, None) => "(no destination)".into(),
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let set = [
            self.path.is_some(),
            self.object_store.is_some(),
            self.hdfs.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(
                "set exactly one of `path` (a local directory), `[output.object_store]` (a \
                 bucket) and `[output.hdfs]` (an HDFS directory)"
                    .into(),
            );
        }
        if let Some(h) = &self.hdfs {
            if !h.url.starts_with("hdfs://") || h.url.len() <= "hdfs://".len() {
                return Err(format!(
                    "hdfs.url = {:?}: hdfs://namenode:port (or hdfs://nameservice)",
                    h.url
                ));
            }
            if !h.path.starts_with('/') {
                return Err(format!(
                    "hdfs.path = {:?}: an absolute directory such as \"/weir/events\"",
                    h.path
                ));
            }
        }
        match (&self.path, &self.object_store) {
            (Some(_), Some(_)) | (None, None) => {}
            (Some(p), None) if p.as_os_str().is_empty() => {
                return Err("`path` must not be empty".into())
            }
            (None, Some(o)) => {
                if o.bucket.is_empty() {
                    return Err(
                        "object_store.bucket is required: the bucket the files are written to"
                            .into(),
                    );
                }
                o.validate()
                    .map_err(|e| e.within("object_store").to_string())?;
            }
            (Some(_), None) => {}
        }
        if self.max_file_bytes == 0 {
            return Err("`max_file_bytes` must be greater than 0".into());
        }
        if self.row_group_rows == 0 {
            return Err("`row_group_rows` must be greater than 0".into());
        }
        if !self.columns.is_empty() && self.payload != PayloadType::Json {
            return Err("`columns` needs `payload = \"json\"`".into());
        }
        for (name, c) in &self.columns {
            if name.is_empty() {
                return Err("columns: a column name must not be empty".into());
            }
            if FIXED_COLUMNS.contains(&name.as_str()) {
                return Err(format!(
                    "columns.{name}: {name:?} is a column every file has already ({})",
                    FIXED_COLUMNS.join(", ")
                ));
            }
            if !(c.pointer.is_empty() || c.pointer.starts_with('/')) {
                return Err(format!(
                    "columns.{name}.pointer = {:?}: a JSON pointer is empty or starts with '/' \
                     (\"/user/id\")",
                    c.pointer
                ));
            }
        }
        if let Some(d) = &self.dead_letter {
            d.validate()?;
        }
        Ok(())
    }
}

/// Where files go.
enum Dest {
    Dir(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        bucket: String,
        root: KeyPath,
        runtime: super::IoRuntime,
        multipart_above: usize,
    },
    Hdfs {
        client: hdfs_native::Client,
        url: String,
        root: String,
        runtime: super::IoRuntime,
    },
}

impl std::fmt::Debug for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Dir(p) => write!(f, "Dir({})", p.display()),
            Dest::Store { bucket, root, .. } => write!(f, "Store(s3://{bucket}/{root})"),
            Dest::Hdfs { url, root, .. } => write!(f, "Hdfs({url}{root})"),
        }
    }
}

/// A built `parquet` output.
#[derive(Debug)]
pub struct ParquetOutput {
    config: ParquetConfig,
    schema: SchemaRef,
    props: WriterProperties,
    dest: Dest,
}

impl ParquetOutput {
    /// Builds it: the schema, the writer's settings and, for object storage, the S3 client and
    /// a small runtime for its requests. Connects nowhere.
    ///
    /// # Errors
    /// Why the configuration is refused.
    pub fn new(config: &ParquetConfig) -> Result<Self, String> {
        config.validate()?;
        let dest = match (&config.path, &config.object_store, &config.hdfs) {
            (Some(p), _, _) => Dest::Dir(p.clone()),
            (None, Some(o), _) => {
                let s3 = build_s3(o).map_err(|e| e.within("object_store").to_string())?;
                Self::store_dest(Arc::new(s3), &o.bucket, &o.prefix)?
            }
            (None, None, Some(h)) => {
                let runtime = io_runtime()?;
                // The client connects on first use; building it only reads the configuration.
                let client = hdfs_native::ClientBuilder::new()
                    .with_url(&h.url)
                    .with_io_runtime(runtime.handle().clone())
                    .build()
                    .map_err(|e| format!("hdfs.url = {:?}: {e}", h.url))?;
                Dest::Hdfs {
                    client,
                    url: h.url.trim_end_matches('/').to_string(),
                    root: h.path.trim_end_matches('/').to_string(),
                    runtime,
                }
            }
            (None, None, None) => unreachable!("validated"),
        };
        Ok(Self::with_dest(config, dest))
    }

    /// The output `config` describes (its destination ignored), writing to `store` under
    /// `prefix`: for tests, with any `object_store` implementation.
    ///
    /// # Errors
    /// Why the configuration is refused, or the runtime could not be built.
    pub fn with_store(
        config: &ParquetConfig,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
    ) -> Result<Self, String> {
        let dest = Self::store_dest(store, "test", prefix)?;
        Ok(Self::with_dest(config, dest))
    }

    fn store_dest(store: Arc<dyn ObjectStore>, bucket: &str, prefix: &str) -> Result<Dest, String> {
        let runtime = io_runtime()?;
        Ok(Dest::Store {
            store,
            bucket: bucket.to_string(),
            root: KeyPath::from(prefix),
            runtime,
            multipart_above: MULTIPART_ABOVE,
        })
    }

    fn with_dest(config: &ParquetConfig, dest: Dest) -> Self {
        let compression = match config.compression {
            ParquetCompression::Zstd => Compression::ZSTD(ZstdLevel::default()),
            ParquetCompression::Snappy => Compression::SNAPPY,
            ParquetCompression::None => Compression::UNCOMPRESSED,
        };
        // No setting here records a time or anything else that differs between two runs: the
        // same records give the same bytes.
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .build();
        ParquetOutput {
            schema: schema(config),
            config: config.clone(),
            props,
            dest,
        }
    }

    /// The Arrow schema of its files.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Writes `batch`: its files, its rejected records to `dead`, then `_SUCCESS`; nothing for
    /// an empty batch; nothing either if `_SUCCESS` is there already (`skipped`).
    ///
    /// # Errors
    /// [`OutputError`]: the batch is retried.
    pub fn write(&self, batch: &Batch, dead: &DeadLetters) -> Result<Written, OutputError> {
        if batch.is_empty() {
            return Ok(Written::default());
        }
        self.write_records(
            batch.time(),
            batch.node_id(),
            &mut |each| {
                batch.for_each_block(|block, records| {
                    for r in records {
                        each(&block.receiver, r)?;
                    }
                    Ok(())
                })
            },
            &mut |rejects| dead.settle(batch, rejects),
        )
    }

    /// [`write`](Self::write) on records given by `records` (which calls its argument with
    /// each record and its receiver, in order), with `settle` for the rejected ones.
    ///
    /// # Errors
    /// [`OutputError`].
    #[allow(clippy::type_complexity)]
    pub fn write_records(
        &self,
        time: u64,
        node_id: &str,
        records: &mut dyn FnMut(
            &mut dyn FnMut(&Arc<str>, Record) -> Result<(), OutputError>,
        ) -> Result<(), OutputError>,
        settle: &mut dyn FnMut(&Rejects) -> Result<(), OutputError>,
    ) -> Result<Written, OutputError> {
        let dir = batch_dir(time, node_id)?;
        if self.exists(&dir, SUCCESS)? {
            tracing::debug!(time, dir, "batch already written (_SUCCESS found): skipped");
            return Ok(Written {
                skipped: true,
                ..Written::default()
            });
        }
        let mut rejects = Rejects::default();
        let mut files: Vec<String> = Vec::new();
        let mut current: Option<FileWriter> = None;
        let (mut records_total, mut bytes_total) = (0u64, 0u64);
        records(&mut |receiver, record| {
            let row = match self.row(&record) {
                Ok(row) => row,
                Err(reason) => {
                    rejects.push(receiver, record, reason);
                    return Ok(());
                }
            };
            let file = match &mut current {
                Some(f) => f,
                None => current.insert(FileWriter::new(self)?),
            };
            file.append(self, receiver, node_id, time, &record, row)?;
            records_total += 1;
            bytes_total += record.payload.len() as u64;
            if file.payload_bytes >= self.config.max_file_bytes {
                let done = current.take().expect("a file is open");
                let name = part_name(files.len());
                self.put(&dir, &name, done.finish(self)?)?;
                files.push(name);
            }
            Ok(())
        })?;
        if let Some(done) = current.take() {
            let name = part_name(files.len());
            self.put(&dir, &name, done.finish(self)?)?;
            files.push(name);
        }
        // Before the marker: once it is there, a re-run skips the batch, and with it the
        // dead letters.
        settle(&rejects)?;
        self.remove_stale_parts(&dir, &files)?;
        let marker = serde_json::json!({
            "files": files,
            "records": records_total,
            "bytes": bytes_total,
            "dead_letters": rejects.len(),
            "node": node_id,
            "batch_time": time,
        });
        self.put(&dir, SUCCESS, marker.to_string().into_bytes())?;
        tracing::debug!(
            time,
            dir,
            files = files.len(),
            records = records_total,
            dead_letters = rejects.len(),
            "batch written as parquet"
        );
        Ok(Written {
            records: records_total,
            bytes: bytes_total,
            dead_letters: rejects.len() as u64,
            skipped: false,
        })
    }

    /// Checks `record` against the payload type and typed columns.
    fn row(&self, record: &Record) -> Result<Row, String> {
        let offset = match &record.position {
            Some(p) => Some(i64::try_from(p.offset).map_err(|_| {
                format!("offset {} does not fit the int64 `offset` column", p.offset)
            })?),
            None => None,
        };
        let mut cells = Vec::with_capacity(self.config.columns.len());
        match self.config.payload {
            PayloadType::Binary => {}
            PayloadType::Text => {
                std::str::from_utf8(&record.payload).map_err(|e| {
                    format!("payload is not UTF-8 (the output has payload = \"text\"): {e}")
                })?;
            }
            PayloadType::Json => {
                let v: Value = serde_json::from_slice(&record.payload).map_err(|e| {
                    format!("payload is not JSON (the output has payload = \"json\"): {e}")
                })?;
                std::str::from_utf8(&record.payload)
                    .map_err(|e| format!("payload is not UTF-8: {e}"))?;
                for (name, c) in &self.config.columns {
                    cells.push(cell(name, c, v.pointer(&c.pointer))?);
                }
            }
        }
        Ok(Row { offset, cells })
    }

    fn store_err(&self, what: &str, key: &KeyPath) -> impl FnOnce(OsError) -> OutputError + '_ {
        let what = format!("{what} s3://{}/{key}", self.bucket());
        move |e| OutputError::Destination(format!("parquet output: {what}: {}", explain(&e)))
    }

    fn bucket(&self) -> &str {
        match &self.dest {
            Dest::Store { bucket, .. } => bucket,
            Dest::Dir(_) | Dest::Hdfs { .. } => "",
        }
    }

    /// True if `name` exists in batch directory `dir`.
    fn exists(&self, dir: &str, name: &str) -> Result<bool, OutputError> {
        match &self.dest {
            Dest::Dir(root) => {
                let p = root.join(dir).join(name);
                match std::fs::metadata(&p) {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(source) => Err(OutputError::Io {
                        what: "look for",
                        path: p,
                        source,
                    }),
                }
            }
            Dest::Store {
                store,
                root,
                runtime,
                ..
            } => {
                let key = key(root, dir, name);
                match runtime.block_on(store.head(&key)) {
                    Ok(_) => Ok(true),
                    Err(OsError::NotFound { .. }) => Ok(false),
                    Err(e) => Err(self.store_err("looking for", &key)(e)),
                }
            }
            Dest::Hdfs {
                client,
                url,
                root,
                runtime,
            } => {
                let path = format!("{root}/{dir}/{name}");
                match runtime.block_on(client.get_file_info(&path)) {
                    Ok(_) => Ok(true),
                    Err(hdfs_native::HdfsError::FileNotFound(_)) => Ok(false),
                    Err(e) => Err(hdfs_err("looking for", &format!("{url}{path}"))(e)),
                }
            }
        }
    }

    /// Writes file `name` of batch directory `dir`: atomically in a directory; created if absent
    /// on object storage (an existing object of the same size is an earlier attempt's).
    fn put(&self, dir: &str, name: &str, bytes: Vec<u8>) -> Result<(), OutputError> {
        match &self.dest {
            // As in a local directory: a temp file closed (every DataNode of its pipeline has
            // it), then renamed over the name. A reader sees the whole file or none.
            Dest::Hdfs {
                client,
                url,
                root,
                runtime,
            } => {
                let d = format!("{root}/{dir}");
                let tmp = format!("{d}/.{name}.tmp");
                let dest = format!("{d}/{name}");
                runtime.block_on(async {
                    client
                        .mkdirs(&d, 0o755, true)
                        .await
                        .map_err(hdfs_err("creating the directory", &format!("{url}{d}")))?;
                    let opts = hdfs_native::WriteOptions {
                        overwrite: true,
                        ..Default::default()
                    };
                    let mut w = client
                        .create(&tmp, opts)
                        .await
                        .map_err(hdfs_err("creating", &format!("{url}{tmp}")))?;
                    w.write_bytes(Bytes::from(bytes))
                        .await
                        .map_err(hdfs_err("writing", &format!("{url}{tmp}")))?;
                    w.close()
                        .await
                        .map_err(hdfs_err("closing", &format!("{url}{tmp}")))?;
                    client
                        .rename(&tmp, &dest, true)
                        .await
                        .map_err(hdfs_err("renaming into", &format!("{url}{dest}")))
                })
            }
            Dest::Dir(root) => write_atomically(&root.join(dir), name, |out| {
                out.write_all(&bytes)?;
                Ok(())
            }),
            Dest::Store {
                store,
                root,
                runtime,
                multipart_above,
                ..
            } => {
                let key = key(root, dir, name);
                let bytes = Bytes::from(bytes);
                runtime.block_on(async {
                    if bytes.len() > *multipart_above {
                        match store.head(&key).await {
                            Ok(m) if m.size == bytes.len() as u64 => return Ok(()),
                            Ok(m) => tracing::warn!(
                                key = %key,
                                size = m.size,
                                ours = bytes.len(),
                                "an earlier attempt left an object of another size (the \
                                 configuration changed?): replacing it"
                            ),
                            Err(OsError::NotFound { .. }) => {}
                            Err(e) => return Err(self.store_err("looking for", &key)(e)),
                        }
                        return self.put_multipart(store, &key, bytes).await;
                    }
                    match store
                        .put_opts(
                            &key,
                            bytes.clone().into(),
                            PutOptions::from(PutMode::Create),
                        )
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(OsError::AlreadyExists { .. }) => {
                            let there = store
                                .head(&key)
                                .await
                                .map_err(self.store_err("looking at", &key))?;
                            if there.size == bytes.len() as u64 {
                                return Ok(());
                            }
                            tracing::warn!(
                                key = %key,
                                size = there.size,
                                ours = bytes.len(),
                                "an earlier attempt left an object of another size (the \
                                 configuration changed?): replacing it"
                            );
                            store
                                .put_opts(&key, bytes.into(), PutOptions::from(PutMode::Overwrite))
                                .await
                                .map(|_| ())
                                .map_err(self.store_err("writing", &key))
                        }
                        Err(e) => Err(self.store_err("writing", &key)(e)),
                    }
                })
            }
        }
    }

    async fn put_multipart(
        &self,
        store: &Arc<dyn ObjectStore>,
        key: &KeyPath,
        bytes: Bytes,
    ) -> Result<(), OutputError> {
        let upload = store
            .put_multipart(key)
            .await
            .map_err(self.store_err("starting a multipart upload of", key))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut at = 0;
        while at < bytes.len() {
            if let Err(e) = w.wait_for_capacity(4).await {
                let _ = w.abort().await;
                return Err(self.store_err("uploading a part of", key)(e));
            }
            let end = (at + PART_SIZE).min(bytes.len());
            w.put(bytes.slice(at..end));
            at = end;
        }
        w.finish()
            .await
            .map(|_| ())
            .map_err(self.store_err("completing the multipart upload of", key))
    }

    /// Removes the `part-*.parquet` files of `dir` that are not in `files` (left by an earlier
    /// attempt that split the batch otherwise).
    fn remove_stale_parts(&self, dir: &str, files: &[String]) -> Result<(), OutputError> {
        let stale = |name: &str| {
            name.starts_with("part-")
                && name.ends_with(".parquet")
                && !files.iter().any(|f| f == name)
        };
        match &self.dest {
            Dest::Dir(root) => {
                let d = root.join(dir);
                let Ok(entries) = std::fs::read_dir(&d) else {
                    return Ok(());
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if stale(&name) {
                        tracing::warn!(file = %e.path().display(), "removing a file of an earlier attempt at the batch");
                        std::fs::remove_file(e.path()).map_err(|source| OutputError::Io {
                            what: "remove",
                            path: e.path(),
                            source,
                        })?;
                    }
                }
                Ok(())
            }
            Dest::Store {
                store,
                root,
                runtime,
                ..
            } => {
                let prefix = key(root, dir, "");
                runtime.block_on(async {
                    let metas: Vec<_> = store
                        .list(Some(&prefix))
                        .try_collect()
                        .await
                        .map_err(self.store_err("listing", &prefix))?;
                    for m in metas {
                        if m.location.filename().is_some_and(stale) {
                            tracing::warn!(key = %m.location, "removing an object of an earlier attempt at the batch");
                            match store.delete(&m.location).await {
                                Ok(()) | Err(OsError::NotFound { .. }) => {}
                                Err(e) => return Err(self.store_err("deleting", &m.location)(e)),
                            }
                        }
                    }
                    Ok(())
                })
            }
            Dest::Hdfs {
                client,
                url,
                root,
                runtime,
            } => {
                let d = format!("{root}/{dir}");
                runtime.block_on(async {
                    let listing = match client.list_status(&d, false).await {
                        Ok(l) => l,
                        Err(hdfs_native::HdfsError::FileNotFound(_)) => return Ok(()),
                        Err(e) => return Err(hdfs_err("listing", &format!("{url}{d}"))(e)),
                    };
                    for f in listing {
                        let name = f.path.rsplit('/').next().unwrap_or_default().to_string();
                        if stale(&name) {
                            let path = format!("{d}/{name}");
                            tracing::warn!(file = %path, "removing a file of an earlier attempt at the batch");
                            client
                                .delete(&path, false)
                                .await
                                .map_err(hdfs_err("deleting", &format!("{url}{path}")))?;
                        }
                    }
                    Ok(())
                })
            }
        }
    }
}

/// The runtime of an output's object-store or HDFS client: its own threads, since `write` is
/// called from blocking threads, and a worker keeps the client's connections serviced between
/// writes.
fn io_runtime() -> Result<super::IoRuntime, String> {
    super::IoRuntime::new("weir-parquet-io", 1)
}

/// An HDFS error as the output reports it.
fn hdfs_err(what: &str, path: &str) -> impl FnOnce(hdfs_native::HdfsError) -> OutputError {
    let what = format!("parquet output: {what} {path}");
    move |e| OutputError::Destination(format!("{what}: {e}"))
}

/// `part-00000.parquet`, `part-00001.parquet`, ...
pub fn part_name(i: usize) -> String {
    format!("part-{i:05}.parquet")
}

/// A batch's directory below the root: `date=<YYYY-MM-DD>/node=<node_id>/batch=<time>`, the
/// date being the batch time's in UTC.
///
/// # Errors
/// [`OutputError::Destination`] for a time beyond the calendar.
pub fn batch_dir(time: u64, node_id: &str) -> Result<String, OutputError> {
    let date = i64::try_from(time)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .ok_or_else(|| OutputError::Destination(format!("batch time {time} has no date")))?;
    Ok(format!(
        "date={}/node={node_id}/batch={time}",
        date.format("%Y-%m-%d")
    ))
}

/// `root/dir/name` (`root/dir` for an empty name).
fn key(root: &KeyPath, dir: &str, name: &str) -> KeyPath {
    let mut k = root.clone();
    for part in dir.split('/').chain((!name.is_empty()).then_some(name)) {
        k = k.join(part);
    }
    k
}

/// The schema of the files `config` describes.
fn schema(config: &ParquetConfig) -> SchemaRef {
    let payload = match config.payload {
        PayloadType::Binary => DataType::Binary,
        PayloadType::Text | PayloadType::Json => DataType::Utf8,
    };
    let mut fields = vec![
        Field::new("payload", payload, false),
        Field::new("key", DataType::Binary, true),
        Field::new(
            "headers",
            headers_builder().finish().data_type().clone(),
            false,
        ),
        Field::new("receiver", DataType::Utf8, false),
        Field::new("node", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, true),
        Field::new("partition", DataType::Int32, true),
        Field::new("offset", DataType::Int64, true),
        Field::new("batch_time", utc_ms(), false),
    ];
    for (name, c) in &config.columns {
        fields.push(Field::new(name, c.kind.data_type(), true));
    }
    Arc::new(Schema::new(fields))
}

fn headers_builder() -> MapBuilder<StringBuilder, BinaryBuilder> {
    MapBuilder::new(
        Some(MapFieldNames {
            entry: "key_value".into(),
            key: "key".into(),
            value: "value".into(),
        }),
        StringBuilder::new(),
        BinaryBuilder::new(),
    )
    .with_values_field(Field::new("value", DataType::Binary, false))
}

/// A record's checked values beyond its own fields.
struct Row {
    offset: Option<i64>,
    cells: Vec<Cell>,
}

/// One typed column's value.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Ms(i64),
}

/// The value of column `name` for `v` (what the pointer found, if anything).
fn cell(name: &str, c: &JsonColumn, v: Option<&Value>) -> Result<Cell, String> {
    let v = match v {
        None | Some(Value::Null) => return Ok(Cell::Null),
        Some(v) => v,
    };
    let wrong = || {
        format!(
            "column `{name}` ({} at {:?}): expected {}, found {}",
            c.kind.name(),
            c.pointer,
            c.kind.name(),
            describe(v)
        )
    };
    Ok(match c.kind {
        ColumnType::Int64 => Cell::Int(v.as_i64().ok_or_else(wrong)?),
        ColumnType::Float64 => Cell::Float(v.as_f64().ok_or_else(wrong)?),
        ColumnType::Bool => Cell::Bool(v.as_bool().ok_or_else(wrong)?),
        ColumnType::String => Cell::Str(v.as_str().ok_or_else(wrong)?.to_string()),
        ColumnType::Json => Cell::Str(v.to_string()),
        ColumnType::TimestampMs => match v {
            Value::Number(n) => Cell::Ms(n.as_i64().ok_or_else(wrong)?),
            Value::String(s) => Cell::Ms(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| format!("{} ({e})", wrong()))?
                    .timestamp_millis(),
            ),
            _ => return Err(wrong()),
        },
    })
}

/// A JSON value's kind and, when short, the value: `string "abc"`, `number 1.5`, `object`.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let text = v.to_string();
    if matches!(v, Value::Array(_) | Value::Object(_)) || text.len() > 40 {
        kind.to_string()
    } else {
        format!("{kind} {text}")
    }
}

/// The Arrow builders of one chunk of rows.
struct Builders {
    payload_bin: BinaryBuilder,
    payload_str: StringBuilder,
    key: BinaryBuilder,
    headers: MapBuilder<StringBuilder, BinaryBuilder>,
    receiver: StringBuilder,
    node: StringBuilder,
    stream: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    batch_time: TimestampMillisecondBuilder,
    typed: Vec<Typed>,
    rows: usize,
}

enum Typed {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    Ms(TimestampMillisecondBuilder),
}

impl Builders {
    fn new(config: &ParquetConfig) -> Self {
        Builders {
            payload_bin: BinaryBuilder::new(),
            payload_str: StringBuilder::new(),
            key: BinaryBuilder::new(),
            headers: headers_builder(),
            receiver: StringBuilder::new(),
            node: StringBuilder::new(),
            stream: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            batch_time: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            typed: config
                .columns
                .values()
                .map(|c| match c.kind {
                    ColumnType::Int64 => Typed::Int(Int64Builder::new()),
                    ColumnType::Float64 => Typed::Float(Float64Builder::new()),
                    ColumnType::Bool => Typed::Bool(BooleanBuilder::new()),
                    ColumnType::String | ColumnType::Json => Typed::Str(StringBuilder::new()),
                    ColumnType::TimestampMs => {
                        Typed::Ms(TimestampMillisecondBuilder::new().with_timezone("UTC"))
                    }
                })
                .collect(),
            rows: 0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        payload: PayloadType,
        receiver: &str,
        node_id: &str,
        time: i64,
        r: &Record,
        row: Row,
    ) -> Result<(), OutputError> {
        match payload {
            PayloadType::Binary => self.payload_bin.append_value(&r.payload),
            PayloadType::Text | PayloadType::Json => {
                // Checked in `row`.
                let s = std::str::from_utf8(&r.payload).unwrap_or_default();
                self.payload_str.append_value(s);
            }
        }
        self.key.append_option(r.key.as_deref());
        for h in &r.headers {
            self.headers.keys().append_value(&h.name);
            self.headers.values().append_value(&h.value);
        }
        self.headers.append(true).map_err(encoding)?;
        self.receiver.append_value(receiver);
        self.node.append_value(node_id);
        match &r.position {
            Some(p) => {
                self.stream.append_value(&p.stream);
                self.partition.append_value(p.partition);
            }
            None => {
                self.stream.append_null();
                self.partition.append_null();
            }
        }
        self.offset.append_option(row.offset);
        self.batch_time.append_value(time);
        for (b, c) in self.typed.iter_mut().zip(row.cells) {
            match (b, c) {
                (Typed::Int(b), Cell::Int(v)) => b.append_value(v),
                (Typed::Float(b), Cell::Float(v)) => b.append_value(v),
                (Typed::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (Typed::Str(b), Cell::Str(v)) => b.append_value(v),
                (Typed::Ms(b), Cell::Ms(v)) => b.append_value(v),
                (Typed::Int(b), _) => b.append_null(),
                (Typed::Float(b), _) => b.append_null(),
                (Typed::Bool(b), _) => b.append_null(),
                (Typed::Str(b), _) => b.append_null(),
                (Typed::Ms(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows gathered so far as a record batch; the builders are empty again.
    fn finish(
        &mut self,
        payload: PayloadType,
        schema: &SchemaRef,
    ) -> Result<RecordBatch, OutputError> {
        let payload: ArrayRef = match payload {
            PayloadType::Binary => Arc::new(self.payload_bin.finish()),
            PayloadType::Text | PayloadType::Json => Arc::new(self.payload_str.finish()),
        };
        let mut columns: Vec<ArrayRef> = vec![
            payload,
            Arc::new(self.key.finish()),
            Arc::new(self.headers.finish()),
            Arc::new(self.receiver.finish()),
            Arc::new(self.node.finish()),
            Arc::new(self.stream.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.batch_time.finish()),
        ];
        for b in &mut self.typed {
            columns.push(match b {
                Typed::Int(b) => Arc::new(b.finish()),
                Typed::Float(b) => Arc::new(b.finish()),
                Typed::Bool(b) => Arc::new(b.finish()),
                Typed::Str(b) => Arc::new(b.finish()),
                Typed::Ms(b) => Arc::new(b.finish()),
            });
        }
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), columns).map_err(encoding)
    }
}

fn encoding(e: impl std::fmt::Display) -> OutputError {
    OutputError::Destination(format!("parquet output: encoding a file: {e}"))
}

/// One file being written: rows gather in Arrow arrays, a chunk at a time, and go to the
/// Parquet writer, which holds the file's encoded bytes until it is finished.
struct FileWriter {
    writer: ArrowWriter<Vec<u8>>,
    builders: Builders,
    payload_bytes: u64,
}

impl FileWriter {
    fn new(out: &ParquetOutput) -> Result<Self, OutputError> {
        Ok(FileWriter {
            writer: ArrowWriter::try_new(Vec::new(), out.schema.clone(), Some(out.props.clone()))
                .map_err(encoding)?,
            builders: Builders::new(&out.config),
            payload_bytes: 0,
        })
    }

    fn append(
        &mut self,
        out: &ParquetOutput,
        receiver: &str,
        node_id: &str,
        time: u64,
        r: &Record,
        row: Row,
    ) -> Result<(), OutputError> {
        // batch_dir has checked that the time fits.
        let time = i64::try_from(time).unwrap_or(i64::MAX);
        self.builders
            .append(out.config.payload, receiver, node_id, time, r, row)?;
        self.payload_bytes += r.payload.len() as u64;
        if self.builders.rows >= CHUNK_ROWS.min(out.config.row_group_rows) {
            self.flush(out)?;
        }
        Ok(())
    }

    fn flush(&mut self, out: &ParquetOutput) -> Result<(), OutputError> {
        if self.builders.rows == 0 {
            return Ok(());
        }
        let batch = self.builders.finish(out.config.payload, &out.schema)?;
        self.writer.write(&batch).map_err(encoding)
    }

    /// The file's bytes.
    fn finish(mut self, out: &ParquetOutput) -> Result<Vec<u8>, OutputError> {
        self.flush(out)?;
        self.writer.into_inner().map_err(encoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int64Type, TimestampMillisecondType};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::path::Path;
    use weir_receiver::Position;

    fn config(path: &str) -> ParquetConfig {
        toml::from_str(&format!("path = {path:?}")).unwrap()
    }

    fn records(n: usize, size: usize) -> Vec<(Arc<str>, Record)> {
        let recv: Arc<str> = "recv".into();
        (0..n)
            .map(|i| {
                let mut payload = format!("record-{i}-").into_bytes();
                payload.resize(size.max(payload.len()), b'x');
                let r = Record::new(payload)
                    .with_key(format!("k{i}"))
                    .with_header("h", format!("v{i}"))
                    .with_position(Position::offset("topic", 2, i as u64));
                (recv.clone(), r)
            })
            .collect()
    }

    /// Writes `recs` as batch `time` of node `n1`; the rejects go to `rejected`.
    fn write(
        out: &ParquetOutput,
        time: u64,
        recs: &[(Arc<str>, Record)],
        rejected: &mut Vec<(String, String)>,
    ) -> Result<Written, OutputError> {
        out.write_records(
            time,
            "n1",
            &mut |each| {
                for (recv, r) in recs {
                    each(recv, r.clone())?;
                }
                Ok(())
            },
            &mut |rejects| {
                rejected.extend(rejects.0.iter().map(|r| {
                    (
                        String::from_utf8_lossy(&r.record.payload).into_owned(),
                        r.reason.clone(),
                    )
                }));
                Ok(())
            },
        )
    }

    fn read(file: &Path) -> Vec<RecordBatch> {
        let f = std::fs::File::open(file).unwrap();
        ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect()
    }

    const T: u64 = 1_700_000_000_000; // 2023-11-14T22:13:20Z

    #[test]
    fn the_batch_directory_is_dated_by_the_batch_time_in_utc() {
        assert_eq!(
            batch_dir(T, "edge-1").unwrap(),
            "date=2023-11-14/node=edge-1/batch=1700000000000"
        );
        // The last ms of a day and the first of the next.
        assert_eq!(
            batch_dir(86_400_000 - 1, "a").unwrap(),
            "date=1970-01-01/node=a/batch=86399999"
        );
        assert_eq!(
            batch_dir(86_400_000, "a").unwrap(),
            "date=1970-01-02/node=a/batch=86400000"
        );
        assert!(batch_dir(u64::MAX, "a").is_err());
        assert_eq!(part_name(12), "part-00012.parquet");
    }

    #[test]
    fn the_same_records_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(5000, 100);
        for compression in ["zstd", "snappy", "none"] {
            let mut c = config(&dir.path().join(compression).display().to_string());
            c.compression = toml::Value::String(compression.into()).try_into().unwrap();
            let out = ParquetOutput::new(&c).unwrap();
            let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
            assert_eq!(w.records, 5000);
            let file = dir
                .path()
                .join(compression)
                .join(batch_dir(T, "n1").unwrap())
                .join("part-00000.parquet");
            let first = std::fs::read(&file).unwrap();
            // Remove the marker so that the batch is written again, as a re-run after a
            // crash between the file and the marker would.
            std::fs::remove_file(file.with_file_name(SUCCESS)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
            assert!(!w.skipped);
            assert_eq!(std::fs::read(&file).unwrap(), first, "{compression}");
            // And a third time, with the marker there: skipped.
            let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
            assert!(w.skipped && w.records == 0);
        }
    }

    #[test]
    fn a_batch_is_split_into_files_by_payload_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&dir.path().display().to_string());
        c.max_file_bytes = 10_000;
        c.row_group_rows = 7;
        let out = ParquetOutput::new(&c).unwrap();
        // 250 records of 100 bytes: 100 per file (the record reaching 10,000 ends a file).
        let recs = records(250, 100);
        let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
        assert_eq!((w.records, w.bytes), (250, 25_000));
        let bdir = dir.path().join(batch_dir(T, "n1").unwrap());
        let mut names: Vec<String> = std::fs::read_dir(&bdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "_SUCCESS",
                "part-00000.parquet",
                "part-00001.parquet",
                "part-00002.parquet"
            ]
        );
        let mut all = Vec::new();
        for (i, n) in names[1..].iter().enumerate() {
            let f = std::fs::File::open(bdir.join(n)).unwrap();
            let meta = ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
            let groups = meta.metadata().row_groups();
            assert!(groups.iter().all(|g| g.num_rows() <= 7));
            assert_eq!(groups.len(), [100usize, 100, 50][i].div_ceil(7));
            let batches = read(&bdir.join(n));
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            assert_eq!(rows, [100, 100, 50][i], "{n}");
            for b in batches {
                let p = b.column_by_name("payload").unwrap().as_binary::<i32>();
                let o = b
                    .column_by_name("offset")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                for j in 0..b.num_rows() {
                    all.push((String::from_utf8_lossy(p.value(j)).into_owned(), o.value(j)));
                }
            }
        }
        // Every record once, in order.
        assert_eq!(all.len(), 250);
        for (i, (p, o)) in all.iter().enumerate() {
            assert!(p.starts_with(&format!("record-{i}-")), "{p}");
            assert_eq!(*o, i as i64);
        }
        let marker: Value =
            serde_json::from_slice(&std::fs::read(bdir.join(SUCCESS)).unwrap()).unwrap();
        assert_eq!(marker["records"], 250);
        assert_eq!(marker["bytes"], 25_000);
        assert_eq!(marker["files"].as_array().unwrap().len(), 3);

        // The batch again with larger files (the configuration changed before a re-run): the
        // files the batch no longer has are removed before the marker is written.
        std::fs::remove_file(bdir.join(SUCCESS)).unwrap();
        c.max_file_bytes = 1 << 20;
        let out = ParquetOutput::new(&c).unwrap();
        write(&out, T, &recs, &mut Vec::new()).unwrap();
        let n = std::fs::read_dir(&bdir).unwrap().count();
        assert_eq!(n, 2, "part-00000 and _SUCCESS only");
    }

    #[test]
    fn json_fields_become_typed_columns_and_bad_records_are_rejected_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let c: ParquetConfig = toml::from_str(&format!(
            r#"
            path = {:?}
            payload = "json"
            [columns]
            user = {{ pointer = "/user/id", type = "int64" }}
            amount = {{ pointer = "/amount", type = "float64" }}
            ok = {{ pointer = "/ok", type = "bool" }}
            name = {{ pointer = "/name", type = "string" }}
            at = {{ pointer = "/at", type = "timestamp_ms" }}
            raw = {{ pointer = "/raw", type = "json" }}
            "#,
            dir.path().display().to_string()
        ))
        .unwrap();
        let out = ParquetOutput::new(&c).unwrap();
        let recv: Arc<str> = "r".into();
        let payloads = [
            r#"{"user":{"id":7},"amount":1.5,"ok":true,"name":"a","at":1700000000123,"raw":{"x":[1,2]}}"#,
            r#"{"user":{"id":8},"amount":2,"at":"2023-11-14T22:13:20.5Z","raw":null}"#,
            r#"not json"#,
            r#"{"user":{"id":"nine"}}"#,
            r#"{"user":{"id":1.5}}"#,
            r#"{"at":true}"#,
            r#"{}"#,
        ];
        let recs: Vec<_> = payloads
            .iter()
            .map(|p| (recv.clone(), Record::new(p.to_string())))
            .collect();
        let mut rejected = Vec::new();
        let w = write(&out, T, &recs, &mut rejected).unwrap();
        assert_eq!((w.records, w.dead_letters), (3, 4));
        assert_eq!(rejected.len(), 4);
        assert_eq!(rejected[0].0, "not json");
        assert!(
            rejected[0].1.contains("payload is not JSON"),
            "{:?}",
            rejected[0]
        );
        assert!(
            rejected[1].1.contains("column `user`")
                && rejected[1].1.contains("expected int64")
                && rejected[1].1.contains("string \"nine\""),
            "{:?}",
            rejected[1]
        );
        assert!(rejected[2].1.contains("column `user`"), "{:?}", rejected[2]);
        assert!(
            rejected[3].1.contains("column `at`") && rejected[3].1.contains("bool"),
            "{:?}",
            rejected[3]
        );

        let bdir = dir.path().join(batch_dir(T, "n1").unwrap());
        let batches = read(&bdir.join("part-00000.parquet"));
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        let schema = b.schema();
        let ty = |n: &str| schema.field_with_name(n).unwrap().data_type().clone();
        assert_eq!(ty("payload"), DataType::Utf8);
        assert_eq!(ty("user"), DataType::Int64);
        assert_eq!(ty("amount"), DataType::Float64);
        assert_eq!(ty("ok"), DataType::Boolean);
        assert_eq!(ty("name"), DataType::Utf8);
        assert_eq!(ty("at"), utc_ms());
        assert_eq!(ty("raw"), DataType::Utf8);
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let user = col("user");
        let user = user.as_primitive::<Int64Type>();
        assert_eq!(
            (user.value(0), user.value(1), user.is_null(2)),
            (7, 8, true)
        );
        let amount = col("amount");
        let amount = amount.as_primitive::<arrow_array::types::Float64Type>();
        assert_eq!((amount.value(0), amount.value(1)), (1.5, 2.0));
        let ok = col("ok");
        let ok = ok.as_boolean();
        assert!(ok.value(0) && ok.is_null(1));
        let name = col("name");
        let name = name.as_string::<i32>();
        assert_eq!(name.value(0), "a");
        assert!(name.is_null(1));
        let at = col("at");
        let at = at.as_primitive::<TimestampMillisecondType>();
        assert_eq!(
            (at.value(0), at.value(1)),
            (1_700_000_000_123, 1_700_000_000_500)
        );
        let raw = col("raw");
        let raw = raw.as_string::<i32>();
        assert_eq!(raw.value(0), r#"{"x":[1,2]}"#);
        assert!(raw.is_null(1) && raw.is_null(2));
        let payload = col("payload");
        assert_eq!(payload.as_string::<i32>().value(2), "{}");
        let bt = col("batch_time");
        assert_eq!(
            bt.as_primitive::<TimestampMillisecondType>().value(0),
            T as i64
        );
        assert_eq!(col("node").as_string::<i32>().value(0), "n1");
        assert_eq!(col("receiver").as_string::<i32>().value(0), "r");
        assert!(col("stream").is_null(0) && col("offset").is_null(0));
    }

    #[test]
    fn text_payloads_must_be_utf8_and_rejects_without_a_dead_letter_output_fail_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&dir.path().display().to_string());
        c.payload = PayloadType::Text;
        let out = ParquetOutput::new(&c).unwrap();
        let recv: Arc<str> = "r".into();
        let recs = vec![
            (recv.clone(), Record::new("fine")),
            (recv.clone(), Record::new(vec![0xff, 0xfe])),
        ];
        let failed = out.write_records(
            T,
            "n1",
            &mut |each| {
                for (recv, r) in &recs {
                    each(recv, r.clone())?;
                }
                Ok(())
            },
            // What `DeadLetters::settle` does without a dead-letter output.
            &mut |rejects| {
                Err(OutputError::Rejected {
                    count: rejects.len(),
                    reason: rejects.0[0].reason.clone(),
                })
            },
        );
        let e = failed.unwrap_err().to_string();
        assert!(e.contains("payload is not UTF-8"), "{e}");
        // The batch is not complete: no marker.
        let bdir = dir.path().join(batch_dir(T, "n1").unwrap());
        assert!(!bdir.join(SUCCESS).exists());
    }

    #[test]
    fn the_configuration_prints_its_defaults_and_no_secret_and_is_checked() {
        let c: ParquetConfig = toml::from_str(
            "[object_store]\nbucket = \"b\"\nsecret_access_key = \"s3cr3t\"\naccess_key_id = \"id\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        for k in [
            "compression = \"zstd\"",
            "max_file_bytes = 134217728",
            "row_group_rows = 1048576",
            "payload = \"binary\"",
            "prefix = \"weir\"",
            "request_timeout_ms = 10000",
        ] {
            assert!(text.contains(k), "{k} in {text}");
        }
        assert!(!text.contains("s3cr3t"), "{text}");
        assert_eq!(c.destination(), "s3://b/weir");
        // Building it connects nowhere (no server listens there).
        ParquetOutput::new(&c).unwrap();

        let bad = |s: &str| {
            let c: ParquetConfig = toml::from_str(s).unwrap();
            c.validate().unwrap_err()
        };
        assert!(bad("").contains("exactly one"));
        assert!(bad("path = \"x\"\n[object_store]\nbucket = \"b\"\n").contains("exactly one"));
        assert!(bad("[object_store]\nprefix = \"p\"\n").contains("object_store.bucket"));
        assert!(bad("path = \"x\"\nmax_file_bytes = 0\n").contains("max_file_bytes"));
        assert!(
            bad("path = \"x\"\n[columns]\na = { pointer = \"/a\", type = \"int64\" }\n")
                .contains("payload = \"json\"")
        );
        assert!(bad(
            "path = \"x\"\npayload = \"json\"\n[columns]\nnode = { pointer = \"/a\", type = \"int64\" }\n"
        )
        .contains("columns.node"));
        assert!(bad(
            "path = \"x\"\npayload = \"json\"\n[columns]\na = { pointer = \"a\", type = \"int64\" }\n"
        )
        .contains("columns.a.pointer"));
        assert!(toml::from_str::<ParquetConfig>("path = \"x\"\ncompresion = \"zstd\"\n").is_err());
        assert!(
            bad("path = \"x\"\n[hdfs]\nurl = \"hdfs://nn:8020\"\npath = \"/a\"\n")
                .contains("exactly one")
        );
        assert!(bad("[hdfs]\nurl = \"http://nn:8020\"\npath = \"/a\"\n").contains("hdfs.url"));
        assert!(bad("[hdfs]\nurl = \"hdfs://nn:8020\"\npath = \"a\"\n").contains("hdfs.path"));
        let c: ParquetConfig =
            toml::from_str("[hdfs]\nurl = \"hdfs://nn:8020/\"\npath = \"/weir/out\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.destination(), "hdfs://nn:8020/weir/out");
        // Building it connects nowhere (nothing listens on that host).
        ParquetOutput::new(&c).expect("built without connecting");
    }

    #[test]
    fn object_storage_creates_each_object_once_uploads_large_files_in_parts_and_skips_a_done_batch()
    {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let mut c = config("unused");
        c.max_file_bytes = 3 << 20;
        let mut out = ParquetOutput::with_store(&c, store.clone(), "pre").unwrap();
        if let Dest::Store {
            multipart_above, ..
        } = &mut out.dest
        {
            *multipart_above = 1 << 20;
        }
        // Incompressible payloads, so that the files are larger than the multipart threshold.
        let mut x: u64 = 1;
        let recv: Arc<str> = "r".into();
        let recs: Vec<_> = (0..700)
            .map(|_| {
                let p: Vec<u8> = (0..10_000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                (recv.clone(), Record::new(p))
            })
            .collect();
        let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
        assert_eq!(w.records, 700);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let list = || -> Vec<(String, u64)> {
            let mut v: Vec<_> = rt
                .block_on(store.list(None).try_collect::<Vec<_>>())
                .unwrap()
                .into_iter()
                .map(|m| (m.location.to_string(), m.size))
                .collect();
            v.sort();
            v
        };
        let first = list();
        let prefix = format!("pre/{}", batch_dir(T, "n1").unwrap());
        let names: Vec<_> = first.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(
            names,
            [
                format!("{prefix}/_SUCCESS"),
                format!("{prefix}/part-00000.parquet"),
                format!("{prefix}/part-00001.parquet"),
                format!("{prefix}/part-00002.parquet"),
            ]
        );
        assert!(first[1].1 > 1 << 20, "multipart-sized: {first:?}");
        // A re-run with the marker gone (a crash just before it): every object is found
        // there, nothing is added.
        rt.block_on(store.delete(&KeyPath::from(format!("{prefix}/_SUCCESS"))))
            .unwrap();
        let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
        assert!(!w.skipped);
        assert_eq!(list(), first);
        // With the marker: skipped.
        let w = write(&out, T, &recs, &mut Vec::new()).unwrap();
        assert!(w.skipped);
        // The bytes are what a local write gives.
        let dir = tempfile::tempdir().unwrap();
        let mut local = c.clone();
        local.path = Some(dir.path().to_path_buf());
        write(
            &ParquetOutput::new(&local).unwrap(),
            T,
            &recs,
            &mut Vec::new(),
        )
        .unwrap();
        let there = rt
            .block_on(async {
                store
                    .get(&KeyPath::from(format!("{prefix}/part-00001.parquet")))
                    .await
                    .unwrap()
                    .bytes()
                    .await
            })
            .unwrap();
        let here = std::fs::read(
            dir.path()
                .join(batch_dir(T, "n1").unwrap())
                .join("part-00001.parquet"),
        )
        .unwrap();
        assert!(there == here, "the object differs from the local file");
    }
}
