//! Admission and the memory budget.
//!
//! Admission bounds the inputs admitted and not yet answered (`--max-queued-items`). Every admitted input carries
//! a [`Ticket`] from admission until its work is finished or dropped (preprocessing, queue, model), so a caller
//! that disconnects does not free capacity that its work is still using.
//!
//! The memory budget bounds the bytes of request data held before and while it is admitted and prepared (HTTP
//! bodies being read and parsed, gRPC messages, stream messages waiting for admission, fetched image bodies),
//! across all connections (`--memory-budget-bytes`).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Reason};
use crate::telemetry;

/// What to do when there is no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Answer at once with an error (unary calls: RESOURCE_EXHAUSTED / 429).
    Reject,
    /// Wait for room (streams: backpressure instead of errors).
    Wait,
}

/// The bound on inputs admitted and not yet answered.
pub struct AdmissionControl {
    shared: Arc<Shared>,
}

/// What the tickets share with their admission control.
struct Shared {
    permits: Arc<Semaphore>,
    capacity: usize,
    /// Signalled whenever the last admitted input is finished (graceful shutdown waits for it).
    emptied: Notify,
}

impl Shared {
    fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

/// One admitted input's share of the capacity, released (and the gauge lowered) when dropped.
pub struct Ticket {
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        drop(self.permit.take());
        metrics::gauge!(telemetry::ADMITTED_ITEMS).decrement(1.0);
        if self.shared.in_flight() == 0 {
            self.shared.emptied.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket")
    }
}

impl AdmissionControl {
    /// Room for `capacity` inputs.
    pub fn new(capacity: usize) -> Self {
        AdmissionControl {
            shared: Arc::new(Shared { permits: Arc::new(Semaphore::new(capacity)), capacity, emptied: Notify::new() }),
        }
    }

    /// Inputs admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Resolves once no admitted input is left unfinished (at once if none is).
    pub async fn until_empty(&self) {
        loop {
            let emptied = self.shared.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the check, so that a ticket dropped in between still wakes this task.
            emptied.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Admits `n` inputs at once (all or none): one ticket each.
    pub async fn admit(&self, n: usize, mode: Admission) -> Result<Vec<Ticket>, Error> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let capacity = self.shared.capacity;
        if n > capacity {
            return Err(Error::new(
                Reason::TooManyItems,
                format!("request of {n} inputs exceeds the queue capacity of {capacity}"),
            ));
        }
        let count = u32::try_from(n).map_err(|_| Error::new(Reason::TooManyItems, "too many inputs"))?;
        let mut permit = match mode {
            Admission::Reject => self.shared.permits.clone().try_acquire_many_owned(count).map_err(|_| {
                Error::new(Reason::QueueFull, format!("server over capacity ({capacity} inputs queued); retry later"))
            })?,
            Admission::Wait => self
                .shared
                .permits
                .clone()
                .acquire_many_owned(count)
                .await
                .map_err(|_| Error::new(Reason::ShuttingDown, "server is shutting down"))?,
        };
        metrics::gauge!(telemetry::ADMITTED_ITEMS).increment(n as f64);
        let mut tickets = Vec::with_capacity(n);
        for _ in 1..n {
            let one = permit.split(1).expect("a permit of n > 1 splits");
            tickets.push(Ticket { permit: Some(one), shared: self.shared.clone() });
        }
        tickets.push(Ticket { permit: Some(permit), shared: self.shared.clone() });
        Ok(tickets)
    }
}

/// Bytes of request data held at once, across all connections.
pub struct MemoryBudget {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

/// Bytes held against the budget, returned when dropped.
pub struct BudgetPermit {
    _permit: Option<OwnedSemaphorePermit>,
    kib: u32,
}

impl BudgetPermit {
    /// A permit holding nothing.
    pub fn none() -> Self {
        BudgetPermit { _permit: None, kib: 0 }
    }

    /// Adds `other`'s bytes to this permit.
    pub fn merge(&mut self, mut other: BudgetPermit) {
        match (&mut self._permit, other._permit.take()) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
        self.kib += std::mem::take(&mut other.kib);
    }
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        if self.kib > 0 {
            metrics::gauge!(telemetry::BUDGET_BYTES).decrement(self.kib as f64 * 1024.0);
        }
    }
}

impl MemoryBudget {
    /// A budget of `bytes` (at least 1 MiB).
    pub fn new(bytes: usize) -> Self {
        let total_kib = (bytes / 1024).clamp(1024, u32::MAX as usize / 2) as u32;
        MemoryBudget { kib: Arc::new(Semaphore::new(total_kib as usize)), total_kib }
    }

