//! The spool against its invariants: unit tests, damage on disk (torn tails, flipped bits, bad
//! headers, a lost cursor), and a model-based property test that drives the real spool and a
//! simple in-memory model with the same random appends, commits, flushes, restarts and crashes.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use proptest::prelude::*;

use super::segment;
use super::*;

const BIG: u64 = 1 << 40;

fn event(seq: u64, len: usize) -> Vec<u8> {
    let mut e = seq.to_le_bytes().to_vec();
    e.resize(len.max(8), (seq % 251) as u8);
    e
}

fn open(dir: &Path, segment_bytes: u64) -> (Spool, Vec<OpenLane>, Vec<Finding>) {
    Spool::open_with(dir, BIG, segment_bytes).expect("open the spool")
}

fn read_all(r: &mut Reader) -> Vec<SpoolRecord> {
    let mut out = Vec::new();
    loop {
        let batch = r.read(100, 1 << 20).expect("read");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

fn segments(dir: &Path, lane: &Uuid) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("spool").join(lane.to_string()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_are_read_back_in_order_and_flushed_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _, _) = open(dir.path(), 4096);
    let OpenLane { lane, mut writer, mut reader } = spool.create_lane().unwrap();
    for i in 1..=100u64 {
        assert_eq!(writer.append(i as i64, &event(i, 200)), i);
        if i % 10 == 0 {
            assert_eq!(writer.commit().unwrap(), i);
        }
    }
    assert_eq!(lane.committed_seq(), 100);
    assert!(segments(dir.path(), &lane.id).len() > 3, "small segments roll over");
    let got = read_all(&mut reader);
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=100).collect::<Vec<_>>());
    assert_eq!(got[41].event, event(42, 200));
    assert_eq!(got[41].time_us, 42);
    let bytes: u64 = got.iter().map(|r| r.disk_len()).sum();
    assert_eq!(spool.stats().records.load(Ordering::Acquire), 100);
    reader.lane().mark_flushed(100, bytes, 100, None).unwrap();
    assert_eq!(spool.stats().records.load(Ordering::Acquire), 0);
    assert_eq!(segments(dir.path(), &lane.id).len(), 1, "only the segment being appended to stays");
    assert_eq!(writer.append(0, &event(101, 10)), 101);
}

#[test]
fn sequence_numbers_go_on_after_a_restart_even_when_everything_was_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (spool, _, _) = open(dir.path(), 1024);
        let OpenLane { lane, mut writer, mut reader } = spool.create_lane().unwrap();
        for i in 1..=30 {
            writer.append(0, &event(i, 100));
        }
        writer.commit().unwrap();
        read_all(&mut reader);
        reader.lane().mark_flushed(30, 0, 30, None).unwrap();
        lane.id
    };
    let (_spool, mut lanes, findings) = open(dir.path(), 1024);
    assert!(findings.is_empty(), "{findings:?}");
    let OpenLane { lane, mut writer, mut reader } = lanes.remove(0);
    assert_eq!(lane.id, id);
    assert_eq!(writer.append(0, &event(31, 10)), 31);
    writer.commit().unwrap();
    assert_eq!(read_all(&mut reader).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![31]);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_spool, _, _) = open(dir.path(), 1024);
    let err = Spool::open(dir.path(), BIG).err().expect("the lock is held");
    let msg = err.to_string();
    assert!(msg.contains("another sidebus daemon is using data_dir") && msg.contains(&std::process::id().to_string()), "{msg}");
}

#[test]
fn a_torn_tail_is_set_aside_with_a_warning_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (spool, _, _) = open(dir.path(), 1 << 20);
        let OpenLane { lane, mut writer, .. } = spool.create_lane().unwrap();
        for i in 1..=5 {
            writer.append(0, &event(i, 50));
        }
        writer.commit().unwrap();
        lane.id
    };
    // A crash cut the next write short: part of a valid record is on disk, never fsynced.
    let seg = segments(dir.path(), &id).pop().unwrap();
    let mut rec = BytesMut::new();
    segment::encode(&mut rec, 6, 0, &event(6, 50));
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &rec[..30]).unwrap();
    drop(f);
    let (_spool, mut lanes, findings) = open(dir.path(), 1 << 20);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert!(findings[0].torn_tail);
    assert_eq!(findings[0].bytes, 30);
    assert!(findings[0].quarantined.as_ref().is_some_and(|q| std::fs::read(q).unwrap().len() == 30), "the bytes are kept aside");
    let OpenLane { mut writer, mut reader, .. } = lanes.remove(0);
    assert_eq!(read_all(&mut reader).len(), 5);
    assert_eq!(writer.append(0, &event(6, 50)), 6, "the torn record's number is used again: it was never acknowledged");
}

