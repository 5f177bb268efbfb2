//! The Postgres backend: the event log (the source of truth, kept for replay) and everything else
//! sidebus keeps in Postgres, one file per table or concern: `events`, `groups` (types and
//! consumer groups), `replays`, `dead_letters`, `schemas`, `recovery` (lanes, checkpoints,
//! recoveries). The only code with SQL (the `tidy` test keeps it so); the schema is in
//! `migrations/`, embedded in the binary and applied at start-up (sqlx takes an advisory lock,
//! so daemons starting together migrate once). This file: the connection and its errors.

mod copy;
mod dead_letters;
mod events;
mod groups;
mod recovery;
mod replays;
mod schemas;

pub use dead_letters::{DeadLetterRow, NewDeadLetter};
pub use events::{Record, Stored};
pub use recovery::{CheckpointInputs, GroupResume, LANE_HEARTBEAT, LANE_REPORT_FRESH, LANE_SILENT, Recovering};
pub use replays::{DueEvent, DueWalk, Replay, ReplayRow};
pub use schemas::{SchemaHistory, SchemaRow};
pub use sqlx::postgres::PgConnectOptions as ConnectOptions;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// Longest any statement may run before Postgres cancels it.
const STATEMENT_TIMEOUT: &str = "30s";

/// A Postgres failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The URL could not be used.
    #[error("postgres url: {0}")]
    Url(sqlx::Error),
    /// Connecting failed (down, refused, authentication).
    #[error("postgres connect: {0}")]
    Connect(sqlx::Error),
    /// Creating the missing database failed.
    #[error("postgres create database {name}: {source}")]
    CreateDatabase {
        /// The database.
        name: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("postgres migrate: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A statement failed.
    #[error("postgres {op}: {source}")]
    Query {
        /// The operation.
        op: &'static str,
        /// Why.
        source: sqlx::Error,
    },
    /// The connection settings are unusable (`check_urls` refuses them at start).
    #[error("database_url: {0}")]
    Settings(String),
    /// A statement did not answer in time (the caller's own limit).
    #[error("postgres {0}: timed out")]
    Timeout(&'static str),
}

fn query(op: &'static str) -> impl FnOnce(sqlx::Error) -> LogError {
    move |source| LogError::Query { op, source }
}

/// The connection options of a URL, with `password` in place of the URL's. TLS is the URL's
/// own, as in libpq: `sslmode` (`disable`, `prefer` (the default), `require`, `verify-ca`,
/// `verify-full`), `sslrootcert`, `sslcert`, `sslkey`; the files are read at each connection,
/// so renewed certificates are picked up without a restart. Errors never quote the password.
pub fn options(url: &str, password: Option<&str>) -> Result<PgConnectOptions, String> {
    let opts = PgConnectOptions::from_str(url).map_err(|e| {
        let text = e.to_string();
        let secret = url.split_once("://").and_then(|(_, r)| r.split('/').next()?.rsplit_once('@')?.0.split_once(':').map(|(_, p)| p));
        match secret {
            Some(p) if !p.is_empty() && text.contains(p) => "not a Postgres URL".to_owned(),
            _ => format!("not a Postgres URL: {text}"),
        }
    })?;
    Ok(match password {
        Some(p) => opts.password(p),
        None => opts,
    })
}

/// Checks that the URL parses and that the TLS files it names can be read (at startup, before
/// any connection is tried).
pub fn check(url: &str, password: Option<&str>) -> Result<(), String> {
    options(url, password)?;
    let query = url.split_once('?').map_or("", |(_, q)| q);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let file = ["sslrootcert", "ssl-root-cert", "ssl-ca", "sslcert", "ssl-cert", "sslkey", "ssl-key"].contains(&k);
        if file && let Err(e) = std::fs::File::open(v) {
            return Err(format!("{k}: cannot read {v}: {e}"));
        }
    }
    Ok(())
}

/// A pool of connections to the event log's database.
#[derive(Clone)]
pub struct EventLog {
    pool: PgPool,
}

impl EventLog {
    /// Connects, creating the database when it does not exist yet.
    pub async fn connect(url: &str) -> Result<EventLog, LogError> {
        Self::connect_with(url, 8).await
    }

    /// Connects with a pool of at most `max_connections`.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<EventLog, LogError> {
        Self::connect_options(PgConnectOptions::from_str(url).map_err(LogError::Url)?, max_connections).await
    }

    /// Connects with these options (see [`options`]) and a pool of at most `max_connections`.
    pub async fn connect_options(opts: PgConnectOptions, max_connections: u32) -> Result<EventLog, LogError> {
        let opts = opts
            .application_name("sidebus")
            // No NOTICEs (`relation … already exists, skipping` at every start's migration).
            .options([("statement_timeout", STATEMENT_TIMEOUT), ("client_min_messages", "warning")]);
        let pool = || PgPoolOptions::new().max_connections(max_connections).min_connections(0).acquire_timeout(Duration::from_secs(5));
        match pool().connect_with(opts.clone()).await {
            Ok(pool) => Ok(EventLog { pool }),
            // 3D000: invalid_catalog_name, the database does not exist.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                let name = opts.get_database().unwrap_or("sidebus").to_owned();
                let admin = pool().max_connections(1).connect_with(opts.clone().database("postgres")).await.map_err(LogError::Connect)?;
                let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
                match sqlx::query(&create).execute(&admin).await {
                    Ok(_) => tracing::info!(database = %name, "created the database"),
                    // 42P04: duplicate_database, another daemon created it first.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                    Err(source) => return Err(LogError::CreateDatabase { name, source }),
                }
                admin.close().await;
                Ok(EventLog { pool: pool().connect_with(opts).await.map_err(LogError::Connect)? })
            }
            Err(e) => Err(LogError::Connect(e)),
        }
    }

    /// Applies the embedded migrations.
    pub async fn migrate(&self) -> Result<(), LogError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// Round trip, for health checks.
    pub async fn ping(&self) -> Result<(), LogError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(query("ping"))?;
        Ok(())
    }

    /// Runs an UPDATE meant to change one row: false when no row matched (the row is gone, or
    /// no longer in the state the statement's WHERE asks for).
    pub(crate) async fn one_row(
        &self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        op: &'static str,
    ) -> Result<bool, LogError> {
        Ok(q.execute(&self.pool).await.map_err(query(op))?.rows_affected() == 1)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
