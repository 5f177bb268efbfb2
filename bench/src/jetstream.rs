//! NATS JetStream, the peer a user would pick instead: a file-storage stream, publishes with
//! acks (pipelined), durable pull consumers with explicit acks. Same payload size and the same
//! measurements as the sidebus runs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::sidebus::{Clock, Load, PAYLOAD, WINDOW};
use crate::stats::{self, Latency};

const STREAM: &str = "SIDEBUS_BENCH";

fn payload(sent_ns: u64) -> Bytes {
    let mut b = Vec::with_capacity(PAYLOAD);
    b.extend_from_slice(&sent_ns.to_le_bytes());
    b.resize(PAYLOAD, 0x5a);
    Bytes::from(b)
}

async fn context(url: &str) -> Result<jetstream::Context> {
    let client = async_nats::connect(url).await.with_context(|| format!("connect to NATS at {url}"))?;
    Ok(jetstream::new(client))
}

/// Creates the bench stream (file storage) afresh; returns the server version.
pub async fn setup(url: &str) -> Result<String> {
    let client = async_nats::connect(url).await.with_context(|| format!("connect to NATS at {url}"))?;
    let version = client.server_info().version;
    let js = jetstream::new(client);
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["sbbench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("create the JetStream stream")?;
    Ok(version)
}

/// Deletes the bench stream.
pub async fn teardown(url: &str) -> Result<()> {
    let _ = context(url).await?.delete_stream(STREAM).await;
    Ok(())
}

/// `connections` clients publishing with acks, each with up to [`WINDOW`] acks outstanding.
pub async fn publish_throughput(url: &str, connections: usize, duration: Duration) -> Result<stats::Result> {
    let subject = format!("sbbench.pub.c{connections}");
    let clock = Clock(Instant::now());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (url, subject) = (url.to_owned(), subject.clone());
        tasks.push(tokio::spawn(async move {
            let js = context(&url).await?;
            let mut inflight = VecDeque::with_capacity(WINDOW);
            let mut lat = Latency::new();
            let mut n = 0u64;
            while start.elapsed() < duration {
                let sent = clock.ns();
                inflight.push_back((sent, js.publish(subject.clone(), payload(sent)).await?));
                if inflight.len() >= WINDOW
                    && let Some((sent, ack)) = inflight.pop_front()
                {
                    ack.await?;
                    lat.record(clock.since(sent));
                    n += 1;
                }
            }
            for (sent, ack) in inflight {
                ack.await?;
                lat.record(clock.since(sent));
                n += 1;
            }
            anyhow::Ok((n, lat))
        }));
    }
    let (mut total, mut lat) = (0, Latency::new());
    for t in tasks {
        let (n, l) = t.await??;
        total += n;
        lat.merge(&l);
    }
    let what = format!("JetStream publishes acknowledged per second (file storage), {connections} connection(s) pipelined");
    Ok(stats::Result::rate(&format!("jetstream.publish.c{connections}"), &what, total, start.elapsed()).latency(&lat))
}

/// A durable pull consumer reading back everything published on `subject`, acking each.
pub async fn consume_all(url: &str, subject: &str, expected: u64) -> Result<stats::Result> {
    let js = context(url).await?;
    let stream = js.get_stream(STREAM).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("readback".into()),
            filter_subject: subject.into(),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let start = Instant::now();
    let mut n = 0;
    while n < expected {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(30), messages.next()).await else { break };
        m.map_err(|e| anyhow::anyhow!("{e}"))?.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        n += 1;
    }
    Ok(stats::Result::rate("jetstream.consume", "JetStream durable pull consumer, explicit acks, reading a backlog", n, start.elapsed()))
}

/// The JetStream counterpart of [`crate::sidebus::end_to_end`]: one durable consumer per group.
pub async fn end_to_end(url: &str, groups: usize, load: Load, duration: Duration) -> Result<stats::Result> {
    let label = match load {
        Load::Fixed(r) => format!("r{r}"),
        Load::Saturate(c) => format!("sat.c{c}"),
    };
    let subject = format!("sbbench.e2e.{label}.g{groups}");
    let clock = Clock(Instant::now());
    let published = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let js = context(url).await?;
    let stream = js.get_stream(STREAM).await?;
    let mut consumers = Vec::new();
    for g in 0..groups {
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("e2e-{label}-g{groups}-{g}").replace('.', "_")),
                filter_subject: subject.clone(),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::New,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let (published, done) = (published.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            let mut lat = Latency::new();
            let (mut n, mut last) = (0u64, Instant::now());
            loop {
                if done.load(Ordering::Acquire) && n >= published.load(Ordering::Acquire) {
                    break;
                }
                let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(30), messages.next()).await else { break };
                let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(ts) = m.payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
                    lat.record(clock.since(ts));
                }
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                n += 1;
                last = Instant::now();
            }
            anyhow::Ok((n, lat, last))
        }));
    }
    let start = Instant::now();
    let total = match load {
        Load::Fixed(rate) => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<jetstream::context::PublishAckFuture>(65536);
            let waiter = tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(ack) = rx.recv().await {
                    ack.await?;
                    n += 1;
                }
                anyhow::Ok(n)
            });
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while start.elapsed() < duration {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    tx.send(js.publish(subject.clone(), payload(clock.ns())).await?).await?;
                    sent += 1;
                }
            }
            drop(tx);
            waiter.await??
        }
        Load::Saturate(c) => {
            let mut tasks = Vec::new();
            for _ in 0..c {
                let (url, subject) = (url.to_owned(), subject.clone());
                tasks.push(tokio::spawn(async move {
                    let js = context(&url).await?;
                    let mut inflight = VecDeque::with_capacity(WINDOW);
                    let mut n = 0u64;
                    while start.elapsed() < duration {
                        inflight.push_back(js.publish(subject.clone(), payload(clock.ns())).await?);
                        if inflight.len() >= WINDOW
                            && let Some(ack) = inflight.pop_front()
                        {
                            ack.await?;
                            n += 1;
                        }
                    }
                    for ack in inflight {
                        ack.await?;
                        n += 1;
                    }
                    anyhow::Ok(n)
                }));
            }
            let mut n = 0;
            for t in tasks {
                n += t.await??;
            }
            n
        }
    };
    published.store(total, Ordering::Release);
    done.store(true, Ordering::Release);
    let (mut delivered, mut lat, mut last) = (0u64, Latency::new(), start);
    for c in consumers {
        let (n, l, t) = c.await??;
        delivered += n;
        lat.merge(&l);
        last = last.max(t);
    }
    let what = format!("JetStream end to end, {label}, {groups} consumer(s): delivered per second per consumer");
    Ok(stats::Result::rate(&format!("jetstream.e2e.{label}.g{groups}"), &what, delivered / groups as u64, last - start)
        .latency(&lat)
        .with("published", total)
        .with("delivered_all_groups", delivered))
}
