//! The shared backends, connected in the background: the daemon opens its socket and takes
//! publishes into its spool before Redis and Postgres answer, and each part that needs a
//! backend waits for it (flushing) or says `unavailable` (subscribing, after a bounded wait).

pub mod health;
pub mod pg;
pub mod ready;
pub mod redis;
pub mod spool;

use std::time::Duration;

use crate::backend::health::Health;
use crate::backend::pg::EventLog;
use crate::backend::ready::Ready;
use crate::backend::redis::{Streams, Target};
use crate::config::{Config, ConfigError, key};

/// Checks that the configured URLs are ones the drivers can connect with and that the TLS files
/// they name can be read, so that a typo stops the start with a config error rather than a
/// retry loop.
pub fn check_urls(config: &Config) -> Result<(), ConfigError> {
    let invalid = |key: &str, problem: String| ConfigError::Invalid { key: key.to_owned(), problem };
    redis::check(config).map_err(|(k, e)| invalid(k, e))?;
    pg::check(&config.database_url, config.database_password.as_ref().map(|p| p.expose())).map_err(|e| invalid(key::DATABASE_URL, e))
}

/// Handles on the backends, once they answer, and what the daemon last found of each.
pub struct Backends {
    /// The Postgres event log (migrated).
    pub log: Ready<EventLog>,
    /// Redis.
    pub streams: Ready<Streams>,
    /// Postgres's state.
    pub postgres: Health,
    /// Redis's state.
    pub redis: Health,
}

/// How long to wait between connection attempts.
const RETRY: Duration = Duration::from_secs(1);

impl Backends {
    /// Not connected yet: see [`Backends::connect_log`] and [`Backends::connect_streams`].
    pub fn new(config: &Config) -> Backends {
        Backends {
            log: Ready::default(),
            streams: Ready::default(),
            postgres: Health::new("postgres", &config.database_url),
            redis: Health::new("redis", &config.redis_url),
        }
    }

    /// Probes each connected backend once a second, so that `stats` and the logs say when one
    /// goes away or comes back (commands fail meanwhile on their own, and retry).
    pub async fn probe(&self) {
        loop {
            tokio::time::sleep(health::PROBE_EVERY).await;
            if let Some(log) = self.log.now() {
                match tokio::time::timeout(health::PROBE_TIMEOUT, log.ping()).await {
                    Ok(Ok(())) => self.postgres.up(),
                    Ok(Err(e)) => self.postgres.down(&e.to_string()),
                    Err(_) => self.postgres.down("no answer within 2 s"),
                }
            }
            if let Some(streams) = self.streams.now() {
                // With Sentinel: move to the master it names, if that changed.
                match tokio::time::timeout(health::PROBE_TIMEOUT, streams.follow_master()).await {
                    Ok(Ok(Some(master))) => {
                        tracing::warn!(backend = "redis", master = %master, "the Sentinels name a new Redis master; commands go to {master} now")
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "could not ask the Sentinels for the master"),
                    Err(_) => tracing::debug!("the Sentinels did not answer within 2 s"),
                }
                match tokio::time::timeout(health::PROBE_TIMEOUT, streams.ping()).await {
                    Ok(Ok(())) => self.redis.up(),
                    Ok(Err(e)) => self.redis.down(&e.to_string()),
                    Err(_) => self.redis.down("no answer within 2 s"),
                }
            }
        }
    }
    /// Both backends, waiting for them up to `wait` (`None`: one of them did not answer by then).
    pub async fn both_within(&self, wait: Duration) -> Option<(EventLog, Streams)> {
        let both = async { (self.log.get().await, self.streams.get().await) };
        tokio::time::timeout(wait, both).await.ok()
    }

    /// Connects to Postgres (retrying until it answers), migrates, and makes the log available.
    /// A failed migration is an error: the operator must act.
    pub async fn connect_log(&self, config: &Config) -> Result<(), crate::backend::pg::LogError> {
        let mut failures = 0u32;
        let log = loop {
            // One connection per publish lane, and a few for subscriptions and the janitor.
            let opts = pg::options(&config.database_url, config.database_password.as_ref().map(|p| p.expose()))
                .map_err(crate::backend::pg::LogError::Settings)?;
            match EventLog::connect_options(opts, config.publish_writers as u32 + 4).await {
                Ok(log) => break log,
                Err(e) => {
                    self.postgres.down(&e.to_string());
                    // A reminder now and then; the change itself was logged by `down`.
                    failures += 1;
                    if failures.is_multiple_of(60) {
                        tracing::warn!(address = %self.postgres.address(), error = %e, "Postgres still unreachable");
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        log.migrate().await?;
        self.postgres.up();
        self.log.set(log);
        Ok(())
    }

    /// Connects to Redis (retrying until it answers), creates the groups declared in the
    /// config, and makes Redis available. The declared groups come first: nothing is flushed to
    /// a stream before they exist, so they receive every event published from start-up on.
    pub async fn connect_streams(&self, config: &Config) {
        // check_urls built this target at start: it cannot fail now (and if a TLS file went
        // away since, the attempt says so and is retried).
        let mut failures = 0u32;
        loop {
            let connected = async {
                let target =
                    Target::from_config(config).map_err(|(k, why)| crate::backend::redis::StreamsError::Reply { op: k, detail: why })?;
                let s = Streams::connect_to(std::sync::Arc::new(target), &config.namespace).await?;
                for g in &config.groups {
                    s.ensure_group(&s.group_keys(&g.event_type, &g.name), false).await?;
                }
                Ok::<_, crate::backend::redis::StreamsError>(s)
            };
            match connected.await {
                Ok(s) => {
                    self.redis.up();
                    tracing::debug!(declared_groups = config.groups.len(), "declared groups created in Redis");
                    self.streams.set(s);
                    return;
                }
                Err(e) => {
                    self.redis.down(&e.to_string());
                    failures += 1;
                    if failures.is_multiple_of(60) {
                        tracing::warn!(address = %self.redis.address(), error = %e, "Redis still unreachable");
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}
