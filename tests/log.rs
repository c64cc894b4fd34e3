//! The storage engine as a whole: reopen, crash recovery, dedup, locking,
//! retention. Crashes are simulated by dropping a `Log` without `close`
//! (the next open verifies the tail) or by SIGKILL of a child process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bida::log::record::{encode_headers, InnerMsgId, Message};
use bida::log::{
    DedupWindow, FlushMode, Log, Options, Preallocate, RecoveryMode, StorageError, WritePath,
};
use proptest::prelude::*;
use support::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random batches of random sizes, with a reopen (clean or crash) between
    /// rounds: everything reads back identical, offsets contiguous.
    #[test]
    fn random_batches_survive_reopen(
        rounds in proptest::collection::vec(
            (proptest::collection::vec(proptest::collection::vec((any::<bool>(), 0usize..3000), 1..40), 1..6), any::<bool>()),
            1..4),
        through_map in any::<bool>(),
    ) {
        let opts = options_for(if through_map { WritePath::Mmap } else { WritePath::Pwrite });
        let dir = tempfile::tempdir().unwrap();
        let mut expected: Vec<(Option<Vec<u8>>, Vec<u8>)> = Vec::new();
        for (batches, clean) in rounds {
            let log = Log::open(dir.path(), opts.clone()).unwrap();
            for batch in batches {
                let parts: Vec<(Option<Vec<u8>>, Vec<u8>)> = batch.iter().enumerate().map(|(j, &(keyed, len))| {
                    let n = expected.len() as u64 + j as u64;
                    (keyed.then(|| format!("key-{n}").into_bytes()), payload(n, len))
                }).collect();
                let msgs: Vec<Message<'_>> = parts.iter().map(|(k, p)| Message {
                    id: InnerMsgId::NONE, key: k.as_deref(), headers: &[], payload: p,
                }).collect();
                let appended = log.append_acked(&msgs).unwrap();
                for (j, outcome) in appended.outcomes.iter().enumerate() {
                    prop_assert_eq!(outcome.offset, (expected.len() + j) as u64);
                    prop_assert!(!outcome.duplicate);
                }
                expected.extend(parts);
            }
            if clean { log.close().unwrap(); } else { drop(log); }
        }
        let log = Log::open(dir.path(), opts).unwrap();
        let records = read_all(&log);
        prop_assert_eq!(records.len(), expected.len());
        for (i, (r, (k, p))) in records.iter().zip(&expected).enumerate() {
            prop_assert_eq!(r.offset, i as u64);
            prop_assert_eq!(r.key.as_deref(), k.as_deref());
            prop_assert_eq!(&r.payload[..], &p[..]);
        }
    }
}

/// Cuts the last record at every byte length, both by zeroing (the
/// preallocated file keeps its size) and by truncating the file.
#[test]
fn torn_last_record_is_truncated_at_every_length() {
    for write_path in WRITE_PATHS {
        torn_last_record_is_truncated_at_every_length_with(options_for(write_path));
    }
}

fn torn_last_record_is_truncated_at_every_length_with(options: Options) {
    let options = || options.clone();
    let source = tempfile::tempdir().unwrap();
    let len = 200;
    let written = {
        let log = Log::open(source.path(), options()).unwrap();
        let written = append_one_by_one(&log, 20, len);
        drop(log); // a crash: no clean checkpoint
        written
    };
    let rec = record_len(len) as u64;
    let last_at = 19 * rec;
    for cut in 0..rec {
        for truncate_file in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(source.path(), dir.path());
            let file = log_file(dir.path(), 0);
            if truncate_file {
                set_file_len(&file, last_at + cut);
            } else {
                patch_file(&file, last_at + cut, &vec![0u8; (rec - cut) as usize]);
            }
            let log = Log::open(dir.path(), options())
                .unwrap_or_else(|e| panic!("cut at {cut} (truncate {truncate_file}): {e}"));
            assert_eq!(log.next_offset(), 19, "cut at {cut}");
            let records = read_all(&log);
            assert_eq!(records.len(), 19);
            for (r, p) in records.iter().zip(&written) {
                assert_eq!(&r.payload[..], &p[..]);
            }
            let report = log.recovery_report();
            assert!(report.bytes_truncated <= cut, "cut {cut}: {report:?}");
            let p = payload(99, 50);
            let again = log
                .append_acked(&[Message {
                    payload: &p,
                    ..Message::default()
                }])
                .unwrap();
            assert_eq!(
                again.outcomes[0].offset, 19,
                "appends continue at the right offset"
            );
            log.close().unwrap();
            let log = Log::open(dir.path(), options()).unwrap();
            assert_eq!(read_all(&log).len(), 20);
        }
    }
}

