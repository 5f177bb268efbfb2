//! What the daemon has done since it started: one atomic counter per kind of thing, bumped where
//! it happens. A leaf: every layer above may count; `front::stats` reports them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Counters since start; PROTOCOL.md (`stats`) says what each counts.
        pub struct Counters {
            $(#[allow(missing_docs)] pub $name: AtomicU64,)*
        }

        impl Counters {
            const fn new() -> Counters {
                Counters { $($name: AtomicU64::new(0),)* }
            }

            /// Every counter by name, in wire order.
            pub fn snapshot(&self) -> Vec<(String, u64)> {
                vec![$((stringify!($name).to_owned(), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    published,
    spooled,
    flushed,
    delivered,
    acked,
    nacked,
    retried,
    expired_leases,
    dead_lettered,
    redriven,
    replayed,
    validation_failures,
    protocol_errors,
    redis_losses,
    recovered,
    unauthorized,
    groups_expired,
);

/// The daemon's counters.
pub static COUNTERS: Counters = Counters::new();

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
