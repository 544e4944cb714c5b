//! Ingestion rate control: a static per-receiver limit, backpressure, and the token bucket
//! that enforces them.
//!
//! (Over 700 lines with its tests, nearly half of the file: the PID port is checked value by
//! value against Spark's estimator, next to the code.)
//!
//! - [`RateConfig`] is what users configure: a hard limit per receiver and/or backpressure.
//! - [`PidRateEstimator`] is the backpressure controller, a port of Spark Streaming's
//!   `PIDRateEstimator`: after each batch it looks at how long the batch took to process and
//!   how late it started, and proposes a new per-receiver rate.
//! - [`RateLimiter`] is the token bucket a receiver's `store()` calls go through; its limit
//!   can be changed live by the controller.
//!
//! ```
//! use std::time::Duration;
//! use weir::rate::{PidRateEstimator, RateConfig, RateLimiter};
//!
//! let cfg = RateConfig { backpressure: true, ..RateConfig::default() };
//! cfg.validate()?;
//! let mut pid = PidRateEstimator::new(Duration::from_secs(1), &cfg);
//! let limiter = RateLimiter::new(None);
//! // First batch: 5000 records processed in 500 ms. It only primes the estimator.
//! assert_eq!(pid.compute(1_000, 5_000, 500, 0), None);
//! // Second batch: same speed, but it started 1 s late; the estimate drops below 10 000/s.
//! let rate = pid.compute(2_000, 5_000, 500, 1_000).unwrap();
//! assert!(rate < 10_000.0);
//! limiter.set_limit(Some(rate));
//! # Ok::<(), weir::receiver::ConfigError>(())
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use weir_receiver::ConfigError;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Rate limits of receivers. The default is no limit at all and no backpressure.
///
/// The limits are per receiver: a stream with four receivers and
/// `max_records_per_sec = 10000` ingests at most 40 000 records/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    /// Hard upper bound on the records per second each receiver may store. `None` (the
    /// default) means unlimited. Receivers that exceed it are slowed down, never made to
    /// drop records. It also caps the rate chosen by backpressure. At least 1 when set.
    pub max_records_per_sec: Option<u64>,
    /// Adapt each receiver's rate to what the pipeline actually processes (default `false`).
    /// When on, a PID controller ([`PidRateEstimator`]) looks at every completed batch (how
    /// long it took, how late it started) and lowers the rate when batches fall behind, or
    /// raises it when they keep up. Spark's `spark.streaming.backpressure.enabled`.
    pub backpressure: bool,
    /// Rate (records/s per receiver) used with backpressure before the controller has its
    /// first estimate, i.e. during the first two batches. `None` (the default) means
    /// unlimited until then. Ignored without backpressure. At least 1 when set.
    /// Spark's `spark.streaming.backpressure.initialRate`.
    pub initial_rate: Option<u64>,
    /// Backpressure never lowers a receiver's rate below this many records/s (default 100),
    /// so that batches keep carrying some data to measure. `max_records_per_sec` still wins
    /// if it is lower. At least 1. Spark's `spark.streaming.backpressure.pid.minRate`.
    pub min_rate: u64,
    /// Proportional gain of the controller (default 1.0): how strongly the new rate follows
    /// the difference between the previous rate and the rate at which the last batch was
    /// processed. Too large overshoots, too small reacts slowly. Finite and >= 0.
    pub proportional: f64,
    /// Integral gain (default 0.2): how strongly accumulated lateness (the scheduling delay
    /// of batches, records that should have been processed already) lowers the rate. Larger
    /// values drain a backlog faster but may overshoot. Finite and >= 0.
    pub integral: f64,
    /// Derivative gain (default 0.0, off): reaction to how fast the error changes. Rarely
    /// useful, it tends to make the rate unstable. Finite and >= 0.
    pub derivative: f64,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            max_records_per_sec: None,
            backpressure: false,
            initial_rate: None,
            min_rate: 100,
            proportional: 1.0,
            integral: 0.2,
            derivative: 0.0,
        }
    }
}

