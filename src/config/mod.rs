//! The daemon's configuration: a TOML file, overridden by `SIDEBUS_*` environment variables,
//! overridden by flags. Every key is a named constant below; every value is checked at start-up
//! and a bad one stops the daemon with one line naming the key (exit code 78, EX_CONFIG).
//! Secrets can also come from files and systemd credentials (`secrets`); who may use the socket
//! is the `[[access]]` list (`access`).

pub mod access;
pub mod secrets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sidebus_protocol::names;

use self::access::{AccessDecl, LiveAccess, Names};
use self::secrets::Secret;
use sidebus_protocol::request::{ACK_TIMEOUT_MS_RANGE, MAX_ATTEMPTS, MAX_IN_FLIGHT};

/// The exit code for an invalid configuration (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;

/// Config keys, as written in the file; the environment variable is `SIDEBUS_` + the key in
/// upper case, the flag `--` + the key with `-` for `_`.
pub mod key {
    /// Path of the Unix socket clients connect to.
    pub const SOCKET: &str = "socket";
    /// Permissions of the socket file, in octal (`660`: owner and group may connect).
    pub const SOCKET_MODE: &str = "socket_mode";
    /// Group of the socket file (a name or a number); default: the daemon's group.
    pub const SOCKET_GROUP: &str = "socket_group";
    /// Redis URL (`redis://host:port/db`, `rediss://`, `redis+sentinel://h1:p1,h2:p2/service`).
    pub const REDIS_URL: &str = "redis_url";
    /// A file holding the Redis URL.
    pub const REDIS_URL_FILE: &str = "redis_url_file";
    /// Redis password, in place of the URL's.
    pub const REDIS_PASSWORD: &str = "redis_password";
    /// A file holding the Redis password.
    pub const REDIS_PASSWORD_FILE: &str = "redis_password_file";
    /// Password of the Sentinels (the URL's password is the Redis servers').
    pub const REDIS_SENTINEL_PASSWORD: &str = "redis_sentinel_password";
    /// A file holding the Sentinels' password.
    pub const REDIS_SENTINEL_PASSWORD_FILE: &str = "redis_sentinel_password_file";
    /// PEM file of the CA that signed Redis's certificate (default: the system's roots).
    pub const REDIS_TLS_CA: &str = "redis_tls_ca";
    /// PEM file of the client certificate shown to Redis.
    pub const REDIS_TLS_CERT: &str = "redis_tls_cert";
    /// PEM file of the client certificate's private key.
    pub const REDIS_TLS_KEY: &str = "redis_tls_key";
    /// Postgres URL.
    pub const DATABASE_URL: &str = "database_url";
    /// A file holding the Postgres URL.
    pub const DATABASE_URL_FILE: &str = "database_url_file";
    /// Postgres password, in place of the URL's.
    pub const DATABASE_PASSWORD: &str = "database_password";
    /// A file holding the Postgres password.
    pub const DATABASE_PASSWORD_FILE: &str = "database_password_file";
    /// Directory for the daemon's local state.
    pub const DATA_DIR: &str = "data_dir";
    /// Most bytes of publishes in the local spool not yet flushed; past it, `backpressure`.
    pub const SPOOL_MAX_BYTES: &str = "spool_max_bytes";
    /// Prefix of every Redis key.
    pub const NAMESPACE: &str = "namespace";
    /// This daemon's name in `hello` replies and Redis consumer names (default: the host name).
    pub const NODE: &str = "node";
    /// Largest frame body, in bytes.
    pub const MAX_FRAME_BYTES: &str = "max_frame_bytes";
    /// Most client connections at once.
    pub const MAX_CONNECTIONS: &str = "max_connections";
    /// Most connections of one user (uid) at once.
    pub const MAX_CONNECTIONS_PER_UID: &str = "max_connections_per_uid";
    /// Default `max_attempts` of a subscription.
    pub const MAX_ATTEMPTS: &str = "max_attempts";
    /// First retry delay, in milliseconds.
    pub const BACKOFF_INITIAL_MS: &str = "backoff_initial_ms";
    /// Growth of the retry delay per attempt.
    pub const BACKOFF_FACTOR: &str = "backoff_factor";
    /// Longest retry delay, in milliseconds.
    pub const BACKOFF_MAX_MS: &str = "backoff_max_ms";
    /// Default `ack_timeout_ms` of a subscription.
    pub const ACK_TIMEOUT_MS: &str = "ack_timeout_ms";
    /// Default `max_in_flight` of a subscription.
    pub const MAX_IN_FLIGHT: &str = "max_in_flight";
    /// Sum of `max_in_flight` over the subscriptions of one connection, at most.
    pub const MAX_IN_FLIGHT_PER_CONNECTION: &str = "max_in_flight_per_connection";
    /// Parallel publish lanes (one Postgres connection each); a connection's publishes always
    /// take the same lane.
    pub const PUBLISH_WRITERS: &str = "publish_writers";
    /// How long a publish may wait to become durable before it is answered `unavailable`.
    pub const PUBLISH_TIMEOUT_MS: &str = "publish_timeout_ms";
    /// How long shutdown waits for in-flight work.
    pub const SHUTDOWN_GRACE_MS: &str = "shutdown_grace_ms";
    /// Log filter (`info`, `sidebus=debug`, …).
    pub const LOG_LEVEL: &str = "log_level";
    /// `text` or `json`.
    pub const LOG_FORMAT: &str = "log_format";
    /// `host:port` (or a port, on loopback) of the HTTP listener for `/metrics`, `/healthz` and
    /// `/readyz`; off when absent.
    pub const METRICS_ADDR: &str = "metrics_addr";
    /// Directory of JSON Schemas registered at start-up: `<type>/<version>.json` or `<type>.json`.
    pub const SCHEMAS_DIR: &str = "schemas_dir";
    /// `allow` (default): a type without a schema is published unvalidated; `reject`: refused.
    pub const UNKNOWN_TYPES: &str = "unknown_types";
    /// A group without subscriptions and without activity for this long (`30s`, `10m`, `2h`,
    /// `7d`; a bare number is seconds) is deleted by the janitor; off when absent.
    pub const GROUP_IDLE_TTL: &str = "group_idle_ttl";
    /// Consumer groups to create at start-up (`[[groups]]` tables with `type` and `name`).
    pub const GROUPS: &str = "groups";
    /// Who may do what through the socket (`[[access]]` tables; see `config::access`).
    pub const ACCESS: &str = "access";
}

