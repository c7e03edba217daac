//! The router's FIFO of requests waiting for a local slot (or a spill once they have waited
//! `maxQueueWaitMilliseconds`). The head is decided first; see [`super::state`].

use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug)]
pub struct Waiter<T> {
    pub id: u64,
    pub since: Instant,
    pub item: T,
}

/// FIFO with removal by id (a client that goes away leaves its place).
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

    /// How many waiters arrived at `since` or before (all of them, for a new request).
    pub fn ahead_of(&self, since: Instant) -> usize {
        self.items
            .iter()
            .rposition(|w| w.since <= since)
            .map_or(0, |i| i + 1)
    }

    /// In order of arrival: at the back, unless `since` is earlier (a retry keeps its arrival).
    pub fn push(&mut self, id: u64, since: Instant, item: T) {
        let at = self.ahead_of(since);
        self.items.insert(at, Waiter { id, since, item });
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
            q.push(id, now, ());
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
        q.push(1, at(10), ());
        q.push(2, at(30), ());
        // A retry that arrived between them, then one that arrived before both, then a tie.
        q.push(3, at(20), ());
        q.push(4, at(5), ());
        q.push(5, at(30), ());
        assert_eq!(
            (q.ahead_of(at(0)), q.ahead_of(at(20)), q.ahead_of(at(99))),
            (0, 3, 5)
        );
        let order: Vec<u64> = std::iter::from_fn(|| q.remove_at(0).map(|w| w.id)).collect();
        assert_eq!(order, [4, 1, 3, 2, 5]);
    }
}
