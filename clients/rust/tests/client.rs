//! The client against a fake daemon on a Unix socket: pipelining, typed errors, handlers
//! (outcomes and concurrency), reconnection and resubscription, requests while disconnected,
//! graceful close, and the connection's lifetime.

mod fake_daemon;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fake_daemon::{FakeDaemon, WAIT};
use sidebus_client::{Client, ClientOptions, Detail, Error, ErrorCode, Publish, Request, SubscribeOptions, encode};
use tokio::sync::{Notify, mpsc};

fn fast(name: &str) -> ClientOptions {
    ClientOptions {
        name: Some(name.into()),
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..ClientOptions::default()
    }
}

async fn dial(d: &FakeDaemon, opts: ClientOptions) -> (Client, fake_daemon::FakeConn) {
    let path = d.path.clone();
    let connecting = tokio::spawn(async move { Client::connect_with(path, opts).await });
    let (conn, _) = d.accept_hello(1 << 20).await;
    (connecting.await.unwrap().unwrap(), conn)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn connect_as_says_hello_and_publishes_are_pipelined_in_order() {
    let d = FakeDaemon::new();
    let path = d.path.clone();
    let connecting = tokio::spawn(async move { Client::connect_as(path, "orders").await });
    let (mut fc, name) = d.accept_hello(1 << 20).await;
    assert_eq!(name.as_deref(), Some("orders"));
    let c = connecting.await.unwrap().unwrap();

    let mut pending = vec![];
    for i in 0..3u64 {
        let mut p = Publish::new("order.created", encode(&i).unwrap());
        p.event_id = Some(format!("e-{i}"));
        p.partitionkey = Some("customer-17".into());
        pending.push(c.publish_start(p).await.unwrap());
    }
    // All three are on the wire before any answer, in the order they were started.
    let mut reqs = vec![];
    for i in 0..3 {
        let r = fc.expect("publish").await;
        let Request::Publish(p) = &r.request else { unreachable!() };
        assert_eq!((p.event_id.as_deref(), p.partitionkey.as_deref()), (Some(format!("e-{i}").as_str()), Some("customer-17")));
        reqs.push(r);
    }
    // Answered out of order, each answer reaches its own publish.
    for (i, r) in reqs.iter().enumerate().rev() {
        fc.published(r, &format!("e-{i}")).await;
    }
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.wait().await.unwrap().event_id, format!("e-{i}"));
    }
}

