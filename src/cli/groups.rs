//! `sidebus groups list|delete|reset`: the consumer groups of the fleet, deleting one, moving
//! one's read position.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Subcommand;
use sidebus_client::{Error, GroupInfo};

use super::{ConnArgs, EXIT_DATAERR, EXIT_REFUSED, Output, exit_for, report, time};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: GroupsCommand,
}

#[derive(Subcommand, Debug)]
pub enum GroupsCommand {
    /// List every consumer group (of one type) with its state.
    #[command(
        after_help = "Columns: type, group, lag (entries not read yet), pending (delivered, not acked), dead letters,\nconsumers (live subscriptions on every daemon), created, last active.\n\nExamples:\n  sidebus groups list\n  sidebus groups list order.created --json | jq '.groups[] | select(.consumers == 0)'"
    )]
    List {
        /// Only the groups of this type.
        event_type: Option<String>,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a group everywhere: its Redis state, its replays, its record in the log.
    #[command(
        after_help = "Asks for confirmation on a terminal; --yes skips it (required when stdin is not a terminal).\nRefused while the group has live subscriptions, unless --force: then they end (here at once, on\nother daemons at their next read). Its dead letters stay in the log (`sidebus dlq` works on them\nagain if a group of the same name is created).\n\nExamples:\n  sidebus groups delete order.created --group test\n  sidebus groups delete order.created --group test --yes --force"
    )]
    Delete {
        /// The event type.
        event_type: String,
        /// The consumer group.
        #[arg(long)]
        group: String,
        /// Delete even while it has live subscriptions (they end).
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Move a group's read position: to the end, the start of what Redis holds, or a time.
    #[command(
        after_help = "--to end     skip everything not read yet\n--to start   from the oldest entry Redis holds (older events: `sidebus replay`)\n--to TIME    from the first event added at or after TIME (RFC 3339, or an age: 2h, 30m ago)\nDeliveries already made or waiting for a retry are not affected.\n\nExamples:\n  sidebus groups reset order.created --group billing --to end\n  sidebus groups reset order.created --group billing --to 2h"
    )]
    Reset {
        /// The event type.
        event_type: String,
        /// The consumer group.
        #[arg(long)]
        group: String,
        /// `end`, `start`, or a time.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

fn group_json(g: &GroupInfo) -> serde_json::Value {
    serde_json::json!({"type": g.event_type, "group": g.group, "created_at": g.created_at, "lag": g.lag, "pending": g.pending,
        "dead_letters": g.dead_letters, "consumers": g.consumers, "last_active": g.last_active})
}

fn fail(e: &Error) -> ExitCode {
    report(e);
    exit_for(e)
}

pub async fn run(args: Args) -> ExitCode {
    match args.command {
        GroupsCommand::List { event_type, out, conn } => list(event_type, out, conn).await,
        GroupsCommand::Delete { event_type, group, force, yes, out, conn } => delete(event_type, group, force, yes, out, conn).await,
        GroupsCommand::Reset { event_type, group, to, out, conn } => reset(event_type, group, to, out, conn).await,
    }
}

async fn list(event_type: Option<String>, out: Output, conn: ConnArgs) -> ExitCode {
    let c = match conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let list = match c.groups(event_type.as_deref()).await {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    if out.json {
        let groups: Vec<serde_json::Value> = list.groups.iter().map(group_json).collect();
        println!("{}", serde_json::json!({"groups": groups, "truncated": list.truncated}));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<24} {:<24} {:>8} {:>8} {:>6} {:>9}  {:<24}  LAST ACTIVE",
        "TYPE", "GROUP", "LAG", "PENDING", "DEAD", "CONSUMERS", "CREATED"
    );
    for g in &list.groups {
        println!(
            "{:<24} {:<24} {:>8} {:>8} {:>6} {:>9}  {:<24}  {}",
            g.event_type, g.group, g.lag, g.pending, g.dead_letters, g.consumers, g.created_at, g.last_active
        );
    }
    if list.truncated {
        eprintln!("sidebus: more groups exist than are listed; name a type");
    }
    ExitCode::SUCCESS
}

/// Asks on the terminal; false unless the answer is yes.
fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

async fn delete(event_type: String, group: String, force: bool, yes: bool, out: Output, conn: ConnArgs) -> ExitCode {
    if !yes {
        if !std::io::stdin().is_terminal() {
            eprintln!("sidebus: deleting a group needs --yes when stdin is not a terminal");
            return ExitCode::from(EXIT_DATAERR);
        }
        let what = if force { " (ending its live subscriptions)" } else { "" };
        if !confirm(&format!("Delete group {group} of {event_type} everywhere{what}?")) {
            eprintln!("sidebus: not deleted");
            return ExitCode::from(EXIT_REFUSED);
        }
    }
    let c = match conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.group_delete(&event_type, &group, force).await {
        Ok(ended) if out.json => println!("{}", serde_json::json!({"deleted": true, "ended": ended})),
        Ok(0) => println!("deleted group {group} of {event_type}"),
        Ok(n) => println!("deleted group {group} of {event_type}; ended {n} subscription(s) on this daemon"),
        Err(e) => return fail(&e),
    }
    ExitCode::SUCCESS
}

async fn reset(event_type: String, group: String, to: String, out: Output, conn: ConnArgs) -> ExitCode {
    let to = match to.as_str() {
        "end" | "start" => to,
        t => match time::arg("to", time::past(t, chrono::Utc::now())) {
            Ok(at) => time::format(at),
            Err(code) => return code,
        },
    };
    let c = match conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.group_reset(&event_type, &group, &to).await {
        Ok(entry) if out.json => println!("{}", serde_json::json!({"entry": entry, "to": to})),
        Ok(entry) => println!("group {group} of {event_type} now reads after entry {entry}"),
        Err(e) => return fail(&e),
    }
    ExitCode::SUCCESS
}
