//! The agent's recent flows: a bounded ring a new observer reads first, and a broadcast of
//! every new record to the observers following.
//!
//! The event reader publishes and never waits: the ring drops its oldest record when full,
//! and the broadcast keeps a bounded backlog per observer — an observer that falls behind
//! loses the oldest records of its backlog and is told how many, the reader is never slowed.
//! The lock is held for one push (and, when an observer connects, for copying the ring's
//! pointers), never across I/O.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::broadcast;

use super::flow::FlowRecord;

/// Recent flows and their live feed.
#[derive(Debug)]
pub struct FlowHub {
    recent: Mutex<VecDeque<Arc<FlowRecord>>>,
    capacity: usize,
    live: broadcast::Sender<Arc<FlowRecord>>,
}

/// What a new observer gets: the records kept, then every record published after them.
pub struct Subscription {
    /// The ring's records, oldest first.
    pub recent: Vec<Arc<FlowRecord>>,
    /// The records published after `recent`, none missing and none repeated.
    pub live: broadcast::Receiver<Arc<FlowRecord>>,
}

impl FlowHub {
    /// Keeps the last `capacity` records, and lets a following observer fall `capacity`
    /// records behind before it loses any (at least one: a broadcast needs a slot).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            live: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Keeps `record` and hands it to the observers following. Never waits for them.
    pub fn publish(&self, record: FlowRecord) {
        let record = Arc::new(record);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if self.capacity > 0 {
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&record));
        }
        // Sent under the lock, so that a subscriber sees each record once: in the ring it
        // copied or on its receiver. No receiver is no error.
        let _ = self.live.send(record);
    }

    /// The records kept, and a receiver for the ones to come.
    pub fn subscribe(&self) -> Subscription {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        Subscription {
            live: self.live.subscribe(),
            recent: recent.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::broadcast::error::TryRecvError;

    use super::FlowHub;
    use crate::observe::flow::tests::denied_ingress;

    fn record(time_unix_ms: u64) -> crate::observe::flow::FlowRecord {
        crate::observe::flow::FlowRecord {
            time_unix_ms,
            ..denied_ingress()
        }
    }

    fn times(records: &[std::sync::Arc<crate::observe::flow::FlowRecord>]) -> Vec<u64> {
        records.iter().map(|record| record.time_unix_ms).collect()
    }

    #[test]
    fn the_ring_keeps_the_last_n_records() {
        let hub = FlowHub::new(3);
        for time in 1..=5 {
            hub.publish(record(time));
        }
        assert_eq!(times(&hub.subscribe().recent), [3, 4, 5]);
        let none = FlowHub::new(0);
        none.publish(record(1));
        assert!(none.subscribe().recent.is_empty());
    }

    #[test]
    fn a_subscriber_sees_each_record_once_in_the_ring_or_live() {
        let hub = FlowHub::new(8);
        hub.publish(record(1));
        let mut subscription = hub.subscribe();
        hub.publish(record(2));
        assert_eq!(times(&subscription.recent), [1]);
        assert_eq!(subscription.live.try_recv().unwrap().time_unix_ms, 2);
        assert!(matches!(
            subscription.live.try_recv(),
            Err(TryRecvError::Empty)
        ));
    }

    #[test]
    fn a_slow_observer_is_told_how_many_it_lost_and_publishing_never_waits() {
        let hub = FlowHub::new(4);
        let mut slow = hub.subscribe();
        // Ten records with nobody reading: publish returns every time.
        for time in 1..=10 {
            hub.publish(record(time));
        }
        assert!(matches!(slow.live.try_recv(), Err(TryRecvError::Lagged(6))));
        let rest: Vec<u64> = std::iter::from_fn(|| slow.live.try_recv().ok())
            .map(|record| record.time_unix_ms)
            .collect();
        assert_eq!(rest, [7, 8, 9, 10]);
    }
}
