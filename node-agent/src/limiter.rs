//! The per-node bounds on restic processes: at most `--max-concurrent` at once, at most
//! `--max-concurrent-per-namespace` of them for one namespace, and, with a `--memory-budget`, at
//! most as many as their estimated memory fits (see [`crate::memory`]). Requests beyond any of them
//! wait in FIFO order (tokio's semaphores are fair); none is dropped. The queue, the running
//! operations and the memory reserved are exported as gauges.
//!
//! A request takes its namespace's share first, then a node slot: a namespace's requests beyond
//! its share wait in their own queue, never in front of another namespace's in the node's. So one
//! tenant (two restore commands that sleep for an hour, a run of a thousand volumes) never holds
//! every slot of a node.
//!
//! Verification drills ([`crate::verify`]) rank below everything else: they acquire without
//! announcing themselves, and whenever another request has to queue, [`Limiter::outranked`] wakes
//! the drills running, which give their slots up and queue again behind it.

use std::sync::Arc;

use stowage_common::shares::NamespaceShares;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::metrics::{GaugeGuard, Metrics};

/// The memory budget, in MiB permits.
struct Budget {
    mib: Arc<Semaphore>,
    total: u32,
}

#[derive(Clone)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    shares: Arc<NamespaceShares>,
    budget: Option<Arc<Budget>>,
    metrics: Metrics,
    /// Notified when a request that outranks drills starts to queue.
    outranked: Arc<Notify>,
    /// Requests that outrank drills, queued now.
    outranking: Arc<std::sync::atomic::AtomicUsize>,
}

/// A running operation's place (and its share of the memory budget); freed on drop.
pub struct Slot {
    _share: OwnedSemaphorePermit,
    _permit: OwnedSemaphorePermit,
    _memory: Option<OwnedSemaphorePermit>,
    _running: GaugeGuard,
    _reserved: Option<GaugeGuard>,
}

impl Limiter {
    /// `memory_budget_mib` 0 means no memory bound (only the count); `per_namespace` is clamped to
    /// 1..=`max_concurrent`.
    pub fn new(
        max_concurrent: u32,
        per_namespace: u32,
        memory_budget_mib: u32,
        metrics: Metrics,
    ) -> Self {
        let max = usize::try_from(max_concurrent).unwrap_or(1).max(1);
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
            slots: Arc::new(Semaphore::new(max)),
            shares: Arc::new(NamespaceShares::new(
                usize::try_from(per_namespace).unwrap_or(1).clamp(1, max),
            )),
            budget,
            metrics,
            outranked: Arc::new(Notify::new()),
            outranking: Arc::default(),
        }
    }

    /// Whether a request that outranks drills is queued now: a drill that just got a slot gives it
    /// back (it may have been queued first).
    pub fn outranked_now(&self) -> bool {
        self.outranking.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// What a running drill listens to: it is notified when another request starts to queue.
    pub fn outranked(&self) -> Arc<Notify> {
        Arc::clone(&self.outranked)
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

    /// Why an operation of `namespace` estimated at `need_mib` would queue now, for the client;
    /// `None` if it would start at once.
    pub fn would_wait(&self, namespace: &str, need_mib: u64) -> Option<String> {
        if self.shares.busy(namespace) {
            return Some(format!(
                "waiting for a slot of namespace {}'s share on this node ({} at once, --max-concurrent-per-namespace)",
                if namespace.is_empty() {
                    "(none)"
                } else {
                    namespace
                },
                self.shares.per_namespace()
            ));
        }
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

    /// Waits for a place in `namespace`'s share (operations that belong to no namespace share
    /// the empty one), then for a slot and for `need_mib` of the memory budget; `None` once the
    /// agent is shutting down. Cancel-safe: dropping the future leaves the queues.
    pub async fn acquire(&self, namespace: &str, need_mib: u64) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        if self.would_wait(namespace, need_mib).is_none() {
            return self.acquire_quietly(namespace, need_mib).await;
        }
        // Drills holding what this request waits for give it up (see the module's comment).
        self.outranking.fetch_add(1, Ordering::SeqCst);
        let counted = scopeguard(&self.outranking);
        self.outranked.notify_waiters();
        let slot = self.acquire_quietly(namespace, need_mib).await;
        drop(counted);
        slot
    }

    /// [`Limiter::acquire`] for a drill: it queues like any request but makes no running drill
    /// yield.
    pub async fn acquire_quietly(&self, namespace: &str, need_mib: u64) -> Option<Slot> {
        let queued = GaugeGuard::new(&self.metrics.queued);
        let share = self.shares.acquire(namespace).await?;
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
            _share: share,
            _permit: permit,
            _memory: memory,
            _running: GaugeGuard::new(&self.metrics.running),
            _reserved: reserved,
        })
    }

    /// Refuses every queued and future request (shutdown).
    pub fn close(&self) {
        self.shares.close();
        self.slots.close();
        if let Some(b) = &self.budget {
            b.mib.close();
        }
    }
}

