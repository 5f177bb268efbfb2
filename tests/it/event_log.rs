//! The event log's batch insert against a real Postgres: the COPY fast path and the
//! duplicate-checking fallback agree on what each event is.

use bytes::Bytes;
use sidebus::backend::pg::{Record, Stored};
use uuid::Uuid;

use crate::harness::TestEnv;

fn record(seq: i64, id: &str) -> Record {
    Record {
        seq,
        id: id.to_owned(),
        event_type: "t.log".into(),
        time: chrono::Utc::now(),
        source: "test".into(),
        schema_version: Some(3),
        correlation_id: id.to_owned(),
        partition_key: Some("p".into()),
        deliver_at: None,
        payload: Bytes::from_static(b"\x81\xa1a\x01"),
    }
}

#[tokio::test]
async fn a_batch_says_what_is_new_retried_or_duplicate() {
    let env = TestEnv::new();
    let log = env.log().await;
    log.migrate().await.unwrap();
    let lane = Uuid::new_v4();
    let batch: Vec<Record> = [(1, "a"), (2, "b"), (3, "c")].iter().map(|(s, id)| record(*s, id)).collect();
    assert_eq!(log.insert_batch(lane, &batch).await.unwrap(), vec![Stored::New; 3]);
    // The same records again (a retry after a lost reply): recognised as themselves.
    assert_eq!(log.insert_batch(lane, &batch).await.unwrap(), vec![Stored::Retried; 3]);
    // The same lane publishing an old id again as a new record is a duplicate, not a retry.
    assert_eq!(log.insert_batch(lane, &[record(4, "a")]).await.unwrap(), vec![Stored::Duplicate]);
    // Another lane with two old ids and a new one: the new one is stored.
    let mixed: Vec<Record> = [(1, "b"), (2, "d"), (3, "a")].iter().map(|(s, id)| record(*s, id)).collect();
    assert_eq!(log.insert_batch(Uuid::new_v4(), &mixed).await.unwrap(), vec![Stored::Duplicate, Stored::New, Stored::Duplicate]);
    for id in ["a", "b", "c", "d"] {
        assert_eq!(log.count_id(id).await.unwrap(), 1, "{id} stored once");
    }
}

#[tokio::test]
async fn a_large_batch_goes_through_copy_and_says_the_same() {
    let env = TestEnv::new();
    let log = env.log().await;
    log.migrate().await.unwrap();
    let lane = Uuid::new_v4();
    // Past the small-batch size, so the COPY path stores it.
    let ids: Vec<String> = (0..300).map(|i| format!("big-{i}")).collect();
    let batch: Vec<Record> = ids.iter().enumerate().map(|(i, id)| record(i as i64 + 1, id)).collect();
    assert_eq!(log.insert_batch(lane, &batch).await.unwrap(), vec![Stored::New; 300]);
    assert_eq!(log.insert_batch(lane, &batch).await.unwrap(), vec![Stored::Retried; 300]);
    // One new id among 299 stored ones, from another lane.
    let mut mixed: Vec<Record> = ids[..299].iter().enumerate().map(|(i, id)| record(i as i64 + 1, id)).collect();
    mixed.push(record(300, "big-new"));
    let mut want = vec![Stored::Duplicate; 299];
    want.push(Stored::New);
    assert_eq!(log.insert_batch(Uuid::new_v4(), &mixed).await.unwrap(), want);
    for id in ids.iter().chain([&"big-new".to_owned()]) {
        assert_eq!(log.count_id(id).await.unwrap(), 1, "{id} stored once");
    }
}

#[tokio::test]
async fn a_replay_analyses_a_log_whose_statistics_are_stale_and_only_then() {
    let env = TestEnv::new();
    let log = env.log().await;
    log.migrate().await.unwrap();
    let pool = sqlx::PgPool::connect(&env.database_url).await.unwrap();
    // Autovacuum must not analyse the table first: this test is about the daemon doing it.
    sqlx::query("ALTER TABLE events SET (autovacuum_enabled = false)").execute(&pool).await.unwrap();
    let batch: Vec<Record> = (0..3000).map(|i| record(i + 1, &format!("stale-{i}"))).collect();
    log.insert_batch(Uuid::new_v4(), &batch).await.unwrap();
    let analysed = || async {
        let at: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'events'").fetch_one(&pool).await.unwrap();
        at
    };
    // Statistics reach pg_stat_user_tables with a delay of up to a second (PGSTAT_MIN_INTERVAL).
    let mut changed = None;
    for _ in 0..30 {
        changed = log.analyze_if_stale().await.unwrap();
        if changed.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(changed.unwrap() >= 3000, "3,000 new rows since no analyze: {changed:?}");
    assert!(analysed().await.is_some(), "the log was analysed");
    // Now up to date: nothing to do.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(log.analyze_if_stale().await.unwrap(), None);
}
