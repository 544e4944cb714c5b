//! Behaviour of the write-ahead log: appends, reads, scans, rolling, cleanup, locking, fsync
//! failure, full disk, fsync policies and recovery. Tests that do not need a fault run against
//! both the real file storage and the simulated disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_wal::sim::{Fault, SimStorage, Tear};
use weir_wal::{
    segment_name, CleanupThreshold, FsyncPolicy, RecoveryMode, Storage, Wal, WalConfig, WalError,
    WalPosition,
};

fn payload(i: usize, len: usize) -> Bytes {
    (0..len)
        .map(|j| (i.wrapping_mul(131) ^ j.wrapping_mul(7)) as u8 | 1)
        .collect::<Vec<u8>>()
        .into()
}

fn small_segments() -> WalConfig {
    WalConfig {
        segment_max_bytes: 4096,
        ..WalConfig::default()
    }
}

/// Runs `f` against a real directory and against the simulated disk.
fn on_both(f: impl Fn(Arc<dyn Storage>)) {
    let dir = tempfile::tempdir().unwrap();
    f(Arc::new(weir_wal::FileStorage::new(dir.path()).unwrap()));
    f(Arc::new(SimStorage::new()));
}

fn scan_all(wal: &Wal) -> Vec<Bytes> {
    wal.scan(WalPosition::START)
        .map(|r| r.unwrap().payload)
        .collect()
}

/// Waits for `cond` with a deadline (never sleeps for correctness).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn appended_records_read_back_by_handle_and_by_scan() {
    on_both(|storage| {
        let (wal, report) = Wal::open(storage, WalConfig::default()).unwrap();
        assert_eq!(report.records, 0);
        let sizes = [0usize, 1, 100, 4096, 70_000];
        let handles: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| wal.append(payload(i, n)).wait().unwrap())
            .collect();
        for (i, h) in handles.iter().enumerate() {
            assert_eq!(wal.read(*h).unwrap(), payload(i, sizes[i]));
            assert_eq!(h.len as usize, sizes[i]);
        }
        let scanned: Vec<_> = wal.scan(WalPosition::START).map(|r| r.unwrap()).collect();
        assert_eq!(
            scanned.iter().map(|r| r.handle).collect::<Vec<_>>(),
            handles
        );
        // A scan can start at any record.
        let from_third: Vec<_> = wal
            .scan(handles[2].position())
            .map(|r| r.unwrap().handle)
            .collect();
        assert_eq!(from_third, handles[2..]);
        let after_last: Vec<_> = wal.scan(handles[4].next_position()).collect();
        assert!(after_last.is_empty());
    });
}

#[test]
fn reopening_returns_every_record_in_order() {
    on_both(|storage| {
        let mut expected = Vec::new();
        for round in 0..3 {
            let (wal, report) = Wal::open(Arc::clone(&storage), small_segments()).unwrap();
            assert_eq!(report.records as usize, expected.len(), "round {round}");
            assert!(report.torn_tails.is_empty() && report.corrupt.is_empty());
            assert_eq!(scan_all(&wal), expected);
            for i in 0..40 {
                let p = payload(round * 100 + i, 10 + i * 13);
                wal.append(p.clone()).wait().unwrap();
                expected.push(p);
            }
            wal.close().unwrap();
        }
    });
}

