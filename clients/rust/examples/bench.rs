//! Measures the Rust client against a running daemon: subscribes a fresh group, publishes N
//! events pipelined (up to 1,000 in flight, durability local) and reports the publish rate,
//! then the rate at which a handler that just returns consumed (and acked) all N. Prints one
//! JSON line, as the other clients' benches do:
//!
//! ```sh
//! cargo run --release -p sidebus-client --example bench -- --socket /tmp/x.sock --count 50000
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sidebus_client::{Client, Durability, Publish, SubscribeOptions, encode};
use tokio::sync::Notify;

struct Args {
    socket: String,
    count: u64,
    window: usize,
    max_in_flight: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args { socket: sidebus_client::default_socket().display().to_string(), count: 10_000, window: 1000, max_in_flight: 1024 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.trim_start_matches('-') {
            "socket" => a.socket = value()?,
            "count" => a.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "in-flight" => a.window = value()?.parse().map_err(|e| format!("--in-flight: {e}"))?,
            "max-in-flight" => a.max_in_flight = value()?.parse().map_err(|e| format!("--max-in-flight: {e}"))?,
            _ => {
                return Err(format!("unknown flag {flag}; usage: bench --socket PATH --count N [--in-flight 1000] [--max-in-flight 1024]"));
            }
        }
    }
    if a.count == 0 || a.window == 0 {
        return Err("--count and --in-flight must be positive".into());
    }
    Ok(a)
}

#[derive(serde::Serialize)]
struct Data<'a> {
    n: u64,
    pad: &'a str,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let consumer = Client::connect_as(&a.socket, "bench-consumer").await?;
    let publisher = Client::connect_as(&a.socket, "bench-publisher").await?;
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let event_type = format!("bench.rust.{run}");

    // The group exists before the first publish, so it receives every event.
    let sub = consumer
        .subscribe(&event_type, &format!("bench-{run}"), SubscribeOptions { max_in_flight: Some(a.max_in_flight), ..Default::default() })
        .await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let all = Arc::new(Notify::new());
    let first: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let last: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let n = a.count;
    let consuming = tokio::spawn(sub.consume({
        let (consumed, all, first, last) = (consumed.clone(), all.clone(), first.clone(), last.clone());
        move |_| {
            first.get_or_init(Instant::now);
            if consumed.fetch_add(1, Ordering::Relaxed) + 1 == n {
                last.get_or_init(Instant::now);
                all.notify_one();
            }
            std::future::ready(Ok::<(), String>(()))
        }
    }));

    let pad = "x".repeat(200);
    let started = Instant::now();
    let mut window = VecDeque::with_capacity(a.window);
    for i in 0..n {
        if window.len() == a.window {
            let p: sidebus_client::PendingPublish = window.pop_front().ok_or("empty window")?;
            p.wait().await?;
        }
        let mut p = Publish::new(event_type.as_str(), encode(&Data { n: i, pad: &pad })?);
        p.durability = Durability::Local;
        window.push_back(publisher.publish_start(p).await?);
    }
    for p in window {
        p.wait().await?;
    }
    let published = started.elapsed();

    if tokio::time::timeout(Duration::from_secs(300), all.notified()).await.is_err() {
        return Err(format!("consumed {} of {n} in 5 minutes", consumed.load(Ordering::Relaxed)).into());
    }
    // The consume rate runs from the first delivery to the start of the last handler.
    let (first, last) = (*first.get().ok_or("no delivery")?, *last.get().ok_or("not all consumed")?);
    let consume_per_s = n as f64 / last.duration_since(first).as_secs_f64();
    consumer.close().await?;
    publisher.close().await?;
    consuming.await?;
    println!(
        "{}",
        serde_json::json!({"client": "rust", "count": n, "publish_per_s": n as f64 / published.as_secs_f64(), "consume_per_s": consume_per_s})
    );
    Ok(())
}
