//! What a connection holds: its subscriptions (and the in-flight budget they take) and its
//! leases (deliveries pushed and not yet ended, each with its ack timer). The ops change them
//! only through these methods.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue;

use crate::bus::deliver::{Push, Sub, Ticket};

/// A connection's subscriptions.
pub(crate) struct Subscriptions {
    map: HashMap<u64, Arc<Sub>>,
    next: u64,
    /// Sum of the subscriptions' `max_in_flight`, those being set up included.
    budget_used: u32,
    /// Where the workers push this connection's deliveries.
    pub(crate) tx: mpsc::Sender<Push>,
}

impl Subscriptions {
    pub(super) fn new(tx: mpsc::Sender<Push>) -> Subscriptions {
        Subscriptions { map: HashMap::new(), next: 1, budget_used: 0, tx }
    }

    /// Reserves a subscription number and `max_in_flight` of the connection's `budget`;
    /// `Err(used)` when the budget has no room.
    pub(crate) fn reserve(&mut self, max_in_flight: u32, budget: u32) -> Result<u64, u32> {
        if self.budget_used + max_in_flight > budget {
            return Err(self.budget_used);
        }
        self.budget_used += max_in_flight;
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Gives a reservation back (the subscribe failed).
    pub(super) fn unreserve(&mut self, max_in_flight: u32) {
        self.budget_used -= max_in_flight;
    }

    /// Records a subscription that now exists.
    pub(super) fn insert(&mut self, sub: Arc<Sub>) {
        self.map.insert(sub.id, sub);
    }

    /// Ends a subscription; its budget comes back.
    pub(crate) fn remove(&mut self, id: u64) -> Option<Arc<Sub>> {
        let sub = self.map.remove(&id)?;
        self.budget_used -= sub.params.max_in_flight;
        Some(sub)
    }

    pub(super) fn get(&self, id: u64) -> Option<&Arc<Sub>> {
        self.map.get(&id)
    }

    /// Every subscription, taken out (the connection closes).
    pub(super) fn take_all(&mut self) -> Vec<Arc<Sub>> {
        self.budget_used = 0;
        self.map.drain().map(|(_, s)| s).collect()
    }
}

/// A delivery pushed to the client and not yet ended.
pub(crate) struct Lease {
    pub(crate) sub: Arc<Sub>,
    pub(crate) ticket: Ticket,
    pub(crate) attempt: u64,
    timer: delay_queue::Key,
}

/// A connection's leases, by tag, with their ack timers.
pub(crate) struct Leases {
    map: HashMap<u64, Lease>,
    pub(super) timers: DelayQueue<u64>,
    next_tag: u64,
}

impl Leases {
    pub(super) fn new() -> Leases {
        Leases { map: HashMap::new(), timers: DelayQueue::new(), next_tag: 1 }
    }

    /// Starts the lease of a delivery pushed now; returns its tag.
    pub(super) fn start(&mut self, sub: Arc<Sub>, ticket: Ticket, attempt: u64) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let timer = self.timers.insert(tag, sub.params.ack_timeout);
        self.map.insert(tag, Lease { sub, ticket, attempt, timer });
        tag
    }

    /// Ends the lease of `tag` (its timer stops, its slot goes back to the subscription).
    pub(crate) fn end(&mut self, tag: u64) -> Option<Lease> {
        let lease = self.map.remove(&tag)?;
        self.timers.try_remove(&lease.timer);
        lease.sub.release_slot();
        Some(lease)
    }

    /// The lease whose timer ran out (it is gone from the timers already).
    pub(super) fn expired(&mut self, tag: u64) -> Option<Lease> {
        let lease = self.map.remove(&tag)?;
        lease.sub.release_slot();
        Some(lease)
    }

    /// Restarts the ack timer of `tag`; the lease, or `None` when the connection does not hold
    /// it.
    pub(crate) fn extend(&mut self, tag: u64) -> Option<&Lease> {
        let lease = self.map.get(&tag)?;
        self.timers.reset(&lease.timer, lease.sub.params.ack_timeout);
        Some(lease)
    }

    /// Ends every lease of subscription `sub`.
    pub(crate) fn end_all_of(&mut self, sub: u64) -> Vec<Lease> {
        let tags: Vec<u64> = self.map.iter().filter(|(_, l)| l.sub.id == sub).map(|(t, _)| *t).collect();
        tags.into_iter().filter_map(|t| self.end(t)).collect()
    }

    /// Ends every lease (the connection closes).
    pub(super) fn end_all(&mut self) -> Vec<Lease> {
        let tags: Vec<u64> = self.map.keys().copied().collect();
        tags.into_iter().filter_map(|t| self.end(t)).collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
