//! Monitoring against real Redis and Postgres: `stats` counters, lag and pending moving as they
//! should; `/metrics` in the Prometheus text format with the expected series; `/healthz`;
//! `/readyz` turning 503 while Redis is stopped and 200 when it is back; systemd readiness on a
//! test NOTIFY_SOCKET; JSON logs without event data; `sidebus stats` and `sidebus top`.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use sidebus_client::{Client, GroupStats, SubscribeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::servers::{RedisServer, free_port};
use crate::harness::{TestEnv, eventually, next};

const WAIT: Duration = Duration::from_secs(10);

async fn group(c: &Client, event_type: &str, name: &str) -> GroupStats {
    let s = c.stats().await.unwrap();
    s.groups.into_iter().find(|g| g.event_type == event_type && g.group == name).unwrap_or_else(|| panic!("{event_type}/{name} in stats"))
}

/// GET `path` on `port`: (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the metrics listener");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // Chunked bodies: drop the chunk-size lines (hex numbers alone on a line).
    let body = body
        .lines()
        .filter(|l| !(l.len() <= 8 && !l.is_empty() && l.chars().all(|c| c.is_ascii_hexdigit())))
        .collect::<Vec<_>>()
        .join("\n");
    (status, body)
}

#[tokio::test]
async fn stats_counts_and_shows_lag_pending_and_dead_letters() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    // The group exists and nobody reads: events wait.
    c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    for i in 0..10 {
        let mut p = sidebus_client::Publish::new("order.created", sidebus_client::encode(&i).unwrap());
        p.durability = sidebus_client::Durability::Committed;
        c.publish_with(p).await.unwrap();
    }
    let g = group(&c, "order.created", "billing").await;
    assert_eq!((g.lag, g.pending, g.consumers), (10, 0, 0));
    let s = c.stats().await.unwrap();
    assert_eq!(s.counter("published"), 10);
    assert!(s.counter("spooled") >= 10 && s.counter("flushed") >= 10, "{:?}", s.counters);

    let mut sub = c.subscribe("order.created", "billing", SubscribeOptions { max_in_flight: Some(4), ..Default::default() }).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut sub, WAIT).await);
    }
    let g = eventually("four pending", WAIT, || async {
        let g = group(&c, "order.created", "billing").await;
        (g.pending == 4).then_some(g)
    })
    .await;
    assert_eq!((g.lag, g.consumers), (6, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(group(&c, "order.created", "billing").await.oldest_pending_ms >= 200);
    let mut held = held.into_iter();
    held.next().unwrap().nack_with(Some("poison"), None, true).await.unwrap();
    for d in held {
        d.ack().await.unwrap();
    }
    for _ in 0..6 {
        next(&mut sub, WAIT).await.ack().await.unwrap();
    }
    let g = eventually("everything settled", WAIT, || async {
        let g = group(&c, "order.created", "billing").await;
        (g.pending == 0 && g.lag == 0).then_some(g)
    })
    .await;
    assert_eq!(g.dead_letters, 1);
    let s = c.stats().await.unwrap();
    assert_eq!((s.counter("delivered"), s.counter("acked"), s.counter("nacked"), s.counter("dead_lettered")), (10, 9, 1, 1));
    // Bad frames and refused publishes are counted.
    c.register_schema("strict.type", &json!({"type": "integer"})).await.unwrap();
    assert!(c.publish("strict.type", &"text").await.is_err());
    assert_eq!(c.stats().await.unwrap().counter("validation_failures"), 1);
}

#[tokio::test]
async fn stats_names_each_backend_its_state_and_what_was_handed_back() {
    // Redis at an address where nothing listens, with a password in the URL.
    let port = free_port();
    let env = TestEnv::on(format!("redis://:hunter2@127.0.0.1:{port}"));
    let mut daemon = env.daemon().spawn();
    let c = eventually("the socket", WAIT, || async { Client::connect(&daemon.socket).await.ok() }).await;
    let s = eventually("Redis down in stats", WAIT, || async {
        let s = c.stats().await.unwrap();
        s.backends.iter().any(|b| b.name == "redis" && !b.up && b.error.as_deref() != Some("connecting")).then_some(s)
    })
    .await;
    let redis = s.backends.iter().find(|b| b.name == "redis").unwrap();
    assert_eq!(redis.address, format!("redis://127.0.0.1:{port}"), "the address, without the password");
    assert!(redis.error.as_deref().is_some_and(|e| !e.is_empty() && !e.contains("hunter2")), "{redis:?}");
    let pg = eventually("Postgres up", WAIT, || async {
        let s = c.stats().await.unwrap();
        s.backends.into_iter().find(|b| b.name == "postgres" && b.up)
    })
    .await;
    assert!(pg.error.is_none() && pg.address.starts_with("postgres://"), "{pg:?}");
    let log = daemon.log();
    assert!(log.contains(&format!("Redis unreachable; retrying redis://127.0.0.1:{port}")), "the log names the address:\n{log}");
    assert!(!log.contains("hunter2"), "the password never shows:\n{log}");
    daemon.signal("TERM");
    daemon.wait_exit(WAIT).await;

    // Deliveries handed back are scheduled (ready for the next consumer), not pending.
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("parcel.sent", "tracking", SubscribeOptions::default()).await.unwrap();
    for i in 0..3 {
        c.publish("parcel.sent", &i).await.unwrap();
    }
    let _held = [next(&mut sub, WAIT).await, next(&mut sub, WAIT).await, next(&mut sub, WAIT).await];
    let g = eventually("three pending", WAIT, || async {
        let g = group(&c, "parcel.sent", "tracking").await;
        (g.pending == 3).then_some(g)
    })
    .await;
    assert_eq!(g.scheduled, 0);
    sub.unsubscribe().await.unwrap();
    let g = eventually("three handed back", WAIT, || async {
        let g = group(&c, "parcel.sent", "tracking").await;
        (g.scheduled == 3).then_some(g)
    })
    .await;
    assert_eq!((g.pending, g.consumers), (0, 0), "{g:?}");
    let s = c.stats().await.unwrap();
    assert!(s.backends.iter().all(|b| b.up), "{:?}", s.backends);
}

#[tokio::test]
async fn metrics_health_and_readiness_over_http() {
    let redis = RedisServer::start();
    let port = redis.port;
    let env = TestEnv::on(redis.url());
    let http = free_port();
    let daemon = env.daemon().flag("metrics-addr", http).start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();
    for i in 0..5 {
        c.publish("order.created", &i).await.unwrap();
        next(&mut sub, WAIT).await.ack().await.unwrap();
    }
    assert_eq!(get(http, "/healthz").await.0, 200);
    eventually("ready", WAIT, || async { (get(http, "/readyz").await.0 == 200).then_some(()) }).await;

    let (status, body) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    // The text format: comments, or `name{labels} value`.
    for line in body.lines().filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            assert!(line.starts_with("# TYPE ") || line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
    }
    for want in [
        "sidebus_published_total 5",
        "sidebus_acked_total 5",
        "sidebus_group_lag{type=\"order.created\",group=\"billing\"} 0",
        "sidebus_group_consumers{type=\"order.created\",group=\"billing\"} 1",
        "sidebus_spool_events",
        "sidebus_publish_ack_seconds_bucket",
        "sidebus_delivery_latency_seconds_count 5",
    ] {
        assert!(body.lines().any(|l| l.starts_with(want)), "missing {want} in:\n{body}");
    }

    // Every series the Grafana dashboard queries is one the daemon serves.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/sidebus.json")).unwrap())
            .unwrap();
    let text = dashboard.to_string();
    let mut queried: Vec<&str> =
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("sidebus_")).collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        assert!(body.lines().any(|l| l.starts_with(name)), "the dashboard queries {name}, which /metrics does not serve");
    }
    assert!(dashboard["panels"].as_array().unwrap().iter().all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));

    drop(redis);
    eventually("not ready without Redis", Duration::from_secs(20), || async { (get(http, "/readyz").await.0 == 503).then_some(()) }).await;
    assert_eq!(get(http, "/readyz/publish").await.0, 200, "publishes are still taken into the spool");
    assert_eq!(get(http, "/healthz").await.0, 200);
    let _redis = RedisServer::start_on(port);
    eventually("ready again", Duration::from_secs(30), || async { (get(http, "/readyz").await.0 == 200).then_some(()) }).await;
}

