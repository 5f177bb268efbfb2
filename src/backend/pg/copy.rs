//! PostgreSQL's binary COPY format for event rows: the fast path of a publish batch.
//!
//! Written here rather than taken from a crate: sqlx exposes COPY only as raw bytes, and the
//! crates that encode the binary format belong to other drivers (tokio-postgres). The format
//! (https://www.postgresql.org/docs/current/sql-copy.html, "Binary Format") is a fixed header,
//! then per row a 16-bit field count and per field a 32-bit length (-1 for NULL) and the value
//! in the type's binary send format, then a 16-bit -1 trailer.

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Record;

/// The COPY statement whose column order [`encode`] follows.
pub const STATEMENT: &str = "COPY events (id, type, time, source, schema_version, correlation_id, partition_key, origin_lane, origin_seq, payload, deliver_at) FROM STDIN (FORMAT binary)";

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

fn field(buf: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            buf.put_i32(v.len() as i32);
            buf.put_slice(v);
        }
        None => buf.put_i32(-1),
    }
}

fn timestamptz(t: DateTime<Utc>) -> [u8; 8] {
    (t.timestamp_micros() - PG_EPOCH_OFFSET_US).to_be_bytes()
}

/// The COPY data for `records`, all from publish lane `lane`.
pub fn encode(lane: Uuid, records: &[Record]) -> BytesMut {
    let size: usize = records.iter().map(|r| 80 + r.id.len() * 2 + r.event_type.len() + r.source.len() + r.payload.len()).sum();
    let mut buf = BytesMut::with_capacity(19 + size + 2);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_u32(0); // flags
    buf.put_u32(0); // header extension length
    for r in records {
        buf.put_i16(11);
        field(&mut buf, Some(r.id.as_bytes()));
        field(&mut buf, Some(r.event_type.as_bytes()));
        field(&mut buf, Some(&timestamptz(r.time)));
        field(&mut buf, Some(r.source.as_bytes()));
        field(&mut buf, r.schema_version.map(i32::to_be_bytes).as_ref().map(|b| &b[..]));
        field(&mut buf, Some(r.correlation_id.as_bytes()));
        field(&mut buf, r.partition_key.as_deref().map(str::as_bytes));
        field(&mut buf, Some(lane.as_bytes()));
        field(&mut buf, Some(&r.seq.to_be_bytes()));
        field(&mut buf, Some(&r.payload));
        field(&mut buf, r.deliver_at.map(timestamptz).as_ref().map(|b| &b[..]));
    }
    buf.put_i16(-1);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_postgres_binary_copy() {
        let r = Record {
            seq: 7,
            id: "e1".into(),
            event_type: "t".into(),
            time: DateTime::from_timestamp_micros(PG_EPOCH_OFFSET_US + 1).unwrap(),
            source: "s".into(),
            schema_version: Some(2),
            correlation_id: "c".into(),
            partition_key: None,
            deliver_at: None,
            payload: bytes::Bytes::from_static(&[0x80]),
        };
        let buf = encode(Uuid::nil(), &[r]);
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        want.extend_from_slice(&[0, 11]);
        want.extend_from_slice(&[0, 0, 0, 2, b'e', b'1']);
        want.extend_from_slice(&[0, 0, 0, 1, b't']);
        want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 1, b's']);
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 2]);
        want.extend_from_slice(&[0, 0, 0, 1, b'c']);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(&[0; 16]);
        want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 1, 0x80]);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(&buf[..], &want[..]);
    }
}
