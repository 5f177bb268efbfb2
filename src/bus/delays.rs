//! Delayed delivery: an event published with `deliver_at` or `delay_ms` is stored in the log at
//! once and kept in its type's delay zset in Redis (see `lua/publish.lua`); every daemon moves
//! what is due into the streams every [`TICK`] (`lua/move_due.lua`, atomic, so two daemons never
//! move one twice). Being in Redis, a delayed event survives daemon restarts; being in the log,
//! it can be replayed.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::Backends;

/// How often due events are moved: the precision of delayed delivery.
pub const TICK: Duration = Duration::from_millis(100);
/// Most events moved per type per round trip.
const MOVE: usize = 1000;

/// Moves due events until `stop`.
pub async fn run(backends: Arc<Backends>, stop: CancellationToken) {
    let streams = tokio::select! {
        s = backends.streams.get() => s,
        _ = stop.cancelled() => return,
    };
    let mut failing = false;
    loop {
        match streams.move_due(MOVE).await {
            // A full batch: more may be due at once.
            Ok((moved, _)) if moved >= MOVE as u64 => continue,
            Ok(_) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "moving due delayed events failed; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.cancelled() => return,
        }
    }
}
