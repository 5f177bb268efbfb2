//! The `id` of a request, echoed by its reply: a leaf of the crate, so that requests and
//! replies both use it without depending on each other.

use crate::msgpack::{FieldError, Fields, MapWriter};

/// The `id` of a request, echoed by its reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestId {
    /// The usual form: an unsigned integer chosen by the client.
    Num(u64),
    /// A string `id` on a `publish`: the contract lists `id` among publish's fields as the
    /// idempotency key, so a string there is taken as the event id and echoed as the request id.
    Key(String),
}

impl RequestId {
    pub(crate) fn write(&self, w: &mut MapWriter) {
        match self {
            RequestId::Num(n) => w.uint("id", *n),
            RequestId::Key(s) => w.str("id", s),
        };
    }

    pub(crate) fn read(f: &Fields) -> Result<Option<RequestId>, FieldError> {
        match f.get("id") {
            None => Ok(None),
            Some(v) => match v.str() {
                Ok(s) => Ok(Some(RequestId::Key(s.to_owned()))),
                Err(_) => v.u64().map(|n| Some(RequestId::Num(n))),
            },
        }
    }

    /// Writes `id` into a reply being built.
    pub fn write_into(id: Option<&RequestId>, w: &mut MapWriter) {
        if let Some(id) = id {
            id.write(w);
        }
    }
}
