//! `sidebus tail` against a real daemon: the README's quick example as a newcomer runs it,
//! `--fail` and `--dead`, and what tail says when its daemon goes away and comes back.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sidebus_client::SubscribeOptions;

use crate::cli::{Background, run_async, sidebus, stderr, stdout};
use crate::harness::TestEnv;

const WAIT: Duration = Duration::from_secs(10);

/// The ```sh blocks of a Markdown text.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test]
async fn the_readme_quick_example_shows_the_event_within_seconds() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    let tail = blocks.iter().position(|b| b.contains("sidebus tail")).expect("the README starts a tail");
    let publish = blocks.iter().position(|b| b.contains("sidebus publish")).expect("the README publishes");
    assert!(tail < publish, "the README starts the tail before it publishes");
    // A checkout after scripts/run-local.sh: the release binary and the daemon's socket.
    let checkout = env.dir.path().join("checkout");
    std::fs::create_dir_all(checkout.join("target/release")).unwrap();
    std::fs::create_dir_all(checkout.join("run")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sidebus"), checkout.join("target/release/sidebus")).unwrap();
    std::os::unix::fs::symlink(daemon.socket(), checkout.join("run/sidebus.sock")).unwrap();

    // One shell, typed into as the README says: the tail's block, wait for its line, publish.
    let mut shell = Command::new("bash");
    shell.arg("-s").current_dir(&checkout).env_remove("SIDEBUS_SOCKET");
    let mut shell = Background::spawn(shell);
    shell.write(&blocks[tail]);
    shell.stderr_line("subscribed to order.created as analytics; waiting for events", WAIT).await;
    shell.write(&blocks[publish]);
    shell.close_stdin();
    let line = shell.stdout_line("the event from tail", WAIT, |l| l.starts_with('{')).await;
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "order.created");
    assert_eq!(event["data"], serde_json::json!({"orderId": "o-1", "amount": 42.5, "currency": "EUR"}));
    let id = event["id"].as_str().unwrap().to_owned();
    shell.stdout_line("publish's id", WAIT, |l| l == format!("{id} spooled")).await;
    assert!(shell.out_lines.iter().any(|l| l.starts_with("sidebus on ")), "ping ran: {:?}", shell.out_lines);
}

#[tokio::test]
async fn tail_fail_nacks_each_delivery_so_its_attempt_count_rises() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    c.subscribe("user.signup", "mailer", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    let id = c.publish("user.signup", &serde_json::json!({"email": "x"})).await.unwrap().event_id;
    let args = ["tail", "user.signup", "--group", "mailer", "--fail", "smtp down", "--max-attempts", "3", "--count", "3"];
    let out = run_async(sidebus(&daemon, &args)).await;
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let attempts: Vec<(&str, u64)> = lines.iter().map(|v| (v["id"].as_str().unwrap(), v["attempt"].as_u64().unwrap())).collect();
    assert_eq!(attempts, [(id.as_str(), 1), (id.as_str(), 2), (id.as_str(), 3)]);
    // The third failure was the last one: a dead letter with the error of each attempt.
    let out = run_async(sidebus(&daemon, &["dlq", "list", "user.signup", "--group", "mailer", "--json"])).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = &v["entries"][0];
    assert_eq!((entry["event"]["id"].as_str(), entry["attempts"].as_u64()), (Some(id.as_str()), Some(3)), "{v}");
    assert_eq!(entry["error"], "smtp down");
}