    /// The budget in bytes.
    pub fn total_bytes(&self) -> usize {
        self.total_kib as usize * 1024
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        (self.total_kib as usize - self.kib.available_permits()) * 1024
    }

    /// Waits until some of the budget is free, behind every caller already waiting for room (the semaphore is
    /// fair). Readers call it before taking another message off a connection, so that past the budget they stop
    /// reading (backpressure) instead of decoding more.
    pub async fn wait_for_room(&self) {
        let _ = self.kib.acquire().await;
    }

    /// Holds `bytes` (rounded up to KiB; a single request larger than the whole budget holds all of it). With
    /// `Wait`, waits for room until `deadline` (forever without one); with `Reject`, fails at once when there is
    /// no room. Either failure is MEMORY_BUDGET_EXHAUSTED.
    pub async fn acquire(
        &self,
        bytes: usize,
        mode: Admission,
        deadline: Option<Instant>,
    ) -> Result<BudgetPermit, Error> {
        let kib = bytes.div_ceil(1024).min(self.total_kib as usize) as u32;
        if kib == 0 {
            return Ok(BudgetPermit::none());
        }
        let exhausted = || {
            Error::new(
                Reason::MemoryBudgetExhausted,
                format!(
                    "server is holding its memory budget of {} MiB of request data; retry later",
                    self.total_bytes() >> 20
                ),
            )
        };
        let permit = match mode {
            Admission::Reject => self.kib.clone().try_acquire_many_owned(kib).map_err(|_| exhausted())?,
            Admission::Wait => {
                let acquire = self.kib.clone().acquire_many_owned(kib);
                let permit = match deadline {
                    Some(d) => tokio::time::timeout_at(d.into(), acquire).await.map_err(|_| exhausted())?,
                    None => acquire.await,
                };
                permit.map_err(|_| Error::new(Reason::ShuttingDown, "server is shutting down"))?
            }
        };
        metrics::gauge!(telemetry::BUDGET_BYTES).increment(kib as f64 * 1024.0);
        Ok(BudgetPermit { _permit: Some(permit), kib })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tickets_hold_capacity_until_each_is_dropped() {
        let a = AdmissionControl::new(4);
        let mut t = a.admit(3, Admission::Reject).await.unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(a.in_flight(), 3);
        assert_eq!(a.admit(2, Admission::Reject).await.unwrap_err().reason(), Reason::QueueFull);
        t.pop();
        assert_eq!(a.in_flight(), 2);
        let more = a.admit(2, Admission::Reject).await.unwrap();
        assert_eq!(a.in_flight(), 4);
        drop((t, more));
        assert_eq!(a.in_flight(), 0);
        assert_eq!(a.admit(5, Admission::Wait).await.unwrap_err().reason(), Reason::TooManyItems);
    }

    #[tokio::test]
    async fn until_empty_resolves_when_the_last_ticket_is_dropped() {
        let a = Arc::new(AdmissionControl::new(4));
        a.until_empty().await; // nothing admitted: at once
        let mut tickets = a.admit(2, Admission::Reject).await.unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.until_empty().await }
        });
        tokio::task::yield_now().await;
        tickets.pop();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one input is still admitted");
        drop(tickets);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("signalled").unwrap();
    }

    #[tokio::test]
    async fn the_budget_rejects_or_waits() {
        let b = MemoryBudget::new(2 << 20);
        let first = b.acquire(1536 << 10, Admission::Reject, None).await.unwrap();
        assert_eq!(b.held_bytes(), 1536 << 10);
        let e = b.acquire(1 << 20, Admission::Reject, None).await.err().unwrap();
        assert_eq!(e.reason(), Reason::MemoryBudgetExhausted);
        let soon = Some(Instant::now() + std::time::Duration::from_millis(50));
        assert!(b.acquire(1 << 20, Admission::Wait, soon).await.is_err());
        drop(first);
        let mut all = b.acquire(100 << 20, Admission::Wait, None).await.unwrap(); // clamped to the budget
        assert_eq!(b.held_bytes(), 2 << 20);
        all.merge(BudgetPermit::none());
        drop(all);
        assert_eq!(b.held_bytes(), 0);
    }
}
