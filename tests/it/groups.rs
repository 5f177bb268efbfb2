//! The lifecycle of consumer groups against real Redis and Postgres: `groups` lists each with
//! its state, `group_delete` refuses while subscriptions live and with `force` removes the group
//! everywhere (ending subscriptions here at once and on other daemons at their next read),
//! `group_reset` moves a group to the end, the start or a time, `sidebus tail` without `--group`
//! deletes its group on exit, `group_idle_ttl` deletes an idle group, the `groups` right of the
//! access list, and leases: a dead daemon's deliveries wait for its subscription's
//! `ack_timeout_ms`, not for another daemon's default.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sidebus_client::{ErrorCode, SubscribeOptions};

use crate::cli::{Background, run_async, sidebus, stderr, stdout};
use crate::harness::{TestEnv, eventually, next};

const WAIT: Duration = Duration::from_secs(10);

/// Every Redis key of the namespace that names the group.
async fn keys_of(env: &TestEnv, event_type: &str, group: &str) -> Vec<String> {
    let all: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", env.namespace)).query_async(&mut env.redis().await).await.unwrap();
    all.into_iter().filter(|k| k.contains(&format!("{event_type}:{group}"))).collect()
}

/// The groups Redis has on a type's stream.
async fn redis_groups(env: &TestEnv, event_type: &str) -> Vec<String> {
    let v: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(format!("{}:s:{event_type}", env.namespace))
        .query_async(&mut env.redis().await)
        .await
        .unwrap_or(redis::Value::Nil);
    let redis::Value::Array(groups) = v else { return vec![] };
    groups
        .into_iter()
        .filter_map(|g| {
            let redis::Value::Array(f) = g else { return None };
            f.chunks(2).find_map(|p| match p {
                [redis::Value::BulkString(k), redis::Value::BulkString(v)] if k == b"name" => Some(String::from_utf8_lossy(v).into_owned()),
                _ => None,
            })
        })
        .collect()
}

#[tokio::test]
async fn groups_lists_each_group_with_its_state() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let opts = SubscribeOptions { max_in_flight: Some(2), ..Default::default() };
    let mut sub = c.subscribe("order.created", "billing", opts).await.unwrap();
    c.subscribe("order.created", "audit", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    c.subscribe("user.signup", "mailer", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    for i in 0..5 {
        c.publish("order.created", &i).await.unwrap();
    }
    // Two held (pending), one dead-lettered, two not read (lag).
    let first = next(&mut sub, WAIT).await;
    let _held = next(&mut sub, WAIT).await;
    first.nack_with(Some("poison"), None, true).await.unwrap();
    let _held2 = next(&mut sub, WAIT).await;
    let list = eventually("the billing group's state", WAIT, || async {
        let l = c.groups(Some("order.created")).await.unwrap();
        let g = l.groups.iter().find(|g| g.group == "billing")?.clone();
        (g.pending == 2 && g.dead_letters == 1 && g.lag == 2).then_some(l)
    })
    .await;
    let names: Vec<(&str, &str)> = list.groups.iter().map(|g| (g.event_type.as_str(), g.group.as_str())).collect();
    assert_eq!(names, [("order.created", "audit"), ("order.created", "billing")], "only the type asked for, by name");
    let billing = list.groups.iter().find(|g| g.group == "billing").unwrap();
    let audit = list.groups.iter().find(|g| g.group == "audit").unwrap();
    assert_eq!((billing.consumers, audit.consumers), (1, 0), "live subscriptions on every daemon");
    assert_eq!(audit.lag, 5);
    let created = chrono::DateTime::parse_from_rfc3339(&billing.created_at).unwrap();
    let active = chrono::DateTime::parse_from_rfc3339(&billing.last_active).unwrap();
    assert!(created >= before && active >= created, "{billing:?}");
    assert_eq!(c.groups(None).await.unwrap().groups.len(), 3, "every type's groups without a type");

    // The command line shows the same.
    let out = run_async(sidebus(&daemon, &["groups", "list", "order.created", "--json"])).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["groups"][1]["group"], "billing");
    assert_eq!(v["groups"][1]["consumers"], 1);
}

