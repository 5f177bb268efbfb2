//! Results 4 and 5 of README.md as operations, on real Redis and Postgres: a replay reaches only
//! the group named, resumes after a restart and can be cancelled; dead letters are listed with
//! their history, recorded in Postgres (they outlive Redis), redriven with a fresh attempt count
//! and purged; bad requests change nothing; the command line for each.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sidebus_client::{Client, DlqAction, DlqList, Error, SubscribeOptions};
use sidebus_protocol::ErrorCode;

use crate::harness::{Daemon, TestEnv, assert_quiet, dead_letters, eventually, next};

const WAIT: Duration = Duration::from_secs(10);

fn code(e: Error) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("expected an error reply, got {e:?}"))
}

fn hour_ago() -> String {
    (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339()
}

/// Publishes `n` events and lets `sub` receive and ack them.
async fn publish_and_consume(c: &Client, subs: &mut [&mut sidebus_client::Subscription], event_type: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(c.publish(event_type, &json!({ "n": i })).await.unwrap().event_id);
    }
    for sub in subs.iter_mut() {
        for _ in 0..n {
            next(sub, WAIT).await.ack().await.unwrap();
        }
    }
    ids
}

#[tokio::test]
async fn result_4_a_replay_reaches_only_the_group_named_in_log_order() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut billing = c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    let mut shipping = c.subscribe("order.created", "shipping", SubscribeOptions::default()).await.unwrap();
    let ids = publish_and_consume(&c, &mut [&mut billing, &mut shipping], "order.created", 20).await;

    let started = c.replay("order.created", "billing", &hour_ago(), None).await.unwrap();
    assert_eq!(started.count, 20);
    let mut again = Vec::new();
    for _ in 0..20 {
        let d = next(&mut billing, WAIT).await;
        assert!(d.event.replayed, "marked replayed");
        assert_eq!(d.attempt, 1);
        again.push(d.event.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(again, ids, "in log order");
    assert_quiet(&mut shipping, Duration::from_millis(700)).await;
    // Live traffic flows beside it, unmarked.
    let live = c.publish("order.created", &json!({"n": "live"})).await.unwrap().event_id;
    let d = next(&mut billing, WAIT).await;
    assert_eq!((d.event.id.as_str(), d.event.replayed), (live.as_str(), false));
    d.ack().await.unwrap();
    let replay = started.replay.unwrap();
    let finished = eventually("the replay to be done", WAIT, || async {
        c.replays(true).await.unwrap().replays.into_iter().find(|r| r.replay == replay && r.status == "done")
    })
    .await;
    assert_eq!((finished.added, finished.total, finished.reason.as_str()), (20, Some(20), "request"));
    assert!(c.replays(false).await.unwrap().replays.is_empty(), "nothing running");
}

#[tokio::test]
async fn bad_replays_are_refused_and_start_nothing() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut g = c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    publish_and_consume(&c, &mut [&mut g], "order.created", 2).await;
    assert_eq!(code(c.replay("order.created", "nobody", &hour_ago(), None).await.unwrap_err()), ErrorCode::NotFound);
    assert_eq!(code(c.replay("order.created", "billing", "yesterday", None).await.unwrap_err()), ErrorCode::BadRequest);
    let now = chrono::Utc::now().to_rfc3339();
    assert_eq!(code(c.replay("order.created", "billing", &now, Some(&hour_ago())).await.unwrap_err()), ErrorCode::BadRequest);
    let empty = c.replay("order.created", "billing", "2001-01-01T00:00:00Z", Some("2001-01-02T00:00:00Z")).await.unwrap();
    assert_eq!((empty.count, empty.replay), (0, None));
    assert!(c.replays(true).await.unwrap().replays.is_empty(), "no replay was started");
    assert_eq!(code(c.replay_cancel("not-an-id").await.unwrap_err()), ErrorCode::BadRequest);
    assert_eq!(code(c.replay_cancel(&uuid::Uuid::new_v4().to_string()).await.unwrap_err()), ErrorCode::NotFound);
    assert_quiet(&mut g, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_replay_resumes_after_a_restart_and_can_be_cancelled() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    // More than the replay's window, so it is waiting half way when the daemon stops.
    let n = 6000;
    {
        // The group exists and has seen everything.
        let mut g =
            c.subscribe("metric.taken", "reports", SubscribeOptions { max_in_flight: Some(1024), ..Default::default() }).await.unwrap();
        let pending: Vec<_> = {
            let mut v = Vec::new();
            for i in 0..n {
                v.push(c.publish_start(sidebus_client::Publish::new("metric.taken", sidebus_client::encode(&i).unwrap())).await.unwrap());
            }
            v
        };
        for p in pending {
            p.wait().await.unwrap();
        }
        for _ in 0..n {
            next(&mut g, WAIT).await.ack().await.unwrap();
        }
        g.unsubscribe().await.unwrap();
    }
    // No consumer: the replay fills the group's lane up to its window and waits there.
    let started = c.replay("metric.taken", "reports", &hour_ago(), None).await.unwrap();
    assert_eq!(started.count, n as u64);
    let replay = started.replay.unwrap();
    eventually("the replay to stop at its window", WAIT, || async {
        c.replays(false).await.unwrap().replays.into_iter().find(|r| r.replay == replay && r.added >= 4000)
    })
    .await;
    drop(c);
    daemon.terminate().await;
    let daemon = env.restart_first().await;
    let c = daemon.client().await;
    let mut g = c.subscribe("metric.taken", "reports", SubscribeOptions { max_in_flight: Some(1024), ..Default::default() }).await.unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    while seen.len() < n {
        let d = next(&mut g, WAIT).await;
        assert!(d.event.replayed);
        *seen.entry(d.event.id.clone()).or_default() += 1;
        d.ack().await.unwrap();
    }
    assert!(seen.values().all(|n| *n == 1), "resumed, not started over");
    assert_quiet(&mut g, Duration::from_millis(500)).await;

    // Cancelled half way: it stops adding.
    drop(g);
    let second = c.replay("metric.taken", "reports", &hour_ago(), None).await.unwrap().replay.unwrap();
    eventually("the second replay to fill its window", WAIT, || async {
        c.replays(false).await.unwrap().replays.into_iter().find(|r| r.replay == second && r.added >= 4000)
    })
    .await;
    c.replay_cancel(&second).await.unwrap();
    let r = eventually("the cancelled replay", WAIT, || async {
        c.replays(true).await.unwrap().replays.into_iter().find(|r| r.replay == second && r.status == "cancelled")
    })
    .await;
    assert!(r.added < n as u64, "stopped before the end: {}", r.added);
    assert_eq!(code(c.replay_cancel(&second).await.unwrap_err()), ErrorCode::NotFound, "cancelling twice");
}

/// Dead-letters `n` events of `user.signup` for `notification` (max_attempts 2).
async fn kill_events(c: &Client, n: usize) -> Vec<String> {
    let mut sub =
        c.subscribe("user.signup", "notification", SubscribeOptions { max_attempts: Some(2), ..Default::default() }).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(c.publish("user.signup", &json!({"email": format!("bad-{i}")})).await.unwrap().event_id);
    }
    for _ in 0..2 * n {
        let d = next(&mut sub, WAIT).await;
        d.nack(&format!("malformed email (attempt {})", d.attempt)).await.unwrap();
    }
    sub.unsubscribe().await.unwrap();
    ids
}

