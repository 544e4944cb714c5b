//! Integration tests of the socket receiver on real loopback sockets, with a fake host.

mod common;
mod connect;
mod frames;
mod limits;
mod listen_lines;
mod python_peer;
mod shutdown;
