//! The local spool: every accepted publish is written here, fsynced, and then flushed to the
//! Postgres log and the Redis streams. While the backends are away publishes keep being
//! accepted (acknowledged `spooled`), up to `spool_max_bytes`; when they return the spool drains
//! in order. A crash at any moment loses no acknowledged publish, and stores none twice.
//!
//! # Choice
//! A checksummed segment log of our own, as Vector built for its disk buffer: with one
//! `fdatasync` per group commit it appended records about twice as fast as the embedded stores
//! tried beside it (redb, fjall, SQLite) and drained them three to four times as fast, on the
//! 2-core development machine; sled and yaque do not really sync. The format is small enough to
//! check completely (below).
//!
//! # Layout
//! `data_dir/lock` is held (flock) by the running daemon. `data_dir/spool/<lane>/` holds one
//! publish lane: a lane is the unit of order (all publishes of a connection take one lane), and
//! its id is the origin of its events in the log and the key of its high-water mark in Redis,
//! so a lane that is flushed again after a crash adds nothing twice. In a lane directory:
//!
//! ```text
//! 00000000000000000001.seg   segments, named by their first sequence number
//! 00000000000000183422.seg   (a new one once the current one passes 32 MiB)
//! cursor                     last flushed sequence number: u64 LE, CRC32 of it (12 bytes)
//!
//! segment:  +--------------------+-------------------+-------------------+
//!           | "SBSPOOL1" (8)     | first seq u64 LE  | lane id (16)      |   header, 32 bytes
//!           +--------+--------+--+------+------------+-------------------+
//!           | len u32| crc u32| seq u64 | time i64   | event (len bytes) |   record, repeated
//!           +--------+--------+---------+------------+-------------------+
//! ```
//! `crc` is CRC32 over seq, time and event; `time` is the publish time in microseconds; `event`
//! is the encoded event exactly as it is stored and delivered (every log column derives from
//! it).
//!
//! # Invariants
//! - A record is acknowledged `spooled` only after the `fdatasync` that covers it.
//! - Sequence numbers of a lane only grow, across restarts: the segment being appended to is
//!   never deleted, so the next number can always be found, even when the cursor is lost.
//! - The cursor never runs ahead of what both backends hold; it may lag (it is written without
//!   fsync), which only makes a restart flush some records again.
//! - Records are flushed in sequence order; a segment is deleted only when every record in it
//!   is flushed.
//! - Damage is never skipped silently: at start-up every segment is checked, a record cut short
//!   at the very end (a write a crash interrupted, before its fsync, so never acknowledged) is a
//!   torn tail and is set aside with a warning; anything else (a bad checksum, a bad length, a
//!   bad header, a gap) is set aside with an error. Set-aside bytes go to `spool/quarantine/`.
//!
//! # Flow
//! The publisher's appender thread per lane calls [`Writer::append`] for each publish it takes
//! and [`Writer::commit`] once for all of them (group commit), then answers `spooled`. The
//! lane's flusher calls [`Reader::read`] for the next batch, writes it to Postgres and Redis,
//! then [`Reader::mark_flushed`].

mod lane;
pub mod segment;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use lane::{Lane, Reader, SEGMENT_BYTES, Writer};
pub use segment::SpoolRecord;
use uuid::Uuid;

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the data dir's lock.
    #[error("another sidebus daemon is using data_dir {dir} (the lock file {dir}/lock is held{pid})")]
    Locked {
        /// The data dir.
        dir: PathBuf,
        /// ", by pid N" when the lock file says so.
        pid: String,
    },
    /// A file operation failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_owned(), source }
}

/// Bytes a record with an event of `event_len` bytes takes in the spool.
pub fn record_len(event_len: usize) -> u64 {
    (segment::RECORD_HEADER_LEN + event_len) as u64
}

/// Fsyncs a directory, so that a file created or renamed in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Totals over every lane, for backpressure and reporting.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records committed and not yet flushed.
    pub records: AtomicU64,
    /// Bytes of those records.
    pub bytes: AtomicU64,
    /// Bytes of publishes accepted and not yet committed.
    pub reserved: AtomicU64,
}

impl Stats {
    fn add_committed(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub_flushed(&self, records: u64, bytes: u64) {
        let _ = self.records.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(records)));
        let _ = self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(bytes)));
    }
}

/// Something found while opening the spool, to be reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The lane.
    pub lane: Uuid,
    /// The segment file.
    pub segment: PathBuf,
    /// True for a torn tail (an unacknowledged write cut by a crash); false for damage to data
    /// that may have been acknowledged.
    pub torn_tail: bool,
    /// What was wrong.
    pub what: String,
    /// Bytes set aside.
    pub bytes: u64,
    /// Where they were put.
    pub quarantined: Option<PathBuf>,
}