#[test]
fn concurrent_appenders_share_fsyncs_and_keep_their_order() {
    let disk = SimStorage::new();
    disk.set_sync_delay(Duration::from_millis(2));
    let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
    let wal = Arc::new(wal);
    let threads = 32;
    let per_thread = 40;
    let before = wal.metrics().snapshot();
    std::thread::scope(|s| {
        for t in 0..threads {
            let wal = Arc::clone(&wal);
            s.spawn(move || {
                let mut last = None;
                for i in 0..per_thread {
                    let h = wal.append(payload(t * 1000 + i, 100)).wait().unwrap();
                    // One appender's records appear in the order it appended them.
                    assert!(Some(h.position()) > last);
                    last = Some(h.position());
                }
            });
        }
    });
    let m = wal.metrics().snapshot();
    let appends = m.appends - before.appends;
    let fsyncs = m.fsyncs - before.fsyncs;
    assert_eq!(appends, (threads * per_thread) as u64);
    assert!(
        fsyncs * 4 < appends,
        "group commit should share fsyncs: {fsyncs} fsyncs for {appends} appends"
    );
    assert_eq!(scan_all(&wal).len(), threads * per_thread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_can_be_awaited_from_async_tasks() {
    let (wal, _) = Wal::open(Arc::new(SimStorage::new()), WalConfig::default()).unwrap();
    let wal = Arc::new(wal);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let wal = Arc::clone(&wal);
        tasks.push(tokio::spawn(async move {
            let mut hs = Vec::new();
            for i in 0..20 {
                hs.push(wal.append(payload(t * 100 + i, 64)).await.unwrap());
            }
            hs
        }));
    }
    let mut n = 0;
    for t in tasks {
        for h in t.await.unwrap() {
            assert_eq!(wal.read(h).unwrap().len(), 64);
            n += 1;
        }
    }
    assert_eq!(n, 320);
}

#[test]
fn segments_roll_at_the_configured_size_and_survive_a_crash() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    let mut hs = Vec::new();
    for i in 0..50 {
        hs.push(wal.append(payload(i, 500)).wait().unwrap());
    }
    let segs = wal.segments();
    assert!(segs.len() >= 6, "50 x 508 B in 4 KiB segments: {segs:?}");
    for name in disk.file_names().iter().filter(|n| n.ends_with(".wal")) {
        assert!(
            disk.contents(name).unwrap().len() <= 4096,
            "{name} exceeds the segment size"
        );
    }
    // Every acknowledged record is durable, including the directory entries of new segments.
    disk.crash(Tear::None);
    drop(wal);
    let (wal, report) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    assert_eq!(report.records, 50);
    let back: Vec<_> = wal
        .scan(WalPosition::START)
        .map(|r| r.unwrap().handle)
        .collect();
    assert_eq!(back, hs);
}

#[test]
fn a_record_larger_than_a_segment_gets_a_segment_of_its_own() {
    on_both(|storage| {
        let (wal, _) = Wal::open(storage, small_segments()).unwrap();
        let a = wal.append(payload(1, 100)).wait().unwrap();
        let big = wal.append(payload(2, 10_000)).wait().unwrap();
        let c = wal.append(payload(3, 100)).wait().unwrap();
        assert!(big.segment > a.segment && c.segment > big.segment);
        assert_eq!(wal.read(big).unwrap(), payload(2, 10_000));
    });
}

#[test]
fn oversized_records_are_rejected_up_front() {
    let cfg = WalConfig {
        max_record_bytes: 1000,
        ..WalConfig::default()
    };
    let (wal, _) = Wal::open(Arc::new(SimStorage::new()), cfg).unwrap();
    match wal.append(payload(0, 1001)).wait() {
        Err(WalError::RecordTooLarge {
            len: 1001,
            max: 1000,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(wal.append(payload(0, 1000)).wait().is_ok());
}

#[test]
fn a_second_opener_gets_a_clear_lock_error() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open_dir(dir.path(), WalConfig::default()).unwrap();
    let err = Wal::open_dir(dir.path(), WalConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WalError::Locked { .. }), "{err:?}");
    assert!(
        msg.contains("in use") && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    // Released by close(), even while the Wal value is still around (e.g. shared by readers).
    wal.close().unwrap();
    let (again, _) = Wal::open_dir(dir.path(), WalConfig::default()).unwrap();
    drop(again);
    drop(wal);
    // And on drop.
    let (wal, _) = Wal::open_dir(dir.path(), WalConfig::default()).unwrap();
    drop(wal);
    assert!(Wal::open_dir(dir.path(), WalConfig::default()).is_ok());
}

#[test]
fn a_failed_fsync_stops_the_log_without_acknowledging() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
    let ok = wal.append(payload(0, 10)).wait().unwrap();
    disk.fail_syncs(Fault::Eio, 1);
    let err = wal.append(payload(1, 10)).wait().unwrap_err();
    assert!(
        matches!(err, WalError::Fatal(ref m) if m.contains("fdatasync")),
        "{err}"
    );
    // Everything after is refused too: no retry that could ack data the kernel dropped.
    assert!(matches!(
        wal.append(payload(2, 10)).wait(),
        Err(WalError::Fatal(_))
    ));
    assert_eq!(wal.metrics().snapshot().fatal, 1);
    assert!(wal.fatal_error().is_some());
    assert!(wal.close().is_err());
    drop(wal);
    // Recovery brings back what was acknowledged.
    disk.crash(Tear::None);
    let (wal, _) = Wal::open(Arc::new(disk), WalConfig::default()).unwrap();
    let back: Vec<_> = wal.scan(WalPosition::START).map(|r| r.unwrap()).collect();
    assert_eq!(back[0].handle, ok);
    assert!(back.iter().all(|r| r.payload != payload(2, 10)));
}

#[test]
fn a_failed_write_is_fatal_too() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
    disk.fail_writes(Fault::Eio, 1);
    assert!(matches!(
        wal.append(payload(1, 10)).wait(),
        Err(WalError::Fatal(_))
    ));
    assert!(matches!(
        wal.append(payload(2, 10)).wait(),
        Err(WalError::Fatal(_))
    ));
}

