//! `sidebus publish`: publish one event from `--data`, or one per line of stdin.

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::ExitCode;

use bytes::Bytes;
use sidebus_client::{Client, Durability, PendingPublish, Publish, Published};

use super::{ConnArgs, EXIT_DATAERR, exit_for, report};

/// Publishes awaiting their reply at once when reading stdin.
const PIPELINE: usize = 256;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Prints one line per event: its id and status (committed or spooled).\n\nExamples:\n  sidebus publish order.created --data '{\"orderId\":\"o-1\",\"amount\":10,\"currency\":\"EUR\"}'\n  sidebus publish order.created --id order-1 --committed --data '{\"orderId\":\"o-1\"}'\n  cat orders.jsonl | sidebus publish order.created\n  sidebus publish reminder.due --delay-ms 3600000 --data '{\"user\":\"u-1\"}'"
)]
pub struct Args {
    /// The event type, e.g. order.created.
    pub event_type: String,
    /// The event's data as JSON. Without it, each line of stdin is one event's data.
    #[arg(long)]
    pub data: Option<String>,
    /// The event id (idempotency key: a repeated id is stored once). Only with --data.
    #[arg(long, requires = "data")]
    pub id: Option<String>,
    /// The event's source (default: sidebus-cli).
    #[arg(long)]
    pub source: Option<String>,
    /// The correlation id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// The partition key.
    #[arg(long)]
    pub partition_key: Option<String>,
    /// Answer only once the event is in Postgres and Redis.
    #[arg(long)]
    pub committed: bool,
    /// Validate against this schema version (default: the latest).
    #[arg(long)]
    pub schema_version: Option<u64>,
    /// Deliver this many milliseconds after the publish.
    #[arg(long, conflicts_with = "deliver_at")]
    pub delay_ms: Option<u64>,
    /// Deliver from this time on (RFC 3339).
    #[arg(long)]
    pub deliver_at: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

impl Args {
    fn publish(&self, data: Bytes, id: Option<String>) -> Publish {
        let mut p = Publish::new(self.event_type.clone(), data);
        p.event_id = id;
        p.source = self.source.clone();
        p.correlationid = self.correlation_id.clone();
        p.partitionkey = self.partition_key.clone();
        p.durability = if self.committed { Durability::Committed } else { Durability::Local };
        p.version = self.schema_version;
        p.delay_ms = self.delay_ms;
        p.deliver_at = self.deliver_at.clone();
        p
    }
}

fn encode_json(text: &str) -> Result<Bytes, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    sidebus_client::encode(&json).map_err(|e| e.to_string())
}

fn print(p: &Published) {
    println!("{} {}{}", p.event_id, p.status.as_str(), if p.duplicate { " duplicate" } else { "" });
}

pub async fn run(args: Args) -> ExitCode {
    if let Some(text) = &args.data {
        let data = match encode_json(text) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("sidebus: --data is not JSON: {e}");
                return ExitCode::from(EXIT_DATAERR);
            }
        };
        let client = match args.conn.connect().await {
            Ok(c) => c,
            Err(code) => return code,
        };
        return match client.publish_with(args.publish(data, args.id.clone())).await {
            Ok(p) => {
                print(&p);
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                exit_for(&e)
            }
        };
    }
    let client = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    from_stdin(&args, &client).await
}

/// Publishes each line of stdin, in order, with up to [`PIPELINE`] awaiting their reply. Stops
/// at the first malformed line or refused publish, after the ones before it are answered.
async fn from_stdin(args: &Args, client: &Client) -> ExitCode {
    let mut inflight: VecDeque<PendingPublish> = VecDeque::new();
    let mut status = ExitCode::SUCCESS;
    let finish = |p: Result<Published, sidebus_client::Error>, status: &mut ExitCode| match p {
        Ok(p) => print(&p),
        Err(e) => {
            report(&e);
            *status = exit_for(&e);
        }
    };
    // Reading stdin blocks; a CLI on its own small runtime can afford it.
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("sidebus: reading stdin: {e}");
                status = ExitCode::from(EXIT_DATAERR);
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let data = match encode_json(&line) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("sidebus: line {} is not JSON: {e}", n + 1);
                status = ExitCode::from(EXIT_DATAERR);
                break;
            }
        };
        match client.publish_start(args.publish(data, None)).await {
            Ok(p) => inflight.push_back(p),
            Err(e) => {
                report(&e);
                status = exit_for(&e);
                break;
            }
        }
        if inflight.len() >= PIPELINE {
            if let Some(p) = inflight.pop_front() {
                finish(p.wait().await, &mut status);
            }
            if status != ExitCode::SUCCESS {
                break;
            }
        }
    }
    for p in inflight {
        finish(p.wait().await, &mut status);
    }
    status
}