/// Takes one off `n` when dropped (a queued request that got its slot, or was cancelled).
fn scopeguard(n: &Arc<std::sync::atomic::AtomicUsize>) -> impl Drop + use<> {
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    Counted(Arc::clone(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_request_that_queues_wakes_the_drills_and_a_drill_that_queues_does_not() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(1, 1, 0, m);
        let outranked = l.outranked();
        let drill = l.acquire_quietly("a", 1).await.unwrap();
        // Another drill queues: the running one is not disturbed.
        let notified = outranked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let l2 = l.clone();
        let second_drill = tokio::spawn(async move { l2.acquire_quietly("b", 1).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), notified.as_mut())
                .await
                .is_err()
        );
        assert!(!l.outranked_now());
        // A backup queues: the drill is told and gives its slot up. The drill queued before the
        // backup gets it, sees that a backup waits, and gives it up too.
        let l3 = l.clone();
        let backup = tokio::spawn(async move { l3.acquire("a", 1).await });
        tokio::time::timeout(Duration::from_secs(2), notified)
            .await
            .unwrap();
        assert!(l.outranked_now());
        drop(drill);
        let second = tokio::time::timeout(Duration::from_secs(2), second_drill)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(l.outranked_now());
        drop(second);
        let _b = tokio::time::timeout(Duration::from_secs(2), backup)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!l.outranked_now());
    }

    #[tokio::test]
    async fn never_more_than_max_and_queue_is_counted() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(2, 2, 0, m.clone());
        let a = l.acquire("a", 500).await.unwrap();
        let _b = l.acquire("a", 500).await.unwrap();
        assert!(l.would_wait("a", 1).is_some());
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire("a", 1).await });
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
        assert!(l.acquire("a", 1).await.is_none());
        assert_eq!(m.queued.get(), 0);
    }

    #[tokio::test]
    async fn the_memory_budget_queues_what_does_not_fit_and_runs_the_oversized_alone() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(8, 8, 1000, m.clone());
        let a = l.acquire("a", 600).await.unwrap();
        assert_eq!(m.memory_reserved.get(), 600 << 20);
        let why = l.would_wait("a", 500).unwrap();
        assert!(
            why.contains("500 MiB") && why.contains("600 of the 1000 MiB"),
            "{why}"
        );
        assert!(l.would_wait("a", 400).is_none());
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire("a", 500).await });
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
        let huge = l.acquire("a", 5000).await.unwrap();
        assert_eq!(m.memory_reserved.get(), 1000 << 20);
        assert!(l.would_wait("a", 1).is_some());
        drop(huge);
        assert!(l.would_wait("a", 1000).is_none());
    }

    #[tokio::test]
    async fn a_namespace_beyond_its_share_waits_in_its_own_queue_and_others_go_first() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(3, 2, 0, m.clone());
        let a1 = l.acquire("a", 1).await.unwrap();
        let _a2 = l.acquire("a", 1).await.unwrap();
        let why = l.would_wait("a", 1).unwrap();
        assert!(why.contains("namespace a's share"), "{why}");
        let l2 = l.clone();
        let a3 = tokio::spawn(async move { l2.acquire("a", 1).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!a3.is_finished(), "a's third waits for its share");
        // The node still has a slot, and b takes it although a asked first.
        assert!(l.would_wait("b", 1).is_none());
        let b1 = tokio::time::timeout(Duration::from_secs(2), l.acquire("b", 1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.running.get(), 3);
        drop(b1);
        // The node has a free slot again, but a's share is still full.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!a3.is_finished());
        drop(a1);
        let _a3 = tokio::time::timeout(Duration::from_secs(2), a3)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // Namespaces with nothing in flight are forgotten when another one comes.
        let _c = l.acquire("c", 1).await;
        assert_eq!(l.shares.tracked(), 2, "a (still held) and c; b was idle");
    }
}
