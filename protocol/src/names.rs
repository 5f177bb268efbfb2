//! The rules for the names and identifiers a client chooses.
//!
//! Type and group names become parts of Redis keys and Postgres rows, so they are restricted to
//! characters that need no escaping anywhere (and never `:`, the key separator).

use crate::msgpack::FieldError;

/// Longest type or group name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest event id (idempotency key), in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Longest free-text attribute (`client`, `source`, `correlationid`, `partitionkey`,
/// `traceparent`), in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

fn check(field: &str, s: &str, max: usize, ok: impl Fn(u8) -> bool, rule: &str) -> Result<(), FieldError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(ok) {
        return Err(FieldError::new(field, format!("must be 1 to {max} characters of {rule}")));
    }
    Ok(())
}

/// An event type: `[a-z0-9._-]{1,128}`, e.g. `order.created`.
pub fn check_type(field: &str, s: &str) -> Result<(), FieldError> {
    check(field, s, MAX_NAME_BYTES, |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b), "a-z 0-9 . _ -")
}

/// A consumer group: `[A-Za-z0-9._-]{1,128}`, e.g. `inventory`.
pub fn check_group(field: &str, s: &str) -> Result<(), FieldError> {
    check(field, s, MAX_NAME_BYTES, |b| b.is_ascii_alphanumeric() || b"._-".contains(&b), "A-Z a-z 0-9 . _ -")
}

/// An event id given by a publisher: 1 to 128 printable ASCII characters without spaces.
pub fn check_event_id(field: &str, s: &str) -> Result<(), FieldError> {
    check(field, s, MAX_EVENT_ID_BYTES, |b| b.is_ascii_graphic(), "printable ASCII without spaces")
}

/// A free-text attribute: at most 256 bytes, no control characters.
pub fn check_text(field: &str, s: &str) -> Result<(), FieldError> {
    if s.len() > MAX_TEXT_BYTES || s.chars().any(char::is_control) {
        return Err(FieldError::new(field, format!("must be at most {MAX_TEXT_BYTES} bytes without control characters")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_type("type", "order.created").is_ok());
        assert!(check_type("type", "Order.created").is_err());
        assert!(check_type("type", "order:created").is_err());
        assert!(check_type("type", "").is_err());
        assert!(check_type("type", &"a".repeat(129)).is_err());
        assert!(check_group("group", "Inventory-2").is_ok());
        assert!(check_group("group", "a b").is_err());
        assert!(check_event_id("id", "order-17:created").is_ok());
        assert!(check_event_id("id", "has space").is_err());
        assert!(check_text("source", "orders/v2").is_ok());
        assert!(check_text("source", "a\nb").is_err());
    }
}