#[tokio::test]
async fn result_5_dead_letters_are_listed_redriven_with_a_fresh_attempt_and_purged() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("backoff-initial-ms", 50).start().await;
    let c = daemon.client().await;
    let ids = kill_events(&c, 4).await;
    let dead = eventually("four dead letters", WAIT, || async {
        let d = dead_letters(&c, "user.signup", "notification").await;
        (d.len() == 4).then_some(d)
    })
    .await;
    // In the order they died.
    let mut dead_ids: Vec<String> = dead.iter().map(|d| sidebus_protocol::Event::decode(d.event.clone()).unwrap().id).collect();
    dead_ids.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(dead_ids, sorted);
    assert!(dead.iter().all(|d| d.attempts == 2 && d.error == "malformed email (attempt 2)" && d.history.len() == 2));

    // Pages.
    let page = c
        .dlq_list(DlqList { event_type: "user.signup".into(), group: "notification".into(), limit: Some(3), after: None, ids: vec![] })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 3);
    let rest = c
        .dlq_list(DlqList { event_type: "user.signup".into(), group: "notification".into(), limit: Some(3), after: page.next, ids: vec![] })
        .await
        .unwrap();
    assert_eq!(rest.entries.len(), 1);

    // A redrive naming an id that is not a dead letter changes nothing.
    let action = |ids: Vec<String>| DlqAction { event_type: "user.signup".into(), group: "notification".into(), ids, rate: None };
    let err = c.dlq_redrive(action(vec![ids[0].clone(), "no-such-event".into()])).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::NotFound);
    assert_eq!(dead_letters(&c, "user.signup", "notification").await.len(), 4, "nothing changed");
    // Another group sees nothing of the redrive.
    let mut other = c.subscribe("user.signup", "audit", SubscribeOptions::default()).await.unwrap();

    let mut sub = c.subscribe("user.signup", "notification", SubscribeOptions::default()).await.unwrap();
    assert_eq!(c.dlq_redrive(action(vec![ids[0].clone(), ids[1].clone()])).await.unwrap(), 2);
    let mut back = Vec::new();
    for _ in 0..2 {
        let d = next(&mut sub, WAIT).await;
        assert_eq!(d.attempt, 1, "a fresh attempt count");
        assert!(!d.event.replayed);
        back.push(d.event.id.clone());
        d.ack().await.unwrap();
    }
    back.sort();
    let mut want = vec![ids[0].clone(), ids[1].clone()];
    want.sort();
    assert_eq!(back, want);
    assert_quiet(&mut other, Duration::from_millis(300)).await;
    assert_eq!(dead_letters(&c, "user.signup", "notification").await.len(), 2);

    assert_eq!(code(c.dlq_purge(action(vec![ids[0].clone()])).await.unwrap_err()), ErrorCode::NotFound, "redriven, so not dead");
    assert_eq!(c.dlq_purge(action(vec![ids[2].clone()])).await.unwrap(), 1);
    assert_eq!(c.dlq_purge(action(vec![])).await.unwrap(), 1);
    assert!(dead_letters(&c, "user.signup", "notification").await.is_empty());
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    assert_eq!(code(c.dlq_purge(DlqAction { group: "nobody".into(), ..action(vec![]) }).await.unwrap_err()), ErrorCode::NotFound);
}

