//! What the daemon last found of each backend: up or down, since when, the last error, and its
//! address without the password. Connection attempts and a probe once a second report here;
//! a change is logged once (naming the address), and `stats` shows the state.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::lock::lock;

/// How often a connected backend is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take before the backend counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One backend's state.
pub struct Health {
    name: &'static str,
    address: String,
    state: Mutex<State>,
}

struct State {
    up: bool,
    /// Whether it has ever answered (the first failure of a start is logged too).
    answered: bool,
    since: DateTime<Utc>,
    error: Option<String>,
}

/// A copy of a backend's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `redis` or `postgres`.
    pub name: &'static str,
    /// The URL without its password.
    pub address: String,
    /// The last attempt or probe succeeded.
    pub up: bool,
    /// When it last went up or down (the daemon's start, before the first attempt ends).
    pub since: DateTime<Utc>,
    /// The last error while down.
    pub error: Option<String>,
}

impl Health {
    /// A backend not connected yet.
    pub fn new(name: &'static str, url: &str) -> Health {
        Health {
            name,
            address: redact(url),
            state: Mutex::new(State { up: false, answered: false, since: Utc::now(), error: Some("connecting".into()) }),
        }
    }

    /// The address, for log lines.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// It answered.
    pub fn up(&self) {
        let mut s = lock(&self.state);
        if !s.up {
            tracing::info!(backend = self.name, address = %self.address, "{} reachable at {}", title(self.name), self.address);
            *s = State { up: true, answered: true, since: Utc::now(), error: None };
        }
    }

    /// It failed: `error` says how (the address is added to the log line, not to the text).
    pub fn down(&self, error: &str) {
        let mut s = lock(&self.state);
        if s.up || (!s.answered && s.error.as_deref() == Some("connecting")) {
            tracing::warn!(
                backend = self.name,
                address = %self.address,
                error,
                "{} unreachable; retrying {} (publishes are kept in the spool)",
                title(self.name),
                self.address
            );
            s.up = false;
            s.since = Utc::now();
        }
        s.error = Some(error.to_owned());
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> Snapshot {
        let s = lock(&self.state);
        Snapshot { name: self.name, address: self.address.clone(), up: s.up, since: s.since, error: s.error.clone() }
    }
}

fn title(name: &str) -> &'static str {
    match name {
        "redis" => "Redis",
        _ => "Postgres",
    }
}

/// `url` without the password of its user part, and without its query (which may hold one:
/// `?password=`).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "(not a URL)".into() };
    let rest = rest.split('?').next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _password)) if !name.is_empty() => format!("{name}@{host}"),
            Some(_) => host.to_owned(),
            None if !user.is_empty() => format!("{user}@{host}"),
            None => host.to_owned(),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://:s3cret@cache:6379/2"), "redis://cache:6379/2");
        assert_eq!(redact("rediss://app:s3cret@cache:6380"), "rediss://app@cache:6380");
        assert_eq!(redact("postgres://sidebus:p%40ss@db:5432/sidebus?sslmode=require&password=x"), "postgres://sidebus@db:5432/sidebus");
        assert_eq!(redact("postgres://postgres@127.0.0.1:5432/sidebus"), "postgres://postgres@127.0.0.1:5432/sidebus");
        assert_eq!(redact("unix:///run/redis.sock"), "unix:///run/redis.sock");
        assert_eq!(redact("redis+sentinel://:pw@s1:26379,s2:26379/mymaster"), "redis+sentinel://s1:26379,s2:26379/mymaster");
        assert_eq!(redact("nonsense"), "(not a URL)");
    }

    #[test]
    fn it_goes_down_and_up_with_the_time_of_the_change() {
        let h = Health::new("redis", "redis://:pw@cache:6379");
        assert!(!h.snapshot().up);
        h.down("connection refused");
        let down = h.snapshot();
        assert_eq!((down.up, down.error.as_deref(), down.address.as_str()), (false, Some("connection refused"), "redis://cache:6379"));
        h.down("connection refused again");
        assert_eq!(h.snapshot().since, down.since, "a second failure is not a change");
        h.up();
        let up = h.snapshot();
        assert!(up.up && up.error.is_none() && up.since >= down.since);
    }
}
