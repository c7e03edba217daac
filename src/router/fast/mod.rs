//! The router's fast path: what lets the common request touch no lock and no shared cache
//! line. Everything here exists for speed alone (see the router benchmark in the README); the
//! rest of the router sees plain types: a [`Backend`] with a slot count, a [`LocalPath`] that
//! may hand out a local slot, and metrics that count.
//!
//! Invariants, stated once:
//!
//! 1. **No engine holds more than this router's cap on it.** A local slot is taken only by a
//!    compare-and-swap on the engine's count that fails at the cap ([`Backend::try_take`]),
//!    with or without the routing lock. The cap is `maxConcurrency`, or what the router's
//!    peers leave it (`router::peers`).
//! 2. **Nobody overtakes the queue.** A request takes a slot without the lock only while the
//!    published queue length is 0, read again before every try.
//! 3. **No waiter is forgotten.** A request that queues publishes the queue length and then
//!    decides the queue head again; a freed slot is published before the queue length is read
//!    ([`LocalPath::release`]). Both are sequentially consistent, so one of the two always sees
//!    the other. (An engine back from being set aside frees no slot: the state pumps the queue
//!    on a timer for it.)
//! 4. **A thread's copy of the backend list and request classes is never older than its id
//!    says.** The id is read before the copy is made, and published after a change, under the
//!    lock.
//! 5. **Metrics add up.** Each serving thread counts in cache lines of its own ([`sharded`]);
//!    a scrape sums them. A gauge's shards may go negative; their sum does not.

pub mod sharded;
mod slots;

pub use slots::{Backend, LocalPath, Mirror, View};
