//! The schema registry: versioned JSON Schemas per event type, kept in Postgres (the
//! `schema_types` and `schemas` tables), compiled once per version and held in memory by every
//! daemon, which validates each publish against them.
//!
//! How every daemon stays current: a task listens on the `sidebus_schemas` channel (a trigger
//! notifies on every new version or setting), reloads the type named, and reloads everything
//! when its listening connection was lost (notifications may have been missed then) and every
//! [`REFRESH`] as a fallback. What it loaded is also written to `data_dir/schemas.json`, so a
//! daemon restarted while Postgres is away validates with what it knew. A publish pinned to a
//! version this daemon has not seen asks Postgres before answering `unknown_version`.
//!
//! Invariant: the publish path takes a read lock for a map lookup and an `Arc` clone; the
//! conversion to JSON and the validation run outside the lock.

mod compat;
mod dir;
mod json;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use sidebus_protocol::schema::{Compatibility, RegisterSchema, SchemaInfo, SchemaList, SchemaRegistered, SchemaSummary};
use tokio_util::sync::CancellationToken;

pub use compat::{Names, reader_refusals};
pub use dir::{DirError, DirProblem, DirSchema, read_dir};
pub use json::{MAX_DEPTH, NotJson, to_json, to_msgpack};

use crate::backend::Backends;
use crate::backend::pg::LogError;
use crate::backend::pg::{EventLog, SchemaHistory, SchemaRow};
use crate::config::UnknownTypes;
use crate::lock::{read, write};

/// How often every daemon reloads every schema, in case a notification was lost.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Most violations listed in one `validation_failed` reply.
const MAX_VIOLATIONS: usize = 64;

/// Why the registry refused a publish, a lookup or a registration.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// `unknown_types = "reject"` and the type has no schema.
    #[error("type `{0}` has no registered schema, and this daemon rejects unknown types")]
    UnknownType(String),
    /// `data` does not match the schema.
    #[error("data does not match version {version} of the schema of `{event_type}` ({n} violation{s})", n = violations.len(), s = if violations.len() == 1 { "" } else { "s" })]
    Invalid {
        /// The type.
        event_type: String,
        /// The version checked against.
        version: u32,
        /// One per violation (at most [`MAX_VIOLATIONS`]).
        violations: Vec<Violation>,
    },
    /// The type has no such version.
    #[error("type `{event_type}` has no schema version {version}")]
    UnknownVersion {
        /// The type.
        event_type: String,
        /// The version asked for.
        version: u64,
    },
    /// The type has no schema at all.
    #[error("type `{0}` has no registered schema")]
    NoSchema(String),
    /// The document is not a JSON Schema this daemon can use.
    #[error("the schema is not a valid JSON Schema: {0}")]
    BadSchema(String),
    /// The schema breaks the type's compatibility mode.
    #[error("the schema breaks the `{mode}` compatibility of `{event_type}` ({n} breaking change{s})", n = reasons.len(), s = if reasons.len() == 1 { "" } else { "s" })]
    Incompatible {
        /// The type.
        event_type: String,
        /// The mode it breaks.
        mode: String,
        /// One per breaking change.
        reasons: Vec<String>,
    },
    /// The log could not be reached.
    #[error("the schema registry is unreachable: {0}")]
    Unreachable(#[from] LogError),
    /// The log did not answer in time.
    #[error("the schema registry did not answer in time")]
    Timeout,
}

/// One place in `data` where it breaks the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A JSON pointer into `data` (`""` for `data` itself).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// One compiled version of a type's schema.
pub struct Compiled {
    /// The version.
    pub version: u32,
    /// The schema as registered.
    pub schema: Value,
    validator: jsonschema::Validator,
}

