//! [`Backoff`]: the one exponential backoff of weir's retry and reconnect loops.

use std::time::Duration;

/// Exponential backoff with jitter, for retry and reconnect loops.
///
/// The step starts at `initial` and doubles after every delay, up to `max`; [`reset`] starts
/// over (after a success). Each delay is the step plus a random fraction of up to a quarter of
/// it, so that many clients failing at once (receivers of several nodes losing the same broker,
/// say) do not retry in lockstep, while no delay is shorter than the schedule promises: a
/// delay lies in `[step, step * 1.25]`.
///
/// ```
/// use std::time::Duration;
/// use weir_receiver::Backoff;
///
/// let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// let first = b.next_delay();
/// assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
/// assert_eq!(b.step(), Duration::from_millis(200));
/// b.reset();
/// assert_eq!(b.step(), Duration::from_millis(100));
/// ```
///
/// [`reset`]: Backoff::reset
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max` (at least `initial`).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            step: initial,
        }
    }

    /// The next delay (the current step with jitter), then doubles the step up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        let quarter = u64::try_from(step.as_nanos() / 4).unwrap_or(u64::MAX);
        step.saturating_add(Duration::from_nanos(fastrand::u64(0..=quarter)))
    }

    /// The step the next delay is based on (without jitter).
    pub fn step(&self) -> Duration {
        self.step
    }

    /// True once the step has reached `max`.
    pub fn at_max(&self) -> bool {
        self.step >= self.max
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_max_with_bounded_jitter() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(80));
        let mut steps = Vec::new();
        for _ in 0..6 {
            let step = b.step();
            let d = b.next_delay();
            assert!(d >= step && d <= step + step / 4, "{d:?} for step {step:?}");
            steps.push(step);
        }
        assert_eq!(steps, [ms(10), ms(20), ms(40), ms(80), ms(80), ms(80)]);
        assert!(b.at_max());
        b.reset();
        assert_eq!(b.step(), ms(10));
        // Jittered: a hundred delays of one step are not all the same.
        let delays: std::collections::HashSet<Duration> = (0..100)
            .map(|_| Backoff::new(ms(100), ms(100)).next_delay())
            .collect();
        assert!(delays.len() > 1);
        // A max below initial is raised to it.
        assert!(Backoff::new(ms(50), ms(1)).next_delay() >= ms(50));
    }
}
