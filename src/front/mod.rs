//! The front layer: the daemon a service talks to. The server (build, spawn, drain), one task per
//! connection (its `session`: subscriptions and leases), one module per request kind (`ops`),
//! the HTTP listener, the `stats` reply, telemetry, and `error.rs`, the only place where
//! failures become wire error codes. [`Shared`] is what every connection shares.

pub(crate) mod access;
pub mod connection;
pub mod error;
pub mod http;
mod ops;
pub mod server;
pub(crate) mod session;
pub mod shutdown;
pub mod stats;
pub mod telemetry;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::backend::Backends;
use crate::backend::ready::Ready;
use crate::bus::deliver::Engine;
use crate::bus::publish::Publisher;
use crate::bus::schema::Registry;
use crate::config::Config;

/// What every connection shares.
pub struct Shared {
    /// The daemon's configuration.
    pub config: Config,
    /// The publish queue.
    pub publisher: Publisher,
    /// The backends, once they answer.
    pub backends: Arc<Backends>,
    /// The schema registry.
    pub schemas: Arc<Registry>,
    /// Delivery, once both backends answer.
    pub engine: Arc<Ready<Engine>>,
    /// Cancelled when shutdown starts: no new publishes or subscriptions, no new deliveries.
    pub draining: CancellationToken,
    /// Cancelled when the grace period is over: release everything and close.
    pub closing: CancellationToken,
}
