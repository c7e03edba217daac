//! A coarse timer for the router's per-request deadlines: a client's header read, an engine's
//! answer. tokio's timer costs a wheel insertion and removal under the driver's lock and a
//! cache-aligned allocation for every request; these deadlines are seconds to minutes long, so a
//! sweep every `TICK` that wakes what is due is precise enough, and a request costs one slot.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// How late a deadline may fire.
pub const TICK: Duration = Duration::from_millis(50);

struct Inner {
    epoch: Instant,
    /// Milliseconds since `epoch`, as of the last sweep.
    now_ms: AtomicU64,
    waiting: Mutex<Slab<(u64, Waker)>>,
}

impl Inner {
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<(u64, Waker)>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sweep(&self) {
        let now = self.ms(Instant::now());
        self.now_ms.store(now, Ordering::Release);
        let due: Vec<Waker> = self
            .lock()
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(_, (_, w))| w.clone())
            .collect();
        for w in due {
            w.wake();
        }
    }
}

/// Runs `f` on `target` every `period` for as long as something else holds `target`.
pub fn every<T: Send + Sync + 'static>(
    period: Duration,
    target: &Arc<T>,
    f: impl Fn(&T) + Send + 'static,
) {
    let weak: Weak<T> = Arc::downgrade(target);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(t) = weak.upgrade() else { break };
            f(&t);
        }
    });
}

/// One per serving thread (create it inside the runtime: it spawns its sweeper, which ends
/// when the last clone is dropped).
#[derive(Clone)]
pub struct CoarseTimer {
    inner: Arc<Inner>,
}

impl CoarseTimer {
    /// Spawns the sweeper on the current runtime (hence not `Default`).
    pub fn start() -> Self {
        let inner = Arc::new(Inner {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
            waiting: Mutex::new(Slab::new()),
        });
        every(TICK, &inner, Inner::sweep);
        Self { inner }
    }

    /// Milliseconds on this timer's clock as of its last sweep (up to a `TICK` behind): for
    /// ages that need no clock read of their own.
    pub fn now_ms(&self) -> u64 {
        self.inner.now_ms.load(Ordering::Acquire)
    }

    /// Moves the clock, for tests (the next sweep sets it back to the real time).
    #[cfg(test)]
    pub fn set_now_ms(&self, ms: u64) {
        self.inner.now_ms.store(ms, Ordering::Release);
    }

    pub fn sleep_until(&self, deadline: Instant) -> CoarseSleep {
        CoarseSleep {
            inner: self.inner.clone(),
            // Rounded up: never early.
            at: self.inner.ms(deadline) + 1,
            slot: None,
        }
    }

    /// `fut`'s output, or `None` once `limit` has passed.
    pub async fn within<F: Future>(&self, limit: Duration, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut sleep = self.sleep_until(Instant::now() + limit);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            Pin::new(&mut sleep).poll(cx).map(|()| None)
        })
        .await
    }

    /// Sleeps waiting to be woken, for tests.
    pub fn waiting(&self) -> usize {
        self.inner.lock().len()
    }
}

pub struct CoarseSleep {
    inner: Arc<Inner>,
    at: u64,
    /// The slab key and the waker stored there.
    slot: Option<(usize, Waker)>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.inner.now_ms.load(Ordering::Acquire) >= this.at {
            return Poll::Ready(());
        }
        // The lock only when the task's waker is new to us: once per request, not per poll.
        match &mut this.slot {
            Some((_, w)) if w.will_wake(cx.waker()) => {}
            Some((key, w)) => {
                *w = cx.waker().clone();
                if let Some(e) = this.inner.lock().get_mut(*key) {
                    e.1 = w.clone();
                }
            }
            None => {
                let w = cx.waker().clone();
                let key = this.inner.lock().insert((this.at, w.clone()));
                this.slot = Some((key, w));
            }
        }
        // A sweep between the check above and the registration is caught by the next one.
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some((key, _)) = self.slot.take() {
            self.inner.lock().try_remove(key);
        }
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep_until(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseTimer::sleep_until(self, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_fires_after_it_passes_and_not_before() {
        let t = CoarseTimer::start();
        let start = Instant::now();
        let limit = Duration::from_millis(300);
        let r = t.within(limit, std::future::pending::<()>()).await;
        assert!(r.is_none());
        let took = start.elapsed();
        assert!(took >= limit, "fired after {took:?}");
        assert!(
            took < limit + Duration::from_secs(5),
            "fired after {took:?}"
        );
        assert_eq!(t.waiting(), 0, "a finished sleep leaves no slot behind");
    }

    #[tokio::test]
    async fn a_future_that_finishes_first_wins_and_frees_its_slot() {
        let t = CoarseTimer::start();
        let r = t
            .within(Duration::from_secs(60), async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                7
            })
            .await;
        assert_eq!(r, Some(7));
        assert_eq!(t.waiting(), 0);
    }

    #[tokio::test]
    async fn hyper_sleeps_register_once_and_unregister_on_drop() {
        let t = CoarseTimer::start();
        let mut s = hyper::rt::Timer::sleep(&t, Duration::from_secs(60));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..3 {
            assert!(s.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(t.waiting(), 1);
        drop(s);
        assert_eq!(t.waiting(), 0);
    }
}