/// Why the configuration is unusable. The display is the one line printed before exit 78.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, with the key.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid config: {key}: {problem}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// A URL's scheme is one the driver takes. The drivers parse the rest when the daemon starts
/// (`backend::check_urls`): this module knows no driver.
fn check_scheme(key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    match url.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(()),
        _ => Err(invalid(key, format!("must be a URL starting with {}://", schemes.join("://, ")))),
    }
}

/// A TOML error with the line and column it is at.
fn located(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// Where the daemon listens unless told otherwise (its directory is the only one it creates).
pub const DEFAULT_SOCKET: &str = "/run/sidebus/sidebus.sock";

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), problem: problem.into() }
}

/// A consumer group declared in the config, created at start-up so events wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDecl {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The group.
    pub name: String,
}

/// Retry delays: attempt n+1 waits `min(max, initial * factor^(n-1))`, ±20 % jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// The longest delay.
    pub max: Duration,
}

/// What a publish of a type without a schema gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownTypes {
    /// Published unvalidated.
    Allow,
    /// Refused with `not_found`.
    Reject,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Files for TLS to Redis (`rediss://`); each `None` when not set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// See [`key::REDIS_TLS_CA`].
    pub ca: Option<PathBuf>,
    /// See [`key::REDIS_TLS_CERT`].
    pub cert: Option<PathBuf>,
    /// See [`key::REDIS_TLS_KEY`].
    pub key: Option<PathBuf>,
}

