//! Logging: `tracing` to stderr, as text or JSON lines, with a filter that SIGHUP can reload.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// Changes the log filter of a running daemon.
pub struct FilterHandle(reload::Handle<EnvFilter, Registry>);

impl FilterHandle {
    /// Applies a new filter (`info`, `sidebus=debug`, …).
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let f = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.0.reload(f).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(filter: &str, format: LogFormat) -> Result<FilterHandle, String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).try_init(),
    };
    installed.map_err(|e| e.to_string())?;
    Ok(FilterHandle(handle))
}
