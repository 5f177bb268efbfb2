//! A lane's appender: a thread (every call blocks on disk) that takes every publish queued,
//! appends them to the lane's spool and commits them with one `fdatasync` (group commit), then
//! answers the `local` publishes `spooled`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sidebus_protocol::reply::{PublishStatus, Published};
use sidebus_protocol::request::Durability;
use tokio::sync::mpsc;

use super::{GROUP_MAX, Job, LaneCtl, PublishError, Waiting};
use crate::backend::spool::{Spool, Writer};
use crate::lock::lock;

/// The appender of one lane: group commits until every submitter is gone.
pub(super) fn append(mut writer: Writer, mut rx: mpsc::Receiver<Job>, ctl: Arc<LaneCtl>, spool: Arc<Spool>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(GROUP_MAX);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut reserved = 0;
        let mut seqs = Vec::with_capacity(jobs.len());
        for j in &jobs {
            seqs.push(writer.append(j.submit.time_us, &j.submit.event));
            reserved += j.bytes;
        }
        // Committed publishes are answered by the flusher; they are registered before the
        // commit, so that no flush can pass them unanswered.
        {
            let mut waiting = lock(&ctl.waiting);
            for (j, seq) in jobs.iter_mut().zip(&seqs) {
                if j.submit.durability == Durability::Committed
                    && let Some(reply) = j.reply.take()
                {
                    waiting.insert(*seq, Waiting { event_id: j.submit.event_id.clone(), reply });
                }
            }
        }
        let committed = writer.commit();
        spool.release(reserved);
        match committed {
            Ok(_) => {
                crate::bus::counters::add(&crate::bus::counters::COUNTERS.spooled, jobs.len() as u64);
                for j in jobs.drain(..) {
                    if let Some(reply) = j.reply {
                        let _ = reply.send(Ok(Published { event_id: j.submit.event_id, status: PublishStatus::Spooled, duplicate: false }));
                    }
                }
            }
            Err(e) => {
                tracing::error!(lane = %ctl.lane.id, error = %e, publishes = jobs.len(), "could not write the spool; those publishes were refused");
                let mut waiting = lock(&ctl.waiting);
                for (j, seq) in jobs.drain(..).zip(&seqs) {
                    let reply = j.reply.or_else(|| waiting.remove(seq).map(|w| w.reply));
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(PublishError::Spool));
                    }
                }
            }
        }
    }
    ctl.closed.store(true, Ordering::Release);
    ctl.lane.notify.notify_one();
}
