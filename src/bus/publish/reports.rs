//! A publish lane's reports to the log: the bound below which nothing the lane has not added to
//! Redis can be (see `bus::recovery` for why the checkpoints need it).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use uuid::Uuid;

use crate::backend::Backends;
use crate::backend::pg::{EventLog, LANE_HEARTBEAT, LANE_REPORT_FRESH};
use tokio_util::sync::CancellationToken;

/// A lane's reports to the log (see `bus::recovery`): the bound below which nothing the lane has
/// not added to Redis can be. The lane registers before it stores anything, reports the last
/// event it added every [`REPORT_INTERVAL`] while it flushes, reports itself idle (bound: the
/// log's end) soon after its pipeline empties, and beats every `LANE_HEARTBEAT` meanwhile. It
/// neither stores nor adds while its last report is older than `LANE_REPORT_FRESH`: a lane the
/// checkpoints ignore (silent) must not put anything where they would miss it.
///
/// The pipeline count and the idle report share one lock: a store takes a log position only
/// after counting itself in, so an idle report (taken under the lock with nothing counted) is
/// never overtaken by a position it did not bound.
pub(super) struct Reports {
    lane: Uuid,
    node: String,
    state: tokio::sync::Mutex<ReportState>,
    /// The number of the last batch stored (see `Batch::k`).
    pub(super) committed: AtomicU64,
}

struct ReportState {
    /// Batches stored or being stored and not yet added.
    in_pipeline: usize,
    /// The last event added, not yet reported.
    last_added: Option<String>,
    /// When the last report was recorded (none: not registered yet).
    reported_at: Option<tokio::time::Instant>,
    /// The last report said idle, and nothing happened since.
    idle_reported: bool,
}

/// How often a flushing lane reports the last event it added: how far its bound may lag.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// How soon a lane whose pipeline emptied reports itself idle (a lane busy again reports before
/// it stores, one more round trip, so not at once).
pub const IDLE_REPORT: Duration = Duration::from_millis(500);

impl Reports {
    pub(super) fn new(lane: Uuid, node: String) -> Reports {
        Reports {
            lane,
            node,
            state: tokio::sync::Mutex::new(ReportState { in_pipeline: 0, last_added: None, reported_at: None, idle_reported: false }),
            committed: AtomicU64::new(0),
        }
    }

    fn fresh(st: &ReportState) -> bool {
        st.reported_at.is_some_and(|t| t.elapsed() < LANE_REPORT_FRESH)
    }

    /// Registers the lane or reports it, retrying until the log answers (`false`: aborted).
    async fn report_now(&self, st: &mut ReportState, log: &EventLog, abort: &CancellationToken) -> bool {
        let mut pause = Duration::from_millis(100);
        loop {
            let idle = st.in_pipeline == 0;
            let r = if st.reported_at.is_none() {
                log.register_lane(self.lane, &self.node).await
            } else {
                log.report_lane(self.lane, &self.node, st.last_added.as_deref(), idle).await
            };
            match r {
                Ok(()) => {
                    // A registration says busy: an idle lane reports idle afterwards.
                    st.idle_reported = idle && st.reported_at.is_some();
                    st.reported_at = Some(tokio::time::Instant::now());
                    st.last_added = None;
                    return true;
                }
                Err(e) => tracing::debug!(lane = %self.lane, error = %e, "could not report the lane; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = abort.cancelled() => return false,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Before a batch is stored: counts it in the pipeline, after reporting (busy) when the
    /// last report is not fresh or said idle. `false`: aborted.
    pub(super) async fn begin_store(&self, log: &EventLog, abort: &CancellationToken) -> bool {
        let mut st = self.state.lock().await;
        st.in_pipeline += 1;
        if (!Self::fresh(&st) || st.idle_reported) && !self.report_now(&mut st, log, abort).await {
            return false;
        }
        true
    }

    /// Before a batch is added to Redis: reports when the last report is not fresh. `false`:
    /// aborted.
    pub(super) async fn before_add(&self, backends: &Backends, abort: &CancellationToken) -> bool {
        let mut st = self.state.lock().await;
        if Self::fresh(&st) {
            return true;
        }
        let log = tokio::select! {
            log = backends.log.get() => log,
            _ = abort.cancelled() => return false,
        };
        self.report_now(&mut st, &log, abort).await
    }

    /// After a batch was added: `last` is its last event added (if any). Reports when the
    /// interval has passed.
    pub(super) async fn added(&self, backends: &Backends, last: Option<String>) {
        let mut st = self.state.lock().await;
        st.in_pipeline = st.in_pipeline.saturating_sub(1);
        if last.is_some() {
            st.last_added = last;
        }
        if st.reported_at.is_none_or(|t| t.elapsed() >= REPORT_INTERVAL) {
            self.report_once(&mut st, backends).await;
        }
    }

    /// A report now if the log answers within a few seconds (a heartbeat, or the idle report).
    pub(super) async fn tick(&self, backends: &Backends) {
        let mut st = self.state.lock().await;
        let idle_due = st.in_pipeline == 0 && !st.idle_reported;
        if idle_due || st.reported_at.is_none_or(|t| t.elapsed() >= LANE_HEARTBEAT) {
            self.report_once(&mut st, backends).await;
        }
    }

    async fn report_once(&self, st: &mut ReportState, backends: &Backends) {
        let Some(log) = backends.log.now() else { return };
        let idle = st.in_pipeline == 0;
        let r = if st.reported_at.is_none() {
            log.register_lane(self.lane, &self.node).await
        } else {
            tokio::time::timeout(Duration::from_secs(5), log.report_lane(self.lane, &self.node, st.last_added.as_deref(), idle))
                .await
                .unwrap_or_else(|_| Err(crate::backend::pg::LogError::Timeout("report lane")))
        };
        match r {
            Ok(()) => {
                st.idle_reported = idle && st.reported_at.is_some();
                st.reported_at = Some(tokio::time::Instant::now());
                st.last_added = None;
            }
            Err(e) => tracing::debug!(lane = %self.lane, error = %e, "could not report the lane"),
        }
    }
}
