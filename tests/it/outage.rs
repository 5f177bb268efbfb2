//! Publishes never fail because a backend is down, and nothing acknowledged is lost or stored
//! twice: Redis stopped under load and started again empty, Postgres stopped under load, the
//! daemon killed mid-flush again and again, the spool full, and what the spool check reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidebus_client::{Client, Durability, Publish, PublishStatus, SubscribeOptions, Subscription};

use crate::harness::servers::{PgServer, RedisServer, free_port};
use crate::harness::{TestEnv, eventually};

type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// Counts every delivery of a subscription by event id, acking each.
fn collect(mut sub: Subscription) -> Seen {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            *s.lock().unwrap().entry(d.event.id.clone()).or_default() += 1;
            let _ = d.ack_nowait().await;
        }
    });
    seen
}

fn count(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

/// The test's database, once the daemon has created it (it connects in the background).
async fn pg(url: &str) -> sqlx::PgPool {
    eventually("the daemon's database", Duration::from_secs(30), || async { sqlx::PgPool::connect(url).await.ok() }).await
}

async fn publish_many(c: &Client, event_type: &str, n: usize, durability: Durability) -> Vec<(String, PublishStatus)> {
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let mut p = Publish::new(event_type, sidebus_client::encode(&i).unwrap());
        p.durability = durability;
        pending.push(c.publish_start(p).await.expect("queue a publish"));
    }
    let mut out = Vec::with_capacity(n);
    for p in pending {
        let r = p.wait().await.expect("every publish is acknowledged");
        out.push((r.event_id, r.status));
    }
    out
}

#[tokio::test]
async fn redis_stopped_under_load_and_back_empty_every_group_gets_every_event_once() {
    let redis = RedisServer::start();
    let port = redis.port;
    let env = TestEnv::on(redis.url());
    let daemon = env.daemon().start().await;
    let consumers = daemon.client().await;
    let inventory = collect(consumers.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap());
    let analytics = collect(consumers.subscribe("order.created", "analytics", SubscribeOptions::default()).await.unwrap());
    let orders = daemon.client().await;

    let mut all: Vec<String> =
        publish_many(&orders, "order.created", 200, Durability::Committed).await.into_iter().map(|(id, _)| id).collect();
    for seen in [&inventory, &analytics] {
        eventually("the first events delivered", Duration::from_secs(20), || async { (count(seen) == 200).then_some(()) }).await;
    }
    // The groups' checkpoints have caught up with what they acknowledged.
    let db = pg(&env.database_url).await;
    eventually("checkpoints after the acknowledged events", Duration::from_secs(20), || async {
        let behind: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_groups g WHERE g.type = 'order.created' AND g.resume_seq <= (SELECT max(seq) FROM events WHERE type = 'order.created')")
            .fetch_one(&db)
            .await
            .unwrap();
        (behind == 0).then_some(())
    })
    .await;

    drop(redis);
    let during = publish_many(&orders, "order.created", 200, Durability::Local).await;
    assert!(during.iter().all(|(_, s)| *s == PublishStatus::Spooled), "every publish during the outage is acknowledged spooled");
    all.extend(during.into_iter().map(|(id, _)| id));

    let _redis = RedisServer::start_on(port);
    all.extend(publish_many(&orders, "order.created", 100, Durability::Local).await.into_iter().map(|(id, _)| id));
    for (name, seen) in [("inventory", &inventory), ("analytics", &analytics)] {
        eventually(&format!("{name} to get every event after Redis came back empty"), Duration::from_secs(60), || async {
            (count(seen) >= all.len()).then_some(())
        })
        .await;
    }
    // Replays from the checkpoints have run their course; nothing more arrives.
    eventually("recovery replays to finish", Duration::from_secs(20), || async {
        let running: i64 = sqlx::query_scalar("SELECT count(*) FROM replays WHERE status = 'running'").fetch_one(&db).await.unwrap();
        (running == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, seen) in [("inventory", &inventory), ("analytics", &analytics)] {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), all.len(), "{name}: no event it should not get");
        for id in &all {
            assert_eq!(seen.get(id), Some(&1), "{name}: {id} delivered once");
        }
    }
    assert!(daemon.log().contains("Redis lost its data") || daemon.log().contains("consumer groups recreated"), "the recovery is logged");
}

#[tokio::test]
async fn postgres_stopped_under_load_the_log_holds_every_event_once_in_order() {
    let mut postgres = PgServer::start();
    let mut env = TestEnv::new();
    env.database_url = postgres.url("sidebus");
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    // One connection publishes, so the log's order is its publish order.
    let mut ids: Vec<String> = publish_many(&c, "payment.made", 300, Durability::Committed).await.into_iter().map(|(id, _)| id).collect();
    postgres.stop();
    let during = publish_many(&c, "payment.made", 300, Durability::Local).await;
    assert!(during.iter().all(|(_, s)| *s == PublishStatus::Spooled));
    ids.extend(during.into_iter().map(|(id, _)| id));
    postgres.start_again();
    let db = pg(&env.database_url).await;
    let logged: Vec<String> = eventually("every event in the log", Duration::from_secs(60), || async {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT id FROM events WHERE type = 'payment.made' ORDER BY seq").fetch_all(&db).await.unwrap_or_default();
        (rows.len() >= ids.len()).then_some(rows)
    })
    .await;
    assert_eq!(logged, ids, "every acknowledged event once, in publish order");
}