#[test]
fn garbage_or_zeros_after_the_last_record_are_cut() {
    let source = tempfile::tempdir().unwrap();
    {
        let log = Log::open(source.path(), options()).unwrap();
        append_one_by_one(&log, 10, 100);
        drop(log);
    }
    let end = 10 * record_len(100) as u64;
    let mut garbage = vec![0u8; 3000];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x as u8) | 1; // never zero, so the whole run is dirty
    }
    for (name, tail) in [("garbage", garbage), ("zeros", vec![0u8; 3000])] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(source.path(), dir.path());
        patch_file(&log_file(dir.path(), 0), end, &tail);
        let log = Log::open(dir.path(), options()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(log.next_offset(), 10, "{name}");
        let truncated = log.recovery_report().bytes_truncated;
        if name == "garbage" {
            assert_eq!(truncated, 3000);
        } else {
            assert_eq!(truncated, 0);
        }
        assert_eq!(read_all(&log).len(), 10);
        drop(log);
        // A second crash must not resurrect anything from the cleared tail.
        let log = Log::open(dir.path(), options()).unwrap();
        assert_eq!(
            log.recovery_report().bytes_truncated,
            0,
            "{name}: the tail was cleared"
        );
    }
}

/// A flipped bit in a middle record is damage, not a torn tail: open fails
/// naming the file and position; repair mode cuts there and says so.
#[test]
fn flipped_bit_in_a_middle_record_fails_open_or_is_repaired() {
    for (clean, write_path) in [true, false]
        .into_iter()
        .flat_map(|c| WRITE_PATHS.map(|w| (c, w)))
    {
        let options = || options_for(write_path);
        let dir = tempfile::tempdir().unwrap();
        let len = 100;
        {
            let log = Log::open(dir.path(), options()).unwrap();
            append_one_by_one(&log, 30, len);
            if clean {
                log.close().unwrap();
            }
        }
        let at = 12 * record_len(len) as u64;
        flip_bit(&log_file(dir.path(), 0), at + 70, 3);
        let err = Log::open(dir.path(), options())
            .err()
            .expect("open must fail");
        match &err {
            StorageError::Corrupt { file, position, .. } => {
                assert_eq!(*file, log_file(dir.path(), 0));
                assert_eq!(*position, at, "clean={clean}: {err}");
            }
            other => panic!("clean={clean}: unexpected {other}"),
        }
        let repair = Options {
            recovery: RecoveryMode::Repair,
            ..options_for(write_path)
        };
        let log = Log::open(dir.path(), repair).unwrap();
        assert_eq!(log.next_offset(), 12);
        assert!(log.recovery_report().repaired.is_some());
        assert_eq!(read_all(&log).len(), 12);
    }
}

#[test]
fn damaged_sealed_segment_is_reported_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), options()).unwrap();
        append_one_by_one(&log, 400, 500); // about three segments
        log.close().unwrap();
    }
    let first = log_file(dir.path(), 0);
    let len = std::fs::metadata(&first).unwrap().len();
    set_file_len(&first, len - 10);
    let err = Log::open(dir.path(), options())
        .err()
        .expect("open must fail");
    assert!(
        matches!(&err, StorageError::Corrupt { file, .. } if *file == first),
        "{err}"
    );
    let report = bida::log::inspect::inspect(dir.path()).unwrap();
    assert!(report.is_damaged(), "{report}");
}

#[test]
fn duplicates_in_the_window_are_stored_once_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = b"order created".to_vec();
    let msg = |i: u64| Message {
        id: id(i),
        payload: &p,
        ..Message::default()
    };
    {
        let log = Log::open(dir.path(), options()).unwrap();
        let first = log.append_acked(&[msg(1), msg(2), msg(1)]).unwrap();
        assert_eq!(
            first
                .outcomes
                .iter()
                .map(|o| (o.offset, o.duplicate))
                .collect::<Vec<_>>(),
            vec![(0, false), (1, false), (0, true)],
            "a duplicate within one batch is caught too"
        );
        let retry = log.append_acked(&[msg(2)]).unwrap();
        assert_eq!(
            (retry.outcomes[0].offset, retry.outcomes[0].duplicate),
            (1, true)
        );
        drop(log); // crash
    }
    let log = Log::open(dir.path(), options()).unwrap();
    let retry = log.append_acked(&[msg(1), msg(3)]).unwrap();
    assert_eq!(
        (retry.outcomes[0].offset, retry.outcomes[0].duplicate),
        (0, true)
    );
    assert_eq!(
        (retry.outcomes[1].offset, retry.outcomes[1].duplicate),
        (2, false)
    );
    assert_eq!(read_all(&log).len(), 3, "retries stored nothing new");
}

