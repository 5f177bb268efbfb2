//! sidebus through its socket with the Rust client: publish throughput, and end-to-end rate and
//! latency from publish to delivery.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use sidebus_client::{Client, Durability, Publish, SubscribeOptions};

use crate::stats::{self, Latency};

/// Bytes of `data` in every event.
pub const PAYLOAD: usize = 300;
/// Publishes awaiting their reply per connection when pipelining.
pub const WINDOW: usize = 1024;

/// A clock shared by publishers and consumers of this process.
#[derive(Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    /// Nanoseconds since the clock started.
    pub fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }

    /// The time since `ns`.
    pub fn since(&self, ns: u64) -> Duration {
        Duration::from_nanos(self.ns().saturating_sub(ns))
    }
}

/// `data`: MessagePack bin of [`PAYLOAD`] bytes, the first 8 the send time.
pub fn data(sent_ns: u64) -> Bytes {
    let mut b = Vec::with_capacity(PAYLOAD + 3);
    b.extend_from_slice(&[0xc5, (PAYLOAD >> 8) as u8, PAYLOAD as u8]);
    b.extend_from_slice(&sent_ns.to_le_bytes());
    b.resize(PAYLOAD + 3, 0x5a);
    Bytes::from(b)
}

/// The send time carried by [`data`].
pub fn sent_ns(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(3..11)?.try_into().ok()?))
}

fn publish(event_type: &str, clock: Clock, durability: Durability) -> Publish {
    let mut p = Publish::new(event_type, data(clock.ns()));
    p.durability = durability;
    p
}

