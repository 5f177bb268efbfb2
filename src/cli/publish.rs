//! `sidebus publish`: publish one event from `--data`, or one per line of stdin (every line
//! checked before the first is published, or with `--stream` as the lines arrive). Every event
//! gets its id here (a UUIDv7 unless `--id`), so its line names it whatever the daemon answers.

use std::collections::VecDeque;
use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use bytes::Bytes;
use sidebus_client::{Client, Durability, Error, PendingPublish, Publish, Published};
use tokio::sync::mpsc;

use super::time::{self, Ahead};
use super::{ConnArgs, EXIT_DATAERR, Output, error_code, error_lines, exit_for};

/// Publishes awaiting their reply at once when reading stdin.
const PIPELINE: usize = 256;
/// Bad lines named before the rest are only counted.
const BAD_LINES_NAMED: usize = 10;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Prints one line per event on stdout: its id and status, `spooled` (fsynced in the daemon's spool)
or `committed` (in Postgres and Redis, with --committed), then `duplicate` when it applies; when
a publish fails, its id, `failed` and the error code, with the reason on stderr. Without --id the
CLI gives each event a new UUIDv7, so its id is printed whatever the daemon answers. --json
prints one JSON object per event instead: {\"event_id\", \"status\", \"duplicate\"} (and \"line\"
for stdin; \"error\" and \"message\" when it failed).

Event ids: the first publish of an id wins. A later publish with the same id stores and delivers
nothing, even with other data, and is answered `spooled` like any other: only with --committed
does the answer say `duplicate`. So publishing again with the same id after `unavailable` or a
lost connection is safe.

stdin: every line (one JSON value each; blank lines skipped) is read and checked before the first
is published, so a bad line publishes nothing and the bad lines are named. With --stream each line
is published as it arrives (for endless input); a bad line or a failed publish stops it there, and
the lines published are said exactly.

--deliver-at takes an RFC 3339 time or a duration ahead (10m, +10m, in 10m); --delay a duration:
500ms, 90s, 10m, 2h, 1d, 1h30m. At most 90 days ahead. `replay --since` takes the same times.

Exit codes: 0 published, 1 refused or not confirmed by the daemon (`unavailable`: it may still be
stored), 65 bad input (nothing published), 69 daemon unreachable or connection lost.

Examples:
  sidebus publish order.created --data '{\"orderId\":\"o-1\",\"amount\":10,\"currency\":\"EUR\"}'
  sidebus publish order.created --id order-1 --committed --json --data '{\"orderId\":\"o-1\"}'
  cat orders.jsonl | sidebus publish order.created
  tail -F orders.jsonl | sidebus publish order.created --stream
  sidebus publish reminder.due --delay 1h --data '{\"user\":\"u-1\"}'
  sidebus publish reminder.due --deliver-at 2026-11-27T09:30:00Z --data '{\"user\":\"u-1\"}'")]
pub struct Args {
    /// The event type, e.g. order.created.
    pub event_type: String,
    /// The event's data as JSON. Without it, each line of stdin is one event's data.
    #[arg(long)]
    pub data: Option<String>,
    /// The event id (idempotency key: the first publish of an id wins). Only with --data;
    /// default: a new UUIDv7.
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
    /// Answer only once the event is in Postgres and Redis (and say whether it was a duplicate).
    #[arg(long)]
    pub committed: bool,
    /// Validate against this schema version (default: the latest).
    #[arg(long)]
    pub schema_version: Option<u64>,
    /// Deliver this long after the publish: 500ms, 90s, 10m, 2h, 1d, 1h30m.
    #[arg(long, value_name = "DURATION", conflicts_with_all = ["delay_ms", "deliver_at"])]
    pub delay: Option<String>,
    /// Deliver this many milliseconds after the publish (as --delay).
    #[arg(long, conflicts_with = "deliver_at")]
    pub delay_ms: Option<u64>,
    /// Deliver from this time on: RFC 3339, or a duration ahead (10m, +10m, in 10m).
    #[arg(long, value_name = "TIME")]
    pub deliver_at: Option<String>,
    /// Publish each line of stdin as it arrives instead of checking them all first.
    #[arg(long, conflicts_with = "data")]
    pub stream: bool,
    #[command(flatten)]
    pub out: Output,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// When the events are to be delivered: `deliver_at` or `delay_ms` of the request.
#[derive(Debug, Clone, Default)]
struct Timing {
    deliver_at: Option<String>,
    delay_ms: Option<u64>,
}

impl Args {
    fn timing(&self) -> Result<Timing, ExitCode> {
        if let Some(d) = &self.delay {
            let d = time::arg("delay", time::duration(d))?;
            return Ok(Timing { deliver_at: None, delay_ms: Some(d.as_millis() as u64) });
        }
        if let Some(at) = &self.deliver_at {
            return Ok(match time::arg("deliver-at", time::ahead(at))? {
                Ahead::At(t) => Timing { deliver_at: Some(time::format(t)), delay_ms: None },
                Ahead::After(d) => Timing { deliver_at: None, delay_ms: Some(d.as_millis() as u64) },
            });
        }
        Ok(Timing { deliver_at: None, delay_ms: self.delay_ms })
    }

    fn publish(&self, data: Bytes, id: String, timing: &Timing) -> Publish {
        let mut p = Publish::new(self.event_type.clone(), data);
        p.event_id = Some(id);
        p.source = self.source.clone();
        p.correlationid = self.correlation_id.clone();
        p.partitionkey = self.partition_key.clone();
        p.durability = if self.committed { Durability::Committed } else { Durability::Local };
        p.version = self.schema_version;
        p.delay_ms = timing.delay_ms;
        p.deliver_at = timing.deliver_at.clone();
        p
    }
}

fn encode_json(text: &str) -> Result<Bytes, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    sidebus_client::encode(&json).map_err(|e| e.to_string())
}

/// A new event id: a UUIDv7, as the daemon would choose.
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Prints one event's outcome: its line on stdout and, when it failed, why on stderr (in text)
/// or in the JSON object.
fn print_outcome(out: &Output, line: Option<usize>, id: &str, result: &Result<Published, Error>) {
    if out.json {
        let mut v = match result {
            Ok(p) => serde_json::json!({"event_id": p.event_id, "status": p.status.as_str(), "duplicate": p.duplicate}),
            Err(e) => {
                let message = match e {
                    Error::Server { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                serde_json::json!({"event_id": id, "status": "failed", "duplicate": false, "error": error_code(e), "message": message})
            }
        };
        if let (Some(n), Some(m)) = (line, v.as_object_mut()) {
            m.insert("line".into(), n.into());
        }
        say(&v.to_string());
        return;
    }
    match result {
        Ok(p) => say(&format!("{} {}{}", p.event_id, p.status.as_str(), if p.duplicate { " duplicate" } else { "" })),
        Err(e) => {
            say(&format!("{id} failed {}", error_code(e)));
            let at = line.map(|n| format!("line {n}: ")).unwrap_or_default();
            let mut lines = error_lines(e);
            lines[0] = format!("sidebus: {at}event {id}: {e}");
            for l in lines {
                eprintln!("{l}");
            }
            if let Some(hint) = failure_hint(e, id) {
                eprintln!("  {hint}");
            }
        }
    }
}

/// What a failed publish means for the event, where the error alone does not say it.
fn failure_hint(e: &Error, id: &str) -> Option<String> {
    let again = format!("publish it again with --id {id} to be sure (an id is stored once)");
    match error_code(e) {
        "unavailable" => Some(format!("it may still be stored: {again}")),
        "connection_lost" => Some(format!("it may or may not be stored: {again}")),
        "backpressure" => Some("the daemon's spool is full: nothing was stored; try again later".into()),
        _ => None,
    }
}

pub async fn run(args: Args) -> ExitCode {
    let timing = match args.timing() {
        Ok(t) => t,
        Err(code) => return code,
    };
    let Some(text) = &args.data else { return from_stdin(&args, &timing).await };
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
    let id = args.id.clone().unwrap_or_else(new_id);
    let result = client.publish_with(args.publish(data, id.clone(), &timing)).await;
    print_outcome(&args.out, None, &id, &result);
    match &result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => exit_for(e),
    }
}

async fn from_stdin(args: &Args, timing: &Timing) -> ExitCode {
    if std::io::stdin().is_terminal() {
        eprintln!("sidebus: reading events from stdin, one JSON value per line; Ctrl-D to end (or give --data)");
    }
    if args.stream {
        let client = match args.conn.connect().await {
            Ok(c) => c,
            Err(code) => return code,
        };
        return stream(args, timing, client).await;
    }
    let lines = match read_all() {
        Ok(l) => l,
        Err(code) => return code,
    };
    let client = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut pipe = Pipeline::new(args, timing, client);
    for (n, data) in lines {
        if !pipe.send(n, data).await {
            break;
        }
    }
    pipe.finish(None).await
}

/// Reads and checks every line of stdin: the events (line number, data), or, after naming the
/// bad lines, exit code 65.
fn read_all() -> Result<Vec<(usize, Bytes)>, ExitCode> {
    let mut events = Vec::new();
    let mut bad = 0usize;
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| {
            eprintln!("sidebus: reading stdin at line {}: {e}; nothing was published", i + 1);
            ExitCode::from(EXIT_DATAERR)
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match encode_json(&line) {
            Ok(data) => events.push((i + 1, data)),
            Err(e) => {
                bad += 1;
                if bad <= BAD_LINES_NAMED {
                    eprintln!("sidebus: line {} is not JSON: {e}", i + 1);
                }
            }
        }
    }
    if bad == 0 {
        return Ok(events);
    }
    let more = if bad > BAD_LINES_NAMED { format!(" ({} more bad lines not shown)", bad - BAD_LINES_NAMED) } else { String::new() };
    eprintln!("sidebus: nothing was published{more}: every line is checked first (--stream publishes as lines arrive)");
    Err(ExitCode::from(EXIT_DATAERR))
}

/// One line of stdin read by the reader thread: its number and text, or a read error.
type StdinLine = (usize, std::io::Result<String>);

/// Publishes the lines of stdin as they arrive. Stdin is read on its own thread so that the
/// client's tasks go on sending and answering while a line is awaited.
async fn stream(args: &Args, timing: &Timing, client: Client) -> ExitCode {
    let (tx, mut rx) = mpsc::channel::<StdinLine>(PIPELINE);
    std::thread::spawn(move || {
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            let failed = line.is_err();
            if tx.blocking_send((i + 1, line)).is_err() || failed {
                return;
            }
        }
    });
    let mut pipe = Pipeline::new(args, timing, client);
    while let Some((n, line)) = rx.recv().await {
        let data = match line
            .map_err(|e| format!("cannot be read: {e}"))
            .and_then(|l| if l.trim().is_empty() { Ok(None) } else { encode_json(&l).map(Some).map_err(|e| format!("is not JSON: {e}")) })
        {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("sidebus: line {n} {e}");
                return pipe.finish(Some(n)).await;
            }
        };
        if !pipe.send(n, data).await {
            break;
        }
    }
    pipe.finish(None).await
}

/// Publishes lines in order with up to [`PIPELINE`] awaiting their reply, printing each
/// outcome, and says exactly what was published when it stops early.
struct Pipeline<'a> {
    args: &'a Args,
    timing: &'a Timing,
    client: Client,
    inflight: VecDeque<(usize, String, PendingPublish)>,
    /// The lines published, in the order their replies came.
    published: Vec<usize>,
    /// The first line that failed, and the exit code it gives.
    failed: Option<(usize, ExitCode)>,
    /// The last line sent.
    last_sent: usize,
}

