//! One lane's spool: its segment files, the writer that appends with group commit, the reader
//! that the flusher drains, and the cursor of what is flushed.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use uuid::Uuid;

use super::segment::{self, Damage, HEADER_LEN, RecordReader, SpoolRecord};
use super::{Stats, sync_dir};
use crate::lock::lock;

/// A segment is closed for appends once it is this large.
pub const SEGMENT_BYTES: u64 = 32 << 20;

/// Where committed (fsynced) records end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Committed {
    /// The last committed sequence number (0: none yet).
    pub seq: u64,
    /// The segment being appended to (its first sequence number).
    pub active: u64,
    /// Committed bytes of the active segment, header included.
    pub offset: u64,
}

/// What the writer and the reader of a lane share.
pub struct Lane {
    /// The lane's id: its directory's name, and the origin of its events in the log.
    pub id: Uuid,
    pub(super) dir: PathBuf,
    /// First sequence numbers of the segments on disk, ascending.
    pub(super) segments: Mutex<Vec<u64>>,
    pub(super) committed: Mutex<Committed>,
    /// The last flushed sequence number (the cursor).
    pub(super) flushed: AtomicU64,
    /// Publish time of the oldest unflushed record, microseconds (0: none).
    pub(super) oldest_us: AtomicI64,
    /// Signalled after each commit.
    pub notify: tokio::sync::Notify,
    pub(super) stats: Arc<Stats>,
}

impl Lane {
    /// The last committed sequence number (0: none).
    pub fn committed_seq(&self) -> u64 {
        lock(&self.committed).seq
    }

    /// The last flushed sequence number (0: none).
    pub fn flushed_seq(&self) -> u64 {
        self.flushed.load(Ordering::Acquire)
    }

    /// Records committed and not yet flushed.
    pub fn backlog(&self) -> u64 {
        self.committed_seq().saturating_sub(self.flushed_seq())
    }

    /// Publish time of the oldest unflushed record, microseconds since the epoch.
    pub fn oldest_unflushed_us(&self) -> Option<i64> {
        match self.oldest_us.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Records that everything up to `seq` is in both backends: writes the cursor, and deletes
    /// the segments that hold nothing newer (never the one being appended to). `bytes` and `records` are what this flush took out of the spool; `oldest_left_us` the
    /// publish time of the oldest record still unflushed, if the caller knows it. Blocks on
    /// disk.
    pub fn mark_flushed(&self, seq: u64, bytes: u64, records: u64, oldest_left_us: Option<i64>) -> io::Result<()> {
        write_cursor(self, seq)?;
        self.flushed.store(seq, Ordering::Release);
        self.stats.sub_flushed(records, bytes);
        self.oldest_us.store(if seq >= self.committed_seq() { 0 } else { oldest_left_us.unwrap_or(0) }, Ordering::Release);
        let active = lock(&self.committed).active;
        let doomed: Vec<u64> = {
            let segs = lock(&self.segments);
            segs.windows(2).filter(|w| w[1] <= seq + 1 && w[0] != active).map(|w| w[0]).collect()
        };
        for first in doomed {
            // A reader may still hold it open; on Unix that is harmless.
            std::fs::remove_file(self.segment_path(first))?;
            lock(&self.segments).retain(|s| *s != first);
        }
        Ok(())
    }

    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(segment::file_name(first_seq))
    }

    fn cursor_path(&self) -> PathBuf {
        self.dir.join("cursor")
    }
}

/// The cursor file: the last flushed sequence number and its CRC32. It is replaced (write,
/// rename) without fsync: after a crash it may be older than the truth, which only means some
/// records are flushed again, and flushing is idempotent.
pub(super) fn read_cursor(dir: &std::path::Path) -> Option<u64> {
    let b = std::fs::read(dir.join("cursor")).ok()?;
    if b.len() != 12 {
        return None;
    }
    let seq = u64::from_le_bytes(b[..8].try_into().ok()?);
    let sum = u32::from_le_bytes(b[8..].try_into().ok()?);
    (crc32fast::hash(&b[..8]) == sum).then_some(seq)
}

