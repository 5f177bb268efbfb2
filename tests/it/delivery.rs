//! Publish → delivered to every group; the consumers of one group share the work; ack;
//! order; idempotent publish; the scenarios of README.md's results 1 and 2.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use sidebus_client::{Publish, PublishStatus, SubscribeOptions};

use crate::harness::{TestEnv, assert_quiet, eventually, next};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn every_group_receives_every_event_in_order_with_its_attributes() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let consumer = daemon.client().await;
    let mut inventory = consumer.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap();
    let mut analytics = consumer.subscribe("order.created", "analytics", SubscribeOptions::default()).await.unwrap();

    let orders = sidebus_client::Client::connect_as(daemon.socket(), "orders").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        let p = orders.publish("order.created", &json!({"orderId": format!("o-{i}"), "amount": i, "currency": "EUR"})).await.unwrap();
        assert_eq!(p.status, PublishStatus::Spooled, "durability local (the default) is answered after the spool's fsync");
        assert!(!p.duplicate);
        ids.push(p.event_id);
    }

    for sub in [&mut inventory, &mut analytics] {
        for (i, id) in ids.iter().enumerate() {
            let d = next(sub, WAIT).await;
            assert_eq!(&d.event.id, id, "delivery {i} out of order");
            assert_eq!(d.attempt, 1);
            assert_eq!(d.event.event_type, "order.created");
            assert_eq!(d.event.source, "orders", "the hello name is the default source");
            assert_eq!(d.event.correlationid, *id, "the correlation id defaults to the event id");
            assert!(chrono::DateTime::parse_from_rfc3339(&d.event.time).is_ok(), "time is RFC 3339: {}", d.event.time);
            assert!(d.event.time.ends_with('Z'), "time is UTC: {}", d.event.time);
            assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7, "daemon-assigned ids are UUIDv7");
            let data: serde_json::Value = d.data().unwrap();
            assert_eq!(data, json!({"orderId": format!("o-{i}"), "amount": i, "currency": "EUR"}));
            d.ack().await.unwrap();
        }
    }
}

#[tokio::test]
async fn consumers_of_one_group_share_the_work() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let (a, b) = (daemon.client().await, daemon.client().await);
    let opts = SubscribeOptions { max_in_flight: Some(4), ..Default::default() };
    let mut sa = a.subscribe("job.run", "workers", opts.clone()).await.unwrap();
    let mut sb = b.subscribe("job.run", "workers", opts).await.unwrap();
    let publisher = daemon.client().await;
    let mut want = HashSet::new();
    for i in 0..60 {
        want.insert(publisher.publish("job.run", &i).await.unwrap().event_id);
    }
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    while got_a.len() + got_b.len() < 60 {
        tokio::select! {
            d = sa.next() => { let d = d.unwrap(); got_a.push(d.event.id.clone()); d.ack().await.unwrap(); }
            d = sb.next() => { let d = d.unwrap(); got_b.push(d.event.id.clone()); d.ack().await.unwrap(); }
            _ = tokio::time::sleep(WAIT) => panic!("only {} of 60 delivered", got_a.len() + got_b.len()),
        }
    }
    let all: HashSet<String> = got_a.iter().chain(&got_b).cloned().collect();
    assert_eq!(all.len(), 60, "no event is delivered twice");
    assert_eq!(all, want);
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both consumers got work: {} and {}", got_a.len(), got_b.len());
}

#[tokio::test]
async fn an_acked_delivery_leaves_the_pending_list_and_is_not_redelivered() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("order.paid", "billing", SubscribeOptions { ack_timeout_ms: Some(500), ..Default::default() }).await.unwrap();
    c.publish("order.paid", &"x").await.unwrap();
    let d = next(&mut sub, WAIT).await;
    d.ack().await.unwrap();
    assert_eq!(env.pending("order.paid", "billing").await, 0, "nothing pending after the ack");
    // Twice the ack timeout: an unacked delivery would have come back by then.
    assert_quiet(&mut sub, Duration::from_millis(1000)).await;
}

