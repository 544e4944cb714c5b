//! `receiver-node`: the weir daemon (`run`, `check-config`) and the `wal` tools, which inspect a
//! write-ahead log directory without changing it (see `weir_wal::inspect` and `weir_node::inspect_text`).

use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use weir::WalPosition;
use weir_node::inspect_text::{self, DumpFormat};
use weir_node::{self as node, config as node_config, config::NodeConfig};
use weir_wal::inspect::{self, DumpEvent, InspectError};

/// Exit status: clean.
const EXIT_OK: u8 = 0;
/// Exit status: the log holds damage.
const EXIT_CORRUPT: u8 = 1;
/// Exit status: usage or I/O error (clap uses 2 for usage errors too).
const EXIT_ERROR: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "receiver-node",
    version,
    about = "weir receiver node: ingest streams into a checksummed, fsynced write-ahead log",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node: recover, then ingest until SIGTERM/SIGINT.
    ///
    /// Without --config it runs the embedded default: a socket receiver listening on
    /// 127.0.0.1:9999 for newline-delimited records, batches written to weir-data/node/out,
    /// metrics on http://127.0.0.1:9898/metrics. The first SIGTERM/SIGINT drains gracefully
    /// (exit 0); a second one exits at once (130). Exit 1 if the engine fails (restart it to
    /// recover), 2 on configuration errors.
    Run {
        /// The configuration file (TOML; see `check-config` and examples/*.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective configuration (defaults filled in).
    ///
    /// Exit status: 0 if valid, 2 with a message naming the key (and line) otherwise.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Run a pull sink (sink node): accept events over Flume's Avro push protocol into a durable
    /// queue, serve them to pull receivers over SparkFlumeProtocol (getEventBatch/ack/nack).
    ///
    /// The file has the sections [push] (Flume Avro source keys), [pull] (address, deflate,
    /// max_batch, ...), [queue] (tx_timeout_ms, empty_wait_ms, max_queued_bytes), [wal], and
    /// data_dir. SIGTERM/SIGINT stop it (exit 0); exit 2 on configuration errors, 1 otherwise.
    Sink {
        /// The configuration file (TOML; see examples/flume-pull-sink.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a running node's (or pull sink's) status: health, the last batch, receivers,
    /// outputs, the WAL and the replica, read from its /api/status.
    ///
    /// The address is --address, else [metrics] address of --config, else 127.0.0.1:9898 (a
    /// pull sink's default is 127.0.0.1:9899). Exit status: 0 if the node is healthy, 1 if it
    /// answers but is not (failed, recovering, stopping, degraded, an output failing or a
    /// receiver restarting), 2 if it cannot be reached.
    Status {
        /// host:port of the node's HTTP endpoint.
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// Read the address from this node configuration file ([metrics] address).
        #[arg(long, value_name = "FILE", conflicts_with = "address")]
        config: Option<PathBuf>,
        /// Print the JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Inspect a write-ahead log directory (read-only: safe on a live directory).
    #[command(subcommand)]
    Wal(WalCommand),
}

#[derive(Debug, Subcommand)]
enum WalCommand {
    /// List the segment files with their size, intact records and status.
    ///
    /// One line per segment: id, file name, size in bytes, intact records, status (ok / torn
    /// tail at OFFSET (N bytes) / N damaged regions / half-created). Every checksum is
    /// verified to count the records.
    ///
    /// Exit status: 0 on success (whatever the segments hold), 2 on usage or I/O errors.
    List {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// Verify every checksum of every segment and report damage, torn tails and totals.
    ///
    /// Read-only: nothing is truncated or removed and the directory lock is not taken, so it
    /// works on a live directory (where a write in progress shows as a torn tail).
    ///
    /// Exit status: 0 if clean, or if the only finding is a torn tail (or a half-created
    /// file) at the end of the newest segment, which recovery repairs; 1 if any segment holds
    /// damage (opening the log in strict recovery mode would fail); 2 on usage or I/O errors.
    Verify {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// Print the intact records, in log order, with segment, offset, length and payload.
    ///
    /// Damaged ranges, torn tails and half-created segments met on the way are reported on
    /// stderr. Exit status: 0 on success, 1 if damage was met in the range dumped, 2 on usage
    /// or I/O errors.
    Dump {
        /// The WAL directory.
        dir: PathBuf,
        /// Start at this position: SEGMENT:OFFSET (records whose frame starts at or after
        /// it; SEGMENT is an id or a segment file name; SEGMENT alone means its first record).
        #[arg(long, value_name = "SEGMENT:OFFSET", value_parser = inspect::parse_position)]
        from: Option<WalPosition>,
        /// Print at most N records.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Show at most N bytes of each payload in text and hex output (json is always
        /// complete); 0 shows everything.
        #[arg(long, value_name = "N", default_value_t = 200)]
        max_bytes: usize,
    },
}

/// Output formats of `wal dump`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// One line per record; the payload escaped (printable UTF-8 as is, other bytes as \xNN).
    Text,
    /// A line per record, then a hex dump of the payload.
    Hex,
    /// One JSON object per line: segment, offset, len, payload_hex.
    Json,
}

impl From<Format> for DumpFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Text => DumpFormat::Text,
            Format::Hex => DumpFormat::Hex,
            Format::Json => DumpFormat::Json,
        }
    }
}