impl Compiled {
    /// Compiles `schema`: draft 2020-12 unless `$schema` names another draft; a schema that is
    /// not valid JSON Schema, or that names a draft or a remote document this daemon cannot
    /// load, is an error for people.
    pub fn new(version: u32, schema: Value) -> Result<Compiled, SchemaError> {
        if let Some(uri) = schema.get("$schema") {
            let known = uri
                .as_str()
                .is_some_and(|u| jsonschema::Draft::default().detect(&serde_json::json!({ "$schema": u })) != jsonschema::Draft::Unknown);
            if !known {
                return Err(SchemaError::BadSchema(format!(
                    "$schema {uri} is not a JSON Schema draft this daemon knows (4, 6, 7, 2019-09, 2020-12)"
                )));
            }
        }
        let validator = jsonschema::options().build(&schema).map_err(|e| {
            let at = e.instance_path().as_str();
            SchemaError::BadSchema(if at.is_empty() { e.to_string() } else { format!("at {at}: {e}") })
        })?;
        Ok(Compiled { version, schema, validator })
    }

    /// Checks `data` (one MessagePack value); the violations, with JSON pointers into it.
    pub fn check(&self, data: &[u8]) -> Result<(), Vec<Violation>> {
        let value = to_json(data).map_err(|e| vec![Violation { path: e.path, message: e.problem }])?;
        self.check_json(&value)
    }

    /// Checks a value already in JSON.
    pub fn check_json(&self, value: &Value) -> Result<(), Vec<Violation>> {
        if self.validator.is_valid(value) {
            return Ok(());
        }
        Err(self
            .validator
            .iter_errors(value)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation { path: e.instance_path().as_str().to_owned(), message: e.to_string() })
            .collect())
    }
}

/// A type's versions and settings as this daemon knows them.
#[derive(Clone)]
struct TypeSchemas {
    versions: BTreeMap<u32, Arc<Compiled>>,
    compatibility: Compatibility,
    strict: bool,
}

/// The registry of one daemon.
pub struct Registry {
    types: RwLock<HashMap<String, TypeSchemas>>,
    unknown_types: UnknownTypes,
    cache_file: PathBuf,
}

/// What validating a publish found.
pub enum Checked {
    /// Valid against this version (None: the type has no schema).
    Valid(Option<u32>),
    /// The version asked for is not known here; ask Postgres, then check again.
    Missing,
}

