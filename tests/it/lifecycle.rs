//! Start-up and shutdown: graceful drain on SIGTERM, stale and live socket files, invalid
//! config (exit 78), backends unreachable at start-up.

use std::process::Command;
use std::time::Duration;

use sidebus_client::SubscribeOptions;

use crate::harness::servers::{RedisServer, free_port};
use crate::harness::{TestEnv, eventually, next};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn sigterm_drains_in_flight_deliveries_then_exits_zero_and_removes_the_socket() {
    let env = TestEnv::new();
    let mut daemon = env.daemon().flag("shutdown-grace-ms", 20_000).start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("t.drain", "g", SubscribeOptions::default()).await.unwrap();
    c.publish("t.drain", &1).await.unwrap();
    let d = next(&mut sub, WAIT).await;
    daemon.signal("TERM");
    let socket = daemon.socket().to_owned();
    eventually("the socket file removed", WAIT, || async { (!socket.exists()).then_some(()) }).await;
    // Still running: it waits for the delivery in flight. New publishes are refused meanwhile.
    let err = c.publish("t.drain", &2).await.unwrap_err();
    assert_eq!(err.code(), Some(sidebus_protocol::ErrorCode::Unavailable));
    d.ack().await.unwrap();
    let status = daemon.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn after_the_grace_period_unacked_deliveries_are_released_to_other_daemons() {
    let env = TestEnv::new();
    let mut leaving = env.daemon().flag("shutdown-grace-ms", 500).start().await;
    let staying = env.daemon().start().await;
    let c = leaving.client().await;
    let opts = SubscribeOptions { ack_timeout_ms: Some(60_000), ..Default::default() };
    let mut sub = c.subscribe("t.drain", "g", opts.clone()).await.unwrap();
    let id = c.publish("t.drain", &1).await.unwrap().event_id;
    next(&mut sub, WAIT).await;
    let c2 = staying.client().await;
    let mut sub2 = c2.subscribe("t.drain", "g", opts).await.unwrap();
    leaving.signal("TERM");
    assert_eq!(leaving.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
    // Released, not expired: well before the 60 s lease, and not counted as an attempt.
    let d = next(&mut sub2, Duration::from_secs(5)).await;
    assert_eq!((d.event.id.as_str(), d.attempt), (id.as_str(), 1));
}

#[tokio::test]
async fn a_stale_socket_file_does_not_stop_the_start() {
    let env = TestEnv::new();
    let path = env.dir.path().join("stale.sock");
    // A socket file nobody listens on, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let daemon = env.daemon().flag("socket", path.display()).start().await;
    daemon.client().await.ping().await.unwrap();
}

#[tokio::test]
async fn a_second_daemon_on_a_live_socket_refuses_to_start() {
    let env = TestEnv::new();
    let first = env.daemon().start().await;
    let mut second = env.daemon().flag("socket", first.socket().display()).spawn();
    let status = second.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
    assert!(second.log().contains("another daemon is listening"), "{}", second.log());
    first.client().await.ping().await.unwrap();
}

#[test]
fn an_invalid_config_exits_78_with_one_line_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(["run", "--max-attempts", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("max_attempts"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "socket = \"/tmp/x.sock\"\nbackof_factor = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).arg("run").arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backof_factor"));

    let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).arg("run").env("SIDEBUS_LOG_FORMAT", "xml").output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log_format"));
}

#[tokio::test]
async fn redis_unreachable_at_start_is_logged_and_retried_until_it_answers() {
    let port = free_port();
    let env = TestEnv::on(format!("redis://127.0.0.1:{port}"));
    let mut daemon = env.daemon().spawn();
    eventually("the daemon to report Redis unreachable", WAIT, || async {
        daemon.log().contains("Redis unreachable; retrying").then_some(())
    })
    .await;
    let _redis = RedisServer::start_on(port);
    daemon.wait_ready(Duration::from_secs(20)).await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("t.late", "g", SubscribeOptions::default()).await.unwrap();
    let id = c.publish("t.late", &1).await.unwrap().event_id;
    assert_eq!(next(&mut sub, WAIT).await.event.id, id);
}

#[tokio::test]
async fn postgres_unreachable_at_start_is_logged_and_retried() {
    let mut env = TestEnv::new();
    env.database_url = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    let mut daemon = env.daemon().spawn();
    eventually("the daemon to report Postgres unreachable", WAIT, || async {
        daemon.log().contains("Postgres unreachable; retrying").then_some(())
    })
    .await;
    assert!(daemon.wait_exit_now().is_none(), "still running, retrying");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(WAIT).await.code(), Some(0), "a shutdown during the retry loop is clean");
}

#[tokio::test]
async fn sighup_reloads_the_log_filter() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    daemon.signal("HUP");
    eventually("the reload to be logged", WAIT, || async { daemon.log().contains("reloaded the log filter").then_some(()) }).await;
    daemon.client().await.ping().await.unwrap();
}

#[tokio::test]
async fn first_run_mistakes_name_the_setting_to_change_once() {
    let env = TestEnv::new();
    // A socket in a directory that does not exist: refused, nothing created.
    let typo = env.dir.path().join("typo").join("dir");
    let mut d = env.daemon().flag("socket", typo.join("s.sock").display()).spawn();
    assert_eq!(d.wait_exit(Duration::from_secs(30)).await.code(), Some(1));
    let log = d.log();
    assert!(log.contains(&format!("the socket's directory {} does not exist", typo.display())) && log.contains("SIDEBUS_SOCKET"), "{log}");
    assert!(!env.dir.path().join("typo").exists(), "no directory is created");
    assert_eq!(log.matches("does not exist").count(), 1, "said once:\n{log}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a log that is not a terminal:\n{log}");

    // A data_dir that cannot be created.
    let file = env.dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let mut d = env.daemon().flag("data-dir", file.join("data").display()).spawn();
    assert_eq!(d.wait_exit(Duration::from_secs(30)).await.code(), Some(1));
    let log = d.log();
    assert!(log.contains("set data_dir (--data-dir or SIDEBUS_DATA_DIR)"), "{log}");
    assert_eq!(log.matches("sidebus stopped").count(), 1, "said once:\n{log}");
}

#[tokio::test]
async fn a_restart_is_quiet_and_a_stop_says_what_the_spool_still_holds() {
    let env = TestEnv::new();
    let mut first = env.daemon().spawn();
    first.wait_ready(Duration::from_secs(20)).await;
    first.signal("TERM");
    first.wait_exit(WAIT).await;
    // The second start migrates nothing and says nothing about it.
    let mut second = env.daemon().spawn();
    second.wait_ready(Duration::from_secs(20)).await;
    second.signal("TERM");
    second.wait_exit(WAIT).await;
    assert!(!second.log().contains("already exists, skipping"), "{}", second.log());

    // Postgres away: publishes wait in the spool, and the stop says so.
    let mut env = TestEnv::new();
    env.database_url = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    let mut d = env.daemon().flag("shutdown-grace-ms", 200).spawn();
    let c = eventually("the socket", WAIT, || async { sidebus_client::Client::connect(&d.socket).await.ok() }).await;
    for i in 0..3 {
        c.publish("t.kept", &i).await.unwrap();
    }
    drop(c);
    d.signal("TERM");
    assert_eq!(d.wait_exit(WAIT).await.code(), Some(0));
    assert!(d.log().contains("3 events are still in the spool"), "{}", d.log());
}