impl RateConfig {
    /// The records/s limit a receiver starts with: `max_records_per_sec`, and with backpressure
    /// also `initial_rate` (the smaller of the two when both are set). `None`: unlimited.
    pub fn starting_limit(&self) -> Option<f64> {
        let max = self.max_records_per_sec.map(|r| r as f64);
        if !self.backpressure {
            return max;
        }
        match (max, self.initial_rate) {
            (Some(m), Some(i)) => Some(m.min(i as f64)),
            (m, i) => m.or(i.map(|i| i as f64)),
        }
    }

    /// Checks the limits documented on each field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field (within this section) and what is expected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_records_per_sec == Some(0) {
            return Err(ConfigError::new(
                "max_records_per_sec",
                "must be >= 1 when set",
            ));
        }
        if self.initial_rate == Some(0) {
            return Err(ConfigError::new("initial_rate", "must be >= 1 when set"));
        }
        if self.min_rate < 1 {
            return Err(ConfigError::new("min_rate", "must be >= 1"));
        }
        for (name, gain) in [
            ("proportional", self.proportional),
            ("integral", self.integral),
            ("derivative", self.derivative),
        ] {
            if !(gain.is_finite() && gain >= 0.0) {
                return Err(ConfigError::new(
                    name,
                    format!("= {gain} is invalid: must be finite and >= 0"),
                ));
            }
        }
        Ok(())
    }
}

/// A gain as the estimator uses it: negative or non-finite values (rejected by
/// [`RateConfig::validate`]) count as 0.
fn sane_gain(gain: f64) -> f64 {
    if gain.is_finite() && gain > 0.0 {
        gain
    } else {
        0.0
    }
}

/// Backpressure controller: a port of Spark Streaming's `PIDRateEstimator`.
///
/// After every batch, [`compute`](Self::compute) receives the batch's size and delays and
/// returns the rate (records/s) at which receivers should ingest from now on. The error it
/// corrects is the difference between the rate it proposed last time and the rate at which
/// the batch was actually processed; the scheduling delay (how late the batch started) stands
/// in for the accumulated error.
#[derive(Debug, Clone)]
pub struct PidRateEstimator {
    batch_interval_ms: f64,
    proportional: f64,
    integral: f64,
    derivative: f64,
    min_rate: f64,
    /// Time of the last batch that was taken into account; `None` until the first one.
    latest_time: Option<u64>,
    latest_rate: f64,
    latest_error: f64,
}

impl PidRateEstimator {
    /// An estimator for batches of `batch_interval`, with the gains and minimum rate of
    /// `cfg`. Values [`RateConfig::validate`] rejects do not panic: an interval under 1 ms
    /// counts as 1 ms, invalid gains as 0 and a `min_rate` of 0 as 1.
    #[must_use]
    pub fn new(batch_interval: Duration, cfg: &RateConfig) -> Self {
        let batch_interval_ms = u64::try_from(batch_interval.as_millis()).unwrap_or(u64::MAX);
        Self {
            batch_interval_ms: batch_interval_ms.max(1) as f64,
            proportional: sane_gain(cfg.proportional),
            integral: sane_gain(cfg.integral),
            derivative: sane_gain(cfg.derivative),
            min_rate: cfg.min_rate.max(1) as f64,
            latest_time: None,
            latest_rate: -1.0,
            latest_error: -1.0,
        }
    }