#[test]
fn a_flipped_bit_is_reported_as_damage_and_the_rest_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (spool, _, _) = open(dir.path(), 2048);
        let OpenLane { lane, mut writer, .. } = spool.create_lane().unwrap();
        for i in 1..=40 {
            writer.append(0, &event(i, 100));
            writer.commit().unwrap();
        }
        lane.id
    };
    let segs = segments(dir.path(), &id);
    assert!(segs.len() >= 3);
    // Flip one bit in the event of the second record of the first segment.
    let first = &segs[0];
    let mut bytes = std::fs::read(first).unwrap();
    let at = segment::HEADER_LEN as usize + (segment::RECORD_HEADER_LEN + 100) + segment::RECORD_HEADER_LEN + 50;
    bytes[at] ^= 0x10;
    std::fs::write(first, &bytes).unwrap();
    let first_seq_of_second = segment::parse_name(&segs[1]).unwrap();
    let (_spool, mut lanes, findings) = open(dir.path(), 2048);
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(findings.iter().all(|f| !f.torn_tail), "damage inside the log is an error, not a torn tail");
    assert!(findings[0].what.contains("checksum"), "{}", findings[0].what);
    // And what it cost: the records between the damage and the next segment.
    let lost = first_seq_of_second - 2;
    assert_eq!(findings[1].what, format!("{lost} records are missing before this segment"));
    let OpenLane { mut reader, .. } = lanes.remove(0);
    let seqs: Vec<u64> = read_all(&mut reader).iter().map(|r| r.seq).collect();
    // Record 1 is intact; records 2 up to the end of the first segment are set aside; every
    // later segment is read.
    assert_eq!(seqs[0], 1);
    assert_eq!(seqs[1], first_seq_of_second);
    assert_eq!(*seqs.last().unwrap(), 40);
}

#[test]
fn a_segment_with_a_bad_header_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (spool, _, _) = open(dir.path(), 1024);
        let OpenLane { lane, mut writer, .. } = spool.create_lane().unwrap();
        for i in 1..=20 {
            writer.append(0, &event(i, 100));
            writer.commit().unwrap();
        }
        lane.id
    };
    let segs = segments(dir.path(), &id);
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[0] = b'X';
    std::fs::write(&segs[0], &bytes).unwrap();
    let (_spool, mut lanes, findings) = open(dir.path(), 1024);
    assert_eq!(findings.len(), 1);
    assert!(findings[0].what.contains("magic"));
    let OpenLane { mut reader, .. } = lanes.remove(0);
    let seqs: Vec<u64> = read_all(&mut reader).iter().map(|r| r.seq).collect();
    assert_eq!(*seqs.last().unwrap(), 20);
    assert!(seqs[0] > 1);
}

