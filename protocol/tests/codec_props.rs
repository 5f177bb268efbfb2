//! Property tests of the wire codec: every request and reply round-trips through its encoding,
//! and no byte string makes a decoder panic.

use bytes::Bytes;
use proptest::prelude::*;
use sidebus_protocol::msgpack::check_value;
use sidebus_protocol::reply::{Body, HelloOk, PublishStatus, Published, Subscribed, encode_ok};
use sidebus_protocol::request::{Durability, Nack, Publish, Subscribe};
use sidebus_protocol::{Deliver, Detail, ErrorCode, ErrorReply, Event, Fields, Request, RequestFrame, RequestId, ServerFrame};

fn encode(v: &rmpv::Value) -> Bytes {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).expect("encoding into a Vec cannot fail");
    Bytes::from(buf)
}

fn value() -> impl Strategy<Value = rmpv::Value> {
    let leaf = prop_oneof![
        Just(rmpv::Value::Nil),
        any::<bool>().prop_map(rmpv::Value::from),
        any::<i64>().prop_map(rmpv::Value::from),
        any::<u64>().prop_map(rmpv::Value::from),
        any::<f64>().prop_filter("NaN is not equal to itself", |f| !f.is_nan()).prop_map(rmpv::Value::from),
        ".{0,40}".prop_map(rmpv::Value::from),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(rmpv::Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20)).prop_map(|(t, d)| rmpv::Value::Ext(t, d)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(rmpv::Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(rmpv::Value::Map),
        ]
    })
}

fn type_name() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}
fn group_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,40}"
}
fn text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[ -~]{0,60}")
}
fn event_id() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[!-~]{1,60}")
}

fn publish() -> impl Strategy<Value = Publish> {
    (type_name(), value(), proptest::option::of(1..1000u64), text(), event_id(), text(), text(), text(), any::<bool>()).prop_map(
        |(t, data, version, source, event_id, correlationid, partitionkey, traceparent, committed)| Publish {
            event_type: t,
            data: encode(&data),
            version,
            source,
            event_id,
            correlationid,
            partitionkey,
            durability: if committed { Durability::Committed } else { Durability::Local },
            // One of the two delays, never both (the parser refuses both).
            deliver_at: traceparent.as_ref().filter(|_| committed).map(|_| "2026-11-27T10:00:00Z".to_owned()),
            delay_ms: version.filter(|_| !committed),
            traceparent,
        },
    )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u64>(), text()).prop_map(|(protocol, client)| Request::Hello { protocol, client }),
        Just(Request::Ping),
        publish().prop_map(Request::Publish),
        (
            type_name(),
            group_name(),
            proptest::option::of(1..=1024u64),
            proptest::option::of(1..=1000u64),
            proptest::option::of(100..=86_400_000u64)
        )
            .prop_map(|(event_type, group, max_in_flight, max_attempts, ack_timeout_ms)| {
                Request::Subscribe(Subscribe { event_type, group, max_in_flight, max_attempts, ack_timeout_ms })
            }),
        any::<u64>().prop_map(|tag| Request::Ack { tag }),
        (any::<u64>(), proptest::option::of(".{0,100}"), proptest::option::of(0..=86_400_000u64), any::<bool>())
            .prop_map(|(tag, error, delay_ms, dead)| Request::Nack(Nack { tag, error, delay_ms, dead })),
        any::<u64>().prop_map(|tag| Request::Extend { tag }),
        any::<u64>().prop_map(|sub| Request::Unsubscribe { sub }),
    ]
}

fn frame() -> impl Strategy<Value = RequestFrame> {
    (request(), any::<u64>(), any::<bool>()).prop_map(|(request, n, omit)| {
        // ack, nack and extend may go without an id; a publish with an event id may carry it as a string id.
        let id = match &request {
            r if r.reply_only_with_id() && omit => None,
            Request::Publish(p) if omit && p.event_id.is_some() => Some(RequestId::Key(p.event_id.clone().unwrap_or_default())),
            _ => Some(RequestId::Num(n)),
        };
        RequestFrame { id, request }
    })
}

