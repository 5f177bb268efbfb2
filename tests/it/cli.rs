//! The command line, run as a subprocess against a real daemon: `publish` (from --data and from
//! stdin, ids, --json, times), `tail` (ack and --no-ack), exit codes, errors said once, usage,
//! and help with examples. `cli_tail.rs` and `cli_status.rs` have the rest; the helpers here
//! (running the binary, and a process in the background read line by line) serve all three.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidebus_client::SubscribeOptions;
use tokio::sync::mpsc;

use crate::harness::{Daemon, TestEnv, assert_quiet, next};

/// The sidebus binary with `args`, talking to `daemon`.
pub fn sidebus(daemon: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sidebus"));
    c.args(args).env("SIDEBUS_SOCKET", daemon.socket());
    c
}

/// Runs a command to its end.
pub fn run(mut c: Command) -> Output {
    c.output().expect("run the sidebus binary")
}

/// Runs a command to its end without blocking the test's runtime.
pub async fn run_async(c: Command) -> Output {
    tokio::task::spawn_blocking(move || run(c)).await.expect("the command's thread")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A process in the background, in its own process group (killed with it when dropped), whose
/// stdout and stderr are read line by line as they come.
pub struct Background {
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::UnboundedReceiver<String>,
    err: mpsc::UnboundedReceiver<String>,
    /// Every stdout line read so far.
    pub out_lines: Vec<String>,
    /// Every stderr line read so far.
    pub err_lines: Vec<String>,
}

fn read_lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Background {
    /// Starts `c` with piped stdin, stdout and stderr.
    pub fn spawn(mut c: Command) -> Background {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start a background command");
        crate::harness::servers::watch(child.id());
        let out = read_lines(child.stdout.take().expect("stdout"));
        let err = read_lines(child.stderr.take().expect("stderr"));
        Background { stdin: child.stdin.take(), child, out, err, out_lines: vec![], err_lines: vec![] }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes to its stdin.
    pub fn write(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).and_then(|()| stdin.flush()).expect("write to the background command");
    }

    /// Closes its stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Takes the lines that came so far.
    fn drain(&mut self) {
        while let Ok(l) = self.out.try_recv() {
            self.out_lines.push(l);
        }
        while let Ok(l) = self.err.try_recv() {
            self.err_lines.push(l);
        }
    }

    /// The first stdout line (read so far or coming within `timeout`) that `want` accepts.
    pub async fn stdout_line(&mut self, what: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        self.line(what, timeout, false, want).await
    }

    /// The first stderr line containing `text` (read so far or coming within `timeout`).
    pub async fn stderr_line(&mut self, text: &str, timeout: Duration) -> String {
        self.line(text, timeout, true, |l| l.contains(text)).await
    }

    /// Waits until `n` stderr lines contain `text`; every stderr line read so far.
    pub async fn stderr_lines(&mut self, text: &str, n: usize, timeout: Duration) -> &[String] {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if self.err_lines.iter().filter(|l| l.contains(text)).count() >= n {
                return &self.err_lines;
            }
            assert!(Instant::now() < deadline, "not {n} stderr lines {text:?} within {timeout:?}:\n{}", self.err_lines.join("\n"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn line(&mut self, what: &str, timeout: Duration, err: bool, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            let seen = if err { &self.err_lines } else { &self.out_lines };
            if let Some(l) = seen.iter().find(|l| want(l)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {} line {what:?} within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                if err { "stderr" } else { "stdout" },
                self.out_lines.join("\n"),
                self.err_lines.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for it to exit (a panic after `timeout`), with every line it printed.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the background command") {
                // The pipes close at exit: their last lines are read by then or soon after.
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.drain();
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {timeout:?}; stderr:\n{}", self.err_lines.join("\n"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // The whole group: a shell and what it started in the background.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
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
    for cmd in [
        &["run", "--help"][..],
        &["publish", "--help"],
        &["tail", "--help"],
        &["ping", "--help"],
        &["stats", "--help"],
        &["top", "--help"],
        &["dlq", "show", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(cmd).output().unwrap();
        assert!(out.status.success());
        let text = stdout(&out);
        assert!(text.contains("Example"), "{cmd:?} help has an example:\n{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(["run", "--help"]).output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("--redis-url") && text.contains("SIDEBUS_REDIS_URL"), "{text}");
}

#[tokio::test]
async fn publish_prints_each_event_id_and_json_says_duplicate_with_committed() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("order.created", "analytics", SubscribeOptions::default()).await.unwrap();

    // Without --id the CLI chooses a UUIDv7 and prints it.
    let out = run_async(sidebus(&daemon, &["publish", "order.created", "--data", r#"{"n":1}"#])).await;
    assert!(out.status.success(), "{out:?}");
    let (id, status) = stdout(&out).trim().split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).unwrap();
    assert_eq!(status, "spooled");
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7, "{id}");
    let d = next(&mut sub, Duration::from_secs(10)).await;
    assert_eq!(d.event.id, id);
    d.ack().await.unwrap();

    // --json: one object per event; the first publish of an id wins, and --committed says so.
    let args = ["publish", "order.created", "--id", "k-1", "--committed", "--json", "--data"];
    let first = run_async(sidebus(&daemon, &[&args[..], &[r#"{"n":2}"#]].concat())).await;
    let again = run_async(sidebus(&daemon, &[&args[..], &[r#"{"n":"other"}"#]].concat())).await;
    assert!(first.status.success() && again.status.success(), "{first:?} {again:?}");
    let parse = |o: &Output| serde_json::from_slice::<Value>(&o.stdout).unwrap();
    assert_eq!(parse(&first), json!({"event_id": "k-1", "status": "committed", "duplicate": false}));
    assert_eq!(parse(&again), json!({"event_id": "k-1", "status": "committed", "duplicate": true}));
    let d = next(&mut sub, Duration::from_secs(10)).await;
    assert_eq!((d.event.id.as_str(), d.data::<Value>().unwrap()), ("k-1", json!({"n": 2})), "the first data is kept");
    d.ack().await.unwrap();
    assert_quiet(&mut sub, Duration::from_millis(500)).await;

    // From stdin, --json adds the line.
    let mut child = sidebus(&daemon, &["publish", "order.created", "--json"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"\n{\"n\":3}\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["line"].as_u64(), v["status"].as_str()), (Some(2), Some("spooled")), "{v}");
    assert_eq!(next(&mut sub, Duration::from_secs(10)).await.event.id, v["event_id"].as_str().unwrap());

    let help = stdout(&run(sidebus(&daemon, &["publish", "--help"])));
    for want in ["the first publish of an id wins", "only with --committed", "`duplicate`", "--stream", "UUIDv7"] {
        assert!(help.contains(want), "publish --help says {want:?}:\n{help}");
    }
}

#[tokio::test]
async fn a_publish_the_daemon_cannot_confirm_still_prints_its_id() {
    let redis = crate::harness::servers::RedisServer::start();
    let env = TestEnv::on(redis.url());
    let daemon = env.daemon().flag("publish-timeout-ms", 1000).start().await;
    drop(redis);
    let out = run_async(sidebus(&daemon, &["publish", "order.created", "--committed", "--data", "1"])).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (id, rest) = stdout(&out).trim().split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).unwrap();
    assert_eq!(rest, "failed unavailable");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let err = stderr(&out);
    assert!(err.contains(&format!("event {id}: unavailable")) && err.contains(&format!("--id {id}")), "{err}");
    assert!(err.contains("it may still be stored"), "{err}");

    let out = run_async(sidebus(&daemon, &["publish", "order.created", "--committed", "--json", "--id", "k-9", "--data", "1"])).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["event_id"].as_str(), v["status"].as_str(), v["error"].as_str()), (Some("k-9"), Some("failed"), Some("unavailable")));
    assert!(out.stderr.is_empty(), "with --json the error is in the object only: {out:?}");
}

#[tokio::test]
async fn stdin_is_checked_before_anything_is_published_unless_streamed() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("order.created", "analytics", SubscribeOptions::default()).await.unwrap();
    let input = b"{\"n\":1}\n{\"n\":2}\nnot json\n{\"n\":4}\n{oops\n";
    let publish = |args: &[&str]| {
        let mut child = sidebus(&daemon, args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };

    let out = publish(&["publish", "order.created"]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("line 3 is not JSON") && err.contains("line 5 is not JSON") && err.contains("nothing was published"), "{err}");
    assert_eq!(c.stats().await.unwrap().counter("published"), 0, "nothing reached the daemon");

    let out = publish(&["publish", "order.created", "--stream"]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let printed: Vec<String> = stdout(&out).lines().map(|l| l.trim_end_matches(" spooled").to_owned()).collect();
    assert_eq!(printed.len(), 2, "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("line 3 is not JSON"), "{err}");
    assert!(err.contains("stopped at line 3: published lines 1-2 (their ids are above); nothing after line 2 was sent"), "{err}");
    for id in &printed {
        let d = next(&mut sub, Duration::from_secs(10)).await;
        assert_eq!(&d.event.id, id);
        d.ack().await.unwrap();
    }
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn one_parser_takes_times_for_every_flag() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("reminder.due", "mailer", SubscribeOptions::default()).await.unwrap();

    let bad_at = run(sidebus(&daemon, &["publish", "reminder.due", "--deliver-at", "tomorrow", "--data", "1"]));
    let bad_since = run(sidebus(&daemon, &["replay", "reminder.due", "--group", "mailer", "--since", "yesterday"]));
    let bad_delay = run(sidebus(&daemon, &["publish", "reminder.due", "--delay", "soon", "--data", "1"]));
    for (out, flag, value) in [(&bad_at, "deliver-at", "tomorrow"), (&bad_since, "since", "yesterday"), (&bad_delay, "delay", "soon")] {
        assert_eq!(out.status.code(), Some(65), "{out:?}");
        let err = stderr(out);
        assert_eq!(err.lines().count(), 1, "one message: {err}");
        assert!(err.starts_with(&format!("sidebus: --{flag}: `{value}` is not a")), "{err}");
        assert!(err.contains("1h30m"), "{err}");
    }
    assert!(stderr(&bad_at).contains("RFC 3339") && stderr(&bad_since).contains("RFC 3339"));
    assert_eq!(c.stats().await.unwrap().counter("published"), 0);

    // A duration ahead, in each of its forms, and an RFC 3339 time: delivered at their time.
    let at = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    let started = Instant::now();
    for when in
        [&["--deliver-at", "+1s"][..], &["--deliver-at", "in 1s"], &["--deliver-at", "1s"], &["--delay", "1s"], &["--deliver-at", &at]]
    {
        let out = run(sidebus(&daemon, &[&["publish", "reminder.due", "--data", "1"][..], when].concat()));
        assert!(out.status.success(), "{when:?}: {out:?}");
    }
    for i in 0..5 {
        let d = next(&mut sub, Duration::from_secs(10)).await;
        if i == 0 {
            assert!(started.elapsed() >= Duration::from_millis(900), "delivered after {:?}", started.elapsed());
        }
        assert!(d.event.deliverat.is_some(), "{:?}", d.event);
        d.ack().await.unwrap();
    }
    let help = stdout(&run(sidebus(&daemon, &["publish", "--help"])));
    assert!(help.contains("in 10m") && help.contains("1h30m"), "{help}");
}

#[tokio::test]
async fn errors_are_said_once_and_usage_does_not_show_the_socket_as_required() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let out = run(sidebus(&daemon, &["publish", "Not A Type", "--data", "1"]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("must be 1 to 128").count(), 1, "{err}");
    let out = run(sidebus(&daemon, &["replays", "--cancel", "nope"]));
    assert_eq!(stderr(&out).matches("not a replay id").count(), 1, "{out:?}");

    // Unreachable: said once, with a hint.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidebus"));
    cmd.args(["stats", "--socket"]).arg(env.dir.path().join("nobody.sock")).env_remove("SIDEBUS_SOCKET");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(69));
    let err = stderr(&out);
    assert_eq!(err.matches("cannot reach the daemon at").count(), 1, "{err}");
    assert!(err.contains("No such file or directory") && err.contains("is `sidebus run` running? Set --socket or SIDEBUS_SOCKET"), "{err}");
    assert!(!err.contains("i/o:"), "{err}");

    // SIDEBUS_SOCKET is set, yet the usage line does not show --socket as if it were required.
    let out = run(sidebus(&daemon, &["tail"]));
    assert_eq!(out.status.code(), Some(2));
    let usage = stderr(&out);
    assert!(usage.contains("Usage: sidebus tail <EVENT_TYPE>"), "{usage}");
    assert!(!usage.contains("--socket"), "{usage}");
    let help = stdout(&run(sidebus(&daemon, &["tail", "--help"])));
    assert!(help.contains("Usage: sidebus tail [OPTIONS] <EVENT_TYPE>"), "{help}");
    assert!(help.contains("--socket <PATH>") && help.contains("$SIDEBUS_SOCKET, else /run/sidebus/sidebus.sock"), "{help}");
}
