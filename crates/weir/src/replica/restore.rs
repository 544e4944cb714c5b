//! Before recovery, with replication on: the local side of ownership. Locks the data
//! directory's replica files, decides between *continuing* (the directory holds this node's
//! state and nobody has taken the `node_id` over since it last ran), *adopting* (the directory
//! is empty, or an adoption was interrupted: rebuild it from the replica) and *refusing* (the
//! directory is stale: another process took the `node_id` over since), then takes the `node_id`
//! over. Adoption writes the replica's state into the WAL and the tracker, so that the normal
//! recovery that follows re-runs the incomplete batches with exactly their blocks.
//!
//! Local files, in `<data_dir>/replica/`: `LOCK` (held while the engine runs), `epoch` (the
//! epoch this directory last took, written before the replica's is raised) and `adopting`
//! (present while an adoption is incomplete: the next start wipes the half-restored state and
//! adopts again).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_wal::{FileStorage, LockGuard, Storage, Wal, WalConfig};

use super::{Replica, ReplicaError, ReplicaState};
use crate::block::codec::DecodedBlock;
use crate::stream::metrics::Metrics;
use crate::stream::EngineError;
use crate::tracker::{BlockRef, Commit, Tracker};

/// What [`prepare`] did.
pub(crate) struct Prepared {
    pub(crate) epoch: u64,
    /// Held for the engine's life.
    pub(crate) lock: Box<dyn LockGuard>,
    /// Remove once the first snapshot is written (the adoption is then complete).
    pub(crate) adopting: Option<PathBuf>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> EngineError + 'a {
    move |source| EngineError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// True if the directory holds engine state (a WAL segment or a tracker).
fn has_state(dir: &Path) -> bool {
    if dir.join("tracker.redb").exists() {
        return true;
    }
    std::fs::read_dir(dir.join("wal")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| weir_wal::parse_segment_name(&e.file_name().to_string_lossy()).is_some())
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Retries `op` while the replica is unreachable (logging), so that a node started while its
/// replica is down waits for it rather than failing.
async fn patiently<T, F, Fut>(
    replica: &dyn Replica,
    what: &str,
    mut op: F,
) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ReplicaError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(ReplicaError::Unavailable(e)) => {
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(10) {
                    tracing::warn!(replica = %replica.describe(), error = %e, attempts, "{what}: waiting for the replica");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(EngineError::Replica(format!("{what}: {e}"))),
        }
    }
}

/// Takes `node_id` over for the data directory `dir` (see the module docs).
pub(crate) async fn prepare(
    dir: &Path,
    node_id: &str,
    replica: &Arc<dyn Replica>,
    wal_config: &WalConfig,
    metrics: &Metrics,
) -> Result<Prepared, EngineError> {
    let local = dir.join("replica");
    std::fs::create_dir_all(&local).map_err(io("creating", &local))?;
    let lock = FileStorage::new(&local)
        .and_then(|s| s.lock())
        .map_err(io("locking", &local))?;
    let epoch_file = local.join("epoch");
    let marker = local.join("adopting");
    let owner = patiently(&**replica, "reading the owner", || replica.owner()).await?;
    let interrupted = marker.exists();
    if interrupted {
        tracing::warn!(dir = %dir.display(), "an adoption was interrupted: wiping its half-restored state and adopting again");
        let wal = dir.join("wal");
        if wal.exists() {
            std::fs::remove_dir_all(&wal).map_err(io("removing", &wal))?;
        }
        let t = dir.join("tracker.redb");
        if t.exists() {
            std::fs::remove_file(&t).map_err(io("removing", &t))?;
        }
    }
    let adopt = match (&owner, has_state(dir)) {
        (Some(_), false) => true,
        (None, _) => false,
        (Some(o), true) => {
            let ours: Option<u64> = std::fs::read_to_string(&epoch_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            match ours {
                Some(e) if e >= o.epoch => false,
                ours => {
                    return Err(EngineError::Replica(format!(
                        "the data directory {} is stale: node_id {node_id} was taken over in \
                         the replica ({}) by epoch {} since this directory last owned it ({}); \
                         its state would overwrite newer acknowledgements. Move the directory \
                         away and start again to adopt the node's state from the replica",
                        dir.display(),
                        replica.describe(),
                        o.epoch,
                        ours.map_or("never".into(), |e| format!("epoch {e}"))
                    )))
                }
            }
        }
    };
    // An adopting node keeps the owner's instance token: destinations it claimed admit us.
    let identity = if adopt {
        let o = owner.as_ref().expect("adopting means an owner");
        write_synced(&marker, b"adopting\n").map_err(io("writing", &marker))?;
        crate::identity::adopt(dir, node_id, &o.instance)?
    } else {
        crate::identity::resolve(dir, Some(node_id))?
    };
    let before = |e: u64| write_synced(&epoch_file, format!("{e}\n").as_bytes());
    let taken = patiently(&**replica, "taking the node_id over", || {
        replica.take_over(&identity.instance, &before)
    })
    .await?;
    metrics.replica_epoch.set(taken.epoch);
    tracing::info!(
        node_id, epoch = taken.epoch, replica = %replica.describe(), adopt,
        "took the node_id over in the replica"
    );
    if adopt {
        let t0 = Instant::now();
        let state = ReplicaState::rebuild(&taken.entries)
            .map_err(|e| EngineError::Replica(e.to_string()))?;
        let (dir, wal_config) = (dir.to_path_buf(), wal_config.clone());
        let (blocks, batches) =
            tokio::task::spawn_blocking(move || write_local(&dir, &state, wal_config))
                .await
                .map_err(|e| EngineError::Recovery(format!("adoption task failed: {e}")))??;
        metrics.adopted_blocks.inc_by(blocks);
        metrics.adopted_batches.inc_by(batches);
        metrics.adoption_ms.set(t0.elapsed().as_millis() as u64);
        tracing::info!(
            node_id,
            blocks,
            incomplete_batches = batches,
            entries = taken.entries.len(),
            ms = t0.elapsed().as_millis() as u64,
            "adopted the node's state from the replica"
        );
    }
    Ok(Prepared {
        epoch: taken.epoch,
        lock,
        adopting: adopt.then_some(marker),
    })
}

/// Writes the replica's state into an empty data directory: blocks into the WAL (incomplete
/// batches first, in time order, then the unallocated ones), allocations into the tracker.
fn write_local(
    dir: &Path,
    state: &ReplicaState,
    wal_config: WalConfig,
) -> Result<(u64, u64), EngineError> {
    let wal_dir = dir.join("wal");
    std::fs::create_dir_all(&wal_dir).map_err(io("creating", &wal_dir))?;
    let (wal, _) = Wal::open_dir(&wal_dir, wal_config)?;
    let tracker = Tracker::open(&dir.join("tracker.redb"), true)?;
    let mut blocks = 0u64;
    let decode = |b: &bytes::Bytes| {
        DecodedBlock::decode(b.clone())
            .map_err(|e| EngineError::Replica(format!("a replicated block does not decode: {e}")))
    };
    for (time, (bs, direct)) in &state.batches {
        let mut refs = Vec::with_capacity(bs.len());
        let mut checkpoints = std::collections::BTreeMap::new();
        let mut end = None;
        // Appended together, waited for together: one group commit, not an fsync per block.
        let appends: Vec<_> = bs.iter().map(|b| wal.append(b.clone())).collect();
        for (b, a) in bs.iter().zip(appends) {
            let d = decode(b)?;
            let h = a.wait()?;
            end = Some(h.next_position());
            checkpoints.insert(d.receiver.to_string(), d.checkpoint.clone());
            refs.push(BlockRef::in_wal(h, d.record_count, d.receiver.clone()));
            blocks += 1;
        }
        let end = end.unwrap_or_else(|| wal.end_position());
        let cps: Vec<(&str, &weir_receiver::Checkpoint)> =
            checkpoints.iter().map(|(k, v)| (k.as_str(), v)).collect();
        tracker.commit(&Commit {
            allocate: Some((*time, &refs, end)),
            direct,
            completed_through: state.completed_through,
            checkpoints: cps,
            forget_before: None,
        })?;
    }
    if state.batches.is_empty() && state.completed_through.is_some() {
        tracker.commit(&Commit {
            completed_through: state.completed_through,
            ..Commit::default()
        })?;
    }
    for b in &state.unallocated {
        decode(b)?;
    }
    let appends: Vec<_> = state
        .unallocated
        .iter()
        .map(|b| wal.append(b.clone()))
        .collect();
    for a in appends {
        a.wait()?;
        blocks += 1;
    }
    wal.close()?;
    drop(tracker);
    Ok((blocks, state.batches.len() as u64))
}
