//! Processing: the batch clock, the block timer, the processing loop (batches in time order,
//! each job retried with backoff until it passes), and the rate controller's feed.

use super::*;

impl Engine {
    /// Runs `attempt` (a step of batch `t`: a job, or reading its direct ranges) on a blocking
    /// thread until it succeeds, retrying after a doubling backoff and counting each failure in
    /// `failures`. False if it gave up: the engine failed, or the step failed 3 more times
    /// during a stop (the batch then stays incomplete and re-runs at the next start).
    pub(super) async fn retry(
        self: &Arc<Self>,
        t: u64,
        what: &str,
        failures: &prometheus_client::metrics::counter::Counter,
        attempt: Arc<dyn Fn() -> Result<(), StepError> + Send + Sync>,
    ) -> bool {
        let mut backoff = weir_receiver::Backoff::new(
            Duration::from_millis(self.config.job_retry_initial_ms),
            Duration::from_millis(self.config.job_retry_max_ms),
        );
        let mut failures_while_stopping = 0;
        loop {
            let a = attempt.clone();
            let (err, no_space) = match tokio::task::spawn_blocking(move || a()).await {
                Ok(Ok(())) => {
                    self.metrics.space.succeeded(Place::Output);
                    return true;
                }
                Ok(Err(e)) => (e.message, e.no_space),
                Err(e) => (format!("panicked: {e}"), false),
            };
            failures.inc();
            let delay = backoff.next_delay();
            if no_space {
                // Logged once as an error, then as a reminder, while the episode lasts.
                self.metrics
                    .space
                    .failed(Place::Output, &format!("batch {t}, {what}: {err}"));
            } else {
                tracing::error!(batch = t, step = what, error = %err, retry_in_ms = delay.as_millis() as u64, "batch step failed; retrying it on the same batch");
            }
            if self.stopping.load(Relaxed) {
                failures_while_stopping += 1;
                if failures_while_stopping >= 3 {
                    *lock(&self.incomplete) = Some((t, format!("{what}: {err}")));
                    return false;
                }
            }
            if self.failed().is_some() {
                return false;
            }
            tokio::time::sleep(delay).await;
        }
    }

    pub(super) fn window(&self, time: u64, n: usize) -> Batch {
        let (times, blocks) = lock(&self.schedule).window(time, n);
        Batch::new(
            time,
            Arc::from(times),
            Arc::from(blocks),
            self.source.clone(),
            self.node_id.clone(),
        )
    }

