//! The connector registry: every `[[receiver]]` type the node knows, in one place. For each
//! kind: its `type` name, its settings (the connector crate's config type), their validation,
//! and how a configured receiver joins the engine (with its metrics).
//!
//! Adding a connector touches this file (a [`ReceiverKind`] variant, a [`RECEIVER_TYPES`] entry
//! and an arm of [`ReceiverKind::add_to`]) and the connector's own crate; the configuration
//! parser, `check-config`, the error messages and the node's startup follow from here.

use serde::de::DeserializeOwned;
use serde::Serialize;
use weir::StreamingContext;

use crate::stats;

/// The receiver types and their settings.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReceiverKind {
    /// TCP socket (connect or listen mode).
    Socket(weir_socket::SocketConfig),
    /// Kafka: a consumer-group member (the reliable high-level consumer, `mode = "group"`, the
    /// default) or a direct source (`mode = "direct"`: offset ranges per batch, no WAL).
    Kafka(weir_kafka::KafkaConfig),
    /// Flume's Avro push source (`AvroSourceProtocol`): Flume agents' Avro sinks push to it;
    /// a call is answered `OK` only once its events are durable. See weir-flume's
    /// `FlumeSourceConfig` for the keys.
    Flume(weir_flume::FlumeSourceConfig),
    /// Pull receiver (`SparkFlumeProtocol` client): polls pull sinks with `getEventBatch`,
    /// `ack`s a batch once durable, `nack`s it when storing fails. See weir-flume's
    /// `FlumePullConfig` for the keys.
    FlumePull(weir_flume::FlumePullConfig),
}

/// One receiver type of the configuration file.
pub struct ReceiverType {
    /// The `type` value in `[[receiver]]`.
    pub name: &'static str,
    /// Reads and validates the table's settings (everything but `name` and `type`).
    parse: fn(toml::Table) -> Result<ReceiverKind, String>,
}

/// Every receiver type, in the order error messages list them.
pub const RECEIVER_TYPES: &[ReceiverType] = &[
    ReceiverType {
        name: "socket",
        parse: |t| settings(t, weir_socket::SocketConfig::validate).map(ReceiverKind::Socket),
    },
    ReceiverType {
        name: "kafka",
        parse: |t| settings(t, weir_kafka::KafkaConfig::validate).map(ReceiverKind::Kafka),
    },
    ReceiverType {
        name: "flume",
        parse: |t| settings(t, weir_flume::FlumeSourceConfig::validate).map(ReceiverKind::Flume),
    },
    ReceiverType {
        name: "flume_pull",
        parse: |t| settings(t, weir_flume::FlumePullConfig::validate).map(ReceiverKind::FlumePull),
    },
];

/// Deserializes a connector's settings and validates them.
fn settings<C: DeserializeOwned>(
    table: toml::Table,
    validate: fn(&C) -> Result<(), String>,
) -> Result<C, String> {
    let c: C = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    validate(&c)?;
    Ok(c)
}

/// The `type` names, quoted, for messages: `"socket", "kafka", "flume" or "flume_pull"`.
pub fn type_names() -> String {
    let names: Vec<String> = RECEIVER_TYPES
        .iter()
        .map(|t| format!("{:?}", t.name))
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

impl ReceiverKind {
    /// Reads the settings of a `[[receiver]]` of type `type_name`.
    ///
    /// # Errors
    /// An unknown type, or settings that do not deserialize or validate (the message names
    /// the key in backquotes where it can, so that the caller can point at its line).
    pub fn parse(type_name: &str, table: toml::Table) -> Result<ReceiverKind, String> {
        match RECEIVER_TYPES.iter().find(|t| t.name == type_name) {
            Some(t) => (t.parse)(table),
            None => Err(format!(
                "unknown receiver type {type_name:?} (expected {})",
                type_names()
            )),
        }
    }

    /// Adds the receiver (or direct source) `name` to `ctx`, with its metrics.
    ///
    /// # Errors
    /// The connector refused its settings at construction (a Kafka client that cannot be
    /// created, an address that cannot be parsed).
    pub fn add_to(&self, name: &str, ctx: &mut StreamingContext) -> Result<(), String> {
        let e = |e: &dyn std::fmt::Display| format!("receiver {name:?}: {e}");
        match self {
            ReceiverKind::Socket(c) => {
                let r = weir_socket::SocketReceiver::new(c.clone()).map_err(|x| e(&x))?;
                ctx.add_metrics(stats::receiver(name, r.stats()));
                ctx.add_receiver(name, r);
            }
            ReceiverKind::Kafka(c) if c.mode == weir_kafka::KafkaMode::Direct => {
                let s = weir_kafka::KafkaDirectSource::new(c.clone()).map_err(|x| e(&x))?;
                ctx.add_metrics(stats::receiver(name, s.stats()));
                ctx.add_direct_source(name, s);
            }
            ReceiverKind::Kafka(c) => {
                let r = weir_kafka::KafkaReceiver::new(c.clone()).map_err(|x| e(&x))?;
                ctx.add_metrics(stats::receiver(name, r.stats()));
                ctx.add_receiver(name, r);
            }
            ReceiverKind::Flume(c) => {
                let r = weir_flume::FlumeSourceReceiver::new(c.clone()).map_err(|x| e(&x))?;
                ctx.add_metrics(stats::receiver(name, r.stats()));
                ctx.add_receiver(name, r);
            }
            ReceiverKind::FlumePull(c) => {
                let r = weir_flume::FlumePullReceiver::new(c.clone()).map_err(|x| e(&x))?;
                ctx.add_metrics(stats::receiver(name, r.stats()));
                ctx.add_receiver(name, r);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_parses_its_own_settings_and_names_the_others() {
        assert_eq!(
            type_names(),
            r#""socket", "kafka", "flume" or "flume_pull""#
        );
        let table = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
        let k = ReceiverKind::parse("socket", table("address = \"127.0.0.1:9\"")).unwrap();
        assert!(matches!(k, ReceiverKind::Socket(_)));
        let k = ReceiverKind::parse("flume", table("address = \"127.0.0.1:9\"")).unwrap();
        assert!(matches!(k, ReceiverKind::Flume(_)));
        let e = ReceiverKind::parse("socket", table("bogus = 1")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = ReceiverKind::parse("ftp", toml::Table::new()).unwrap_err();
        assert!(e.contains("\"ftp\"") && e.contains("\"flume_pull\""), "{e}");
    }
}