#[test]
fn ids_outside_the_window_are_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        dedup: DedupWindow {
            records_max: 100,
            age_ms_max: 60_000,
        },
        ..options()
    };
    let log = Log::open(dir.path(), opts.clone()).unwrap();
    append_one_by_one(&log, 150, 20);
    let p = payload(0, 20);
    // id(0) was at offset 0, 150 records ago: outside a 100-record window.
    let old = log
        .append_acked(&[Message {
            id: id(0),
            payload: &p,
            ..Message::default()
        }])
        .unwrap();
    assert_eq!(
        (old.outcomes[0].offset, old.outcomes[0].duplicate),
        (150, false)
    );
    // id(100) is at offset 100, inside the window.
    let recent = log
        .append_acked(&[Message {
            id: id(100),
            payload: &p,
            ..Message::default()
        }])
        .unwrap();
    assert_eq!(
        (recent.outcomes[0].offset, recent.outcomes[0].duplicate),
        (100, true)
    );
    log.close().unwrap();
    // The rebuilt window has the same edge.
    let log = Log::open(dir.path(), opts).unwrap();
    let again = log
        .append_acked(&[
            Message {
                id: id(40),
                payload: &p,
                ..Message::default()
            },
            Message {
                id: id(120),
                payload: &p,
                ..Message::default()
            },
        ])
        .unwrap();
    assert_eq!(
        (again.outcomes[0].offset, again.outcomes[0].duplicate),
        (151, false)
    );
    assert_eq!(
        (again.outcomes[1].offset, again.outcomes[1].duplicate),
        (120, true)
    );
}

#[test]
fn a_second_open_of_the_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    let err = Log::open(dir.path(), options())
        .err()
        .expect("second open must fail");
    let StorageError::Locked { path, holder } = &err else {
        panic!("unexpected {err}");
    };
    assert_eq!(*path, dir.path().join("LOCK"));
    assert_eq!(*holder, format!("pid {}", std::process::id()));
    assert!(err.to_string().contains("LOCK"), "{err}");
    log.close().unwrap();
    Log::open(dir.path(), options())
        .expect("free again after close")
        .close()
        .unwrap();
}