impl Registry {
    /// A registry holding what `data_dir/schemas.json` kept from the last run.
    pub fn open(data_dir: &Path, unknown_types: UnknownTypes) -> Registry {
        let r = Registry { types: RwLock::new(HashMap::new()), unknown_types, cache_file: data_dir.join("schemas.json") };
        match std::fs::read(&r.cache_file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<CachedRow>>(&bytes) {
                Ok(rows) => {
                    let n = rows.len();
                    r.replace(None, rows.into_iter().map(CachedRow::into_row).collect());
                    tracing::info!(versions = n, "schemas loaded from the local cache");
                }
                Err(e) => {
                    tracing::warn!(file = %r.cache_file.display(), error = %e, "the schema cache is unreadable; waiting for Postgres")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %r.cache_file.display(), error = %e, "cannot read the schema cache"),
        }
        r
    }

    /// Validates a publish's `data` against `version` of `event_type` (default: the latest).
    pub fn check(&self, event_type: &str, version: Option<u64>, data: &[u8]) -> Result<Checked, SchemaError> {
        let compiled = {
            let types = read(&self.types);
            match types.get(event_type) {
                None => {
                    if version.is_some() {
                        return Ok(Checked::Missing);
                    }
                    if self.unknown_types == UnknownTypes::Reject {
                        return Err(SchemaError::UnknownType(event_type.to_owned()));
                    }
                    return Ok(Checked::Valid(None));
                }
                Some(t) => match version {
                    None => t.versions.values().next_back().cloned(),
                    Some(v) => match t.versions.get(&(v as u32)) {
                        Some(c) => Some(c.clone()),
                        None => return Ok(Checked::Missing),
                    },
                },
            }
        };
        let Some(compiled) = compiled else { return Ok(Checked::Valid(None)) };
        compiled.check(data).map_err(|violations| SchemaError::Invalid {
            event_type: event_type.to_owned(),
            version: compiled.version,
            violations,
        })?;
        Ok(Checked::Valid(Some(compiled.version)))
    }

    /// After [`Checked::Missing`]: the answer once Postgres was asked about the type.
    pub async fn check_after_load(
        &self,
        log: Option<&EventLog>,
        event_type: &str,
        version: Option<u64>,
        data: &[u8],
    ) -> Result<Option<u32>, SchemaError> {
        if let Some(log) = log {
            self.load(log, Some(event_type)).await.ok();
        }
        match self.check(event_type, version, data)? {
            Checked::Valid(v) => Ok(v),
            Checked::Missing => {
                Err(SchemaError::UnknownVersion { event_type: event_type.to_owned(), version: version.unwrap_or_default() })
            }
        }
    }

    /// Loads every schema (or one type's) from the log into memory, and writes the cache file.
    pub async fn load(&self, log: &EventLog, event_type: Option<&str>) -> Result<(), LogError> {
        let rows = log.schema_rows(event_type).await?;
        self.replace(event_type, rows);
        self.save();
        Ok(())
    }

    /// Replaces everything known with `rows` (for benchmarks and tests without Postgres).
    pub fn preload(&self, rows: Vec<SchemaRow>) {
        self.replace(None, rows);
    }

    /// Replaces what is known (of one type, or all) with `rows`.
    fn replace(&self, event_type: Option<&str>, rows: Vec<SchemaRow>) {
        let mut fresh: HashMap<String, TypeSchemas> = HashMap::new();
        {
            // Versions never change: keep what is compiled already.
            let known = read(&self.types);
            for r in rows {
                let Ok(version) = u32::try_from(r.version) else { continue };
                let compiled = match known.get(&r.event_type).and_then(|t| t.versions.get(&version)) {
                    Some(c) if c.schema == r.schema => c.clone(),
                    _ => match Compiled::new(version, r.schema) {
                        Ok(c) => Arc::new(c),
                        Err(e) => {
                            tracing::error!(r#type = %r.event_type, version, error = %e, "a stored schema does not compile; it is skipped");
                            continue;
                        }
                    },
                };
                let entry = fresh.entry(r.event_type).or_insert_with(|| TypeSchemas {
                    versions: BTreeMap::new(),
                    compatibility: Compatibility::parse(&r.compatibility).unwrap_or_default(),
                    strict: r.strict,
                });
                entry.versions.insert(version, compiled);
            }
        }
        let mut types = write(&self.types);
        match event_type {
            Some(t) => match fresh.remove(t) {
                Some(s) => {
                    types.insert(t.to_owned(), s);
                }
                None => {
                    types.remove(t);
                }
            },
            None => *types = fresh,
        }
    }

    fn save(&self) {
        let rows: Vec<CachedRow> = {
            let types = read(&self.types);
            types
                .iter()
                .flat_map(|(t, s)| {
                    s.versions.values().map(move |c| CachedRow {
                        event_type: t.clone(),
                        version: c.version as i32,
                        schema: c.schema.clone(),
                        compatibility: s.compatibility.as_str().to_owned(),
                        strict: s.strict,
                    })
                })
                .collect()
        };
        let tmp = self.cache_file.with_extension("json.tmp");
        let written = serde_json::to_vec(&rows)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.cache_file));
        if let Err(e) = written {
            tracing::warn!(file = %self.cache_file.display(), error = %e, "could not write the schema cache");
        }
    }

