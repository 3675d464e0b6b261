//! When the agent applies again although nothing changed: a local pod left unenforced (its
//! programs did not attach, its `ENDPOINTS` entry was not written, its interface is not found)
//! is retried with exponential backoff, 100 ms doubling to 30 s, until every pod is enforced.
//!
//! The agent's loop waits on [`Retry::due`] beside its other events: a timer, not polling.

use std::time::Duration;

use tokio::time::Instant;

/// The first wait after an apply that left a pod unenforced.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two retries.
pub const LONGEST: Duration = Duration::from_secs(30);

/// The retry schedule of the agent's loop.
#[derive(Debug)]
pub struct Retry {
    /// The wait after the next failed apply.
    next_wait: Duration,
    /// When to apply again; `None` while every local pod is enforced.
    deadline: Option<Instant>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            next_wait: FIRST,
            deadline: None,
        }
    }
}

impl Retry {
    /// Records the outcome of an apply: with pods unenforced, schedules the next retry (each
    /// wait twice the last, up to [`LONGEST`]); with none, forgets the schedule.
    pub fn after_apply(&mut self, unenforced: usize) {
        if unenforced == 0 {
            *self = Self::default();
            return;
        }
        self.deadline = Some(Instant::now() + self.next_wait);
        self.next_wait = (self.next_wait * 2).min(LONGEST);
    }

    /// When the next retry is due, if one is scheduled.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Completes when the scheduled retry is due; never while none is.
    pub async fn due(&self) {
        match self.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{FIRST, Retry};

    #[tokio::test(start_paused = true)]
    async fn waits_double_from_100_ms_to_30_s_and_reset_once_enforced() {
        let mut retry = Retry::default();
        retry.after_apply(0);
        assert_eq!(retry.deadline(), None);
        let mut waits = Vec::new();
        for _ in 0..12 {
            retry.after_apply(1);
            let started = Instant::now();
            retry.due().await;
            waits.push(started.elapsed());
        }
        let millis: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(
            millis,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        retry.after_apply(0);
        assert_eq!(retry.deadline(), None);
        retry.after_apply(2);
        assert_eq!(retry.deadline(), Some(Instant::now() + FIRST));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_due_while_every_pod_is_enforced() {
        let retry = Retry::default();
        let due = tokio::time::timeout(Duration::from_hours(1), retry.due()).await;
        assert!(due.is_err(), "no retry without an unenforced pod");
    }
}
