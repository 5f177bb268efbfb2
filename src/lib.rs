//! sidebus: a per-host sidecar event bus. See ARCHITECTURE.md for the map of this crate.
#![forbid(unsafe_code)]

pub mod backends;
pub mod checkpoint;
pub mod config;
pub mod connection;
pub mod delays;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod http;
pub mod log;
mod ops;
pub mod publisher;
pub mod ready;
pub mod recovery;
pub mod replay;
pub mod schema;
pub mod server;
pub mod shutdown;
pub mod spool;
pub mod stats;
pub mod streams;
pub mod telemetry;
