//! Dead letters: the records an output cannot accept (a row PostgreSQL rejects, a payload that is
//! not the configured JSON, a value of the wrong type for a typed column) and why.
//!
//! An output collects a batch's rejected records in [`Rejects`] and calls
//! [`DeadLetters::settle`] **before** it commits the batch at its destination:
//! - with a dead-letter output configured, the rejects are written there (durably) and counted,
//!   and the batch then completes without them;
//! - without one, the batch fails with the first reason ([`OutputError::Rejected`]) and is
//!   retried, as any failed batch is: nothing is ever dropped silently.
//!
//! Settling first matters: were the batch committed first, a crash before the dead letters were
//! written would lose them (the re-run would find the batch done and skip it). A re-run batch
//! rejects the same records and rewrites the same file.
//!
//! A `dir` dead-letter output writes one file per batch and output that rejected anything:
//! `dead-<batch time, 16 digits>-<node_id>-output<position>.jsonl`, atomically (temp file,
//! fsync, rename), each line `{"reason": ..., "output": ..., "batch_time": ..., "record": {...}}`
//! with the record as the `jsonl` format writes it (payload, key, headers, position, receiver,
//! node).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir::batch::Batch;
use weir_receiver::Record;

use super::{write_atomically, write_record, OutputError, OutputFormat};

/// Where an output's rejected records go (`dead_letter = { type = "dir", path = "..." }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeadLetterConfig {
    /// One jsonl file per batch that had rejects, in `path` (created if missing).
    Dir {
        /// The directory.
        path: PathBuf,
    },
}

impl DeadLetterConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            DeadLetterConfig::Dir { path } if path.as_os_str().is_empty() => {
                Err("dead_letter: `path` must not be empty".into())
            }
            DeadLetterConfig::Dir { .. } => Ok(()),
        }
    }
}

/// One record an output could not accept.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The receiver that stored it.
    pub receiver: Arc<str>,
    /// The record as stored.
    pub record: Record,
    /// Why the output could not accept it (the destination's message, or ours).
    pub reason: String,
}

/// The records of one batch that an output could not accept.
#[derive(Debug, Default)]
pub struct Rejects(pub Vec<Rejected>);

impl Rejects {
    /// Adds a rejected record.
    pub fn push(&mut self, receiver: &Arc<str>, record: Record, reason: impl Into<String>) {
        self.0.push(Rejected {
            receiver: receiver.clone(),
            record,
            reason: reason.into(),
        });
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An output's dead-letter destination (or its absence), with the output's name for files and
/// lines.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    config: Option<DeadLetterConfig>,
    /// `output<position>`, in file names.
    tag: String,
    /// The output's description, in each line.
    output: String,
}

impl DeadLetters {
    /// The dead letters of output number `position` (1-based), described as `output`.
    pub fn new(config: Option<DeadLetterConfig>, position: usize, output: String) -> Self {
        DeadLetters {
            config,
            tag: format!("output{position}"),
            output,
        }
    }

    /// True if a dead-letter output is configured.
    pub fn configured(&self) -> bool {
        self.config.is_some()
    }

    /// Writes `rejects` of `batch` to the dead-letter output (nothing if there are none).
    /// Call before committing the batch at the destination.
    ///
    /// # Errors
    /// [`OutputError::Rejected`] when there are rejects and no dead-letter output (the batch
    /// is retried); an I/O error writing them (the batch is retried too).
    pub fn settle(&self, batch: &Batch, rejects: &Rejects) -> Result<(), OutputError> {
        let Some(first) = rejects.0.first() else {
            return Ok(());
        };
        let Some(config) = &self.config else {
            return Err(OutputError::Rejected {
                count: rejects.len(),
                reason: first.reason.clone(),
            });
        };
        match config {
            DeadLetterConfig::Dir { path } => {
                let name = format!(
                    "dead-{:016}-{}-{}.jsonl",
                    batch.time(),
                    batch.node_id(),
                    self.tag
                );
                write_atomically(path, &name, |out| {
                    for r in &rejects.0 {
                        self.write_line(out, batch, r)?;
                    }
                    Ok(())
                })
            }
        }
    }

    fn write_line(&self, out: &mut dyn Write, batch: &Batch, r: &Rejected) -> std::io::Result<()> {
        out.write_all(b"{\"reason\":")?;
        serde_json::to_writer(&mut *out, &r.reason)?;
        out.write_all(b",\"output\":")?;
        serde_json::to_writer(&mut *out, &self.output)?;
        write!(out, ",\"batch_time\":{},\"record\":", batch.time())?;
        let mut line = Vec::new();
        write_record(
            &mut line,
            OutputFormat::Jsonl,
            &r.receiver,
            batch.node_id(),
            &r.record,
        )?;
        // The record's own line, without its newline, as the value.
        out.write_all(line.strip_suffix(b"\n").unwrap_or(&line))?;
        out.write_all(b"}\n")
    }
}