fn write_cursor(lane: &Lane, seq: u64) -> io::Result<()> {
    let mut b = seq.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32fast::hash(&seq.to_le_bytes()).to_le_bytes());
    let tmp = lane.dir.join("cursor.tmp");
    std::fs::write(&tmp, &b)?;
    std::fs::rename(tmp, lane.cursor_path())
}

/// Appends records to the active segment; one per lane, on a thread of its own (every call
/// blocks on disk).
pub struct Writer {
    lane: Arc<Lane>,
    file: File,
    segment_bytes: u64,
    buf: BytesMut,
    next_seq: u64,
    /// The first sequence number and bytes of what is buffered.
    buffered: Vec<(u64, i64, u64)>,
}

impl Writer {
    pub(super) fn new(lane: Arc<Lane>, file: File, next_seq: u64, segment_bytes: u64) -> Writer {
        Writer { lane, file, segment_bytes, buf: BytesMut::with_capacity(1 << 20), next_seq, buffered: Vec::new() }
    }

    /// The lane.
    pub fn lane(&self) -> &Arc<Lane> {
        &self.lane
    }

    /// Buffers one record; returns its sequence number. Nothing is durable before [`commit`].
    ///
    /// [`commit`]: Writer::commit
    pub fn append(&mut self, time_us: i64, event: &[u8]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        segment::encode(&mut self.buf, seq, time_us, event);
        self.buffered.push((seq, time_us, (segment::RECORD_HEADER_LEN + event.len()) as u64));
        seq
    }

    /// Writes what is buffered and fsyncs it: one `fdatasync` for all of it (group commit).
    /// Returns the last committed sequence number. On an error nothing buffered is committed,
    /// the file is cut back to what was, and those sequence numbers are not used again.
    pub fn commit(&mut self) -> io::Result<u64> {
        if self.buffered.is_empty() {
            return Ok(self.lane.committed_seq());
        }
        let before = *lock(&self.lane.committed);
        let result = self.file.write_all(&self.buf).and_then(|()| self.file.sync_data());
        let written = self.buf.len() as u64;
        self.buf.clear();
        let records = std::mem::take(&mut self.buffered);
        if let Err(e) = result {
            // Leave no partial record behind for the next commit to append after.
            let _ = self.file.set_len(before.offset);
            let _ = self.file.seek(SeekFrom::Start(before.offset));
            return Err(e);
        }
        let last = records.last().map_or(before.seq, |r| r.0);
        let bytes: u64 = records.iter().map(|r| r.2).sum();
        {
            let mut c = lock(&self.lane.committed);
            c.seq = last;
            c.offset += written;
        }
        self.lane.stats.add_committed(records.len() as u64, bytes);
        if let Some(first) = records.first() {
            let _ = self.lane.oldest_us.compare_exchange(0, first.1, Ordering::AcqRel, Ordering::Acquire);
        }
        self.lane.notify.notify_one();
        if before.offset + written >= self.segment_bytes {
            self.roll()?;
        }
        Ok(last)
    }

    /// Starts the next segment.
    fn roll(&mut self) -> io::Result<()> {
        let first = self.next_seq;
        let path = self.lane.segment_path(first);
        let mut file = OpenOptions::new().create_new(true).read(true).append(true).open(&path)?;
        file.write_all(&segment::header(first, &self.lane.id))?;
        file.sync_data()?;
        sync_dir(&self.lane.dir)?;
        lock(&self.lane.segments).push(first);
        *lock(&self.lane.committed) = Committed { seq: first - 1, active: first, offset: HEADER_LEN };
        self.file = file;
        Ok(())
    }
}

/// The segment a reader is in.
struct Cursor {
    /// The segment's first sequence number.
    first: u64,
    file: File,
    /// Offset of the next record to read, and its sequence number.
    offset: u64,
    seq: u64,
}

/// Reads committed records in order for the flusher, and records what is flushed.
pub struct Reader {
    lane: Arc<Lane>,
    current: Option<Cursor>,
    next_seq: u64,
}

