//! Who may use the socket, with clients run as other real users (`setpriv`): the socket's group
//! and mode decide who connects, the `[[access]]` list what each may do (by user, by primary
//! group, by supplementary group), refusals are `unauthorized` naming what, counted and logged
//! with the uid, SIGHUP reloads the list, and a uid's connections are capped.

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use crate::cli::{Background, run_async, stderr, stdout};
use crate::harness::users::{Cast, Group, User, as_user, cast};
use crate::harness::{Daemon, TestEnv, eventually, get, recv_raw};

const WAIT: Duration = Duration::from_secs(20);

/// The cast, or `None` (and a note) when the tests cannot create users.
fn users() -> Option<&'static Cast> {
    let c = cast();
    if c.is_none() {
        eprintln!("skipped: the access-list tests create users and run clients as them, which needs root");
    }
    c
}

/// An environment whose directory other users may enter (to reach the socket).
fn open_env() -> TestEnv {
    let env = TestEnv::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env
}

/// `sidebus args…` as `user` with exactly the supplementary `groups`.
async fn cli(daemon: &Daemon, user: &User, groups: &[&Group], args: &[&str]) -> Output {
    let mut c = as_user(user, groups, env!("CARGO_BIN_EXE_sidebus"), args);
    c.env("SIDEBUS_SOCKET", daemon.socket());
    run_async(c).await
}

#[track_caller]
fn allowed(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "refused:\nstdout: {}\nstderr: {}", stdout(o), stderr(o));
}

#[track_caller]
fn refused(o: &Output, uid: u32, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "not refused:\nstdout: {}\nstderr: {err}", stdout(o));
    let says = format!("unauthorized: uid {uid} may not {what}");
    assert!(err.starts_with("sidebus: ") && err.lines().next().is_some_and(|l| l.contains(&says)), "expected `{says}` in:\n{err}");
}

fn config(c: &Cast, alice_publishes: &str) -> String {
    format!(
        r#"
socket_mode = "660"
socket_group = "{sock}"

[[groups]]
type = "order.created"
name = "inventory"

[[groups]]
type = "order.created"
name = "analytics"

# alice by name: publishes orders, consumes them as inventory, replays to inventory.
[[access]]
users = ["{alice}"]
publish = [{alice_publishes}]
subscribe = ["order.*:inventory"]
admin = ["replay"]

# Operators by group (bob's primary group, given by number).
[[access]]
groups = [{ops}]
publish = ["*"]
subscribe = ["*:*"]
admin = ["*"]

# The shop group (a supplementary group) may read stats.
[[access]]
groups = ["{shop}"]
admin = ["stats"]
"#,
        sock = c.sock.name,
        alice = c.alice.name,
        ops = c.ops.gid,
        shop = c.shop.name,
    )
}

