//! `sidebus dlq list|show|redrive|purge`: a group's dead letters.

use std::process::ExitCode;

use clap::Subcommand;
use sidebus_client::{Client, DeadLetterEntry, DlqAction, DlqList, Error};

use super::{ConnArgs, EXIT_DATAERR, Output, exit_for, msgpack_json, report};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// Which group.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The event type.
    pub event_type: String,
    /// The consumer group.
    #[arg(long)]
    pub group: String,
    #[command(flatten)]
    pub out: Output,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List a group's dead letters, oldest first.
    #[command(
        after_help = "Columns: record number (for --after), event id, failed attempts, when, last error.\n\nExamples:\n  sidebus dlq list order.created --group billing\n  sidebus dlq list order.created --group billing --limit 500 --json | jq '.entries[].event.id'"
    )]
    List {
        #[command(flatten)]
        target: Target,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// After this record number (the `next` of a previous page).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Show dead letters in full: the event, its error and every failed attempt.
    #[command(
        after_help = "Prints each dead letter as text (--json: one JSON object per line). An id that is not a dead letter of the group (never, or already redriven or purged) is named on stderr, and the exit code is 1.\n\nExample:\n  sidebus dlq show order.created --group billing 01936f3e-8a6b-7c9d-a1b2-c3d4e5f60718"
    )]
    Show {
        #[command(flatten)]
        target: Target,
        /// Event ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Put dead letters back in front of the group's consumers, with a fresh attempt count.
    #[command(
        after_help = "Without --id, every dead letter of the group. Prints how many went back.\nExit codes: 0 done, 1 refused (an id that is not a dead letter: nothing changed), 69 daemon unreachable.\n\nExamples:\n  sidebus dlq redrive order.created --group billing\n  sidebus dlq redrive order.created --group billing --id o-17 --id o-18\n  sidebus dlq redrive order.created --group billing --rate 100"
    )]
    Redrive {
        #[command(flatten)]
        target: Target,
        /// Only this event id (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<u64>,
    },
    /// Discard dead letters (their record is kept, marked purged).
    #[command(
        after_help = "Name the events with --id, or purge every dead letter of the group with --all.\n\nExamples:\n  sidebus dlq purge order.created --group billing --id o-17\n  sidebus dlq purge order.created --group billing --all"
    )]
    Purge {
        #[command(flatten)]
        target: Target,
        /// Only this event id (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Every dead letter of the group.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

fn entry_json(e: &DeadLetterEntry) -> serde_json::Value {
    let event = msgpack_json(&e.event);
    let history: Vec<serde_json::Value> =
        e.history.iter().map(|a| serde_json::json!({"attempt": a.attempt, "error": a.error, "at": a.at})).collect();
    serde_json::json!({"id": e.id, "event": event, "error": e.error, "attempts": e.attempts, "failed_at": e.failed_at, "history": history})
}

fn fail(e: &Error) -> ExitCode {
    report(e);
    exit_for(e)
}

pub async fn run(args: Args) -> ExitCode {
    match args.command {
        DlqCommand::List { target, limit, after } => list(target, limit, after).await,
        DlqCommand::Show { target, ids } => show(target, ids).await,
        DlqCommand::Redrive { target, ids, rate } => {
            let a = DlqAction { event_type: target.event_type.clone(), group: target.group.clone(), ids, rate };
            count(&target, "redriven", |c| async move { c.dlq_redrive(a).await }).await
        }
        DlqCommand::Purge { target, ids, all } => {
            if ids.is_empty() && !all {
                eprintln!("sidebus: name the dead letters with --id, or purge them all with --all");
                return ExitCode::from(EXIT_DATAERR);
            }
            let a = DlqAction { event_type: target.event_type.clone(), group: target.group.clone(), ids, rate: None };
            count(&target, "purged", |c| async move { c.dlq_purge(a).await }).await
        }
    }
}

async fn list(target: Target, limit: u64, after: Option<u64>) -> ExitCode {
    let c = match target.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let l = DlqList { event_type: target.event_type.clone(), group: target.group.clone(), limit: Some(limit), after, ids: vec![] };
    let page = match c.dlq_list(l).await {
        Ok(page) => page,
        Err(e) => return fail(&e),
    };
    if target.out.json {
        let entries: Vec<serde_json::Value> = page.entries.iter().map(entry_json).collect();
        println!("{}", serde_json::json!({"entries": entries, "next": page.next}));
    } else {
        println!("{:>8}  {:<40}  {:>8}  {:<24}  ERROR", "#", "EVENT", "ATTEMPTS", "FAILED AT");
        for e in &page.entries {
            let id = entry_json(e)["event"]["id"].as_str().unwrap_or("?").to_owned();
            let error: String = e.error.chars().take(60).collect();
            println!("{:>8}  {:<40}  {:>8}  {:<24}  {error}", e.id, id, e.attempts, e.failed_at);
        }
        if let Some(n) = page.next {
            eprintln!("more: --after {n}");
        }
    }
    ExitCode::SUCCESS
}

async fn show(target: Target, ids: Vec<String>) -> ExitCode {
    let c = match target.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let l =
        DlqList { event_type: target.event_type.clone(), group: target.group.clone(), limit: Some(1000), after: None, ids: ids.clone() };
    let page = match c.dlq_list(l).await {
        Ok(page) => page,
        Err(e) => return fail(&e),
    };
    let mut found = Vec::new();
    for (i, e) in page.entries.iter().enumerate() {
        let v = entry_json(e);
        found.push(v["event"]["id"].as_str().unwrap_or_default().to_owned());
        if target.out.json {
            println!("{v}");
        } else {
            if i > 0 {
                println!();
            }
            print!("{}", entry_text(&v));
        }
    }
    let mut missing: Vec<&str> = Vec::new();
    for id in &ids {
        if !found.contains(id) && !missing.contains(&id.as_str()) {
            missing.push(id);
        }
    }
    if !missing.is_empty() {
        eprintln!(
            "sidebus: not dead letters of {}/{} (never, or already redriven or purged): {}",
            target.event_type,
            target.group,
            missing.join(", ")
        );
        return ExitCode::from(super::EXIT_REFUSED);
    }
    ExitCode::SUCCESS
}

/// A dead letter for people: the event, why and when it failed, every attempt, its data.
fn entry_text(v: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let event = &v["event"];
    let mut out = format!("event {}  (record {})\n", text(&event["id"]), v["id"]);
    out.push_str(&format!("  type {}, source {}, published {}\n", text(&event["type"]), text(&event["source"]), text(&event["time"])));
    let plural = if v["attempts"] == 1 { "" } else { "s" };
    out.push_str(&format!(
        "  dead since {} after {} failed attempt{plural}: {}\n",
        text(&v["failed_at"]),
        v["attempts"],
        text(&v["error"])
    ));
    for a in v["history"].as_array().into_iter().flatten() {
        out.push_str(&format!("  attempt {} at {}: {}\n", a["attempt"], text(&a["at"]), text(&a["error"])));
    }
    out.push_str(&format!("  data: {}\n", event["data"]));
    out
}

/// Runs a request answered with a count (`redrive`, `purge`) and prints it.
async fn count<F>(target: &Target, done: &str, call: impl FnOnce(Client) -> F) -> ExitCode
where
    F: Future<Output = Result<u64, Error>>,
{
    let c = match target.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match call(c).await {
        Ok(n) if target.out.json => println!("{}", serde_json::json!({ "count": n })),
        Ok(n) => println!("{done} {n}"),
        Err(e) => return fail(&e),
    }
    ExitCode::SUCCESS
}
