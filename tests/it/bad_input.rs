//! Every malformed thing a client can send gets a clear error reply and harms nobody else:
//! oversized frames, bytes that are not MessagePack, non-map bodies, unknown ops, missing and
//! mistyped fields, tags the connection does not hold, and the protocol's invalid vectors.

use std::path::Path;
use std::time::Duration;

use rmpv::Value;
use sidebus_client::SubscribeOptions;

use crate::harness::{TestEnv, get, map, msgpack, next, oversized_header, recv_raw, send_raw};

fn code(v: &Value) -> &str {
    get(v, "code").and_then(Value::as_str).unwrap_or("<no code>")
}

fn field(v: &Value) -> Option<&str> {
    get(v, "details")?.as_array()?.first().and_then(|d| get(d, "field")).and_then(Value::as_str)
}

/// Sends a ping on a raw connection and expects its ok: the connection still works.
async fn still_works(conn: &mut tokio_util::codec::Framed<tokio::net::UnixStream, tokio_util::codec::LengthDelimitedCodec>, id: u64) {
    send_raw(conn, &msgpack(&map(&[("op", "ping".into()), ("id", id.into())]))).await;
    let reply = recv_raw(conn).await.expect("a reply to ping");
    assert_eq!(get(&reply, "op").and_then(Value::as_str), Some("ok"), "{reply}");
    assert_eq!(get(&reply, "id").and_then(Value::as_u64), Some(id));
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_closes_only_its_connection() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("max-frame-bytes", 4096).start().await;
    let mut bystander = daemon.client().await.subscribe("t.x", "g", SubscribeOptions::default()).await.unwrap();
    let mut conn = daemon.raw().await;
    // Only the header: the daemon must refuse from the declared length, before any body.
    tokio::io::AsyncWriteExt::write_all(conn.get_mut(), &oversized_header(64 << 20)).await.unwrap();
    let reply = recv_raw(&mut conn).await.expect("an error before closing");
    assert_eq!(code(&reply), "frame_too_large");
    assert!(get(&reply, "id").is_none());
    assert!(recv_raw(&mut conn).await.is_none(), "the connection is closed after frame_too_large");
    let c = daemon.client().await;
    let id = c.publish("t.x", &1).await.unwrap().event_id;
    assert_eq!(next(&mut bystander, Duration::from_secs(10)).await.event.id, id, "other connections are unaffected");
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_goes_on() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let mut conn = daemon.raw().await;
    let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
        ("not MessagePack", vec![0xc1, 0x00], "bad_frame", None),
        ("truncated MessagePack", vec![0x82, 0xa2, b'o'], "bad_frame", None),
        ("not a map", msgpack(&Value::from("ping")), "bad_frame", None),
        ("a nested-array bomb", vec![0x81, 0xa1, b'a', 0xdd, 0xff, 0xff, 0xff, 0xff], "bad_frame", None),
        ("empty body", vec![], "bad_frame", None),
        ("no op", msgpack(&map(&[("id", 1.into())])), "bad_request", Some("op")),
        ("op not a string", msgpack(&map(&[("op", 5.into()), ("id", 1.into())])), "bad_request", Some("op")),
        ("unknown op", msgpack(&map(&[("op", "fly".into()), ("id", 1.into())])), "unknown_op", None),
        (
            "publish without type",
            msgpack(&map(&[("op", "publish".into()), ("id", 1.into()), ("data", 1.into())])),
            "bad_request",
            Some("type"),
        ),
        (
            "publish without data",
            msgpack(&map(&[("op", "publish".into()), ("id", 1.into()), ("type", "a.b".into())])),
            "bad_request",
            Some("data"),
        ),
        (
            "bad type name",
            msgpack(&map(&[("op", "publish".into()), ("id", 1.into()), ("type", "Order Created".into()), ("data", 1.into())])),
            "bad_request",
            Some("type"),
        ),
        (
            "bad durability",
            msgpack(&map(&[
                ("op", "publish".into()),
                ("id", 1.into()),
                ("type", "a".into()),
                ("data", 1.into()),
                ("durability", "eventually".into()),
            ])),
            "bad_request",
            Some("durability"),
        ),
        (
            "subscribe with a mistyped field",
            msgpack(&map(&[
                ("op", "subscribe".into()),
                ("id", 1.into()),
                ("type", "a".into()),
                ("group", "g".into()),
                ("max_in_flight", "ten".into()),
            ])),
            "bad_request",
            Some("max_in_flight"),
        ),
        (
            "subscribe out of range",
            msgpack(&map(&[
                ("op", "subscribe".into()),
                ("id", 1.into()),
                ("type", "a".into()),
                ("group", "g".into()),
                ("max_in_flight", 100000.into()),
            ])),
            "bad_request",
            Some("max_in_flight"),
        ),
        ("negative tag", msgpack(&map(&[("op", "ack".into()), ("id", 1.into()), ("tag", (-3).into())])), "bad_request", Some("tag")),
        ("ack of a tag never sent", msgpack(&map(&[("op", "ack".into()), ("id", 1.into()), ("tag", 99.into())])), "unknown_tag", None),
        ("nack of a tag never sent", msgpack(&map(&[("op", "nack".into()), ("id", 1.into()), ("tag", 99.into())])), "unknown_tag", None),
        (
            "extend of a tag never sent",
            msgpack(&map(&[("op", "extend".into()), ("id", 1.into()), ("tag", 99.into())])),
            "unknown_tag",
            None,
        ),
        ("unsubscribe of nothing", msgpack(&map(&[("op", "unsubscribe".into()), ("id", 1.into()), ("sub", 5.into())])), "not_found", None),
        (
            "hello of another protocol",
            msgpack(&map(&[("op", "hello".into()), ("id", 1.into()), ("protocol", 2.into())])),
            "unsupported_protocol",
            None,
        ),
        ("ping without id", msgpack(&map(&[("op", "ping".into())])), "bad_request", Some("id")),
    ];
    for (i, (what, body, want, want_field)) in cases.into_iter().enumerate() {
        send_raw(&mut conn, &body).await;
        let reply = recv_raw(&mut conn).await.unwrap_or_else(|| panic!("{what}: the connection closed"));
        assert_eq!(get(&reply, "op").and_then(Value::as_str), Some("error"), "{what}: {reply}");
        assert_eq!(code(&reply), want, "{what}: {reply}");
        assert!(!get(&reply, "message").and_then(Value::as_str).unwrap_or("").is_empty(), "{what}: a message for people");
        if let Some(f) = want_field {
            assert_eq!(field(&reply), Some(f), "{what}: details name the field: {reply}");
        }
        still_works(&mut conn, 1000 + i as u64).await;
    }
}