/// The checked configuration of a daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`key::SOCKET`].
    pub socket: PathBuf,
    /// See [`key::SOCKET_MODE`].
    pub socket_mode: u32,
    /// See [`key::SOCKET_GROUP`]: the group id.
    pub socket_group: Option<u32>,
    /// See [`key::REDIS_URL`].
    pub redis_url: String,
    /// See [`key::REDIS_PASSWORD`].
    pub redis_password: Option<Secret>,
    /// See [`key::REDIS_SENTINEL_PASSWORD`].
    pub redis_sentinel_password: Option<Secret>,
    /// See [`key::REDIS_TLS_CA`] and the next two.
    pub redis_tls: RedisTls,
    /// See [`key::DATABASE_URL`].
    pub database_url: String,
    /// See [`key::DATABASE_PASSWORD`].
    pub database_password: Option<Secret>,
    /// See [`key::DATA_DIR`].
    pub data_dir: PathBuf,
    /// See [`key::SPOOL_MAX_BYTES`].
    pub spool_max_bytes: u64,
    /// See [`key::NAMESPACE`].
    pub namespace: String,
    /// See [`key::NODE`].
    pub node: String,
    /// See [`key::MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// See [`key::MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`key::MAX_CONNECTIONS_PER_UID`] (`max_connections` when not set).
    pub max_connections_per_uid: usize,
    /// See [`key::MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// See [`key::BACKOFF_INITIAL_MS`] and the next two.
    pub backoff: Backoff,
    /// See [`key::ACK_TIMEOUT_MS`].
    pub ack_timeout: Duration,
    /// See [`key::MAX_IN_FLIGHT`].
    pub max_in_flight: u32,
    /// See [`key::MAX_IN_FLIGHT_PER_CONNECTION`].
    pub max_in_flight_per_connection: u32,
    /// See [`key::PUBLISH_WRITERS`].
    pub publish_writers: usize,
    /// See [`key::PUBLISH_TIMEOUT_MS`].
    pub publish_timeout: Duration,
    /// See [`key::SHUTDOWN_GRACE_MS`].
    pub shutdown_grace: Duration,
    /// See [`key::LOG_LEVEL`].
    pub log_level: String,
    /// See [`key::LOG_FORMAT`].
    pub log_format: LogFormat,
    /// See [`key::METRICS_ADDR`].
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// See [`key::GROUP_IDLE_TTL`].
    pub group_idle_ttl: Option<Duration>,
    /// See [`key::SCHEMAS_DIR`].
    pub schemas_dir: Option<PathBuf>,
    /// See [`key::UNKNOWN_TYPES`].
    pub unknown_types: UnknownTypes,
    /// See [`key::GROUPS`].
    pub groups: Vec<GroupDecl>,
    /// See [`key::ACCESS`]: the list in force, shared by every clone (SIGHUP replaces it).
    pub access: LiveAccess,
}

/// The config file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<String>,
    socket_mode: Option<toml::Value>,
    socket_group: Option<toml::Value>,
    redis_url: Option<String>,
    redis_url_file: Option<String>,
    redis_password: Option<String>,
    redis_password_file: Option<String>,
    redis_sentinel_password: Option<String>,
    redis_sentinel_password_file: Option<String>,
    redis_tls_ca: Option<String>,
    redis_tls_cert: Option<String>,
    redis_tls_key: Option<String>,
    database_url: Option<String>,
    database_url_file: Option<String>,
    database_password: Option<String>,
    database_password_file: Option<String>,
    data_dir: Option<String>,
    spool_max_bytes: Option<toml::Value>,
    namespace: Option<String>,
    node: Option<String>,
    max_frame_bytes: Option<toml::Value>,
    max_connections: Option<toml::Value>,
    max_connections_per_uid: Option<toml::Value>,
    max_attempts: Option<toml::Value>,
    backoff_initial_ms: Option<toml::Value>,
    backoff_factor: Option<toml::Value>,
    backoff_max_ms: Option<toml::Value>,
    ack_timeout_ms: Option<toml::Value>,
    max_in_flight: Option<toml::Value>,
    max_in_flight_per_connection: Option<toml::Value>,
    publish_writers: Option<toml::Value>,
    publish_timeout_ms: Option<toml::Value>,
    shutdown_grace_ms: Option<toml::Value>,
    log_level: Option<String>,
    log_format: Option<String>,
    schemas_dir: Option<String>,
    unknown_types: Option<String>,
    metrics_addr: Option<toml::Value>,
    group_idle_ttl: Option<toml::Value>,
    #[serde(default)]
    groups: Vec<GroupDecl>,
    access: Option<Vec<AccessDecl>>,
}

/// What a config file holds besides its scalar keys.
#[derive(Default)]
struct Tables {
    groups: Vec<GroupDecl>,
    access: Option<Vec<AccessDecl>>,
}

