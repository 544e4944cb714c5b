//! `crash-harness`: proves zero data loss by killing the real `receiver-node`.
//!
//! It writes a configuration of its own (fsync `always`, a `dir` output in `lines` format),
//! starts `receiver-node`, and feeds it numbered records from one of four sources:
//!
//! - `--source socket` (default): a socket receiver in `frames` mode on a free loopback port;
//!   producers send records and record every acknowledgement (the cumulative durable count the
//!   node writes back), reconnect after a kill and resend what was not acknowledged.
//! - `--source kafka`: librdkafka's mock cluster, started in this process, or with
//!   `--bootstrap HOST:PORT` a real Kafka cluster (a new topic `crash-harness-<time>-<pid>` is
//!   created there, replicated to up to 3 brokers), with a topic of `--partitions` partitions; an idempotent producer sends records at `--rate` per second and
//!   counts every record whose delivery report succeeded ("acknowledged" below means delivered
//!   to Kafka); the node consumes with the Kafka receiver (consumer-group mode). The producer
//!   pauses while the group's committed offsets trail what was delivered by more than
//!   `--max-backlog` records on a partition, so retention (the mock's: about 5 MiB or 100,000
//!   records per partition) never drops a record the node has not stored.
//! - `--source flume`: Flume agents push `appendBatch` calls to the node's Flume Avro source
//!   (acknowledged = answered `OK`).
//! - `--source flume-pull`: Flume agents push to an in-process pull sink that the node's
//!   `flume_pull` receiver polls (acknowledged = the sink answered the push `OK`; it holds the
//!   events until the node acks them durable).
//!
//! At random moments (seeded, reproducible) it SIGKILLs the node and starts it again, K times.
//! Then it lets the node drain (socket and Flume: every record sent is acknowledged; Kafka: the
//! group has committed every delivered offset; Flume pull: the sink holds no unacked event),
//! stops it with SIGTERM (which must exit 0), and reads every batch file:
//!
//! - missing: acknowledged records absent from the output (must be 0),
//! - duplicates: records present more than once (socket: resent after a kill; Kafka: stored
//!   twice — 0 expected on one node, which resumes after the highest offset in its WAL),
//! - corrupt: output lines that are not records the producer sent,
//! - unacked but present: sent, never acknowledged (the node died first), yet stored,
//! - kills, and the recovery time of each restart (start to `/health` answering 200).
//!
//! Exit status: 0 if nothing acknowledged is missing and nothing is corrupt, 1 otherwise, 2 on
//! usage or setup errors.
//!
//! Layout: this file is the command line; [`driver`] runs the kills, drain and report the same
//! way for every source; [`node`] controls the `receiver-node` process; [`verify`] holds the
//! ledger of acknowledgements and checks the output against it; [`feed`] has one module per
//! source, each implementing [`feed::Feed`]. A new source is one module implementing `Feed` and
//! one [`Source`] variant.
//!
//! ```text
//! cargo build --release --bins
//! target/release/crash-harness --kills 300 --seed 7          # a long run
//! target/release/crash-harness --source kafka --kills 20     # the Kafka receiver, mock cluster
//! target/release/crash-harness --source kafka --bootstrap 127.0.0.1:9092 --kills 50
//! target/release/crash-harness --source kafka --commit after-batch --lose-disk --kills 20
//! ```
//!
//! `--lose-disk` deletes the data directory at every kill (a lost disk or machine): each
//! restart is a new node with a new data directory and `node_id`, writing to the same output.
//! With a replica (`--replica-endpoint`/`--replica-bucket` for an S3-compatible server, or
//! `--replica-kafka`), the `node_id` stays: each restart adopts the lost node's replicated
//! state, and nothing acknowledged may be missing.
//!
//! ```text
//! AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... target/release/crash-harness --source flume \
//!     --lose-disk --replica-endpoint http://127.0.0.1:9000 --replica-bucket weir --kills 20
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use feed::flume::FlumeFeed;
use feed::flume_pull::FlumePullFeed;
use feed::kafka::{self, KafkaFeed};
use feed::socket::SocketFeed;
use feed::Feed;

mod dest;
mod driver;
mod feed;
mod node;
mod verify;

