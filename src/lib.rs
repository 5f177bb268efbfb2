//! sidebus: a per-host sidecar event bus. See ARCHITECTURE.md for the map of this crate.
//!
//! Three layers, each calling only those below it (the `tidy` test keeps it so):
//! - [`backend`]: the only code that speaks SQL, Redis or the spool's files;
//! - [`bus`]: the features (publish, delivery, dead letters, replay, recovery, checkpoints,
//!   delayed delivery, schemas, maintenance), each with its own error type;
//! - [`front`]: the daemon (server, connections, ops, HTTP, stats, the one mapping of errors to
//!   wire codes).
//!
//! [`config`] and [`lock`] are leaves every layer uses.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bus;
pub mod config;
pub mod front;
pub mod lock;