impl FileConfig {
    /// The file's values as strings keyed by config key, so file, environment and flags go
    /// through one parser.
    fn into_map(self) -> (BTreeMap<&'static str, String>, Tables) {
        let mut m = BTreeMap::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k, v);
            }
        };
        let num = |v: Option<toml::Value>| {
            v.map(|v| match v {
                toml::Value::String(s) => s,
                other => other.to_string(),
            })
        };
        put(key::SOCKET, self.socket);
        put(key::SOCKET_MODE, num(self.socket_mode));
        put(key::SOCKET_GROUP, num(self.socket_group));
        put(key::REDIS_URL, self.redis_url);
        put(key::REDIS_URL_FILE, self.redis_url_file);
        put(key::REDIS_PASSWORD, self.redis_password);
        put(key::REDIS_PASSWORD_FILE, self.redis_password_file);
        put(key::REDIS_SENTINEL_PASSWORD, self.redis_sentinel_password);
        put(key::REDIS_SENTINEL_PASSWORD_FILE, self.redis_sentinel_password_file);
        put(key::REDIS_TLS_CA, self.redis_tls_ca);
        put(key::REDIS_TLS_CERT, self.redis_tls_cert);
        put(key::REDIS_TLS_KEY, self.redis_tls_key);
        put(key::DATABASE_URL, self.database_url);
        put(key::DATABASE_URL_FILE, self.database_url_file);
        put(key::DATABASE_PASSWORD, self.database_password);
        put(key::DATABASE_PASSWORD_FILE, self.database_password_file);
        put(key::DATA_DIR, self.data_dir);
        put(key::SPOOL_MAX_BYTES, num(self.spool_max_bytes));
        put(key::NAMESPACE, self.namespace);
        put(key::NODE, self.node);
        put(key::MAX_FRAME_BYTES, num(self.max_frame_bytes));
        put(key::MAX_CONNECTIONS, num(self.max_connections));
        put(key::MAX_CONNECTIONS_PER_UID, num(self.max_connections_per_uid));
        put(key::MAX_ATTEMPTS, num(self.max_attempts));
        put(key::BACKOFF_INITIAL_MS, num(self.backoff_initial_ms));
        put(key::BACKOFF_FACTOR, num(self.backoff_factor));
        put(key::BACKOFF_MAX_MS, num(self.backoff_max_ms));
        put(key::ACK_TIMEOUT_MS, num(self.ack_timeout_ms));
        put(key::MAX_IN_FLIGHT, num(self.max_in_flight));
        put(key::MAX_IN_FLIGHT_PER_CONNECTION, num(self.max_in_flight_per_connection));
        put(key::PUBLISH_WRITERS, num(self.publish_writers));
        put(key::PUBLISH_TIMEOUT_MS, num(self.publish_timeout_ms));
        put(key::SHUTDOWN_GRACE_MS, num(self.shutdown_grace_ms));
        put(key::LOG_LEVEL, self.log_level);
        put(key::LOG_FORMAT, self.log_format);
        put(key::SCHEMAS_DIR, self.schemas_dir);
        put(key::UNKNOWN_TYPES, self.unknown_types);
        put(key::METRICS_ADDR, num(self.metrics_addr));
        put(key::GROUP_IDLE_TTL, num(self.group_idle_ttl));
        (m, Tables { groups: self.groups, access: self.access })
    }
}