#[tokio::test]
async fn dead_letters_are_recorded_in_postgres_and_outlive_redis() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("backoff-initial-ms", 50).start().await;
    let c = daemon.client().await;
    let ids = kill_events(&c, 2).await;
    // The janitor copies them into the log on its own.
    let db = sqlx::PgPool::connect(&env.database_url).await.unwrap();
    eventually("the dead letters in the log", Duration::from_secs(20), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE status = 'dead'").fetch_one(&db).await.unwrap();
        (n == 2).then_some(())
    })
    .await;
    // Redis loses the group's dead-letter stream (and everything else of this namespace).
    let mut r = env.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", env.namespace)).query_async(&mut r).await.unwrap();
    redis::cmd("DEL").arg(&keys).query_async::<()>(&mut r).await.unwrap();
    let dead = dead_letters(&c, "user.signup", "notification").await;
    let mut dead_ids: Vec<String> = dead.iter().map(|d| sidebus_protocol::Event::decode(d.event.clone()).unwrap().id).collect();
    dead_ids.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(dead_ids, want);
    let (history,): (Value,) = sqlx::query_as("SELECT history FROM dead_letters LIMIT 1").fetch_one(&db).await.unwrap();
    assert_eq!(history.as_array().map(Vec::len), Some(2), "the attempt history is recorded: {history}");
}

fn sidebus(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sidebus")).args(args).env("SIDEBUS_SOCKET", daemon.socket()).output().expect("run sidebus")
}

