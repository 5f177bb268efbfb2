//! The schema registry's requests and replies: `register_schema`, `get_schema`, `list_schemas`.

use bytes::Bytes;

use crate::msgpack::{FieldError, Fields, MapWriter};
use crate::reply::Body;

/// How a type's new schema versions must relate to earlier ones (the Confluent Schema
/// Registry's modes). `backward`: the new schema accepts every event the previous one accepted,
/// so consumers can upgrade first; `forward`: the previous schema accepts every event the new
/// one accepts, so producers can upgrade first; `full`: both. The `_transitive` variants check
/// against every earlier version instead of the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compatibility {
    /// Against the latest version: the new schema reads what the latest accepted.
    #[default]
    Backward,
    /// `backward` against every earlier version.
    BackwardTransitive,
    /// Against the latest version: the latest reads what the new schema accepts.
    Forward,
    /// `forward` against every earlier version.
    ForwardTransitive,
    /// `backward` and `forward` against the latest version.
    Full,
    /// `full` against every earlier version.
    FullTransitive,
    /// No check.
    None,
}

impl Compatibility {
    /// Every mode.
    pub const ALL: [Compatibility; 7] = [
        Compatibility::Backward,
        Compatibility::BackwardTransitive,
        Compatibility::Forward,
        Compatibility::ForwardTransitive,
        Compatibility::Full,
        Compatibility::FullTransitive,
        Compatibility::None,
    ];

    /// The value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::Backward => "backward",
            Compatibility::BackwardTransitive => "backward_transitive",
            Compatibility::Forward => "forward",
            Compatibility::ForwardTransitive => "forward_transitive",
            Compatibility::Full => "full",
            Compatibility::FullTransitive => "full_transitive",
            Compatibility::None => "none",
        }
    }

    /// The mode named by `s`.
    pub fn parse(s: &str) -> Option<Compatibility> {
        Compatibility::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The new schema must accept what earlier ones accepted.
    pub fn backward(self) -> bool {
        matches!(self, Compatibility::Backward | Compatibility::BackwardTransitive | Compatibility::Full | Compatibility::FullTransitive)
    }

    /// Earlier schemas must accept what the new one accepts.
    pub fn forward(self) -> bool {
        matches!(self, Compatibility::Forward | Compatibility::ForwardTransitive | Compatibility::Full | Compatibility::FullTransitive)
    }

    /// Checked against every earlier version, not only the latest.
    pub fn transitive(self) -> bool {
        matches!(self, Compatibility::BackwardTransitive | Compatibility::ForwardTransitive | Compatibility::FullTransitive)
    }

    pub(crate) fn read(f: &Fields, key: &str) -> Result<Option<Compatibility>, FieldError> {
        match f.opt_str(key)? {
            None => Ok(None),
            Some(s) => Compatibility::parse(s).map(Some).ok_or_else(|| {
                let all: Vec<&str> = Compatibility::ALL.iter().map(|c| c.as_str()).collect();
                FieldError::new(key, format!("must be one of {}", all.join(", ")))
            }),
        }
    }
}

impl std::fmt::Display for Compatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `register_schema`: a new version of a type's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterSchema {
    /// `type`.
    pub event_type: String,
    /// `schema`: the JSON Schema as a MessagePack map, kept as its bytes.
    pub schema: Bytes,
    /// `compatibility`: sets the type's mode (default: the type's current mode, `backward` for
    /// a new type).
    pub compatibility: Option<Compatibility>,
    /// `strict`: sets the type's reading of open content models (see SCHEMAS.md); default: the
    /// type's current setting, false for a new type.
    pub strict: Option<bool>,
    /// `dry_run`: only check; nothing is stored.
    pub dry_run: bool,
}

/// The reply to `register_schema`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaRegistered {
    /// `type`.
    pub event_type: String,
    /// `version`: the new version, or the latest when the schema is identical to it (or, with
    /// `dry_run`, the version it would get).
    pub version: u64,
    /// `created`: a new version was stored (or would be, with `dry_run`).
    pub created: bool,
}

impl Body for SchemaRegistered {
    fn write(&self, w: &mut MapWriter) {
        w.str("type", &self.event_type).uint("version", self.version).bool("created", self.created);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(SchemaRegistered { event_type: f.str("type")?.to_owned(), version: f.u64("version")?, created: f.flag("created")? })
    }
}

/// The reply to `get_schema`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaInfo {
    /// `type`.
    pub event_type: String,
    /// `version`.
    pub version: u64,
    /// `schema`: the JSON Schema as a MessagePack map.
    pub schema: Bytes,
    /// `compatibility`: the type's mode.
    pub compatibility: Compatibility,
    /// `strict`: the type's reading of open content models.
    pub strict: bool,
}

impl Body for SchemaInfo {
    fn write(&self, w: &mut MapWriter) {
        w.str("type", &self.event_type)
            .uint("version", self.version)
            .raw("schema", &self.schema)
            .str("compatibility", self.compatibility.as_str())
            .bool("strict", self.strict);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(SchemaInfo {
            event_type: f.str("type")?.to_owned(),
            version: f.u64("version")?,
            schema: f.req("schema")?.bytes(),
            compatibility: Compatibility::read(f, "compatibility")?.unwrap_or_default(),
            strict: f.flag("strict")?,
        })
    }
}

/// One type in the reply to `list_schemas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaSummary {
    /// `type`.
    pub event_type: String,
    /// `latest`: its latest version.
    pub latest: u64,
    /// `compatibility`: its mode.
    pub compatibility: Compatibility,
}

/// The reply to `list_schemas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaList {
    /// `types`: every type with a schema, by name.
    pub types: Vec<SchemaSummary>,
}

impl Body for SchemaList {
    fn write(&self, w: &mut MapWriter) {
        let items: Vec<Vec<u8>> = self
            .types
            .iter()
            .map(|t| {
                let mut m = MapWriter::new();
                m.str("type", &t.event_type).uint("latest", t.latest).str("compatibility", t.compatibility.as_str());
                m.finish()
            })
            .collect();
        w.raw_array("types", items.iter().map(Vec::as_slice));
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        let mut types = vec![];
        for item in f.req("types")?.array()? {
            let m = Fields::parse(item).map_err(|e| FieldError::new("types", e.to_string()))?;
            types.push(SchemaSummary {
                event_type: m.str("type")?.to_owned(),
                latest: m.u64("latest")?,
                compatibility: Compatibility::read(&m, "compatibility")?.unwrap_or_default(),
            });
        }
        Ok(SchemaList { types })
    }
}
