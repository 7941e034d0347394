//! The per-node bounds on restic processes: at most `--max-concurrent` at once, and, with a
//! `--memory-budget`, at most as many as their estimated memory fits (see [`crate::memory`]).
//! Requests beyond either wait in FIFO order (tokio's semaphores are fair); none is dropped. The
//! queue, the running operations and the memory reserved are exported as gauges.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{GaugeGuard, Metrics};

/// The memory budget, in MiB permits.
struct Budget {
    mib: Arc<Semaphore>,
    total: u32,
}

#[derive(Clone)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    budget: Option<Arc<Budget>>,
    metrics: Metrics,
}

/// A running operation's place (and its share of the memory budget); freed on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _memory: Option<OwnedSemaphorePermit>,
    _running: GaugeGuard,
    _reserved: Option<GaugeGuard>,
}

impl Limiter {
    /// `memory_budget_mib` 0 means no memory bound (only the count).
    pub fn new(max_concurrent: u32, memory_budget_mib: u32, metrics: Metrics) -> Self {
        let budget = (memory_budget_mib > 0).then(|| {
            metrics
                .memory_budget
                .set(i64::from(memory_budget_mib) * 1024 * 1024);
            Arc::new(Budget {
                mib: Arc::new(Semaphore::new(memory_budget_mib as usize)),
                total: memory_budget_mib,
            })
        });
        Self {
            slots: Arc::new(Semaphore::new(
                usize::try_from(max_concurrent).unwrap_or(1).max(1),
            )),
            budget,
            metrics,
        }
    }

    /// What an operation estimated at `need_mib` reserves: all of it, but never more than the whole
    /// budget, so an operation larger than the budget still runs (alone).
    fn reservation(&self, need_mib: u64) -> Option<(&Budget, u32)> {
        self.budget.as_deref().map(|b| {
            let n = u32::try_from(need_mib)
                .unwrap_or(u32::MAX)
                .clamp(1, b.total);
            (b, n)
        })
    }

    /// Why an operation estimated at `need_mib` would queue now, for the client; `None` if it
    /// would start at once.
    pub fn would_wait(&self, need_mib: u64) -> Option<String> {
        if self.slots.available_permits() == 0 {
            return Some("waiting for a free slot on this node (--max-concurrent)".into());
        }
        let (b, n) = self.reservation(need_mib)?;
        let free = b.mib.available_permits();
        (free < n as usize).then(|| {
            format!(
                "waiting for memory on this node: restic is estimated to need {n} MiB for this repository and {} of the {} MiB budget are in use (--memory-budget)",
                b.total as usize - free,
                b.total
            )
        })
    }

    /// Waits for a slot and for `need_mib` of the memory budget; `None` once the agent is shutting
    /// down. Cancel-safe: dropping the future leaves the queue.
    pub async fn acquire(&self, need_mib: u64) -> Option<Slot> {
        let queued = GaugeGuard::new(&self.metrics.queued);
        let permit = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        let (memory, reserved) = match self.reservation(need_mib) {
            Some((b, n)) => {
                let p = Arc::clone(&b.mib).acquire_many_owned(n).await.ok()?;
                let g = GaugeGuard::add(&self.metrics.memory_reserved, i64::from(n) * 1024 * 1024);
                (Some(p), Some(g))
            }
            None => (None, None),
        };
        drop(queued);
        Some(Slot {
            _permit: permit,
            _memory: memory,
            _running: GaugeGuard::new(&self.metrics.running),
            _reserved: reserved,
        })
    }

    /// Refuses every queued and future request (shutdown).
    pub fn close(&self) {
        self.slots.close();
        if let Some(b) = &self.budget {
            b.mib.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn never_more_than_max_and_queue_is_counted() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(2, 0, m.clone());
        let a = l.acquire(500).await.unwrap();
        let _b = l.acquire(500).await.unwrap();
        assert!(l.would_wait(1).is_some());
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire(1).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(m.queued.get(), 1);
        assert_eq!(m.running.get(), 2);
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.queued.get(), 0);
        assert_eq!(m.running.get(), 2);
        l.close();
        assert!(l.acquire(1).await.is_none());
        assert_eq!(m.queued.get(), 0);
    }

    #[tokio::test]
    async fn the_memory_budget_queues_what_does_not_fit_and_runs_the_oversized_alone() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(8, 1000, m.clone());
        let a = l.acquire(600).await.unwrap();
        assert_eq!(m.memory_reserved.get(), 600 << 20);
        let why = l.would_wait(500).unwrap();
        assert!(
            why.contains("500 MiB") && why.contains("600 of the 1000 MiB"),
            "{why}"
        );
        assert!(l.would_wait(400).is_none());
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire(500).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert_eq!(m.queued.get(), 1);
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drop(b);
        assert_eq!(m.memory_reserved.get(), 0);
        // Larger than the whole budget: it reserves all of it and runs alone.
        let huge = l.acquire(5000).await.unwrap();
        assert_eq!(m.memory_reserved.get(), 1000 << 20);
        assert!(l.would_wait(1).is_some());
        drop(huge);
        assert!(l.would_wait(1000).is_none());
    }
}