    /// Takes a completed batch into account and returns the new rate in records/s, or
    /// `None` when there is no new estimate.
    ///
    /// - `time_ms`: when the batch completed (any monotonic millisecond clock);
    /// - `num_elements`: records in the batch;
    /// - `processing_delay_ms`: how long processing the batch took;
    /// - `scheduling_delay_ms`: how long the batch waited before its processing started.
    ///
    /// As in Spark, a batch is ignored (`None`, state unchanged) if `time_ms` is not after the
    /// previous batch taken into account, if it is empty, or if its processing delay is 0.
    /// The first batch taken into account only primes the estimator and also returns `None`;
    /// from the second on, the result is at least `min_rate`.
    pub fn compute(
        &mut self,
        time_ms: u64,
        num_elements: u64,
        processing_delay_ms: u64,
        scheduling_delay_ms: u64,
    ) -> Option<f64> {
        if num_elements == 0 || processing_delay_ms == 0 {
            return None;
        }
        if self.latest_time.is_some_and(|latest| time_ms <= latest) {
            return None;
        }
        // Records per second at which this batch was processed.
        let processing_rate = num_elements as f64 / processing_delay_ms as f64 * 1000.0;
        let Some(latest_time) = self.latest_time.replace(time_ms) else {
            // First batch: remember its speed as the reference; no estimate yet.
            self.latest_rate = processing_rate;
            self.latest_error = 0.0;
            return None;
        };
        // Seconds since the previous batch; normally about one batch interval.
        let since_update_secs = (time_ms - latest_time) as f64 / 1000.0;
        // The rate we asked for minus the rate the pipeline managed (records/s).
        let error = self.latest_rate - processing_rate;
        // A scheduling delay of s ms means about s * processing_rate records were left over
        // by earlier batches; spread over one batch interval, that is the extra rate that
        // should not have been admitted. It plays the role of the integral of the error.
        let historical_error =
            scheduling_delay_ms as f64 * processing_rate / self.batch_interval_ms;
        // Change of the error, in records/s².
        let d_error = (error - self.latest_error) / since_update_secs;
        // `f64::max` also turns a NaN (absurd gains overflowing) into `min_rate`.
        let new_rate = (self.latest_rate
            - self.proportional * error
            - self.integral * historical_error
            - self.derivative * d_error)
            .max(self.min_rate);
        self.latest_rate = new_rate;
        self.latest_error = error;
        Some(new_rate)
    }
}

/// Smallest limit a [`RateLimiter`] applies, in records/s: lower values, 0, negative values
/// and NaN are raised to it, so that a waiting caller always gets through eventually.
pub const MIN_LIMIT: f64 = 1.0;

/// The bucket holds at most this many seconds' worth of tokens.
const BURST_SECS: f64 = 1.0;

/// Longest single sleep of a waiting caller; it then looks at the bucket again. Keeps
/// durations far from overflow whatever the debt.
const MAX_SLEEP_SECS: f64 = 3600.0;

/// `limit_bits` value meaning unlimited: the bits of +∞, which no valid limit has.
const UNLIMITED: u64 = 0x7ff0_0000_0000_0000;

fn sanitize_limit(limit: Option<f64>) -> Option<f64> {
    match limit {
        None => None,
        Some(r) if r == f64::INFINITY => None,
        Some(r) if r >= MIN_LIMIT => Some(r),
        // Below the minimum, or NaN.
        Some(_) => Some(MIN_LIMIT),
    }
}

fn encode_limit(limit: Option<f64>) -> u64 {
    limit.map_or(UNLIMITED, f64::to_bits)
}

/// Token bucket state. Tokens are counted with two ever-growing totals rather than a balance,
/// so that each waiting caller can keep its place: a caller that reserved tokens up to the
/// total `reserved` = R may pass once `credited` >= R, whatever the rate does meanwhile.
#[derive(Debug)]
struct Bucket {
    /// Current limit in records/s, `None` if unlimited. Authoritative (the atomic copy in
    /// [`RateLimiter`] is only for the fast path).
    rate: Option<f64>,
    /// Tokens ever added to the bucket (refills, plus the initial full bucket).
    credited: f64,
    /// Tokens ever reserved by callers. `credited - reserved` is the balance, negative when
    /// the bucket is in debt.
    reserved: f64,
    /// When `credited` was last brought up to date.
    last_refill: Instant,
}

impl Bucket {
    /// Adds the tokens earned since `last_refill` at the current rate, up to a full bucket.
    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let elapsed = now
                .saturating_duration_since(self.last_refill)
                .as_secs_f64();
            let room = rate * BURST_SECS - (self.credited - self.reserved);
            if room > 0.0 {
                self.credited += (elapsed * rate).min(room);
            }
        }
        if now > self.last_refill {
            self.last_refill = now;
        }
    }
}