#[test]
fn segments_roll_and_reads_cross_them_and_lost_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let log = Log::open(dir.path(), options()).unwrap();
        let w = append_one_by_one(&log, 600, 300);
        assert!(log.segments().len() >= 3, "{:?}", log.segments());
        // The background thread seals what a roll leaves behind.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.segments().iter().rev().skip(1).all(|s| s.sealed) {
            assert!(
                Instant::now() < deadline,
                "not sealed: {:?}",
                log.segments()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        log.close().unwrap();
        w
    };
    std::fs::remove_file(dir.path().join(format!("{:020}.index", 0))).unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    assert_eq!(log.recovery_report().indexes_rebuilt, 1);
    for start in [0u64, 1, 150, 299, 599] {
        let batch = log.read(start, 7, 1 << 20).unwrap();
        for (j, r) in batch.iter().enumerate() {
            let r = r.unwrap();
            assert_eq!(r.offset, start + j as u64);
            assert_eq!(&r.payload[..], &written[r.offset as usize][..]);
        }
    }
    assert_eq!(
        log.read(600, 10, 1 << 20).unwrap().records,
        0,
        "the end reads empty"
    );
    assert!(matches!(
        log.read(601, 10, 1 << 20),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    let records = read_all(&log);
    assert_eq!(records.len(), 600);
    // Timestamps are monotonic, so the time index finds each record's first peer.
    for r in records.iter().step_by(37) {
        let found = log.offset_for_timestamp(r.timestamp_ms).unwrap();
        assert!(found <= r.offset);
        assert_eq!(records[found as usize].timestamp_ms, r.timestamp_ms);
        assert!(found == 0 || records[found as usize - 1].timestamp_ms < r.timestamp_ms);
    }
    assert_eq!(log.offset_for_timestamp(u64::MAX), None);
}

#[test]
fn retention_deletes_whole_sealed_segments_never_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        retention: bida::log::Retention {
            bytes_max: Some(150 << 10),
            age_ms_max: None,
        },
        ..options()
    };
    let log = Log::open(dir.path(), opts).unwrap();
    append_one_by_one(&log, 1000, 400);
    let before = log.segments();
    let report = log.apply_retention().unwrap();
    let after = log.segments();
    assert!(report.segments_deleted > 0);
    assert_eq!(after.len(), before.len() - report.segments_deleted);
    assert!(after.iter().map(|s| s.size_bytes).sum::<u64>() <= 150 << 10);
    assert_eq!(log.start_offset(), after[0].base_offset);
    assert!(matches!(
        log.read(0, 1, 1000),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert!(!before[0].path.exists());
    log.close().unwrap();

    // By age: everything sealed is older than 1 ms after a short wait.
    let opts = Options {
        retention: bida::log::Retention {
            bytes_max: None,
            age_ms_max: Some(1),
        },
        ..options()
    };
    let log = Log::open(dir.path(), opts).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    log.apply_retention().unwrap();
    assert_eq!(log.segments().len(), 1, "only the active segment is left");
    assert_eq!(log.next_offset(), 1000);
}

#[test]
fn async_mode_acks_at_once_and_flushes_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        flush: FlushMode::Async {
            interval_ms: 20,
            bytes: 1 << 30,
        },
        ..options()
    };
    let log = Log::open(dir.path(), opts).unwrap();
    let p = payload(1, 100);
    let appended = log
        .append_acked(&[Message {
            payload: &p,
            ..Message::default()
        }])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.durable_offset() < appended.durable_target() {
        assert!(
            Instant::now() < deadline,
            "the background flusher never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_bad_message_rejects_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    let good = encode_headers(&[(b"a", b"b")]).unwrap();
    let huge = vec![0u8; 20 << 10];
    let batch = [
        Message {
            headers: &good,
            payload: b"fine",
            ..Message::default()
        },
        Message {
            headers: &[1, 0, 9],
            payload: b"bad headers",
            ..Message::default()
        },
    ];
    let err = log.append(&batch).unwrap_err();
    assert!(
        matches!(err, StorageError::InvalidMessage { index: 1, .. }),
        "{err}"
    );
    let err = log
        .append(&[Message {
            payload: &huge,
            ..Message::default()
        }])
        .unwrap_err();
    assert!(
        matches!(err, StorageError::InvalidMessage { index: 0, .. }),
        "{err}"
    );
    assert_eq!(log.next_offset(), 0, "nothing was stored");
}

#[test]
fn concurrent_sync_appenders_share_flushes_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            segment_bytes: 1 << 20,
            ..options()
        },
    )
    .unwrap();
    let offsets = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (log, offsets) = (&log, &offsets);
            s.spawn(move || {
                for i in 0..100u64 {
                    let p = payload(t * 1000 + i, 64);
                    let batch = vec![
                        Message {
                            payload: &p,
                            ..Message::default()
                        };
                        4
                    ];
                    let appended = log.append_acked(&batch).unwrap();
                    assert!(log.durable_offset() >= appended.durable_target());
                    offsets
                        .lock()
                        .unwrap()
                        .extend(appended.outcomes.iter().map(|o| o.offset));
                }
            });
        }
    });
    let mut offsets = offsets.into_inner().unwrap();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..3200).collect::<Vec<u64>>());
    drop(log);
    let log = Log::open(dir.path(), options()).unwrap();
    assert_eq!(log.next_offset(), 3200);
}

