//! The schema registry against a real Postgres: result 3 of README.md (a missing field, a wrong
//! type, an enum), version pinning, each compatibility mode passing and failing, two daemons on
//! one Postgres, schemas_dir, unknown_types = reject, the local cache while Postgres is away,
//! bad input, and the `sidebus schema` command line.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidebus_client::{Client, Compatibility, Error, Publish, RegisterSchema, SubscribeOptions};
use sidebus_protocol::{Detail, ErrorCode};

use crate::harness::servers::PgServer;
use crate::harness::{Daemon, TestEnv, assert_quiet, eventually, next};

fn order_schema() -> Value {
    json!({
        "type": "object",
        "required": ["orderId", "amount", "currency"],
        "properties": {
            "orderId": {"type": "string"},
            "amount": {"type": "number", "minimum": 0},
            "currency": {"enum": ["EUR", "USD"]}
        }
    })
}

fn refusal(e: Error) -> (ErrorCode, Vec<Detail>) {
    match e {
        Error::Server { code, details, .. } => (code, details),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn paths(details: &[Detail]) -> Vec<(String, String)> {
    details
        .iter()
        .map(|d| match d {
            Detail::Path { path, message } => (path.clone(), message.clone()),
            other => panic!("expected {{path, message}}, got {other:?}"),
        })
        .collect()
}

fn reasons(details: &[Detail]) -> Vec<String> {
    details
        .iter()
        .map(|d| if let Detail::Reason { message } = d { message.clone() } else { panic!("expected a reason, got {d:?}") })
        .collect()
}

async fn register(c: &Client, event_type: &str, schema: Value, mode: Option<Compatibility>) -> Result<u64, Error> {
    let r = RegisterSchema {
        event_type: event_type.into(),
        schema: sidebus_client::encode(&schema).unwrap(),
        compatibility: mode,
        strict: None,
        dry_run: false,
    };
    c.register_schema_with(r).await.map(|r| r.version)
}

async fn publish_version(c: &Client, event_type: &str, data: Value, version: Option<u64>) -> Result<String, Error> {
    let mut p = Publish::new(event_type, sidebus_client::encode(&data).unwrap());
    p.version = version;
    c.publish_with(p).await.map(|r| r.event_id)
}

#[tokio::test]
async fn result_3_a_publish_that_breaks_the_schema_is_refused_with_the_field_and_reaches_nobody() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    assert_eq!(register(&c, "order.created", order_schema(), None).await.unwrap(), 1);
    let mut sub = c.subscribe("order.created", "billing", SubscribeOptions::default()).await.unwrap();

    // A missing field: named in the message of a violation at the root.
    let (code, d) = refusal(c.publish("order.created", &json!({"orderId": "o-1", "amount": 10})).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed);
    let v = paths(&d);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "");
    assert!(v[0].1.contains("currency"), "the message names the missing field: {v:?}");

    // A wrong type and an enum value outside the list: each a JSON pointer to the field.
    let (code, d) = refusal(c.publish("order.created", &json!({"orderId": "o-2", "amount": "ten", "currency": "XYZ"})).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed);
    let mut v: Vec<String> = paths(&d).into_iter().map(|(p, _)| p).collect();
    v.sort();
    assert_eq!(v, vec!["/amount", "/currency"], "every violation is listed");

    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    let id = c.publish("order.created", &json!({"orderId": "o-3", "amount": 10, "currency": "EUR"})).await.unwrap().event_id;
    let d = next(&mut sub, Duration::from_secs(10)).await;
    assert_eq!(d.event.id, id, "only the valid event reaches the consumer");
    assert_eq!(d.event.schemaversion, Some(1));
    d.ack().await.unwrap();
    // A type without a schema is published unvalidated, without schemaversion.
    let mut other = c.subscribe("audit.logged", "g", SubscribeOptions::default()).await.unwrap();
    c.publish("audit.logged", &json!([1, 2])).await.unwrap();
    assert_eq!(next(&mut other, Duration::from_secs(10)).await.event.schemaversion, None);
}

