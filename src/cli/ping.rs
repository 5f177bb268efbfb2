//! `sidebus ping` (also `sidebus health`): does the daemon answer, and are its Redis and Postgres
//! up? For people and for scripts and probes (the exit code says it).

use std::process::ExitCode;
use std::time::Instant;

use chrono::Utc;

use super::stats::width;
use super::{ConnArgs, EXIT_REFUSED, Output, exit_for, report, view};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Prints the daemon's node, its uptime and how fast it answered, then each backend: up or DOWN,
since when, its address (without password) and, while down, its last error. The daemon finds
out once a second. While a backend is down, publishes are still taken into the daemon's spool.

Exit codes: 0 the daemon answers and every backend is up, 1 the daemon answers but a backend is
down (or it refused: shutting down, or the access list does not give this user `stats`), 69 the
daemon cannot be reached.

--socket-only asks only whether the daemon's socket accepts and answers: exit 0 or 69. It is the
check for a startup or liveness probe (Kubernetes, Docker's HEALTHCHECK): publishes are taken
into the spool while the backends are away, so their state should not restart the daemon. It
needs no access-list entry.

Examples:
  sidebus ping
  sidebus health --json | jq '.backends[] | select(.up | not)'
  sidebus health --socket-only
  until sidebus ping >/dev/null 2>&1; do sleep 1; done")]
pub struct Args {
    /// Only check that the socket accepts and the daemon answers (not its backends).
    #[arg(long)]
    pub socket_only: bool,
    /// Lay the text out in this many columns (default: the terminal's width, else 80).
    #[arg(long)]
    pub width: Option<usize>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: Output,
}

pub async fn run(args: Args) -> ExitCode {
    let c = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let start = Instant::now();
    let answered = c.ping().await;
    let rtt = start.elapsed();
    if args.socket_only {
        return match answered {
            Ok(()) if args.out.json => {
                println!("{}", serde_json::json!({"up": true, "rtt_ms": rtt.as_secs_f64() * 1000.0}));
                ExitCode::SUCCESS
            }
            Ok(()) => {
                println!("the daemon answers at {} ({:.1} ms)", args.conn.path().display(), rtt.as_secs_f64() * 1000.0);
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::from(super::EXIT_UNAVAILABLE)
            }
        };
    }
    let stats = match answered {
        Ok(()) => c.stats().await,
        Err(e) => Err(e),
    };
    let s = match stats {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return exit_for(&e);
        }
    };
    let up = s.backends.iter().all(|b| b.up);
    if args.out.json {
        let backends: Vec<serde_json::Value> = s
            .backends
            .iter()
            .map(|b| serde_json::json!({"name": b.name, "address": b.address, "up": b.up, "since": b.since, "error": b.error}))
            .collect();
        let v = serde_json::json!({"node": s.node, "uptime_s": s.uptime_s, "rtt_ms": rtt.as_secs_f64() * 1000.0,
            "up": up, "backends": backends});
        println!("{v}");
    } else {
        print!("{}", view::ping(&s, rtt, width(args.width), Utc::now()));
    }
    if up { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REFUSED) }
}