/// A child appends in sync mode and prints each offset once durable; it is
/// SIGKILLed at a random moment. Every printed offset must be there with its
/// bytes. Three rounds on the same directory.
#[test]
fn sigkill_during_sync_appends_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x9E37_79B9u64 ^ u64::from(std::process::id());
    for round in 0..3 {
        let start = {
            let log = Log::open(dir.path(), options()).unwrap();
            let next = log.next_offset();
            drop(log);
            next
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_bida"))
            .args([
                "append",
                "--flush",
                "sync",
                "--generate",
                "100000000",
                "--batch",
                "8",
                "--size",
                "120",
            ])
            .args([
                "--segment-bytes",
                "65536",
                "--write-path",
                ["pwrite", "mmap"][round % 2],
                "--data",
            ])
            .arg(dir.path())
            .env("BIDA_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let lines_before_kill = 200 + (seed % 3000) as usize;
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut line = String::new();
        while acked.len() < lines_before_kill && Instant::now() < deadline {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let mut fields = line.trim_end().split('\t');
            let offset: u64 = fields.next().unwrap().parse().unwrap();
            let id = u128::from_str_radix(fields.next().unwrap(), 16).unwrap();
            acked.push((offset, id));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines printed after our last read were acked too: collect them.
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
        for l in rest.lines() {
            let mut fields = l.split('\t');
            if let (Some(o), Some(i), Some(_)) = (fields.next(), fields.next(), fields.next()) {
                acked.push((o.parse().unwrap(), u128::from_str_radix(i, 16).unwrap()));
            }
        }
        assert!(
            !acked.is_empty(),
            "round {round}: the child acknowledged nothing"
        );
        let log = Log::open(dir.path(), options()).unwrap();
        for &(offset, id) in &acked {
            let batch = log.read(offset, 1, 1 << 20).unwrap();
            let record = batch
                .iter()
                .next()
                .unwrap_or_else(|| panic!("round {round}: offset {offset} lost"))
                .unwrap();
            assert_eq!(record.offset, offset);
            assert_eq!(
                record.id.0, id,
                "round {round}: offset {offset} has another id"
            );
            let i = offset - start;
            assert!(
                record
                    .payload
                    .starts_with(format!("record-{i}:").as_bytes()),
                "round {round}: offset {offset}"
            );
            assert_eq!(record.payload.len(), 120);
        }
        let last = acked.iter().map(|a| a.0).max().unwrap();
        assert!(log.next_offset() > last);
        drop(log);
    }
}

/// Found by the recover fuzzer: a damaged offset field in a sealed segment
/// (not re-verified at open) must not upset the dedup rebuild, and reads
/// must report the damage instead of returning the record.
#[test]
fn damaged_offset_in_a_sealed_segment_is_reported_on_read() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), options()).unwrap();
        append_one_by_one(&log, 400, 500);
        log.close().unwrap();
    }
    let at = 5 * record_len(500) as u64 + bida::log::record::LOG_OFFSET_OFFSET as u64;
    flip_bit(&log_file(dir.path(), 0), at, 0);
    let log = Log::open(dir.path(), options()).unwrap();
    let mut offset = 0;
    let err = loop {
        match log.read(offset, 3, 1 << 20) {
            Ok(batch) => {
                let mut n = 0;
                for r in batch.iter() {
                    match r {
                        Ok(r) => assert_eq!(r.offset, offset + n),
                        Err(e) => panic!("checksum caught it first: {e}"),
                    }
                    n += 1;
                }
                assert!(n > 0, "reads stalled before the damage");
                offset = batch.next_offset;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert_eq!(offset, 5, "everything before the damage reads back");
    assert!(bida::log::inspect::inspect(dir.path())
        .unwrap()
        .is_damaged());
}

#[test]
fn purge_deletes_every_record_and_offsets_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    append_one_by_one(&log, 300, 400);
    assert!(log.segments().len() > 1, "the test wants several segments");
    let report = log.purge().unwrap();
    assert_eq!(log.start_offset(), 300);
    assert_eq!(log.next_offset(), 300);
    assert!(report.bytes_deleted >= 300 * 400);
    assert_eq!(log.segments().len(), 1, "one empty active segment");
    assert!(log.read(299, 1, 1000).is_err(), "purged records are gone");
    let p = payload(7, 10);
    let a = log
        .append(&[Message {
            payload: &p,
            ..Message::default()
        }])
        .unwrap();
    assert_eq!(a.outcomes[0].offset, 300);
    log.purge().unwrap();
    assert_eq!((log.start_offset(), log.next_offset()), (301, 301));
    // Purging an empty log changes nothing; a reopen agrees.
    log.purge().unwrap();
    assert_eq!((log.start_offset(), log.next_offset()), (301, 301));
    log.close().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    assert_eq!((log.start_offset(), log.next_offset()), (301, 301));
    assert_eq!(log.read(301, 10, 1 << 20).unwrap().records, 0);
}

/// An active segment's file grows as records arrive, in steps reserved
/// ahead of the writer (a new log's is empty; an idle one holds at most the
/// first step), with zeros written under `Preallocate::Zeroes`; a roll
/// creates the next segment's file empty and the old one is cut to its
/// records; everything reads back after a reopen.
#[test]
fn active_segments_grow_in_steps_ahead_of_the_writer() {
    const FIRST_STEP: u64 = 64 << 10;
    for preallocate in [Preallocate::Zeroes, Preallocate::Fallocate] {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            preallocate,
            segment_bytes: 1 << 20,
            ..options()
        };
        let log = Log::open(dir.path(), opts.clone()).unwrap();
        let file_len = |base: u64| std::fs::metadata(log_file(dir.path(), base)).unwrap().len();
        assert_eq!(file_len(0), 0, "a new log reserves nothing");
        let mut written = append_one_by_one(&log, 10, 300);
        let first = &log.segments()[0];
        assert_eq!(first.allocated_bytes, file_len(0));
        assert!(
            first.allocated_bytes >= first.size_bytes && first.allocated_bytes <= FIRST_STEP,
            "{first:?}"
        );
        // Fill past the end of the first segment: it rolls.
        let per_record = record_len(300) as u64;
        let more = opts.segment_bytes / per_record + 10;
        for i in 10..10 + more {
            let p = payload(i, 300);
            let msg = Message {
                id: id(i),
                payload: &p,
                ..Message::default()
            };
            assert_eq!(log.append_acked(&[msg]).unwrap().outcomes[0].offset, i);
            written.push(p);
            let active = log.segments().last().cloned().unwrap();
            assert!(active.allocated_bytes >= active.size_bytes, "{active:?}");
            assert!(active.allocated_bytes <= opts.segment_bytes, "{active:?}");
        }
        // The background reserves ahead of the writer.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let active = log.segments().last().cloned().unwrap();
            if active.allocated_bytes > active.size_bytes {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nothing reserved ahead: {active:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        log.close().unwrap();
        let log = Log::open(dir.path(), opts).unwrap();
        let segments = log.segments();
        assert!(segments.len() >= 2, "{segments:?}");
        assert_eq!(
            std::fs::metadata(log_file(dir.path(), 0)).unwrap().len(),
            segments[0].size_bytes,
            "the sealed segment is cut to its records"
        );
        let records = read_all(&log);
        assert_eq!(records.len(), written.len());
        for (r, p) in records.iter().zip(&written) {
            assert_eq!(&r.payload[..], &p[..]);
        }
    }
}

/// A crash after a roll and before the background seal leaves a segment
/// that is flushed but still preallocated (zeros after its records), with
/// or without index files. Open finishes the seal; nothing is lost.
#[test]
fn a_segment_left_unsealed_by_a_roll_is_sealed_at_open() {
    for keep_index in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let written = {
            let log = Log::open(dir.path(), options()).unwrap();
            let w = append_one_by_one(&log, 400, 300);
            log.close().unwrap();
            w
        };
        // Undo the seal of the first segment.
        let first = log_file(dir.path(), 0);
        let sealed_len = std::fs::metadata(&first).unwrap().len();
        set_file_len(&first, options().segment_bytes);
        if !keep_index {
            for suffix in ["index", "timeindex"] {
                std::fs::remove_file(dir.path().join(format!("{:020}.{suffix}", 0))).unwrap();
            }
        }
        let log = Log::open(dir.path(), options()).unwrap();
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            sealed_len,
            "cut back to its records"
        );
        assert!(dir.path().join(format!("{:020}.index", 0)).exists());
        let records = read_all(&log);
        assert_eq!(records.len(), written.len());
        for (i, (r, p)) in records.iter().zip(&written).enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(&r.payload[..], &p[..]);
        }
        log.close().unwrap();
        // Garbage (not zeros) after the records is damage, not an unfinished seal.
        set_file_len(&first, options().segment_bytes);
        patch_file(&first, sealed_len + 100, b"garbage");
        assert!(matches!(
            Log::open(dir.path(), options()),
            Err(StorageError::Corrupt { .. })
        ));
    }
}

