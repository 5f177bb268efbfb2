//! nack → retried after the backoff with the next attempt number; `delay_ms`; expired leases;
//! `extend`; `max_attempts` and `dead` → the dead-letter stream (README.md result 5); retry
//! state surviving a daemon restart.

use std::time::{Duration, Instant};

use sidebus_client::SubscribeOptions;

use crate::harness::{TestEnv, assert_quiet, dead_letters, eventually, next};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_nack_is_retried_after_the_backoff_with_the_next_attempt() {
    let env = TestEnv::new();
    let daemon = env.daemon().flag("backoff-initial-ms", 400).flag("backoff-factor", 2).start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("mail.send", "mailer", SubscribeOptions::default()).await.unwrap();
    let id = c.publish("mail.send", &"hi").await.unwrap().event_id;
    let d = next(&mut sub, WAIT).await;
    assert_eq!(d.attempt, 1);
    let t = Instant::now();
    d.nack("smtp down").await.unwrap();
    let d = next(&mut sub, WAIT).await;
    let first = t.elapsed();
    assert_eq!((d.event.id.as_str(), d.attempt), (id.as_str(), 2));
    // 400 ms ±20 % jitter.
    assert!(first >= Duration::from_millis(320), "retried after {first:?}, before the backoff");
    let t = Instant::now();
    d.nack("smtp down").await.unwrap();
    let d = next(&mut sub, WAIT).await;
    let second = t.elapsed();
    assert_eq!(d.attempt, 3);
    // 400 ms * 2 ±20 %: the delay grows with the attempt.
    assert!(second >= Duration::from_millis(640), "third attempt after {second:?}");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn a_nack_with_delay_ms_waits_that_long() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("mail.send", "mailer", SubscribeOptions::default()).await.unwrap();
    c.publish("mail.send", &"hi").await.unwrap();
    let d = next(&mut sub, WAIT).await;
    let t = Instant::now();
    d.nack_with(Some("rate limited"), Some(900), false).await.unwrap();
    let d = next(&mut sub, WAIT).await;
    assert!(t.elapsed() >= Duration::from_millis(900), "retried after {:?}", t.elapsed());
    assert_eq!(d.attempt, 2);
}

/// README.md result 5: the handler fails on a malformed email; after its retries the event is in
/// the dead-letter queue with the error, and nothing more is delivered.
#[tokio::test]
async fn after_max_attempts_the_event_is_dead_lettered_with_its_error() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub =
        c.subscribe("user.signup", "notification", SubscribeOptions { max_attempts: Some(3), ..Default::default() }).await.unwrap();
    let id = c.publish("user.signup", &serde_json::json!({"email": "not-an-email"})).await.unwrap().event_id;
    for attempt in 1..=3 {
        let d = next(&mut sub, WAIT).await;
        assert_eq!((d.event.id.as_str(), d.attempt), (id.as_str(), attempt));
        d.nack(&format!("malformed email (try {attempt})")).await.unwrap();
    }
    let dead = eventually("the dead letter", WAIT, || async {
        let d = dead_letters(&c, "user.signup", "notification").await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "malformed email (try 3)");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(sidebus_protocol::Event::decode(dead[0].event.clone()).unwrap().id, id);
    assert!(dead[0].failed_at.starts_with("20"), "{}", dead[0].failed_at);
    let errors: Vec<(u64, &str)> = dead[0].history.iter().map(|a| (a.attempt, a.error.as_str())).collect();
    assert_eq!(errors, vec![(1, "malformed email (try 1)"), (2, "malformed email (try 2)"), (3, "malformed email (try 3)")]);
    // The backoff here is at most 400 ms: a fourth attempt would have come.
    assert_quiet(&mut sub, Duration::from_millis(1500)).await;
    assert_eq!(env.pending("user.signup", "notification").await, 0, "a dead letter leaves the group's pending list");
}

#[tokio::test]
async fn a_nack_marked_dead_goes_straight_to_the_dead_letters() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("user.signup", "notification", SubscribeOptions::default()).await.unwrap();
    c.publish("user.signup", &1).await.unwrap();
    next(&mut sub, WAIT).await.nack_with(Some("poison"), None, true).await.unwrap();
    let dead = dead_letters(&c, "user.signup", "notification").await;
    assert_eq!(dead.len(), 1, "the nack reply comes after the dead letter is written");
    assert_eq!((dead[0].error.as_str(), dead[0].attempts), ("poison", 1));
    assert_quiet(&mut sub, Duration::from_millis(600)).await;
}

#[tokio::test]
async fn an_expired_lease_is_a_failed_attempt() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let opts = SubscribeOptions { ack_timeout_ms: Some(300), max_attempts: Some(2), ..Default::default() };
    let mut sub = c.subscribe("slow.job", "workers", opts).await.unwrap();
    c.publish("slow.job", &1).await.unwrap();
    let first = next(&mut sub, WAIT).await;
    assert_eq!(first.attempt, 1);
    let second = next(&mut sub, WAIT).await;
    assert_eq!(second.attempt, 2, "redelivered after the ack timeout");
    // The first lease is gone: acking it now is refused.
    let err = first.ack().await.unwrap_err();
    assert_eq!(err.code(), Some(sidebus_protocol::ErrorCode::UnknownTag));
    let dead = eventually("the dead letter after two expired leases", WAIT, || async {
        let d = dead_letters(&c, "slow.job", "workers").await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(dead[0].error.starts_with("ack timeout"), "{}", dead[0].error);
    assert_eq!(dead[0].attempts, 2);
}

#[tokio::test]
async fn extend_keeps_a_lease_alive() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut sub = c.subscribe("slow.job", "workers", SubscribeOptions { ack_timeout_ms: Some(400), ..Default::default() }).await.unwrap();
    c.publish("slow.job", &1).await.unwrap();
    let d = next(&mut sub, WAIT).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        d.extend().await.unwrap();
    }
    d.ack().await.unwrap();
    assert_quiet(&mut sub, Duration::from_millis(800)).await;
}

#[tokio::test]
async fn a_scheduled_retry_survives_a_daemon_restart() {
    let env = TestEnv::new();
    let mut first = env.daemon().start().await;
    let c = first.client().await;
    let mut sub = c.subscribe("mail.send", "mailer", SubscribeOptions::default()).await.unwrap();
    let id = c.publish("mail.send", &1).await.unwrap().event_id;
    // The reply to the nack comes once Redis holds the schedule.
    next(&mut sub, WAIT).await.nack_with(Some("later"), Some(1500), false).await.unwrap();
    first.kill();
    let second = env.daemon().start().await;
    let c = second.client().await;
    let mut sub = c.subscribe("mail.send", "mailer", SubscribeOptions::default()).await.unwrap();
    let d = next(&mut sub, WAIT).await;
    assert_eq!((d.event.id.as_str(), d.attempt), (id.as_str(), 2));
}