    pub(super) async fn clock_loop(self: Arc<Self>, stop: weir_receiver::Shutdown) {
        let i = self.config.batch_interval_ms;
        let first = i - now_ms() % i;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_millis(first),
            Duration::from_millis(i),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.requested() => return,
            }
            let e = self.clone();
            match tokio::task::spawn_blocking(move || e.allocate()).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return,
                Err(e) => {
                    self.fail(format!("batch allocation panicked: {e}"));
                    return;
                }
            }
        }
    }

    pub(super) async fn block_timer(self: Arc<Self>, stop: weir_receiver::Shutdown) {
        let period = Duration::from_millis(self.config.block_interval_ms);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.requested() => return,
            }
            for (_, g) in &self.generators {
                g.cut();
            }
        }
    }

    pub(super) async fn process_loop(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<u64>) {
        while let Some(t) = queue.recv().await {
            if self.failed().is_some() {
                return;
            }
            if !self.process(t).await {
                // Stopping with a batch that would not complete: leave it for the next start.
                return;
            }
        }
    }

    /// Runs every job on batch `t`; true once the batch completed.
    pub(super) async fn process(self: &Arc<Self>, t: u64) -> bool {
        let started = now_ms();
        let t0 = Instant::now();
        // With a replica, the allocation is there before any output sees the batch.
        let written = lock(&self.replicated).remove(&t);
        if let Some(w) = written {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.fail(format!("recording batch {t} in the replica: {e}"));
                    return false;
                }
                Err(_) => return false,
            }
        }
        if !self.direct.is_empty() {
            let e = self.clone();
            let read = Arc::new(move || e.fetch_direct(t).map_err(StepError::from));
            let failures = &self.metrics.direct_read_failures;
            if !self.retry(t, "reading direct ranges", failures, read).await {
                return false;
            }
        }
        let Some(blocks) = lock(&self.schedule).batches.get(&t).cloned() else {
            tracing::error!(batch = t, "batch to process is not remembered");
            return false;
        };
        let batch = Batch::new(
            t,
            Arc::from([t]),
            blocks.clone(),
            self.source.clone(),
            self.node_id.clone(),
        );
        for job in &self.jobs {
            let view = if job.window > 1 {
                self.window(t, job.window)
            } else {
                batch.clone()
            };
            let f = job.f.clone();
            let run = Arc::new(move || {
                f(&view).map_err(|e| StepError {
                    no_space: crate::space::is_no_space(&*e),
                    message: e.to_string(),
                })
            });
            let what = format!("job {}", job.name);
            if !self.retry(t, &what, &self.metrics.job_failures, run).await {
                return false;
            }
        }
        let processing = t0.elapsed().as_millis() as u64;
        let scheduling = started.saturating_sub(t);
        let m = &self.metrics;
        m.processing_delay_ms.set(processing);
        m.scheduling_delay_ms.set(scheduling);
        m.total_delay_ms.set(scheduling + processing);
        let l = &m.latency;
        l.batch_processing.observe(t0.elapsed().as_secs_f64());
        l.batch_scheduling.observe(scheduling as f64 / 1000.0);
        l.batch_total
            .observe(scheduling as f64 / 1000.0 + t0.elapsed().as_secs_f64());
        m.batches_completed.inc();
        m.batch_records.inc_by(batch.count());
        m.last_completed_batch_ms.set(t);
        m.batch_completed(crate::stream::BatchSummary {
            time: t,
            records: batch.count(),
            scheduling_ms: scheduling,
            processing_ms: processing,
        });
        // Receivers first: whoever sees the batch completed then also sees it in their
        // completed checkpoints.
        self.receivers_completed(t);
        self.completed.send_replace(Some(t));
        if !self.direct.is_empty() {
            self.direct_completed(t).await;
        }
        if self.config.rate.backpressure {
            self.update_rates(&blocks, processing, scheduling);
        }
        true
    }

    /// Hands each receiver its checkpoint as of the batches through `t` (all complete now).
    fn receivers_completed(&self, t: u64) {
        let mut all = lock(&self.batch_checkpoints);
        let rest = all.split_off(&(t + 1));
        let done = std::mem::replace(&mut *all, rest);
        for cps in done.into_values() {
            for (name, cp) in cps {
                if let Some((_, g)) = self.generators.iter().find(|(n, _)| *n == name) {
                    g.batch_completed(&cp);
                }
            }
        }
    }

    pub(super) fn update_rates(&self, blocks: &[BlockRef], processing_ms: u64, scheduling_ms: u64) {
        let mut per: HashMap<&str, u64> = HashMap::new();
        for b in blocks {
            *per.entry(&b.receiver).or_default() += u64::from(b.records);
        }
        let mut pid = lock(&self.pid);
        for (name, g) in &self.generators {
            let Some(est) = pid.get_mut(name) else {
                continue;
            };
            let n = per.get(&**name).copied().unwrap_or(0);
            if let Some(rate) = est.compute(now_ms(), n, processing_ms.max(1), scheduling_ms) {
                let max = self.config.rate.max_records_per_sec.map(|m| m as f64);
                let limit = max.map_or(rate, |m| m.min(rate));
                g.limiter.set_limit(Some(limit));
                self.metrics.receiver(name).rate_limit.set(limit as u64);
            }
        }
    }
}