/// An unfinished seal whose index files are left from an earlier, shorter
/// seal of the same segment (it became the active segment again when the
/// next one was lost): open rebuilds them from the records.
#[test]
fn an_unfinished_seal_does_not_trust_index_files_it_finds() {
    let index_files = |dir: &std::path::Path| -> Vec<Vec<u8>> {
        ["index", "timeindex"]
            .iter()
            .map(|x| std::fs::read(dir.join(format!("{:020}.{x}", 0))).unwrap())
            .collect()
    };
    // A short seal of segment 0: 20 records, then it grows too old and
    // the next append rolls it.
    let short = tempfile::tempdir().unwrap();
    {
        let opts = Options {
            segment_age_ms: 50,
            ..options()
        };
        let log = Log::open(short.path(), opts).unwrap();
        append_one_by_one(&log, 20, 300);
        std::thread::sleep(Duration::from_millis(100));
        append_one_by_one_from(&log, 20, 1, 300);
        assert!(log.segments().len() >= 2);
        log.close().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let log = Log::open(dir.path(), options()).unwrap();
        let w = append_one_by_one(&log, 400, 300);
        log.close().unwrap();
        w
    };
    let sealed = index_files(dir.path());
    let first = log_file(dir.path(), 0);
    set_file_len(&first, options().segment_bytes);
    for suffix in ["index", "timeindex"] {
        let name = format!("{:020}.{suffix}", 0);
        std::fs::copy(short.path().join(&name), dir.path().join(&name)).unwrap();
    }
    assert_ne!(index_files(dir.path()), sealed, "the stale files differ");
    let log = Log::open(dir.path(), options()).unwrap();
    assert_eq!(index_files(dir.path()), sealed, "rebuilt from the records");
    assert_eq!(read_all(&log).len(), written.len());
}

