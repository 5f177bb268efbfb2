//! A connection's writer task: it writes what the connection's loop hands it, so that the loop
//! never waits for the socket (see the module above).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// Longest a client may take no bytes of what is written to it before it is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing connection waits for its last frames (an error reply) to be written.
const LAST_WRITE: Duration = Duration::from_secs(1);

/// The connection's side of its writer task.
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
    /// Bytes handed to the writer and not yet written.
    unwritten: Arc<AtomicUsize>,
    /// Signalled after each batch written, so that a loop waiting for room reads again.
    pub(super) progress: Arc<Notify>,
    /// Cancelled when a write failed or the client took nothing for [`WRITE_TIMEOUT`].
    pub(super) broken: CancellationToken,
    task: JoinHandle<()>,
}

impl Writer {
    /// Starts the writer task on the socket's write half.
    pub(super) fn start(sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        let unwritten = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let broken = CancellationToken::new();
        let task = tokio::spawn(write_frames(sink, rx, unwritten.clone(), progress.clone(), broken.clone()));
        Writer { tx, unwritten, progress, broken, task }
    }

    /// Bytes handed over and not yet written.
    pub(super) fn unwritten(&self) -> usize {
        self.unwritten.load(Ordering::Acquire)
    }

    /// Hands frames over (never waits for the socket).
    pub(super) fn send(&self, frames: Vec<Bytes>) {
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        self.unwritten.fetch_add(bytes, Ordering::AcqRel);
        // The writer is gone only after a write failed, which ends this connection anyway.
        let _ = self.tx.send(frames);
    }

    /// Lets what was handed over (a last error reply) be written for a moment, then closes.
    pub(super) async fn finish(self) {
        drop(self.tx);
        if tokio::time::timeout(LAST_WRITE, self.task).await.is_err() {
            tracing::debug!("the last frames were not written in time");
        }
    }
}

/// Why a write ended the connection.
enum WriteFailed {
    Io(std::io::Error),
    TimedOut,
}

/// Writes every batch it is handed with one flush, until the connection drops its sender (then
/// it returns once everything is written) or a write fails. Each step of a write may wait at
/// most [`WRITE_TIMEOUT`] for the client to take bytes.
async fn write_frames(
    mut sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
    unwritten: Arc<AtomicUsize>,
    progress: Arc<Notify>,
    broken: CancellationToken,
) {
    let mut batches = Vec::new();
    while rx.recv_many(&mut batches, 64).await > 0 {
        let mut bytes = 0;
        let mut result = Ok(());
        for frame in batches.drain(..).flatten() {
            bytes += frame.len();
            result = step(SinkExt::<Bytes>::feed(&mut sink, frame)).await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = step(SinkExt::<Bytes>::flush(&mut sink)).await;
        }
        if let Err(why) = result {
            match why {
                WriteFailed::TimedOut => {
                    tracing::warn!(timeout_s = WRITE_TIMEOUT.as_secs(), "client stopped reading; disconnecting it")
                }
                WriteFailed::Io(e) => tracing::debug!(error = %e, "write failed"),
            }
            broken.cancel();
            return;
        }
        unwritten.fetch_sub(bytes, Ordering::AcqRel);
        progress.notify_one();
    }
}

async fn step(f: impl Future<Output = Result<(), std::io::Error>>) -> Result<(), WriteFailed> {
    match tokio::time::timeout(WRITE_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteFailed::Io(e)),
        Err(_) => Err(WriteFailed::TimedOut),
    }
}
