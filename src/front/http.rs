//! The optional HTTP listener (`metrics_addr`): `/metrics` in the Prometheus text format,
//! `/healthz` (the process is alive), `/readyz` (the socket accepts and Redis and Postgres
//! answer) and `/readyz/publish` (the socket accepts and publishes are taken: the backends
//! answer, or the spool has room). Loopback unless configured otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::front::Shared;
use crate::front::stats::{self, Sources};

/// How long a probe waits for a backend.
const PROBE: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    handle: PrometheusHandle,
}

/// Serves until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, handle: PrometheusHandle, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/readyz/publish", get(ready_publish))
        .with_state(App { shared, handle });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::warn!(error = %e, "the metrics listener stopped");
    }
}

/// Binds `addr` (the caller reports a failure as a configuration error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn backends_answer(shared: &Shared) -> Result<(), &'static str> {
    let log = shared.backends.log.now().ok_or("Postgres not connected")?;
    let streams = shared.backends.streams.now().ok_or("Redis not connected")?;
    match tokio::time::timeout(PROBE, streams.ping()).await {
        Ok(Ok(())) => {}
        _ => return Err("Redis does not answer"),
    }
    match tokio::time::timeout(PROBE, log.ping()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err("Postgres does not answer"),
    }
}

async fn ready(State(app): State<App>) -> (StatusCode, String) {
    if app.shared.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match backends_answer(&app.shared).await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn ready_publish(State(app): State<App>) -> (StatusCode, String) {
    if app.shared.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    if backends_answer(&app.shared).await.is_ok() {
        return (StatusCode::OK, "ready\n".into());
    }
    let depth = app.shared.publisher.depth();
    if depth.bytes < app.shared.config.spool_max_bytes {
        (StatusCode::OK, "ready: publishes are spooled while the backends are away\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the spool is full and the backends are away\n".into())
    }
}

async fn metrics(State(app): State<App>) -> String {
    let shared = &app.shared;
    let s = stats::collect(
        Sources { node: &shared.config.node, publisher: &shared.publisher, backends: &shared.backends, engine: shared.engine.now() },
        Duration::from_secs(2),
    )
    .await;
    for (name, v) in &s.counters {
        metrics::counter!(format!("sidebus_{name}_total")).absolute(*v);
    }
    metrics::gauge!("sidebus_spool_events").set(s.spool_events as f64);
    metrics::gauge!("sidebus_spool_bytes").set(s.spool_bytes as f64);
    metrics::gauge!("sidebus_spool_oldest_age_seconds").set(s.spool_oldest_age_ms as f64 / 1000.0);
    metrics::gauge!("sidebus_uptime_seconds").set(s.uptime_s as f64);
    for g in &s.groups {
        let labels = [("type", g.event_type.clone()), ("group", g.group.clone())];
        metrics::gauge!("sidebus_group_lag", &labels).set(g.lag as f64);
        metrics::gauge!("sidebus_group_pending", &labels).set(g.pending as f64);
        metrics::gauge!("sidebus_group_oldest_pending_seconds", &labels).set(g.oldest_pending_ms as f64 / 1000.0);
        metrics::gauge!("sidebus_group_dead_letters", &labels).set(g.dead_letters as f64);
        metrics::gauge!("sidebus_group_consumers", &labels).set(g.consumers as f64);
    }
    app.handle.run_upkeep();
    app.handle.render()
}