#[tokio::test]
async fn a_schema_comes_back_as_written_and_a_refusal_names_the_mode_in_force() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    // Longer keys first: the order Postgres's jsonb would change (it sorts shorter keys first).
    let v1 = json!({"properties": {"currency": {"type": "string"}, "total": {"type": "number"}}, "required": ["total"], "type": "object"});
    assert_eq!(register(&c, "invoice.sent", v1.clone(), None).await.unwrap(), 1);
    let got = c.get_schema("invoice.sent", None).await.unwrap();
    let back: Value = rmp_serde::from_slice(&got.schema).unwrap();
    assert_eq!(back.to_string(), v1.to_string(), "the document keeps its key order");
    // No mode given: the refusal names the one in force (the default, backward).
    let v2 =
        json!({"type": "object", "required": ["total", "due"], "properties": {"total": {"type": "number"}, "due": {"type": "string"}}});
    let e = register(&c, "invoice.sent", v2, None).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("the `backward` compatibility of `invoice.sent`"), "{text}");
}

#[tokio::test]
async fn publishes_pin_a_version_or_take_the_latest() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let v1 = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    let v2 = json!({"type": "object", "properties": {"n": {"type": "number"}, "note": {"type": "string"}}});
    assert_eq!(register(&c, "metric.taken", v1.clone(), None).await.unwrap(), 1);
    assert_eq!(register(&c, "metric.taken", v2.clone(), None).await.unwrap(), 2);
    // Registering the latest again returns it; nothing new is stored.
    let again = c.register_schema("metric.taken", &v2).await.unwrap();
    assert_eq!((again.version, again.created), (2, false));
    assert_eq!(c.get_schema("metric.taken", Some(1)).await.unwrap().version, 1);
    let got = c.get_schema("metric.taken", None).await.unwrap();
    assert_eq!(got.version, 2);
    assert_eq!(rmp_serde::from_slice::<Value>(&got.schema).unwrap(), v2, "the schema comes back as registered");

    let mut sub = c.subscribe("metric.taken", "g", SubscribeOptions::default()).await.unwrap();
    publish_version(&c, "metric.taken", json!({"n": 1.5}), None).await.unwrap();
    assert_eq!(next(&mut sub, Duration::from_secs(10)).await.event.schemaversion, Some(2));
    let (code, d) = refusal(publish_version(&c, "metric.taken", json!({"n": 1.5}), Some(1)).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed);
    assert_eq!(paths(&d)[0].0, "/n");
    publish_version(&c, "metric.taken", json!({"n": 1}), Some(1)).await.unwrap();
    assert_eq!(next(&mut sub, Duration::from_secs(10)).await.event.schemaversion, Some(1));
    let (code, _) = refusal(publish_version(&c, "metric.taken", json!({"n": 1}), Some(3)).await.unwrap_err());
    assert_eq!(code, ErrorCode::UnknownVersion);
    let (code, _) = refusal(c.get_schema("metric.taken", Some(7)).await.unwrap_err());
    assert_eq!(code, ErrorCode::UnknownVersion);
    let (code, _) = refusal(c.get_schema("nothing.here", None).await.unwrap_err());
    assert_eq!(code, ErrorCode::NotFound);
    let list = c.list_schemas().await.unwrap();
    assert_eq!(list.types.len(), 1);
    assert_eq!((list.types[0].event_type.as_str(), list.types[0].latest), ("metric.taken", 2));
}

/// One case of the compatibility table: from `old` to `new` under `mode`.
struct Case {
    mode: Compatibility,
    old: Value,
    new: Value,
    passes: bool,
}