    /// `get_schema`: from memory, or from the log when this daemon does not know it.
    pub async fn get(&self, log: Option<&EventLog>, event_type: &str, version: Option<u64>) -> Result<SchemaInfo, SchemaError> {
        if let Some(info) = self.lookup(event_type, version) {
            return Ok(info);
        }
        if let Some(log) = log {
            self.load(log, Some(event_type)).await?;
        }
        self.lookup(event_type, version).ok_or_else(|| {
            let known = read(&self.types).contains_key(event_type);
            match version {
                Some(v) if known => SchemaError::UnknownVersion { event_type: event_type.to_owned(), version: v },
                _ => SchemaError::NoSchema(event_type.to_owned()),
            }
        })
    }

    fn lookup(&self, event_type: &str, version: Option<u64>) -> Option<SchemaInfo> {
        let types = read(&self.types);
        let t = types.get(event_type)?;
        let c = match version {
            None => t.versions.values().next_back()?,
            Some(v) => t.versions.get(&u32::try_from(v).ok()?)?,
        };
        Some(SchemaInfo {
            event_type: event_type.to_owned(),
            version: u64::from(c.version),
            schema: to_msgpack(&c.schema).into(),
            compatibility: t.compatibility,
            strict: t.strict,
        })
    }

    /// `list_schemas`.
    pub fn list(&self) -> SchemaList {
        let types = read(&self.types);
        let mut out: Vec<SchemaSummary> = types
            .iter()
            .filter_map(|(t, s)| {
                Some(SchemaSummary {
                    event_type: t.clone(),
                    latest: u64::from(*s.versions.keys().next_back()?),
                    compatibility: s.compatibility,
                })
            })
            .collect();
        out.sort_by(|a, b| a.event_type.cmp(&b.event_type));
        SchemaList { types: out }
    }

