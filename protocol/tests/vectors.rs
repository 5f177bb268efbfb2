//! The golden vectors in `protocol/vectors/`: each `.msgpack` is one frame body, the `.json`
//! beside it shows what it means (for `invalid/`, the error the daemon answers).
//!
//! This test builds every vector with this crate's encoders and checks that the files hold
//! exactly those bytes, that each decodes to its `.json`, and that each parses back (requests
//! to the same request, invalid frames to the named error). `SIDEBUS_WRITE_VECTORS=1` rewrites
//! the files after a deliberate change of the contract.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::{Value as J, json};
use sidebus_protocol::dead_letters::{Attempt, Count, DeadLetterEntry, DlqAction, DlqEntries, DlqList};
use sidebus_protocol::groups::{GroupDelete, GroupDeleted, GroupInfo, GroupList, GroupMoved, GroupReset, ResetTo};
use sidebus_protocol::replay::{Replay, ReplayInfo, ReplayList, ReplayStarted};
use sidebus_protocol::reply::{ErrorReply, HelloOk, PublishStatus, Published, Subscribed, encode_ok};
use sidebus_protocol::request::{Durability, Nack, Publish, Subscribe};
use sidebus_protocol::schema::{Compatibility, RegisterSchema, SchemaInfo, SchemaList, SchemaRegistered, SchemaSummary};
use sidebus_protocol::stats::{BackendStats, GroupStats, Stats};
use sidebus_protocol::{Deliver, Detail, ErrorCode, Event, Request, RequestFrame, RequestId, ServerFrame};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn mp(v: &rmpv::Value) -> Vec<u8> {
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, v).unwrap();
    b
}

fn order_data() -> Bytes {
    let v = rmpv::Value::Map(vec![("orderId".into(), "o-1001".into()), ("amount".into(), 4250.into()), ("currency".into(), "EUR".into())]);
    Bytes::from(mp(&v))
}

fn event() -> Event {
    Event {
        id: "01936b2e-8f3a-7c4d-9e21-5b6f7a8c9d0e".into(),
        event_type: "order.created".into(),
        source: "orders".into(),
        time: "2026-11-27T09:30:00.123456Z".into(),
        schemaversion: Some(2),
        correlationid: "checkout-77".into(),
        partitionkey: Some("customer-17".into()),
        traceparent: None,
        deliverat: None,
        replayed: false,
        data: order_data(),
    }
}

fn event_json() -> J {
    json!({
        "specversion": "1.0", "id": "01936b2e-8f3a-7c4d-9e21-5b6f7a8c9d0e", "type": "order.created", "source": "orders",
        "time": "2026-11-27T09:30:00.123456Z", "schemaversion": 2, "correlationid": "checkout-77", "partitionkey": "customer-17",
        "data": {"orderId": "o-1001", "amount": 4250, "currency": "EUR"}
    })
}

/// `data` with every kind of MessagePack value a publisher may send: binary, nested maps and
/// arrays, negative and large integers, a float, a bool and nil.
fn full_data() -> Bytes {
    let v = rmpv::Value::Map(vec![
        ("invoice".into(), "inv-2026-0042".into()),
        ("pdf".into(), rmpv::Value::Binary(vec![0x25, 0x50, 0x44, 0x46, 0x00, 0xff])),
        ("lines".into(), rmpv::Value::Array(vec![rmpv::Value::Map(vec![("sku".into(), "a-1".into()), ("qty".into(), 2.into())])])),
        ("total".into(), rmpv::Value::F64(42.5)),
        ("discount".into(), (-3).into()),
        ("ledger".into(), rmpv::Value::from(9_007_199_254_740_993u64)),
        ("paid".into(), false.into()),
        ("note".into(), rmpv::Value::Nil),
    ]);
    Bytes::from(mp(&v))
}

fn full_data_json() -> J {
    json!({"invoice": "inv-2026-0042", "pdf": {"$bin": "JVBERgD/"}, "lines": [{"sku": "a-1", "qty": 2}], "total": 42.5,
        "discount": -3, "ledger": 9_007_199_254_740_993u64, "paid": false, "note": null})
}

fn full_publish() -> Publish {
    let mut p = Publish::new("invoice.issued", full_data());
    p.version = Some(3);
    p.source = Some("billing".into());
    p.event_id = Some("inv-2026-0042".into());
    p.correlationid = Some("checkout-77".into());
    p.partitionkey = Some("customer-17".into());
    p.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    p.durability = Durability::Committed;
    p.deliver_at = Some("2026-11-28T08:00:00Z".into());
    p
}

