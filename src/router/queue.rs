//! The router's FIFO of requests waiting for a local slot (or a spill once they have waited
//! `maxQueueWaitMilliseconds`). Only the head is ever decided; see [`super::state`].

use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug)]
pub struct Waiter<T> {
    pub id: u64,
    pub since: Instant,
    pub tx: T,
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

    pub fn push(&mut self, id: u64, since: Instant, tx: T) {
        self.items.push_back(Waiter { id, since, tx });
    }

    pub fn head(&self) -> Option<&Waiter<T>> {
        self.items.front()
    }

    pub fn pop(&mut self) -> Option<Waiter<T>> {
        self.items.pop_front()
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
        assert_eq!(q.head().map(|w| w.id), Some(1));
        assert_eq!(q.pop().map(|w| w.id), Some(1));
        assert_eq!(q.pop().map(|w| w.id), Some(3));
        assert!(q.is_empty());
    }
}