// Long because it is the whole matrix: each user and group against each kind of request, on
// one daemon.
#[tokio::test]
async fn the_access_list_decides_what_each_user_may_do() {
    let Some(c) = users() else { return };
    let env = open_env();
    let daemon = env.daemon().config_file(&config(c, r#""order.*""#)).start().await;
    let meta = std::fs::metadata(daemon.socket()).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, std::os::unix::fs::MetadataExt::gid(&meta)), (0o660, c.sock.gid));
    let (alice, bob, carol, dave) = (&c.alice, &c.bob, &c.carol, &c.dave);
    let sock = &c.sock;

    // Not in the socket's group: the kernel refuses the connection.
    let o = cli(&daemon, dave, &[], &["ping"]).await;
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("this user may not open the socket"), "{}", stderr(&o));

    // alice: her entry, by name.
    let mut tail = Background::spawn({
        let mut t =
            as_user(alice, &[sock], env!("CARGO_BIN_EXE_sidebus"), &["tail", "order.created", "--group", "inventory", "--count", "1"]);
        t.env("SIDEBUS_SOCKET", daemon.socket());
        t
    });
    tail.stderr_line("subscribed to order.created as inventory", WAIT).await;
    allowed(&cli(&daemon, alice, &[sock], &["publish", "order.created", "--data", r#"{"orderId":"o-1"}"#]).await);
    let line = tail.stdout_line("the event", WAIT, |l| l.contains("o-1")).await;
    assert!(line.contains("order.created"), "{line}");
    refused(&cli(&daemon, alice, &[sock], &["publish", "payment.settled", "--data", "{}"]).await, alice.uid, "publish payment.settled");
    refused(
        &cli(&daemon, alice, &[sock], &["tail", "order.created", "--group", "analytics", "--count", "1"]).await,
        alice.uid,
        "consume order.created as group analytics",
    );
    refused(
        &cli(&daemon, alice, &[sock], &["dlq", "list", "order.created", "--group", "inventory"]).await,
        alice.uid,
        "read the dead letters of order.created as group inventory",
    );
    refused(&cli(&daemon, alice, &[sock], &["stats"]).await, alice.uid, "read stats");
    refused(
        &cli(&daemon, alice, &[sock], &["replay", "order.created", "--group", "analytics", "--since", "1h", "--no-wait"]).await,
        alice.uid,
        "replay order.created as group analytics",
    );
    allowed(&cli(&daemon, alice, &[sock], &["replay", "order.created", "--group", "inventory", "--since", "1h", "--no-wait"]).await);
    // A supplementary group adds its entry: the shop group may read stats.
    allowed(&cli(&daemon, alice, &[sock, &c.shop], &["stats"]).await);
    // ping needs no entry; `health` asks for stats, `health --socket-only` does not.
    allowed(&cli(&daemon, carol, &[sock], &["health", "--socket-only"]).await);

    // bob: the operators' entry, by his primary group.
    allowed(&cli(&daemon, bob, &[sock], &["publish", "payment.settled", "--data", "{}"]).await);
    allowed(&cli(&daemon, bob, &[sock], &["dlq", "list", "order.created", "--group", "inventory"]).await);
    allowed(&cli(&daemon, bob, &[sock], &["health"]).await);
    let schema = env.dir.path().join("order.json");
    std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
    std::fs::set_permissions(&schema, std::fs::Permissions::from_mode(0o644)).unwrap();
    allowed(&cli(&daemon, bob, &[sock], &["schema", "register", "order.created", &schema.display().to_string()]).await);
    let o = cli(&daemon, bob, &[sock], &["replay", "order.created", "--group", "analytics", "--since", "1h", "--no-wait", "--json"]).await;
    allowed(&o);
    let analytics_replay = serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["replay"].as_str().unwrap().to_owned();
    // alice sees her group's replays only, and may not cancel another group's.
    let o = cli(&daemon, alice, &[sock], &["replays", "--all", "--json"]).await;
    allowed(&o);
    let seen = stdout(&o);
    assert!(seen.contains("inventory") && !seen.contains("analytics"), "{seen}");
    refused(
        &cli(&daemon, alice, &[sock], &["replays", "--cancel", &analytics_replay]).await,
        alice.uid,
        &format!("cancel replay {analytics_replay} of order.created as group analytics"),
    );
    // alice may not register schemas: her entry has no `schemas`.
    refused(
        &cli(&daemon, alice, &[sock], &["schema", "register", "order.created", &schema.display().to_string()]).await,
        alice.uid,
        "register a schema for order.created",
    );
    // Reading schemas needs an entry, any entry.
    allowed(&cli(&daemon, alice, &[sock], &["schema", "list"]).await);

    // carol: in the socket's group, named by no entry.
    let o = cli(&daemon, carol, &[sock], &["publish", "order.created", "--data", "{}"]).await;
    refused(&o, carol.uid, "publish order.created");
    assert!(stderr(&o).contains("no [[access]] entry names this user or its groups"), "{}", stderr(&o));
    refused(&cli(&daemon, carol, &[sock], &["schema", "list"]).await, carol.uid, "read schemas");
    let o = cli(&daemon, carol, &[sock], &["health"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));

    // Every refusal is counted, and logged once with the uid.
    let o = cli(&daemon, bob, &[sock], &["stats", "--json"]).await;
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["counters"]["unauthorized"], 10, "{stats}");
    let log = daemon.log();
    assert!(log.contains(&format!("refused: uid {} may not publish payment.settled", alice.uid)), "{log}");
    assert_eq!(log.matches(&format!("refused: uid {} may not read stats", carol.uid)).count(), 1, "once per connection and thing");
    drop(tail);

    // SIGHUP reloads the list: alice may now publish payments too.
    std::fs::write(config_path(&env, &daemon), config(c, r#""order.*", "payment.*""#)).unwrap();
    daemon.signal("HUP");
    eventually("the reload", WAIT, || async { daemon.log().contains("reloaded the log filter and the access list").then_some(()) }).await;
    allowed(&cli(&daemon, alice, &[sock], &["publish", "payment.settled", "--data", "{}"]).await);
}

/// The config file the harness wrote for the daemon (`configN.toml` beside `dN.sock`).
fn config_path(env: &TestEnv, daemon: &Daemon) -> std::path::PathBuf {
    let name = daemon.socket().file_stem().unwrap().to_string_lossy().into_owned();
    env.dir.path().join(format!("config{}.toml", name.trim_start_matches('d')))
}

#[tokio::test]
async fn connections_are_capped_per_uid() {
    let Some(c) = users() else { return };
    let env = open_env();
    let daemon = env.daemon().flag("max-connections-per-uid", 2).flag("socket-mode", "666").start().await;
    // This test runs as root: two connections, then the third is refused, naming the limit.
    let first = daemon.client().await;
    let _second = daemon.client().await;
    let mut third = daemon.raw().await;
    let push = recv_raw(&mut third).await.expect("an error push");
    assert_eq!(get(&push, "code").and_then(|v| v.as_str()), Some("unavailable"), "{push}");
    let message = get(&push, "message").and_then(|v| v.as_str()).unwrap_or_default();
    assert!(message.starts_with("too many connections of uid 0 (max_connections_per_uid = 2)"), "{message}");
    assert!(recv_raw(&mut third).await.is_none(), "then the daemon closes");
    // Another user has connections of its own.
    allowed(&cli(&daemon, &c.alice, &[], &["health", "--socket-only"]).await);
    // A closed connection gives its place back.
    first.close().await.unwrap();
    drop(first);
    eventually("a place for root again", WAIT, || async { sidebus_client::Client::connect_as(&daemon.socket, "again").await.ok() }).await;
    assert!(daemon.log().contains("connection refused: too many connections of uid 0"), "{}", daemon.log());
}

#[tokio::test]
async fn a_bad_access_list_stops_the_start_naming_the_entry() {
    let env = TestEnv::new();
    for (toml, says) in [
        (
            "[[access]]\nusers = [\"no-such-user-here\"]\n",
            "invalid config: access[0].users: no user named `no-such-user-here` in /etc/passwd",
        ),
        (
            "[[access]]\nusers = [0]\nsubscribe = [\"order.created\"]\n",
            "invalid config: access[0].subscribe: `order.created` is not TYPE:GROUP",
        ),
        ("socket_group = \"no-such-group-here\"\n", "invalid config: socket_group: no group named `no-such-group-here` in /etc/group"),
    ] {
        let mut d = env.daemon().config_file(toml).spawn();
        assert_eq!(d.wait_exit(WAIT).await.code(), Some(78), "{}", d.log());
        assert!(d.log().contains(says), "expected `{says}` in:\n{}", d.log());
    }
}
