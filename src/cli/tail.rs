//! `sidebus tail`: print a group's deliveries as JSON lines and end each one: ack it (the
//! default), nack it (`--fail`, `--dead`), or hold it to peek (`--no-ack`, handed back on exit).
//! Says on stderr once it is subscribed, once when the daemon goes away, once when it is back,
//! and once when it gives up. Without `--group` it reads through an ephemeral group of its own
//! (`tail-<host>-<pid>-<random>`), created at the end of the stream and deleted when tail exits
//! (Ctrl-C, SIGTERM, `--count`, or stdout closed).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use sidebus_client::{Client, Delivery, Error, SubscribeOptions, Subscription};
use tokio::time::Instant;

use super::{ConnArgs, EXIT_DATAERR, EXIT_REFUSED, EXIT_UNAVAILABLE, error_code, exit_for, msgpack_json, report, time};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Each line is one delivery: the event's attributes, `attempt`, and `data` as JSON (binary as
{\"$hex\": …}). Once subscribed, tail says so on stderr (\"subscribed to TYPE as GROUP; waiting
for events\"): a group receives the events published after it exists, so a publish made before
that line reaches a new group's tail only through `sidebus replay`.

Each delivery is acked, unless:
  --no-ack           peek: hold the deliveries, hand them back on exit without counting an attempt
  --fail REASON      nack each one with REASON: a failed attempt, retried after the group's backoff
                     and dead-lettered after --max-attempts (the next lines show the attempt rise)
  --dead[=REASON]    nack each one straight to the dead-letter queue (`sidebus dlq list` shows it)

A delivery is ended only once its line is printed; when stdout closes (`| head -1`) tail stops,
and what it could not print goes back to the group.

If the daemon goes away, tail says so once, reconnects and subscribes again by itself, and says
so once when it is back; after --reconnect-for without a daemon it gives up (exit 69).
Exit codes: 0 done (--count reached, or Ctrl-C), 1 refused by the daemon, 65 bad argument,
69 daemon unreachable or gone.

Without --group, tail reads through a group of its own, `tail-<host>-<pid>-<random>`, which
sees what is published from now on and is deleted when tail exits (Ctrl-C, SIGTERM, --count,
stdout closed); a tail killed outright leaves it behind (`sidebus groups delete`, or the
daemon's group_idle_ttl).

Examples:
  sidebus tail order.created
  sidebus tail order.created --group analytics
  sidebus tail order.created --group inventory --no-ack --count 10
  sidebus tail user.signup --group mailer --fail 'smtp down' --count 3
  sidebus tail user.signup --group mailer --dead='malformed address' --count 1")]
pub struct Args {
    /// The event type.
    pub event_type: String,
    /// The consumer group to read as (created if new: it receives events published from now on).
    /// Without it, an ephemeral group of this tail's own, deleted when it exits.
    #[arg(long)]
    pub group: Option<String>,
    /// Only peek: hold the deliveries without acking and hand them back to the group on exit
    /// (at most --max-in-flight of them).
    #[arg(long, conflicts_with_all = ["fail", "dead"])]
    pub no_ack: bool,
    /// Nack every delivery with this error: a failed attempt, retried after the backoff.
    #[arg(long, value_name = "REASON", conflicts_with = "dead")]
    pub fail: Option<String>,
    /// Nack every delivery straight to the dead-letter queue, with this reason (`--dead=REASON`).
    #[arg(long, value_name = "REASON", num_args = 0..=1, require_equals = true, default_missing_value = "dead-lettered by sidebus tail --dead")]
    pub dead: Option<String>,
    /// Stop after this many deliveries.
    #[arg(long)]
    pub count: Option<u64>,
    /// Deliveries held at once.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: u64,
    /// Failed attempts before the dead-letter queue (default: the daemon's max_attempts).
    #[arg(long)]
    pub max_attempts: Option<u64>,
    /// How long to wait for a daemon that went away before giving up (500ms, 90s, 10m, 2h, 1d).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub reconnect_for: String,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Lease of a peeked delivery; extended while tail holds it.
const PEEK_LEASE: Duration = Duration::from_secs(30);
/// How often tail looks whether its connection is up.
const WATCH_EVERY: Duration = Duration::from_millis(100);

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
        if let Some(t) = &e.deliverat {
            m.insert("deliverat".into(), t.clone().into());
        }
        if e.replayed {
            m.insert("replayed".into(), true.into());
        }
        let data = msgpack_json(&e.data);
        m.insert("data".into(), data);
    }
    v
}

/// An ephemeral group's name: `tail-<host>-<pid>-<random>`, within the group alphabet.
fn ephemeral_group() -> String {
    let host: String =
        hostname().chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '-' }).take(64).collect();
    format!("tail-{host}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// What tail does with each delivery.
enum Mode {
    Ack,
    Peek,
    Fail(String),
    Dead(String),
}

pub async fn run(args: Args) -> ExitCode {
    let reconnect_for = match time::arg("reconnect-for", time::duration(&args.reconnect_for)) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if args.count == Some(0) {
        eprintln!("sidebus: --count must be at least 1");
        return ExitCode::from(EXIT_DATAERR);
    }
    let client = match args.conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mode = match (&args.fail, &args.dead) {
        (Some(reason), _) => Mode::Fail(reason.clone()),
        (None, Some(reason)) => Mode::Dead(reason.clone()),
        (None, None) if args.no_ack => Mode::Peek,
        (None, None) => Mode::Ack,
    };
    let opts = SubscribeOptions {
        max_in_flight: Some(args.max_in_flight),
        max_attempts: args.max_attempts,
        ack_timeout_ms: matches!(mode, Mode::Peek).then_some(PEEK_LEASE.as_millis() as u64),
    };
    let ephemeral = args.group.is_none();
    let group = args.group.clone().unwrap_or_else(ephemeral_group);
    let sub = match client.subscribe(&args.event_type, &group, opts).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return exit_for(&e);
        }
    };
    let whose = if ephemeral { " (a group of its own, deleted on exit)" } else { "" };
    eprintln!("sidebus: subscribed to {} as {group}{whose}; waiting for events (Ctrl-C to stop)", args.event_type);
    let mut tail = Tail { args: &args, group: &group, mode, client, held: Vec::new(), seen: 0, reconnect_for };
    let (sub, status) = tail.follow(sub).await;
    // Peeked deliveries go back to the group without counting an attempt. A connection that is
    // gone is no error: the daemon dropped the subscription with it.
    if let Err(e) = sub.unsubscribe().await {
        report(&e);
    }
    if ephemeral && let Err(e) = tail.client.group_delete(&args.event_type, &group, true).await {
        eprintln!(
            "sidebus: could not delete the ephemeral group {group} ({e}); `sidebus groups delete {} --group {group}` does",
            args.event_type
        );
    }
    status
}