fn detail() -> impl Strategy<Value = Detail> {
    prop_oneof![
        (".{0,20}", ".{0,40}").prop_map(|(field, message)| Detail::Field { field, message }),
        (".{0,20}", ".{0,40}").prop_map(|(path, message)| Detail::Path { path, message }),
        ".{0,40}".prop_map(|message| Detail::Reason { message }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        ("[!-~]{1,40}", type_name(), ".{0,30}", ".{0,30}"),
        proptest::option::of(any::<u64>()),
        ".{0,30}",
        text(),
        text(),
        any::<bool>(),
        value(),
    )
        .prop_map(|((id, event_type, source, time), schemaversion, correlationid, partitionkey, traceparent, replayed, data)| Event {
            id,
            event_type,
            source,
            time,
            schemaversion,
            correlationid,
            partitionkey,
            deliverat: traceparent.clone().map(|_| "2026-11-27T10:00:00.000000Z".to_owned()),
            traceparent,
            replayed,
            data: encode(&data),
        })
}

fn ok_fields(frame: Vec<u8>, want_id: u64) -> Fields {
    match ServerFrame::parse(Bytes::from(frame)).expect("an ok reply parses") {
        ServerFrame::Ok { id, fields } => {
            assert_eq!(id, Some(RequestId::Num(want_id)));
            fields
        }
        other => panic!("expected ok, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_request_round_trips(f in frame()) {
        let bytes = f.encode();
        let back = RequestFrame::parse(Bytes::from(bytes.clone())).expect("an encoded request parses");
        prop_assert_eq!(&back, &f);
        // The encoding is canonical: encoding what was parsed gives the same bytes.
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn every_reply_round_trips(id in any::<u64>(), sub in any::<u64>(), s in ".{0,30}", n in any::<u64>(), dup in any::<bool>(), details in proptest::collection::vec(detail(), 0..4), code in 0..ErrorCode::ALL.len()) {
        let hello = HelloOk { protocol: n, server: s.clone(), node: s.clone(), max_frame_bytes: n };
        prop_assert_eq!(HelloOk::read(&ok_fields(encode_ok(Some(&RequestId::Num(id)), &hello), id)).unwrap(), hello);
        let published = Published { event_id: s.clone(), status: if dup { PublishStatus::Spooled } else { PublishStatus::Committed }, duplicate: dup };
        prop_assert_eq!(Published::read(&ok_fields(encode_ok(Some(&RequestId::Num(id)), &published), id)).unwrap(), published);
        let subscribed = Subscribed { sub };
        prop_assert_eq!(Subscribed::read(&ok_fields(encode_ok(Some(&RequestId::Num(id)), &subscribed), id)).unwrap(), subscribed);
        let err = ErrorReply { id: Some(RequestId::Num(id)), code: ErrorCode::ALL[code], message: s, details, tag: None, sub: None };
        match ServerFrame::parse(Bytes::from(err.encode())).unwrap() {
            ServerFrame::Error(back) => prop_assert_eq!(back, err),
            other => prop_assert!(false, "expected an error, got {:?}", other),
        }
    }

    #[test]
    fn deliveries_and_events_round_trip(e in event(), sub in any::<u64>(), tag in any::<u64>(), attempt in any::<u64>()) {
        let d = Deliver { sub, tag, attempt, event: Bytes::from(e.encode()) };
        match ServerFrame::parse(Bytes::from(d.encode())).unwrap() {
            ServerFrame::Deliver(back) => {
                prop_assert_eq!(Event::decode(back.event.clone()).unwrap(), e);
                prop_assert_eq!(back, d);
            }
            other => prop_assert!(false, "expected a delivery, got {:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let b = Bytes::from(bytes);
        let _ = RequestFrame::parse(b.clone());
        let _ = ServerFrame::parse(b.clone());
        let _ = Event::decode(b.clone());
        let _ = check_value(&b);
    }

    #[test]
    fn mutated_requests_never_panic_and_errors_name_a_code(f in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = f.encode();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Err(e) = RequestFrame::parse(Bytes::from(bytes)) {
            prop_assert!(ErrorCode::ALL.contains(&e.code));
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn the_structure_check_agrees_with_rmpv(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut rd = bytes.as_slice();
        let rmpv_ok = match rmpv::decode::read_value(&mut rd) {
            Ok(_) => rd.is_empty(),
            Err(rmpv::decode::Error::DepthLimitExceeded) => return Ok(()),
            Err(_) => false,
        };
        prop_assert_eq!(check_value(&bytes).is_ok(), rmpv_ok);
    }

    #[test]
    fn any_value_passes_the_structure_check(v in value()) {
        prop_assert!(check_value(&encode(&v)).is_ok());
    }
}