#[tokio::test]
async fn the_command_line_replays_and_handles_dead_letters() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("backoff-initial-ms", 50).start().await;
    let c = daemon.client().await;
    let ids = kill_events(&c, 3).await;
    eventually("three dead letters", WAIT, || async { (dead_letters(&c, "user.signup", "notification").await.len() == 3).then_some(()) })
        .await;

    let out = sidebus(&daemon, &["dlq", "list", "user.signup", "--group", "notification", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut listed: Vec<&str> = v["entries"].as_array().unwrap().iter().map(|e| e["event"]["id"].as_str().unwrap()).collect();
    listed.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(listed, want);
    assert!(v["entries"][0]["event"]["data"]["email"].as_str().unwrap().starts_with("bad-"), "{v}");
    let out = sidebus(&daemon, &["dlq", "list", "user.signup", "--group", "notification"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4, "a header and three rows: {out:?}");

    let out = sidebus(&daemon, &["dlq", "show", "user.signup", "--group", "notification", &ids[0]]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("malformed email (attempt 1)"), "{out:?}");

    let out = sidebus(&daemon, &["dlq", "redrive", "user.signup", "--group", "notification", "--id", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let mut sub = c.subscribe("user.signup", "notification", SubscribeOptions::default()).await.unwrap();
    let out = sidebus(&daemon, &["dlq", "redrive", "user.signup", "--group", "notification", "--id", &ids[0], "--rate", "10"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "redriven 1", "{out:?}");
    let d = next(&mut sub, WAIT).await;
    assert_eq!((d.event.id.as_str(), d.attempt), (ids[0].as_str(), 1));
    d.ack().await.unwrap();

    let out = sidebus(&daemon, &["dlq", "purge", "user.signup", "--group", "notification"]);
    assert_eq!(out.status.code(), Some(65), "purge without --id or --all: {out:?}");
    let out = sidebus(&daemon, &["dlq", "purge", "user.signup", "--group", "notification", "--all", "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"count": 2}));

    let out = sidebus(&daemon, &["replay", "user.signup", "--group", "notification", "--since", "1h", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["count"], 3);
    for _ in 0..3 {
        let d = next(&mut sub, WAIT).await;
        assert!(d.event.replayed);
        d.ack().await.unwrap();
    }
    let out = sidebus(&daemon, &["replays", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replays"].as_array().unwrap().len(), 1, "{v}");
    let out = sidebus(&daemon, &["replay", "user.signup", "--group", "notification", "--since", "soon"]);
    assert_eq!(out.status.code(), Some(65));
    let out = sidebus(&daemon, &["replay", "user.signup", "--group", "nobody", "--since", "1h"]);
    assert_eq!(out.status.code(), Some(1));
    for cmd in [
        &["replay", "--help"][..],
        &["replays", "--help"],
        &["dlq", "list", "--help"],
        &["dlq", "show", "--help"],
        &["dlq", "redrive", "--help"],
        &["dlq", "purge", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(cmd).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Example"), "{cmd:?} --help has an example");
    }
}

#[tokio::test]
async fn a_delayed_event_is_delivered_at_its_time_even_across_a_restart() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("reminder.due", "mailer", SubscribeOptions::default()).await.unwrap();
    let published = std::time::Instant::now();
    let mut p = sidebus_client::Publish::new("reminder.due", sidebus_client::encode(&"later").unwrap());
    p.delay_ms = Some(3000);
    let delayed = c.publish_with(p).await.unwrap().event_id;
    let now = c.publish("reminder.due", &"now").await.unwrap().event_id;
    let d = next(&mut sub, WAIT).await;
    assert_eq!(d.event.id, now, "an event without delay is not held behind a delayed one");
    d.ack().await.unwrap();
    // The delayed event is in the log at once.
    let db = sqlx::PgPool::connect(&env.database_url).await.unwrap();
    eventually("the delayed event in the log", WAIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE id = $1").bind(&delayed).fetch_one(&db).await.unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert_quiet(&mut sub, Duration::from_millis(800)).await;
    drop(sub);
    drop(c);
    daemon.terminate().await;
    let daemon = env.restart_first().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("reminder.due", "mailer", SubscribeOptions::default()).await.unwrap();
    let d = next(&mut sub, WAIT).await;
    assert_eq!(d.event.id, delayed);
    assert!(published.elapsed() >= Duration::from_millis(3000), "delivered after {:?}", published.elapsed());
    assert!(d.event.deliverat.is_some());
    d.ack().await.unwrap();

    // A time already past is now; bad times are refused.
    let mut p = sidebus_client::Publish::new("reminder.due", sidebus_client::encode(&"past").unwrap());
    p.deliver_at = Some("2001-01-01T00:00:00Z".into());
    let past = c.publish_with(p).await.unwrap().event_id;
    let d = next(&mut sub, WAIT).await;
    assert_eq!((d.event.id.as_str(), d.event.deliverat.as_deref()), (past.as_str(), None));
    d.ack().await.unwrap();
    for (at, delay) in [(Some("tomorrow"), None), (Some("2026-11-27T10:00:00Z"), Some(5)), (Some("2999-01-01T00:00:00Z"), None)] {
        let mut p = sidebus_client::Publish::new("reminder.due", sidebus_client::encode(&"bad").unwrap());
        p.deliver_at = at.map(str::to_owned);
        p.delay_ms = delay;
        assert_eq!(code(c.publish_with(p).await.unwrap_err()), ErrorCode::BadRequest, "{at:?} {delay:?}");
    }
}
