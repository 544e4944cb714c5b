//! The `postgres` output: each batch's records as rows of a PostgreSQL table, exactly once.
//!
//! **One transaction per batch.** The rows go in with `COPY ... FROM STDIN (FORMAT binary)`,
//! and the same transaction inserts the row `(target, node_id, batch_time)` into a bookkeeping
//! table (default `weir_batches`, created if missing). A batch already recorded there is
//! skipped: a batch re-run after a crash (same time, same records) or retried after a commit
//! whose answer was lost writes nothing twice. The key holds the node's id because batch times
//! coincide across nodes: keyed by time alone, node 2 would skip node 1's batches as done.
//!
//! **Columns.** `columns` maps each table column to a source: `$payload`, `$key`,
//! `$receiver`, `$node`, `$batch_time` (ms since the epoch), `$stream`, `$partition`,
//! `$offset`, `$header:<name>`, or a JSON pointer into the payload (`/user/id`, RFC 6901; `""`
//! is the whole document). Values are converted to the column's type as the table declares it
//! (read at connection): `bool`, `smallint`/`integer`/`bigint`, `real`/`double precision`,
//! `text`/`varchar`/`char`, `json`/`jsonb`, `bytea`, `timestamp`/`timestamptz` (from ms since
//! the epoch or an RFC 3339 string). A missing JSON field is NULL.
//!
//! **Rejected records.** A record that cannot become a row — its payload is not JSON where a
//! pointer needs it, a value does not fit its column, or PostgreSQL refuses the row (a
//! constraint, a NOT NULL column, an out-of-range value: SQLSTATE classes 22, 23 and 54) — goes
//! to the dead-letter output with the reason, before the transaction commits, and the batch
//! completes without it. When `COPY` fails on such a row, the batch is written again row by
//! row, each in a savepoint, to find which rows PostgreSQL refuses. Without a dead-letter
//! output the batch fails and is retried.
//!
//! **Failures.** Any other error (connection refused, authentication, a timeout, a server
//! error) fails the batch, which the engine retries with backoff; the connection is then
//! made again. Nothing is committed by a failed attempt.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};
use weir::batch::Batch;
use weir_receiver::Record;

use super::dead_letter::{DeadLetterConfig, DeadLetters, Rejects};
use super::{OutputError, Written};

/// `[[output]] type = "postgres"`.
///
/// ```toml
/// [[output]]
/// type = "postgres"
/// url = "postgresql://weir@127.0.0.1:5432/weir"   # no password here: see password_file
/// password_file = "/etc/weir/pg-password"
/// table = "events"
/// [output.columns]                 # column = source; default: the raw layout below
/// id = "/id"
/// body = "$payload"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The server and database, as a URL (`postgresql://user@host:port/db?options`) or
    /// libpq key-value pairs (`host=... user=... dbname=...`). Required. A password in it is
    /// refused (it would be printed by `check-config` and logged): use `password_file`,
    /// `password` or `$PGPASSWORD`.
    pub url: String,
    /// The password (never printed). Default: `password_file`, else `$PGPASSWORD`, else none.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// A file holding the password (trailing newline ignored), read at each connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The table (`name` or `schema.name`). Required.
    pub table: String,
    /// Table column = source (see the module documentation). Default: `node = "$node"`,
    /// `batch_time = "$batch_time"`, `receiver = "$receiver"`, `stream = "$stream"`,
    /// `partition = "$partition"`, `offset = "$offset"`, `key = "$key"`,
    /// `payload = "$payload"`.
    #[serde(default = "default_columns")]
    pub columns: BTreeMap<String, String>,
    /// Create the table if it does not exist, with a type per source (`$payload`, `$key`,
    /// headers: bytea; `$batch_time`, `$offset`: bigint; `$partition`: integer; names: text;
    /// JSON pointers: jsonb). Default true.
    #[serde(default = "yes")]
    pub create_table: bool,
    /// The bookkeeping table (`target`, `node_id`, `batch_time`, `records`, `dead_letters`,
    /// `written_at`), created if missing. Default `weir_batches`.
    #[serde(default = "default_bookkeeping")]
    pub bookkeeping_table: String,
    /// `disable` (default): plain TCP; `require`: TLS, the server's certificate verified against
    /// `ca_file` (else the system's roots) and its name or IP address checked against the host
    /// connected to (libpq's `verify-full`); a server without TLS, or a certificate that does
    /// not verify, fails the connection. There is no `prefer`: nothing falls back to plain text.
    #[serde(default)]
    pub tls: PostgresTls,
    /// With `tls = "require"`: the CA certificates (PEM) to verify the server with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Connecting (TCP and authentication), ms. Default 10000.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// `statement_timeout` of the output's session, ms: a statement running longer fails the
    /// batch (retried). 0 = none. Default 60000.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_ms: u64,
    /// Where records the table cannot accept go (see [`super::dead_letter`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
}