/// A lane ready for use: its writer (for the appender thread) and its reader (for the flusher).
pub struct OpenLane {
    /// What both share.
    pub lane: Arc<Lane>,
    /// Appends.
    pub writer: Writer,
    /// Reads for flushing.
    pub reader: Reader,
}

/// The spool of a data dir.
pub struct Spool {
    dir: PathBuf,
    _lock: File,
    stats: Arc<Stats>,
    max_bytes: u64,
    segment_bytes: u64,
    quarantine: Mutex<u32>,
}

impl Spool {
    /// Locks `data_dir`, checks every lane's segments (setting damage aside) and opens them.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<(Spool, Vec<OpenLane>, Vec<Finding>), SpoolError> {
        Self::open_with(data_dir, max_bytes, SEGMENT_BYTES)
    }

    /// [`Spool::open`] with segments of `segment_bytes` (small ones exercise segment handling
    /// in tests).
    pub fn open_with(data_dir: &Path, max_bytes: u64, segment_bytes: u64) -> Result<(Spool, Vec<OpenLane>, Vec<Finding>), SpoolError> {
        std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
        let lock_path = data_dir.join("lock");
        let mut lock =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            let pid = std::fs::read_to_string(&lock_path)
                .ok()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .map(|p| format!(", by pid {p}"))
                .unwrap_or_default();
            return Err(SpoolError::Locked { dir: data_dir.to_owned(), pid });
        }
        lock.set_len(0).map_err(io_err(&lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io_err(&lock_path))?;
        let dir = data_dir.join("spool");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let spool = Spool { dir, _lock: lock, stats: Arc::new(Stats::default()), max_bytes, segment_bytes, quarantine: Mutex::new(0) };
        let mut lanes = Vec::new();
        let mut findings = Vec::new();
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(&spool.dir).map_err(io_err(&spool.dir))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in entries {
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| Uuid::parse_str(n).ok()) else { continue };
            if path.is_dir() {
                lanes.push(spool.open_lane(id, &mut findings)?);
            }
        }
        Ok((spool, lanes, findings))
    }

    /// A new, empty lane.
    pub fn create_lane(&self) -> Result<OpenLane, SpoolError> {
        let id = Uuid::new_v4();
        let dir = self.dir.join(id.to_string());
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        self.open_lane(id, &mut Vec::new())
    }

    /// Deletes a lane that is fully flushed and no longer used.
    pub fn remove_lane(&self, lane: &Lane) -> Result<(), SpoolError> {
        std::fs::remove_dir_all(&lane.dir).map_err(io_err(&lane.dir))
    }

    /// Totals over every lane.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Reserves room for a record of `bytes`; false (nothing reserved) when the spool is full.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let mut ok = false;
        let _ = self.stats.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
            ok = self.stats.bytes.load(Ordering::Acquire) + r + bytes <= self.max_bytes;
            ok.then_some(r + bytes)
        });
        ok
    }

    /// Gives back a reservation (the record was committed, or failed).
    pub fn release(&self, bytes: u64) {
        let _ = self.stats.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_sub(bytes)));
    }

    /// The size limit.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Moves `bytes` from `path` at `offset` to a new file in the quarantine directory.
    fn set_aside(&self, lane: Uuid, path: &Path, offset: u64) -> io::Result<PathBuf> {
        let qdir = self.dir.join("quarantine");
        std::fs::create_dir_all(&qdir)?;
        let n = {
            let mut q = self.quarantine.lock().unwrap_or_else(|p| p.into_inner());
            *q += 1;
            *q
        };
        let name = format!(
            "{lane}-{}-{offset}-{}-{n}.bad",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("segment"),
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        );
        let target = qdir.join(name);
        let bytes = std::fs::read(path)?;
        std::fs::write(&target, bytes.get(offset as usize..).unwrap_or_default())?;
        File::open(&target)?.sync_all()?;
        sync_dir(&qdir)?;
        Ok(target)
    }

    // Opens a lane after a restart: scans its segments in order (setting aside what is damaged),
    // then reopens or creates the active segment. Long because it is one recovery read top to
    // bottom: each step uses what the steps before found.
    fn open_lane(&self, id: Uuid, findings: &mut Vec<Finding>) -> Result<OpenLane, SpoolError> {
        let dir = self.dir.join(id.to_string());
        let cursor = lane::read_cursor(&dir);
        let mut segs: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| segment::parse_name(&p).map(|s| (s, p)))
            .collect();
        segs.sort();
        let mut kept: Vec<u64> = Vec::new();
        let (mut last_seq, mut unflushed_records, mut unflushed_bytes, mut oldest) = (0u64, 0u64, 0u64, None);
        let (mut active_offset, mut active) = (segment::HEADER_LEN, None);
        let flushed = cursor.unwrap_or(0);
        let count = segs.len();
        for (i, (first, path)) in segs.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let scan = match segment::scan(&path, &id).map_err(io_err(&path))? {
                Ok(scan) => scan,
                Err(why) => {
                    let quarantined = self.set_aside(id, &path, 0).map_err(io_err(&path))?;
                    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                    findings.push(Finding {
                        lane: id,
                        segment: path,
                        torn_tail: false,
                        what: why.to_owned(),
                        bytes,
                        quarantined: Some(quarantined),
                    });
                    continue;
                }
            };
            if scan.first_seq != first {
                findings.push(Finding {
                    lane: id,
                    segment: path.clone(),
                    torn_tail: false,
                    what: "the header's first sequence number differs from the file name".into(),
                    bytes: 0,
                    quarantined: None,
                });
            }
            if last_seq > 0 && scan.first_seq > last_seq + 1 && scan.first_seq > flushed + 1 {
                let missing = scan.first_seq - last_seq.max(flushed) - 1;
                findings.push(Finding {
                    lane: id,
                    segment: path.clone(),
                    torn_tail: false,
                    what: format!("{missing} records are missing before this segment"),
                    bytes: 0,
                    quarantined: None,
                });
            }
            if let Some(damage) = &scan.damage {
                let torn_tail = is_last && damage == &segment::Damage::Truncated;
                let quarantined = self.set_aside(id, &path, scan.valid_len).map_err(io_err(&path))?;
                let f = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                f.set_len(scan.valid_len).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                findings.push(Finding {
                    lane: id,
                    segment: path.clone(),
                    torn_tail,
                    what: format!(
                        "{} after sequence number {}",
                        lane::describe(damage),
                        scan.last_seq.unwrap_or(scan.first_seq.saturating_sub(1))
                    ),
                    bytes: scan.file_len - scan.valid_len,
                    quarantined: Some(quarantined),
                });
            }
            if let Some(l) = scan.last_seq {
                last_seq = last_seq.max(l);
                if l > flushed {
                    let skipped = flushed.saturating_sub(scan.first_seq - 1).min(scan.records);
                    unflushed_records += scan.records - skipped;
                    // An estimate when the segment is partly flushed: its bytes pro rata.
                    unflushed_bytes += scan.record_bytes * (scan.records - skipped) / scan.records.max(1);
                    if oldest.is_none() {
                        oldest = scan.first_time_us;
                    }
                }
            }
            last_seq = last_seq.max(scan.first_seq.saturating_sub(1));
            kept.push(scan.first_seq);
            if is_last {
                active = Some(scan.first_seq);
                active_offset = scan.valid_len;
            }
        }
        // The sequence numbers go on after the highest ever used, even if the segments holding
        // it were deleted (the cursor says how far flushing went).
        let next_seq = last_seq.max(flushed) + 1;
        let (active, file) = match active {
            Some(first) => {
                let path = dir.join(segment::file_name(first));
                (first, OpenOptions::new().read(true).append(true).open(&path).map_err(io_err(&path))?)
            }
            None => {
                let path = dir.join(segment::file_name(next_seq));
                let mut f = OpenOptions::new().create_new(true).read(true).append(true).open(&path).map_err(io_err(&path))?;
                f.write_all(&segment::header(next_seq, &id)).map_err(io_err(&path))?;
                f.sync_data().map_err(io_err(&path))?;
                sync_dir(&dir).map_err(io_err(&dir))?;
                kept.push(next_seq);
                active_offset = segment::HEADER_LEN;
                (next_seq, f)
            }
        };
        self.stats.add_committed(unflushed_records, unflushed_bytes);
        let lane = Arc::new(Lane {
            id,
            dir,
            segments: Mutex::new(kept),
            committed: Mutex::new(lane::Committed { seq: next_seq - 1, active, offset: active_offset }),
            flushed: AtomicU64::new(flushed.min(next_seq - 1)),
            oldest_us: std::sync::atomic::AtomicI64::new(oldest.unwrap_or(0)),
            notify: tokio::sync::Notify::new(),
            stats: self.stats.clone(),
        });
        let reader = Reader::new(lane.clone());
        // Drop the segments already flushed (all but the active one).
        reader.lane().mark_flushed(lane.flushed_seq(), 0, 0, lane.oldest_unflushed_us()).map_err(io_err(&lane.dir))?;
        Ok(OpenLane { writer: Writer::new(lane.clone(), file, next_seq, self.segment_bytes), reader, lane })
    }
}

#[cfg(test)]
mod tests;