#[tokio::test]
async fn a_daemon_killed_mid_flush_again_and_again_loses_nothing_and_repeats_nothing() {
    let env = TestEnv::new();
    let socket = env.dir.path().join("kill.sock").display().to_string();
    let data = env.dir.path().join("kill-data").display().to_string();
    let config = "[[groups]]\ntype = \"stock.moved\"\nname = \"ledger\"\n";
    let mut acked: Vec<String> = Vec::new();
    for round in 0..4 {
        let mut daemon = env.daemon().flag("socket", &socket).flag("data-dir", &data).config_file(config).start().await;
        let c = daemon.client().await;
        let got = publish_many(&c, "stock.moved", 1500, Durability::Local).await;
        acked.extend(got.into_iter().map(|(id, _)| id));
        // Killed right after the last acknowledgement: before the backends answered, or with
        // the flush of what was just acknowledged under way (which one varies by round).
        daemon.kill();
        assert!(daemon.log().contains("listening"), "round {round}");
    }
    let daemon = env.daemon().flag("socket", &socket).flag("data-dir", &data).config_file(config).start().await;
    let seen = collect(
        daemon
            .client()
            .await
            .subscribe("stock.moved", "ledger", SubscribeOptions { max_in_flight: Some(1024), ..Default::default() })
            .await
            .unwrap(),
    );
    let db = pg(&env.database_url).await;
    eventually("every acknowledged event in the log", Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'stock.moved' AND id = ANY($1)")
            .bind(&acked)
            .fetch_one(&db)
            .await
            .unwrap();
        (n as usize == acked.len()).then_some(())
    })
    .await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'stock.moved'").fetch_one(&db).await.unwrap();
    assert_eq!(total as usize, acked.len(), "nothing stored that was not acknowledged, nothing twice");
    eventually("every acknowledged event delivered", Duration::from_secs(60), || async { (count(&seen) == acked.len()).then_some(()) })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().unwrap();
    let twice: Vec<&String> = seen.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    assert!(twice.is_empty(), "{} events delivered twice after kills", twice.len());
}

#[tokio::test]
async fn a_full_spool_answers_backpressure_and_recovers_once_it_drains() {
    let port = free_port();
    let env = TestEnv::on(format!("redis://127.0.0.1:{port}"));
    let daemon = env.daemon().flag("spool-max-bytes", 1 << 20).start().await;
    let c = daemon.client().await;
    let big = "x".repeat(4000);
    let mut accepted = Vec::new();
    let err = loop {
        match c.publish("t.full", &big).await {
            Ok(p) => {
                assert_eq!(p.status, PublishStatus::Spooled);
                accepted.push(p.event_id);
                assert!(accepted.len() < 400, "1 MiB of spool should fill up");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(sidebus_protocol::ErrorCode::Backpressure));
    assert!(accepted.len() > 150, "{} accepted before the spool filled", accepted.len());
    let _redis = RedisServer::start_on(port);
    eventually("publishes accepted again once the spool drains", Duration::from_secs(60), || async {
        c.publish("t.full", &big).await.ok()
    })
    .await;
    let db = pg(&env.database_url).await;
    eventually("everything accepted before is stored", Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE id = ANY($1)").bind(&accepted).fetch_one(&db).await.unwrap();
        (n as usize == accepted.len()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_dir_refuses_to_start() {
    let env = TestEnv::new();
    let data = env.dir.path().join("shared-data").display().to_string();
    let _first = env.daemon().flag("data-dir", &data).start().await;
    let mut second = env.daemon().flag("data-dir", &data).spawn();
    assert_eq!(second.wait_exit(Duration::from_secs(20)).await.code(), Some(1));
    assert!(second.log().contains("another sidebus daemon is using data_dir"), "{}", second.log());
}

#[tokio::test]
async fn a_torn_spool_tail_is_reported_at_start_up_and_set_aside() {
    let env = TestEnv::new();
    let data = env.dir.path().join("torn-data");
    let socket = env.dir.path().join("torn.sock").display().to_string();
    {
        let mut daemon = env.daemon().flag("socket", &socket).flag("data-dir", data.display()).start().await;
        daemon.client().await.publish("t.torn", &1).await.unwrap();
        daemon.kill();
    }
    // A write the crash cut short: a few bytes of a record header at the end of a segment.
    let lane = std::fs::read_dir(data.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir() && !p.ends_with("quarantine"))
        .unwrap();
    let segment =
        std::fs::read_dir(&lane).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "seg")).max().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&segment).unwrap();
    std::io::Write::write_all(&mut f, &[7, 0, 0, 0, 1, 2]).unwrap();
    let daemon = env.daemon().flag("socket", &socket).flag("data-dir", data.display()).start().await;
    eventually("the torn tail reported", Duration::from_secs(10), || async { daemon.log().contains("torn tail").then_some(()) }).await;
    assert!(data.join("spool/quarantine").read_dir().unwrap().count() == 1, "the bytes are kept aside");
    daemon.client().await.publish("t.torn", &2).await.unwrap();
}
