//! Segment files: a header, then records, each with a length and a CRC32 (see the layout in
//! `mod.rs`). Encoding, decoding, and the scan that finds where the valid records end.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};

/// The first bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"SBSPOOL1";
/// Bytes of a segment's header: magic, first sequence number, lane id.
pub const HEADER_LEN: u64 = 8 + 8 + 16;
/// Bytes of a record's header: length, CRC32, sequence number, time.
pub const RECORD_HEADER_LEN: usize = 4 + 4 + 8 + 8;
/// Largest event a record may hold (far above any frame the daemon accepts).
pub const MAX_EVENT_LEN: u32 = 128 << 20;

/// One record: an accepted publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    /// Its sequence number in the lane.
    pub seq: u64,
    /// Publish time, microseconds since the Unix epoch.
    pub time_us: i64,
    /// The encoded event.
    pub event: Bytes,
}

impl SpoolRecord {
    /// Bytes the record takes on disk.
    pub fn disk_len(&self) -> u64 {
        (RECORD_HEADER_LEN + self.event.len()) as u64
    }
}

/// The file name of the segment whose first record is `first_seq`.
pub fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// The first sequence number in a segment's file name, if it is one.
pub fn parse_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".seg")?.parse().ok()
}

/// The segment header.
pub fn header(first_seq: u64, lane: &uuid::Uuid) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    h[16..].copy_from_slice(lane.as_bytes());
    h
}

fn crc(seq: u64, time_us: i64, event: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&time_us.to_le_bytes());
    h.update(event);
    h.finalize()
}

/// Appends one record to `buf`.
pub fn encode(buf: &mut BytesMut, seq: u64, time_us: i64, event: &[u8]) {
    buf.reserve(RECORD_HEADER_LEN + event.len());
    buf.put_u32_le(event.len() as u32);
    buf.put_u32_le(crc(seq, time_us, event));
    buf.put_u64_le(seq);
    buf.put_i64_le(time_us);
    buf.put_slice(event);
}

/// Why the records of a segment stop before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a record: a write cut short (by a crash, before its fsync).
    Truncated,
    /// A record's checksum, length or sequence number is wrong: the bytes changed on disk.
    Corrupt(&'static str),
}

/// What a scan of one segment found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Its first sequence number (from the header).
    pub first_seq: u64,
    /// The last valid record's sequence number, if any.
    pub last_seq: Option<u64>,
    /// Valid records.
    pub records: u64,
    /// Bytes of valid records (without the header).
    pub record_bytes: u64,
    /// Where the valid part ends (header included).
    pub valid_len: u64,
    /// The file's length.
    pub file_len: u64,
    /// Why the valid part ends before the file does.
    pub damage: Option<Damage>,
    /// Publish time of the first valid record.
    pub first_time_us: Option<i64>,
}

/// Reads records one after another from a segment, checking each.
pub struct RecordReader<R> {
    inner: R,
    /// Offset in the file of the next record.
    pub offset: u64,
    /// The sequence number the next record must have.
    pub next_seq: u64,
}

impl<R: Read> RecordReader<R> {
    /// A reader positioned after the header of a segment that starts at `first_seq`.
    pub fn new(inner: R, first_seq: u64) -> RecordReader<R> {
        Self::at(inner, HEADER_LEN, first_seq)
    }

    /// A reader of `inner`, which starts at `offset` of the file, where record `seq` is.
    pub fn at(inner: R, offset: u64, seq: u64) -> RecordReader<R> {
        RecordReader { inner, offset, next_seq: seq }
    }

    /// The next record; `Ok(None)` at a clean end of file.
    pub fn next_record(&mut self) -> io::Result<Result<Option<SpoolRecord>, Damage>> {
        let mut head = [0u8; RECORD_HEADER_LEN];
        match read_full(&mut self.inner, &mut head)? {
            0 => return Ok(Ok(None)),
            n if n < RECORD_HEADER_LEN => return Ok(Err(Damage::Truncated)),
            _ => {}
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let seq = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        let time_us = i64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
        if len > MAX_EVENT_LEN {
            return Ok(Err(Damage::Corrupt("record length out of range")));
        }
        let mut event = vec![0u8; len as usize];
        if read_full(&mut self.inner, &mut event)? < len as usize {
            return Ok(Err(Damage::Truncated));
        }
        if crc(seq, time_us, &event) != sum {
            return Ok(Err(Damage::Corrupt("checksum mismatch")));
        }
        if seq != self.next_seq {
            return Ok(Err(Damage::Corrupt("sequence number out of order")));
        }
        self.offset += (RECORD_HEADER_LEN + event.len()) as u64;
        self.next_seq += 1;
        Ok(Ok(Some(SpoolRecord { seq, time_us, event: Bytes::from(event) })))
    }
}

/// Reads until `buf` is full or the end of the input; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads and checks a segment's header; returns its first sequence number.
pub fn read_header(file: &mut impl Read, lane: &uuid::Uuid) -> io::Result<Result<u64, &'static str>> {
    let mut h = [0u8; HEADER_LEN as usize];
    if read_full(file, &mut h)? < h.len() {
        return Ok(Err("the header is cut short"));
    }
    if &h[..8] != MAGIC {
        return Ok(Err("not a spool segment (bad magic)"));
    }
    if &h[16..] != lane.as_bytes() {
        return Ok(Err("the segment belongs to another lane"));
    }
    Ok(Ok(u64::from_le_bytes(h[8..16].try_into().unwrap_or_default())))
}

/// Scans a whole segment, checking every record.
pub fn scan(path: &PathBuf, lane: &uuid::Uuid) -> io::Result<Result<Scan, &'static str>> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let first_seq = match read_header(&mut r, lane)? {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    let mut reader = RecordReader::new(r, first_seq);
    let mut s =
        Scan { first_seq, last_seq: None, records: 0, record_bytes: 0, valid_len: HEADER_LEN, file_len, damage: None, first_time_us: None };
    loop {
        match reader.next_record()? {
            Ok(Some(rec)) => {
                s.first_time_us.get_or_insert(rec.time_us);
                s.last_seq = Some(rec.seq);
                s.records += 1;
                s.record_bytes += rec.disk_len();
                s.valid_len = reader.offset;
            }
            Ok(None) => break,
            Err(d) => {
                s.damage = Some(d);
                break;
            }
        }
    }
    Ok(Ok(s))
}