#[tokio::test]
async fn error_replies_are_typed_with_their_details() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("orders")).await;
    let publishing = tokio::spawn(async move { c.publish("order.placed", &1).await });
    let r = fc.expect("publish").await;
    fc.fail(
        &r,
        ErrorCode::ValidationFailed,
        "data does not match",
        vec![Detail::Path { path: "/amount".into(), message: "not a number".into() }],
    )
    .await;
    match publishing.await.unwrap() {
        Err(Error::Server { code: ErrorCode::ValidationFailed, details, .. }) => {
            assert_eq!(details, vec![Detail::Path { path: "/amount".into(), message: "not a number".into() }]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_frame_over_max_frame_bytes_is_refused_before_it_is_sent() {
    let d = FakeDaemon::new();
    let path = d.path.clone();
    let connecting = tokio::spawn(async move { Client::connect_as(path, "orders").await });
    let (mut fc, _) = d.accept_hello(256).await;
    let c = connecting.await.unwrap().unwrap();
    let err = c.publish("order.created", &"x".repeat(300)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge));
    // The connection is still good for everything else.
    let pinging = tokio::spawn(async move { c.ping().await });
    let r = fc.expect("ping").await;
    fc.ok_empty(&r).await;
    pinging.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_pending_publish_keeps_the_connection_open_until_it_is_answered() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("orders")).await;
    let p = c.publish_start(Publish::new("order.created", encode(&1).unwrap())).await.unwrap();
    drop(c);
    let r = fc.expect("publish").await;
    fc.quiet(Duration::from_millis(100)).await;
    fc.published(&r, "e-1").await;
    assert_eq!(p.wait().await.unwrap().event_id, "e-1");
    // The last handle is gone: the connection closes.
    fc.wait_eof().await;
}

#[tokio::test]
async fn handler_outcomes_ack_nack_and_explicit_ends() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("billing")).await;
    let subscribing = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("order.created", "billing", SubscribeOptions::default()).await }
    });
    let r = fc.expect("subscribe").await;
    fc.subscribed(&r, 3).await;
    let sub = subscribing.await.unwrap().unwrap();
    assert_eq!(sub.id(), 3);
    tokio::spawn(sub.consume_deliveries(|d| async move {
        match d.data::<u64>().unwrap() {
            1 => Ok(()),
            2 => Err("no stock"),
            _ => {
                d.nack_with(Some("poison"), Some(250), true).await.unwrap();
                Ok(())
            }
        }
    }));
    for (tag, n) in [(1, 1), (2, 2), (3, 3)] {
        fc.deliver(3, tag, 1, &format!("e-{n}"), n).await;
        match n {
            1 => {
                let a = fc.expect("ack").await;
                assert!(a.id.is_some(), "the handler path acks with an id");
                assert_eq!(a.request, Request::Ack { tag: 1 });
                fc.ok_empty(&a).await;
            }
            2 => {
                let r = fc.expect("nack").await;
                let Request::Nack(nack) = &r.request else { unreachable!() };
                assert_eq!((nack.tag, nack.error.as_deref(), nack.dead), (2, Some("no stock"), false));
                fc.ok_empty(&r).await;
            }
            _ => {
                let r = fc.expect("nack").await;
                let Request::Nack(nack) = &r.request else { unreachable!() };
                assert_eq!((nack.tag, nack.delay_ms, nack.dead), (3, Some(250), true));
                fc.ok_empty(&r).await;
                // Ended by the handler: nothing more is sent for it.
                fc.quiet(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn handlers_run_concurrently_up_to_max_in_flight() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("mailer")).await;
    let subscribing = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("order.created", "mailer", SubscribeOptions { max_in_flight: Some(3), ..Default::default() }).await }
    });
    let r = fc.expect("subscribe").await;
    let Request::Subscribe(s) = &r.request else { unreachable!() };
    assert_eq!(s.max_in_flight, Some(3));
    fc.subscribed(&r, 1).await;
    let sub = subscribing.await.unwrap().unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    tokio::spawn(sub.consume({
        let (running, most, release) = (running.clone(), most.clone(), release.clone());
        move |_| {
            let (running, most, release) = (running.clone(), most.clone(), release.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                release.notified().await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        }
    }));
    for tag in 1..=4 {
        fc.deliver(1, tag, 1, &format!("e-{tag}"), tag).await;
    }
    eventually("three handlers running at once", || running.load(Ordering::SeqCst) == 3).await;
    // The fourth waits: max_in_flight bounds the handlers (a daemon never sends it early).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(most.load(Ordering::SeqCst), 3);
    let mut acked = vec![];
    while acked.len() < 4 {
        release.notify_waiters();
        if let Ok(a) = tokio::time::timeout(Duration::from_millis(100), fc.expect("ack")).await {
            let Request::Ack { tag } = a.request else { unreachable!() };
            acked.push(tag);
            fc.ok_empty(&a).await;
        }
    }
    acked.sort();
    assert_eq!(acked, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_break_fails_requests_in_flight_and_the_client_reconnects_and_resubscribes() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("inventory")).await;
    let opts = SubscribeOptions { max_in_flight: Some(8), max_attempts: Some(4), ack_timeout_ms: Some(5000) };
    let subscribing = tokio::spawn({
        let (c, opts) = (c.clone(), opts.clone());
        async move { c.subscribe("order.created", "inventory", opts).await }
    });
    let r = fc.expect("subscribe").await;
    fc.subscribed(&r, 1).await;
    let sub = subscribing.await.unwrap().unwrap();
    let (handled, mut seen) = mpsc::unbounded_channel();
    let block = Arc::new(Notify::new());
    tokio::spawn(sub.consume({
        let block = block.clone();
        move |e| {
            let (handled, block) = (handled.clone(), block.clone());
            async move {
                let _ = handled.send(e.id.clone());
                if e.id == "e-running" {
                    block.notified().await;
                }
                Ok::<(), String>(())
            }
        }
    }));
    // A delivery whose handler runs at the break, and a publish in flight.
    fc.deliver(1, 1, 1, "e-running", 1).await;
    assert_eq!(seen.recv().await.unwrap(), "e-running");
    let publishing = tokio::spawn({
        let c = c.clone();
        async move { c.publish("order.created", &1).await }
    });
    fc.expect("publish").await;
    drop(fc);
    assert!(matches!(publishing.await.unwrap(), Err(Error::ConnectionLost(_))), "a publish in flight fails, it is not re-sent");

    // The client says hello again with its name and resubscribes with the same options.
    let (mut fc2, name) = d.accept_hello(1 << 20).await;
    assert_eq!(name.as_deref(), Some("inventory"));
    let r = fc2.expect("subscribe").await;
    let Request::Subscribe(s) = &r.request else { unreachable!() };
    assert_eq!((s.event_type.as_str(), s.group.as_str()), ("order.created", "inventory"));
    assert_eq!((s.max_in_flight, s.max_attempts, s.ack_timeout_ms), (Some(8), Some(4), Some(5000)));
    fc2.subscribed(&r, 9).await;
    // The handler that ran at the break finishes: its ack is dropped, not sent on the new
    // connection (its tag belonged to the old one).
    block.notify_waiters();
    fc2.quiet(Duration::from_millis(100)).await;
    // The same subscription receives on the new connection.
    fc2.deliver(9, 1, 1, "e-after", 2).await;
    assert_eq!(seen.recv().await.unwrap(), "e-after");
    let a = fc2.expect("ack").await;
    assert_eq!(a.request, Request::Ack { tag: 1 });
    fc2.ok_empty(&a).await;
    // The publish not re-sent by the client goes through when the caller sends it again.
    let publishing = tokio::spawn(async move { c.publish("order.created", &1).await });
    let r = fc2.expect("publish").await;
    fc2.published(&r, "e-1").await;
    publishing.await.unwrap().unwrap();
}