/// `connections` clients, each pipelining up to [`WINDOW`] publishes, for `duration`.
pub async fn publish_throughput(socket: &Path, connections: usize, duration: Duration, durability: Durability) -> Result<stats::Result> {
    let event_type = format!("bench.publish.{}.c{connections}", durability.as_str());
    let clock = Clock(Instant::now());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (socket, event_type) = (socket.to_owned(), event_type.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::connect_as(&socket, "bench").await?;
            let mut inflight = VecDeque::with_capacity(WINDOW);
            let mut lat = Latency::new();
            let mut n = 0u64;
            while start.elapsed() < duration {
                let sent = clock.ns();
                inflight.push_back((sent, client.publish_start(publish(&event_type, clock, durability)).await?));
                if inflight.len() >= WINDOW
                    && let Some((sent, p)) = inflight.pop_front()
                {
                    p.wait().await?;
                    lat.record(clock.since(sent));
                    n += 1;
                }
            }
            for (sent, p) in inflight {
                p.wait().await?;
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
    let what = format!("publishes acknowledged per second, durability={}, {connections} connection(s) pipelined", durability.as_str());
    Ok(stats::Result::rate(&format!("publish.{}.c{connections}", durability.as_str()), &what, total, start.elapsed()).latency(&lat))
}

/// How an end-to-end run publishes.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// One connection at a fixed rate (events per second).
    Fixed(u64),
    /// Connections pipelining as fast as they can.
    Saturate(usize),
}

/// Publishes for `duration` and measures, for each of `groups` groups (one consumer each, acking
/// every delivery), the delivered rate and the latency from publish to delivery.
pub async fn end_to_end(socket: &Path, groups: usize, load: Load, duration: Duration) -> Result<(stats::Result, Latency)> {
    let label = match load {
        Load::Fixed(r) => format!("r{r}"),
        Load::Saturate(c) => format!("sat.c{c}"),
    };
    let event_type = format!("bench.e2e.{label}.g{groups}");
    let clock = Clock(Instant::now());
    let published = Arc::new(AtomicU64::new(0));
    let done_publishing = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for g in 0..groups {
        let client = Client::connect_as(socket, "bench-consumer").await?;
        let opts = SubscribeOptions { max_in_flight: Some(1024), ..Default::default() };
        let mut sub = client.subscribe(&event_type, &format!("g{g}"), opts).await?;
        let (published, done) = (published.clone(), done_publishing.clone());
        consumers.push(tokio::spawn(async move {
            let mut lat = Latency::new();
            let mut n = 0u64;
            let mut last = Instant::now();
            loop {
                if done.load(Ordering::Acquire) && n >= published.load(Ordering::Acquire) {
                    break;
                }
                let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await else { break };
                if let Some(sent) = sent_ns(&d.event.data) {
                    lat.record(clock.since(sent));
                }
                n += 1;
                last = Instant::now();
                d.ack_nowait().await?;
            }
            drop(client);
            anyhow::Ok((n, lat, last))
        }));
    }
    let start = Instant::now();
    let total = match load {
        Load::Fixed(rate) => publish_paced(socket, &event_type, clock, rate, duration).await?,
        Load::Saturate(c) => {
            let mut tasks = Vec::new();
            for _ in 0..c {
                let (socket, event_type): (PathBuf, String) = (socket.to_owned(), event_type.clone());
                tasks.push(tokio::spawn(async move { publish_pipelined(&socket, &event_type, clock, duration).await }));
            }
            let mut n = 0;
            for t in tasks {
                n += t.await??;
            }
            n
        }
    };
    published.store(total, Ordering::Release);
    done_publishing.store(true, Ordering::Release);
    let (mut delivered, mut lat, mut last) = (0u64, Latency::new(), start);
    for c in consumers {
        let (n, l, t) = c.await??;
        delivered += n;
        lat.merge(&l);
        last = last.max(t);
    }
    let what = match load {
        Load::Fixed(r) => format!("end to end at {r}/s offered, {groups} group(s): delivered per second per group"),
        Load::Saturate(c) => {
            format!("end to end at saturation ({c} publishing connections), {groups} group(s): delivered per second per group")
        }
    };
    let per_group = delivered / groups as u64;
    let r = stats::Result::rate(&format!("e2e.{label}.g{groups}"), &what, per_group, last - start)
        .latency(&lat)
        .with("published", total)
        .with("delivered_all_groups", delivered);
    Ok((r, lat))
}

async fn publish_pipelined(socket: &Path, event_type: &str, clock: Clock, duration: Duration) -> Result<u64> {
    let client = Client::connect_as(socket, "bench").await?;
    let start = Instant::now();
    let mut inflight = VecDeque::with_capacity(WINDOW);
    let mut n = 0;
    while start.elapsed() < duration {
        inflight.push_back(client.publish_start(publish(event_type, clock, Durability::Committed)).await?);
        if inflight.len() >= WINDOW
            && let Some(p) = inflight.pop_front()
        {
            p.wait().await?;
            n += 1;
        }
    }
    for p in inflight {
        p.wait().await?;
        n += 1;
    }
    Ok(n)
}

/// One connection publishing `rate` events per second, spread evenly (checked every
/// millisecond), replies awaited beside it.
async fn publish_paced(socket: &Path, event_type: &str, clock: Clock, rate: u64, duration: Duration) -> Result<u64> {
    let client = Client::connect_as(socket, "bench").await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<sidebus_client::PendingPublish>(65536);
    let waiter = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(p) = rx.recv().await {
            p.wait().await?;
            n += 1;
        }
        anyhow::Ok(n)
    });
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            tx.send(client.publish_start(publish(event_type, clock, Durability::Committed)).await?).await?;
            sent += 1;
        }
    }
    drop(tx);
    waiter.await?
}

/// Publishes `n` events of `event_type` with `connections` clients pipelining; returns how many
/// were acknowledged and how long it took.
pub async fn publish_count(socket: &Path, event_type: &str, connections: usize, n: u64, durability: Durability) -> Result<(u64, Duration)> {
    let clock = Clock(Instant::now());
    let start = Instant::now();
    let per = n / connections as u64;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (socket, event_type) = (socket.to_owned(), event_type.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = Client::connect_as(&socket, "bench").await?;
            let mut inflight = VecDeque::with_capacity(WINDOW);
            let mut done = 0u64;
            for _ in 0..per {
                inflight.push_back(client.publish_start(publish(&event_type, clock, durability)).await?);
                if inflight.len() >= WINDOW
                    && let Some(p) = inflight.pop_front()
                {
                    p.wait().await?;
                    done += 1;
                }
            }
            for p in inflight {
                p.wait().await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed()))
}

/// Opens `n` connections that each say hello, and keeps them open.
pub async fn connect_many(socket: &Path, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(Client::connect_as(socket, "idle").await?);
    }
    Ok(clients)
}

/// The event log through sidebus's own code (created and migrated when missing).
pub async fn log_for(url: &str) -> Result<sidebus::backend::pg::EventLog> {
    let log = sidebus::backend::pg::EventLog::connect(url).await?;
    log.migrate().await?;
    Ok(log)
}
