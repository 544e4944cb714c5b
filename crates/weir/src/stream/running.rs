//! The running engine as its owner sees it: [`RunningContext`] (metrics, failure, one batch on
//! demand) and the graceful stop (receivers drained, the last blocks allocated and processed,
//! completions committed, the tracker closed).

use super::*;

/// What a graceful stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// The last completed batch.
    pub completed_through: Option<u64>,
    /// Receivers that did not return within the stop timeout (abandoned).
    pub receivers_abandoned: Vec<String>,
}

/// A running engine. Stop it with [`stop`](Self::stop); dropping it stops everything abruptly
/// (like a crash, and as safe: what was acknowledged is in the WAL; pending `store()` calls
/// fail). After a drop the data directory stays locked until the engine's last tasks (a running
/// job, say) have ended; `stop` releases it before it returns.
pub struct RunningContext {
    pub(super) engine: Arc<Engine>,
    pub(super) receivers_stop: ShutdownTrigger,
    pub(super) clock_stop: ShutdownTrigger,
    pub(super) supervisors: Vec<(Arc<str>, JoinHandle<()>)>,
    pub(super) writer_task: Option<JoinHandle<()>>,
    pub(super) processor: Option<JoinHandle<()>>,
    pub(super) block_timer: Option<JoinHandle<()>>,
    pub(super) clock: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningContext").finish_non_exhaustive()
    }
}

impl RunningContext {
    /// The effective `node_id` (see [`StreamingConfig::node_id`]).
    pub fn node_id(&self) -> &str {
        &self.engine.node_id
    }

    /// Every metric of the engine, its receivers and its WAL.
    pub fn metrics(&self) -> MetricsRegistry {
        self.engine.registry.clone()
    }

    /// The fatal error that stopped the engine, if any.
    pub fn failure(&self) -> Option<String> {
        self.engine.failed()
    }

    /// The last completed batch time.
    pub fn completed_through(&self) -> Option<u64> {
        *self.engine.completed.borrow()
    }

    /// Allocates a batch now and waits until it (and every batch before it) completed. The only
    /// way batches happen with [`ClockMode::Manual`]; also usable with the interval clock.
    ///
    /// # Errors
    /// [`EngineError::Failed`] if the engine failed before the batch completed;
    /// [`EngineError::NoSpace`] if the tracker could not record the batch for lack of disk space
    /// (nothing is lost: the same allocation is tried again at the next call).
    pub async fn run_batch(&self) -> Result<u64, EngineError> {
        for (_, g) in &self.engine.generators {
            g.cut();
        }
        self.engine.writer.flush().await;
        let e = self.engine.clone();
        let t = tokio::task::spawn_blocking(move || e.allocate())
            .await
            .map_err(|e| EngineError::Failed(format!("allocation panicked: {e}")))??;
        let Some(t) = t else {
            return Err(EngineError::NoSpace(
                "the tracker's commit is waiting for disk space; call run_batch again".into(),
            ));
        };
        self.wait_completed(t).await?;
        Ok(t)
    }

    async fn wait_completed(&self, t: u64) -> Result<(), EngineError> {
        let mut done = self.engine.completed.subscribe();
        let mut failure = self.engine.failure.subscribe();
        loop {
            if done.borrow_and_update().is_some_and(|c| c >= t) {
                return Ok(());
            }
            if let Some(f) = self.engine.failed() {
                return Err(EngineError::Failed(f));
            }
            tokio::select! {
                r = done.changed() => if r.is_err() { return Err(EngineError::Failed("engine gone".into())) },
                _ = failure.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Stops gracefully: stops the receivers (waiting up to `receiver_stop_timeout_ms`), makes
    /// every accepted record durable, processes every durable block in a final batch, persists
    /// the completions and closes the WAL.
    ///
    /// # Errors
    /// [`EngineError::Failed`] if the engine had failed (nothing acknowledged is lost: restart
    /// to recover), [`EngineError::Incomplete`] if a job kept failing on the last batch.
    pub async fn stop(mut self) -> Result<StopReport, EngineError> {
        let e = self.engine.clone();
        self.receivers_stop.trigger();
        let timeout = Duration::from_millis(e.config.receiver_stop_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut abandoned = Vec::new();
        for (name, h) in std::mem::take(&mut self.supervisors) {
            let abort = h.abort_handle();
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                tracing::warn!(receiver = %name, "receiver did not stop in time; abandoning it");
                abort.abort();
                abandoned.push(name.to_string());
            }
        }
        for (_, g) in &e.generators {
            g.close();
        }
        e.writer.flush().await;
        self.clock_stop.trigger();
        for h in [self.clock.take(), self.block_timer.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.await;
        }
        e.stopping.store(true, Relaxed);
        let has_unallocated = e.writer.has_unallocated() || lock(&e.pending_alloc).is_some();
        if has_unallocated && e.failed().is_none() {
            let e2 = e.clone();
            let _ = tokio::task::spawn_blocking(move || e2.allocate()).await;
        }
        lock(&e.queue).take();
        if let Some(p) = self.processor.take() {
            let _ = p.await;
        }
        let commit = {
            let e2 = e.clone();
            tokio::task::spawn_blocking(move || e2.commit_completions())
                .await
                .map_err(|err| EngineError::Failed(format!("final commit panicked: {err}")))?
        };
        if let Some(w) = self.writer_task.take() {
            w.abort();
            let _ = w.await;
        }
        // Close the tracker and the WAL now (not when the last reference goes), so that the data
        // directory can be opened again as soon as `stop` returns.
        lock(&e.tracker).take();
        let closed = e.wal.close();
        if let Some(f) = e.failed() {
            return Err(EngineError::Failed(f));
        }
        if let Some((time, reason)) = lock(&e.incomplete).take() {
            return Err(EngineError::Incomplete { time, reason });
        }
        commit?;
        closed?;
        let completed_through = *e.completed.borrow();
        Ok(StopReport {
            completed_through,
            receivers_abandoned: abandoned,
        })
    }
}

impl Drop for RunningContext {
    fn drop(&mut self) {
        self.receivers_stop.trigger();
        self.clock_stop.trigger();
        for (_, h) in &self.supervisors {
            h.abort();
        }
        for h in [
            &self.writer_task,
            &self.processor,
            &self.block_timer,
            &self.clock,
        ]
        .into_iter()
        .flatten()
        {
            h.abort();
        }
        lock(&self.engine.queue).take();
        for (_, g) in &self.engine.generators {
            g.abort();
        }
    }
}