#[test]
fn a_full_disk_makes_appends_wait_then_succeed_without_loss() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
    let wal = Arc::new(wal);
    let first = wal.append(payload(0, 100)).wait().unwrap();
    // Leave room for only part of the next batch: a partial write, then ENOSPC.
    disk.set_capacity(Some(disk.used_bytes() + 150));
    let appender = {
        let wal = Arc::clone(&wal);
        std::thread::spawn(move || {
            (1..=5)
                .map(|i| wal.append(payload(i, 100)))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|f| f.wait())
                .collect::<Vec<_>>()
        })
    };
    wait_until("the writer to wait for space", || {
        wal.metrics().snapshot().waiting_for_space == 1
    });
    let retries_before = wal.metrics().snapshot().enospc_retries;
    wait_until("a retry", || {
        wal.metrics().snapshot().enospc_retries > retries_before
    });
    assert!(
        !appender.is_finished(),
        "nothing may be acknowledged while the disk is full"
    );
    disk.set_capacity(None);
    let results = appender.join().unwrap();
    assert_eq!(wal.metrics().snapshot().waiting_for_space, 0);
    let mut expected = vec![payload(0, 100)];
    for (i, r) in results.into_iter().enumerate() {
        let h = r.unwrap();
        assert_eq!(wal.read(h).unwrap(), payload(i + 1, 100));
        expected.push(payload(i + 1, 100));
    }
    assert_eq!(wal.read(first).unwrap(), payload(0, 100));
    assert_eq!(scan_all(&wal), expected);
    drop(wal);
    disk.crash(Tear::None);
    let (wal, report) = Wal::open(Arc::new(disk), WalConfig::default()).unwrap();
    assert!(report.corrupt.is_empty());
    assert_eq!(scan_all(&wal), expected);
}

#[test]
fn closing_while_the_disk_is_full_fails_the_waiting_appends() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
    disk.set_capacity(Some(disk.used_bytes()));
    let f = wal.append(payload(0, 100));
    wait_until("the writer to wait for space", || {
        wal.metrics().snapshot().waiting_for_space == 1
    });
    wal.close().unwrap();
    assert!(matches!(f.wait(), Err(WalError::Closed)));
}

#[test]
fn appends_after_close_are_refused() {
    let (wal, _) = Wal::open(Arc::new(SimStorage::new()), WalConfig::default()).unwrap();
    wal.close().unwrap();
    assert!(matches!(
        wal.append(payload(0, 1)).wait(),
        Err(WalError::Closed)
    ));
}

#[test]
fn a_torn_tail_is_truncated_on_recovery_and_appends_continue() {
    for keep in [1usize, 5, 8, 9, 60, 107] {
        let disk = SimStorage::new();
        let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
        let acked: Vec<_> = (0..3)
            .map(|i| {
                wal.append(payload(i, 100)).wait().unwrap();
                payload(i, 100)
            })
            .collect();
        // The next write reaches the disk partially; its fsync never happens.
        disk.fail_syncs(Fault::Eio, 1);
        assert!(wal.append(payload(9, 100)).wait().is_err());
        disk.crash(Tear::Prefix { keep });
        drop(wal);
        let (wal, report) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
        if keep < 108 {
            assert_eq!(report.torn_tails.len(), 1, "keep {keep}");
            assert_eq!(report.torn_tails[0].2, keep as u64);
        }
        assert!(report.corrupt.is_empty());
        assert_eq!(scan_all(&wal), acked);
        let h = wal.append(payload(10, 100)).wait().unwrap();
        assert_eq!(wal.read(h).unwrap(), payload(10, 100));
    }
}