#[tokio::test]
async fn each_compatibility_mode_passes_what_it_should_and_refuses_the_rest_with_reasons() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let base = order_schema();
    let mut optional_added = base.clone();
    optional_added["properties"]["coupon"] = json!({"type": "string"});
    let mut required_added = optional_added.clone();
    required_added["required"] = json!(["orderId", "amount", "currency", "coupon"]);
    let mut required_removed = base.clone();
    required_removed["required"] = json!(["orderId", "amount"]);
    let mut enum_widened = base.clone();
    enum_widened["properties"]["currency"]["enum"] = json!(["EUR", "USD", "GBP"]);
    let mut bound_tightened = base.clone();
    bound_tightened["properties"]["amount"]["minimum"] = json!(1);
    use Compatibility as M;
    let cases = [
        Case { mode: M::Backward, old: base.clone(), new: optional_added.clone(), passes: true },
        Case { mode: M::Backward, old: base.clone(), new: required_added.clone(), passes: false },
        Case { mode: M::Backward, old: base.clone(), new: enum_widened.clone(), passes: true },
        Case { mode: M::Backward, old: base.clone(), new: bound_tightened.clone(), passes: false },
        Case { mode: M::Forward, old: base.clone(), new: required_added.clone(), passes: true },
        Case { mode: M::Forward, old: base.clone(), new: enum_widened.clone(), passes: false },
        Case { mode: M::Forward, old: base.clone(), new: required_removed.clone(), passes: false },
        Case { mode: M::Full, old: base.clone(), new: optional_added.clone(), passes: true },
        Case { mode: M::Full, old: base.clone(), new: enum_widened.clone(), passes: false },
        Case { mode: M::None, old: base.clone(), new: json!({"type": "string"}), passes: true },
    ];
    for (i, case) in cases.iter().enumerate() {
        let t = format!("compat.case-{i}");
        register(&c, &t, case.old.clone(), Some(case.mode)).await.unwrap();
        let got = register(&c, &t, case.new.clone(), None).await;
        match (case.passes, got) {
            (true, Ok(v)) => assert_eq!(v, 2, "case {i}"),
            (false, Err(e)) => {
                let (code, d) = refusal(e);
                assert_eq!(code, ErrorCode::IncompatibleSchema, "case {i}");
                assert!(!reasons(&d).is_empty(), "case {i}: one reason per breaking change");
            }
            (passes, got) => panic!("case {i} ({}): expected passes={passes}, got {got:?}", case.mode),
        }
    }

    // The reason names the field.
    register(&c, "compat.named", base.clone(), None).await.unwrap();
    let (_, d) = refusal(register(&c, "compat.named", required_added.clone(), None).await.unwrap_err());
    assert_eq!(reasons(&d), vec!["/coupon: required by the new schema, not by version 1"]);

    // Transitive modes check every earlier version; the plain ones only the latest. History:
    // v1, then v2 registered under `none`, then v3 that matches v2 but not v1.
    let int_n = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    let str_n = json!({"type": "object", "properties": {"n": {"type": "string"}}});
    for (mode, passes) in [(M::Backward, true), (M::BackwardTransitive, false), (M::Full, true), (M::FullTransitive, false)] {
        let t = format!("compat.trans-{mode}");
        register(&c, &t, int_n.clone(), Some(Compatibility::None)).await.unwrap();
        register(&c, &t, str_n.clone(), None).await.unwrap();
        let got = register(&c, &t, str_n.clone(), Some(mode)).await;
        assert!(matches!(&got, Ok(2)), "{mode}: the same schema again is version 2: {got:?}");
        let mut v3 = str_n.clone();
        v3["properties"]["note"] = json!({"type": "string"});
        let got = register(&c, &t, v3, Some(mode)).await;
        assert_eq!(got.is_ok(), passes, "{mode}: {got:?}");
    }
    // Forward: v1 integer, v2 number (under none), v3 number at most 10: v2 accepts v3's events,
    // v1 does not (1.5).
    let narrow = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    let wide = json!({"type": "object", "properties": {"n": {"type": "number"}}});
    let capped = json!({"type": "object", "properties": {"n": {"type": "number", "maximum": 10}}});
    for (mode, passes) in [(M::Forward, true), (M::ForwardTransitive, false)] {
        let t = format!("compat.fwd-{mode}");
        register(&c, &t, narrow.clone(), Some(Compatibility::None)).await.unwrap();
        register(&c, &t, wide.clone(), None).await.unwrap();
        let got = register(&c, &t, capped.clone(), Some(mode)).await;
        assert_eq!(got.is_ok(), passes, "{mode}: {got:?}");
    }

    // Strict reading of open content models, as an option.
    let t = "compat.strict";
    let r = RegisterSchema {
        event_type: t.into(),
        schema: sidebus_client::encode(&base).unwrap(),
        compatibility: None,
        strict: Some(true),
        dry_run: false,
    };
    c.register_schema_with(r).await.unwrap();
    let (code, d) = refusal(register(&c, t, optional_added.clone(), None).await.unwrap_err());
    assert_eq!(code, ErrorCode::IncompatibleSchema);
    assert!(reasons(&d)[0].contains("strict reading"), "{d:?}");

    // A dry run says what would happen and stores nothing.
    let dry = RegisterSchema {
        event_type: "compat.named".into(),
        schema: sidebus_client::encode(&optional_added).unwrap(),
        compatibility: None,
        strict: None,
        dry_run: true,
    };
    let r = c.register_schema_with(dry).await.unwrap();
    assert_eq!((r.version, r.created), (2, true));
    assert_eq!(c.get_schema("compat.named", None).await.unwrap().version, 1, "a dry run stores nothing");
}