impl<'a> Pipeline<'a> {
    fn new(args: &'a Args, timing: &'a Timing, client: Client) -> Self {
        Pipeline { args, timing, client, inflight: VecDeque::new(), published: Vec::new(), failed: None, last_sent: 0 }
    }

    /// Sends line `n`; false once the pipeline stops (a publish failed).
    async fn send(&mut self, n: usize, data: Bytes) -> bool {
        let id = new_id();
        match self.client.publish_start(self.args.publish(data, id.clone(), self.timing)).await {
            Ok(p) => self.inflight.push_back((n, id, p)),
            Err(e) => {
                self.outcome(n, &id, Err(e));
                return false;
            }
        }
        self.last_sent = n;
        if self.inflight.len() >= PIPELINE
            && let Some((n, id, p)) = self.inflight.pop_front()
        {
            let r = p.wait().await;
            self.outcome(n, &id, r);
        }
        self.failed.is_none()
    }

    fn outcome(&mut self, n: usize, id: &str, result: Result<Published, Error>) {
        print_outcome(&self.args.out, Some(n), id, &result);
        match &result {
            Ok(_) => self.published.push(n),
            Err(e) if self.failed.is_none() => self.failed = Some((n, exit_for(e))),
            Err(_) => {}
        }
    }

    /// Waits for the replies still due; when it stopped early (at a failed publish, or at the
    /// bad line `bad`) says which lines were published.
    async fn finish(mut self, bad: Option<usize>) -> ExitCode {
        while let Some((n, id, p)) = self.inflight.pop_front() {
            let r = p.wait().await;
            self.outcome(n, &id, r);
        }
        let stop = match (bad, self.failed) {
            (Some(b), Some((f, _))) => b.min(f),
            (Some(b), None) => b,
            (None, Some((f, _))) => f,
            (None, None) => return ExitCode::SUCCESS,
        };
        self.published.sort_unstable();
        if self.published.is_empty() {
            eprintln!("sidebus: stopped at line {stop}: nothing was published");
        } else {
            let published = ranges(&self.published);
            eprintln!(
                "sidebus: stopped at line {stop}: published {published} (their ids are above); nothing after line {} was sent",
                self.last_sent
            );
        }
        self.failed.map_or(ExitCode::from(EXIT_DATAERR), |(_, code)| code)
    }
}

/// Sorted line numbers as `line 3` or `lines 1-4, 6, 8-9`.
fn ranges(lines: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = lines[i];
        let mut end = start;
        while i + 1 < lines.len() && lines[i + 1] == end + 1 {
            i += 1;
            end = lines[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    let word = if lines.len() == 1 { "line" } else { "lines" };
    format!("{word} {}", parts.join(", "))
}

/// Prints one line of the outcome. A reader that went away (`| head -1`) does not stop the
/// publishing: the lines are simply not read.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ranges() {
        assert_eq!(ranges(&[3]), "line 3");
        assert_eq!(ranges(&[1, 2, 3, 4, 6, 8, 9]), "lines 1-4, 6, 8-9");
        assert_eq!(ranges(&[1, 3]), "lines 1, 3");
    }
}
