//! The front layer: the daemon a service talks to. The server (build, spawn, drain), one task per
//! connection, one module per request kind, the HTTP listener, the `stats` reply, telemetry, and
//! `error.rs`, the only place where failures become wire error codes.

pub mod connection;
pub mod error;
pub mod http;
mod ops;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
