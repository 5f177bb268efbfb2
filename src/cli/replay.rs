//! `sidebus replay` and `sidebus replays`: replay a type's events from the log to one group, and
//! watch or cancel replays.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;

use super::{ConnArgs, Output, exit_for, report, time};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "--since and --until take an RFC 3339 time (2026-11-27T09:30:00Z) or an age: 500ms, 90s, 30m, 2h, 1d, 1h30m (`2h ago` and `-2h` too); `publish --deliver-at` takes the same times, ahead.\nThe events go to the group only, marked replayed: true, beside its live traffic. On a terminal a progress bar follows the replay until it is done (Ctrl-C stops watching, not the replay); --no-wait returns at once.\nExit codes: 0 started (or done), 1 refused (unknown group, bad range), 65 bad time, 69 daemon unreachable.\n\nExamples:\n  sidebus replay order.created --group billing --since 2h\n  sidebus replay order.created --group billing --since 2026-11-27T08:00:00Z --until 2026-11-27T09:00:00Z --json"
)]
pub struct Args {
    /// The event type.
    pub event_type: String,
    /// The consumer group to replay to.
    #[arg(long)]
    pub group: String,
    /// Start of the range: RFC 3339, or an age like 2h.
    #[arg(long)]
    pub since: String,
    /// End of the range (exclusive; default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// Return once the replay is started.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub out: Output,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  sidebus replays\n  sidebus replays --all --json\n  sidebus replays --cancel 3f1c2a9e-5b7d-4c1e-9a0b-2d4e6f8a1b3c"
)]
pub struct ListArgs {
    /// Also replays that ended in the last day.
    #[arg(long)]
    pub all: bool,
    /// Cancel this replay instead of listing.
    #[arg(long, value_name = "REPLAY")]
    pub cancel: Option<String>,
    #[command(flatten)]
    pub out: Output,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn run(args: Args) -> ExitCode {
    let now = Utc::now();
    let since = match time::arg("since", time::past(&args.since, now)) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let until = match args.until.as_deref().map(|u| time::arg("until", time::past(u, now))).transpose() {
        Ok(t) => t,
        Err(code) => return code,
    };
    let c = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let started = match c.replay(&args.event_type, &args.group, &time::format(since), until.map(time::format).as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return exit_for(&e);
        }
    };
    if args.out.json {
        println!("{}", serde_json::json!({"count": started.count, "replay": started.replay}));
    } else {
        println!(
            "replaying {} events of {} to {}{}",
            started.count,
            args.event_type,
            args.group,
            started.replay.as_ref().map(|r| format!(" (replay {r})")).unwrap_or_default()
        );
    }
    let Some(id) = started.replay else { return ExitCode::SUCCESS };
    if args.no_wait || args.out.json || !std::io::stderr().is_terminal() {
        return ExitCode::SUCCESS;
    }
    // A progress bar on stderr until the replay ends.
    loop {
        let list = match c.replays(true).await {
            Ok(l) => l,
            Err(e) => {
                report(&e);
                return exit_for(&e);
            }
        };
        let Some(r) = list.replays.into_iter().find(|r| r.replay == id) else { return ExitCode::SUCCESS };
        let total = r.total.unwrap_or(started.count).max(1);
        let done = r.added.min(total);
        let width = 40;
        let filled = (done * width / total) as usize;
        eprint!("\r[{}{}] {done}/{total} {}   ", "#".repeat(filled), ".".repeat(width as usize - filled), r.status);
        let _ = std::io::stderr().flush();
        if r.status != "running" {
            eprintln!();
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn list(args: ListArgs) -> ExitCode {
    let c = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(id) = args.cancel {
        return match c.replay_cancel(&id).await {
            Ok(()) => {
                println!("cancelled {id}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                exit_for(&e)
            }
        };
    }
    let list = match c.replays(args.all).await {
        Ok(l) => l,
        Err(e) => {
            report(&e);
            return exit_for(&e);
        }
    };
    if args.out.json {
        let items: Vec<serde_json::Value> = list
            .replays
            .iter()
            .map(|r| serde_json::json!({"replay": r.replay, "type": r.event_type, "group": r.group, "status": r.status, "reason": r.reason, "added": r.added, "total": r.total, "created_at": r.created_at}))
            .collect();
        println!("{}", serde_json::json!({ "replays": items }));
        return ExitCode::SUCCESS;
    }
    println!("{:<36}  {:<24}  {:<16}  {:<9}  {:<8}  PROGRESS", "REPLAY", "TYPE", "GROUP", "STATUS", "REASON");
    for r in &list.replays {
        let progress = match r.total {
            Some(t) => format!("{}/{t}", r.added),
            None => r.added.to_string(),
        };
        println!("{:<36}  {:<24}  {:<16}  {:<9}  {:<8}  {progress}", r.replay, r.event_type, r.group, r.status, r.reason);
    }
    ExitCode::SUCCESS
}