#[tokio::test]
async fn next_goes_on_across_a_break_and_drops_the_deliveries_of_the_old_connection() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("audit")).await;
    let subscribing = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("order.created", "audit", SubscribeOptions::default()).await }
    });
    let r = fc.expect("subscribe").await;
    fc.subscribed(&r, 1).await;
    let mut sub = subscribing.await.unwrap().unwrap();
    fc.deliver(1, 1, 1, "e-held", 1).await;
    fc.deliver(1, 2, 1, "e-queued", 2).await;
    let held = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert_eq!(held.event.id, "e-held");
    drop(fc);
    let (mut fc2, _) = d.accept_hello(1 << 20).await;
    let r = fc2.expect("subscribe").await;
    fc2.subscribed(&r, 2).await;
    // Ending a delivery of the lost connection says so; nothing is sent.
    assert!(matches!(held.ack().await, Err(Error::ConnectionLost(_))));
    fc2.deliver(2, 1, 1, "e-new", 3).await;
    // "e-queued" came on the old connection: it is dropped, the daemon delivers it again.
    let next = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert_eq!(next.event.id, "e-new");
    assert_eq!(sub.id(), 2);
    let acking = tokio::spawn(async move { next.ack().await });
    let a = fc2.expect("ack").await;
    fc2.ok_empty(&a).await;
    acking.await.unwrap().unwrap();
    drop(c);
}