/// Where the records come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// Producers connected to a `frames` socket receiver, acknowledged by the node.
    Socket,
    /// A topic of an in-process Kafka mock cluster, consumed by the Kafka receiver.
    Kafka,
    /// Flume agents (`appendBatch` calls) pushing to the node's Flume Avro source; a call's
    /// events count as acknowledged when it is answered `OK`.
    Flume,
    /// Flume agents pushing to an in-process pull sink, which the node's `flume_pull` receiver
    /// polls; events count as acknowledged when the sink answered the push `OK` (the sink then
    /// holds them until the node acks them durable).
    FlumePull,
}

/// `--to`: an exactly-once destination written beside the `dir` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum To {
    /// A PostgreSQL table (`--pg-url`; password from `PGPASSWORD`).
    Postgres,
    /// A Kafka topic with `exactly_once = true` (`--to-bootstrap`), read `read_committed`.
    Kafka,
    /// Parquet files in `<work dir>/parquet`, read with pyarrow (`--python`).
    Parquet,
}

/// `--commit`: the Kafka receiver's `commit` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Commit {
    /// Offsets committed once the records are durable in the WAL.
    Durable,
    /// Offsets committed once the batch holding the records has completed every output.
    AfterBatch,
}

#[derive(Debug, Parser)]
#[command(
    name = "crash-harness",
    version,
    about = "Kill receiver-node at random moments and check that nothing acknowledged is lost"
)]
struct Opts {
    /// How many times to SIGKILL the node.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// Seed of the kill schedule and the record sizes (the same seed, the same schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shortest time between a (re)start being healthy and the next kill, ms.
    #[arg(long, default_value_t = 200)]
    min_ms: u64,
    /// Longest time between a (re)start being healthy and the next kill, ms.
    #[arg(long, default_value_t = 1500)]
    max_ms: u64,
    /// Working directory (data, output, logs); a fresh temporary one if not given.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The receiver-node binary; default: the one next to this binary.
    #[arg(long)]
    node: Option<PathBuf>,
    /// Producer connections sending at once (socket and Flume sources).
    #[arg(long, default_value_t = 2)]
    producers: u32,
    /// Where the records come from.
    #[arg(long, value_enum, default_value_t = Source::Socket)]
    source: Source,
    /// Partitions of the topic (Kafka source).
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Records produced per second (Kafka source).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Pause producing while the group's committed offset trails the delivered ones by more
    /// than this many records on some partition (Kafka source; keep it well under the mock
    /// cluster's retention of ~5 MiB or 100,000 records per partition).
    #[arg(long, default_value_t = 20_000)]
    max_backlog: i64,
    /// When the node's Kafka receiver commits offsets (Kafka source): `durable` (once in the
    /// WAL, the receiver's default) or `after-batch` (once the batch holding the records has
    /// completed its output: Kafka is then the replica, and `--lose-disk` loses nothing).
    #[arg(long, value_enum)]
    commit: Option<Commit>,
    /// Delete the node's data directory at every kill, as if its disk or machine were lost:
    /// each restart is a new node (a new data directory and `node_id`) writing to the same
    /// output directory. Only what a replica holds survives: without one (Kafka with
    /// `--commit after-batch` is its own), records acknowledged but not yet in a completed
    /// batch are reported MISSING.
    #[arg(long)]
    lose_disk: bool,
    /// Replicate acknowledged blocks to this S3-compatible endpoint (`http://127.0.0.1:9000`)
    /// before acknowledging them (`[engine.replication] kind = "object_store"`); credentials
    /// from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. With `--lose-disk`, each restart is
    /// the same `node_id` on an empty data directory, which adopts the replicated state.
    #[arg(
        long,
        value_name = "URL",
        requires = "replica_bucket",
        conflicts_with = "replica_kafka"
    )]
    replica_endpoint: Option<String>,
    /// The replica's bucket (must exist).
    #[arg(long, value_name = "NAME", requires = "replica_endpoint")]
    replica_bucket: Option<String>,
    /// Replicate acknowledged blocks to a topic of this Kafka cluster instead
    /// (`[engine.replication] kind = "kafka"`; the topic `weir-replica.<node_id>` is created
    /// with 3 replicas, or as many as there are brokers).
    #[arg(long, value_name = "HOST:PORT")]
    replica_kafka: Option<String>,
    /// Also write every batch to this destination and check that it ends up holding exactly
    /// what the batches hold: no record missing, none written twice by a re-run batch.
    #[arg(long, value_enum)]
    to: Option<To>,
    /// `--to postgres`: the server and database (`postgresql://user@host:port/db`); the table
    /// `crash_harness_<time>_<pid>` is created there. The password comes from `PGPASSWORD`.
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
    /// `--to kafka`: the cluster (a topic `crash-harness-out-<time>-<pid>` is created there).
    #[arg(long, value_name = "HOST:PORT")]
    to_bootstrap: Option<String>,
    /// `--to parquet`: a Python interpreter with pyarrow (default: the repository's `.venv`).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// A real Kafka cluster to use instead of the in-process mock (Kafka source): a new topic
    /// of `--partitions` partitions, replicated to up to 3 brokers, is created there.
    #[arg(long, value_name = "HOST:PORT")]
    bootstrap: Option<String>,
}

