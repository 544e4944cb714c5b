//! The sources of records: one [`Feed`] per `--source`, in one module each.
//!
//! A feed sets up what the node consumes from, gives the node's `[[receiver]]` section, runs the
//! producers (which record every send and acknowledgement in the shared [`Ledger`]), waits for
//! the node to have stored everything acknowledged, and adds its own lines to the report. The
//! driver ([`crate::driver`]) does the rest: the node, the kills, the check of the output.

use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::verify::Ledger;

pub mod flume;
pub mod flume_pull;
pub mod kafka;
pub mod socket;

/// What the producers share with the driver.
#[derive(Clone, Default)]
pub struct Shared {
    /// Every record sent and acknowledged.
    pub ledger: Arc<Mutex<Ledger>>,
    /// The next record id to send (ids are unique across producers).
    pub next_id: Arc<AtomicU64>,
    /// Set when the producers must return now (the drain timed out, or the run ends).
    pub stop: Arc<AtomicBool>,
    /// Set when the producers must send no new records, only finish what they sent.
    pub done_sending: Arc<AtomicBool>,
}

/// A producer thread; `Err` ends the run as a setup error.
pub type Producer = JoinHandle<Result<(), String>>;

/// A source of records for the node, ready to run (its ports, cluster or sink set up when it
/// was built).
pub trait Feed {
    /// The `--source` name, for the report.
    fn name(&self) -> &'static str;

    /// The node's `[[receiver]]` section (TOML, ending in a newline).
    fn receiver(&self) -> String;

    /// Starts the producers; the node is running and healthy. They send numbered records
    /// ([`crate::verify::record`]) with ids from `shared.next_id`, record them in
    /// `shared.ledger` as sent and, once the source confirms them, as acknowledged; they keep
    /// going across kills (reconnect, resend). Once `shared.done_sending` is set they send no new
    /// records and return when everything they sent is acknowledged (or `shared.stop` is set).
    fn start(&mut self, shared: &Shared) -> Result<Vec<Producer>, String>;

    /// Called once the node (started or restarted) is healthy, before the next kill and before
    /// the drain: waits until it really works. Default: healthy is enough.
    fn wait_working(&mut self, _node: &mut Child) -> Result<(), String> {
        Ok(())
    }

    /// Called after each kill, before the restart.
    fn killed(&mut self) {}

    /// The drain condition, after the producers returned: waits until the node has stored
    /// everything acknowledged (it reports only what is durable in its WAL). Default: nothing
    /// to wait for, the producers' acknowledgements came from the node.
    fn drain(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// The report's lines on what was sent and acknowledged, `sent` and `acked` from the ledger.
    fn counts(&self, sent: u64, acked: usize) -> Vec<String> {
        vec![format!("records sent: {sent}, acknowledged: {acked}")]
    }

    /// What a duplicate is with this source, for the report's `duplicates (...): N`.
    fn duplicates(&self) -> &'static str;

    /// Report lines after the recovery times (e.g. how long until the node consumed again).
    fn timings(&self) -> Vec<String> {
        Vec::new()
    }
}