struct Tail<'a> {
    args: &'a Args,
    group: &'a str,
    mode: Mode,
    client: Client,
    /// Deliveries held by `--no-ack`.
    held: Vec<Delivery>,
    seen: u64,
    reconnect_for: Duration,
}

impl Tail<'_> {
    /// Prints and ends deliveries until `--count`, Ctrl-C, or a final failure; watches the
    /// connection meanwhile.
    async fn follow(&mut self, mut sub: Subscription) -> (Subscription, ExitCode) {
        let mut extend = tokio::time::interval(PEEK_LEASE / 3);
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut lost_since: Option<Instant> = None;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        while self.args.count.is_none_or(|c| self.seen < c) {
            tokio::select! {
                d = sub.next() => match d {
                    Some(d) => if !self.handle(d).await {
                        break;
                    },
                    None => {
                        let status = match sub.end_reason() {
                            Some(why) => {
                                eprintln!("sidebus: the subscription ended: {why}");
                                ExitCode::from(EXIT_REFUSED)
                            }
                            None => {
                                eprintln!("sidebus: the connection to the daemon is closed");
                                ExitCode::from(EXIT_UNAVAILABLE)
                            }
                        };
                        return (sub, status);
                    }
                },
                _ = watch.tick() => match (self.client.is_connected(), lost_since) {
                    (false, None) => {
                        lost_since = Some(Instant::now());
                        let held = std::mem::take(&mut self.held).len();
                        let back = if held > 0 { format!(" (the {held} deliveries held went back to the group)") } else { String::new() };
                        eprintln!(
                            "sidebus: lost the connection to the daemon at {}{back}; reconnecting for up to {} (Ctrl-C to stop)",
                            self.args.conn.path().display(),
                            self.args.reconnect_for
                        );
                    }
                    (true, Some(_)) => {
                        lost_since = None;
                        eprintln!("sidebus: reconnected to the daemon; subscribing again to {} as {}", self.args.event_type, self.group);
                    }
                    (false, Some(t)) if t.elapsed() >= self.reconnect_for => {
                        eprintln!("sidebus: the daemon did not come back within {}; giving up", self.args.reconnect_for);
                        return (sub, ExitCode::from(EXIT_UNAVAILABLE));
                    }
                    _ => {}
                },
                _ = extend.tick(), if !self.held.is_empty() => {
                    for d in &self.held {
                        let _ = d.extend().await;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => break,
            }
        }
        (sub, ExitCode::SUCCESS)
    }

    /// Prints a delivery and ends it as the mode says.
    /// False when stdout is closed (`tail | head -1`): the delivery is left unended, and goes
    /// back to the group with the others at the unsubscribe.
    async fn handle(&mut self, d: Delivery) -> bool {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{}", line(&d)).and_then(|()| out.flush()).is_err() {
            return false;
        }
        drop(out);
        self.seen += 1;
        let ended = match &self.mode {
            Mode::Ack => d.ack().await,
            Mode::Fail(reason) => d.nack(reason).await,
            Mode::Dead(reason) => d.nack_with(Some(reason), None, true).await,
            Mode::Peek => {
                self.held.push(d);
                if self.held.len() as u64 == self.args.max_in_flight {
                    eprintln!(
                        "sidebus: holding {} deliveries (--max-in-flight); no more arrive until they are handed back",
                        self.held.len()
                    );
                }
                return true;
            }
        };
        match ended {
            // The connection went away (said once by the watch): the daemon delivers it again.
            Ok(()) | Err(Error::ConnectionLost(_) | Error::Closed) => {}
            Err(e) => {
                eprintln!("sidebus: could not end the delivery of {} ({}): {e}; it will be delivered again", d.event.id, error_code(&e))
            }
        }
        true
    }
}
