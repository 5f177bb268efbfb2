//! `schemas_dir`: schemas kept as files beside the daemon's config, read at start (a bad file
//! stops the start) and registered once Postgres answers ([`Registry::register_dir`]).
//!
//! [`Registry::register_dir`]: super::Registry::register_dir

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Compiled, SchemaError};

/// A file of `schemas_dir` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct DirError {
    /// The file or directory.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: DirProblem,
}

/// What is wrong with a file of `schemas_dir`.
#[derive(Debug, thiserror::Error)]
pub enum DirProblem {
    /// The file name is not a valid event type.
    #[error("type name {0}")]
    TypeName(String),
    /// It cannot be read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// It is not JSON.
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// It is not a JSON Schema this daemon can use.
    #[error("{0}")]
    BadSchema(SchemaError),
    /// A numbered file's name is not a version.
    #[error("expected <version>.json with a version of 1 or more")]
    BadVersion,
}

/// One file of `schemas_dir`.
#[derive(Debug, Clone)]
pub struct DirSchema {
    /// The file.
    pub path: PathBuf,
    /// Its type.
    pub event_type: String,
    /// Its version, for `<type>/<version>.json`.
    pub version: Option<u32>,
    /// The schema.
    pub schema: Value,
}

/// Reads `schemas_dir`: `<type>.json` (the type's next version, if it differs from the latest)
/// and `<type>/<version>.json` (exactly that version), each checked as a JSON Schema. An
/// unreadable file, a bad name or an invalid schema is a configuration error.
pub fn read_dir(dir: &Path) -> Result<Vec<DirSchema>, DirError> {
    fn file(path: &Path, event_type: &str, version: Option<u32>) -> Result<DirSchema, DirError> {
        let at = |problem| DirError { path: path.to_owned(), problem };
        sidebus_protocol::names::check_type("type", event_type).map_err(|e| at(DirProblem::TypeName(e.problem)))?;
        let text = std::fs::read(path).map_err(|e| at(DirProblem::Io(e)))?;
        let schema: Value = serde_json::from_slice(&text).map_err(|e| at(DirProblem::NotJson(e)))?;
        Compiled::new(0, schema.clone()).map_err(|e| at(DirProblem::BadSchema(e)))?;
        Ok(DirSchema { path: path.to_owned(), event_type: event_type.to_owned(), version, schema })
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else { continue };
        if p.is_dir() {
            let mut versions: Vec<(u32, PathBuf)> = Vec::new();
            for e in std::fs::read_dir(&p).map_err(|e| io(&p, e))? {
                let f = e.map_err(|e| io(&p, e))?.path();
                let Some(stem) = f.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else { continue };
                let v: u32 =
                    stem.parse().ok().filter(|v| *v > 0).ok_or_else(|| DirError { path: f.clone(), problem: DirProblem::BadVersion })?;
                versions.push((v, f));
            }
            versions.sort();
            for (v, f) in versions {
                out.push(file(&f, name, Some(v))?);
            }
        } else if let Some(t) = name.strip_suffix(".json") {
            out.push(file(&p, t, None)?);
        }
    }
    Ok(out)
}

fn io(path: &Path, e: std::io::Error) -> DirError {
    DirError { path: path.to_owned(), problem: DirProblem::Io(e) }
}
