//! Replay against live delivery, one consumer: the rate at which a group's consumer receives a
//! backlog of `n` events from the live stream, then the rate at which it receives the same
//! events replayed from the Postgres log.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sidebus_client::{Client, Durability, SubscribeOptions};

use crate::sidebus::publish_count;
use crate::stats;

const TYPE: &str = "bench.replayed";
const GROUP: &str = "reader";

fn opts() -> SubscribeOptions {
    SubscribeOptions { max_in_flight: Some(1024), ..Default::default() }
}

/// Receives and acks `n` deliveries as one consumer of the group; how long from the subscribe.
async fn consume(c: &Client, n: u64, replayed: bool) -> Result<Duration> {
    let start = Instant::now();
    let mut sub = c.subscribe(TYPE, GROUP, opts()).await?;
    for _ in 0..n {
        let Some(d) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await? else { bail!("the subscription ended") };
        if d.event.replayed != replayed {
            bail!("expected replayed = {replayed}");
        }
        d.ack_nowait().await?;
    }
    let took = start.elapsed();
    sub.unsubscribe().await?;
    Ok(took)
}

pub async fn replay_vs_live(socket: &Path, n: u64) -> Result<Vec<stats::Result>> {
    let c = Client::connect_as(socket, "bench-replay").await?;
    // The group exists, so the backlog waits in the stream for it.
    c.subscribe(TYPE, GROUP, opts()).await?.unsubscribe().await?;
    let since = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let (published, _) = publish_count(socket, TYPE, 4, n, Durability::Committed).await?;
    let live = consume(&c, published, false).await?;
    let started = c.replay(TYPE, GROUP, &since, None).await?;
    if started.count != published {
        bail!("the replay covers {} events, not {published}", started.count);
    }
    let replay = consume(&c, started.count, true).await?;
    let live_rate = published as f64 / live.as_secs_f64();
    let replay_rate = started.count as f64 / replay.as_secs_f64();
    Ok(vec![
        stats::Result::rate(
            "replay.live_backlog",
            "one consumer receiving a backlog from the live stream (max_in_flight 1024)",
            published,
            live,
        ),
        stats::Result::rate(
            "replay.from_log",
            "one consumer receiving the same events replayed from the Postgres log",
            started.count,
            replay,
        )
        .with("over_live", (replay_rate / live_rate * 100.0).round() / 100.0),
    ])
}