/// `tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostgresTls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS with the server's certificate verified.
    Require,
}

fn yes() -> bool {
    true
}

fn default_bookkeeping() -> String {
    "weir_batches".into()
}

fn default_connect_timeout() -> u64 {
    10_000
}

fn default_statement_timeout() -> u64 {
    60_000
}

/// The raw layout: every part of a record, and where it came from.
pub fn default_columns() -> BTreeMap<String, String> {
    [
        ("node", "$node"),
        ("batch_time", "$batch_time"),
        ("receiver", "$receiver"),
        ("stream", "$stream"),
        ("partition", "$partition"),
        ("offset", "$offset"),
        ("key", "$key"),
        ("payload", "$payload"),
    ]
    .into_iter()
    .map(|(c, s)| (c.to_string(), s.to_string()))
    .collect()
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Payload,
    Key,
    Receiver,
    Node,
    BatchTime,
    Stream,
    Partition,
    Offset,
    Header(String),
    /// A JSON pointer into the payload.
    Pointer(String),
}

impl Source {
    fn parse(s: &str) -> Result<Source, String> {
        Ok(match s {
            "$payload" => Source::Payload,
            "$key" => Source::Key,
            "$receiver" => Source::Receiver,
            "$node" => Source::Node,
            "$batch_time" => Source::BatchTime,
            "$stream" => Source::Stream,
            "$partition" => Source::Partition,
            "$offset" => Source::Offset,
            p if p.is_empty() || p.starts_with('/') => Source::Pointer(p.to_string()),
            h => match h.strip_prefix("$header:") {
                Some(name) if !name.is_empty() => Source::Header(name.to_string()),
                _ => {
                    return Err(format!(
                        "{s:?} is not a source: use $payload, $key, $receiver, $node, \
                         $batch_time, $stream, $partition, $offset, $header:<name>, or a JSON \
                         pointer such as \"/user/id\""
                    ))
                }
            },
        })
    }

    /// The column type `create_table` gives it.
    fn sql_type(&self) -> &'static str {
        match self {
            Source::Payload | Source::Key | Source::Header(_) => "bytea",
            Source::Receiver | Source::Node | Source::Stream => "text",
            Source::BatchTime | Source::Offset => "bigint",
            Source::Partition => "integer",
            Source::Pointer(_) => "jsonb",
        }
    }
}

/// `"a"."b"` for `a.b`, each part quoted.
fn quote_path(path: &str) -> String {
    path.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl PostgresConfig {
    /// Where it writes, for logs: the table and the server (no password).
    pub fn destination(&self) -> String {
        format!("table {}", self.table)
    }

    /// Checks the settings (connects nowhere).
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let pg: tokio_postgres::Config = self.url.parse().map_err(|e| format!("`url`: {e}"))?;
        if pg.get_password().is_some() {
            return Err(
                "`url` holds a password: put it in `password_file` (or `password`, or \
                 $PGPASSWORD) so that it is not printed"
                    .into(),
            );
        }
        if pg.get_user().is_none() {
            return Err("`url` names no user (postgresql://USER@host/db)".into());
        }
        for (key, name) in [
            ("table", &self.table),
            ("bookkeeping_table", &self.bookkeeping_table),
        ] {
            if name.is_empty() || name.split('.').any(str::is_empty) || name.split('.').count() > 2
            {
                return Err(format!("`{key}` {name:?}: a table name, or schema.name"));
            }
        }
        if self.columns.is_empty() {
            return Err("`columns` is empty: map at least one column to a source".into());
        }
        for (c, s) in &self.columns {
            if c.is_empty() {
                return Err("`columns`: a column name is empty".into());
            }
            Source::parse(s).map_err(|e| format!("`columns.{c}`: {e}"))?;
        }
        if self.connect_timeout_ms == 0 {
            return Err("`connect_timeout_ms` must be greater than 0".into());
        }
        if self.ca_file.is_some() && self.tls != PostgresTls::Require {
            return Err("`ca_file` goes with `tls = \"require\"`".into());
        }
        if let Some(d) = &self.dead_letter {
            d.validate()?;
        }
        Ok(())
    }

    fn sources(&self) -> Vec<(String, Source)> {
        self.columns
            .iter()
            .filter_map(|(c, s)| Source::parse(s).ok().map(|s| (c.clone(), s)))
            .collect()
    }
}