#[test]
fn a_zero_filled_torn_write_is_truncated() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), WalConfig::default()).unwrap();
    wal.append(payload(0, 100)).wait().unwrap();
    disk.fail_syncs(Fault::Eio, 1);
    let _ = wal.append(payload(1, 3000)).wait();
    disk.crash(Tear::PrefixThenZeros {
        keep: 2000,
        zeros_from: 12,
    });
    drop(wal);
    let (wal, report) = Wal::open(Arc::new(disk), WalConfig::default()).unwrap();
    assert_eq!(report.torn_tails.len(), 1);
    assert_eq!(scan_all(&wal), vec![payload(0, 100)]);
}

#[test]
fn recovery_is_idempotent_across_a_crash_during_recovery() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    for i in 0..20 {
        wal.append(payload(i, 300)).wait().unwrap();
    }
    disk.fail_syncs(Fault::Eio, 1);
    let _ = wal.append(payload(99, 300)).wait();
    disk.crash(Tear::Prefix { keep: 150 });
    drop(wal);
    let snapshot: Vec<_> = disk.file_names();
    // Recovery dies at its first fsync (after truncating the torn tail)...
    disk.fail_syncs(Fault::Eio, 1);
    let err = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err}");
    // ...and the process dies with it. The next recovery ends where a clean one would.
    disk.crash(Tear::None);
    assert_eq!(disk.file_names(), snapshot);
    let (wal, report) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    assert_eq!(report.records, 20);
    assert_eq!(report.torn_tails.len(), 1);
    let end = report.end;
    let records = scan_all(&wal);
    drop(wal);
    // Crash right after a completed recovery: recovering again changes nothing.
    disk.crash(Tear::None);
    let (wal, report) = Wal::open(Arc::new(disk), small_segments()).unwrap();
    assert!(report.torn_tails.is_empty());
    assert_eq!(report.end, end);
    assert_eq!(scan_all(&wal), records);
}

#[test]
fn a_segment_whose_creation_failed_is_made_durable_before_it_is_reused() {
    // A roll creates the next segment (header written and fsynced), but the directory fsync
    // fails: the log stops, and the new segment's name is not durable. The log is reopened
    // without a crash and appends into that segment; what it acknowledges must survive a crash.
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    for i in 0..7 {
        wal.append(payload(i, 500)).wait().unwrap();
    }
    let segments = wal.segments().len();
    disk.fail_dir_syncs(Fault::Eio, 1);
    let err = wal.append(payload(100, 3000)).wait().unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
    drop(wal);
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    assert_eq!(
        wal.segments().len(),
        segments + 1,
        "the new segment is reused"
    );
    let h = wal.append(payload(200, 100)).wait().unwrap();
    drop(wal);
    disk.crash(Tear::None);
    let (wal, _) = Wal::open(Arc::new(disk), small_segments()).unwrap();
    assert_eq!(wal.read(h).unwrap(), payload(200, 100));
}

#[test]
fn a_half_created_segment_is_removed_on_recovery() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    for i in 0..7 {
        wal.append(payload(i, 500)).wait().unwrap();
    }
    let segs = wal.segments();
    drop(wal);
    // A segment whose creation was cut off after 10 header bytes.
    let next = segs.last().unwrap() + 1;
    disk.put_file(
        &segment_name(next),
        &weir_wal::codec::encode_header(next)[..10],
    );
    let (wal, report) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    assert_eq!(report.removed_segments, vec![next]);
    assert!(report.corrupt.is_empty());
    assert_eq!(scan_all(&wal).len(), 7);
}

#[test]
fn damage_fails_strict_recovery_naming_segment_and_offset() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    let hs: Vec<_> = (0..30)
        .map(|i| wal.append(payload(i, 200)).wait().unwrap())
        .collect();
    drop(wal);
    let victim = hs[4];
    assert!(disk.flip_bit(&segment_name(victim.segment), victim.offset + 20, 3));
    let err = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap_err();
    match &err {
        WalError::Corruption {
            segment, offset, ..
        } => {
            assert_eq!((*segment, *offset), (victim.segment, victim.offset));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("skip_corrupt"),
        "the error says what to do: {err}"
    );
}

