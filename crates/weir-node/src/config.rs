//! The `receiver-node` configuration file (TOML).
//!
//! ```toml
//! data_dir = "weir-data/node"          # WAL under data_dir/wal, tracker in data_dir/tracker.redb
//! node_id = "ingest-1"                 # names and tags this node's batches; default <host>-<hash of data_dir>
//!
//! [engine]                             # StreamingConfig: every key optional
//! batch_interval_ms = 1000
//! block_interval_ms = 200
//! [engine.wal]
//! fsync = "always"                     # "always" | "never" | "interval(MS)"
//! recovery = "strict"                  # "strict" | "skip_corrupt"
//! segment_max_bytes = 67108864
//! [engine.rate]
//! max_records_per_sec = 100000         # per receiver
//! backpressure = true
//!
//! [[receiver]]
//! name = "socket"
//! type = "socket"
//! mode = "listen"                      # the rest: see weir-socket's SocketConfig
//! address = "127.0.0.1:9999"
//! protocol = "frames"
//!
//! [[output]]
//! type = "dir"                         # one file per batch, written atomically
//! path = "weir-data/node/out"
//! format = "jsonl"                     # "lines" | "jsonl"
//!
//! [metrics]
//! address = "127.0.0.1:9898"           # Prometheus text at /metrics, readiness at /health
//!
//! [log]
//! format = "text"                      # "text" | "json"
//! level = "info"                       # a tracing filter, e.g. "info,weir=debug"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use weir::stream::StreamingConfig;

/// The configuration used when `receiver-node run` is given no `--config`: a socket receiver
/// listening on 127.0.0.1:9999 for newline-delimited records, batches written under
/// `weir-data/node/out`, metrics on 127.0.0.1:9898. No external services.
pub const EMBEDDED_DEFAULT: &str = r#"# receiver-node's embedded default configuration.
data_dir = "weir-data/node"

[[receiver]]
name = "socket"
type = "socket"
mode = "listen"
address = "127.0.0.1:9999"
protocol = "lines"

[[output]]
type = "dir"
path = "weir-data/node/out"
format = "lines"
"#;

/// A complete, validated node configuration.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    /// Where the WAL and the tracker live.
    pub data_dir: PathBuf,
    /// This node's name in output file names, `jsonl` records and Kafka headers (see
    /// [`weir::identity`]). `None`: the default (recorded in `data_dir`, else derived from the
    /// host name and the data directory). Passed to the engine as `engine.node_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The engine's settings (`engine.node_id` is always `None` here: it is set top-level).
    pub engine: StreamingConfig,
    /// The receivers, in file order.
    #[serde(rename = "receiver")]
    pub receivers: Vec<ReceiverSpec>,
    /// The outputs every batch is written to, in file order.
    #[serde(rename = "output")]
    pub outputs: Vec<OutputConfig>,
    /// The metrics listener.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
}

/// One `[[receiver]]`.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiverSpec {
    /// Unique, stable name (it keys checkpoints and metrics).
    pub name: String,
    /// The receiver's own settings.
    #[serde(flatten)]
    pub kind: ReceiverKind,
}

pub use crate::connectors::ReceiverKind;

pub use crate::output::{OutputConfig, OutputFormat};

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of the HTTP endpoint (`/metrics`, `/health`). Default 127.0.0.1:9898.
    pub address: SocketAddr,
    /// Set to false to run without the endpoint. Default true.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 9898)),
            enabled: true,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Line format. Default text.
    pub format: LogFormat,
    /// A `tracing` filter (`RUST_LOG` syntax), e.g. `info` or `info,weir=debug`. Default
    /// `info`; the `RUST_LOG` environment variable overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    data_dir: Option<PathBuf>,
    node_id: Option<String>,
    #[serde(default)]
    engine: StreamingConfig,
    #[serde(default)]
    receiver: Vec<toml::Spanned<toml::Table>>,
    #[serde(default)]
    output: Vec<OutputConfig>,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    log: LogConfig,
}