#[tokio::test]
async fn a_schema_registered_through_one_daemon_is_enforced_by_another_within_a_second() {
    let env = TestEnv::new();
    let a = env.daemon().start().await;
    let b = env.daemon().start().await;
    let (ca, cb) = (a.client().await, b.client().await);
    // B is up and listening once it sees a first registration.
    register(&ca, "warmup.done", json!({"type": "object"}), None).await.unwrap();
    eventually("the second daemon to see the first schema", Duration::from_secs(20), || async {
        cb.list_schemas().await.ok().filter(|l| !l.types.is_empty()).map(|_| ())
    })
    .await;
    cb.publish("order.created", &json!({"orderId": "o-1"})).await.expect("no schema yet: accepted");
    let registered = Instant::now();
    register(&ca, "order.created", order_schema(), None).await.unwrap();
    let enforced = eventually("the other daemon to enforce the new schema", Duration::from_secs(5), || async {
        match cb.publish("order.created", &json!({"orderId": "o-2"})).await {
            Err(Error::Server { code: ErrorCode::ValidationFailed, .. }) => Some(registered.elapsed()),
            _ => None,
        }
    })
    .await;
    assert!(enforced < Duration::from_secs(1), "enforced after {enforced:?}");
}

#[tokio::test]
async fn unknown_types_can_be_rejected() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("unknown-types", "reject").start().await;
    let c = daemon.client().await;
    let (code, _) = refusal(c.publish("nobody.knows", &json!({})).await.unwrap_err());
    assert_eq!(code, ErrorCode::NotFound);
    register(&c, "nobody.knows", json!({"type": "object"}), None).await.unwrap();
    c.publish("nobody.knows", &json!({})).await.expect("a type with a schema is published");
}

#[tokio::test]
async fn bad_schemas_and_unrepresentable_data_get_clear_errors_and_change_nothing() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    for bad in [
        json!({"type": 5}),
        json!({"type": "object", "properties": {"a": {"minimum": "zero"}}}),
        json!({"$schema": "https://example.com/my-own-draft", "type": "object"}),
        json!({"$ref": "https://example.com/schemas/order.json"}),
    ] {
        let (code, d) = refusal(register(&c, "bad.schema", bad.clone(), None).await.unwrap_err());
        assert_eq!(code, ErrorCode::BadRequest, "{bad}");
        assert!(matches!(&d[0], Detail::Field { field, .. } if field == "schema"), "{bad}: {d:?}");
    }
    let (code, d) = refusal(register(&c, "Bad Type", json!({}), None).await.unwrap_err());
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(matches!(&d[0], Detail::Field { field, .. } if field == "type"), "{d:?}");
    assert!(c.list_schemas().await.unwrap().types.is_empty(), "nothing was registered");

    // Data JSON cannot hold, for a type with a schema: the place is named.
    register(&c, "blob.stored", json!({"type": "object"}), None).await.unwrap();
    let binary = rmpv::Value::Map(vec![("body".into(), rmpv::Value::Binary(vec![1, 2, 3]))]);
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &binary).unwrap();
    let (code, d) = refusal(c.publish_with(Publish::new("blob.stored", buf.into())).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed);
    assert_eq!(paths(&d)[0].0, "/body");
    let int_keys = rmpv::Value::Map(vec![(rmpv::Value::from(1), 1.into())]);
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &int_keys).unwrap();
    let (code, _) = refusal(c.publish_with(Publish::new("blob.stored", buf.into())).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed);
    // Without a schema, the same data is the publisher's business.
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &binary).unwrap();
    c.publish_with(Publish::new("blob.raw", buf.into())).await.expect("no schema: any MessagePack");
}