    /// `register_schema`: checks the schema, then stores it as the type's next version unless
    /// the latest is identical, refusing it when it breaks the type's compatibility mode.
    pub async fn register(&self, log: &EventLog, r: &RegisterSchema) -> Result<SchemaRegistered, SchemaError> {
        let schema = to_json(&r.schema)
            .map_err(|e| SchemaError::BadSchema(format!("at {}: {}", if e.path.is_empty() { "/" } else { &e.path }, e.problem)))?;
        Compiled::new(0, schema.clone())?;
        let outcome = log
            .register_schema(&r.event_type, r.compatibility.map(Compatibility::as_str), r.strict, r.dry_run, |h| decide(h, &schema))
            .await?;
        match outcome {
            Ok((version, created)) => {
                if !r.dry_run {
                    self.load(log, Some(&r.event_type)).await.ok();
                    if created {
                        tracing::info!(r#type = %r.event_type, version, "schema registered");
                    }
                }
                Ok(SchemaRegistered { event_type: r.event_type.clone(), version: version as u64, created })
            }
            Err((mode, reasons)) => {
                Err(SchemaError::Incompatible { event_type: r.event_type.clone(), mode: mode.as_str().to_owned(), reasons })
            }
        }
    }

    /// Registers the schemas of `schemas_dir` (see [`read_dir`]) once Postgres answers.
    pub async fn register_dir(&self, backends: &Backends, files: Vec<DirSchema>, stop: CancellationToken) {
        let log = tokio::select! {
            l = backends.log.get() => l,
            _ = stop.cancelled() => return,
        };
        // Numbered files are compared with what Postgres holds, not with a stale cache.
        while let Err(e) = self.load(&log, None).await {
            tracing::warn!(error = %e, "schemas_dir: cannot load the registered schemas; retrying");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
        for f in files {
            let r = RegisterSchema {
                event_type: f.event_type.clone(),
                schema: to_msgpack(&f.schema).into(),
                compatibility: None,
                strict: None,
                dry_run: false,
            };
            if let Some(want) = f.version {
                // A numbered file: it must be that version, or the next one.
                if let Some(existing) = self.lookup(&f.event_type, Some(u64::from(want))) {
                    if to_json(&existing.schema).ok().as_ref() != Some(&f.schema) {
                        tracing::error!(file = %f.path.display(), version = want, "schemas_dir: version {want} of `{}` is registered with a different schema; the file is ignored", f.event_type);
                    }
                    continue;
                }
                let latest = self.lookup(&f.event_type, None).map_or(0, |i| i.version);
                if u64::from(want) != latest + 1 {
                    tracing::error!(file = %f.path.display(), latest, "schemas_dir: `{}` is at version {latest}, so this file cannot be version {want}; it is ignored", f.event_type);
                    continue;
                }
            }
            match self.register(&log, &r).await {
                Ok(done) if done.created => tracing::info!(file = %f.path.display(), version = done.version, "schemas_dir: registered"),
                Ok(_) => {}
                Err(e) => tracing::error!(file = %f.path.display(), error = ?e, "schemas_dir: {e}"),
            }
        }
        tracing::info!("schemas_dir: every file checked against the registry");
    }
}

/// The decision of a registration (see `EventLog::register_schema`).
/// The refusal: the mode in force and one reason per breaking change.
fn decide(h: &SchemaHistory, new: &Value) -> Result<Option<Value>, (Compatibility, Vec<String>)> {
    if h.versions.last().is_some_and(|(_, latest)| latest == new) {
        return Ok(None);
    }
    let mode = Compatibility::parse(&h.compatibility).unwrap_or_default();
    let against: Vec<&(i32, Value)> = match h.versions.last() {
        None => vec![],
        Some(latest) if !mode.transitive() => vec![latest],
        Some(_) => h.versions.iter().collect(),
    };
    let mut reasons = Vec::new();
    for (version, old) in against {
        let old_name = format!("version {version}");
        if mode.backward() {
            reasons.extend(reader_refusals(new, old, h.strict, Names { reader: "the new schema", writer: &old_name }));
        }
        if mode.forward() {
            reasons.extend(reader_refusals(old, new, h.strict, Names { reader: &old_name, writer: "the new schema" }));
        }
    }
    if reasons.is_empty() { Ok(Some(new.clone())) } else { Err((mode, reasons)) }
}

/// Keeps the registry current until `stop`: listens for changes, reloads on a lost connection
/// and every [`REFRESH`].
pub async fn watch(registry: Arc<Registry>, backends: Arc<Backends>, stop: CancellationToken) {
    let log = tokio::select! {
        l = backends.log.get() => l,
        _ = stop.cancelled() => return,
    };
    let mut failures = 0u32;
    loop {
        let mut listener = match log.schema_listener().await {
            Ok(l) => l,
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "cannot listen for schema changes; retrying (validating with the schemas known)");
                }
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500) * failures.min(10)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        failures = 0;
        // Listening first, then loading: a change in between is both loaded and notified.
        if let Err(e) = registry.load(&log, None).await {
            tracing::warn!(error = %e, "loading the schemas failed");
        }
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.tick().await;
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => {
                        if let Err(e) = registry.load(&log, Some(n.payload())).await {
                            tracing::warn!(r#type = n.payload(), error = %e, "reloading a type's schemas failed");
                        }
                    }
                    // The connection was lost (and is reopened by the next call): notifications
                    // may have been missed.
                    Ok(None) => {
                        if let Err(e) = registry.load(&log, None).await {
                            tracing::debug!(error = %e, "reloading the schemas failed");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the schema listener failed; reconnecting");
                        break;
                    }
                },
                _ = refresh.tick() => {
                    if let Err(e) = registry.load(&log, None).await {
                        tracing::debug!(error = %e, "refreshing the schemas failed");
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// A row of the cache file.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedRow {
    #[serde(rename = "type")]
    event_type: String,
    version: i32,
    schema: Value,
    compatibility: String,
    strict: bool,
}

impl CachedRow {
    fn into_row(self) -> SchemaRow {
        SchemaRow {
            event_type: self.event_type,
            version: self.version,
            schema: self.schema,
            compatibility: self.compatibility,
            strict: self.strict,
        }
    }
}