#[test]
fn skip_corrupt_reports_exactly_what_was_lost_and_keeps_the_rest() {
    let disk = SimStorage::new();
    let cfg = WalConfig {
        recovery: RecoveryMode::SkipCorrupt,
        ..small_segments()
    };
    let (wal, _) = Wal::open(Arc::new(disk.clone()), cfg.clone()).unwrap();
    let hs: Vec<_> = (0..30)
        .map(|i| wal.append(payload(i, 200)).wait().unwrap())
        .collect();
    drop(wal);
    let victim = hs[4];
    assert!(disk.flip_bit(&segment_name(victim.segment), victim.offset + 50, 0));
    let (wal, report) = Wal::open(Arc::new(disk.clone()), cfg).unwrap();
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.records_lost(), 1);
    assert!(report.records_lost_exact());
    assert_eq!(report.bytes_lost(), 208);
    assert_eq!(report.corrupt[0].offset, victim.offset);
    let m = wal.metrics().snapshot();
    assert_eq!((m.corrupt_records, m.corrupt_bytes), (1, 208));
    // The scan steps over the damage; a read of the damaged handle reports it.
    let back: Vec<_> = wal
        .scan(WalPosition::START)
        .map(|r| r.unwrap().handle)
        .collect();
    let mut expected = hs.clone();
    expected.remove(4);
    assert_eq!(back, expected);
    assert!(matches!(wal.read(victim), Err(WalError::Corruption { .. })));
    // New appends continue.
    let h = wal.append(payload(100, 10)).wait().unwrap();
    assert_eq!(wal.read(h).unwrap(), payload(100, 10));
}

#[test]
fn scans_step_over_adjacent_damaged_records() {
    let disk = SimStorage::new();
    let cfg = WalConfig {
        recovery: RecoveryMode::SkipCorrupt,
        ..WalConfig::default()
    };
    let (wal, _) = Wal::open(Arc::new(disk.clone()), cfg.clone()).unwrap();
    let hs: Vec<_> = (0..6)
        .map(|i| wal.append(payload(i, 50 + i)).wait().unwrap())
        .collect();
    drop(wal);
    // Two neighbours, each with a damaged length field (their extents are recovered).
    for h in &hs[2..4] {
        assert!(disk.flip_bit(&segment_name(h.segment), h.offset, 0));
    }
    let (wal, report) = Wal::open(Arc::new(disk), cfg).unwrap();
    assert_eq!(report.corrupt.len(), 2, "{:?}", report.corrupt);
    assert_eq!(report.records_lost(), 2);
    let back: Vec<_> = wal
        .scan(WalPosition::START)
        .map(|r| r.unwrap().handle)
        .collect();
    assert_eq!(back, [hs[0], hs[1], hs[4], hs[5]]);
}

#[test]
fn cleanup_deletes_old_segments_but_never_the_active_or_a_pinned_one() {
    on_both(|storage| {
        let (wal, _) = Wal::open(Arc::clone(&storage), small_segments()).unwrap();
        let hs: Vec<_> = (0..40)
            .map(|i| wal.append(payload(i, 500)).wait().unwrap())
            .collect();
        let segs = wal.segments();
        assert!(segs.len() >= 5);
        let pin = wal.pin(segs[1]);
        let report = wal
            .cleanup(CleanupThreshold {
                before: Some(hs[30].position()),
                ..CleanupThreshold::default()
            })
            .unwrap();
        assert_eq!(report.kept_pinned, vec![segs[1]]);
        assert!(report.deleted.contains(&segs[0]) && !report.deleted.contains(&segs[1]));
        assert!(report.deleted.iter().all(|&s| s < hs[30].segment));
        assert!(matches!(wal.read(hs[0]), Err(WalError::NotFound { .. })));
        assert_eq!(wal.read(hs[30]).unwrap(), payload(30, 500));
        drop(pin);
        // A threshold beyond everything still keeps the active segment.
        let report = wal
            .cleanup(CleanupThreshold {
                before: Some(WalPosition {
                    segment: u64::MAX,
                    offset: 0,
                }),
                ..CleanupThreshold::default()
            })
            .unwrap();
        assert!(report.deleted.contains(&segs[1]));
        let active = *wal.segments().last().unwrap();
        assert_eq!(wal.segments(), vec![active]);
        assert!(!storage
            .list()
            .unwrap()
            .iter()
            .any(|n| n == &segment_name(segs[0])));
        let m = wal.metrics().snapshot();
        assert_eq!(m.segments, 1);
        drop(wal);
        let (wal, report) = Wal::open(storage, small_segments()).unwrap();
        assert!(report.corrupt.is_empty());
        assert!(wal.scan(WalPosition::START).all(|r| r.is_ok()));
    });
}

