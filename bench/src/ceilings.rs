//! What the backends can do on their own on this machine, with the same rows and entries
//! sidebus writes: Postgres multi-row INSERT, binary COPY and sidebus's own insert statement;
//! Redis XADD and XREADGROUP + XACK, pipelined.

use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use redis::aio::MultiplexedConnection;
use sidebus::backend::pg::{EventLog, Record};
use sidebus_protocol::Event;
use sqlx::postgres::{PgPool, PgPoolCopyExt};
use uuid::Uuid;

use crate::sidebus::data;
use crate::stats;

/// Rows per INSERT statement (as a sidebus publish batch).
const INSERT_ROWS: usize = 512;
/// Rows per COPY.
const COPY_ROWS: usize = 2000;

/// One event row exactly as sidebus stores it.
fn record() -> Record {
    let id = Uuid::now_v7().to_string();
    let now = Utc::now();
    let event = Event {
        id: id.clone(),
        event_type: "bench.ceiling".into(),
        source: "bench".into(),
        time: now.to_rfc3339_opts(SecondsFormat::Micros, true),
        schemaversion: None,
        correlationid: id.clone(),
        partitionkey: None,
        traceparent: None,
        deliverat: None,
        replayed: false,
        data: data(0),
    };
    Record {
        seq: 0,
        id: id.clone(),
        event_type: event.event_type.clone(),
        time: now,
        source: event.source.clone(),
        schema_version: None,
        correlation_id: id,
        partition_key: None,
        deliver_at: None,
        payload: event.encode().into(),
    }
}

/// The size of one stored event, for the notes.
pub fn event_bytes() -> usize {
    record().payload.len()
}

async fn truncate(pool: &PgPool) -> Result<()> {
    sqlx::query("TRUNCATE events").execute(pool).await?;
    Ok(())
}

async fn writers<F, Fut>(n: usize, duration: Duration, f: F) -> Result<(u64, Duration)>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<u64>> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(f())).collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let _ = duration;
    Ok((total, start.elapsed()))
}

/// Multi-row INSERT … VALUES of [`INSERT_ROWS`] rows per statement.
pub async fn pg_insert(pool: &PgPool, n: usize, duration: Duration) -> Result<stats::Result> {
    truncate(pool).await?;
    let (rows, elapsed) = writers(n, duration, || {
        let pool = pool.clone();
        async move {
            let start = Instant::now();
            let mut rows = 0u64;
            let batch = Uuid::new_v4();
            while start.elapsed() < duration {
                let records: Vec<Record> = (0..INSERT_ROWS).map(|_| record()).collect();
                let mut q = sqlx::QueryBuilder::new("INSERT INTO events (id, type, time, source, schema_version, correlation_id, partition_key, origin_lane, origin_seq, payload) ");
                q.push_values(&records, |mut b, r| {
                    b.push_bind(&r.id)
                        .push_bind(&r.event_type)
                        .push_bind(r.time)
                        .push_bind(&r.source)
                        .push_bind(r.schema_version)
                        .push_bind(&r.correlation_id)
                        .push_bind(&r.partition_key)
                        .push_bind(batch)
                        .push_bind(r.seq)
                        .push_bind(r.payload.as_ref());
                });
                q.build().execute(&pool).await?;
                rows += INSERT_ROWS as u64;
            }
            anyhow::Ok(rows)
        }
    })
    .await?;
    let what = format!("Postgres multi-row INSERT ({INSERT_ROWS} rows per statement), {n} writer(s)");
    Ok(stats::Result::rate(&format!("ceiling.pg.insert.w{n}"), &what, rows, elapsed))
}

/// sidebus's own insert paths through its code: the COPY fast path (`checked == false`) or the
/// statement that checks for duplicates (UNNEST + ON CONFLICT).
pub async fn pg_sidebus(log: &EventLog, pool: &PgPool, n: usize, checked: bool, duration: Duration) -> Result<stats::Result> {
    truncate(pool).await?;
    let (rows, elapsed) = writers(n, duration, || {
        let log = log.clone();
        async move {
            let start = Instant::now();
            let mut rows = 0u64;
            while start.elapsed() < duration {
                let rows_per = if checked { INSERT_ROWS } else { sidebus::bus::publish::BATCH_MAX };
                let records: Vec<Record> = (0..rows_per).map(|_| record()).collect();
                if checked {
                    log.insert_batch_checked(Uuid::new_v4(), &records).await?;
                } else {
                    log.insert_batch(Uuid::new_v4(), &records).await?;
                }
                rows += rows_per as u64;
            }
            anyhow::Ok(rows)
        }
    })
    .await?;
    let (name, what) = if checked {
        (
            format!("pg.sidebus_checked.w{n}"),
            format!("sidebus's duplicate-checking statement ({INSERT_ROWS} rows, UNNEST + ON CONFLICT), {n} writer(s)"),
        )
    } else {
        (
            format!("pg.sidebus_copy.w{n}"),
            format!("sidebus's insert of a publish batch ({} rows, binary COPY), {n} writer(s)", sidebus::bus::publish::BATCH_MAX),
        )
    };
    Ok(stats::Result::rate(&name, &what, rows, elapsed))
}

