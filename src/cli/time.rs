//! Times and durations on the command line: one parser and one message for every flag that takes
//! them (`publish --deliver-at` and `--delay`, `replay --since` and `--until`, `tail
//! --reconnect-for`), so a time one command takes the others take too.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use super::EXIT_DATAERR;

/// What a duration looks like, for messages and `--help`.
pub const DURATIONS: &str = "500ms, 90s, 10m, 2h, 1d, 1h30m";
/// An RFC 3339 example, for messages and `--help`.
const RFC3339_EXAMPLE: &str = "2026-11-27T09:30:00Z";
/// The longest age or duration taken (longer ones are cut to it).
const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A time given on the command line that is ahead: a moment, or a duration from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// At this time.
    At(DateTime<Utc>),
    /// This long after now.
    After(Duration),
}

fn not_a_duration(s: &str) -> String {
    format!("`{s}` is not a duration: give a number with a unit, e.g. {DURATIONS}")
}

fn not_a_time(s: &str, other: &str) -> String {
    format!("`{s}` is not a time: give an RFC 3339 time ({RFC3339_EXAMPLE}) or {other}")
}

/// A duration: numbers with units (`ms`, `s`, `m`, `h`, `d`), e.g. `90s`, `1h30m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let mut total: u128 = 0;
    let mut digits = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit_ms: u128 = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(not_a_duration(s)),
        };
        let n: u128 = digits.parse().map_err(|_| not_a_duration(s))?;
        total = total.saturating_add(n.saturating_mul(unit_ms));
        digits.clear();
    }
    if text.is_empty() || !digits.is_empty() {
        return Err(not_a_duration(s));
    }
    Ok(Duration::from_millis(total.min(LONGEST.as_millis()) as u64))
}

fn rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim()).ok().map(|t| t.with_timezone(&Utc))
}

fn minus(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now - chrono::Duration::from_std(d.min(LONGEST)).unwrap_or_else(|_| chrono::Duration::zero())
}

/// A time in the past: RFC 3339, or an age before `now` (`2h`, `2h ago`, `-2h`).
pub fn past(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Some(t) = rfc3339(s) {
        return Ok(t);
    }
    let t = s.trim();
    let age = t.strip_suffix("ago").map(str::trim_end).or_else(|| t.strip_prefix('-')).unwrap_or(t);
    match duration(age) {
        Ok(d) if !d.is_zero() => Ok(minus(now, d)),
        _ => Err(not_a_time(s, &format!("an age ({DURATIONS}; `2h ago` too)"))),
    }
}

/// A time ahead: RFC 3339, or a duration from now (`10m`, `+10m`, `in 10m`).
pub fn ahead(s: &str) -> Result<Ahead, String> {
    if let Some(t) = rfc3339(s) {
        return Ok(Ahead::At(t));
    }
    let t = s.trim();
    let d = t.strip_prefix('+').or_else(|| t.strip_prefix("in ")).unwrap_or(t);
    duration(d).map(Ahead::After).map_err(|_| not_a_time(s, &format!("a duration ahead ({DURATIONS}; `+10m` or `in 10m` too)")))
}

/// A time as the daemon takes it (RFC 3339, UTC, microseconds).
pub fn format(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The value of a parsed flag, or the message (once, naming the flag) and exit code 65.
pub fn arg<T>(flag: &str, parsed: Result<T, String>) -> Result<T, ExitCode> {
    parsed.map_err(|e| {
        eprintln!("sidebus: --{flag}: {e}");
        ExitCode::from(EXIT_DATAERR)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        rfc3339("2026-11-27T12:00:00Z").unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("1m30s250ms").unwrap(), Duration::from_millis(90_250));
        assert_eq!(duration("2d").unwrap(), Duration::from_secs(2 * 86_400));
        assert_eq!(duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(duration("99999999999999999999d").unwrap(), LONGEST);
        for bad in ["", "2", "h", "2x", "tomorrow", "1.5h", "-1s", "s2"] {
            let e = duration(bad).unwrap_err();
            assert!(e.contains("is not a duration") && e.contains("1h30m"), "{bad}: {e}");
        }
    }

    #[test]
    fn times_in_the_past() {
        assert_eq!(past("2h", now()).unwrap(), now() - chrono::Duration::hours(2));
        assert_eq!(past("2h ago", now()).unwrap(), now() - chrono::Duration::hours(2));
        assert_eq!(past("-90m", now()).unwrap(), now() - chrono::Duration::minutes(90));
        assert_eq!(past("1h30m", now()).unwrap(), now() - chrono::Duration::minutes(90));
        assert_eq!(format(past("2026-11-27T08:00:00+01:00", now()).unwrap()), "2026-11-27T07:00:00.000000Z");
        for bad in ["", "2", "h", "2x", "yesterday", "0s"] {
            let e = past(bad, now()).unwrap_err();
            assert!(e.starts_with(&format!("`{bad}` is not a time: give an RFC 3339 time")), "{bad}: {e}");
        }
    }

    #[test]
    fn times_ahead() {
        assert_eq!(ahead("10m").unwrap(), Ahead::After(Duration::from_secs(600)));
        assert_eq!(ahead("+10m").unwrap(), Ahead::After(Duration::from_secs(600)));
        assert_eq!(ahead("in 10m").unwrap(), Ahead::After(Duration::from_secs(600)));
        assert_eq!(ahead("2026-11-28T09:30:00Z").unwrap(), Ahead::At(rfc3339("2026-11-28T09:30:00Z").unwrap()));
        for bad in ["tomorrow", "", "in", "+", "10"] {
            let e = ahead(bad).unwrap_err();
            assert!(e.starts_with(&format!("`{bad}` is not a time: give an RFC 3339 time")), "{bad}: {e}");
        }
    }
}
