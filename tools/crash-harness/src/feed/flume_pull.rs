//! `--source flume-pull`: Flume agents pushing to an in-process pull sink, which the node's
//! `flume_pull` receiver polls; events count as acknowledged when the sink answered the push `OK`
//! (the sink then holds them until the node acks them durable).

use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use weir_node::sink::{PullSink, PullSinkConfig};

use super::flume::start_agents;
use super::{Feed, Producer, Shared};

/// The pull sink (in this process: it is not what is being killed) and the agents pushing to
/// it.
pub struct FlumePullFeed {
    // Dropped before the runtime it runs on.
    sink: PullSink,
    _rt: tokio::runtime::Runtime,
    producers: u32,
}

impl FlumePullFeed {
    /// Starts the sink, its queue under `work_dir/sink`; `producers` agents will push to it.
    pub fn new(producers: u32, work_dir: &Path) -> Result<FlumePullFeed, String> {
        // The sink runs on a runtime of its own; its transactions time out after 3 s, so a
        // batch a killed node held comes back soon.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut c = PullSinkConfig {
            data_dir: work_dir.join("sink"),
            ..PullSinkConfig::default()
        };
        c.push.address = "127.0.0.1:0".into();
        c.pull.address = "127.0.0.1:0".into();
        c.queue.tx_timeout_ms = 3000;
        c.queue.empty_wait_ms = 200;
        let sink = rt.block_on(PullSink::start(c)).map_err(|e| e.to_string())?;
        Ok(FlumePullFeed {
            sink,
            _rt: rt,
            producers,
        })
    }

    fn queued(&self) -> u64 {
        self.sink.queue().stats().events_queued.load(SeqCst)
    }
}

impl Feed for FlumePullFeed {
    fn name(&self) -> &'static str {
        "flume-pull"
    }

    fn receiver(&self) -> String {
        format!(
            "[[receiver]]\nname = \"pulled\"\ntype = \"flume_pull\"\naddresses = [\"{}\"]\nworkers = 2\n\
             max_batch = 500\npoll_interval_ms = 50\nreconnect_backoff_max_ms = 500\n",
            self.sink.pull_addr
        )
    }

    fn start(&mut self, shared: &Shared) -> Result<Vec<Producer>, String> {
        Ok(start_agents(self.sink.push_addr, self.producers, shared))
    }

    /// Waits until the node has acked everything the sink holds (it acks only what is durable
    /// in its WAL; batches a killed node held come back after the sink's timeout).
    fn drain(&mut self) -> Result<(), String> {
        let t0 = Instant::now();
        while self.queued() > 0 {
            if t0.elapsed() > Duration::from_secs(90) {
                println!(
                    "  the sink still holds {} unacked events after 90 s",
                    self.queued()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn duplicates(&self) -> &'static str {
        "served again after a kill, at-least-once"
    }
}
