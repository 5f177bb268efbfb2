//! `sidebus ping`, `stats` and `top` against a real daemon: backends up and down with the exit
//! codes scripts read, the retry schedule per group, JSON, and text that fits its width.

use std::time::Duration;

use serde_json::Value;
use sidebus_client::SubscribeOptions;

use crate::cli::{run, run_async, sidebus, stderr, stdout};
use crate::harness::servers::RedisServer;
use crate::harness::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(10);

fn assert_fits(text: &str, width: usize) {
    for line in text.lines() {
        assert!(line.chars().count() <= width, "a line over {width} columns:\n{line}\nin:\n{text}");
    }
}

#[tokio::test]
async fn ping_says_which_backend_is_down_and_exits_by_it() {
    let redis = RedisServer::start();
    let env = TestEnv::on(redis.url());
    let daemon = env.daemon().start().await;
    let out = eventually("ping with both backends up", WAIT, || {
        let cmd = sidebus(&daemon, &["ping"]);
        async move {
            let out = run_async(cmd).await;
            (out.status.code() == Some(0)).then_some(out)
        }
    })
    .await;
    let text = stdout(&out);
    assert!(text.starts_with("sidebus on node") && text.contains("answered in"), "{text}");
    for name in ["redis", "postgres"] {
        assert!(text.lines().any(|l| l.starts_with(name) && l.contains(" up ")), "{name} up: {text}");
    }
    let out = run(sidebus(&daemon, &["health", "--json"]));
    assert_eq!(out.status.code(), Some(0), "health is ping: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["up"], true);
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(2), "{v}");

    drop(redis);
    let out = eventually("ping to see Redis down", WAIT, || {
        let cmd = sidebus(&daemon, &["ping"]);
        async move {
            let out = run_async(cmd).await;
            (out.status.code() == Some(1)).then_some(out)
        }
    })
    .await;
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("redis") && l.contains("DOWN")), "{text}");
    assert!(text.contains("error: "), "the last error: {text}");
    assert!(text.lines().any(|l| l.starts_with("postgres") && l.contains(" up ")), "{text}");
    let v: Value = serde_json::from_slice(&run(sidebus(&daemon, &["ping", "--json"])).stdout).unwrap();
    let redis = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == "redis").unwrap().clone();
    assert_eq!((v["up"].as_bool(), redis["up"].as_bool()), (Some(false), Some(false)), "{v}");
    assert!(redis["error"].is_string(), "{v}");
    // And the stats text has a line per backend.
    let text = stdout(&run(sidebus(&daemon, &["stats"])));
    assert!(text.lines().any(|l| l.starts_with("redis") && l.contains("DOWN")), "{text}");

    drop(daemon);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sidebus"));
    cmd.args(["ping", "--socket"]).arg(env.dir.path().join("nobody.sock"));
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(stderr(&out).contains("is `sidebus run` running?"), "{out:?}");
}

#[tokio::test]
async fn stats_and_top_show_the_retry_schedule_and_fit_their_width() {
    let env = TestEnv::new();
    // A failed attempt waits a minute in the retry schedule.
    let daemon = env.daemon().flag("backoff-initial-ms", 60_000).flag("backoff-max-ms", 60_000).start().await;
    let c = daemon.client().await;
    let (event_type, group) = ("order.created.with.a.long.name", "analytics-warehouse-loader-eu1");
    c.subscribe(event_type, group, SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    c.publish(event_type, &1).await.unwrap();
    c.publish("order.created", &2).await.unwrap();
    let out = run_async(sidebus(&daemon, &["tail", event_type, "--group", group, "--fail", "later", "--count", "1"])).await;
    assert!(out.status.success(), "{out:?}");

    let v: Value = eventually("the failed attempt scheduled", WAIT, || {
        let cmd = sidebus(&daemon, &["stats", "--json"]);
        async move {
            let v: Value = serde_json::from_slice(&run_async(cmd).await.stdout).ok()?;
            let g = v["groups"].as_array()?.iter().find(|g| g["group"] == group)?.clone();
            (g["scheduled"] == 1 && g["pending"] == 0).then_some(v)
        }
    })
    .await;
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(v["backends"].as_array().unwrap().iter().all(|b| b["up"] == true), "{v}");

    let out = run(sidebus(&daemon, &["stats"]));
    let text = stdout(&out);
    assert_fits(&text, 80);
    assert!(text.contains("SCHEDULED") && text.lines().any(|l| l.starts_with("redis")), "{text}");
    let name = format!("{event_type}/{group}");
    let at = text.lines().position(|l| l.trim() == name).expect("a name too long for the column has a line of its own");
    let numbers: Vec<&str> = text.lines().nth(at + 1).unwrap().split_whitespace().collect();
    assert_eq!(numbers, ["0", "0", "1", "-", "0", "0"], "lag, pending, scheduled, oldest, dead, consumers:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("order.created/billing ")), "a short name shares its line:\n{text}");

    // top when stdout is not a terminal: plain snapshots of 80 columns, or --width.
    let out = run(sidebus(&daemon, &["top", "--count", "2", "--interval", "0.2"]));
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert_fits(&text, 80);
    assert_eq!(text.matches("TYPE/GROUP").count(), 2, "{text}");
    assert!(text.contains("published 2 (0/s)"), "rates from the second refresh on: {text}");
    let wide = stdout(&run(sidebus(&daemon, &["top", "--count", "1", "--width", "120"])));
    assert_fits(&wide, 120);
    assert!(wide.lines().any(|l| l.starts_with(&name) && l.trim_end().ends_with('0')), "at 120 the name fits its row:\n{wide}");
    assert!(wide.lines().any(|l| l.chars().count() > 80), "the width is used:\n{wide}");

    let out = run(sidebus(&daemon, &["top", "--json", "--count", "2", "--interval", "0.2"]));
    let snapshots: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(snapshots.len(), 2, "{out:?}");
    assert!(snapshots[0].get("rates").is_none() && snapshots[1]["rates"]["published"].is_number(), "{snapshots:?}");
    assert!(snapshots[1]["groups"].as_array().unwrap().iter().any(|g| g["scheduled"] == 1));
}
