//! `sidebus tail`: print a group's deliveries as JSON lines, acking each (or, with `--no-ack`,
//! holding them to peek and handing them back on exit).

use std::process::ExitCode;
use std::time::Duration;

use sidebus_client::{Delivery, SubscribeOptions};

use super::{ConnArgs, exit_for, msgpack_json, report};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each line is one delivery: the event's attributes, `attempt`, and `data` as JSON\n(binary as {\"$hex\": …}).\n\nExamples:\n  sidebus tail order.created --group analytics\n  sidebus tail order.created --group inventory --no-ack --count 10"
)]
pub struct Args {
    /// The event type.
    pub event_type: String,
    /// The consumer group to read as (created if new: it receives events published from now on).
    #[arg(long)]
    pub group: String,
    /// Only peek: hold the deliveries without acking and hand them back to the group on exit
    /// (at most --max-in-flight of them).
    #[arg(long)]
    pub no_ack: bool,
    /// Stop after this many deliveries.
    #[arg(long)]
    pub count: Option<u64>,
    /// Deliveries held at once.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Lease of a peeked delivery; extended while tail holds it.
const PEEK_LEASE: Duration = Duration::from_secs(30);

fn line(d: &Delivery) -> serde_json::Value {
    let e = &d.event;
    let mut v = serde_json::json!({
        "id": e.id, "type": e.event_type, "source": e.source, "time": e.time,
        "correlationid": e.correlationid, "attempt": d.attempt,
    });
    if let Some(m) = v.as_object_mut() {
        if let Some(s) = e.schemaversion {
            m.insert("schemaversion".into(), s.into());
        }
        if let Some(p) = &e.partitionkey {
            m.insert("partitionkey".into(), p.clone().into());
        }
        if let Some(t) = &e.traceparent {
            m.insert("traceparent".into(), t.clone().into());
        }
        if e.replayed {
            m.insert("replayed".into(), true.into());
        }
        let data = msgpack_json(&e.data);
        m.insert("data".into(), data);
    }
    v
}

pub async fn run(args: Args) -> ExitCode {
    let client = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let opts = SubscribeOptions {
        max_in_flight: Some(args.max_in_flight),
        max_attempts: None,
        ack_timeout_ms: args.no_ack.then_some(PEEK_LEASE.as_millis() as u64),
    };
    let mut sub = match client.subscribe(&args.event_type, &args.group, opts).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return exit_for(&e);
        }
    };
    let mut held: Vec<Delivery> = Vec::new();
    let mut seen = 0u64;
    let mut extend = tokio::time::interval(PEEK_LEASE / 3);
    let mut status = ExitCode::SUCCESS;
    while args.count.is_none_or(|c| seen < c) {
        tokio::select! {
            d = sub.next() => {
                let Some(d) = d else {
                    eprintln!("sidebus: the daemon closed the connection");
                    status = ExitCode::from(super::EXIT_UNAVAILABLE);
                    break;
                };
                println!("{}", line(&d));
                seen += 1;
                if args.no_ack {
                    held.push(d);
                    if held.len() as u64 == args.max_in_flight {
                        eprintln!("sidebus: holding {} deliveries (--max-in-flight); no more arrive until they are handed back", held.len());
                    }
                } else if let Err(e) = d.ack().await {
                    report(&e);
                    status = exit_for(&e);
                    break;
                }
            }
            _ = extend.tick(), if !held.is_empty() => {
                for d in &held {
                    let _ = d.extend().await;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Peeked deliveries go back to the group without counting an attempt.
    if let Err(e) = sub.unsubscribe().await {
        report(&e);
    }
    status
}