fn replayed_event() -> Event {
    Event {
        id: "inv-2026-0042".into(),
        event_type: "invoice.issued".into(),
        source: "billing".into(),
        time: "2026-11-27T09:30:00.123456Z".into(),
        schemaversion: Some(3),
        correlationid: "checkout-77".into(),
        partitionkey: Some("customer-17".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        deliverat: Some("2026-11-28T08:00:00.000000Z".into()),
        replayed: true,
        data: full_data(),
    }
}

fn full_stats() -> Stats {
    let counters = [
        ("published", 120000),
        ("spooled", 120000),
        ("flushed", 119990),
        ("delivered", 240310),
        ("acked", 240200),
        ("nacked", 95),
        ("retried", 110),
        ("expired_leases", 3),
        ("dead_lettered", 2),
        ("redriven", 1),
        ("replayed", 300),
        ("validation_failures", 4),
        ("protocol_errors", 0),
        ("redis_losses", 1),
        ("recovered", 310),
        ("unauthorized", 2),
    ];
    let group = |group: &str, lag, pending, oldest, dead, consumers, scheduled| GroupStats {
        event_type: "order.created".into(),
        group: group.into(),
        lag,
        pending,
        oldest_pending_ms: oldest,
        dead_letters: dead,
        consumers,
        scheduled,
    };
    Stats {
        node: "web-7".into(),
        uptime_s: 86400,
        counters: counters.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        spool_events: 10,
        spool_bytes: 5120,
        spool_oldest_age_ms: 4,
        groups: vec![group("billing", 10, 4, 250, 1, 2, 3), group("inventory", 0, 0, 0, 0, 0, 0)],
        truncated: true,
        backends: vec![
            BackendStats {
                name: "redis".into(),
                address: "redis://10.0.0.5:6379".into(),
                up: false,
                since: "2026-11-27T09:30:00.123456Z".into(),
                error: Some("redis connect to redis://10.0.0.5:6379: Connection refused (os error 111)".into()),
            },
            BackendStats {
                name: "postgres".into(),
                address: "postgres://sidebus@10.0.0.6:5432/sidebus".into(),
                up: true,
                since: "2026-11-26T09:30:00.000001Z".into(),
                error: None,
            },
        ],
    }
}

fn req(id: Option<RequestId>, request: Request) -> Vec<u8> {
    RequestFrame { id, request }.encode()
}

fn n(id: u64) -> Option<RequestId> {
    Some(RequestId::Num(id))
}

/// (path under vectors/, bytes, what the .json says).
fn vectors() -> Vec<(&'static str, Vec<u8>, J)> {
    let mut publish = Publish::new("order.created", order_data());
    publish.correlationid = Some("checkout-77".into());
    publish.partitionkey = Some("customer-17".into());
    publish.durability = Durability::Committed;
    let mut keyed = Publish::new("payment.made", Bytes::from(mp(&rmpv::Value::from(42))));
    keyed.event_id = Some("pay-42".into());
    let sub = Subscribe {
        event_type: "order.created".into(),
        group: "inventory".into(),
        max_in_flight: Some(16),
        max_attempts: Some(5),
        ack_timeout_ms: Some(30000),
    };
    let bad_type = rmpv::Value::Map(vec![
        ("op".into(), "subscribe".into()),
        ("id".into(), 9.into()),
        ("type".into(), "order.created".into()),
        ("group".into(), "inventory".into()),
        ("max_in_flight".into(), "ten".into()),
    ]);
    let schema = Bytes::from(mp(&rmpv::Value::Map(vec![
        ("type".into(), "object".into()),
        ("required".into(), rmpv::Value::Array(vec!["orderId".into(), "amount".into(), "currency".into()])),
    ])));
    let schema_json = json!({"type": "object", "required": ["orderId", "amount", "currency"]});
    let register = RegisterSchema {
        event_type: "order.created".into(),
        schema: schema.clone(),
        compatibility: Some(Compatibility::Full),
        strict: None,
        dry_run: false,
    };
    let mut delayed = Publish::new("reminder.due", Bytes::from(mp(&rmpv::Value::from("u-1"))));
    delayed.delay_ms = Some(3_600_000);
    let dlq = |ids: Vec<&str>, rate| DlqAction {
        event_type: "user.signup".into(),
        group: "notification".into(),
        ids: ids.into_iter().map(str::to_owned).collect(),
        rate,
    };
    vec![
        (
            "requests/publish_delayed",
            req(n(20), Request::Publish(delayed)),
            json!({"op": "publish", "id": 20, "type": "reminder.due", "data": "u-1", "delay_ms": 3600000}),
        ),
        (
            "requests/replay",
            req(
                n(21),
                Request::Replay(Replay {
                    event_type: "order.created".into(),
                    group: "billing".into(),
                    since: "2026-11-27T08:00:00Z".into(),
                    until: Some("2026-11-27T09:00:00Z".into()),
                }),
            ),
            json!({"op": "replay", "id": 21, "type": "order.created", "group": "billing", "since": "2026-11-27T08:00:00Z", "until": "2026-11-27T09:00:00Z"}),
        ),
        (
            "replies/replay_started",
            encode_ok(n(21).as_ref(), &ReplayStarted { count: 1250, replay: Some("0b7e3f2a-6c1d-4e8f-9a2b-5c4d3e2f1a0b".into()) }),
            json!({"op": "ok", "id": 21, "count": 1250, "replay": "0b7e3f2a-6c1d-4e8f-9a2b-5c4d3e2f1a0b"}),
        ),
        (
            "requests/replay_cancel",
            req(n(22), Request::ReplayCancel { replay: "0b7e3f2a-6c1d-4e8f-9a2b-5c4d3e2f1a0b".into() }),
            json!({"op": "replay_cancel", "id": 22, "replay": "0b7e3f2a-6c1d-4e8f-9a2b-5c4d3e2f1a0b"}),
        ),
        ("requests/replays", req(n(23), Request::Replays { all: true }), json!({"op": "replays", "id": 23, "all": true})),
        (
            "replies/replays",
            encode_ok(
                n(23).as_ref(),
                &ReplayList {
                    replays: vec![ReplayInfo {
                        replay: "0b7e3f2a-6c1d-4e8f-9a2b-5c4d3e2f1a0b".into(),
                        event_type: "order.created".into(),
                        group: "billing".into(),
                        status: "running".into(),
                        reason: "request".into(),
                        added: 500,
                        total: Some(1250),
                        created_at: "2026-11-27T09:30:00.000Z".into(),
                    }],
                },
            ),
            json!({"op": "ok", "id": 23, "replays": [{"replay": "0b7e3f2a-6c1d-4e8f-9a2b-5c4d3e2f1a0b", "type": "order.created", "group": "billing", "status": "running", "reason": "request", "added": 500, "total": 1250, "created_at": "2026-11-27T09:30:00.000Z"}]}),
        ),
        (
            "requests/dlq_list",
            req(
                n(24),
                Request::DlqList(DlqList {
                    event_type: "user.signup".into(),
                    group: "notification".into(),
                    limit: Some(50),
                    after: Some(100),
                    ids: vec![],
                }),
            ),
            json!({"op": "dlq_list", "id": 24, "type": "user.signup", "group": "notification", "limit": 50, "after": 100}),
        ),
        (
            "replies/dlq_entries",
            encode_ok(
                n(24).as_ref(),
                &DlqEntries {
                    entries: vec![DeadLetterEntry {
                        id: 101,
                        event: Bytes::from(event().encode()),
                        error: "malformed email".into(),
                        attempts: 2,
                        failed_at: "2026-11-27T09:31:00.000Z".into(),
                        history: vec![
                            Attempt { attempt: 1, error: "malformed email".into(), at: "2026-11-27T09:30:59.000Z".into() },
                            Attempt { attempt: 2, error: "malformed email".into(), at: "2026-11-27T09:31:00.000Z".into() },
                        ],
                    }],
                    next: None,
                },
            ),
            json!({"op": "ok", "id": 24, "entries": [{"id": 101, "event": event_json(), "error": "malformed email", "attempts": 2, "failed_at": "2026-11-27T09:31:00.000Z", "history": [{"attempt": 1, "error": "malformed email", "at": "2026-11-27T09:30:59.000Z"}, {"attempt": 2, "error": "malformed email", "at": "2026-11-27T09:31:00.000Z"}]}]}),
        ),
        (
            "requests/dlq_redrive",
            req(n(25), Request::DlqRedrive(dlq(vec!["01936f3e-8a6b-7c9d-a1b2-c3d4e5f60718"], Some(100)))),
            json!({"op": "dlq_redrive", "id": 25, "type": "user.signup", "group": "notification", "ids": ["01936f3e-8a6b-7c9d-a1b2-c3d4e5f60718"], "rate": 100}),
        ),
        (
            "requests/dlq_purge",
            req(n(26), Request::DlqPurge(dlq(vec![], None))),
            json!({"op": "dlq_purge", "id": 26, "type": "user.signup", "group": "notification"}),
        ),
        ("replies/count", encode_ok(n(26).as_ref(), &Count { count: 3 }), json!({"op": "ok", "id": 26, "count": 3})),
        ("requests/stats", req(n(27), Request::Stats), json!({"op": "stats", "id": 27})),
        (
            "replies/stats",
            encode_ok(
                n(27).as_ref(),
                &Stats {
                    node: "web-7".into(),
                    uptime_s: 3600,
                    counters: vec![("published".into(), 1200), ("delivered".into(), 1190)],
                    spool_events: 3,
                    spool_bytes: 1450,
                    spool_oldest_age_ms: 2,
                    groups: vec![GroupStats {
                        event_type: "order.created".into(),
                        group: "billing".into(),
                        lag: 10,
                        pending: 4,
                        oldest_pending_ms: 250,
                        dead_letters: 1,
                        consumers: 2,
                        scheduled: 0,
                    }],
                    truncated: false,
                    backends: vec![],
                },
            ),
            json!({"op": "ok", "id": 27, "node": "web-7", "uptime_s": 3600, "counters": {"published": 1200, "delivered": 1190},
                "spool": {"events": 3, "bytes": 1450, "oldest_age_ms": 2},
                "groups": [{"type": "order.created", "group": "billing", "lag": 10, "pending": 4, "oldest_pending_ms": 250, "dead_letters": 1, "consumers": 2, "scheduled": 0}]}),
        ),
        (
            "requests/register_schema",
            req(n(10), Request::RegisterSchema(register)),
            json!({"op": "register_schema", "id": 10, "type": "order.created", "schema": schema_json, "compatibility": "full"}),
        ),
        (
            "requests/get_schema",
            req(n(11), Request::GetSchema { event_type: "order.created".into(), version: Some(2) }),
            json!({"op": "get_schema", "id": 11, "type": "order.created", "version": 2}),
        ),
        ("requests/list_schemas", req(n(12), Request::ListSchemas), json!({"op": "list_schemas", "id": 12})),
        (
            "replies/schema_registered",
            encode_ok(n(10).as_ref(), &SchemaRegistered { event_type: "order.created".into(), version: 2, created: true }),
            json!({"op": "ok", "id": 10, "type": "order.created", "version": 2, "created": true}),
        ),
        (
            "replies/schema",
            encode_ok(
                n(11).as_ref(),
                &SchemaInfo {
                    event_type: "order.created".into(),
                    version: 2,
                    schema: schema.clone(),
                    compatibility: Compatibility::Full,
                    strict: false,
                },
            ),
            json!({"op": "ok", "id": 11, "type": "order.created", "version": 2, "schema": schema_json, "compatibility": "full", "strict": false}),
        ),
        (
            "replies/schemas",
            encode_ok(
                n(12).as_ref(),
                &SchemaList {
                    types: vec![SchemaSummary { event_type: "order.created".into(), latest: 2, compatibility: Compatibility::Full }],
                },
            ),
            json!({"op": "ok", "id": 12, "types": [{"type": "order.created", "latest": 2, "compatibility": "full"}]}),
        ),
        (
            "replies/error_incompatible_schema",
            ErrorReply {
                id: n(10),
                code: ErrorCode::IncompatibleSchema,
                message: "the schema breaks the `backward` compatibility of `order.created` (1 breaking change)".into(),
                details: vec![Detail::Reason { message: "/coupon: required by the new schema, not by version 1".into() }],
                tag: None,
                sub: None,
            }
            .encode(),
            json!({"op": "error", "id": 10, "code": "incompatible_schema", "message": "the schema breaks the `backward` compatibility of `order.created` (1 breaking change)", "details": [{"message": "/coupon: required by the new schema, not by version 1"}]}),
        ),
        (
            "requests/hello",
            req(n(1), Request::Hello { protocol: 1, client: Some("orders".into()) }),
            json!({"op": "hello", "id": 1, "protocol": 1, "client": "orders"}),
        ),
        ("requests/ping", req(n(2), Request::Ping), json!({"op": "ping", "id": 2})),
        (
            "requests/publish",
            req(n(3), Request::Publish(publish)),
            json!({"op": "publish", "id": 3, "type": "order.created", "data": {"orderId": "o-1001", "amount": 4250, "currency": "EUR"}, "correlationid": "checkout-77", "partitionkey": "customer-17", "durability": "committed"}),
        ),
        (
            "requests/publish_keyed",
            req(Some(RequestId::Key("pay-42".into())), Request::Publish(keyed)),
            json!({"op": "publish", "id": "pay-42", "type": "payment.made", "data": 42}),
        ),
        (
            "requests/subscribe",
            req(n(4), Request::Subscribe(sub)),
            json!({"op": "subscribe", "id": 4, "type": "order.created", "group": "inventory", "max_in_flight": 16, "max_attempts": 5, "ack_timeout_ms": 30000}),
        ),
        ("requests/ack", req(n(5), Request::Ack { tag: 17 }), json!({"op": "ack", "id": 5, "tag": 17})),
        ("requests/ack_without_id", req(None, Request::Ack { tag: 18 }), json!({"op": "ack", "tag": 18})),
        (
            "requests/nack",
            req(n(6), Request::Nack(Nack { tag: 19, error: Some("malformed email".into()), delay_ms: Some(2000), dead: false })),
            json!({"op": "nack", "id": 6, "tag": 19, "error": "malformed email", "delay_ms": 2000}),
        ),
        (
            "requests/nack_dead",
            req(None, Request::Nack(Nack { tag: 20, error: Some("poison".into()), delay_ms: None, dead: true })),
            json!({"op": "nack", "tag": 20, "error": "poison", "dead": true}),
        ),
        ("requests/extend", req(n(7), Request::Extend { tag: 21 }), json!({"op": "extend", "id": 7, "tag": 21})),
        ("requests/unsubscribe", req(n(8), Request::Unsubscribe { sub: 1 }), json!({"op": "unsubscribe", "id": 8, "sub": 1})),
        (
            "replies/hello",
            encode_ok(
                n(1).as_ref(),
                &HelloOk { protocol: 1, server: "sidebus/0.1.0".into(), node: "web-7".into(), max_frame_bytes: 1048576 },
            ),
            json!({"op": "ok", "id": 1, "protocol": 1, "server": "sidebus/0.1.0", "node": "web-7", "max_frame_bytes": 1048576}),
        ),
        ("replies/ok", encode_ok(n(2).as_ref(), &()), json!({"op": "ok", "id": 2})),
        (
            "replies/published",
            encode_ok(
                n(3).as_ref(),
                &Published { event_id: "01936b2e-8f3a-7c4d-9e21-5b6f7a8c9d0e".into(), status: PublishStatus::Committed, duplicate: false },
            ),
            json!({"op": "ok", "id": 3, "event_id": "01936b2e-8f3a-7c4d-9e21-5b6f7a8c9d0e", "status": "committed"}),
        ),
        (
            "replies/published_duplicate",
            encode_ok(
                Some(&RequestId::Key("pay-42".into())),
                &Published { event_id: "pay-42".into(), status: PublishStatus::Committed, duplicate: true },
            ),
            json!({"op": "ok", "id": "pay-42", "event_id": "pay-42", "status": "committed", "duplicate": true}),
        ),
        ("replies/subscribed", encode_ok(n(4).as_ref(), &Subscribed { sub: 1 }), json!({"op": "ok", "id": 4, "sub": 1})),
        (
            "replies/error_bad_request",
            ErrorReply {
                id: n(3),
                code: ErrorCode::BadRequest,
                message: "bad field type: required".into(),
                details: vec![Detail::Field { field: "type".into(), message: "required".into() }],
                tag: None,
                sub: None,
            }
            .encode(),
            json!({"op": "error", "id": 3, "code": "bad_request", "message": "bad field type: required", "details": [{"field": "type", "message": "required"}]}),
        ),
        (
            "replies/error_unauthorized",
            ErrorReply::new(
                n(33),
                ErrorCode::Unauthorized,
                "uid 1001 may not publish payment.settled: no [[access]] entry of its user or groups allows it",
            )
            .encode(),
            json!({"op": "error", "id": 33, "code": "unauthorized",
                "message": "uid 1001 may not publish payment.settled: no [[access]] entry of its user or groups allows it", "details": []}),
        ),
        (
            "replies/error_validation_failed",
            ErrorReply {
                id: n(3),
                code: ErrorCode::ValidationFailed,
                message: "data does not match order.created version 2".into(),
                details: vec![Detail::Path { path: "".into(), message: "\"currency\" is a required property".into() }],
                tag: None,
                sub: None,
            }
            .encode(),
            json!({"op": "error", "id": 3, "code": "validation_failed", "message": "data does not match order.created version 2", "details": [{"path": "", "message": "\"currency\" is a required property"}]}),
        ),
        (
            "replies/error_push_unknown_tag",
            ErrorReply {
                id: None,
                code: ErrorCode::UnknownTag,
                message: "tag 18 is not a delivery this connection holds".into(),
                details: vec![],
                tag: Some(18),
                sub: None,
            }
            .encode(),
            json!({"op": "error", "code": "unknown_tag", "message": "tag 18 is not a delivery this connection holds", "details": [], "tag": 18}),
        ),
        (
            "requests/groups",
            req(n(50), Request::Groups { event_type: Some("order.created".into()) }),
            json!({"op": "groups", "id": 50, "type": "order.created"}),
        ),
        (
            "replies/groups",
            encode_ok(
                n(50).as_ref(),
                &GroupList {
                    groups: vec![GroupInfo {
                        event_type: "order.created".into(),
                        group: "billing".into(),
                        created_at: "2026-11-20T08:00:00.000Z".into(),
                        lag: 10,
                        pending: 4,
                        dead_letters: 1,
                        consumers: 3,
                        last_active: "2026-11-27T09:30:00.000Z".into(),
                    }],
                    truncated: false,
                },
            ),
            json!({"op": "ok", "id": 50, "groups": [{"type": "order.created", "group": "billing", "created_at": "2026-11-20T08:00:00.000Z",
                "lag": 10, "pending": 4, "dead_letters": 1, "consumers": 3, "last_active": "2026-11-27T09:30:00.000Z"}]}),
        ),
        (
            "requests/group_delete",
            req(
                n(51),
                Request::GroupDelete(GroupDelete { event_type: "order.created".into(), group: "tail-web-7-4242-x1y2".into(), force: true }),
            ),
            json!({"op": "group_delete", "id": 51, "type": "order.created", "group": "tail-web-7-4242-x1y2", "force": true}),
        ),
        ("replies/group_deleted", encode_ok(n(51).as_ref(), &GroupDeleted { ended: 1 }), json!({"op": "ok", "id": 51, "ended": 1})),
        (
            "requests/group_reset",
            req(
                n(52),
                Request::GroupReset(GroupReset {
                    event_type: "order.created".into(),
                    group: "billing".into(),
                    to: ResetTo::Time("2026-11-27T08:00:00Z".into()),
                }),
            ),
            json!({"op": "group_reset", "id": 52, "type": "order.created", "group": "billing", "to": "2026-11-27T08:00:00Z"}),
        ),
        (
            "replies/group_reset",
            encode_ok(n(52).as_ref(), &GroupMoved { entry: "1795766399999-0".into() }),
            json!({"op": "ok", "id": 52, "entry": "1795766399999-0"}),
        ),
        (
            "replies/error_push_subscription_ended",
            ErrorReply {
                id: None,
                code: ErrorCode::NotFound,
                message: "group billing of order.created was deleted; subscription 2 has ended".into(),
                details: vec![],
                tag: None,
                sub: Some(2),
            }
            .encode(),
            json!({"op": "error", "code": "not_found", "message": "group billing of order.created was deleted; subscription 2 has ended", "details": [], "sub": 2}),
        ),
        (
            "requests/publish_full",
            req(n(30), Request::Publish(full_publish())),
            json!({"op": "publish", "id": 30, "type": "invoice.issued", "data": full_data_json(), "version": 3, "source": "billing",
                "event_id": "inv-2026-0042", "correlationid": "checkout-77", "partitionkey": "customer-17",
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "durability": "committed",
                "deliver_at": "2026-11-28T08:00:00Z"}),
        ),
        (
            "requests/register_schema_dry_run",
            req(
                n(31),
                Request::RegisterSchema(RegisterSchema {
                    event_type: "order.created".into(),
                    schema: schema.clone(),
                    compatibility: Some(Compatibility::Backward),
                    strict: Some(true),
                    dry_run: true,
                }),
            ),
            json!({"op": "register_schema", "id": 31, "type": "order.created", "schema": schema_json, "compatibility": "backward", "strict": true, "dry_run": true}),
        ),
        (
            "pushes/deliver_replayed",
            Deliver { sub: 2, tag: 40, attempt: 1, event: Bytes::from(replayed_event().encode()) }.encode(),
            json!({"op": "deliver", "sub": 2, "tag": 40, "attempt": 1, "event": {
                "specversion": "1.0", "id": "inv-2026-0042", "type": "invoice.issued", "source": "billing",
                "time": "2026-11-27T09:30:00.123456Z", "schemaversion": 3, "correlationid": "checkout-77", "partitionkey": "customer-17",
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "deliverat": "2026-11-28T08:00:00.000000Z",
                "replayed": true, "data": full_data_json()}}),
        ),
        (
            "replies/error_frame_too_large",
            ErrorReply::new(
                None,
                ErrorCode::FrameTooLarge,
                "a frame is larger than max_frame_bytes (1048576 bytes); closing the connection",
            )
            .encode(),
            json!({"op": "error", "code": "frame_too_large", "message": "a frame is larger than max_frame_bytes (1048576 bytes); closing the connection", "details": []}),
        ),
        (
            "replies/stats_full",
            encode_ok(n(32).as_ref(), &full_stats()),
            json!({"op": "ok", "id": 32, "node": "web-7", "uptime_s": 86400,
                "counters": {"published": 120000, "spooled": 120000, "flushed": 119990, "delivered": 240310, "acked": 240200,
                    "nacked": 95, "retried": 110, "expired_leases": 3, "dead_lettered": 2, "redriven": 1, "replayed": 300,
                    "validation_failures": 4, "protocol_errors": 0, "redis_losses": 1, "recovered": 310, "unauthorized": 2},
                "spool": {"events": 10, "bytes": 5120, "oldest_age_ms": 4},
                "groups": [
                    {"type": "order.created", "group": "billing", "lag": 10, "pending": 4, "oldest_pending_ms": 250, "dead_letters": 1, "consumers": 2, "scheduled": 3},
                    {"type": "order.created", "group": "inventory", "lag": 0, "pending": 0, "oldest_pending_ms": 0, "dead_letters": 0, "consumers": 0, "scheduled": 0}],
                "truncated": true,
                "backends": [
                    {"name": "redis", "address": "redis://10.0.0.5:6379", "up": false, "since": "2026-11-27T09:30:00.123456Z",
                     "error": "redis connect to redis://10.0.0.5:6379: Connection refused (os error 111)"},
                    {"name": "postgres", "address": "postgres://sidebus@10.0.0.6:5432/sidebus", "up": true, "since": "2026-11-26T09:30:00.000001Z"}]}),
        ),
        (
            "pushes/deliver",
            Deliver { sub: 1, tag: 17, attempt: 1, event: Bytes::from(event().encode()) }.encode(),
            json!({"op": "deliver", "sub": 1, "tag": 17, "attempt": 1, "event": event_json()}),
        ),
        ("invalid/not_msgpack", vec![0xc1], json!({"error": "bad_frame", "why": "0xc1 is not a MessagePack marker"})),
        (
            "invalid/not_a_map",
            mp(&rmpv::Value::Array(vec!["ping".into(), 1.into()])),
            json!({"error": "bad_frame", "why": "the body is an array, not a map"}),
        ),
        (
            "invalid/key_not_string",
            vec![0x82, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g', 0x01, 0x01],
            json!({"error": "bad_frame", "why": "a map key is an integer"}),
        ),
        (
            "invalid/trailing_bytes",
            [req(n(2), Request::Ping), vec![0xc0]].concat(),
            json!({"error": "bad_frame", "why": "a byte follows the map"}),
        ),
        (
            "invalid/unknown_op",
            mp(&rmpv::Value::Map(vec![("op".into(), "fly".into()), ("id".into(), 7.into())])),
            json!({"error": "unknown_op", "id": 7}),
        ),
        (
            "invalid/missing_field",
            mp(&rmpv::Value::Map(vec![("op".into(), "publish".into()), ("id".into(), 3.into()), ("data".into(), 1.into())])),
            json!({"error": "bad_request", "id": 3, "field": "type"}),
        ),
        ("invalid/wrong_type", mp(&bad_type), json!({"error": "bad_request", "id": 9, "field": "max_in_flight"})),
        ("invalid/missing_id", mp(&rmpv::Value::Map(vec![("op".into(), "ping".into())])), json!({"error": "bad_request", "field": "id"})),
    ]
}

/// Standard base64 with padding (RFC 4648), for `bin` values in the `.json` files: a few lines
/// here rather than a dependency of the protocol crate's tests.
fn base64(b: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// MessagePack as JSON, the way the `.json` files show it: a `bin` value is `{"$bin": base64}`.
fn to_json(v: &rmpv::Value) -> J {
    match v {
        rmpv::Value::Nil => J::Null,
        rmpv::Value::Boolean(b) => J::Bool(*b),
        rmpv::Value::Integer(i) => i.as_i64().map(J::from).unwrap_or_else(|| J::from(i.as_u64())),
        rmpv::Value::F32(f) => json!(f),
        rmpv::Value::F64(f) => json!(f),
        rmpv::Value::String(s) => J::String(s.as_str().unwrap_or_default().to_owned()),
        rmpv::Value::Binary(b) => json!({ "$bin": base64(b) }),
        rmpv::Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        rmpv::Value::Map(m) => J::Object(m.iter().map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), to_json(v))).collect()),
        rmpv::Value::Ext(..) => J::Null,
    }
}

