//! `--source flume`: Flume agents (`appendBatch` calls) pushing to the node's Flume Avro source;
//! a call's events count as acknowledged when it is answered `OK`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use weir_receiver::lock;

use super::{Feed, Producer, Shared};
use crate::node::free_port;
use crate::verify::record;

/// Events per `appendBatch` call of the Flume producers.
const FLUME_BATCH: u64 = 100;

/// Flume agents pushing to the node's Avro source on a free loopback port.
pub struct FlumeFeed {
    addr: SocketAddr,
    producers: u32,
}

impl FlumeFeed {
    /// `producers` agents pushing at once.
    pub fn new(producers: u32) -> Result<FlumeFeed, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        Ok(FlumeFeed {
            addr: ([127, 0, 0, 1], port).into(),
            producers,
        })
    }
}

impl Feed for FlumeFeed {
    fn name(&self) -> &'static str {
        "flume"
    }

    fn receiver(&self) -> String {
        format!(
            "[[receiver]]\nname = \"flume\"\ntype = \"flume\"\naddress = \"{}\"\n",
            self.addr
        )
    }

    fn start(&mut self, shared: &Shared) -> Result<Vec<Producer>, String> {
        Ok(start_agents(self.addr, self.producers, shared))
    }

    fn duplicates(&self) -> &'static str {
        "resent after a kill"
    }
}

/// Starts `producers` Flume agents pushing to `addr`.
pub fn start_agents(addr: SocketAddr, producers: u32, shared: &Shared) -> Vec<Producer> {
    (0..producers)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || flume_producer(addr, &shared))
        })
        .collect()
}

/// One Flume agent: `appendBatch` calls of numbered events, one at a time; a call answered `OK`
/// acknowledges its events; after `FAILED`, an error or a broken connection the same events are
/// sent again (on a new connection).
fn flume_producer(addr: SocketAddr, shared: &Shared) -> Result<(), String> {
    use weir_flume::flume::{self, Status, AVRO_SOURCE_LEGACY};
    use weir_flume::ipc::client::Client;
    use weir_flume::ipc::frame::FrameLimits;
    use weir_flume::ipc::protocol::Protocol;

    let Shared {
        ledger,
        next_id,
        stop,
        done_sending,
    } = shared;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let protocol = Protocol::parse(AVRO_SOURCE_LEGACY).map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut pending: Vec<u64> = Vec::new();
        while !stop.load(SeqCst) {
            let limits = FrameLimits {
                max_frame_bytes: 1 << 24,
                max_buffers: 1 << 12,
            };
            let timeout = Duration::from_secs(10);
            let address = addr.to_string();
            let Ok(mut conn) =
                Client::connect(&address, protocol.clone(), false, limits, timeout).await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            loop {
                if stop.load(SeqCst) {
                    return Ok(());
                }
                if pending.is_empty() {
                    if done_sending.load(SeqCst) {
                        return Ok(());
                    }
                    let first = next_id.fetch_add(FLUME_BATCH, SeqCst);
                    pending = (first..first + FLUME_BATCH).collect();
                    lock(ledger).sent_below(first + FLUME_BATCH);
                }
                let events: Vec<(Vec<(String, String)>, bytes::Bytes)> = pending
                    .iter()
                    .map(|id| (Vec::new(), bytes::Bytes::from(record(*id))))
                    .collect();
                let params = flume::encode_append_batch(&events);
                let status = match conn.call(flume::APPEND_BATCH, &params).await {
                    Ok(Ok(mut r)) => Status::decode(&mut r).ok(),
                    Ok(Err(_)) | Err(_) => None,
                };
                match status {
                    Some(Status::Ok) => {
                        let mut l = lock(ledger);
                        for id in pending.drain(..) {
                            l.ack(id);
                        }
                    }
                    // FAILED: the node could not make them durable; send them again.
                    Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    // No answer: the node died; reconnect and send them again.
                    None => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}