/// Like `append_one_by_one`, from offset `first`.
fn append_one_by_one_from(log: &Log, first: u64, count: u64, len: usize) {
    for i in first..first + count {
        let p = payload(i, len);
        let msg = Message {
            id: id(i),
            payload: &p,
            ..Message::default()
        };
        assert_eq!(log.append_acked(&[msg]).unwrap().outcomes[0].offset, i);
    }
}

/// A crash in a roll after the next segment's file was renamed into place
/// and before the old segment's flush ended (a power cut then tears the
/// old segment's unflushed tail, and the new file holds nothing): open
/// drops the empty last segment, reopens the old one as the active one and
/// cuts its torn tail. Before, it refused to start ("corrupt data": the
/// old segment was taken for a sealed one).
#[test]
fn a_roll_cut_short_by_a_power_cut_is_undone_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let log = Log::open(dir.path(), options()).unwrap();
        let w = append_one_by_one(&log, 400, 300);
        log.close().unwrap();
        w
    };
    let segments: Vec<u64> = {
        let log = Log::open(dir.path(), options()).unwrap();
        let s = log.segments().iter().map(|s| s.base_offset).collect();
        log.close().unwrap();
        s
    };
    assert!(segments.len() >= 3, "{segments:?}");
    let (old, new) = (segments[segments.len() - 2], segments[segments.len() - 1]);
    // The state the crash leaves: the old segment unsealed (full length, no
    // index files) with a torn tail after its first 10 records, the new
    // one an empty preallocated file, no checkpoint past the old durable
    // end.
    let old_file = log_file(dir.path(), old);
    let keep = {
        let bytes = std::fs::read(&old_file).unwrap();
        let mut at = 0usize;
        for _ in 0..10 {
            at += u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        at
    };
    set_file_len(&old_file, keep as u64);
    set_file_len(&old_file, options().segment_bytes);
    patch_file(&old_file, keep as u64, &[0xA5; 700]);
    for suffix in ["index", "timeindex"] {
        std::fs::remove_file(dir.path().join(format!("{old:020}.{suffix}"))).unwrap();
    }
    let new_file = log_file(dir.path(), new);
    set_file_len(&new_file, 0);
    set_file_len(&new_file, options().segment_bytes);
    std::fs::remove_file(dir.path().join("CHECKPOINT")).unwrap();

    let log = Log::open(dir.path(), options()).unwrap();
    let report = log.recovery_report().clone();
    assert!(report.roll_resumed, "{report:?}");
    assert!(!new_file.exists(), "the empty last segment is removed");
    let records = read_all(&log);
    let expected = old as usize + 10;
    assert_eq!(records.len(), expected, "everything before the tear");
    for (i, (r, p)) in records.iter().zip(&written).enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(&r.payload[..], &p[..]);
    }
    // Appends go on at the cut, and a reopen is clean.
    let p = payload(9999, 300);
    let next = log
        .append_acked(&[Message {
            id: id(9999),
            payload: &p,
            ..Message::default()
        }])
        .unwrap()
        .outcomes[0]
        .offset;
    assert_eq!(next, expected as u64);
    log.close().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    assert_eq!(read_all(&log).len(), expected + 1);
    log.close().unwrap();

    // A last segment that holds a record means the old one was whole: a
    // torn old segment is then damage, and open still refuses it.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), options()).unwrap();
        append_one_by_one(&log, 400, 300);
        log.close().unwrap();
    }
    let log = Log::open(dir.path(), options()).unwrap();
    let bases: Vec<u64> = log.segments().iter().map(|s| s.base_offset).collect();
    log.close().unwrap();
    let old = bases[bases.len() - 2];
    let old_file = log_file(dir.path(), old);
    set_file_len(&old_file, options().segment_bytes);
    patch_file(&old_file, 4096, &[0xA5; 700]);
    for suffix in ["index", "timeindex"] {
        std::fs::remove_file(dir.path().join(format!("{old:020}.{suffix}"))).unwrap();
    }
    assert!(matches!(
        Log::open(dir.path(), options()),
        Err(StorageError::Corrupt { .. })
    ));
}

