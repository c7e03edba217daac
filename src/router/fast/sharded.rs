//! Per-request metrics that each serving thread updates in cache lines of its own, summed when
//! scraped. A single shared counter or histogram made the cores hand the same lines back and
//! forth on every request (and prometheus-client's histogram takes a lock per observation).

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Threads beyond this share shards (still correct, only less spread).
const SHARDS: usize = 8;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread update its own shard; other threads share shard 0.
pub fn use_shard(thread: usize) {
    SHARD.with(|s| s.set(thread % SHARDS));
}

fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// A cache line (or two, for adjacent-line prefetch) per shard.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

type Shards<T> = [Padded<T>; SHARDS];

#[derive(Clone, Default)]
pub struct Counter(Arc<Shards<AtomicU64>>);

impl Counter {
    pub fn inc(&self) {
        self.0[shard()].0.fetch_add(1, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counter({})", self.get())
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Goes up and down on the same thread (a request stays on its thread); shards may go negative
/// when it does not, their sum is still right.
#[derive(Clone, Default)]
pub struct Gauge(Arc<Shards<AtomicI64>>);

impl Gauge {
    pub fn inc(&self) {
        self.0[shard()].0.fetch_add(1, Relaxed);
    }

    pub fn dec(&self) {
        self.0[shard()].0.fetch_sub(1, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

impl fmt::Debug for Gauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gauge({})", self.get())
    }
}

impl TypedMetric for Gauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Gauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Finite upper bounds of a histogram; one more bucket (`+Inf`) follows them.
pub const BOUNDS: usize = 18;

#[derive(Default)]
struct HistogramShard {
    /// f64 bits.
    sum: AtomicU64,
    /// Per bucket, not cumulative; the count is their sum, so a scrape never sees the two
    /// disagree.
    buckets: [AtomicU64; BOUNDS + 1],
}

struct HistogramInner {
    bounds: [f64; BOUNDS],
    shards: Shards<HistogramShard>,
}

#[derive(Clone)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    /// Bounds `start`, `start * factor`, ... (`BOUNDS` of them), then `+Inf`.
    pub fn exponential(start: f64, factor: f64) -> Self {
        // As prometheus-client computes them, so the `le` labels stay the same.
        let mut bounds = [0.0; BOUNDS];
        for (i, slot) in bounds.iter_mut().enumerate() {
            *slot = start * factor.powf(i as f64);
        }
        Histogram(Arc::new(HistogramInner {
            bounds,
            shards: Default::default(),
        }))
    }

    pub fn observe(&self, v: f64) {
        let inner = &*self.0;
        let s = &inner.shards[shard()].0;
        // NaN falls in +Inf, as prometheus-client does.
        let i = inner.bounds.iter().position(|b| v <= *b).unwrap_or(BOUNDS);
        s.buckets[i].fetch_add(1, Relaxed);
        // Uncontended: the shard is this thread's.
        let _ = s.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
    }

    /// (sum, count, per-bucket counts with their upper bounds).
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.0;
        let mut buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .map(|b| (b, 0))
            .collect();
        let mut sum = 0.0;
        for s in &inner.shards {
            sum += f64::from_bits(s.0.sum.load(Relaxed));
            for (total, n) in buckets.iter_mut().zip(&s.0.buckets) {
                total.1 += n.load(Relaxed);
            }
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum, count, buckets)
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sum, count, _) = self.totals();
        write!(f, "Histogram(sum {sum}, count {count})")
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn render(r: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    }

    #[test]
    fn updates_from_several_threads_add_up() {
        let (c, g) = (Counter::default(), Gauge::default());
        let h = Histogram::exponential(1.0, 2.0);
        std::thread::scope(|s| {
            for t in 0..SHARDS + 2 {
                let (c, g, h) = (&c, &g, &h);
                s.spawn(move || {
                    use_shard(t);
                    for _ in 0..1000 {
                        c.inc();
                        g.inc();
                        h.observe(3.0);
                    }
                    g.dec();
                });
            }
        });
        let n = (SHARDS as u64 + 2) * 1000;
        assert_eq!((c.get(), g.get()), (n, n as i64 - SHARDS as i64 - 2));
        let (sum, count, buckets) = h.totals();
        assert_eq!((sum, count), (3.0 * n as f64, n));
        // 3.0 falls in the bucket bounded by 4.0.
        assert_eq!(buckets[2], (4.0, n));
    }

    /// Encoded as prometheus-client's own types are, so scrapes and dashboards see no change.
    #[test]
    fn encoded_like_the_library_metrics() {
        use prometheus_client::metrics::{counter, gauge, histogram};
        let (mut ours, mut theirs) = (Registry::default(), Registry::default());
        let (c, g) = (Counter::default(), Gauge::default());
        let h = Histogram::exponential(0.0001, 2.5);
        let (lc, lg) = (
            counter::Counter::<u64>::default(),
            gauge::Gauge::<i64>::default(),
        );
        let lh =
            histogram::Histogram::new(histogram::exponential_buckets(0.0001, 2.5, BOUNDS as u16));
        for v in [0.0001, 0.1, 0.5, 0.7, 3.0, 1e9, f64::NAN] {
            h.observe(v);
            lh.observe(v);
        }
        for _ in 0..3 {
            c.inc();
            lc.inc();
            g.inc();
            lg.inc();
        }
        g.dec();
        lg.dec();
        ours.register("c", "c", c);
        ours.register("g", "g", g);
        ours.register("h", "h", h);
        theirs.register("c", "c", lc);
        theirs.register("g", "g", lg);
        theirs.register("h", "h", lh);
        // NaN makes both sums NaN; everything else must match line for line.
        assert_eq!(render(&ours), render(&theirs));
    }
}