/// A built `postgres` output: its settings, its own small runtime, and the connection once made.
pub struct PostgresOutput {
    config: PostgresConfig,
    pg: tokio_postgres::Config,
    sources: Vec<(String, Source)>,
    rt: super::IoRuntime,
    conn: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for PostgresOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOutput")
            .field("table", &self.config.table)
            .finish_non_exhaustive()
    }
}

/// A connection with what was prepared on it.
struct Conn {
    client: Client,
    /// The table's column types, in `sources` order.
    types: Vec<Type>,
    copy_sql: String,
    insert: Statement,
}

/// Why a batch attempt failed.
enum Failure {
    /// PostgreSQL refused a row's data (COPY): write row by row to find which.
    Data(String),
    /// Anything else: the batch fails; the connection is made again.
    Other(OutputError),
}

impl From<OutputError> for Failure {
    fn from(e: OutputError) -> Self {
        Failure::Other(e)
    }
}

impl From<weir::batch::BatchError> for Failure {
    fn from(e: weir::batch::BatchError) -> Self {
        Failure::Other(e.into())
    }
}

/// True for errors in the data of a row (SQLSTATE classes 22 data exception, 23 integrity
/// constraint violation, 54 program limit exceeded).
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54"))
}

/// The server's message with its detail, or the client's.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

impl PostgresOutput {
    /// Builds it (connects nowhere: the first batch does).
    ///
    /// # Errors
    /// Why the configuration is refused.
    pub fn new(config: &PostgresConfig) -> Result<Self, String> {
        config.validate()?;
        let mut pg: tokio_postgres::Config =
            config.url.parse().map_err(|e| format!("`url`: {e}"))?;
        pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        if pg.get_application_name().is_none() {
            pg.application_name("weir");
        }
        let rt = super::IoRuntime::new("weir-postgres", 0)?;
        Ok(PostgresOutput {
            sources: config.sources(),
            config: config.clone(),
            pg,
            rt,
            conn: Mutex::new(None),
        })
    }

    fn server(&self) -> String {
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!(
            "postgres {}:{port}/{}",
            hosts.join(","),
            self.pg.get_dbname().unwrap_or("")
        )
    }

    fn err(&self, what: &str, e: &tokio_postgres::Error) -> OutputError {
        OutputError::Destination(format!(
            "{} table {}: {what}: {}",
            self.server(),
            self.config.table,
            describe(e)
        ))
    }

    /// Writes `batch` in one transaction (see the module documentation).
    ///
    /// # Errors
    /// [`OutputError`]: the batch is retried.
    pub fn write(&self, batch: &Batch, dead: &DeadLetters) -> Result<Written, OutputError> {
        if batch.is_empty() {
            return Ok(Written::default());
        }
        let mut guard = weir_receiver::lock(&self.conn);
        let result = self.rt.block_on(async {
            if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
                *guard = None;
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().expect("connected above");
            match self.write_copy(conn, batch, dead).await {
                Ok(w) => Ok(w),
                Err(Failure::Data(reason)) => {
                    tracing::info!(batch = batch.time(), table = %self.config.table, %reason,
                        "PostgreSQL refused a row of the batch: writing it row by row to set the refused rows aside");
                    self.write_rows(conn, batch, dead).await
                }
                Err(Failure::Other(e)) => Err(e),
            }
        });
        if result.is_err() {
            // A connection in an unknown state is not reused (a transaction may be open).
            *guard = None;
        }
        result
    }

