//! A value that becomes available later (a backend handle once it answers), with a cheap look
//! now and a bounded wait.

use std::time::Duration;

use tokio::sync::watch;

/// Set once, read many times.
pub struct Ready<T: Clone> {
    tx: watch::Sender<Option<T>>,
}

impl<T: Clone> Default for Ready<T> {
    fn default() -> Self {
        Ready { tx: watch::Sender::new(None) }
    }
}

impl<T: Clone> Ready<T> {
    /// Makes the value available.
    pub fn set(&self, v: T) {
        self.tx.send_replace(Some(v));
    }

    /// The value, if it is available.
    pub fn now(&self) -> Option<T> {
        self.tx.borrow().clone()
    }

    /// Waits until the value is available.
    pub async fn get(&self) -> T {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(v) = rx.borrow_and_update().clone() {
                return v;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self, so the channel cannot close while we wait.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits up to `timeout`.
    pub async fn get_within(&self, timeout: Duration) -> Option<T> {
        tokio::time::timeout(timeout, self.get()).await.ok()
    }
}
