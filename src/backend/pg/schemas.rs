//! The schema registry's tables (`schema_types`, `schemas`; see migrations/0003_schemas.sql).

use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::types::Json;

use super::{EventLog, LogError, query};

/// The channel every daemon listens on; the payload is the type whose schemas changed.
pub const SCHEMAS_CHANNEL: &str = "sidebus_schemas";

/// One stored version of a type's schema, with the type's settings.
#[derive(Debug, Clone)]
pub struct SchemaRow {
    /// The type.
    pub event_type: String,
    /// The version.
    pub version: i32,
    /// The JSON Schema.
    pub schema: Value,
    /// The type's compatibility mode.
    pub compatibility: String,
    /// The type's reading of open content models.
    pub strict: bool,
}

/// What a registration sees of a type: its settings (as this registration sets them) and its
/// versions in order.
#[derive(Debug, Clone)]
pub struct SchemaHistory {
    /// The compatibility mode in force for this registration.
    pub compatibility: String,
    /// The strictness in force for this registration.
    pub strict: bool,
    /// Every version, oldest first.
    pub versions: Vec<(i32, Value)>,
}

type Row = (String, i32, Json<Value>, String, bool);

fn row((event_type, version, schema, compatibility, strict): Row) -> SchemaRow {
    SchemaRow { event_type, version, schema: schema.0, compatibility, strict }
}

impl EventLog {
    /// Every version of every type's schema (`event_type`: of that type only).
    pub async fn schema_rows(&self, event_type: Option<&str>) -> Result<Vec<SchemaRow>, LogError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT s.type, s.version, s.schema, t.compatibility, t.strict FROM schemas s JOIN schema_types t ON t.type = s.type \
             WHERE $1::text IS NULL OR s.type = $1 ORDER BY s.type, s.version",
        )
        .bind(event_type)
        .fetch_all(&self.pool)
        .await
        .map_err(query("load schemas"))?;
        Ok(rows.into_iter().map(row).collect())
    }

    /// Registers a schema for `event_type` in one transaction that holds the type's row, so
    /// two registrations of one type never race. `decide` sees the type's history with the
    /// settings this registration asks for, and answers `Ok(Some(schema))` to store it as the
    /// next version, `Ok(None)` when the latest version is already it, or its own refusal.
    /// With `dry_run` nothing is stored. Returns the version and whether it is new.
    pub async fn register_schema<E>(
        &self,
        event_type: &str,
        compatibility: Option<&str>,
        strict: Option<bool>,
        dry_run: bool,
        decide: impl FnOnce(&SchemaHistory) -> Result<Option<Value>, E>,
    ) -> Result<Result<(i32, bool), E>, LogError> {
        let q = || query("register schema");
        let mut tx = self.pool.begin().await.map_err(q())?;
        sqlx::query("INSERT INTO schema_types (type) VALUES ($1) ON CONFLICT (type) DO NOTHING")
            .bind(event_type)
            .execute(&mut *tx)
            .await
            .map_err(q())?;
        let (current, current_strict): (String, bool) =
            sqlx::query_as("SELECT compatibility, strict FROM schema_types WHERE type = $1 FOR UPDATE")
                .bind(event_type)
                .fetch_one(&mut *tx)
                .await
                .map_err(q())?;
        let versions: Vec<(i32, Json<Value>)> = sqlx::query_as("SELECT version, schema FROM schemas WHERE type = $1 ORDER BY version")
            .bind(event_type)
            .fetch_all(&mut *tx)
            .await
            .map_err(q())?;
        let history = SchemaHistory {
            compatibility: compatibility.map_or(current.clone(), str::to_owned),
            strict: strict.unwrap_or(current_strict),
            versions: versions.into_iter().map(|(v, s)| (v, s.0)).collect(),
        };
        let latest = history.versions.last().map_or(0, |v| v.0);
        let new = match decide(&history) {
            Ok(new) => new,
            Err(refusal) => return Ok(Err(refusal)),
        };
        if dry_run {
            return Ok(Ok(if new.is_some() { (latest + 1, true) } else { (latest, false) }));
        }
        if history.compatibility != current || history.strict != current_strict {
            sqlx::query("UPDATE schema_types SET compatibility = $2, strict = $3, updated_at = now() WHERE type = $1")
                .bind(event_type)
                .bind(&history.compatibility)
                .bind(history.strict)
                .execute(&mut *tx)
                .await
                .map_err(q())?;
        }
        let result = match new {
            Some(schema) => {
                // As text cast to json: sqlx sends `Json` as jsonb, which sorts the keys; the
                // registry gives the document back as it was registered.
                sqlx::query("INSERT INTO schemas (type, version, schema) VALUES ($1, $2, $3::json)")
                    .bind(event_type)
                    .bind(latest + 1)
                    .bind(schema.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(q())?;
                (latest + 1, true)
            }
            None => (latest, false),
        };
        tx.commit().await.map_err(q())?;
        Ok(Ok(result))
    }

    /// A listener on [`SCHEMAS_CHANNEL`], on a connection of its own.
    pub async fn schema_listener(&self) -> Result<PgListener, LogError> {
        let mut l = PgListener::connect_with(&self.pool).await.map_err(LogError::Connect)?;
        l.listen(SCHEMAS_CHANNEL).await.map_err(query("listen"))?;
        Ok(l)
    }
}
