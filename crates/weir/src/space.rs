//! Disk space: a full disk is backpressure, never a crash.
//!
//! Everywhere weir writes — the WAL, the tracker's commits, a `dir` output, the pull sink's
//! queue, recovery — `ENOSPC` (and a full quota, `EDQUOT`) makes the write wait and retry with
//! backoff. Nothing is acknowledged meanwhile, and everything continues by itself once space is
//! back. Each place has a gauge ([`SpaceWaits`], exported as
//! `weir_waiting_for_space{place="..."}`), and `/health` reports `degraded` while any is set.
//! The first failure of an episode is logged as an error, later ones as warnings, and the end
//! of the episode once.
//!
//! The free-space floor ([`WalConfig::min_free_bytes`](crate::wal::WalConfig::min_free_bytes))
//! makes the WAL wait *before* the disk is full, so that the tracker, recovery and WAL cleanup
//! always have room to work.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use weir_wal::space::{disk_space, floor, is_no_space, is_no_space_io, DiskSpace};

/// Where the node waits for disk space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Committing to the tracker (batch allocation, completions).
    Tracker,
    /// Writing a batch to an output (a job).
    Output,
    /// Opening the WAL or the tracker at startup.
    Recovery,
}

impl Place {
    /// Every place, in export order.
    pub const ALL: [Place; 3] = [Place::Tracker, Place::Output, Place::Recovery];

    /// The `place` label.
    pub fn label(self) -> &'static str {
        match self {
            Place::Tracker => "tracker",
            Place::Output => "output",
            Place::Recovery => "recovery",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
struct Episode {
    since: Option<Instant>,
    last_warning: Option<Instant>,
}

/// Per place: whether the engine is waiting for space, and the logging of each episode.
#[derive(Debug, Default)]
pub struct SpaceWaits {
    waiting: [AtomicU64; 3],
    retries: [AtomicU64; 3],
    episodes: Mutex<[Episode; 3]>,
}

/// How often "still waiting" is repeated while an episode lasts.
const REMIND_EVERY: Duration = Duration::from_secs(10);

impl SpaceWaits {
    /// Records a write at `place` that failed for lack of space: sets the gauge, logs an error
    /// for the first failure of an episode and a warning every 10 s after that.
    pub fn failed(&self, place: Place, detail: &str) {
        let i = place.index();
        self.retries[i].fetch_add(1, Relaxed);
        self.waiting[i].store(1, Relaxed);
        let mut eps = weir_receiver::lock(&self.episodes);
        let ep = &mut eps[i];
        let now = Instant::now();
        match ep.since {
            None => {
                ep.since = Some(now);
                ep.last_warning = Some(now);
                tracing::error!(
                    place = place.label(), error = detail,
                    "disk full: waiting for space and retrying (nothing is acknowledged or lost meanwhile)"
                );
            }
            Some(since) => {
                if ep.last_warning.is_none_or(|w| now - w >= REMIND_EVERY) {
                    ep.last_warning = Some(now);
                    tracing::warn!(
                        place = place.label(),
                        waited_s = (now - since).as_secs(),
                        error = detail,
                        "still waiting for disk space"
                    );
                }
            }
        }
    }

    /// Records a write at `place` that succeeded: ends an episode (logged once).
    pub fn succeeded(&self, place: Place) {
        let i = place.index();
        if self.waiting[i].swap(0, Relaxed) == 0 {
            return;
        }
        let mut eps = weir_receiver::lock(&self.episodes);
        if let Some(since) = eps[i].since.take() {
            tracing::warn!(
                place = place.label(),
                waited_ms = since.elapsed().as_millis() as u64,
                "disk space is available again; continuing"
            );
        }
        eps[i].last_warning = None;
    }

    /// 1 while `place` waits for space.
    pub fn waiting(&self, place: Place) -> u64 {
        self.waiting[place.index()].load(Relaxed)
    }

    /// Writes at `place` retried for lack of space (counter).
    pub fn retries(&self, place: Place) -> u64 {
        self.retries[place.index()].load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_sets_and_clears_the_gauge() {
        let w = SpaceWaits::default();
        assert_eq!(w.waiting(Place::Tracker), 0);
        w.failed(Place::Tracker, "x");
        w.failed(Place::Tracker, "x");
        assert_eq!(
            (w.waiting(Place::Tracker), w.retries(Place::Tracker)),
            (1, 2)
        );
        assert_eq!(w.waiting(Place::Output), 0);
        w.succeeded(Place::Tracker);
        assert_eq!(w.waiting(Place::Tracker), 0);
    }
}
