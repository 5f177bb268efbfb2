//! Signals: SIGTERM or SIGINT starts a graceful shutdown, a second one exits at once; SIGHUP
//! calls a reload hook (the daemon re-reads its log filter).

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::oneshot;

/// The exit code when a second signal cuts the grace period short.
pub const EXIT_FORCED: i32 = 130;

/// Listens for signals from now on. The returned future resolves at the first SIGTERM or SIGINT.
pub fn listen(reload: impl Fn() + Send + 'static) -> std::io::Result<impl Future<Output = ()> + Send> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => reload(),
                _ => match tx.take() {
                    Some(tx) => {
                        tracing::info!(signal = sig, "shutting down");
                        let _ = tx.send(());
                    }
                    None => {
                        tracing::warn!(signal = sig, "second signal: exiting without waiting for in-flight work");
                        std::process::exit(EXIT_FORCED);
                    }
                },
            }
        }
    });
    Ok(async move {
        // An error means the listener task ended, which it only does with the process.
        let _ = rx.await;
    })
}
