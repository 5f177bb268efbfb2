//! The bus layer: what sidebus does, feature by feature, on top of the backends. Nothing here
//! knows about sockets or wire error codes; each feature has its own error type, which the front
//! layer maps to codes.

pub mod checkpoint;
pub mod counters;
pub mod dead_letters;
pub mod delays;
pub mod deliver;
pub mod groups;
pub mod maintenance;
pub mod publish;
pub mod recovery;
pub mod replay;
pub mod schema;

/// A request named a consumer group the log does not know (a replay, a dead-letter operation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{event_type}` has no consumer group `{group}`")]
pub struct NoGroup {
    /// The type.
    pub event_type: String,
    /// The group.
    pub group: String,
}