#[test]
fn a_lost_cursor_means_flushing_again_never_reusing_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (spool, _, _) = open(dir.path(), 1 << 20);
        let OpenLane { lane, mut writer, mut reader } = spool.create_lane().unwrap();
        for i in 1..=10 {
            writer.append(0, &event(i, 10));
        }
        writer.commit().unwrap();
        read_all(&mut reader);
        reader.lane().mark_flushed(10, 0, 10, None).unwrap();
        lane.id
    };
    std::fs::write(dir.path().join("spool").join(id.to_string()).join("cursor"), b"garbage").unwrap();
    let (_spool, mut lanes, _) = open(dir.path(), 1 << 20);
    let OpenLane { mut writer, mut reader, .. } = lanes.remove(0);
    assert_eq!(read_all(&mut reader).len(), 10, "flushed again: harmless, flushing is idempotent");
    assert_eq!(writer.append(0, &event(11, 10)), 11);
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Commit,
    Flush(usize),
    Restart,
    /// A crash during a write: uncommitted records are lost and a part of the next record is
    /// on disk.
    TornCrash(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..300).prop_map(Op::Append),
        3 => Just(Op::Commit),
        3 => (1usize..40).prop_map(Op::Flush),
        1 => Just(Op::Restart),
        1 => (1usize..40).prop_map(Op::TornCrash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_spool_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _, _) = open(dir.path(), 1024);
        let OpenLane { lane, mut writer, mut reader } = spool.create_lane().unwrap();
        let id = lane.id;
        // The model: records committed and not flushed, records buffered, the next number.
        let mut committed: std::collections::VecDeque<(u64, Vec<u8>)> = Default::default();
        let mut buffered: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut highest_used = 0u64;
        // What the reader has returned but not yet marked flushed.
        let mut read_ahead: Vec<SpoolRecord> = Vec::new();
        for op in ops {
            match op {
                Op::Append(len) => {
                    let seq = highest_used.max(buffered.last().map_or(0, |b| b.0)) + 1;
                    let e = event(seq, len);
                    let got = writer.append(seq as i64, &e);
                    prop_assert_eq!(got, seq);
                    buffered.push((seq, e));
                }
                Op::Commit => {
                    writer.commit().unwrap();
                    for b in buffered.drain(..) {
                        highest_used = b.0;
                        committed.push_back(b);
                    }
                }
                Op::Flush(n) => {
                    let mut batch = reader.read(n, u64::MAX).unwrap();
                    read_ahead.append(&mut batch);
                    let take = read_ahead.len().min(n);
                    let flushed: Vec<SpoolRecord> = read_ahead.drain(..take).collect();
                    for r in &flushed {
                        let (seq, e) = committed.pop_front().expect("the spool returned a record the model does not have");
                        prop_assert_eq!(r.seq, seq);
                        prop_assert_eq!(&r.event[..], &e[..]);
                    }
                    if let Some(last) = flushed.last() {
                        let bytes: u64 = flushed.iter().map(|r| r.disk_len()).sum();
                        reader.lane().mark_flushed(last.seq, bytes, flushed.len() as u64, None).unwrap();
                    }
                    prop_assert_eq!(spool.stats().records.load(Ordering::Acquire), committed.len() as u64);
                }
                Op::Restart | Op::TornCrash(_) => {
                    // Buffered records were never committed: a crash loses them, and nobody
                    // was told they were stored.
                    if let Some(first) = buffered.first() {
                        highest_used = highest_used.max(first.0 - 1);
                    }
                    buffered.clear();
                    read_ahead.clear();
                    drop(writer);
                    drop(reader);
                    drop(spool);
                    if let Op::TornCrash(cut) = op {
                        let seg = segments(dir.path(), &id).pop().unwrap();
                        let mut rec = BytesMut::new();
                        segment::encode(&mut rec, highest_used + 1, 0, &event(highest_used + 1, 60));
                        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
                        std::io::Write::write_all(&mut f, &rec[..cut.min(rec.len() - 1)]).unwrap();
                    }
                    let (s, mut lanes, findings) = open(dir.path(), 1024);
                    prop_assert!(findings.iter().all(|f| f.torn_tail), "only torn tails: {:?}", findings);
                    let OpenLane { writer: w, reader: mut r, .. } = lanes.remove(0);
                    // Everything committed and not flushed is there, in order; what was flushed
                    // may come again only if the cursor lagged (it never does without a crash
                    // between flush and cursor write, which this model does not make).
                    let all = read_all(&mut r);
                    prop_assert_eq!(all.len(), committed.len());
                    for (rec, (seq, e)) in all.iter().zip(committed.iter()) {
                        prop_assert_eq!(rec.seq, *seq);
                        prop_assert_eq!(&rec.event[..], &e[..]);
                    }
                    r.rewind();
                    spool = s;
                    writer = w;
                    reader = r;
                }
            }
        }
    }
}