#[test]
fn cleanup_by_age_uses_modification_times_and_is_durable() {
    let disk = SimStorage::new();
    let (wal, _) = Wal::open(Arc::new(disk.clone()), small_segments()).unwrap();
    for i in 0..10 {
        wal.append(payload(i, 500)).wait().unwrap();
    }
    let old = wal.segments();
    disk.advance_clock(Duration::from_secs(3600));
    let cutoff = disk.now();
    disk.advance_clock(Duration::from_secs(3600));
    for i in 10..20 {
        wal.append(payload(i, 500)).wait().unwrap();
    }
    let report = wal
        .cleanup(CleanupThreshold {
            older_than: Some(cutoff),
            ..CleanupThreshold::default()
        })
        .unwrap();
    // The last old segment may have received new records after the cutoff.
    assert!(!report.deleted.is_empty());
    assert!(report.deleted.iter().all(|s| old.contains(s)));
    let kept = wal.segments();
    drop(wal);
    disk.crash(Tear::None);
    let (wal, _) = Wal::open(Arc::new(disk), small_segments()).unwrap();
    assert_eq!(wal.segments(), kept, "deletions were made durable");
}

#[test]
fn fsync_never_acks_before_syncing_and_says_so() {
    let disk = SimStorage::new();
    let cfg = WalConfig {
        fsync: FsyncPolicy::Never,
        ..WalConfig::default()
    };
    assert!(!cfg.fsync.acks_are_durable());
    let (wal, _) = Wal::open(Arc::new(disk.clone()), cfg.clone()).unwrap();
    let syncs = disk.stats().syncs;
    for i in 0..10 {
        wal.append(payload(i, 100)).wait().unwrap();
    }
    assert_eq!(
        disk.stats().syncs,
        syncs,
        "policy never: no fsync per append"
    );
    // An acknowledged record is lost by a crash: that is what this policy means.
    disk.crash(Tear::None);
    drop(wal);
    let (wal, _) = Wal::open(Arc::new(disk.clone()), cfg).unwrap();
    assert!(scan_all(&wal).is_empty());
    // But a clean close fsyncs.
    wal.append(payload(0, 100)).wait().unwrap();
    wal.close().unwrap();
    drop(wal);
    disk.crash(Tear::None);
    let (wal, _) = Wal::open(Arc::new(disk), WalConfig::default()).unwrap();
    assert_eq!(scan_all(&wal), vec![payload(0, 100)]);
}

#[test]
fn fsync_interval_syncs_when_the_interval_runs_out() {
    let disk = SimStorage::new();
    let cfg = WalConfig {
        fsync: FsyncPolicy::Interval { ms: 20 },
        ..WalConfig::default()
    };
    let (wal, _) = Wal::open(Arc::new(disk.clone()), cfg).unwrap();
    let syncs = disk.stats().syncs;
    wal.append(payload(0, 100)).wait().unwrap();
    wait_until("the interval fsync", || disk.stats().syncs > syncs);
    disk.crash(Tear::None);
    drop(wal);
    let (wal, _) = Wal::open(Arc::new(disk), WalConfig::default()).unwrap();
    assert_eq!(scan_all(&wal), vec![payload(0, 100)]);
}

#[test]
fn invalid_config_is_rejected() {
    let cfg = WalConfig {
        segment_max_bytes: 100,
        ..WalConfig::default()
    };
    let err = Wal::open(Arc::new(SimStorage::new()), cfg).unwrap_err();
    assert!(err.to_string().contains("segment_max_bytes"), "{err}");
}