#[tokio::test]
async fn tail_dead_sends_deliveries_to_the_dead_letter_queue() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    c.subscribe("user.signup", "mailer", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    let a = c.publish("user.signup", &serde_json::json!({"email": "a"})).await.unwrap().event_id;
    let out = run_async(sidebus(&daemon, &["tail", "user.signup", "--group", "mailer", "--dead=malformed address", "--count", "1"])).await;
    assert!(out.status.success(), "{out:?}");
    let b = c.publish("user.signup", &serde_json::json!({"email": "b"})).await.unwrap().event_id;
    // Without a reason (and with the type after the flag: --dead takes its reason only with `=`).
    let out = run_async(sidebus(&daemon, &["tail", "--dead", "user.signup", "--group", "mailer", "--count", "1"])).await;
    assert!(out.status.success(), "{out:?}");

    let out = run_async(sidebus(&daemon, &["dlq", "list", "user.signup", "--group", "mailer"])).await;
    let list = stdout(&out);
    assert!(list.contains(&a) && list.contains(&b), "{list}");
    assert!(list.contains("malformed address") && list.contains("dead-lettered by sidebus tail --dead"), "{list}");
    for line in list.lines().skip(1) {
        assert!(line.contains(" 1 "), "dead at the first attempt: {line}");
    }

    // `dlq show` in text, and the ids that are not dead letters named.
    let out = run_async(sidebus(&daemon, &["dlq", "show", "user.signup", "--group", "mailer", &a, "nope", "nope", "nada"])).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    assert!(text.starts_with(&format!("event {a}")), "text, not JSON: {text}");
    assert!(text.contains("after 1 failed attempt: malformed address") && text.contains(r#"data: {"email":"a"}"#), "{text}");
    assert_eq!(stderr(&out).trim(), "sidebus: not dead letters of user.signup/mailer (never, or already redriven or purged): nope, nada");
    let out = run_async(sidebus(&daemon, &["dlq", "show", "user.signup", "--group", "mailer", &b, "--json"])).await;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"]["id"], b.as_str());
}

#[tokio::test]
async fn a_tail_says_once_that_its_daemon_went_away_came_back_or_is_given_up() {
    let env = TestEnv::new();
    let mut first = env.daemon().start().await;
    let socket = first.socket().to_owned();
    let mut patient = Background::spawn(sidebus(&first, &["tail", "order.created", "--group", "audit", "--reconnect-for", "60s"]));
    patient.stderr_line("waiting for events", WAIT).await;

    first.kill();
    patient.stderr_line("lost the connection to the daemon", WAIT).await;
    // A daemon comes back on the same socket (a restart, as far as the tail can tell).
    let second = env.daemon().flag("socket", socket.display()).start().await;
    patient.stderr_line("reconnected to the daemon", Duration::from_secs(20)).await;
    let c = second.client().await;
    let id = c.publish("order.created", &"after the restart").await.unwrap().event_id;
    patient.stdout_line("the event published after the restart", WAIT, |l| l.contains(&id)).await;

    let mut quick = Background::spawn(sidebus(&second, &["tail", "order.created", "--group", "audit", "--reconnect-for", "1s"]));
    quick.stderr_line("waiting for events", WAIT).await;
    drop(c);
    drop(second);
    let status = quick.wait(WAIT).await;
    assert_eq!(status.code(), Some(69), "{:?}", quick.err_lines);
    let said = |lines: &[String], what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(quick.err_lines.len(), 3, "subscribed, lost, given up: {:?}", quick.err_lines);
    assert_eq!(said(&quick.err_lines, "the daemon did not come back within 1s; giving up"), 1, "{:?}", quick.err_lines);

    patient.stderr_lines("lost the connection", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    patient.stderr_lines("", 4, WAIT).await;
    assert_eq!(
        (said(&patient.err_lines, "lost the connection"), said(&patient.err_lines, "reconnected"), patient.err_lines.len()),
        (2, 1, 4),
        "one line per loss and per return: {:?}",
        patient.err_lines
    );
}

#[tokio::test]
async fn a_tail_whose_reader_is_gone_stops_and_acks_nothing_it_could_not_print() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    c.subscribe("order.created", "audit", SubscribeOptions::default()).await.unwrap().unsubscribe().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(c.publish("order.created", &i).await.unwrap().event_id);
    }
    // stdout is a pipe whose reader has gone (as `sidebus tail … | head -1` once head exits).
    let mut cmd = sidebus(&daemon, &["tail", "order.created", "--group", "audit"]);
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success() && !stderr(&out).contains("panicked"), "{out:?}");

    let out = run_async(sidebus(&daemon, &["tail", "order.created", "--group", "audit", "--count", "3"])).await;
    let got: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut got_ids: Vec<&str> = got.iter().map(|v| v["id"].as_str().unwrap()).collect();
    got_ids.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got_ids, want, "nothing was acked");
    assert!(got.iter().all(|v| v["attempt"] == 1), "handed back without counting an attempt: {got:?}");
}
