//! How many flows the identity check may cut per destination pod: a token bucket each.
//!
//! A cut is a conntrack write on the node; a proxy (or whatever took over a pod's address)
//! denying in a loop must not turn the check into a way to churn the kernel's tables. A deny
//! over the budget is still answered `PERMISSION_DENIED` — the proxy closes the connection —
//! only the kernel cut is skipped, and counted.

use std::{collections::HashMap, hash::Hash, time::Duration};

use tokio::time::Instant;

/// The budget of cuts of one destination: `per_second` on average, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutRate {
    /// Tokens added per second.
    pub per_second: u32,
    /// The most tokens a bucket holds (and starts with).
    pub burst: u32,
}

impl Default for CutRate {
    /// 100 cuts a second, 200 at once: far above what one pod's proxy refuses when it is
    /// not under attack, and a bound on what an attack costs the node.
    fn default() -> Self {
        Self {
            per_second: 100,
            burst: 200,
        }
    }
}

/// Buckets above this many are pruned of full ones (a full bucket is the same as none).
const PRUNE_ABOVE: usize = 4096;

/// One token bucket per key.
#[derive(Debug)]
pub struct CutBudget<K> {
    /// What one token costs in time.
    token: Duration,
    /// What a full bucket holds, in time: `burst` tokens.
    full: Duration,
    buckets: HashMap<K, Bucket>,
}

/// A bucket's tokens, counted as the time they took to accrue (exact, unlike fractions of a
/// token).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    credit: Duration,
    refilled: Instant,
}

impl<K: Hash + Eq> CutBudget<K> {
    /// Full buckets at `rate`.
    #[must_use]
    pub fn new(rate: CutRate) -> Self {
        let token = Duration::from_secs(1) / rate.per_second.max(1);
        Self {
            token,
            full: token * rate.burst,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token of `key`'s bucket at `now`; `false` when it is empty.
    pub fn take(&mut self, key: K, now: Instant) -> bool {
        let full = self.full;
        if self.buckets.len() > PRUNE_ABOVE {
            self.buckets
                .retain(|_, bucket| bucket.refill(full, now) < full);
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            credit: full,
            refilled: now,
        });
        if bucket.refill(full, now) < self.token {
            return false;
        }
        bucket.credit -= self.token;
        true
    }
}

impl Bucket {
    /// Adds the time passed since the last refill, up to `full`; the credit now.
    fn refill(&mut self, full: Duration, now: Instant) -> Duration {
        self.credit = (self.credit + now.saturating_duration_since(self.refilled)).min(full);
        self.refilled = now;
        self.credit
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{CutBudget, CutRate};

    #[test]
    fn a_burst_is_allowed_then_the_rate() {
        let mut budget = CutBudget::new(CutRate {
            per_second: 100,
            burst: 200,
        });
        let start = Instant::now();
        assert!((0..200).all(|_| budget.take("x/a", start)));
        assert!(!budget.take("x/a", start), "the burst is spent");
        // Another destination has its own bucket.
        assert!(budget.take("x/b", start));
        // One token back every 10 ms.
        assert!(!budget.take("x/a", start + Duration::from_millis(5)));
        assert!(budget.take("x/a", start + Duration::from_millis(10)));
        assert!(!budget.take("x/a", start + Duration::from_millis(10)));
        // A long pause refills to the burst, not beyond.
        let later = start + Duration::from_mins(1);
        assert_eq!((0..300).filter(|_| budget.take("x/a", later)).count(), 200);
    }
}