#[tokio::test]
async fn an_ack_without_id_for_an_unknown_tag_gets_an_error_push() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let mut conn = daemon.raw().await;
    send_raw(&mut conn, &msgpack(&map(&[("op", "ack".into()), ("tag", 12.into())]))).await;
    let reply = recv_raw(&mut conn).await.unwrap();
    assert_eq!(code(&reply), "unknown_tag");
    assert!(get(&reply, "id").is_none(), "an error push carries no id");
    still_works(&mut conn, 1).await;
}

#[tokio::test]
async fn an_event_too_large_to_deliver_is_refused() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("max-frame-bytes", 2048).start().await;
    let c = daemon.client().await;
    // The publish frame fits; with the daemon's attributes the delivery would not.
    let err = c.publish("t.big", &"x".repeat(1990)).await.unwrap_err();
    assert_eq!(err.code(), Some(sidebus_protocol::ErrorCode::BadRequest));
    c.ping().await.unwrap();
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_frame_harms_nobody() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let mut conn = daemon.raw().await;
    let mut partial = vec![0, 0, 1, 0];
    partial.extend_from_slice(&[0x81, 0xa2, b'o']);
    tokio::io::AsyncWriteExt::write_all(conn.get_mut(), &partial).await.unwrap();
    tokio::io::AsyncWriteExt::shutdown(conn.get_mut()).await.unwrap();
    drop(conn);
    daemon.client().await.ping().await.unwrap();
}

#[tokio::test]
async fn the_protocol_invalid_vectors_get_their_documented_errors() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let mut conn = daemon.raw().await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("msgpack") {
            continue;
        }
        let body = std::fs::read(&path).unwrap();
        let meaning: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        send_raw(&mut conn, &body).await;
        let reply = recv_raw(&mut conn).await.unwrap();
        assert_eq!(code(&reply), meaning["error"].as_str().unwrap(), "{}", path.display());
        if let Some(id) = meaning.get("id") {
            assert_eq!(get(&reply, "id").and_then(Value::as_u64), id.as_u64(), "{}", path.display());
        }
        if let Some(f) = meaning.get("field") {
            assert_eq!(field(&reply), f.as_str(), "{}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 8, "the invalid vectors are there ({seen})");
    still_works(&mut conn, 1).await;
}