/// Every scalar key with a line of help, for the environment and for flags.
pub const SCALAR_KEYS: [(&str, &str); 39] = [
    (key::SOCKET, "Unix socket clients connect to [default: /run/sidebus/sidebus.sock]"),
    (key::SOCKET_MODE, "permissions of the socket file, octal [default: 660]"),
    (key::SOCKET_GROUP, "group of the socket file, a name or a number [default: the daemon's group]"),
    (key::REDIS_URL, "Redis URL: redis://, rediss:// (TLS), redis+sentinel://HOST:PORT,…/SERVICE [default: redis://127.0.0.1:6379]"),
    (key::REDIS_URL_FILE, "a file holding redis_url [default: none]"),
    (key::REDIS_PASSWORD, "Redis password, in place of the URL's [default: the URL's]"),
    (key::REDIS_PASSWORD_FILE, "a file holding redis_password [default: none]"),
    (key::REDIS_SENTINEL_PASSWORD, "the Sentinels' password (the URL's is the Redis servers') [default: none]"),
    (key::REDIS_SENTINEL_PASSWORD_FILE, "a file holding redis_sentinel_password [default: none]"),
    (key::REDIS_TLS_CA, "PEM file of the CA that signed Redis's certificate [default: the system's roots]"),
    (key::REDIS_TLS_CERT, "PEM file of a client certificate for Redis [default: none]"),
    (key::REDIS_TLS_KEY, "PEM file of the client certificate's key [default: none]"),
    (
        key::DATABASE_URL,
        "Postgres URL (sslmode=verify-full&sslrootcert=FILE for TLS); the database is created if missing [default: postgres://postgres@127.0.0.1:5432/sidebus]",
    ),
    (key::DATABASE_URL_FILE, "a file holding database_url [default: none]"),
    (key::DATABASE_PASSWORD, "Postgres password, in place of the URL's [default: the URL's]"),
    (key::DATABASE_PASSWORD_FILE, "a file holding database_password [default: none]"),
    (key::DATA_DIR, "directory for local state: the spool [default: /var/lib/sidebus]"),
    (key::SPOOL_MAX_BYTES, "most bytes of unflushed publishes in the spool, then `backpressure` [default: 1073741824]"),
    (key::NAMESPACE, "prefix of every Redis key [default: sidebus]"),
    (key::NODE, "this daemon's name [default: the host name]"),
    (key::MAX_FRAME_BYTES, "largest frame body in bytes [default: 1048576]"),
    (key::MAX_CONNECTIONS, "most client connections at once [default: 1024]"),
    (key::MAX_CONNECTIONS_PER_UID, "most connections of one user (uid) at once [default: max_connections]"),
    (key::MAX_ATTEMPTS, "default failed attempts before dead-lettering [default: 5]"),
    (key::BACKOFF_INITIAL_MS, "first retry delay [default: 500]"),
    (key::BACKOFF_FACTOR, "growth of the retry delay per attempt [default: 2]"),
    (key::BACKOFF_MAX_MS, "longest retry delay [default: 300000]"),
    (key::ACK_TIMEOUT_MS, "default lease of a delivery [default: 30000]"),
    (key::MAX_IN_FLIGHT, "default unacknowledged deliveries per subscription [default: 64]"),
    (key::MAX_IN_FLIGHT_PER_CONNECTION, "sum of max_in_flight over one connection's subscriptions [default: 4096]"),
    (key::PUBLISH_WRITERS, "parallel publish lanes, one Postgres connection each [default: 2]"),
    (key::PUBLISH_TIMEOUT_MS, "how long a publish waits to be durable before `unavailable` [default: 10000]"),
    (key::SHUTDOWN_GRACE_MS, "how long shutdown waits for in-flight work [default: 10000]"),
    (key::LOG_LEVEL, "log filter, e.g. info or sidebus=debug [default: $RUST_LOG, else info]"),
    (key::LOG_FORMAT, "text or json [default: text]"),
    (key::SCHEMAS_DIR, "directory of JSON Schemas to register at start-up: <type>/<version>.json or <type>.json [default: none]"),
    (key::UNKNOWN_TYPES, "allow or reject publishes of types without a schema [default: allow]"),
    (key::METRICS_ADDR, "HTTP listener for /metrics, /healthz, /readyz: host:port, or a port on 127.0.0.1 [default: off]"),
    (key::GROUP_IDLE_TTL, "delete a group without subscriptions or activity for this long: 30s, 10m, 2h, 7d [default: off]"),
];

/// The environment variable of a key.
pub fn env_var(key: &str) -> String {
    format!("SIDEBUS_{}", key.to_ascii_uppercase())
}

/// Where the values come from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// The config file, if any.
    pub file: Option<PathBuf>,
    /// `SIDEBUS_*` variables (key → value), usually from [`Sources::env`].
    pub env: BTreeMap<String, String>,
    /// Flags given on the command line (key → value).
    pub flags: BTreeMap<String, String>,
    /// systemd's `$CREDENTIALS_DIRECTORY`: secrets by key name (between the file and the
    /// environment).
    pub credentials: Option<PathBuf>,
}

impl Sources {
    /// The `SIDEBUS_*` variables of this process's environment.
    pub fn env() -> BTreeMap<String, String> {
        SCALAR_KEYS.iter().filter_map(|(k, _)| std::env::var(env_var(k)).ok().map(|v| ((*k).to_owned(), v))).collect()
    }
}

fn default_node() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_default();
    let cleaned: String =
        raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).take(names::MAX_NAME_BYTES).collect();
    if cleaned.is_empty() { "localhost".to_owned() } else { cleaned }
}

struct Lookup {
    values: BTreeMap<String, String>,
}

impl Lookup {
    fn get(&self, k: &str) -> Option<&str> {
        self.values.get(k).map(String::as_str)
    }

    fn string(&self, k: &str, default: &str) -> String {
        self.get(k).unwrap_or(default).to_owned()
    }

    fn num<T: FromStr + PartialOrd + std::fmt::Display + Copy>(&self, k: &str, default: T, lo: T, hi: T) -> Result<T, ConfigError> {
        let v = match self.get(k) {
            None => default,
            Some(s) => s.trim().parse::<T>().map_err(|_| invalid(k, format!("`{s}` is not a number")))?,
        };
        if v < lo || v > hi {
            return Err(invalid(k, format!("must be between {lo} and {hi}, got {v}")));
        }
        Ok(v)
    }