#[tokio::test]
async fn a_repeated_event_id_is_stored_and_delivered_once() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("payment.made", "ledger", SubscribeOptions::default()).await.unwrap();
    let mut p = Publish::new("payment.made", sidebus_client::encode(&json!({"n": 1})).unwrap());
    p.event_id = Some("pay-42".into());
    // Only a committed publish learns whether it was a duplicate: a local one is answered
    // before the log has seen it.
    p.durability = sidebus_client::Durability::Committed;
    let first = c.publish_with(p.clone()).await.unwrap();
    let second = c.publish_with(p.clone()).await.unwrap();
    // The same id in PROTOCOL.md's other form: a string request `id`.
    let third = c.publish_keyed(p).await.unwrap();
    assert_eq!((first.event_id.as_str(), first.status, first.duplicate), ("pay-42", PublishStatus::Committed, false));
    assert_eq!((second.event_id.as_str(), second.duplicate), ("pay-42", true));
    assert!(third.duplicate);
    let marker = c.publish("payment.made", &json!({"n": 2})).await.unwrap();
    let d = next(&mut sub, WAIT).await;
    assert_eq!(d.event.id, "pay-42");
    d.ack().await.unwrap();
    let d = next(&mut sub, WAIT).await;
    assert_eq!(d.event.id, marker.event_id, "the duplicates were not delivered");
    assert_eq!(env.log().await.count_id("pay-42").await.unwrap(), 1);
}

/// README.md result 1: the order service publishes while inventory's consumers are down; their
/// group's events wait, and they get every one when they come back.
#[tokio::test]
async fn events_wait_for_a_group_whose_consumers_are_down() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let inventory = daemon.client().await;
    let sub = inventory.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap();
    drop(sub);
    drop(inventory);
    let orders = daemon.client().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(orders.publish("order.created", &json!({"orderId": i})).await.unwrap().event_id);
    }
    let inventory = daemon.client().await;
    let mut sub = inventory.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap();
    for id in &ids {
        let d = next(&mut sub, WAIT).await;
        assert_eq!(&d.event.id, id);
        d.ack().await.unwrap();
    }
}

/// A group declared in the config exists from start-up, so events wait for it even before
/// its first subscriber.
#[tokio::test]
async fn a_declared_group_receives_events_published_before_its_first_subscribe() {
    let env = TestEnv::new();
    let daemon = env.daemon().config_file("[[groups]]\ntype = \"order.created\"\nname = \"shipping\"\n").start().await;
    let c = daemon.client().await;
    let id = c.publish("order.created", &1).await.unwrap().event_id;
    let mut sub = c.subscribe("order.created", "shipping", SubscribeOptions::default()).await.unwrap();
    assert_eq!(next(&mut sub, WAIT).await.event.id, id);
}

/// README.md result 2: a new group subscribes; the publisher changes nothing; the new group gets
/// what is published from then on, the old one is unaffected.
#[tokio::test]
async fn a_new_group_gets_events_from_its_first_subscribe() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut old = c.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap();
    // Committed: in Redis before the new group is created.
    let mut p = Publish::new("order.created", sidebus_client::encode(&"before").unwrap());
    p.durability = sidebus_client::Durability::Committed;
    let before = c.publish_with(p).await.unwrap().event_id;
    let mut new = c.subscribe("order.created", "analytics", SubscribeOptions::default()).await.unwrap();
    let after = c.publish("order.created", &"after").await.unwrap().event_id;
    assert_eq!(next(&mut new, WAIT).await.event.id, after, "a new group starts at the end of the stream");
    assert_eq!(next(&mut old, WAIT).await.event.id, before);
    assert_eq!(next(&mut old, WAIT).await.event.id, after);
}

#[tokio::test]
async fn publishes_reach_subscribers_on_another_daemon() {
    let env = TestEnv::new();
    let a = env.daemon().start().await;
    let b = env.daemon().start().await;
    let consumer = b.client().await;
    let mut sub = consumer.subscribe("order.created", "inventory", SubscribeOptions::default()).await.unwrap();
    let id = a.client().await.publish("order.created", &1).await.unwrap().event_id;
    assert_eq!(next(&mut sub, WAIT).await.event.id, id);
    // The log holds it once, whichever daemon wrote it.
    let log = env.log().await;
    eventually("the event in the log", WAIT, || async { (log.count_id(&id).await.unwrap() == 1).then_some(()) }).await;
}

#[tokio::test]
async fn max_in_flight_bounds_unacknowledged_deliveries() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("t.flow", "g", SubscribeOptions { max_in_flight: Some(3), ..Default::default() }).await.unwrap();
    for i in 0..10 {
        c.publish("t.flow", &i).await.unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut sub, WAIT).await);
    }
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    held.remove(0).ack().await.unwrap();
    held.push(next(&mut sub, WAIT).await);
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
}
