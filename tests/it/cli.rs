//! The command line, run as a subprocess against a real daemon: `publish` (from --data and from
//! stdin), `tail` (ack and --no-ack), exit codes, and help with examples.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sidebus_client::SubscribeOptions;

use crate::harness::{Daemon, TestEnv, next};

fn sidebus(daemon: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sidebus"));
    c.args(args).env("SIDEBUS_SOCKET", daemon.socket());
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("run the sidebus binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn publish_from_data_and_from_stdin() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("order.created", "analytics", SubscribeOptions::default()).await.unwrap();

    let out =
        run(sidebus(&daemon, &["publish", "order.created", "--id", "o-1", "--committed", "--data", r#"{"orderId":"o-1","amount":10}"#]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "o-1 committed");
    let d = next(&mut sub, Duration::from_secs(10)).await;
    assert_eq!(d.event.id, "o-1");
    assert_eq!(d.event.source, "sidebus-cli");
    assert_eq!(d.data::<serde_json::Value>().unwrap(), serde_json::json!({"orderId": "o-1", "amount": 10}));
    d.ack().await.unwrap();

    let mut child = sidebus(&daemon, &["publish", "order.created"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"{\"n\":1}\n\n{\"n\":2}\n{\"n\":3}\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "one line per event: {lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let d = next(&mut sub, Duration::from_secs(10)).await;
        assert_eq!(line, &format!("{} spooled", d.event.id), "published in stdin order");
        assert_eq!(d.data::<serde_json::Value>().unwrap()["n"], i + 1);
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn exit_codes_scripts_can_trust() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let bad_json = run(sidebus(&daemon, &["publish", "t.a", "--data", "{not json"]));
    assert_eq!(bad_json.status.code(), Some(65));
    let refused = run(sidebus(&daemon, &["publish", "Not A Type", "--data", "1"]));
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("type"), "{refused:?}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_sidebus"));
    c.args(["publish", "t.a", "--data", "1", "--socket"]).arg(env.dir.path().join("nobody.sock"));
    assert_eq!(run(c).status.code(), Some(69));
}

#[tokio::test]
async fn tail_prints_deliveries_as_json_lines_and_acks_them() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    // The group exists before the publishes, so they wait for the tail.
    drop(c.subscribe("order.created", "audit", SubscribeOptions::default()).await.unwrap());
    let ids: Vec<String> = futures::future::join_all((0..3).map(|i| {
        let c = c.clone();
        async move { c.publish("order.created", &serde_json::json!({"i": i})).await.unwrap().event_id }
    }))
    .await;
    let out = tokio::task::spawn_blocking({
        let cmd = sidebus(&daemon, &["tail", "order.created", "--group", "audit", "--count", "3"]);
        move || run(cmd)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(printed.len(), 3);
    let mut got: Vec<String> = printed.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
    let mut want = ids.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(printed[0]["type"], "order.created");
    assert_eq!(printed[0]["attempt"], 1);
    assert!(printed[0]["data"]["i"].is_number());
    // Acked: another consumer of the group gets nothing.
    let mut sub = c.subscribe("order.created", "audit", SubscribeOptions::default()).await.unwrap();
    crate::harness::assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn tail_no_ack_only_peeks() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    drop(c.subscribe("order.created", "audit", SubscribeOptions::default()).await.unwrap());
    let id = c.publish("order.created", &1).await.unwrap().event_id;
    let out = tokio::task::spawn_blocking({
        let cmd = sidebus(&daemon, &["tail", "order.created", "--group", "audit", "--count", "1", "--no-ack"]);
        move || run(cmd)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(&id));
    let mut sub = c.subscribe("order.created", "audit", SubscribeOptions::default()).await.unwrap();
    let d = next(&mut sub, Duration::from_secs(5)).await;
    assert_eq!((d.event.id.as_str(), d.attempt), (id.as_str(), 1), "a peek hands the event back without counting an attempt");
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in [&["run", "--help"][..], &["publish", "--help"], &["tail", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(cmd).output().unwrap();
        assert!(out.status.success());
        let text = stdout(&out);
        assert!(text.contains("Example"), "{cmd:?} help has an example:\n{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(["run", "--help"]).output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("--redis-url") && text.contains("SIDEBUS_REDIS_URL"), "{text}");
}