    async fn connect(&self) -> Result<Conn, OutputError> {
        let mut pg = self.pg.clone();
        if let Some(p) = self.password()? {
            pg.password(p);
        }
        let server = self.server();
        let client = match self.config.tls {
            PostgresTls::Disable => {
                let (client, connection) = pg
                    .connect(NoTls)
                    .await
                    .map_err(|e| self.err("connecting", &e))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(server, error = %describe(&e), "postgres connection ended");
                    }
                });
                client
            }
            PostgresTls::Require => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, connection) = pg
                    .connect(self.tls_connector()?)
                    .await
                    .map_err(|e| self.err("connecting with TLS", &e))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(server, error = %describe(&e), "postgres connection ended");
                    }
                });
                client
            }
        };
        if self.config.statement_timeout_ms > 0 {
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {}",
                    self.config.statement_timeout_ms
                ))
                .await
                .map_err(|e| self.err("setting statement_timeout", &e))?;
        }
        let book = quote_path(&self.config.bookkeeping_table);
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {book} (target text NOT NULL, node_id text NOT NULL, \
                 batch_time bigint NOT NULL, records bigint NOT NULL, dead_letters bigint NOT NULL, \
                 written_at timestamptz NOT NULL DEFAULT now(), \
                 PRIMARY KEY (target, node_id, batch_time))"
            ))
            .await
            .map_err(|e| self.err("creating the bookkeeping table", &e))?;
        let table = quote_path(&self.config.table);
        if self.config.create_table {
            let cols: Vec<String> = self
                .sources
                .iter()
                .map(|(c, s)| format!("{} {}", quote_ident(c), s.sql_type()))
                .collect();
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} ({})",
                    cols.join(", ")
                ))
                .await
                .map_err(|e| self.err("creating the table", &e))?;
        }
        let cols: Vec<String> = self.sources.iter().map(|(c, _)| quote_ident(c)).collect();
        let cols = cols.join(", ");
        let probe = client
            .prepare(&format!("SELECT {cols} FROM {table} LIMIT 0"))
            .await
            .map_err(|e| self.err("reading the table's columns", &e))?;
        let types: Vec<Type> = probe.columns().iter().map(|c| c.type_().clone()).collect();
        for ((c, _), t) in self.sources.iter().zip(&types) {
            if !supported(t) {
                return Err(OutputError::Destination(format!(
                    "{} table {}: column {c:?} has type {t}, which the postgres output cannot \
                     write (bool, smallint, integer, bigint, real, double precision, text, \
                     varchar, char, json, jsonb, bytea, timestamp, timestamptz)",
                    self.server(),
                    self.config.table
                )));
            }
        }
        let params: Vec<String> = (1..=types.len()).map(|i| format!("${i}")).collect();
        let insert = client
            .prepare_typed(
                &format!(
                    "INSERT INTO {table} ({cols}) VALUES ({})",
                    params.join(", ")
                ),
                &types,
            )
            .await
            .map_err(|e| self.err("preparing the insert", &e))?;
        tracing::info!(server = %self.server(), table = %self.config.table, "connected to PostgreSQL");
        Ok(Conn {
            client,
            types,
            copy_sql: format!("COPY {table} ({cols}) FROM STDIN (FORMAT binary)"),
            insert,
        })
    }

    /// The rustls connector: the CA file's certificates, or the system's roots.
    fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, OutputError> {
        let fail = |what: String| OutputError::Destination(format!("postgres TLS: {what}"));
        let mut roots = rustls::RootCertStore::empty();
        match &self.config.ca_file {
            Some(f) => {
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(f)
                    .map_err(|e| fail(format!("reading ca_file {}: {e}", f.display())))?;
                for c in certs {
                    let c = c.map_err(|e| fail(format!("ca_file {}: {e}", f.display())))?;
                    roots
                        .add(c)
                        .map_err(|e| fail(format!("ca_file {}: {e}", f.display())))?;
                }
                if roots.is_empty() {
                    return Err(fail(format!(
                        "ca_file {} holds no PEM certificate",
                        f.display()
                    )));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(fail(format!(
                        "no CA certificates found on this system ({:?}): set ca_file",
                        found.errors.first().map(ToString::to_string)
                    )));
                }
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    fn password(&self) -> Result<Option<String>, OutputError> {
        if let Some(p) = &self.config.password {
            return Ok(Some(p.clone()));
        }
        if let Some(f) = &self.config.password_file {
            let p = std::fs::read_to_string(f).map_err(|e| {
                OutputError::Destination(format!(
                    "reading the postgres password_file {}: {e}",
                    f.display()
                ))
            })?;
            return Ok(Some(p.trim_end_matches(['\n', '\r']).to_string()));
        }
        Ok(std::env::var("PGPASSWORD").ok())
    }

    /// Starts the batch's transaction; `None` if the bookkeeping table already holds the batch.
    async fn begin<'c>(
        &self,
        conn: &'c mut Conn,
        batch: &Batch,
    ) -> Result<Option<tokio_postgres::Transaction<'c>>, OutputError> {
        let tx = conn
            .client
            .transaction()
            .await
            .map_err(|e| self.err("starting a transaction", &e))?;
        let done = tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE target = $1 AND node_id = $2 AND batch_time = $3",
                    quote_path(&self.config.bookkeeping_table)
                ),
                &[&self.config.table, &batch.node_id(), &batch_time(batch)],
            )
            .await
            .map_err(|e| self.err("reading the bookkeeping table", &e))?;
        if done.is_some() {
            let _ = tx.rollback().await;
            return Ok(None);
        }
        Ok(Some(tx))
    }

    /// Records the batch, settles its dead letters and commits; `skipped` if another attempt
    /// committed it meanwhile.
    async fn finish(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        batch: &Batch,
        dead: &DeadLetters,
        rejects: &Rejects,
        mut w: Written,
    ) -> Result<Written, OutputError> {
        let recorded = tx
            .execute(
                &format!(
                    "INSERT INTO {} (target, node_id, batch_time, records, dead_letters) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    quote_path(&self.config.bookkeeping_table)
                ),
                &[
                    &self.config.table,
                    &batch.node_id(),
                    &batch_time(batch),
                    &(w.records as i64),
                    &(rejects.len() as i64),
                ],
            )
            .await
            .map_err(|e| self.err("recording the batch", &e))?;
        if recorded == 0 {
            let _ = tx.rollback().await;
            return Ok(Written {
                skipped: true,
                ..Written::default()
            });
        }
        // Before the commit: after it, a crash would lose them (the re-run skips the batch).
        dead.settle(batch, rejects)?;
        w.dead_letters = rejects.len() as u64;
        tx.commit()
            .await
            .map_err(|e| self.err("committing the batch", &e))?;
        Ok(w)
    }

    async fn write_copy(
        &self,
        conn: &mut Conn,
        batch: &Batch,
        dead: &DeadLetters,
    ) -> Result<Written, Failure> {
        let types = conn.types.clone();
        let copy_sql = conn.copy_sql.clone();
        let Some(tx) = self.begin(conn, batch).await? else {
            return Ok(Written {
                skipped: true,
                ..Written::default()
            });
        };
        let sink = tx
            .copy_in(&copy_sql)
            .await
            .map_err(|e| Failure::Other(self.err("starting COPY", &e)))?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        futures_util::pin_mut!(writer);
        let mut rejects = Rejects::default();
        let mut w = Written::default();
        for i in 0..batch.num_partitions() {
            let receiver = batch.blocks()[i].receiver.clone();
            for r in batch.partition(i)? {
                match self.row(&r, &receiver, batch, &types) {
                    Ok(cells) => {
                        if let Err(e) = writer.as_mut().write_raw(cells.iter()).await {
                            return Err(self.copy_failure(&e));
                        }
                        w.records += 1;
                        w.bytes += r.payload.len() as u64;
                    }
                    Err(reason) => rejects.push(&receiver, r, reason),
                }
            }
        }
        if let Err(e) = writer.finish().await {
            return Err(self.copy_failure(&e));
        }
        Ok(self.finish(tx, batch, dead, &rejects, w).await?)
    }

    fn copy_failure(&self, e: &tokio_postgres::Error) -> Failure {
        if is_data_error(e) {
            Failure::Data(describe(e))
        } else {
            Failure::Other(self.err("COPY", e))
        }
    }

    /// The batch row by row, each in a savepoint: the rows PostgreSQL refuses become dead
    /// letters with its message.
    async fn write_rows(
        &self,
        conn: &mut Conn,
        batch: &Batch,
        dead: &DeadLetters,
    ) -> Result<Written, OutputError> {
        let types = conn.types.clone();
        let insert = conn.insert.clone();
        let Some(mut tx) = self.begin(conn, batch).await? else {
            return Ok(Written {
                skipped: true,
                ..Written::default()
            });
        };
        let mut rejects = Rejects::default();
        let mut w = Written::default();
        for i in 0..batch.num_partitions() {
            let receiver = batch.blocks()[i].receiver.clone();
            for r in batch.partition(i)? {
                let cells = match self.row(&r, &receiver, batch, &types) {
                    Ok(cells) => cells,
                    Err(reason) => {
                        rejects.push(&receiver, r, reason);
                        continue;
                    }
                };
                let sp = tx
                    .savepoint("weir_row")
                    .await
                    .map_err(|e| self.err("SAVEPOINT", &e))?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    cells.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                match sp.execute(&insert, &params).await {
                    Ok(_) => {
                        sp.commit()
                            .await
                            .map_err(|e| self.err("RELEASE SAVEPOINT", &e))?;
                        w.records += 1;
                        w.bytes += r.payload.len() as u64;
                    }
                    Err(e) if is_data_error(&e) => {
                        sp.rollback()
                            .await
                            .map_err(|e| self.err("ROLLBACK TO SAVEPOINT", &e))?;
                        rejects.push(&receiver, r, format!("PostgreSQL: {}", describe(&e)));
                    }
                    Err(e) => return Err(self.err("INSERT", &e)),
                }
            }
        }
        self.finish(tx, batch, dead, &rejects, w).await
    }

    /// The row of record `r`, or why it cannot be one.
    fn row(
        &self,
        r: &Record,
        receiver: &str,
        batch: &Batch,
        types: &[Type],
    ) -> Result<Vec<Cell>, String> {
        let mut json: Option<serde_json::Value> = None;
        let mut cells = Vec::with_capacity(types.len());
        for ((column, source), ty) in self.sources.iter().zip(types) {
            let cell = match source {
                Source::Payload => from_bytes(&r.payload, ty),
                Source::Key => match &r.key {
                    Some(k) => from_bytes(k, ty),
                    None => Ok(Cell::Null),
                },
                Source::Header(name) => match r.headers.iter().find(|h| &*h.name == name) {
                    Some(h) => from_bytes(&h.value, ty),
                    None => Ok(Cell::Null),
                },
                Source::Receiver => from_str(receiver, ty),
                Source::Node => from_str(batch.node_id(), ty),
                Source::Stream => match &r.position {
                    Some(p) => from_str(&p.stream, ty),
                    None => Ok(Cell::Null),
                },
                Source::BatchTime => from_int(batch_time(batch), ty, true),
                Source::Partition => match &r.position {
                    Some(p) => from_int(i64::from(p.partition), ty, false),
                    None => Ok(Cell::Null),
                },
                Source::Offset => match &r.position {
                    Some(p) => match i64::try_from(p.offset) {
                        Ok(o) => from_int(o, ty, false),
                        Err(_) => Err(format!("offset {} does not fit a bigint", p.offset)),
                    },
                    None => Ok(Cell::Null),
                },
                Source::Pointer(p) => {
                    if json.is_none() {
                        json = Some(
                            serde_json::from_slice(&r.payload)
                                .map_err(|e| format!("the payload is not JSON: {e}"))?,
                        );
                    }
                    match json.as_ref().and_then(|j| j.pointer(p)) {
                        Some(v) => from_json(v, ty),
                        None => Ok(Cell::Null),
                    }
                }
            };
            cells.push(cell.map_err(|e| format!("column {column:?}: {e}"))?);
        }
        Ok(cells)
    }
}