    fn ms(&self, k: &str, default: u64, lo: u64, hi: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.num(k, default, lo, hi)?))
    }
}

impl Config {
    /// Loads and checks the configuration from its sources.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let (file_values, tables) = match &sources.file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                let parsed: FileConfig =
                    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.clone(), message: located(&text, &e) })?;
                parsed.into_map()
            }
            None => (BTreeMap::new(), Tables::default()),
        };
        // Each source's `<key>_file`s are read into their keys before the sources are layered.
        let mut values: BTreeMap<String, String> = file_values.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        secrets::read_files(&mut values)?;
        if let Some(dir) = &sources.credentials {
            values.extend(secrets::credentials(dir)?);
        }
        for layer in [&sources.env, &sources.flags] {
            let mut layer = layer.clone();
            secrets::read_files(&mut layer)?;
            values.extend(layer);
        }
        Config::from_values(Lookup { values }, tables)
    }

    // Long because it is one list: every key parsed and checked in turn, in the order of the
    // key table.
    fn from_values(l: Lookup, tables: Tables) -> Result<Config, ConfigError> {
        let Tables { groups, access } = tables;
        let names = Names::system();
        let socket = PathBuf::from(l.string(key::SOCKET, DEFAULT_SOCKET));
        // sun_path holds 108 bytes including the terminating NUL.
        if socket.as_os_str().is_empty() || socket.as_os_str().len() > 107 {
            return Err(invalid(key::SOCKET, "must be a path of 1 to 107 bytes (the limit of a Unix socket address)"));
        }
        let socket_mode = u32::from_str_radix(l.get(key::SOCKET_MODE).unwrap_or("660").trim(), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| invalid(key::SOCKET_MODE, "must be permissions in octal, e.g. 660"))?;
        let socket_group = l
            .get(key::SOCKET_GROUP)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| names.group(key::SOCKET_GROUP, &toml::Value::String(s.to_owned())))
            .transpose()?;
        let redis_url = l.string(key::REDIS_URL, "redis://127.0.0.1:6379");
        check_scheme(key::REDIS_URL, &redis_url, &["redis", "rediss", "redis+unix", "unix", "redis+sentinel", "rediss+sentinel"])?;
        let database_url = l.string(key::DATABASE_URL, "postgres://postgres@127.0.0.1:5432/sidebus");
        check_scheme(key::DATABASE_URL, &database_url, &["postgres", "postgresql"])?;
        let secret = |k: &str| l.get(k).filter(|s| !s.is_empty()).map(Secret::new);
        let path = |k: &str| l.get(k).map(str::trim).filter(|s| !s.is_empty()).map(PathBuf::from);
        let redis_tls = RedisTls { ca: path(key::REDIS_TLS_CA), cert: path(key::REDIS_TLS_CERT), key: path(key::REDIS_TLS_KEY) };
        let tls_url = redis_url.starts_with("rediss://") || redis_url.starts_with("rediss+sentinel://");
        for (k, set) in [(key::REDIS_TLS_CA, &redis_tls.ca), (key::REDIS_TLS_CERT, &redis_tls.cert), (key::REDIS_TLS_KEY, &redis_tls.key)] {
            if set.is_some() && !tls_url {
                return Err(invalid(k, "redis_url does not use TLS: use rediss:// (or rediss+sentinel://)"));
            }
        }
        if redis_tls.cert.is_some() != redis_tls.key.is_some() {
            return Err(invalid(key::REDIS_TLS_KEY, "redis_tls_cert and redis_tls_key go together: set both or neither"));
        }
        let redis_sentinel_password = secret(key::REDIS_SENTINEL_PASSWORD);
        if redis_sentinel_password.is_some() && !redis_url.contains("+sentinel://") {
            return Err(invalid(key::REDIS_SENTINEL_PASSWORD, "redis_url names no Sentinels (redis+sentinel://…)"));
        }
        let data_dir = PathBuf::from(l.string(key::DATA_DIR, "/var/lib/sidebus"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid(key::DATA_DIR, "must not be empty"));
        }
        let namespace = l.string(key::NAMESPACE, "sidebus");
        if namespace.is_empty() || namespace.len() > 64 || !namespace.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(invalid(key::NAMESPACE, "must be 1 to 64 characters of A-Z a-z 0-9 . _ -"));
        }
        let node = l.get(key::NODE).map(str::to_owned).unwrap_or_else(default_node);
        names::check_group(key::NODE, &node).map_err(|e| invalid(key::NODE, e.problem))?;
        let backoff = Backoff {
            initial: l.ms(key::BACKOFF_INITIAL_MS, 500, 1, 3_600_000)?,
            factor: l.num(key::BACKOFF_FACTOR, 2.0, 1.0, 100.0)?,
            max: l.ms(key::BACKOFF_MAX_MS, 300_000, 1, 7 * 24 * 3_600_000)?,
        };
        if backoff.max < backoff.initial {
            return Err(invalid(key::BACKOFF_MAX_MS, format!("must be at least backoff_initial_ms ({} ms)", backoff.initial.as_millis())));
        }
        let log_format = match l.get(key::LOG_FORMAT).unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(key::LOG_FORMAT, format!("must be \"text\" or \"json\", got `{other}`")));
            }
        };
        // RUST_LOG, the Rust convention, when no source sets log_level.
        let (log_level, from) = match (l.get(key::LOG_LEVEL), std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty())) {
            (Some(v), _) => (v.to_owned(), key::LOG_LEVEL.to_owned()),
            (None, Some(v)) => (v, format!("{} (from RUST_LOG)", key::LOG_LEVEL)),
            (None, None) => ("info".to_owned(), key::LOG_LEVEL.to_owned()),
        };
        tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| invalid(&from, e.to_string()))?;
        for (i, g) in groups.iter().enumerate() {
            names::check_type("type", &g.event_type).map_err(|e| invalid(&format!("groups[{i}].type"), e.problem))?;
            names::check_group("name", &g.name).map_err(|e| invalid(&format!("groups[{i}].name"), e.problem))?;
        }
        let unknown_types = match l.get(key::UNKNOWN_TYPES).unwrap_or("allow") {
            "allow" => UnknownTypes::Allow,
            "reject" => UnknownTypes::Reject,
            other => return Err(invalid(key::UNKNOWN_TYPES, format!("must be \"allow\" or \"reject\", got `{other}`"))),
        };
        let metrics_addr = match l.get(key::METRICS_ADDR).map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(match s.parse::<u16>() {
                Ok(port) => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Err(_) => s.parse().map_err(|_| invalid(key::METRICS_ADDR, format!("`{s}` is neither host:port nor a port")))?,
            }),
        };
        let group_idle_ttl = match l.get(key::GROUP_IDLE_TTL).map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => {
                Some(duration(s).ok_or_else(|| invalid(key::GROUP_IDLE_TTL, format!("`{s}` is not a duration like 30s, 10m, 2h or 7d")))?)
            }
        };
        let schemas_dir = l.get(key::SCHEMAS_DIR).filter(|s| !s.is_empty()).map(PathBuf::from);
        if let Some(d) = &schemas_dir
            && !d.is_dir()
        {
            return Err(invalid(key::SCHEMAS_DIR, format!("{} is not a directory", d.display())));
        }
        let max_in_flight_per_connection = l.num(key::MAX_IN_FLIGHT_PER_CONNECTION, 4096, 1, 65_536)?;
        let max_connections = l.num(key::MAX_CONNECTIONS, 1024, 1, 65_536)?;
        let access = access.map(|decls| access::resolve(decls, &names)).transpose()?;
        Ok(Config {
            socket,
            socket_mode,
            socket_group,
            redis_url,
            redis_password: secret(key::REDIS_PASSWORD),
            redis_sentinel_password,
            redis_tls,
            database_url,
            database_password: secret(key::DATABASE_PASSWORD),
            data_dir,
            spool_max_bytes: l.num(key::SPOOL_MAX_BYTES, 1 << 30, 1 << 20, 1 << 44)?,
            namespace,
            node,
            max_frame_bytes: l.num(key::MAX_FRAME_BYTES, sidebus_protocol::DEFAULT_MAX_FRAME_BYTES, 1024, 64 << 20)?,
            max_connections,
            max_connections_per_uid: l.num(key::MAX_CONNECTIONS_PER_UID, max_connections, 1, 65_536)?,
            max_attempts: l.num(key::MAX_ATTEMPTS, 5, 1, MAX_ATTEMPTS as u32)?,
            backoff,
            ack_timeout: l.ms(key::ACK_TIMEOUT_MS, 30_000, ACK_TIMEOUT_MS_RANGE.0, ACK_TIMEOUT_MS_RANGE.1)?,
            max_in_flight: l.num(key::MAX_IN_FLIGHT, 64, 1, MAX_IN_FLIGHT as u32)?,
            max_in_flight_per_connection,
            publish_writers: l.num(key::PUBLISH_WRITERS, 2, 1, 32)?,
            publish_timeout: l.ms(key::PUBLISH_TIMEOUT_MS, 10_000, 10, 3_600_000)?,
            shutdown_grace: l.ms(key::SHUTDOWN_GRACE_MS, 10_000, 0, 3_600_000)?,
            log_level,
            log_format,
            metrics_addr,
            group_idle_ttl,
            schemas_dir,
            unknown_types,
            groups,
            access: LiveAccess::new(access),
        })
    }

    /// A configuration with every default, for tests and examples.
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::from_values(Lookup { values: BTreeMap::new() }, Tables::default())
    }

    /// The directory that holds the socket.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.socket.parent()
    }
}

