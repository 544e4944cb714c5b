//! Runs one receiver and restarts it with exponential backoff when it fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_receiver::{DynReceiver, ReceiverContext, ReceiverHost, Shutdown};

use crate::stream::metrics::ReceiverMetrics;

/// A run longer than this counts as healthy: the next failure starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

pub(crate) struct Supervised {
    pub(crate) name: Arc<str>,
    pub(crate) receiver: DynReceiver,
    pub(crate) host: Arc<dyn ReceiverHost>,
    pub(crate) shutdown: Shutdown,
    pub(crate) metrics: Arc<ReceiverMetrics>,
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) async fn supervise(s: Supervised) {
    let mut backoff = weir_receiver::Backoff::new(s.initial, s.max);
    let mut attempt = 0u32;
    loop {
        if s.shutdown.is_requested() {
            break;
        }
        let ctx = ReceiverContext::new(s.name.clone(), s.host.clone(), s.shutdown.clone(), attempt);
        s.metrics.running.set(1);
        let started = Instant::now();
        // A separate task, so that a panic in the receiver is caught as a JoinError; aborted
        // with the supervisor.
        let run = tokio::spawn(s.receiver.run(ctx));
        let _abort = AbortOnDrop(run.abort_handle());
        let outcome = run.await;
        s.metrics.running.set(0);
        let failure = match outcome {
            Ok(Ok(())) => {
                tracing::info!(receiver = %s.name, "receiver finished");
                break;
            }
            Ok(Err(e)) => e.to_string(),
            Err(join) if join.is_panic() => {
                let p = join.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic payload".into());
                format!("panicked: {msg}")
            }
            Err(_) => "cancelled".to_string(),
        };
        if s.shutdown.is_requested() {
            tracing::info!(receiver = %s.name, error = %failure, "receiver ended during shutdown");
            break;
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        s.metrics.restarts.inc();
        s.metrics.note_error(&failure);
        attempt = attempt.saturating_add(1);
        tracing::warn!(
            receiver = %s.name, error = %failure, restart_in_ms = delay.as_millis() as u64, attempt,
            "receiver failed; restarting"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = s.shutdown.requested() => break,
        }
    }
}