#[tokio::test]
async fn a_request_made_while_disconnected_waits_for_the_reconnection() {
    let mut d = FakeDaemon::new();
    let (c, fc) = dial(&d, fast("orders")).await;
    d.stop();
    drop(fc);
    eventually("the client to notice the break", || !c.is_connected()).await;
    let publishing = tokio::spawn({
        let c = c.clone();
        async move {
            let mut p = Publish::new("order.created", encode(&1).unwrap());
            p.event_id = Some("e-1".into());
            c.publish_with(p).await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!publishing.is_finished(), "the publish did not wait for the reconnection");
    d.listen();
    let (mut fc2, _) = d.accept_hello(1 << 20).await;
    let r = fc2.expect("publish").await;
    fc2.published(&r, "e-1").await;
    assert_eq!(publishing.await.unwrap().unwrap().event_id, "e-1");
}

#[tokio::test]
async fn a_request_made_while_disconnected_times_out() {
    let mut d = FakeDaemon::new();
    let (c, fc) = dial(&d, ClientOptions { reconnect_timeout: Duration::from_millis(300), ..fast("orders") }).await;
    d.stop();
    drop(fc);
    eventually("the client to notice the break", || !c.is_connected()).await;
    let started = std::time::Instant::now();
    let err = c.ping().await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "{took:?}");
    c.close().await.unwrap();
    assert!(matches!(c.ping().await, Err(Error::Closed)));
}

#[tokio::test]
async fn close_is_graceful() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("inventory")).await;
    let subscribing = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("order.created", "inventory", SubscribeOptions::default()).await }
    });
    let r = fc.expect("subscribe").await;
    fc.subscribed(&r, 5).await;
    let sub = subscribing.await.unwrap().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let consuming = tokio::spawn(sub.consume({
        let (calls, started) = (calls.clone(), started.clone());
        move |_| {
            let (calls, started) = (calls.clone(), started.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<(), String>(())
            }
        }
    }));
    fc.deliver(5, 1, 1, "e-1", 1).await;
    started.notified().await;
    let pending = c.publish_start(Publish::new("order.created", encode(&1).unwrap())).await.unwrap();
    let preq = fc.expect("publish").await;
    let closing = tokio::spawn({
        let c = c.clone();
        async move { c.close().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A delivery pushed while closing is not handled (the unsubscribe hands it back).
    fc.deliver(5, 2, 1, "e-2", 2).await;
    // The running handler finishes and its delivery is acked, then the subscription ends.
    let a = fc.expect("ack").await;
    assert_eq!(a.request, Request::Ack { tag: 1 });
    fc.ok_empty(&a).await;
    let u = fc.expect("unsubscribe").await;
    assert_eq!(u.request, Request::Unsubscribe { sub: 5 });
    fc.ok_empty(&u).await;
    // The publish in flight still gets its answer before the connection closes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!closing.is_finished(), "close returned with a publish in flight");
    fc.published(&preq, "p-1").await;
    assert_eq!(pending.wait().await.unwrap().event_id, "p-1");
    fc.wait_eof().await;
    closing.await.unwrap().unwrap();
    consuming.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(matches!(c.publish("order.created", &1).await, Err(Error::Closed)));
    assert!(matches!(c.subscribe("t", "g", SubscribeOptions::default()).await, Err(Error::Closed)));
    // Closing again is fine.
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_subscription_the_daemon_refuses_to_take_back_ends() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("inventory")).await;
    let subscribing = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("order.created", "inventory", SubscribeOptions { max_in_flight: Some(10), ..Default::default() }).await }
    });
    let r = fc.expect("subscribe").await;
    fc.subscribed(&r, 1).await;
    let mut sub = subscribing.await.unwrap().unwrap();
    drop(fc);
    let (mut fc2, _) = d.accept_hello(1 << 20).await;
    // The backends are still connecting: the client tries again.
    let r = fc2.expect("subscribe").await;
    fc2.fail(&r, ErrorCode::Unavailable, "backends not ready", vec![]).await;
    // A refusal for good ends the subscription, saying why.
    let r = fc2.expect("subscribe").await;
    fc2.fail(&r, ErrorCode::BadRequest, "max_in_flight over the connection's limit", vec![]).await;
    assert!(tokio::time::timeout(WAIT, sub.next()).await.unwrap().is_none());
    assert!(sub.end_reason().unwrap().contains("bad_request"), "{:?}", sub.end_reason());
    drop(c);
}

#[tokio::test]
async fn a_client_without_reconnection_ends_at_a_break() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, ClientOptions { reconnect: false, ..fast("tail") }).await;
    let subscribing = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("order.created", "audit", SubscribeOptions::default()).await }
    });
    let r = fc.expect("subscribe").await;
    fc.subscribed(&r, 1).await;
    let mut sub = subscribing.await.unwrap().unwrap();
    drop(fc);
    assert!(tokio::time::timeout(WAIT, sub.next()).await.unwrap().is_none(), "next() ends with the connection");
    assert!(matches!(c.ping().await, Err(Error::Closed)));
}

#[tokio::test]
async fn an_error_push_and_an_unknown_push_are_ignored() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("orders")).await;
    let pinging = tokio::spawn(async move { c.ping().await });
    let r = fc.expect("ping").await;
    fc.fail(&sidebus_protocol::RequestFrame { id: None, request: Request::Ping }, ErrorCode::UnknownTag, "no tag 7", vec![]).await;
    let mut push = sidebus_protocol::MapWriter::new();
    push.str("op", "future_push").uint("n", 1);
    fc.send(push.finish()).await;
    fc.ok_empty(&r).await;
    pinging.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unreadable_reply_fails_its_request_instead_of_leaving_it_waiting() {
    let d = FakeDaemon::new();
    let (c, mut fc) = dial(&d, fast("orders")).await;
    let pinging = tokio::spawn(async move { c.ping().await });
    let r = fc.expect("ping").await;
    let Some(sidebus_protocol::RequestId::Num(id)) = r.id else { unreachable!() };
    // An error reply without its code.
    let mut bad = sidebus_protocol::MapWriter::new();
    bad.str("op", "error").uint("id", id).str("message", "no code");
    fc.send(bad.finish()).await;
    let err = tokio::time::timeout(WAIT, pinging).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn close_while_reconnecting_ends_the_requests_waiting_for_a_connection() {
    let mut d = FakeDaemon::new();
    let (c, fc) = dial(&d, fast("orders")).await;
    d.stop();
    drop(fc);
    eventually("the client to notice the break", || !c.is_connected()).await;
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.ping().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the ping waits for the reconnection");
    tokio::time::timeout(Duration::from_secs(2), c.close()).await.expect("close does not wait for a reconnection").unwrap();
    assert!(matches!(waiting.await.unwrap(), Err(Error::Closed)));
}