/// `receiver-node status`.
fn status(address: Option<String>, config: Option<&std::path::Path>, json: bool) -> ExitCode {
    let address = match (address, config) {
        (Some(a), _) => a,
        (None, Some(file)) => match NodeConfig::load(file) {
            Ok(c) => c.metrics.address.to_string(),
            Err(e) => {
                eprintln!("receiver-node status: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        },
        (None, None) => "127.0.0.1:9898".to_string(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("receiver-node status: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(node::status::fetch(&address)) {
        Ok(doc) => {
            let text = if json {
                format!("{doc:#}\n")
            } else {
                node::status::render_text(&doc)
            };
            let _ = io::stdout().write_all(text.as_bytes());
            if node::status::healthy(&doc) {
                ExitCode::from(EXIT_OK)
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("receiver-node status: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => return run_node(config.as_deref()),
        Command::CheckConfig { file } => return check_config(&file),
        Command::Sink { config } => return run_sink(&config),
        Command::Status {
            address,
            config,
            json,
        } => return status(address, config.as_deref(), json),
        Command::Wal(cmd) => run_wal(cmd),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        // `receiver-node wal dump DIR | head`: the reader left; not an error of ours.
        Err(InspectError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("receiver-node: error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn load_config(file: Option<&std::path::Path>) -> Result<NodeConfig, ExitCode> {
    let loaded = match file {
        Some(f) => NodeConfig::load(f),
        None => NodeConfig::parse(node_config::EMBEDDED_DEFAULT, "embedded default"),
    };
    loaded.map_err(|e| {
        eprintln!("receiver-node: configuration error: {e}");
        ExitCode::from(EXIT_ERROR)
    })
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match load_config(Some(file)) {
        Ok(c) => {
            // Build each output as `run` would (a Kafka output's producer: librdkafka checks
            // combinations of properties only then), without connecting to anything.
            for (i, o) in c.outputs.iter().enumerate() {
                if let Err(e) = node::output::Output::new(o, i + 1) {
                    eprintln!(
                        "receiver-node: configuration error: {}: [[output]] #{}: {e}",
                        file.display(),
                        i + 1
                    );
                    return ExitCode::from(EXIT_ERROR);
                }
            }
            // The id the node would run under (nothing is written here).
            let identity = match weir::identity::peek(&c.data_dir, c.node_id.as_deref()) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!(
                        "receiver-node: configuration error: {}: {e}",
                        file.display()
                    );
                    return ExitCode::from(EXIT_ERROR);
                }
            };
            let mut c = c;
            c.node_id = Some(identity.node_id.clone());
            let text = format!(
                "# {}: valid. Effective configuration:\n# node_id {:?}: {} (names this node's \
                 batch files, tags its jsonl records and Kafka headers)\n{}{}",
                file.display(),
                identity.node_id,
                identity.source,
                floor_note(&c),
                c.to_toml()
            );
            // `check-config FILE | head` closes the pipe early: not an error of ours.
            let _ = io::stdout().write_all(text.as_bytes());
            ExitCode::from(EXIT_OK)
        }
        Err(code) => code,
    }
}

/// A comment line on the free-space floor as it applies to the data directory's file system
/// now (the directory itself, or its nearest existing parent).
fn floor_note(c: &NodeConfig) -> String {
    let min = c.engine.wal.min_free_bytes;
    if min == 0 {
        return "# free-space floor: off (engine.wal.min_free_bytes = 0)\n".into();
    }
    let mut dir = std::path::absolute(&c.data_dir).unwrap_or_else(|_| c.data_dir.clone());
    while !dir.exists() && dir.pop() {}
    match weir::space::disk_space(&dir) {
        Ok(s) => format!(
            "# free-space floor: {} bytes (the smaller of engine.wal.min_free_bytes = {min} and 5% \
             of the {} bytes of the file system holding {}; {} bytes free now): below it, \
             store() waits\n",
            weir::space::floor(min, s.total),
            s.total,
            dir.display(),
            s.available
        ),
        Err(e) => format!("# free-space floor: unknown ({}: {e})\n", dir.display()),
    }
}

fn run_node(file: Option<&std::path::Path>) -> ExitCode {
    let config = match load_config(file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    node::init_logging(&config.log);
    if file.is_none() {
        tracing::info!(
            "no --config: running the embedded default (see `receiver-node run --help`)"
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("receiver-node: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(node::run(config)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(node::NodeError::Config(e)) => {
            tracing::error!(error = %e, "configuration error");
            eprintln!("receiver-node: configuration error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
        Err(e) => {
            tracing::error!(error = %e, "receiver-node stopped with an error");
            eprintln!("receiver-node: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_sink(file: &std::path::Path) -> ExitCode {
    // TLS file paths relative to the file, as a node's are.
    let config = match weir_node::sink::PullSinkConfig::load(file)
        .map_err(|e| format!("{}: {e}", file.display()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("receiver-node: configuration error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    node::init_logging(&config.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("receiver-node: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(node::run_sink(config)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            tracing::error!(error = %e, "the pull sink stopped with an error");
            eprintln!("receiver-node: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_wal(cmd: WalCommand) -> Result<u8, InspectError> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let code = match cmd {
        WalCommand::List { dir } => {
            let report = inspect::inspect_dir(&dir)?;
            inspect_text::write_list(&report, &mut out).map_err(InspectError::Output)?;
            EXIT_OK
        }
        WalCommand::Verify { dir } => {
            let report = inspect::inspect_dir(&dir)?;
            inspect_text::write_verify(&report, &mut out).map_err(InspectError::Output)?;
            if report.is_corrupt() {
                EXIT_CORRUPT
            } else {
                EXIT_OK
            }
        }
        WalCommand::Dump {
            dir,
            from,
            limit,
            format,
            max_bytes,
        } => {
            let mut printed = 0u64;
            let mut damaged = false;
            let stderr = io::stderr();
            let mut notes = stderr.lock();
            let format = DumpFormat::from(format);
            inspect::dump(&dir, from.unwrap_or(WalPosition::START), |ev| {
                match ev {
                    DumpEvent::Record { .. } => {
                        if limit.is_some_and(|n| printed >= n) {
                            return Ok(ControlFlow::Break(()));
                        }
                        printed += 1;
                    }
                    DumpEvent::Damaged(_) => damaged = true,
                    _ => {}
                }
                if !matches!(ev, DumpEvent::Record { .. }) {
                    // Keep stdout and stderr in order when both go to a terminal.
                    out.flush()?;
                }
                let max = (max_bytes > 0).then_some(max_bytes);
                inspect_text::write_dump_event(&ev, format, max, &mut out, &mut notes)?;
                Ok(ControlFlow::Continue(()))
            })?;
            if damaged {
                EXIT_CORRUPT
            } else {
                EXIT_OK
            }
        }
    };
    out.flush().map_err(InspectError::Output)?;
    Ok(code)
}