fn main() -> ExitCode {
    let o = Opts::parse();
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("crash-harness: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(o: &Opts) -> Result<bool, String> {
    let plan = driver::Plan {
        kills: o.kills,
        seed: o.seed,
        min_ms: o.min_ms,
        max_ms: o.max_ms,
        dir: o.dir.clone(),
        node: o.node.clone(),
        lose_disk: o.lose_disk,
        replication: match (&o.replica_endpoint, &o.replica_kafka) {
            (Some(e), _) => Some(format!(
                "\n[engine.replication]\nkind = \"object_store\"\nendpoint = {e:?}\nbucket = {:?}\n",
                o.replica_bucket.as_deref().unwrap_or_default()
            )),
            (None, Some(b)) => Some(format!(
                "\n[engine.replication]\nkind = \"kafka\"\nbootstrap_servers = {b:?}\n"
            )),
            (None, None) => None,
        },
        to: None,
    };
    let mut plan = plan;
    plan.to = destination(o)?;
    plan.check()?;
    if o.source == Source::Kafka {
        kafka::check_options(o.rate, o.max_backlog)?;
    } else if o.bootstrap.is_some() {
        return Err("--bootstrap goes with --source kafka".into());
    } else if o.commit.is_some() {
        return Err("--commit goes with --source kafka".into());
    }
    // The feed is built in the work directory, once the driver has made it.
    driver::run(plan, |dir| -> Result<Box<dyn Feed>, String> {
        Ok(match o.source {
            Source::Socket => Box::new(SocketFeed::new(o.producers)?),
            Source::Kafka => Box::new(KafkaFeed::new(
                o.partitions,
                o.rate,
                o.max_backlog,
                o.bootstrap.as_deref(),
                o.commit.unwrap_or(Commit::Durable),
            )?),
            Source::Flume => Box::new(FlumeFeed::new(o.producers)?),
            Source::FlumePull => Box::new(FlumePullFeed::new(o.producers, dir)?),
        })
    })
}

/// The `--to` destination, with its options checked.
fn destination(o: &Opts) -> Result<Option<dest::Destination>, String> {
    let stamp = format!(
        "{}_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    );
    Ok(match o.to {
        None => None,
        Some(To::Postgres) => Some(dest::Destination::Postgres {
            url: o
                .pg_url
                .clone()
                .ok_or("--to postgres needs --pg-url postgresql://user@host:port/db")?,
            table: format!("crash_harness_{stamp}"),
        }),
        Some(To::Kafka) => Some(dest::Destination::Kafka {
            bootstrap: o.to_bootstrap.clone().ok_or(
                "--to kafka needs --to-bootstrap HOST:PORT (a real cluster: transactions)",
            )?,
            topic: format!("crash-harness-out-{}", stamp.replace('_', "-")),
        }),
        Some(To::Parquet) => {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let python = o
                .python
                .clone()
                .unwrap_or_else(|| root.join(".venv/bin/python"));
            Some(dest::Destination::Parquet {
                dir: PathBuf::from("parquet"),
                python,
                script: root.join("crates/weir-node/tests/read_parquet.py"),
            })
        }
    })
}
