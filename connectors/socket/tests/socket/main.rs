//! Integration tests of the socket receiver on real loopback sockets, with
//! `weir_testkit::RecordingHost` as the host.

mod access;
mod common;
mod connect;
mod frames;
mod limits;
mod listen_lines;
mod python_peer;
mod shutdown;