/// Binary COPY of [`COPY_ROWS`] rows at a time.
pub async fn pg_copy(pool: &PgPool, n: usize, duration: Duration) -> Result<stats::Result> {
    truncate(pool).await?;
    let (rows, elapsed) = writers(n, duration, || {
        let pool = pool.clone();
        async move {
            let start = Instant::now();
            let mut rows = 0u64;
            let batch = Uuid::new_v4();
            while start.elapsed() < duration {
                let mut buf = BytesMut::with_capacity(COPY_ROWS * 700);
                buf.put_slice(b"PGCOPY\n\xff\r\n\0");
                buf.put_u32(0);
                buf.put_u32(0);
                for _ in 0..COPY_ROWS {
                    copy_row(&mut buf, &record(), batch);
                }
                buf.put_i16(-1);
                let mut copy = pool
                    .copy_in_raw("COPY events (id, type, time, source, schema_version, correlation_id, partition_key, origin_lane, origin_seq, payload) FROM STDIN (FORMAT binary)")
                    .await?;
                copy.send(buf.freeze()).await?;
                copy.finish().await?;
                rows += COPY_ROWS as u64;
            }
            anyhow::Ok(rows)
        }
    })
    .await?;
    let what = format!("Postgres binary COPY ({COPY_ROWS} rows per COPY), {n} writer(s)");
    Ok(stats::Result::rate(&format!("ceiling.pg.copy.w{n}"), &what, rows, elapsed))
}

/// One row in PostgreSQL's binary COPY format.
fn copy_row(buf: &mut BytesMut, r: &Record, batch: Uuid) {
    fn bytes(buf: &mut BytesMut, b: &[u8]) {
        buf.put_i32(b.len() as i32);
        buf.put_slice(b);
    }
    fn micros_since_2000(t: DateTime<Utc>) -> i64 {
        const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
        t.timestamp_micros() - PG_EPOCH_OFFSET_US
    }
    buf.put_i16(10);
    bytes(buf, r.id.as_bytes());
    bytes(buf, r.event_type.as_bytes());
    buf.put_i32(8);
    buf.put_i64(micros_since_2000(r.time));
    bytes(buf, r.source.as_bytes());
    buf.put_i32(-1); // schema_version: null
    bytes(buf, r.correlation_id.as_bytes());
    buf.put_i32(-1); // partition_key: null
    bytes(buf, batch.as_bytes());
    buf.put_i32(8);
    buf.put_i64(r.seq);
    bytes(buf, &r.payload);
}

/// XADD of stored-size events, [`INSERT_ROWS`] per pipeline.
pub async fn redis_xadd(conn: &MultiplexedConnection, key: &str, duration: Duration) -> Result<stats::Result> {
    let payload = record().payload;
    let start = Instant::now();
    let mut n = 0u64;
    let mut conn = conn.clone();
    while start.elapsed() < duration {
        let mut pipe = redis::pipe();
        for _ in 0..INSERT_ROWS {
            pipe.cmd("XADD").arg(key).arg("*").arg("e").arg(payload.as_ref()).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        n += INSERT_ROWS as u64;
    }
    Ok(stats::Result::rate("ceiling.redis.xadd", &format!("Redis XADD, {INSERT_ROWS} per pipeline, 1 connection"), n, start.elapsed()))
}

/// XREADGROUP of [`INSERT_ROWS`] entries then one XACK of them, until the stream is read.
pub async fn redis_read_ack(conn: &MultiplexedConnection, key: &str) -> Result<stats::Result> {
    let mut conn = conn.clone();
    redis::cmd("XGROUP").arg("CREATE").arg(key).arg("g").arg("0").query_async::<()>(&mut conn).await?;
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(INSERT_ROWS)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        let ids: Vec<String> = reply.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect();
        if ids.is_empty() {
            break;
        }
        n += ids.len() as u64;
        redis::cmd("XACK").arg(key).arg("g").arg(&ids).query_async::<()>(&mut conn).await?;
    }
    Ok(stats::Result::rate(
        "ceiling.redis.xreadgroup_xack",
        &format!("Redis XREADGROUP {INSERT_ROWS} + XACK, 1 connection"),
        n,
        start.elapsed(),
    ))
}
