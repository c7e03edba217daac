//! The router's queue of requests waiting for a local slot (or a spill once they have waited
//! `maxQueueWaitMilliseconds`): highest priority first, by arrival within a priority. The head
//! is decided first; see [`super::state`].

use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug)]
pub struct Waiter<T> {
    pub id: u64,
    pub since: Instant,
    /// Its request class's priority.
    pub priority: i32,
    pub item: T,
}

/// Priority then FIFO, with removal by id (a client that goes away leaves its place).
#[derive(Debug)]
pub struct Fifo<T> {
    items: VecDeque<Waiter<T>>,
}

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
        }
    }
}

impl<T> Fifo<T> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many waiters go before a request of `priority` that arrived at `since`: those of a
    /// higher priority, and those of its own that arrived at `since` or before (all of them,
    /// for a new request of the lowest priority waiting).
    pub fn ahead_of(&self, since: Instant, priority: i32) -> usize {
        self.items
            .iter()
            .rposition(|w| w.priority > priority || (w.priority == priority && w.since <= since))
            .map_or(0, |i| i + 1)
    }

    /// In its place: behind every waiter that goes before it (see [`Self::ahead_of`]), so a
    /// retry keeps its arrival and a higher priority goes ahead of lower ones.
    pub fn push(&mut self, id: u64, since: Instant, priority: i32, item: T) {
        let at = self.ahead_of(since, priority);
        self.items.insert(
            at,
            Waiter {
                id,
                since,
                priority,
                item,
            },
        );
    }

    /// When the waiter that has waited longest arrived.
    pub fn oldest_since(&self) -> Option<Instant> {
        self.items.iter().map(|w| w.since).min()
    }

    /// The `i`-th waiter from the head.
    pub fn get(&self, i: usize) -> Option<&Waiter<T>> {
        self.items.get(i)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Waiter<T>> {
        self.items.get_mut(i)
    }

    pub fn remove_at(&mut self, i: usize) -> Option<Waiter<T>> {
        self.items.remove(i)
    }

    /// Removes a waiter wherever it is; `None` when it already left (decided or removed).
    pub fn remove(&mut self, id: u64) -> Option<Waiter<T>> {
        // Waiters leave mostly from the front; search from there.
        let pos = self.items.iter().position(|w| w.id == id)?;
        self.items.remove(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_and_removal_by_id() {
        let now = Instant::now();
        let mut q = Fifo::default();
        for id in 1..=3 {
            q.push(id, now, 0, ());
        }
        assert_eq!(q.remove(2).map(|w| w.id), Some(2));
        assert!(q.remove(2).is_none());
        assert_eq!(q.get(0).map(|w| w.id), Some(1));
        assert_eq!(q.remove_at(0).map(|w| w.id), Some(1));
        assert_eq!(q.remove_at(0).map(|w| w.id), Some(3));
        assert!(q.is_empty());
    }

    #[test]
    fn a_waiter_goes_in_by_arrival_time() {
        let t0 = Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut q = Fifo::default();
        q.push(1, at(10), 0, ());
        q.push(2, at(30), 0, ());
        // A retry that arrived between them, then one that arrived before both, then a tie.
        q.push(3, at(20), 0, ());
        q.push(4, at(5), 0, ());
        q.push(5, at(30), 0, ());
        assert_eq!(
            (
                q.ahead_of(at(0), 0),
                q.ahead_of(at(20), 0),
                q.ahead_of(at(99), 0)
            ),
            (0, 3, 5)
        );
        let order: Vec<u64> = std::iter::from_fn(|| q.remove_at(0).map(|w| w.id)).collect();
        assert_eq!(order, [4, 1, 3, 2, 5]);
    }

    #[test]
    fn a_higher_priority_goes_ahead_and_each_priority_keeps_its_order() {
        let t0 = Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut q = Fifo::default();
        q.push(1, at(10), 0, ());
        q.push(2, at(20), 0, ());
        // Later, but of a higher priority: ahead of both; then another of it, behind it.
        q.push(3, at(30), 50, ());
        q.push(4, at(40), 50, ());
        // Higher still; and a low-priority retry that arrived first keeps its place among its own.
        q.push(5, at(50), 100, ());
        q.push(6, at(5), 0, ());
        assert_eq!(q.ahead_of(at(60), 100), 1, "only one of its own priority");
        assert_eq!(q.ahead_of(at(60), 0), 6, "every waiter");
        assert_eq!(q.ahead_of(at(35), 50), 2);
        let order: Vec<u64> = std::iter::from_fn(|| q.remove_at(0).map(|w| w.id)).collect();
        assert_eq!(order, [5, 3, 4, 6, 1, 2]);
    }
}
