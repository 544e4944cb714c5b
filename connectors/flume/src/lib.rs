//! Flume receivers for weir.
//!
//! - [`ipc`]: Avro IPC as Flume and Spark speak it (Netty framing, the stateful handshake,
//!   calls, error replies, `deflate`), server and client side, with limits on everything a peer
//!   can announce. `apache-avro` parses protocol texts; the binary values are decoded here,
//!   without trusting length fields.
//! - [`flume`]: `AvroSourceProtocol`'s texts and messages.
//! - [`FlumeSourceReceiver`]: Flume's Avro push source, answering `OK` only once a call's
//!   events are durable (see the crate's `README.md`).
//! - [`spark`]: Spark's `SparkFlumeProtocol` (the pull sink's protocol) and its codec.
//! - [`sink_server`]: the `SparkFlumeProtocol` server of a pull sink, over a transactional
//!   [`sink_server::PullQueue`] ([`sink_queue::SinkQueue`] implements it on its own write-ahead log).
//! - [`FlumePullReceiver`]: polls pull sinks (`getEventBatch`), `ack`s a batch only once it is
//!   durable, `nack`s it when storing fails.
//!
//! ```no_run
//! use weir_receiver::{shutdown_channel, Receiver, ReceiverContext};
//! use weir_flume::{FlumeSourceConfig, FlumeSourceReceiver};
//! # async fn demo(host: std::sync::Arc<dyn weir_receiver::ReceiverHost>) {
//! let receiver = FlumeSourceReceiver::new(FlumeSourceConfig::listen("127.0.0.1:41414"))
//!     .expect("a valid configuration");
//! let (_stop, shutdown) = shutdown_channel();
//! receiver.run(ReceiverContext::new("flume", host, shutdown, 0)).await.unwrap();
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod flume;
pub mod ipc;
mod pull;
pub mod sink_queue;
pub mod sink_server;
mod source;
pub mod spark;

pub use pull::{FlumePullConfig, FlumePullReceiver, FlumePullStats, MAX_WORKERS};
pub use source::{
    avro_source_responder, ConfigError, FlumeSourceConfig, FlumeSourceReceiver, FlumeSourceStats,
    DEFAULT_ADDRESS, MAX_FRAME_BYTES_LIMIT, MIN_FRAME_BYTES,
};
