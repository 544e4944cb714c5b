//! Avro IPC as Flume and Spark speak it: Avro's Netty transport (`NettyTransportCodec`,
//! `NettyServer`, `NettyTransceiver`) with its stateful handshake.
//!
//! - [`frame`]: the framing (`serial | count | count × (len | bytes)`), with limits.
//! - [`transport`]: frames over a socket, optionally through one zlib stream per direction.
//! - [`handshake`]: the handshake records; [`protocol`]: protocol texts, hashes, message
//!   signatures (via `apache-avro`).
//! - [`responder`]: the server's state machine; [`requestor`]: the client's; [`client`]: a
//!   requestor over a socket, one call at a time.
//! - [`datum`]: the Avro binary values these need, decoded without trusting length fields.
//!
//! Servers (Flume's Avro source here, a pull sink later) combine a [`responder::Responder`]
//! with a [`transport::FrameReader`]/[`transport::FrameWriter`] per connection and decode their
//! own messages' parameters; clients do the same with a [`requestor::Requestor`].

pub mod client;
pub mod datum;
pub mod frame;
pub mod handshake;
pub mod protocol;
pub mod requestor;
pub mod responder;
pub mod transport;
