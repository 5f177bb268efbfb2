//! `sidebus stats` (one snapshot) and `sidebus top` (a live view refreshed every second; plain
//! lines when stdout is not a terminal), as text at the terminal's width or as JSON.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use sidebus_client::Stats;

use super::view::{self, DEFAULT_WIDTH};
use super::{ConnArgs, Output, exit_for, report};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
The daemon's node and uptime; each backend (Redis, Postgres): up or DOWN, since when, its address
and its last error; counters since the daemon started; its spool; and per type and group:
  LAG        entries not yet read by the group
  PENDING    delivered and not acked
  SCHEDULED  waiting in the retry schedule (a failed attempt's backoff, or handed back: due now)
  OLDEST     how long the oldest pending delivery has waited
  DEAD       dead letters (not redriven or purged)
  CONSUMERS  subscriptions on this daemon
The text fits the terminal's width (80 columns when stdout is not a terminal, or --width).

Examples:
  sidebus stats
  sidebus stats --json | jq '.groups[] | select(.dead_letters > 0)'")]
pub struct Args {
    /// Lay the text out in this many columns (default: the terminal's width, else 80).
    #[arg(long)]
    pub width: Option<usize>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: Output,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Refreshes every second with rates per second; on a terminal the screen is redrawn at its width,
otherwise each refresh prints plain lines, 80 columns wide unless --width. --json prints one
JSON object per refresh: the `stats --json` object with `rates` (per second, from the second
refresh on). The columns are those of `sidebus stats` (see its --help). Ctrl-C to leave.

Examples:
  sidebus top
  sidebus top --count 5 > snapshot.txt
  sidebus top --json --interval 10 | jq -c '{published: .counters.published, rate: .rates.published}'")]
pub struct TopArgs {
    /// Stop after this many refreshes.
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Lay the text out in this many columns (default: the terminal's width, else 80).
    #[arg(long)]
    pub width: Option<usize>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: Output,
}

/// The width to render at: `--width`, else the terminal's, else [`DEFAULT_WIDTH`].
pub fn width(flag: Option<usize>) -> usize {
    flag.or_else(|| std::io::stdout().is_terminal().then(terminal_width).flatten()).unwrap_or(DEFAULT_WIDTH)
}

/// The terminal's columns: `$COLUMNS`, else what `stty size` says of the controlling terminal.
fn terminal_width() -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).filter(|c: &usize| *c > 0) {
        return Some(c);
    }
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = Command::new("stty").arg("size").stdin(tty).stderr(Stdio::null()).output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1)?.parse().ok().filter(|c: &usize| *c > 0)
}

pub fn json(s: &Stats) -> serde_json::Value {
    let counters: serde_json::Map<String, serde_json::Value> = s.counters.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
    let groups: Vec<serde_json::Value> = s
        .groups
        .iter()
        .map(|g| {
            serde_json::json!({"type": g.event_type, "group": g.group, "lag": g.lag, "pending": g.pending, "scheduled": g.scheduled,
                "oldest_pending_ms": g.oldest_pending_ms, "dead_letters": g.dead_letters, "consumers": g.consumers})
        })
        .collect();
    let backends: Vec<serde_json::Value> = s
        .backends
        .iter()
        .map(|b| serde_json::json!({"name": b.name, "address": b.address, "up": b.up, "since": b.since, "error": b.error}))
        .collect();
    serde_json::json!({"node": s.node, "uptime_s": s.uptime_s, "backends": backends, "counters": counters,
        "spool": {"events": s.spool_events, "bytes": s.spool_bytes, "oldest_age_ms": s.spool_oldest_age_ms},
        "groups": groups, "truncated": s.truncated})
}

pub async fn run(args: Args) -> ExitCode {
    let c = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.stats().await {
        Ok(s) => {
            if args.out.json {
                println!("{}", json(&s));
            } else {
                print!("{}", view::stats(&s, None, width(args.width), Utc::now()));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(&e);
            exit_for(&e)
        }
    }
}

pub async fn top(args: TopArgs) -> ExitCode {
    let c = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let terminal = std::io::stdout().is_terminal() && !args.out.json;
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let mut last: Option<(Instant, Stats)> = None;
    let mut n = 0u64;
    loop {
        let s = match c.stats().await {
            Ok(s) => s,
            Err(e) => {
                report(&e);
                return exit_for(&e);
            }
        };
        let now = Instant::now();
        let rates = last.as_ref().map(|(t, prev)| {
            let secs = now.duration_since(*t).as_secs_f64().max(0.001);
            s.counters.iter().map(|(k, v)| (k.clone(), v.saturating_sub(prev.counter(k)) as f64 / secs)).collect::<HashMap<_, _>>()
        });
        if args.out.json {
            let mut v = json(&s);
            if let (Some(r), Some(m)) = (&rates, v.as_object_mut()) {
                let r: serde_json::Map<String, serde_json::Value> =
                    s.counters.iter().map(|(k, _)| (k.clone(), r.get(k).copied().unwrap_or(0.0).into())).collect();
                m.insert("rates".into(), r.into());
            }
            println!("{v}");
        } else {
            let view = view::stats(&s, rates.as_ref(), width(args.width), Utc::now());
            if terminal {
                // Clear the screen and go home, then draw.
                print!("\x1b[2J\x1b[H{view}");
            } else {
                println!("{view}");
            }
        }
        last = Some((now, s));
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(interval).await;
    }
}