#[tokio::test]
async fn delete_is_refused_while_subscribed_and_force_removes_the_group_everywhere() {
    let env = TestEnv::new();
    let a = env.daemon().start().await;
    let b = env.daemon().start().await;
    let ca = a.client().await;
    let cb = b.client().await;
    let mut here = ca.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    let mut there = cb.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    for i in 0..4 {
        ca.publish("order.created", &i).await.unwrap();
    }
    // Some state in every key: deliveries held, a retry scheduled, a dead letter.
    let d = next(&mut here, WAIT).await;
    d.nack_with(Some("later"), Some(60_000), false).await.unwrap();
    let d = next(&mut there, WAIT).await;
    d.nack_with(Some("poison"), None, true).await.unwrap();
    ca.replay("order.created", "billing", "2000-01-01T00:00:00Z", None).await.unwrap();
    eventually("the group's keys", WAIT, || async { (keys_of(&env, "order.created", "billing").await.len() >= 4).then_some(()) }).await;

    let e = ca.group_delete("order.created", "billing", false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert!(e.to_string().contains("2 live subscription"), "{e}");
    let e = ca.group_delete("order.created", "nobody", false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");

    assert_eq!(ca.group_delete("order.created", "billing", true).await.unwrap(), 1, "the subscription here ended");
    // Here at once, with an error push naming it; on the other daemon at its next read.
    assert!(tokio::time::timeout(WAIT, async { while here.next().await.is_some() {} }).await.is_ok(), "the subscription here ends");
    assert!(here.end_reason().unwrap_or_default().contains("was deleted"), "{:?}", here.end_reason());
    assert!(tokio::time::timeout(WAIT, async { while there.next().await.is_some() {} }).await.is_ok(), "the one on the other daemon ends");
    assert!(there.end_reason().unwrap_or_default().contains("was deleted"), "{:?}", there.end_reason());

    // Nothing left: no Redis key of the group, no group on the stream, no record in the log, no
    // running replay. Its dead letter stays in the log.
    let gone = tokio::time::timeout(WAIT, async {
        while !keys_of(&env, "order.created", "billing").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "every key of the group gone, but: {:?}", keys_of(&env, "order.created", "billing").await);
    assert!(!redis_groups(&env, "order.created").await.contains(&"billing".to_owned()));
    let log = env.log().await;
    assert!(!log.group_exists("order.created", "billing").await.unwrap());
    assert!(ca.replays(false).await.unwrap().replays.iter().all(|r| r.group != "billing"), "its replays are cancelled");
    assert_eq!(log.dead_letter_counts().await.unwrap().get(&("order.created".into(), "billing".into())), Some(&1));
    assert!(ca.groups(None).await.unwrap().groups.is_empty());
    // A heartbeat of a subscription's lease that comes after the delete (a daemon that has not
    // noticed yet) records nothing.
    let streams = env.streams().await;
    streams.record_lease(&streams.group_keys("order.created", "billing"), "late-daemon", Duration::from_secs(30), 1, "t").await.unwrap();
    assert!(keys_of(&env, "order.created", "billing").await.is_empty(), "a late heartbeat brings nothing back");
    // The other daemon's worker does not bring it back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(keys_of(&env, "order.created", "billing").await.is_empty());
    assert!(!redis_groups(&env, "order.created").await.contains(&"billing".to_owned()));

    // A new subscribe creates it afresh, at the end of the stream.
    let mut again = cb.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    let id = ca.publish("order.created", &"new").await.unwrap().event_id;
    assert_eq!(next(&mut again, WAIT).await.event.id, id);
}

#[tokio::test]
async fn the_command_line_asks_before_deleting() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    c.subscribe("order.created", "test", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    let mut no_tty = sidebus(&daemon, &["groups", "delete", "order.created", "--group", "test"]);
    no_tty.stdin(std::process::Stdio::null());
    let out = run_async(no_tty).await;
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(c.groups(None).await.unwrap().groups.len(), 1, "not deleted");
    let out = run_async(sidebus(&daemon, &["groups", "delete", "order.created", "--group", "test", "--yes", "--json"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(c.groups(None).await.unwrap().groups.is_empty());
}

#[tokio::test]
async fn reset_moves_a_group_to_the_end_the_start_or_a_time() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    let mut early = Vec::new();
    for i in 0..3 {
        early.push(c.publish_with(committed("order.created", i)).await.unwrap().event_id);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let middle = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut late = Vec::new();
    for i in 3..5 {
        late.push(c.publish_with(committed("order.created", i)).await.unwrap().event_id);
    }
    let lag = |c: sidebus_client::Client| async move {
        c.groups(Some("order.created")).await.unwrap().groups.into_iter().find(|g| g.group == "billing").unwrap().lag
    };
    assert_eq!(lag(c.clone()).await, 5);
    c.group_reset("order.created", "billing", "end").await.unwrap();
    assert_eq!(lag(c.clone()).await, 0, "at the end, nothing left to read");
    c.group_reset("order.created", "billing", &middle.to_rfc3339()).await.unwrap();
    assert_eq!(lag(c.clone()).await, 2, "from the time on");
    let mut sub = c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut sub, WAIT).await;
        got.push(d.event.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, late);
    sub.unsubscribe().await.unwrap();
    let out = run_async(sidebus(&daemon, &["groups", "reset", "order.created", "--group", "billing", "--to", "start"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lag(c.clone()).await, 5, "from the start of what Redis holds");
    let mut sub = c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = next(&mut sub, WAIT).await;
        got.push(d.event.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, [early, late].concat());

    let e = c.group_reset("order.created", "billing", "yesterday").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    let e = c.group_reset("order.created", "nobody", "end").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
}

fn committed(event_type: &str, i: i32) -> sidebus_client::Publish {
    let mut p = sidebus_client::Publish::new(event_type, sidebus_client::encode(&i).unwrap());
    p.durability = sidebus_client::Durability::Committed;
    p
}

#[tokio::test]
async fn a_tail_without_group_deletes_its_own_group_when_it_exits() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    for (how, args) in [("TERM", vec![]), ("count", vec!["--count", "1"])] {
        let mut a = vec!["tail", "order.created"];
        a.extend(args);
        let mut tail = Background::spawn(sidebus(&daemon, &a));
        let line = tail.stderr_line("subscribed to order.created as tail-", WAIT).await;
        assert!(line.contains("deleted on exit"), "{line}");
        let group = eventually("the tail's group", WAIT, || async {
            c.groups(None).await.unwrap().groups.into_iter().find(|g| g.group.starts_with("tail-") && g.consumers == 1)
        })
        .await
        .group;
        assert!(group.contains(&format!("-{}-", tail.pid())), "{group}");
        if how == "TERM" {
            let ok = std::process::Command::new("kill").arg("-TERM").arg(tail.pid().to_string()).status().unwrap().success();
            assert!(ok);
        } else {
            c.publish("order.created", &1).await.unwrap();
        }
        let status = tail.wait(WAIT).await;
        assert!(status.success(), "{how}: {status:?}: {:?}", tail.err_lines);
        assert!(c.groups(None).await.unwrap().groups.iter().all(|g| g.group != group), "{how}: the group is gone");
        assert!(keys_of(&env, "order.created", &group).await.is_empty(), "{how}");
    }
}

#[tokio::test]
async fn a_group_idle_for_group_idle_ttl_is_deleted_and_counted() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("group-idle-ttl", "3s").start().await;
    let c = daemon.client().await;
    c.subscribe("order.created", "abandoned", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    let _kept = c.subscribe("order.created", "busy", SubscribeOptions::default()).await.unwrap();
    let start = Instant::now();
    eventually("the idle group deleted", Duration::from_secs(20), || async {
        c.groups(None).await.unwrap().groups.iter().all(|g| g.group != "abandoned").then_some(())
    })
    .await;
    assert!(start.elapsed() >= Duration::from_secs(2), "not before its ttl: {:?}", start.elapsed());
    assert_eq!(c.stats().await.unwrap().counter("groups_expired"), 1);
    assert!(daemon.log().contains("group_idle_ttl"), "a log line says so");
    // A group with a live subscription stays, however long.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(c.groups(None).await.unwrap().groups.iter().any(|g| g.group == "busy"));
    let metrics = c.stats().await.unwrap();
    assert_eq!(metrics.counter("groups_expired"), 1);
}

#[tokio::test]
async fn a_dead_daemons_deliveries_wait_for_its_subscriptions_lease_not_a_default() {
    let env = TestEnv::new();
    // The default ack timeout (30 s) on every daemon.
    let mut doomed = env.daemon().flag("ack-timeout-ms", 30_000).start().await;
    let survivor = env.daemon().flag("ack-timeout-ms", 30_000).start().await;
    let c = doomed.client().await;
    let short = SubscribeOptions { ack_timeout_ms: Some(2000), ..Default::default() };
    let mut sub = c.subscribe("order.created", "inventory", short).await.unwrap();
    let mut ids = HashSet::new();
    for i in 0..3 {
        ids.insert(c.publish("order.created", &i).await.unwrap().event_id);
    }
    for _ in 0..3 {
        next(&mut sub, WAIT).await;
    }
    // The other daemon's subscriber asks for the default lease.
    let c2 = survivor.client().await;
    let mut sub2 = c2.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap();
    doomed.kill();
    let killed = Instant::now();
    // A daemon that merely starts meanwhile raises nothing.
    let _third = env
        .daemon()
        .flag("ack-timeout-ms", 30_000)
        .config_file("[[groups]]\ntype = \"order.created\"\nname = \"inventory\"\n")
        .start()
        .await;
    let mut got = HashSet::new();
    for _ in 0..3 {
        let d = next(&mut sub2, Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
        assert_eq!(d.attempt, 2, "an expired lease is a failed attempt");
        got.insert(d.event.id.clone());
        d.ack().await.unwrap();
    }
    assert!(killed.elapsed() < Duration::from_secs(5), "redelivered {:?} after the kill", killed.elapsed());
    assert_eq!(got, ids);
}

#[tokio::test]
async fn group_ops_need_the_groups_right() {
    let env = TestEnv::new();
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    let config = format!(
        "[[access]]\nusers = [{uid}]\npublish = [\"*\"]\nsubscribe = [\"*:*\"]\nadmin = [\"stats\"]\n\n[[access]]\nusers = [{uid}]\nsubscribe = [\"order.created:mine\"]\nadmin = [\"groups\"]\n"
    );
    let daemon = env.daemon().config_file(&config).start().await;
    let c = daemon.client().await;
    for g in ["mine", "theirs"] {
        c.subscribe("order.created", g, SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    }
    let listed: Vec<String> = c.groups(None).await.unwrap().groups.into_iter().map(|g| g.group).collect();
    assert_eq!(listed, ["mine"], "only the groups the entry with `groups` may subscribe to");
    for e in [
        c.group_delete("order.created", "theirs", true).await.unwrap_err(),
        c.group_reset("order.created", "theirs", "end").await.unwrap_err(),
    ] {
        assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");
        assert!(e.to_string().contains("admin `groups`"), "{e}");
    }
    c.group_reset("order.created", "mine", "end").await.unwrap();
    c.group_delete("order.created", "mine", false).await.unwrap();
}