fn batch_time(batch: &Batch) -> i64 {
    i64::try_from(batch.time()).unwrap_or(i64::MAX)
}

fn supported(t: &Type) -> bool {
    [
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::JSON,
        Type::JSONB,
        Type::BYTEA,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
    ]
    .contains(t)
}

fn is_text(t: &Type) -> bool {
    [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(t)
}

/// One value of a row, written in the binary format of its column's type.
#[derive(Debug, Clone)]
enum Cell {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(String),
    Bytes(Vec<u8>),
    Json(serde_json::Value),
    Time(SystemTime),
    /// `timestamp` (without time zone): the UTC wall time.
    Naive(chrono::NaiveDateTime),
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::I16(v) => v.to_sql(ty, out),
            Cell::I32(v) => v.to_sql(ty, out),
            Cell::I64(v) => v.to_sql(ty, out),
            Cell::F32(v) => v.to_sql(ty, out),
            Cell::F64(v) => v.to_sql(ty, out),
            Cell::Text(v) => v.to_sql(ty, out),
            Cell::Bytes(v) => v.to_sql(ty, out),
            Cell::Json(v) => v.to_sql(ty, out),
            Cell::Time(v) => v.to_sql(ty, out),
            Cell::Naive(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // The cell was made for its column's type (see `row`).
        true
    }

    to_sql_checked!();
}

fn from_bytes(b: &[u8], ty: &Type) -> Result<Cell, String> {
    if *ty == Type::BYTEA {
        return Ok(Cell::Bytes(b.to_vec()));
    }
    if *ty == Type::JSON || *ty == Type::JSONB {
        return serde_json::from_slice(b)
            .map(Cell::Json)
            .map_err(|e| format!("not JSON: {e}"));
    }
    let s = std::str::from_utf8(b).map_err(|_| format!("not UTF-8, for a {ty} column"))?;
    if is_text(ty) {
        return Ok(Cell::Text(s.to_string()));
    }
    // A number, a boolean or a time written as text.
    let v: serde_json::Value =
        serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_string()));
    from_json(&v, ty)
}

