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
//! A `kafka` dead-letter output produces each rejected record (payload, key, headers) with the
//! headers `weir.reason`, `weir.output`, `weir.node` and `weir.batch_time`; a re-run batch
//! produces its rejects again (at-least-once there).
//!
//! A `dir` dead-letter output writes one file per batch and output that rejected anything:
//! `dead-<batch time, 16 digits>-<node_id>-output<position>.jsonl`, atomically (temp file,
//! fsync, rename), each line `{"reason": ..., "output": ..., "batch_time": ..., "record": {...}}`
//! with the record as the `jsonl` format writes it (payload, key, headers, position, receiver,
//! node).

use std::io::Write;
use std::sync::Arc;

use weir::batch::Batch;
use weir_kafka::{KafkaOutput, KafkaOutputConfig};
use weir_receiver::Record;

pub use weir_receiver::DeadLetterConfig;

use super::{write_atomically, write_record, OutputError, OutputFormat};

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
#[derive(Debug)]
pub struct DeadLetters {
    config: Option<DeadLetterConfig>,
    /// The producer of a `kafka` dead-letter output.
    kafka: Option<KafkaOutput>,
    /// `output<position>`, in file names.
    tag: String,
    /// The output's description, in each line.
    output: String,
}

impl DeadLetters {
    /// The dead letters of output number `position` (1-based), described as `output`.
    ///
    /// # Errors
    /// A `kafka` dead-letter output whose producer cannot be created.
    pub fn new(
        config: Option<DeadLetterConfig>,
        position: usize,
        output: String,
    ) -> Result<Self, String> {
        let kafka = match &config {
            Some(DeadLetterConfig::Kafka {
                bootstrap_servers,
                topic,
            }) => Some(
                KafkaOutput::new(KafkaOutputConfig::new(bootstrap_servers, topic))
                    .map_err(|e| format!("dead_letter: {e}"))?,
            ),
            _ => None,
        };
        Ok(DeadLetters {
            config,
            kafka,
            tag: format!("output{position}"),
            output,
        })
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
            DeadLetterConfig::Kafka { .. } => {
                let Some(kafka) = &self.kafka else {
                    return Err(OutputError::Destination(
                        "the kafka dead-letter output was not built".into(),
                    ));
                };
                let time = batch.time().to_string();
                let mut delivery = kafka.batch()?.with_headers(&[
                    ("weir.output", self.output.as_bytes()),
                    (super::NODE_HEADER, batch.node_id().as_bytes()),
                    (super::BATCH_TIME_HEADER, time.as_bytes()),
                ]);
                for r in &rejects.0 {
                    let record = r
                        .record
                        .clone()
                        .with_header("weir.reason", r.reason.clone());
                    delivery.send(&record)?;
                }
                delivery.finish()?;
                Ok(())
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
