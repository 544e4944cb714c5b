//! `--source socket`: producers connected to a `frames` socket receiver, acknowledged by the node
//! (the cumulative durable count it writes back).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use weir_receiver::lock;

use super::{Feed, Producer, Shared};
use crate::node::free_port;
use crate::verify::record;

/// Producers sending frames to the node's socket receiver on a free loopback port.
pub struct SocketFeed {
    addr: SocketAddr,
    producers: u32,
}

impl SocketFeed {
    /// `producers` connections sending at once.
    pub fn new(producers: u32) -> Result<SocketFeed, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        Ok(SocketFeed {
            addr: ([127, 0, 0, 1], port).into(),
            producers,
        })
    }
}

impl Feed for SocketFeed {
    fn name(&self) -> &'static str {
        "socket"
    }

    fn receiver(&self) -> String {
        format!(
            "[[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"{}\"\nprotocol = \"frames\"\n",
            self.addr
        )
    }

    fn start(&mut self, shared: &Shared) -> Result<Vec<Producer>, String> {
        Ok((0..self.producers)
            .map(|_| {
                let (addr, shared) = (self.addr, shared.clone());
                std::thread::spawn(move || {
                    producer(addr, &shared);
                    Ok(())
                })
            })
            .collect())
    }

    fn duplicates(&self) -> &'static str {
        "resent after a kill"
    }
}

/// One producer: sends frames, reads cumulative acks, reconnects and resends the unacked.
fn producer(addr: SocketAddr, shared: &Shared) {
    let Shared {
        ledger,
        next_id,
        stop,
        done_sending,
    } = shared;
    let mut unacked: Vec<u64> = Vec::new();
    while !stop.load(SeqCst) {
        let Ok(mut conn) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(Duration::from_millis(20)));
        // This connection's records, in send order: resends first.
        let mut on_conn: Vec<u64> = std::mem::take(&mut unacked);
        let mut acked_on_conn = 0usize;
        let mut written = 0usize;
        let mut ack_buf = [0u8; 8];
        let mut ack_fill = 0;
        let broken = loop {
            if stop.load(SeqCst) {
                break false;
            }
            // Keep up to 2,000 records in flight on this connection.
            if on_conn.len() - acked_on_conn < 2_000 && !done_sending.load(SeqCst) {
                for _ in 0..200 {
                    let id = next_id.fetch_add(1, SeqCst);
                    on_conn.push(id);
                    lock(ledger).sent_below(id + 1);
                }
            }
            let mut frame = Vec::new();
            for id in &on_conn[written..] {
                let p = record(*id);
                frame.extend_from_slice(&(p.len() as u32).to_be_bytes());
                frame.extend_from_slice(p.as_bytes());
            }
            if !frame.is_empty() {
                if conn.write_all(&frame).is_err() {
                    break true;
                }
                written = on_conn.len();
            }
            match conn.read(&mut ack_buf[ack_fill..]) {
                Ok(0) => break true,
                Ok(n) => {
                    ack_fill += n;
                    if ack_fill == 8 {
                        ack_fill = 0;
                        let count = u64::from_be_bytes(ack_buf) as usize;
                        if count > on_conn.len() {
                            eprintln!("crash-harness: PROTOCOL ERROR: ack {count} > {} records sent on this connection", on_conn.len());
                            std::process::exit(1);
                        }
                        let mut l = lock(ledger);
                        for id in &on_conn[acked_on_conn.min(count)..count] {
                            l.ack(*id);
                        }
                        acked_on_conn = acked_on_conn.max(count);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if done_sending.load(SeqCst) && acked_on_conn == on_conn.len() {
                        break false;
                    }
                }
                Err(_) => break true,
            }
        };
        unacked = on_conn[acked_on_conn..].to_vec();
        if !broken && unacked.is_empty() && done_sending.load(SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