impl Reader {
    pub(super) fn new(lane: Arc<Lane>) -> Reader {
        let next_seq = lane.flushed_seq() + 1;
        Reader { lane, current: None, next_seq }
    }

    /// The lane.
    pub fn lane(&self) -> &Arc<Lane> {
        &self.lane
    }

    /// Starts reading again after the last flushed record (after a flush failed, to read the
    /// same records again).
    pub fn rewind(&mut self) {
        self.next_seq = self.lane.flushed_seq() + 1;
        self.current = None;
    }

    /// Up to `max_records` committed records (and about `max_bytes`), from where the last read
    /// ended. Empty when everything committed has been read.
    pub fn read(&mut self, max_records: usize, max_bytes: u64) -> io::Result<Vec<SpoolRecord>> {
        let mut out: Vec<SpoolRecord> = Vec::new();
        let mut bytes = 0;
        while out.len() < max_records && bytes < max_bytes {
            let committed = *lock(&self.lane.committed);
            if self.next_seq > committed.seq {
                break;
            }
            if self.current.as_ref().is_none_or(|c| c.seq > self.next_seq) && !self.open_segment_for(self.next_seq)? {
                break;
            }
            let Some(cur) = self.current.as_mut() else { break };
            let limit = if cur.first == committed.active { committed.offset } else { cur.file.metadata()?.len() };
            cur.file.seek(SeekFrom::Start(cur.offset))?;
            let take = (&cur.file).take(limit.saturating_sub(cur.offset));
            let mut rr = RecordReader::at(BufReader::with_capacity(256 << 10, take), cur.offset, cur.seq);
            let mut ended = false;
            while out.len() < max_records && bytes < max_bytes {
                match rr.next_record()? {
                    // Before the position asked for (after a rewind): skip.
                    Ok(Some(rec)) if rec.seq < self.next_seq => {}
                    Ok(Some(rec)) => {
                        bytes += rec.disk_len();
                        self.next_seq = rec.seq + 1;
                        out.push(rec);
                    }
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(damage) => {
                        // Checked at start-up and written by this process since: a disk fault.
                        // The rest of the segment cannot be read; say so and go on after it.
                        tracing::error!(lane = %self.lane.id, segment = cur.first, offset = rr.offset, damage = describe(&damage), "spool segment damaged while flushing; skipping its remaining records");
                        ended = true;
                        break;
                    }
                }
            }
            cur.offset = rr.offset;
            cur.seq = rr.next_seq;
            if !ended {
                break;
            }
            if cur.first == committed.active {
                // Everything committed is read.
                break;
            }
            let done = cur.first;
            self.current = None;
            match self.next_segment_after(done) {
                Some(next) => self.next_seq = self.next_seq.max(next),
                None => break,
            }
        }
        if let Some(first) = out.first() {
            let _ = self.lane.oldest_us.compare_exchange(0, first.time_us, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(out)
    }

    fn next_segment_after(&self, first: u64) -> Option<u64> {
        lock(&self.lane.segments).iter().copied().find(|s| *s > first)
    }

    /// Opens the segment that holds `seq` (or the first one after it); false when there is none.
    fn open_segment_for(&mut self, seq: u64) -> io::Result<bool> {
        let first = {
            let segs = lock(&self.lane.segments);
            match segs.iter().rev().find(|s| **s <= seq).or_else(|| segs.first()) {
                Some(f) => *f,
                None => return Ok(false),
            }
        };
        let file = File::open(self.lane.segment_path(first))?;
        self.current = Some(Cursor { first, file, offset: HEADER_LEN, seq: first });
        // Records before this segment are gone (set aside at start-up): go on from here.
        self.next_seq = self.next_seq.max(first);
        Ok(true)
    }
}

/// Describes damage found in a segment, for the start-up report.
pub(super) fn describe(d: &Damage) -> &'static str {
    match d {
        Damage::Truncated => "a record is cut short",
        Damage::Corrupt(why) => why,
    }
}