#[tokio::test]
async fn schemas_dir_is_registered_at_start_up_and_a_bad_file_stops_the_start() {
    let env = TestEnv::new();
    let dir = env.dir.path().join("schemas");
    std::fs::create_dir_all(dir.join("order.created")).unwrap();
    std::fs::write(dir.join("order.created/1.json"), order_schema().to_string()).unwrap();
    let mut v2 = order_schema();
    v2["properties"]["coupon"] = json!({"type": "string"});
    std::fs::write(dir.join("order.created/2.json"), v2.to_string()).unwrap();
    std::fs::write(dir.join("payment.made.json"), json!({"type": "object", "required": ["amount"]}).to_string()).unwrap();
    let daemon = env.daemon().flag("schemas-dir", dir.display()).start().await;
    let c = daemon.client().await;
    let list = eventually("schemas_dir to be registered", Duration::from_secs(20), || async {
        c.list_schemas().await.ok().filter(|l| l.types.len() == 2)
    })
    .await;
    let latest: Vec<(String, u64)> = list.types.iter().map(|t| (t.event_type.clone(), t.latest)).collect();
    assert_eq!(latest, vec![("order.created".to_owned(), 2), ("payment.made".to_owned(), 1)]);
    let (code, _) = refusal(c.publish("payment.made", &json!({})).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed);
    drop(c);
    drop(daemon);
    // Starting again with the same files changes nothing.
    let daemon = env.daemon().flag("schemas-dir", dir.display()).start().await;
    let c = daemon.client().await;
    eventually("schemas_dir to be checked again", Duration::from_secs(20), || async {
        daemon.log().contains("schemas_dir: every file checked").then_some(())
    })
    .await;
    assert_eq!(c.get_schema("order.created", None).await.unwrap().version, 2);
    drop(daemon);

    std::fs::write(dir.join("broken.json"), "{ not json").unwrap();
    let mut d = env.daemon().flag("schemas-dir", dir.display()).spawn();
    let status = d.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(78), "a bad schema file is a config error");
    assert!(d.log().contains("schemas_dir") && d.log().contains("broken.json"), "{}", d.log());
}

#[tokio::test]
async fn a_daemon_without_postgres_validates_with_what_it_has_cached_even_after_a_restart() {
    let mut postgres = PgServer::start();
    let mut env = TestEnv::new();
    env.database_url = postgres.url("sidebus");
    let daemon = env.daemon().flag("node", "cached").start().await;
    let c = daemon.client().await;
    register(&c, "order.created", order_schema(), None).await.unwrap();
    postgres.stop();
    let (code, _) = refusal(c.publish("order.created", &json!({"orderId": "o-1"})).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed, "validated from memory");
    drop(c);
    drop(daemon);
    // The same data dir: the cache file is there.
    let daemon = env.restart_first().await;
    let c = daemon.client().await;
    let (code, _) = refusal(c.publish("order.created", &json!({"orderId": "o-2"})).await.unwrap_err());
    assert_eq!(code, ErrorCode::ValidationFailed, "validated from the cache file");
    let ok = c.publish("order.created", &json!({"orderId": "o-3", "amount": 1, "currency": "USD"})).await.unwrap();
    assert_eq!(ok.status, sidebus_client::PublishStatus::Spooled);
}

fn sidebus(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sidebus")).args(args).env("SIDEBUS_SOCKET", daemon.socket()).output().expect("run sidebus")
}

#[tokio::test]
async fn the_schema_command_line_registers_checks_gets_and_lists() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let file = env.dir.path().join("order.json");
    std::fs::write(&file, order_schema().to_string()).unwrap();
    let f = file.display().to_string();

    let out = sidebus(&daemon, &["schema", "register", "order.created", &f]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "registered order.created version 1");

    let mut v2 = order_schema();
    v2["required"] = json!(["orderId", "amount", "currency", "coupon"]);
    let file2 = env.dir.path().join("order2.json");
    std::fs::write(&file2, v2.to_string()).unwrap();
    let out = sidebus(&daemon, &["schema", "check", "order.created", &file2.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "incompatible: exit 1 {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/coupon: required by the new schema"), "{out:?}");
    let out = sidebus(&daemon, &["schema", "check", "order.created", &f, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["version"].as_u64(), v["created"].as_bool()), (Some(1), Some(false)));

    let out = sidebus(&daemon, &["schema", "get", "order.created"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), order_schema());
    let out = sidebus(&daemon, &["schema", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"types": [{"type": "order.created", "latest": 1, "compatibility": "backward"}]}));
    let out = sidebus(&daemon, &["schema", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().starts_with("order.created"), "{out:?}");

    let out = sidebus(&daemon, &["schema", "get", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(&file, "not json").unwrap();
    let out = sidebus(&daemon, &["schema", "register", "order.created", &f]);
    assert_eq!(out.status.code(), Some(65), "unreadable input");
    for sub in ["register", "check", "get", "list"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sidebus")).args(["schema", sub, "--help"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Example"), "{sub} --help has an example");
    }
}