#[test]
fn vectors_match_the_encoders_and_decode_to_their_meaning() {
    let write = std::env::var_os("SIDEBUS_WRITE_VECTORS").is_some();
    let all = vectors();
    for (name, bytes, meaning) in &all {
        let bin = dir().join(format!("{name}.msgpack"));
        let text = dir().join(format!("{name}.json"));
        if write {
            std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
            std::fs::write(&bin, bytes).unwrap();
            std::fs::write(&text, serde_json::to_string_pretty(meaning).unwrap() + "\n").unwrap();
        }
        let on_disk = std::fs::read(&bin).unwrap_or_else(|e| panic!("{name}: {e} (run with SIDEBUS_WRITE_VECTORS=1 to create it)"));
        assert_eq!(&on_disk, bytes, "{name}.msgpack differs from what the encoder writes");
        let json_on_disk: J = serde_json::from_str(&std::fs::read_to_string(&text).unwrap()).unwrap();
        assert_eq!(&json_on_disk, meaning, "{name}.json");
        let frame = Bytes::from(on_disk);
        if name.starts_with("invalid/") {
            let err = RequestFrame::parse(frame).expect_err(name);
            assert_eq!(err.code.as_str(), meaning["error"], "{name}");
            if let Some(id) = meaning.get("id") {
                assert_eq!(err.id, Some(RequestId::Num(id.as_u64().unwrap())), "{name}");
            }
            if let Some(field) = meaning.get("field") {
                assert!(matches!(&err.details[..], [Detail::Field { field: f, .. }] if f == field), "{name}: {:?}", err.details);
            }
            continue;
        }
        let value = rmpv::decode::read_value(&mut frame.as_ref()).unwrap();
        assert_eq!(&to_json(&value), meaning, "{name} decodes to its .json");
        if name.starts_with("requests/") {
            let parsed = RequestFrame::parse(frame.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(parsed.encode(), frame.to_vec(), "{name} re-encodes to the same bytes");
        } else {
            ServerFrame::parse(frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    // No stray files: every vector on disk is one this test knows.
    for sub in ["requests", "replies", "pushes", "invalid"] {
        for entry in std::fs::read_dir(dir().join(sub)).unwrap() {
            let path = entry.unwrap().path();
            let stem = format!("{sub}/{}", path.file_stem().unwrap().to_string_lossy());
            assert!(all.iter().any(|(n, _, _)| *n == stem), "{} is not a known vector", path.display());
        }
    }
}

/// The invalid vectors, for the daemon's tests to send to a real daemon.
pub fn invalid_vectors() -> Vec<(String, Vec<u8>, J)> {
    vectors().into_iter().filter(|(n, _, _)| n.starts_with("invalid/")).map(|(n, b, j)| (n.to_owned(), b, j)).collect()
}

#[test]
fn the_deliver_vector_carries_a_decodable_event() {
    let frame = std::fs::read(dir().join("pushes/deliver.msgpack")).unwrap();
    let ServerFrame::Deliver(d) = ServerFrame::parse(Bytes::from(frame)).unwrap() else { panic!("not a deliver") };
    assert_eq!(Event::decode(d.event).unwrap(), event());
}
