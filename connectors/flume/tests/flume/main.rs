//! Integration tests of the Flume push source, with `weir_testkit::RecordingHost` as the host:
//! Java's captured bytes, the Python Flume client as a subprocess, malformed input and limits,
//! failures and shutdown.

mod access;
mod capture;
mod common;
mod malformed;
mod pull;
mod python_peer;
mod status;
