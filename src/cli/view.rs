//! The text views of `stats`, `top` and `ping` at a given width: pure functions of a `Stats`
//! value (and the time now), so they are tested at 80 and 120 columns. Nothing is cut: long
//! lines wrap, a name too long for its column goes on a line of its own, numbers too wide for
//! their column are shortened (12.3M), and below the table's width the groups are stacked.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sidebus_client::{BackendStats, GroupStats, Stats};

/// The width when stdout is not a terminal and no `--width` is given.
pub const DEFAULT_WIDTH: usize = 80;
/// The narrowest width rendered (a narrower one is taken as this).
const MIN_WIDTH: usize = 20;

/// The groups table's number columns: header and width.
const COLUMNS: [(&str, usize); 6] = [("LAG", 7), ("PENDING", 7), ("SCHEDULED", 9), ("OLDEST", 6), ("DEAD", 6), ("CONSUMERS", 9)];
/// The narrowest name column of the table; below it, the groups are stacked.
const MIN_NAME: usize = 12;

/// `stats` and `top`: the daemon, its backends, the counters (with `rates` per second when
/// given), the spool, and a line per group.
pub fn stats(s: &Stats, rates: Option<&HashMap<String, f64>>, width: usize, now: DateTime<Utc>) -> String {
    let width = width.max(MIN_WIDTH);
    let mut out = wrap(&format!("sidebus on {}, up {}", s.node, age(Duration::from_secs(s.uptime_s))), width, 2);
    out.extend(backends(&s.backends, width, now));
    let counters: Vec<String> = s
        .counters
        .iter()
        .map(|(k, v)| {
            let rate = rates.and_then(|r| r.get(k)).map(|r| format!(" ({r:.0}/s)")).unwrap_or_default();
            format!("{k} {v}{rate}")
        })
        .collect();
    out.extend(tokens(&counters, width, 0));
    let oldest =
        if s.spool_events == 0 { String::new() } else { format!(", oldest {}", age(Duration::from_millis(s.spool_oldest_age_ms))) };
    out.extend(wrap(&format!("spool: {} events, {}{oldest}", s.spool_events, bytes(s.spool_bytes)), width, 2));
    out.extend(groups(&s.groups, width));
    if s.truncated {
        out.extend(wrap("(more groups than shown)", width, 0));
    }
    lines(out)
}

/// `ping`: the daemon, how fast it answered, and its backends.
pub fn ping(s: &Stats, rtt: Duration, width: usize, now: DateTime<Utc>) -> String {
    let width = width.max(MIN_WIDTH);
    let rtt = format!("{:.1} ms", rtt.as_secs_f64() * 1000.0);
    let mut out = wrap(&format!("sidebus on {}, up {}, answered in {rtt}", s.node, age(Duration::from_secs(s.uptime_s))), width, 2);
    if s.backends.is_empty() {
        out.extend(wrap("backends: not reported by this daemon (it is older than this command)", width, 2));
    }
    out.extend(backends(&s.backends, width, now));
    lines(out)
}

