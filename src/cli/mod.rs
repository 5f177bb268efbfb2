//! Admin subcommands: each talks to a running daemon through its socket with the Rust client.
//! Exit codes scripts can trust: 0 done, 1 the daemon refused (error reply), 65 bad input,
//! 69 the daemon is unreachable.

pub mod dlq;
pub mod groups;
pub mod ping;
pub mod publish;
pub mod replay;
pub mod schema;
pub mod stats;
pub mod tail;
pub mod time;
pub mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use sidebus_client::{Client, Error};

/// The daemon refused a request.
pub const EXIT_REFUSED: u8 = 1;
/// The input (JSON, arguments) is malformed (sysexits EX_DATAERR).
pub const EXIT_DATAERR: u8 = 65;
/// The daemon cannot be reached (sysexits EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How a subcommand prints.
#[derive(clap::Args, Debug, Clone)]
pub struct Output {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How to reach the daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// The daemon's socket [default: $SIDEBUS_SOCKET, else /run/sidebus/sidebus.sock].
    // Not clap's `env`: a value from the environment would show in usage lines as if the flag
    // were required; the client reads SIDEBUS_SOCKET itself.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// What to try when the socket cannot be opened.
const SOCKET_HINT: &str = "is `sidebus run` running? Set --socket or SIDEBUS_SOCKET to its socket (default /run/sidebus/sidebus.sock)";

impl ConnArgs {
    /// The socket: `--socket`, else `$SIDEBUS_SOCKET`, else the default.
    pub fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(sidebus_client::default_socket)
    }

    /// Connects and says hello as `sidebus-cli`; says why not (once, with a hint) when it
    /// cannot.
    pub async fn connect(&self) -> Result<Client, ExitCode> {
        let path = self.path();
        Client::connect_as(&path, "sidebus-cli").await.map_err(|e| {
            match &e {
                Error::Io(io) => {
                    eprintln!("sidebus: cannot reach the daemon at {}: {io}", path.display());
                    if io.kind() == std::io::ErrorKind::PermissionDenied {
                        eprintln!(
                            "  this user may not open the socket: run as the daemon's user or a member of the socket's group (socket_mode)"
                        );
                    } else {
                        eprintln!("  {SOCKET_HINT}");
                    }
                }
                other => {
                    let mut lines = error_lines(other);
                    lines[0] = format!("sidebus: the daemon at {} did not take the connection: {other}", path.display());
                    for line in lines {
                        eprintln!("{line}");
                    }
                }
            }
            ExitCode::from(EXIT_UNAVAILABLE)
        })
    }
}

/// Runs a subcommand on a small runtime.
pub fn block_on(f: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("sidebus: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code for a failed request.
pub fn exit_for(e: &Error) -> ExitCode {
    match e {
        Error::Server { .. } => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::from(EXIT_UNAVAILABLE),
    }
}

/// Prints a failed request on stderr, once: the error, then the fields or places the daemon
/// named that its message does not already say.
pub fn report(e: &Error) {
    for line in error_lines(e) {
        eprintln!("{line}");
    }
}

/// The lines [`report`] prints.
pub fn error_lines(e: &Error) -> Vec<String> {
    let mut lines = vec![format!("sidebus: {e}")];
    if let Error::Server { details, message, .. } = e {
        for d in details {
            let (place, text) = match d {
                sidebus_protocol::Detail::Field { field, message } => (field.as_str(), message),
                // "" points at the whole of `data`.
                sidebus_protocol::Detail::Path { path, message } => (if path.is_empty() { "data" } else { path.as_str() }, message),
                sidebus_protocol::Detail::Reason { message } => ("", message),
            };
            if message.contains(text.as_str()) {
                continue;
            }
            lines.push(if place.is_empty() { format!("  {text}") } else { format!("  {place}: {text}") });
        }
    }
    lines
}

/// The wire code of a failed request, or what happened to the connection.
pub fn error_code(e: &Error) -> &'static str {
    match e {
        Error::Server { code, .. } => code.as_str(),
        Error::ConnectionLost(_) => "connection_lost",
        Error::Timeout(_) => "timeout",
        Error::Closed => "closed",
        Error::Io(_) => "io",
        Error::Protocol(_) => "protocol",
        Error::Encode(_) => "encode",
    }
}

/// One encoded MessagePack value as JSON for printing (`null` if it does not decode).
pub fn msgpack_json(bytes: &[u8]) -> serde_json::Value {
    rmpv::decode::read_value(&mut &bytes[..]).map(|v| to_json(&v)).unwrap_or(serde_json::Value::Null)
}

/// MessagePack data as JSON for printing: binary as `{"$hex": …}`, extensions as
/// `{"$ext": type, "$hex": …}`, non-string map keys as their JSON text.
pub fn to_json(v: &rmpv::Value) -> serde_json::Value {
    use serde_json::Value as J;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    match v {
        rmpv::Value::Nil => J::Null,
        rmpv::Value::Boolean(b) => J::Bool(*b),
        rmpv::Value::Integer(i) => i.as_i64().map(J::from).or_else(|| i.as_u64().map(J::from)).unwrap_or(J::Null),
        rmpv::Value::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        rmpv::Value::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        rmpv::Value::String(s) => J::String(s.as_str().map_or_else(|| String::from_utf8_lossy(s.as_bytes()).into_owned(), str::to_owned)),
        rmpv::Value::Binary(b) => serde_json::json!({ "$hex": hex(b) }),
        rmpv::Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        rmpv::Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        rmpv::Value::String(s) if s.as_str().is_some() => s.as_str().unwrap_or_default().to_owned(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        rmpv::Value::Ext(t, b) => serde_json::json!({ "$ext": t, "$hex": hex(b) }),
    }
}
