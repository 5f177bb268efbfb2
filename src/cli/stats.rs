//! `sidebus stats` (one snapshot) and `sidebus top` (a live view refreshed every second; plain
//! lines when stdout is not a terminal).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sidebus_client::Stats;

use super::{ConnArgs, Output, exit_for, report};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Counters since the daemon started, its spool, and per type and group: lag (not yet read), pending (delivered, not acked), the oldest pending delivery's wait, dead letters, consumers on this daemon.\n\nExamples:\n  sidebus stats\n  sidebus stats --json | jq '.groups[] | select(.dead_letters > 0)'"
)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: Output,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Refreshes every second with rates per second; on a terminal the screen is redrawn, otherwise each refresh prints plain lines. Ctrl-C to leave.\n\nExamples:\n  sidebus top\n  sidebus top --count 5 > snapshot.txt"
)]
pub struct TopArgs {
    /// Stop after this many refreshes.
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    #[command(flatten)]
    pub conn: ConnArgs,
}

fn json(s: &Stats) -> serde_json::Value {
    let counters: serde_json::Map<String, serde_json::Value> = s.counters.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
    let groups: Vec<serde_json::Value> = s
        .groups
        .iter()
        .map(|g| {
            serde_json::json!({"type": g.event_type, "group": g.group, "lag": g.lag, "pending": g.pending,
                "oldest_pending_ms": g.oldest_pending_ms, "dead_letters": g.dead_letters, "consumers": g.consumers})
        })
        .collect();
    serde_json::json!({"node": s.node, "uptime_s": s.uptime_s, "counters": counters,
        "spool": {"events": s.spool_events, "bytes": s.spool_bytes, "oldest_age_ms": s.spool_oldest_age_ms},
        "groups": groups, "truncated": s.truncated})
}

/// The text view: counters (with rates when `rates` is given), spool, groups.
fn render(s: &Stats, rates: Option<&HashMap<String, f64>>) -> String {
    let mut out = format!("sidebus on {}, up {}s\n", s.node, s.uptime_s);
    let mut line = String::new();
    for (k, v) in &s.counters {
        let rate = rates.and_then(|r| r.get(k)).map(|r| format!(" ({r:.0}/s)")).unwrap_or_default();
        line.push_str(&format!("{k} {v}{rate}  "));
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out.push_str(&format!("spool: {} events, {} bytes, oldest {} ms\n", s.spool_events, s.spool_bytes, s.spool_oldest_age_ms));
    let width = s.groups.iter().map(|g| g.event_type.len() + g.group.len() + 1).max().unwrap_or(10).max(10);
    out.push_str(&format!(
        "{:<width$}  {:>10}  {:>10}  {:>14}  {:>12}  {:>9}\n",
        "TYPE/GROUP", "LAG", "PENDING", "OLDEST PENDING", "DEAD LETTERS", "CONSUMERS"
    ));
    for g in &s.groups {
        out.push_str(&format!(
            "{:<width$}  {:>10}  {:>10}  {:>12}ms  {:>12}  {:>9}\n",
            format!("{}/{}", g.event_type, g.group),
            g.lag,
            g.pending,
            g.oldest_pending_ms,
            g.dead_letters,
            g.consumers
        ));
    }
    if s.truncated {
        out.push_str("(more groups than shown)\n");
    }
    out
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
                print!("{}", render(&s, None));
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
    let terminal = std::io::stdout().is_terminal();
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
        let view = render(&s, rates.as_ref());
        if terminal {
            // Clear the screen and go home, then draw.
            print!("\x1b[2J\x1b[H{view}");
        } else {
            println!("{view}");
        }
        last = Some((now, s));
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(interval).await;
    }
}