/// An async token bucket limiting the records per second one receiver stores.
///
/// Share it behind an `Arc` between the receiver's `store()` calls and the controller that
/// calls [`set_limit`](Self::set_limit). [`acquire`](Self::acquire) waits until its records
/// may pass; nothing is ever refused or dropped. The bucket holds one second's worth of
/// tokens and starts full. A request larger than that is not refused: it puts the bucket into
/// debt, so it waits until the debt is paid, and so do the callers behind it. Callers pass
/// roughly in the order they arrived.
///
/// When unlimited, [`acquire`](Self::acquire) costs one atomic load.
///
/// `acquire` sleeps with the tokio timer, so it must run inside a tokio runtime with the time
/// driver enabled. Tokens reserved by an `acquire` future that is dropped while waiting are
/// not given back.
#[derive(Debug)]
pub struct RateLimiter {
    /// The limit's `f64` bits, or [`UNLIMITED`]; read without locking by the fast path.
    limit_bits: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Wakes waiting callers when the limit changes, so that they re-plan.
    limit_changed: Notify,
    /// Total time callers spent throttled, in nanoseconds.
    waited_nanos: AtomicU64,
}

impl RateLimiter {
    /// A limiter letting `limit` records per second through, unlimited if `None`.
    ///
    /// `Some(f64::INFINITY)` means unlimited too; limits under [`MIN_LIMIT`] (including 0,
    /// negative values and NaN) are raised to it.
    #[must_use]
    pub fn new(limit: Option<f64>) -> Self {
        let rate = sanitize_limit(limit);
        Self {
            limit_bits: AtomicU64::new(encode_limit(rate)),
            bucket: Mutex::new(Bucket {
                rate,
                credited: rate.map_or(0.0, |r| r * BURST_SECS),
                reserved: 0.0,
                last_refill: Instant::now(),
            }),
            limit_changed: Notify::new(),
            waited_nanos: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Bucket> {
        weir_receiver::lock(&self.bucket)
    }

    /// Changes the limit, effective at once, including for callers already waiting: they
    /// are woken and re-plan their wait at the new rate (all pass at once if the new limit is
    /// `None`). Tokens earned so far at the old rate are kept, up to one second's worth at
    /// the new rate; debt is kept too. Going from unlimited to a limit starts with a full
    /// bucket. Values are sanitised as in [`new`](Self::new).
    pub fn set_limit(&self, limit: Option<f64>) {
        let limit = sanitize_limit(limit);
        {
            let mut bucket = self.lock();
            bucket.refill(Instant::now());
            if let Some(rate) = limit {
                let full = bucket.reserved + rate * BURST_SECS;
                if bucket.rate.is_none() || bucket.credited > full {
                    // Every waiter reserved at most `reserved`, so none is left in debt
                    // by a fresh bucket.
                    bucket.credited = full;
                }
            }
            bucket.rate = limit;
            self.limit_bits
                .store(encode_limit(limit), Ordering::Release);
        }
        self.limit_changed.notify_waiters();
    }

    /// The current limit in records/s, `None` if unlimited.
    #[must_use]
    pub fn limit(&self) -> Option<f64> {
        match self.limit_bits.load(Ordering::Acquire) {
            UNLIMITED => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// Total time callers of [`acquire`](Self::acquire) have spent waiting for tokens.
    #[must_use]
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_nanos.load(Ordering::Relaxed))
    }

    /// Waits until `n` records may pass. Returns at once when unlimited, when `n` is 0, or
    /// when the bucket holds `n` tokens; otherwise reserves the tokens (possibly putting the
    /// bucket into debt) and sleeps until they are earned, about `deficit / rate` seconds.
    pub async fn acquire(&self, n: u64) {
        if n == 0 || self.limit_bits.load(Ordering::Acquire) == UNLIMITED {
            return;
        }
        // Total of `reserved` at which this caller's tokens are all paid for.
        let mut mark: Option<f64> = None;
        let mut wait_start: Option<Instant> = None;
        loop {
            let (sleep, limit_changed) = {
                let mut bucket = self.lock();
                let Some(rate) = bucket.rate else {
                    break;
                };
                let now = Instant::now();
                bucket.refill(now);
                let mark = *mark.get_or_insert_with(|| {
                    bucket.reserved += n as f64;
                    bucket.reserved
                });
                let owed = mark - bucket.credited;
                if owed <= 0.0 {
                    break;
                }
                wait_start.get_or_insert(now);
                let secs = (owed / rate).min(MAX_SLEEP_SECS);
                // Registered before the lock is released: a `set_limit` after this point
                // wakes it.
                let limit_changed = self.limit_changed.notified();
                (Duration::from_secs_f64(secs), limit_changed)
            };
            // Either the time is up or the limit changed: look at the bucket again.
            let _ = tokio::time::timeout(sleep, limit_changed).await;
        }
        if let Some(start) = wait_start {
            let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.waited_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starting_limit_is_the_smaller_of_max_and_initial_with_backpressure() {
        let c = |backpressure, max, initial| RateConfig {
            backpressure,
            max_records_per_sec: max,
            initial_rate: initial,
            ..RateConfig::default()
        };
        assert_eq!(c(false, None, Some(10)).starting_limit(), None);
        assert_eq!(c(false, Some(50), Some(10)).starting_limit(), Some(50.0));
        assert_eq!(c(true, Some(50), Some(10)).starting_limit(), Some(10.0));
        assert_eq!(c(true, Some(5), Some(10)).starting_limit(), Some(5.0));
        assert_eq!(c(true, None, Some(10)).starting_limit(), Some(10.0));
        assert_eq!(c(true, Some(7), None).starting_limit(), Some(7.0));
        assert_eq!(c(true, None, None).starting_limit(), None);
    }
    use std::sync::Arc;

    fn cfg(kp: f64, ki: f64, kd: f64, min_rate: u64) -> RateConfig {
        RateConfig {
            backpressure: true,
            proportional: kp,
            integral: ki,
            derivative: kd,
            min_rate,
            ..RateConfig::default()
        }
    }

    #[test]
    fn rate_config_defaults_validate_and_serde() {
        let c = RateConfig::default();
        assert_eq!(c.max_records_per_sec, None);
        assert!(!c.backpressure);
        assert_eq!(c.initial_rate, None);
        assert_eq!(c.min_rate, 100);
        assert_eq!((c.proportional, c.integral, c.derivative), (1.0, 0.2, 0.0));
        assert_eq!(c.validate(), Ok(()));

        let parsed: RateConfig =
            serde_json::from_str(r#"{"backpressure": true, "max_records_per_sec": 5000}"#).unwrap();
        assert_eq!(
            parsed,
            RateConfig {
                backpressure: true,
                max_records_per_sec: Some(5000),
                ..RateConfig::default()
            }
        );
        assert!(serde_json::from_str::<RateConfig>(r#"{"max_rate": 1}"#).is_err());
        let round: RateConfig =
            serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(round, parsed);

        let bad = |c: RateConfig, field: &str| {
            let err = c.validate().unwrap_err();
            assert_eq!(err.key, field, "{err:?} should name {field}");
        };
        let d = RateConfig::default;
        bad(RateConfig { min_rate: 0, ..d() }, "min_rate");
        bad(
            RateConfig {
                max_records_per_sec: Some(0),
                ..d()
            },
            "max_records_per_sec",
        );
        bad(
            RateConfig {
                initial_rate: Some(0),
                ..d()
            },
            "initial_rate",
        );
        bad(
            RateConfig {
                proportional: -1.0,
                ..d()
            },
            "proportional",
        );
        bad(
            RateConfig {
                integral: f64::NAN,
                ..d()
            },
            "integral",
        );
        bad(
            RateConfig {
                derivative: f64::INFINITY,
                ..d()
            },
            "derivative",
        );
    }

    #[test]
    fn pid_first_estimate_is_the_processing_rate() {
        let mut pid = PidRateEstimator::new(Duration::from_millis(20), &cfg(1.0, 0.2, 0.0, 10));
        // The first batch primes the estimator (as in Spark).
        assert_eq!(pid.compute(0, 10, 10, 0), None);
        // 10 records in 10 ms: 1000 records/s.
        assert_eq!(pid.compute(10, 10, 10, 0), Some(1000.0));
    }

    #[test]
    fn pid_follows_processing_speed_without_scheduling_delay() {
        // With no scheduling delay only the proportional term acts, and with kp = 1 the
        // estimate is exactly the last processing rate, up or down.
        for increasing in [true, false] {
            let mut pid = PidRateEstimator::new(Duration::from_millis(20), &cfg(1.0, 1.0, 0.0, 10));
            for i in 0..50u64 {
                let elements = if increasing {
                    (i + 1) * 20
                } else {
                    (50 - i) * 20
                };
                let got = pid.compute(i * 20, elements, 20, 0);
                if i == 0 {
                    assert_eq!(got, None);
                } else {
                    assert_eq!(got, Some(elements as f64 * 50.0), "batch {i}");
                }
            }
        }
    }

    #[test]
    fn pid_rate_drops_when_scheduling_delay_grows() {
        let mut pid = PidRateEstimator::new(Duration::from_secs(1), &cfg(1.0, 0.2, 0.0, 100));
        // Steady 1000 records/s processing speed throughout.
        assert_eq!(pid.compute(1_000, 1_000, 1_000, 0), None);
        assert_eq!(pid.compute(2_000, 1_000, 1_000, 0), Some(1000.0));
        // 500 ms late: historical error 500 * 1000 / 1000 = 500; 1000 - 0.2 * 500 = 900.
        let r1 = pid.compute(3_000, 1_000, 1_000, 500).unwrap();
        assert!((r1 - 900.0).abs() < 1e-9, "{r1}");
        // 2 s late: error = 900 - 1000 = -100; 900 + 100 - 0.2 * 2000 = 600.
        let r2 = pid.compute(4_000, 1_000, 1_000, 2_000).unwrap();
        assert!((r2 - 600.0).abs() < 1e-9, "{r2}");
        // Always below the processing speed while batches are late.
        let r3 = pid.compute(5_000, 1_000, 1_000, 4_000).unwrap();
        assert!(r3 < 1000.0 && r3 < r1, "{r3}");
    }

    #[test]
    fn pid_never_goes_below_min_rate() {
        let mut pid = PidRateEstimator::new(Duration::from_millis(20), &cfg(1.0, 1.0, 0.0, 5));
        // One record per batch, 20 ms processing, always 100 ms late.
        let results: Vec<_> = (0..50).map(|i| pid.compute(i * 20, 1, 20, 100)).collect();
        assert_eq!(results[0], None);
        assert!(results[1..].iter().all(|r| *r == Some(5.0)), "{results:?}");
    }

    #[test]
    fn pid_ignores_bad_inputs() {
        let mut pid = PidRateEstimator::new(Duration::from_millis(20), &cfg(1.0, 0.2, 0.0, 10));
        // Nothing counts as a first batch until a valid one arrives.
        assert_eq!(pid.compute(0, 0, 10, 0), None);
        assert_eq!(pid.compute(0, 10, 0, 0), None);
        assert_eq!(pid.compute(0, 10, 10, 0), None); // primes
        assert_eq!(pid.compute(10, 0, 10, 0), None); // empty batch
        assert_eq!(pid.compute(10, 10, 0, 0), None); // no processing delay
        assert_eq!(pid.compute(0, 10, 10, 0), None); // time going back
        assert_eq!(pid.compute(10, 10, 10, 0), Some(1000.0));
        assert_eq!(pid.compute(10, 10, 10, 0), None); // same time again
        assert_eq!(pid.compute(20, 20, 10, 0), Some(2000.0));

        // Invalid configuration and interval do not panic; the result stays >= min rate.
        let wild = RateConfig {
            proportional: f64::NAN,
            integral: -3.0,
            derivative: f64::INFINITY,
            min_rate: 0,
            ..RateConfig::default()
        };
        let mut pid = PidRateEstimator::new(Duration::ZERO, &wild);
        assert_eq!(pid.compute(0, 1, 1, u64::MAX), None);
        let r = pid.compute(u64::MAX, u64::MAX, 1, u64::MAX).unwrap();
        assert!(r >= 1.0, "{r}");
    }

    #[test]
    fn rate_limiter_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
        assert_send_sync::<Arc<RateLimiter>>();
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_is_instant() {
        let limiter = RateLimiter::new(None);
        let start = Instant::now();
        for _ in 0..1000 {
            limiter.acquire(u64::MAX).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(limiter.waited(), Duration::ZERO);
        assert_eq!(limiter.limit(), None);
        assert_eq!(RateLimiter::new(Some(f64::INFINITY)).limit(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn limited_rate_is_enforced() {
        let limiter = RateLimiter::new(Some(10_000.0));
        let start = Instant::now();
        for _ in 0..4 {
            limiter.acquire(5_000).await;
        }
        // 20 000 records at 10 000/s with a full bucket of 10 000 to start with: 1 s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_secs(2),
            "{elapsed:?}"
        );
        assert!(
            limiter.waited() >= Duration::from_millis(990),
            "{:?}",
            limiter.waited()
        );

        // A further second's worth takes another second: the burst is not refilled for free.
        let start = Instant::now();
        limiter.acquire(10_000).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1100),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn set_limit_from_none_to_some_and_back() {
        let limiter = Arc::new(RateLimiter::new(None));
        limiter.set_limit(Some(1_000.0));
        assert_eq!(limiter.limit(), Some(1_000.0));

        let start = Instant::now();
        limiter.acquire(1_000).await; // the fresh bucket is full
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.acquire(1_000).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1100),
            "{elapsed:?}"
        );

        // A waiter needing 100 s is released as soon as the limit is lifted.
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move {
                let start = Instant::now();
                limiter.acquire(100_000).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        limiter.set_limit(None);
        assert_eq!(limiter.limit(), None);
        let waited = waiter.await.unwrap();
        assert!(waited <= Duration::from_millis(20), "{waited:?}");

        // Limited again: a full bucket, the old debt is forgotten.
        limiter.set_limit(Some(1_000.0));
        let start = Instant::now();
        limiter.acquire(1_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_shortens_current_waits() {
        let limiter = Arc::new(RateLimiter::new(Some(100.0)));
        limiter.acquire(100).await; // empty the bucket
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move {
                let start = Instant::now();
                limiter.acquire(1_000).await; // 10 s at 100/s
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        // 100 tokens earned so far, 900 to go: 0.09 s at 10 000/s.
        limiter.set_limit(Some(10_000.0));
        let waited = waiter.await.unwrap();
        assert!(
            waited >= Duration::from_millis(1_080) && waited <= Duration::from_millis(1_200),
            "{waited:?}"
        );

        // Lowering it lengthens them.
        limiter.acquire(10_000).await; // empty the bucket
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move {
                let start = Instant::now();
                limiter.acquire(1_000).await; // 0.1 s at 10 000/s
                start.elapsed()
            })
        };
        tokio::task::yield_now().await;
        limiter.set_limit(Some(100.0)); // now 10 s
        let waited = waiter.await.unwrap();
        assert!(
            waited >= Duration::from_millis(9_900) && waited <= Duration::from_millis(10_100),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn huge_request_goes_into_debt_and_later_callers_wait() {
        let limiter = Arc::new(RateLimiter::new(Some(1_000.0)));
        let start = Instant::now();
        let big = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move {
                limiter.acquire(10_000).await; // 10 s worth, 1 s of it in the bucket
                start.elapsed()
            })
        };
        tokio::task::yield_now().await; // let it reserve first
        limiter.acquire(1).await;
        let small_done = start.elapsed();
        let big_done = big.await.unwrap();
        // The big request waits for its own deficit, about (n - burst) / rate = 9 s...
        assert!(
            big_done >= Duration::from_millis(8_990) && big_done <= Duration::from_millis(9_100),
            "{big_done:?}"
        );
        // ...and the caller behind it waits until the debt is paid.
        assert!(small_done >= big_done, "{small_done:?} < {big_done:?}");
        assert!(small_done <= Duration::from_millis(9_100), "{small_done:?}");
        assert!(limiter.waited() >= Duration::from_millis(17_980));
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_limits_are_sanitised() {
        for bad in [0.0, -5.0, f64::NAN, f64::NEG_INFINITY, 1e-300] {
            let limiter = RateLimiter::new(Some(bad));
            assert_eq!(limiter.limit(), Some(MIN_LIMIT));
            limiter.set_limit(Some(bad));
            assert_eq!(limiter.limit(), Some(MIN_LIMIT));
        }
        // At the minimum rate a request still gets through, in n / MIN_LIMIT seconds at most.
        let limiter = RateLimiter::new(Some(0.0));
        let start = Instant::now();
        limiter.acquire(3).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1_990) && elapsed <= Duration::from_millis(2_100),
            "{elapsed:?}"
        );
        // The largest request does not overflow anything: it just waits (in chunks).
        let limiter = Arc::new(RateLimiter::new(Some(1.0)));
        let huge = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.acquire(u64::MAX).await })
        };
        tokio::time::sleep(Duration::from_secs(10_000)).await;
        assert!(!huge.is_finished());
        limiter.set_limit(None);
        huge.await.unwrap();
    }
}
