//! Secrets in the configuration: the keys that may hold a password, where else they can come
//! from, and a type that never prints its value.
//!
//! Every secret key `K` (see [`SECRET_KEYS`]) can also be given as `K_file`, a path whose
//! contents are the value (Docker and Kubernetes secrets mounted as files), in any source: the
//! config file, `SIDEBUS_K_FILE`, `--k-file`. Under systemd, a credential named `K`
//! (`LoadCredential=K:/etc/…`, found in `$CREDENTIALS_DIRECTORY`) is read too, above the config
//! file and below the environment. A value read from a file loses its trailing newline; a
//! password that is empty counts as not set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{ConfigError, invalid, key};

/// The keys whose values are (or may contain) a password.
pub const SECRET_KEYS: [&str; 5] =
    [key::REDIS_URL, key::DATABASE_URL, key::REDIS_PASSWORD, key::DATABASE_PASSWORD, key::REDIS_SENTINEL_PASSWORD];

/// Largest secret file read, in bytes: a password or a URL, not a blob.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Whether `key` holds a secret (its environment value is hidden from `--help`).
pub fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

/// The key that names a file holding `key`'s value.
pub fn file_key(key: &str) -> String {
    format!("{key}_file")
}

/// A value that is never printed: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the driver that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads a secret file: at most 64 KiB of UTF-8, without its trailing newline. `key` names the
/// setting in the error.
fn read_secret(key: &str, path: &Path) -> Result<String, ConfigError> {
    let cannot = |why: String| invalid(key, format!("cannot read {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| cannot(e.to_string()))?;
    if !meta.is_file() {
        return Err(cannot("not a file".into()));
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(cannot(format!("larger than {MAX_SECRET_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| cannot(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| cannot("not UTF-8 text".into()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// Replaces each `K_file` of one source with `K` holding the file's contents. `K` and `K_file`
/// together in one source is an error (which one was meant?).
pub(super) fn read_files(values: &mut BTreeMap<String, String>) -> Result<(), ConfigError> {
    for k in SECRET_KEYS {
        let fk = file_key(k);
        let Some(path) = values.remove(&fk) else { continue };
        if values.contains_key(k) {
            return Err(invalid(&fk, format!("{k} is set in the same place; set one of them")));
        }
        if path.trim().is_empty() {
            return Err(invalid(&fk, "must be a path"));
        }
        values.insert(k.to_owned(), read_secret(&fk, &PathBuf::from(path))?);
    }
    Ok(())
}

/// The secrets systemd passed as credentials: `dir/K` for each secret key `K` that exists.
pub(super) fn credentials(dir: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut found = BTreeMap::new();
    for k in SECRET_KEYS {
        let path = dir.join(k);
        if path.exists() {
            found.insert(k.to_owned(), read_secret(&format!("{k} (credential {})", path.display()), &path)?);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_file_key_becomes_its_key_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut v = BTreeMap::from([("redis_password_file".to_owned(), path.display().to_string())]);
        read_files(&mut v).unwrap();
        assert_eq!(v, BTreeMap::from([("redis_password".to_owned(), "s3cret".to_owned())]));
    }

    #[test]
    fn both_forms_in_one_place_or_a_missing_file_are_errors() {
        let mut v =
            BTreeMap::from([("database_url".to_owned(), "postgres://x".to_owned()), ("database_url_file".to_owned(), "/x".to_owned())]);
        let e = read_files(&mut v).unwrap_err().to_string();
        assert_eq!(e, "invalid config: database_url_file: database_url is set in the same place; set one of them");
        let mut v = BTreeMap::from([("database_password_file".to_owned(), "/nonexistent/pw".to_owned())]);
        let e = read_files(&mut v).unwrap_err().to_string();
        assert!(e.starts_with("invalid config: database_password_file: cannot read /nonexistent/pw: "), "{e}");
    }

    #[test]
    fn credentials_are_read_by_key_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("database_password"), "pg-pw\n").unwrap();
        std::fs::write(dir.path().join("unrelated"), "x").unwrap();
        let c = credentials(dir.path()).unwrap();
        assert_eq!(c, BTreeMap::from([("database_password".to_owned(), "pg-pw".to_owned())]));
    }
}