fn lines(out: Vec<String>) -> String {
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// A line per backend (`redis  up  since … (5m ago)  address`), and its error below when down.
fn backends(list: &[BackendStats], width: usize, now: DateTime<Utc>) -> Vec<String> {
    let mut out = Vec::new();
    for b in list {
        let since = match DateTime::parse_from_rfc3339(&b.since) {
            Ok(t) => {
                let t = t.with_timezone(&Utc);
                let ago = (now - t).to_std().map(|d| format!(" ({} ago)", age(d))).unwrap_or_default();
                format!("{}{ago}", t.format("%Y-%m-%d %H:%M:%SZ"))
            }
            Err(_) => b.since.clone(),
        };
        let state = if b.up { "up" } else { "DOWN" };
        out.extend(wrap(&format!("{:<8}  {state:<4}  since {since}  {}", b.name, b.address), width, 16));
        if let Some(e) = b.error.as_deref().filter(|_| !b.up) {
            out.extend(wrap(&format!("{:16}error: {e}", ""), width, 7));
        }
    }
    out
}

/// The groups as a table when it fits, else stacked (a name line, then its numbers).
fn groups(list: &[GroupStats], width: usize) -> Vec<String> {
    if list.is_empty() {
        return vec!["no consumer groups yet: a group exists from its first subscribe (or [[groups]] in the config)".into()]
            .into_iter()
            .flat_map(|l: String| wrap(&l, width, 2))
            .collect();
    }
    let numbers: usize = COLUMNS.iter().map(|(_, w)| w + 2).sum();
    if width < numbers + MIN_NAME {
        return stacked(list, width);
    }
    let longest = list.iter().map(|g| g.event_type.len() + 1 + g.group.len()).max().unwrap_or(0);
    let name_width = longest.max("TYPE/GROUP".len()).min(width - numbers);
    let mut header = format!("{:<name_width$}", "TYPE/GROUP");
    for (title, w) in COLUMNS {
        header.push_str(&format!("  {title:>w$}"));
    }
    let mut out = vec![header];
    for g in list {
        let name = format!("{}/{}", g.event_type, g.group);
        let mut row = if name.len() <= name_width {
            format!("{name:<name_width$}")
        } else {
            out.extend(wrap(&name, width, 2));
            " ".repeat(name_width)
        };
        for (value, (_, w)) in values(g).iter().zip(COLUMNS) {
            let v = if value.len() > w { shorten(value) } else { value.clone() };
            row.push_str(&format!("  {v:>w$}"));
        }
        out.push(row);
    }
    out
}

/// The number columns of a group, as text.
fn values(g: &GroupStats) -> [String; 6] {
    let oldest = if g.pending == 0 { "-".to_owned() } else { age(Duration::from_millis(g.oldest_pending_ms)) };
    [g.lag.to_string(), g.pending.to_string(), g.scheduled.to_string(), oldest, g.dead_letters.to_string(), g.consumers.to_string()]
}

fn stacked(list: &[GroupStats], width: usize) -> Vec<String> {
    let mut out = vec!["TYPE/GROUP".to_owned()];
    for g in list {
        out.extend(wrap(&format!("{}/{}", g.event_type, g.group), width, 2));
        let named: Vec<String> =
            values(g).iter().zip(COLUMNS).map(|(v, (title, _))| format!("{} {v}", title.to_ascii_lowercase())).collect();
        out.extend(tokens(&named, width, 2));
    }
    out
}

/// `text` in lines of at most `width` characters, broken at spaces (a word longer than a line
/// is split); its leading spaces are kept, and later lines are indented by `indent` more (at
/// most a quarter of the width each).
pub fn wrap(text: &str, width: usize, indent: usize) -> Vec<String> {
    let lead = text.len() - text.trim_start_matches(' ').len();
    let rest = " ".repeat((lead + indent).min(width / 4));
    // The words, each with the spaces before it on the same line (kept: columns stay aligned).
    let mut words: Vec<(usize, &str)> = Vec::new();
    let mut gap = 0;
    for piece in text[lead..].split(' ') {
        if piece.is_empty() {
            gap += 1;
            continue;
        }
        words.push((if words.is_empty() { 0 } else { gap + 1 }, piece));
        gap = 0;
    }
    let mut out = Vec::new();
    let mut line = " ".repeat(lead.min(width / 4));
    let mut fresh = true;
    for (gap, word) in words {
        let used = line.chars().count();
        let len = word.chars().count();
        if !fresh && used + gap + len <= width {
            line.push_str(&" ".repeat(gap));
            line.push_str(word);
            continue;
        }
        if !fresh {
            out.push(std::mem::replace(&mut line, rest.clone()));
        }
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let room = width.saturating_sub(line.chars().count()).max(1);
            if word.len() <= room {
                line.extend(word);
                break;
            }
            line.extend(word.drain(..room));
            out.push(std::mem::replace(&mut line, rest.clone()));
        }
        fresh = false;
    }
    if !fresh || out.is_empty() {
        out.push(line);
    }
    out
}

/// Items joined by two spaces in lines of at most `width`, an item never split unless it is
/// longer than a line; later lines indented by `indent`.
fn tokens(items: &[String], width: usize, indent: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = " ".repeat(indent);
    let mut empty = true;
    for item in items {
        let len = item.chars().count();
        if !empty && line.chars().count() + 2 + len > width {
            out.push(std::mem::replace(&mut line, " ".repeat(indent)));
            empty = true;
        }
        if !empty {
            line.push_str("  ");
        }
        if line.chars().count() + len > width {
            let mut parts = wrap(&format!("{line}{item}"), width, 0);
            line = parts.pop().unwrap_or_default();
            out.extend(parts);
        } else {
            line.push_str(item);
        }
        empty = false;
    }
    if !empty {
        out.push(line);
    }
    out
}

/// A number in at most 6 characters: 999999, 1.2M, 12.3G.
fn shorten(value: &str) -> String {
    let Ok(n) = value.parse::<u64>() else { return value.to_owned() };
    let mut v = n as f64;
    for unit in ["k", "M", "G", "T", "P", "E"] {
        v /= 1000.0;
        if v < 999.95 {
            return if v < 99.95 { format!("{v:.1}{unit}") } else { format!("{v:.0}{unit}") };
        }
    }
    value.to_owned()
}

