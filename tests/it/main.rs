//! Integration tests of the daemon against real Redis and PostgreSQL servers that the harness
//! starts itself (see `harness/servers.rs`). Each test has its own database, Redis namespace,
//! socket and data dir, so they run in parallel.

mod access;
mod bad_input;
mod checkpoints;
mod cli;
mod cli_status;
mod cli_tail;
mod delivery;
mod event_log;
mod failover;
mod groups;
mod harness;
mod lifecycle;
mod monitoring;
mod operations;
mod outage;
mod redis_loss;
mod retries;
mod schemas;
mod simple_client;
mod tls;
mod trim;