#[tokio::test]
async fn systemd_is_told_ready_and_stopping() {
    let env = TestEnv::new();
    let path = env.dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
    let daemon = env.daemon().env("NOTIFY_SOCKET", path.display()).start().await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf)).await.expect("a notification").unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=listening on"), "{msg}");
    daemon.signal("TERM");
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf)).await.expect("a notification").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1"));
}

#[tokio::test]
async fn json_logs_carry_the_fields_and_never_the_data() {
    let env = TestEnv::new();
    let mut daemon = env.daemon().flag("log-format", "json").start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("user.signup", "mailer", SubscribeOptions { max_attempts: Some(1), ..Default::default() }).await.unwrap();
    c.publish("user.signup", &json!({"password": "hunter2-secret"})).await.unwrap();
    next(&mut sub, WAIT).await.nack("bad").await.unwrap();
    drop(sub);
    drop(c);
    daemon.signal("TERM");
    daemon.wait_exit(WAIT).await;
    let log = daemon.log();
    assert!(!log.contains("hunter2-secret"), "event data in the log");
    let lines: Vec<serde_json::Value> =
        log.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string() && l["message"].is_string()));
    let dead = lines.iter().find(|l| l["message"] == "dead-lettered").expect("the dead letter is logged");
    assert_eq!((dead["type"].as_str(), dead["group"].as_str()), (Some("user.signup"), Some("mailer")));
}

#[tokio::test]
async fn stats_and_top_on_the_command_line() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    c.publish("order.created", &1).await.unwrap();
    let run =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_sidebus")).args(args).env("SIDEBUS_SOCKET", daemon.socket()).output().unwrap();
    let v: serde_json::Value = eventually("the event counted", WAIT, || async {
        let out = run(&["stats", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["groups"][0]["lag"] == 1).then_some(v)
    })
    .await;
    assert_eq!(v["counters"]["published"], 1);
    assert_eq!(v["groups"][0]["group"], "billing");
    let out = run(&["stats"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("order.created/billing"), "{out:?}");
    let out = run(&["top", "--count", "2", "--interval", "0.2"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("TYPE/GROUP").count(), 2, "two plain snapshots: {text}");
    assert!(!text.contains('\x1b'), "no escape codes when stdout is not a terminal");
    assert!(text.contains("/s)"), "rates from the second refresh on: {text}");
    for cmd in ["stats", "top"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args([cmd, "--help"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Example"), "{cmd} --help");
    }
}