/// A duration for people: 350ms, 4.2s, 5m03s, 1h02m, 3d04h.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A size for people: 512 B, 1.5 KiB, 3.2 MiB.
fn bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        v /= 1024.0;
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
    }
    format!("{v:.1} TiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&Utc)
    }

    /// A daemon with every counter (at realistic sizes), both backends (one down, with a long
    /// error), and groups with short, long and very long names.
    fn sample() -> Stats {
        let names = [
            "published",
            "spooled",
            "flushed",
            "delivered",
            "acked",
            "nacked",
            "retried",
            "expired_leases",
            "dead_lettered",
            "redriven",
            "replayed",
            "validation_failures",
            "protocol_errors",
            "redis_losses",
            "recovered",
            "unauthorized",
        ];
        let group = |t: &str, g: &str, n: u64| GroupStats {
            event_type: t.into(),
            group: g.into(),
            lag: n,
            pending: n / 3,
            oldest_pending_ms: 1_234_567,
            dead_letters: n / 7,
            consumers: 3,
            scheduled: n / 11,
        };
        Stats {
            node: "web-7.eu-west-1.internal".into(),
            uptime_s: 93_784,
            counters: names.iter().enumerate().map(|(i, n)| (n.to_string(), 1_234_567_890 / (i as u64 + 1))).collect(),
            spool_events: 12_345,
            spool_bytes: 7_654_321,
            spool_oldest_age_ms: 4_200,
            groups: vec![
                group("order.created", "billing", 12),
                group("order.created", "analytics-warehouse-loader", 98_765_432_109),
                group(&"a".repeat(128), &"b".repeat(128), 5),
            ],
            truncated: true,
            backends: vec![
                BackendStats {
                    name: "redis".into(),
                    address: "redis://cache.eu-west-1.internal:6379".into(),
                    up: true,
                    since: "2026-11-27T09:30:00.123456Z".into(),
                    error: None,
                },
                BackendStats {
                    name: "postgres".into(),
                    address: "postgres://sidebus@db.eu-west-1.internal:5432/sidebus".into(),
                    up: false,
                    since: "2026-11-27T11:59:30.000001Z".into(),
                    error: Some("error communicating with database: Connection refused (os error 111) while connecting".into()),
                },
            ],
        }
    }

    fn rates(s: &Stats) -> HashMap<String, f64> {
        s.counters.iter().map(|(k, v)| (k.clone(), *v as f64 / 1000.0)).collect()
    }

    fn assert_fits(text: &str, width: usize) {
        for line in text.lines() {
            assert!(line.chars().count() <= width, "a line over {width} columns ({}):\n{line}\nin:\n{text}", line.chars().count());
        }
    }

    #[test]
    fn top_fits_80_and_120_columns_and_loses_nothing() {
        let s = sample();
        let r = rates(&s);
        for width in [80, 120] {
            let text = stats(&s, Some(&r), width, now());
            assert_fits(&text, width);
            for (k, v) in &s.counters {
                assert!(text.contains(&format!("{k} {v} (")), "{k} at {width}:\n{text}");
            }
            for want in ["web-7.eu-west-1.internal", "up 1d02h", "spool: 12345 events, 7.3 MiB, oldest 4.2s", "SCHEDULED", "CONSUMERS"] {
                assert!(text.contains(want), "{want} at {width}:\n{text}");
            }
            assert!(text.contains("order.created/billing") && text.contains("order.created/analytics-warehouse-loader"), "{text}");
            assert!(text.contains(&"a".repeat(40)) && text.contains("(more groups than shown)"), "{text}");
            assert!(text.contains("98.8G"), "a number too wide for its column is shortened:\n{text}");
            assert!(text.contains("redis     up    since 2026-11-27 09:30:00Z (2h29m ago)"), "{text}");
            assert!(text.contains("postgres  DOWN  since 2026-11-27 11:59:30Z (30.0s ago)"), "{text}");
            assert!(text.contains("Connection refused"), "{text}");
        }
        // At 120 columns the usual names share the line with their numbers.
        let text = stats(&s, None, 120, now());
        let row = text.lines().find(|l| l.starts_with("order.created/billing")).unwrap();
        assert!(row.trim_end().ends_with('3'), "{row}");
        assert!(row.contains("20m34s"), "the oldest pending delivery's wait: {row}");
    }

    #[test]
    fn a_narrow_width_stacks_the_groups() {
        let s = sample();
        let text = stats(&s, None, 40, now());
        assert_fits(&text, 40);
        assert!(text.contains("  lag 12  pending 4  scheduled 1"), "{text}");
        let text = stats(&s, None, 5, now());
        assert_fits(&text, MIN_WIDTH);
    }

    #[test]
    fn ping_names_each_backend() {
        let s = sample();
        let text = ping(&s, Duration::from_micros(420), 80, now());
        assert_fits(&text, 80);
        assert!(text.starts_with("sidebus on web-7.eu-west-1.internal, up 1d02h, answered in 0.4 ms\n"), "{text}");
        assert!(text.contains("redis     up") && text.contains("postgres  DOWN"), "{text}");
        let old = Stats { backends: vec![], ..s };
        assert!(ping(&old, Duration::ZERO, 80, now()).contains("not reported"));
    }

    #[test]
    fn wrapping() {
        assert_eq!(wrap("abc def ghi", 8, 2), ["abc def", "  ghi"]);
        assert_eq!(wrap("    error: x", 20, 0), ["    error: x"]);
        assert_eq!(wrap("abcdefghij", 4, 0), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4, 0), [""]);
        assert_eq!(shorten("98765432109"), "98.8G");
        assert_eq!(shorten("1234567"), "1.2M");
        assert_eq!(shorten("999999999"), "1.0G");
        assert_eq!(wrap("ab    cd  ef", 8, 1), ["ab    cd", " ef"]);
        assert_eq!(age(Duration::from_millis(350)), "350ms");
        assert_eq!(age(Duration::from_secs(3723)), "1h02m");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