fn from_str(s: &str, ty: &Type) -> Result<Cell, String> {
    if is_text(ty) {
        Ok(Cell::Text(s.to_string()))
    } else {
        from_bytes(s.as_bytes(), ty)
    }
}

/// `ms`: the integer is ms since the epoch when the column is a time.
fn from_int(i: i64, ty: &Type, ms: bool) -> Result<Cell, String> {
    let range = |v: Result<Cell, std::num::TryFromIntError>| {
        v.map_err(|_| format!("{i} is out of range for a {ty} column"))
    };
    match *ty {
        Type::INT2 => range(i16::try_from(i).map(Cell::I16)),
        Type::INT4 => range(i32::try_from(i).map(Cell::I32)),
        Type::INT8 => Ok(Cell::I64(i)),
        Type::FLOAT8 => Ok(Cell::F64(i as f64)),
        Type::FLOAT4 => Ok(Cell::F32(i as f32)),
        Type::TIMESTAMP | Type::TIMESTAMPTZ if ms => time_from_ms(i, ty),
        _ if is_text(ty) => Ok(Cell::Text(i.to_string())),
        Type::JSON | Type::JSONB => Ok(Cell::Json(i.into())),
        _ => Err(format!("an integer cannot go in a {ty} column")),
    }
}

fn time_from_ms(ms: i64, ty: &Type) -> Result<Cell, String> {
    let t = chrono::DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| format!("{ms} ms since the epoch is out of range"))?;
    Ok(if *ty == Type::TIMESTAMP {
        Cell::Naive(t.naive_utc())
    } else {
        Cell::Time(t.into())
    })
}