/// `append_unless_roll` appends a batch that fits and refuses, appending
/// nothing, one that would roll the segment; `append` then rolls.
#[test]
fn append_unless_roll_refuses_only_a_batch_that_would_roll() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    let segment_bytes = options().segment_bytes as usize;
    let p = payload(1, 10_000);
    let msg = Message {
        payload: &p,
        ..Message::default()
    };
    let mut appended = 0u64;
    while let Some(a) = log.append_unless_roll(&[msg]).unwrap() {
        assert_eq!(a.outcomes[0].offset, appended);
        appended += 1;
        assert!(appended < 100, "a segment holds a few of these");
    }
    let segments = log.segments();
    assert_eq!(segments.len(), 1, "nothing rolled");
    assert_eq!(
        log.next_offset(),
        appended,
        "the refused batch stored nothing"
    );
    assert!(segments[0].size_bytes as usize + p.len() > segment_bytes - 200);
    let rolled = log.append(&[msg]).unwrap();
    assert_eq!(rolled.outcomes[0].offset, appended);
    assert_eq!(log.segments().len(), 2);
}

/// Quarantine: a log whose damage fails a normal open opens anyway, changes
/// nothing on disk, serves every record before the damage, refuses appends
/// with an error naming the repair command, and closes without writing.
/// Damage in the active segment and in a sealed one alike.
#[test]
fn a_damaged_log_opens_in_quarantine_read_only_up_to_the_damage() {
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let len = 300;
        let written = {
            let log = Log::open(dir.path(), options()).unwrap();
            let w = append_one_by_one(&log, if sealed { 400 } else { 30 }, len);
            log.close().unwrap();
            w
        };
        // A flipped bit in the active segment, or a sealed segment cut 10
        // bytes short (what open checks of a sealed one): either way the
        // valid records end at `valid`.
        let valid = if sealed {
            let first = log_file(dir.path(), 0);
            let file_len = std::fs::metadata(&first).unwrap().len();
            set_file_len(&first, file_len - 10);
            file_len / record_len(len) as u64 - 1
        } else {
            let at = 12 * record_len(len) as u64;
            flip_bit(&log_file(dir.path(), 0), at + 70, 3);
            12
        };
        let normal = Log::open(dir.path(), options());
        assert!(
            normal.is_err(),
            "a normal open refuses: sealed={sealed} {:?}",
            normal
                .as_ref()
                .map(|l| (l.next_offset(), l.recovery_report().clone()))
        );
        let before: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().is_some_and(|n| n != "LOCK"))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        let quarantine = Options {
            recovery: RecoveryMode::Quarantine,
            ..options()
        };
        let log = Log::open(dir.path(), quarantine.clone()).unwrap();
        let damage = log.damage().expect("the log knows it is damaged");
        let text = damage.to_string();
        assert!(text.contains("bida repair"), "{text}");
        assert_eq!(log.next_offset(), valid, "sealed={sealed}");
        let records = read_all(&log);
        assert_eq!(records.len() as u64, valid);
        for (r, p) in records.iter().zip(&written) {
            assert_eq!(&r.payload[..], &p[..]);
        }
        let p = payload(999, 10);
        let err = log
            .append(&[Message {
                payload: &p,
                ..Message::default()
            }])
            .unwrap_err();
        assert!(err.to_string().contains("bida repair"), "{err}");
        log.background_pass();
        log.close().unwrap();
        for (path, bytes) in &before {
            assert_eq!(
                &std::fs::read(path).unwrap(),
                bytes,
                "{} changed",
                path.display()
            );
        }
        // The repair then cuts it, and the log takes writes again.
        let repair = Options {
            recovery: RecoveryMode::Repair,
            ..options()
        };
        let log = Log::open(dir.path(), repair).unwrap();
        assert_eq!(log.next_offset(), valid);
        log.append_acked(&[Message {
            payload: &p,
            ..Message::default()
        }])
        .unwrap();
    }
}