/// A configuration error, naming where it is.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    origin: String,
    message: String,
}

/// The line of `key = ...` in the table that starts at `span` (up to the next table header).
fn key_line(text: &str, span: std::ops::Range<usize>, key: &str) -> Option<usize> {
    let start = span.start.min(text.len());
    let mut offset = start;
    for (i, l) in text[start..].split_inclusive('\n').enumerate() {
        let t = l.trim_start();
        if i > 0 && t.starts_with('[') {
            break;
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return Some(line_of(text, offset));
            }
        }
        offset += l.len();
    }
    None
}

/// Makes the relative file paths of a listener's `tls` table relative to `base` (the
/// configuration file's directory).
pub(crate) fn resolve_tls_paths(table: &mut toml::Table, base: &Path) {
    if let Some(toml::Value::Table(tls)) = table.get_mut("tls") {
        for key in ["cert_file", "key_file", "client_ca_file"] {
            if let Some(toml::Value::String(p)) = tls.get_mut(key) {
                if Path::new(p.as_str()).is_relative() && !base.as_os_str().is_empty() {
                    *p = base.join(p.as_str()).display().to_string();
                }
            }
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl NodeConfig {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key (and line where known) and what is expected.
    ///
    /// Relative paths of receivers' TLS files (`[receiver.tls]`: `cert_file`, `key_file`,
    /// `client_ca_file`) are relative to the file's directory.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        NodeConfig::parse_in(&text, &path.display().to_string(), Some(base))
    }

    /// Parses and validates configuration text; `origin` names it in errors. Relative TLS file
    /// paths are relative to the working directory.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key (and line where known) and what is expected.
    pub fn parse(text: &str, origin: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse_in(text, origin, None)
    }

    /// [`parse`](Self::parse), with relative TLS file paths taken relative to `base` if given.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key (and line where known) and what is expected.
    pub fn parse_in(
        text: &str,
        origin: &str,
        base: Option<&Path>,
    ) -> Result<NodeConfig, ConfigError> {
        let err = |message: String| ConfigError {
            origin: origin.to_string(),
            message,
        };
        let raw: Raw =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        let mut receivers = Vec::new();
        for (i, spanned) in raw.receiver.iter().enumerate() {
            let line = line_of(text, spanned.span().start);
            let mut table = spanned.get_ref().clone();
            let at = |what: String| err(format!("[[receiver]] #{} (line {line}): {what}", i + 1));
            let name = match table.remove("name") {
                Some(toml::Value::String(s)) if !s.is_empty() => s,
                Some(_) => return Err(at("`name` must be a non-empty string".into())),
                None => return Err(at("missing key `name` (a unique, stable name)".into())),
            };
            let kind = match table.remove("type") {
                Some(toml::Value::String(s)) => s,
                Some(_) => return Err(at("`type` must be a string".into())),
                None => {
                    return Err(at(format!(
                        "missing key `type` (expected {})",
                        crate::connectors::type_names()
                    )))
                }
            };
            let span = spanned.span();
            let at = |what: String| {
                // Point at the offending key's own line when the message names one.
                let key_line = what
                    .split('`')
                    .nth(1)
                    .and_then(|key| key_line(text, span.clone(), key))
                    .unwrap_or(line);
                err(format!("[[receiver]] {name:?} (line {key_line}): {what}"))
            };
            if let Some(base) = base {
                resolve_tls_paths(&mut table, base);
            }
            let kind = ReceiverKind::parse(&kind, table).map_err(at)?;
            if receivers.iter().any(|r: &ReceiverSpec| r.name == name) {
                return Err(at("a receiver with this name already exists".into()));
            }
            receivers.push(ReceiverSpec { name, kind });
        }
        if raw.engine.node_id.is_some() {
            return Err(err(
                "[engine] node_id: set `node_id` at the top level of the file (before any table)"
                    .into(),
            ));
        }
        let config = NodeConfig {
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from("weir-data/node")),
            node_id: raw.node_id,
            engine: raw.engine,
            receivers,
            outputs: raw.output,
            metrics: raw.metrics,
            log: raw.log,
        };
        config.validate().map_err(err)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.node_id {
            weir::identity::validate_node_id(id).map_err(|e| format!("node_id {id:?}: {e}"))?;
        }
        if self.engine.replication.is_some() && self.node_id.is_none() {
            return Err(
                "node_id (top level) must be set when [engine.replication] is on: a \
                        default derived from the host or the data directory would change on a \
                        new machine, which could then not adopt this node's replicated state"
                    .into(),
            );
        }
        StreamingConfig {
            node_id: self.node_id.clone(),
            ..self.engine.clone()
        }
        .validate()
        .map_err(|e| format!("[engine] {e}"))?;
        if self.receivers.is_empty() {
            return Err("no [[receiver]]: add at least one (see examples/*.toml)".into());
        }
        if self.outputs.is_empty() {
            return Err(
                "no [[output]]: add one (type = \"dir\", \"kafka\" or \"stdout\"), or batches go nowhere"
                    .into(),
            );
        }
        let mut transactional: Vec<&str> = Vec::new();
        for (i, o) in self.outputs.iter().enumerate() {
            o.validate()
                .map_err(|e| format!("[[output]] #{} type = {:?}: {e}", i + 1, o.type_name()))?;
            // One transactional producer per node and topic (its transactional.id).
            if let OutputConfig::Kafka(k) = o {
                if k.exactly_once {
                    if transactional.contains(&k.topic.as_str()) {
                        return Err(format!(
                            "[[output]] #{}: a second exactly_once kafka output to topic {:?}:                              one per topic and node",
                            i + 1,
                            k.topic
                        ));
                    }
                    transactional.push(&k.topic);
                }
            }
        }
        if self.log.level.trim().is_empty() {
            return Err("[log] level must not be empty".into());
        }
        Ok(())
    }

    /// The effective configuration (every default filled in), as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid() {
        let c = NodeConfig::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert_eq!(c.receivers.len(), 1);
        assert_eq!(c.data_dir, PathBuf::from("weir-data/node"));
        // The effective configuration parses back to the same thing.
        let again = NodeConfig::parse(&c.to_toml(), "printed").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let bad =
            EMBEDDED_DEFAULT.replace("protocol = \"lines\"", "protocol = \"lines\"\nbogus = 1");
        let e = NodeConfig::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("f.toml: [[receiver]] \"socket\" (line 10):"),
            "{e}"
        );
        assert!(e.contains("bogus"), "{e}");

        let bad = format!("{EMBEDDED_DEFAULT}\n[engine]\nbatch_interval = 5\n");
        let e = NodeConfig::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(e.contains("batch_interval") && e.contains("line 17"), "{e}");

        let bad = format!("{EMBEDDED_DEFAULT}\n[engine]\nblock_interval_ms = 0\n");
        let e = NodeConfig::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(
            e.contains("[engine] block_interval_ms must be greater than 0"),
            "{e}"
        );

        let bad = format!("{EMBEDDED_DEFAULT}\n[engine.wal]\nfsync = \"sometimes\"\n");
        let e = NodeConfig::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(e.contains("sometimes"), "{e}");

        let bad = EMBEDDED_DEFAULT.replace("type = \"socket\"", "type = \"carrier-pigeon\"");
        let e = NodeConfig::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(
            e.contains("unknown receiver type \"carrier-pigeon\""),
            "{e}"
        );

        let e = NodeConfig::parse("data_dir = \"x\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[receiver]]"), "{e}");

        let twice = format!(
            "{EMBEDDED_DEFAULT}\n[[receiver]]\nname = \"socket\"\ntype = \"socket\"\nmode = \"listen\"\n"
        );
        let e = NodeConfig::parse(&twice, "f.toml").unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");

        let bad = EMBEDDED_DEFAULT.replace("format = \"lines\"", "format = \"xml\"");
        let e = NodeConfig::parse(&bad, "f.toml").unwrap_err().to_string();
        assert!(e.contains("xml"), "{e}");
    }

    #[test]
    fn a_flume_receiver_parses_validates_and_prints_back() {
        let t = EMBEDDED_DEFAULT.replace(
            "type = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:9999\"\nprotocol = \"lines\"\n",
            "type = \"flume\"\naddress = \"127.0.0.1:41414\"\ndeflate = true\n",
        );
        let c = NodeConfig::parse(&t, "f").unwrap();
        let ReceiverKind::Flume(f) = &c.receivers[0].kind else {
            panic!("{:?}", c.receivers)
        };
        assert!(f.deflate);
        assert_eq!(f.max_events_per_batch, 10_000);
        let again = NodeConfig::parse(&c.to_toml(), "printed").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
        let e = NodeConfig::parse(&t.replace("deflate = true", "max_connections = 0"), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections must be at least 1"), "{e}");
    }

    #[test]
    fn node_id_is_top_level_checked_and_printed_back() {
        let t = format!("node_id = \"edge-1\"\n{EMBEDDED_DEFAULT}");
        let c = NodeConfig::parse(&t, "f").unwrap();
        assert_eq!(c.node_id.as_deref(), Some("edge-1"));
        assert_eq!(c.engine.node_id, None);
        let printed = c.to_toml();
        assert!(printed.contains("node_id = \"edge-1\""), "{printed}");
        assert_eq!(
            NodeConfig::parse(&printed, "printed").unwrap().node_id,
            c.node_id
        );
        // Unset: the default is resolved at start (and shown by check-config).
        assert_eq!(
            NodeConfig::parse(EMBEDDED_DEFAULT, "f").unwrap().node_id,
            None
        );

        let e = NodeConfig::parse(&t.replace("edge-1", "edge/1"), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_id \"edge/1\"") && e.contains("'/'"), "{e}");
        let e = NodeConfig::parse(
            &format!("{EMBEDDED_DEFAULT}\n[engine]\nnode_id = \"x\"\n"),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("top level"), "{e}");
    }

    #[test]
    fn fsync_policies_are_strings() {
        let t = format!("{EMBEDDED_DEFAULT}\n[engine.wal]\nfsync = \"interval(50)\"\n");
        let c = NodeConfig::parse(&t, "f").unwrap();
        assert_eq!(
            c.engine.wal.fsync,
            weir::wal::FsyncPolicy::Interval { ms: 50 }
        );
        assert!(c.to_toml().contains("fsync = \"interval(50)\""));
    }

    #[test]
    fn a_kafka_output_parses_validates_and_prints_back() {
        let t = EMBEDDED_DEFAULT.replace(
            "[[output]]\ntype = \"dir\"\npath = \"weir-data/node/out\"\nformat = \"lines\"\n",
            "[[output]]\ntype = \"kafka\"\nbootstrap_servers = \"k:9092\"\ntopic = \"out\"\n\
             [output.properties]\n\"linger.ms\" = \"20\"\n",
        );
        let c = NodeConfig::parse(&t, "f").unwrap();
        let OutputConfig::Kafka(k) = &c.outputs[0] else {
            panic!("{:?}", c.outputs)
        };
        assert_eq!((k.topic.as_str(), k.delivery_timeout_ms), ("out", 30_000));
        assert_eq!(k.properties["linger.ms"], "20");
        let again = NodeConfig::parse(&c.to_toml(), "printed").unwrap();
        assert_eq!(again.outputs, c.outputs);

        let e = NodeConfig::parse(&t.replace("topic = \"out\"", "topic = \"\""), "f")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[[output]] #1 type = \"kafka\": topic is required"),
            "{e}"
        );
        let e = NodeConfig::parse(&t.replace("linger.ms", "acks"), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"acks\" is set by weir"), "{e}");
        let e = NodeConfig::parse(&t.replace("topic = ", "topics = "), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("topics"), "{e}");
    }
}