fn from_json(v: &serde_json::Value, ty: &Type) -> Result<Cell, String> {
    use serde_json::Value as V;
    if v.is_null() {
        return Ok(Cell::Null);
    }
    if *ty == Type::JSON || *ty == Type::JSONB {
        return Ok(Cell::Json(v.clone()));
    }
    if is_text(ty) {
        return Ok(Cell::Text(match v {
            V::String(s) => s.clone(),
            other => other.to_string(),
        }));
    }
    let wrong = || format!("{v} cannot go in a {ty} column");
    match *ty {
        Type::BOOL => v.as_bool().map(Cell::Bool).ok_or_else(wrong),
        Type::INT2 | Type::INT4 | Type::INT8 => match v.as_i64() {
            Some(i) => from_int(i, ty, false),
            None => Err(wrong()),
        },
        Type::FLOAT4 => v.as_f64().map(|f| Cell::F32(f as f32)).ok_or_else(wrong),
        Type::FLOAT8 => v.as_f64().map(Cell::F64).ok_or_else(wrong),
        Type::BYTEA => match v {
            V::String(s) => Ok(Cell::Bytes(s.as_bytes().to_vec())),
            _ => Err(wrong()),
        },
        Type::TIMESTAMP | Type::TIMESTAMPTZ => match v {
            V::Number(n) => match n.as_i64() {
                Some(ms) => time_from_ms(ms, ty),
                None => Err(wrong()),
            },
            V::String(s) => {
                let t = chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
                time_from_ms(t.timestamp_millis(), ty)
            }
            _ => Err(wrong()),
        },
        _ => Err(wrong()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_refuse_with_the_list() {
        assert_eq!(Source::parse("$payload"), Ok(Source::Payload));
        assert_eq!(
            Source::parse("$header:trace"),
            Ok(Source::Header("trace".into()))
        );
        assert_eq!(
            Source::parse("/user/id"),
            Ok(Source::Pointer("/user/id".into()))
        );
        let e = Source::parse("user.id").unwrap_err();
        assert!(e.contains("$payload") && e.contains("JSON"), "{e}");
        assert!(Source::parse("$header:").is_err());
    }

    fn config(url: &str) -> PostgresConfig {
        toml::from_str(&format!("url = {url:?}\ntable = \"events\"")).unwrap()
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_defaults_are_the_raw_layout() {
        let e = config("postgresql://weir:secret@127.0.0.1/db")
            .validate()
            .unwrap_err();
        assert!(e.contains("password_file"), "{e}");
        let c = config("postgresql://weir@127.0.0.1/db");
        c.validate().unwrap();
        assert_eq!(c.columns, default_columns());
        assert_eq!(c.bookkeeping_table, "weir_batches");
        assert!(c.create_table);
        let e = config("postgresql://127.0.0.1/db").validate().unwrap_err();
        assert!(e.contains("user"), "{e}");
        let mut c = config("postgresql://weir@127.0.0.1/db");
        c.table = "a.b.c".into();
        assert!(c.validate().unwrap_err().contains("table"));
    }

    #[test]
    fn json_values_convert_to_column_types_or_say_why_not() {
        use serde_json::json;
        assert!(matches!(
            from_json(&json!(5), &Type::INT4),
            Ok(Cell::I32(5))
        ));
        let e = from_json(&json!(70000), &Type::INT2).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = from_json(&json!("x"), &Type::INT8).unwrap_err();
        assert!(e.contains("cannot go in a int8 column"), "{e}");
        assert!(matches!(
            from_json(&json!(true), &Type::TEXT),
            Ok(Cell::Text(t)) if t == "true"
        ));
        assert!(matches!(
            from_json(&json!("2026-12-03T10:00:00Z"), &Type::TIMESTAMPTZ),
            Ok(Cell::Time(_))
        ));
        assert!(from_json(&json!("yesterday"), &Type::TIMESTAMPTZ).is_err());
        assert!(matches!(
            from_json(&json!(null), &Type::INT4),
            Ok(Cell::Null)
        ));
        assert!(from_bytes(&[0xff, 0xfe], &Type::TEXT)
            .unwrap_err()
            .contains("UTF-8"));
        assert!(matches!(from_bytes(b"42", &Type::INT8), Ok(Cell::I64(42))));
        assert!(from_bytes(b"{", &Type::JSONB).unwrap_err().contains("JSON"));
    }

    #[test]
    fn identifiers_are_quoted_per_part() {
        assert_eq!(quote_path("public.events"), "\"public\".\"events\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