/// A duration: a number with `ms`, `s`, `m`, `h` or `d` (a bare number is seconds); at least
/// one second, at most ten years.
fn duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    let d = Duration::from_millis(n.checked_mul(ms)?);
    (Duration::from_secs(1)..=Duration::from_secs(10 * 365 * 86_400)).contains(&d).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_idle_ttl_is_a_duration() {
        assert_eq!(duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(duration("45"), Some(Duration::from_secs(45)));
        assert_eq!(duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(duration("10x"), None);
        assert_eq!(duration("0s"), None);
        assert!(with(&[("group_idle_ttl", "2h")]).unwrap().group_idle_ttl == Some(Duration::from_secs(7200)));
        assert!(with(&[("group_idle_ttl", "soon")]).is_err());
        assert!(Config::defaults().unwrap().group_idle_ttl.is_none());
    }

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let flags = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::load(&Sources { flags, ..Sources::default() })
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/sidebus/sidebus.sock"));
        assert_eq!(c.namespace, "sidebus");
        assert_eq!(c.max_frame_bytes, 1 << 20);
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.backoff, Backoff { initial: Duration::from_millis(500), factor: 2.0, max: Duration::from_secs(300) });
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = with(&[(key::MAX_FRAME_BYTES, "12")]).unwrap_err().to_string();
        assert_eq!(e, "invalid config: max_frame_bytes: must be between 1024 and 67108864, got 12");
        let e = with(&[(key::MAX_ATTEMPTS, "five")]).unwrap_err().to_string();
        assert_eq!(e, "invalid config: max_attempts: `five` is not a number");
        let e = with(&[(key::REDIS_URL, "http://x")]).unwrap_err().to_string();
        assert!(e.starts_with("invalid config: redis_url: "), "{e}");
        let e = with(&[(key::BACKOFF_INITIAL_MS, "1000"), (key::BACKOFF_MAX_MS, "10")]).unwrap_err().to_string();
        assert!(e.starts_with("invalid config: backoff_max_ms: "), "{e}");
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sidebus.toml");
        std::fs::write(
            &file,
            "namespace = \"file\"\nnode = \"file\"\nmax_attempts = 3\n[[groups]]\ntype = \"order.created\"\nname = \"inventory\"\n",
        )
        .unwrap();
        let env = BTreeMap::from([("namespace".to_owned(), "env".to_owned()), ("node".to_owned(), "env".to_owned())]);
        let flags = BTreeMap::from([("namespace".to_owned(), "flag".to_owned())]);
        let c = Config::load(&Sources { file: Some(file), env, flags, credentials: None }).unwrap();
        assert_eq!((c.namespace.as_str(), c.node.as_str(), c.max_attempts), ("flag", "env", 3));
        assert_eq!(c.groups, vec![GroupDecl { event_type: "order.created".into(), name: "inventory".into() }]);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/sidebus.toml");
        let c = Config::load(&Sources { file: Some(file), ..Sources::default() }).unwrap();
        assert_eq!(c.groups.len(), 2);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.socket_mode, 0o660);
    }

    #[test]
    fn a_toml_syntax_error_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidebus.toml");
        std::fs::write(&path, "namespace = \"a\"\nnode = \"b\"\nmax_attempts = = 3\n").unwrap();
        let e = Config::load(&Sources { file: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("line 3, column"), "{e}");
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sidebus.toml");
        std::fs::write(&file, "max_atempts = 3\n").unwrap();
        let e = Config::load(&Sources { file: Some(file), ..Sources::default() }).unwrap_err().to_string();
        assert!(e.contains("max_atempts"), "{e}");
    }
}
