//! `--to`: a second output beside the harness's own `dir` output, and how to count the records
//! that reached it. The node writes every batch to both; since each batch holds the same
//! records however often it runs, an exactly-once destination must end up holding exactly what
//! the `dir` output holds (which the harness checks against the acknowledgements): each record
//! as many times as the batches do (once, unless a producer resent it after a kill), never more
//! (a batch written twice) and never less.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::{ClientConfig, Message};

use crate::verify::parse_record;

/// An exactly-once destination under test.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A PostgreSQL table (the output's raw layout); read with `psql`. The password comes from
    /// `PGPASSWORD` (which the node's output also reads).
    Postgres {
        /// `postgresql://user@host:port/db`.
        url: String,
        /// The table, created by the output.
        table: String,
    },
    /// A Kafka topic written with `exactly_once = true`; read `read_committed`.
    Kafka {
        /// `bootstrap.servers`.
        bootstrap: String,
        /// The topic (created by the harness).
        topic: String,
    },
    /// A local directory of Parquet batches; read with pyarrow (`python`, and the reader
    /// script the Parquet tests use), complete batches only.
    Parquet {
        /// The directory.
        dir: PathBuf,
        /// An interpreter with pyarrow.
        python: PathBuf,
        /// The reader script.
        script: PathBuf,
    },
}

impl Destination {
    /// Its name in the report.
    pub fn name(&self) -> String {
        match self {
            Destination::Postgres { table, .. } => format!("postgres table {table}"),
            Destination::Kafka { topic, .. } => format!("kafka topic {topic} (exactly once)"),
            Destination::Parquet { dir, .. } => format!("parquet {}", dir.display()),
        }
    }

    /// Puts a relative Parquet directory in the work directory `work`.
    pub fn place(&mut self, work: &std::path::Path) {
        if let Destination::Parquet { dir, .. } = self {
            if dir.is_relative() {
                *dir = work.join(&*dir);
            }
        }
    }

    /// Prepares it (a Kafka topic is created).
    pub fn prepare(&self) -> Result<(), String> {
        if let Destination::Kafka { bootstrap, topic } = self {
            crate::feed::kafka::create_topic(bootstrap, topic, 4)?;
        }
        Ok(())
    }

    /// Its `[[output]]` section.
    pub fn output_toml(&self) -> String {
        match self {
            Destination::Postgres { url, table } => format!(
                "[[output]]\ntype = \"postgres\"\nurl = {url:?}\ntable = {table:?}\n\n"
            ),
            Destination::Kafka { bootstrap, topic } => format!(
                "[[output]]\ntype = \"kafka\"\nbootstrap_servers = {bootstrap:?}\ntopic = {topic:?}\n\
                 exactly_once = true\n\n"
            ),
            Destination::Parquet { dir, .. } => format!(
                "[[output]]\ntype = \"parquet\"\npath = {:?}\n\n",
                dir.display().to_string()
            ),
        }
    }

    /// How many times each record id is there, and how many values are not records.
    pub fn read(&self) -> Result<(HashMap<u64, u32>, u64), String> {
        let mut seen = HashMap::new();
        let mut corrupt = 0;
        let mut count =
            |payload: &[u8]| match std::str::from_utf8(payload).ok().and_then(parse_record) {
                Some(id) => *seen.entry(id).or_insert(0) += 1,
                None => corrupt += 1,
            };
        match self {
            Destination::Postgres { url, table } => {
                let out = Command::new("psql")
                    .args([
                        url.as_str(),
                        "-X",
                        "-q",
                        "-A",
                        "-t",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-c",
                    ])
                    .arg(format!(
                        "SELECT encode(payload, 'escape') FROM \"{}\"",
                        table.replace('"', "\"\"")
                    ))
                    .output()
                    .map_err(|e| {
                        format!("running psql (Debian: apt-get install postgresql-client): {e}")
                    })?;
                if !out.status.success() {
                    return Err(format!(
                        "psql: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                for l in out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    count(l);
                }
            }
            Destination::Kafka { bootstrap, topic } => {
                let mut reader = ClientConfig::new();
                reader
                    .set("bootstrap.servers", bootstrap.as_str())
                    .set("group.id", "crash-harness-reader")
                    .set("isolation.level", "read_committed");
                weir_kafka::read_to_end(
                    &reader,
                    topic,
                    Duration::from_secs(10),
                    Duration::from_secs(120),
                    &mut |m| {
                        count(m.payload().unwrap_or_default());
                        Ok(())
                    },
                )?;
            }
            Destination::Parquet {
                dir,
                python,
                script,
            } => {
                let out = Command::new(python)
                    .arg(script)
                    .arg("local")
                    .arg(dir)
                    .output()
                    .map_err(|e| format!("running {}: {e}", python.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "{}: {}",
                        script.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| format!("{}: its output: {e}", script.display()))?;
                for row in v["rows"].as_array().into_iter().flatten() {
                    count(row["payload"].as_str().unwrap_or_default().as_bytes());
                }
            }
        }
        Ok((seen, corrupt))
    }
}
