//! Logging: `tracing` to stderr, as text or JSON lines, with a filter that SIGHUP can reload.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// Logging or metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter does not parse.
    #[error("bad log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The running filter could not be replaced.
    #[error("cannot replace the log filter: {0}")]
    Reload(#[from] reload::Error),
    /// A global subscriber is installed already.
    #[error("cannot install logging: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
    /// The Prometheus recorder could not be built or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

/// Changes the log filter of a running daemon.
pub struct FilterHandle(reload::Handle<EnvFilter, Registry>);

impl FilterHandle {
    /// Applies a new filter (`info`, `sidebus=debug`, …).
    pub fn set(&self, filter: &str) -> Result<(), TelemetryError> {
        let f = EnvFilter::try_new(filter)?;
        Ok(self.0.reload(f)?)
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(filter: &str, format: LogFormat) -> Result<FilterHandle, TelemetryError> {
    let filter = EnvFilter::try_new(filter)?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        // Colours only for a person at a terminal, never into a file or a journal.
        LogFormat::Text => registry.with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).try_init(),
    };
    installed?;
    Ok(FilterHandle(handle))
}

/// Set once the Prometheus recorder is installed: latency histograms are recorded only then.
static METRICS_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Latency buckets in seconds, 100 µs to 60 s.
const BUCKETS: [f64; 16] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];

/// Installs the Prometheus recorder (once); its handle renders `/metrics`.
pub fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, TelemetryError> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&BUCKETS)?.install_recorder()?;
    METRICS_ON.store(true, std::sync::atomic::Ordering::Release);
    Ok(handle)
}

/// Records how long a publish took to be acknowledged.
pub fn record_publish_ack(took: std::time::Duration) {
    if METRICS_ON.load(std::sync::atomic::Ordering::Relaxed) {
        metrics::histogram!("sidebus_publish_ack_seconds").record(took.as_secs_f64());
    }
}

/// Records publish-to-delivery latency: now minus the event's `time` (or, for a delayed event,
/// minus the time it was due).
pub fn record_delivery_latency(event: &bytes::Bytes) {
    if !METRICS_ON.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let Ok(f) = sidebus_protocol::Fields::parse(event.clone()) else { return };
    let since = f.str("deliverat").or_else(|_| f.str("time"));
    let Some(time) = since.ok().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else { return };
    let ms = (chrono::Utc::now() - time.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0).max(0);
    metrics::histogram!("sidebus_delivery_latency_seconds").record(ms as f64 / 1e6);
}
