//! The router's Prometheus metrics. Labels are destinations (`local`, a provider's configured
//! name) and fixed outcome words: never a key, a URL with credentials, or a message.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use super::fast::sharded;
use super::outcome::Outcome;

/// The destination label of requests served by a local engine.
pub const LOCAL: &str = "local";
/// The destination label of requests answered by the router itself (rejected, too large, ...).
pub const NONE: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub destination: String,
    /// A declared request class (or `none` for a request refused before it had one).
    pub class: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

/// The latency histograms' buckets: `START × FACTOR^i` seconds (0.1 ms to about 10 min), then
/// +Inf. The simulator measures with the same, so its latency objective reads as a router's.
pub const LATENCY_BUCKET_START: f64 = 0.0001;
pub const LATENCY_BUCKET_FACTOR: f64 = 2.5;
pub const LATENCY_BUCKETS: usize = sharded::BOUNDS;

pub struct RouterMetrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, sharded::Counter>,
    pub in_flight: Family<DestinationLabel, sharded::Gauge>,
    /// Exported as `spillway_router_queue_length` (`autoscale::signals::ROUTER_QUEUE_METRIC`),
    /// by class; the autoscaler sums them.
    pub queue_length: Family<ClassLabel, Gauge>,
    pub duration: Family<DestinationLabel, sharded::Histogram>,
    pub ttfb: Family<DestinationLabel, sharded::Histogram>,
    /// Exported as `spillway_router_time_to_first_token_seconds`
    /// (`autoscale::latency::ROUTER_TTFT_METRIC`): the latency objective's input.
    pub ttft: Family<DestinationLabel, sharded::Histogram>,
    /// Exported as `spillway_router_slot_duration_seconds`
    /// (`autoscale::signals::ROUTER_SLOT_METRIC`).
    pub slot: Family<DestinationLabel, sharded::Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub spend: Family<ProviderLabel, Counter<f64, AtomicU64>>,
    pub breaker_open: Family<ProviderLabel, Gauge>,
    pub backends: Gauge,
    pub capacity_exhausted: Gauge,
    pub config_reloads: Family<OutcomeLabel, Counter>,
    pub engine_set_asides: Counter,
    /// Requests sent to a provider while the peers' last reports showed a local slot free
    /// (only while a peer is silent: with fresh reports such a request waits for the slot).
    pub spilled_with_local_room: Counter,
    /// Seconds since each peer router (by address) was last heard; +Inf: never.
    pub peer_report_age: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// The peers `peer_report_age` shows, to drop those no longer listed.
    peers_shown: std::sync::Mutex<Vec<PeerLabel>>,
    revision_requests: Family<RevisionOutcome, sharded::Counter>,
    revision_ttft: GateHistogram,
    revision_duration: Family<RevisionLabel, sharded::Histogram>,
    shadow: Family<ShadowLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionOutcome {
    pub revision: String,
    /// `ok`, `client_error` (4xx but 429) or `error` (a 5xx or 429 answer, or one cut off
    /// mid-way).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabel {
    pub revision: String,
}

type GateHistogram = Family<RevisionLabel, Histogram, fn() -> Histogram>;

fn gate_histogram() -> Histogram {
    let b = crate::rollout::gate::buckets();
    Histogram::new(b.bounds().iter().copied().filter(|x| x.is_finite()))
}

/// One revision's handles, for the rollout gate: what its engines answered, and how soon.
#[derive(Debug)]
pub struct RevisionMetrics {
    pub name: std::sync::Arc<str>,
    ok: sharded::Counter,
    client_errors: sharded::Counter,
    errors: sharded::Counter,
    /// Locked (it has 120 buckets, too many to shard), but observed once per streamed answer
    /// only: a stream costs far more than the lock.
    pub ttft: Histogram,
    /// Arrival to the end of the answer, in the latency buckets.
    pub duration: sharded::Histogram,
    shadow: Family<ShadowLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub revision: String,
    /// `same`, `different`, `unanswered` (see `router::shadow::Compared`), or `skipped` (no
    /// free slot on the revision's engines: a mirror never waits).
    pub result: &'static str,
}

impl RevisionMetrics {
    /// Counts a mirrored request to this revision by how it went.
    pub fn shadowed(&self, result: &'static str) {
        self.shadow
            .get_or_create(&ShadowLabels {
                revision: self.name.to_string(),
                result,
            })
            .inc();
    }

    /// Counts an answer from one of its engines; a client that went away says nothing of it.
    pub fn answered(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.ok.inc(),
            Outcome::ClientError => self.client_errors.inc(),
            Outcome::UpstreamError | Outcome::Aborted => self.errors.inc(),
            _ => {}
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

impl RouterMetrics {
    /// Publishes each peer's report age (by address; `None`: never heard) and drops peers no
    /// longer listed.
    pub fn set_peer_ages(&self, ages: &[(String, Option<(String, i64)>)]) {
        let listed: Vec<PeerLabel> = ages
            .iter()
            .map(|(a, _)| PeerLabel { peer: a.clone() })
            .collect();
        for (label, (_, heard)) in listed.iter().zip(ages) {
            let age = heard
                .as_ref()
                .map_or(f64::INFINITY, |(_, ms)| *ms as f64 / 1000.0);
            self.peer_report_age.get_or_create(label).set(age);
        }
        let mut shown = self.peers_shown.lock().unwrap_or_else(|e| e.into_inner());
        for gone in shown.iter().filter(|l| !listed.contains(l)) {
            self.peer_report_age.remove(gone);
        }
        *shown = listed;
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("spillway_router");
        let requests = Family::<RequestLabels, sharded::Counter>::default();
        let in_flight = Family::<DestinationLabel, sharded::Gauge>::default();
        let queue_length = Family::<ClassLabel, Gauge>::default();
        // 0.1 ms .. ~10 min: proxy overhead at the bottom, long streams at the top.
        let buckets =
            || sharded::Histogram::exponential(LATENCY_BUCKET_START, LATENCY_BUCKET_FACTOR);
        let duration =
            Family::<DestinationLabel, sharded::Histogram>::new_with_constructor(buckets);
        let ttfb = Family::<DestinationLabel, sharded::Histogram>::new_with_constructor(buckets);
        let ttft = Family::<DestinationLabel, sharded::Histogram>::new_with_constructor(buckets);
        let slot = Family::<DestinationLabel, sharded::Histogram>::new_with_constructor(buckets);
        let tokens = Family::<TokenLabels, Counter>::default();
        let spend = Family::<ProviderLabel, Counter<f64, AtomicU64>>::default();
        let breaker_open = Family::<ProviderLabel, Gauge>::default();
        let backends = Gauge::default();
        let capacity_exhausted = Gauge::default();
        let config_reloads = Family::<OutcomeLabel, Counter>::default();
        let engine_set_asides = Counter::default();
        let spilled_with_local_room = Counter::default();
        let peer_report_age = Family::<PeerLabel, Gauge<f64, AtomicU64>>::default();
        let revision_requests = Family::<RevisionOutcome, sharded::Counter>::default();
        let revision_ttft = GateHistogram::new_with_constructor(gate_histogram);
        let revision_duration =
            Family::<RevisionLabel, sharded::Histogram>::new_with_constructor(buckets);
        registry.register_with_unit(
            "revision_request_duration",
            "Time from request arrival to the end of the answer, by the revision whose engine answered",
            Unit::Seconds,
            revision_duration.clone(),
        );
        let shadow = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "shadow_requests",
            "Requests mirrored to a revision in its shadow stage, by how its answer compared with the client's (same, different, unanswered) or skipped for want of a free slot",
            shadow.clone(),
        );
        registry.register(
            "revision_requests",
            "Answers from each revision's engines, by outcome (ok, client_error, error): the rollout gate's input",
            revision_requests.clone(),
        );
        registry.register_with_unit(
            "revision_time_to_first_token",
            "Time to first token of streamed answers from each revision's engines, in buckets 10% apart",
            Unit::Seconds,
            revision_ttft.clone(),
        );
        registry.register(
            "spilled_with_local_room",
            "Requests sent to a provider while the peer routers' last reports showed a local engine slot free",
            spilled_with_local_room.clone(),
        );
        registry.register_with_unit(
            "peer_report_age",
            "Time since each peer router of this service was last heard (+Inf: never)",
            Unit::Seconds,
            peer_report_age.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by destination (local or provider name), request class and outcome",
            requests.clone(),
        );
        registry.register(
            "in_flight",
            "Requests being served, by destination",
            in_flight.clone(),
        );
        registry.register(
            "queue_length",
            "Requests waiting for a local engine slot, by request class",
            queue_length.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from request arrival to the end of the response",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register_with_unit(
            "time_to_first_byte",
            "Time from request arrival to the first response body byte",
            Unit::Seconds,
            ttfb.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Time from request arrival to the first byte of a streamed (event-stream) answer",
            Unit::Seconds,
            ttft.clone(),
        );
        // Its rate and mean give the autoscaler the spilled demand in engine slots.
        registry.register_with_unit(
            "slot_duration",
            "Time an answered request held a slot of its destination (an engine's or a provider's concurrency)",
            Unit::Seconds,
            slot.clone(),
        );
        registry.register(
            "provider_tokens",
            "Tokens reported by burst providers, by kind (prompt, completion)",
            tokens.clone(),
        );
        registry.register(
            "provider_spend",
            "Burst spend from provider usage times configured pricing, in the pricing currency",
            spend.clone(),
        );
        registry.register(
            "provider_breaker_open",
            "1 while a provider's circuit breaker is open",
            breaker_open.clone(),
        );
        registry.register(
            "backends",
            "Ready local engines known to the router",
            backends.clone(),
        );
        registry.register(
            "capacity_exhausted",
            "1 while the controller reports in-cluster capacity exhausted",
            capacity_exhausted.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome (applied, invalid)",
            config_reloads.clone(),
        );
        registry.register(
            "engine_set_asides",
            "Times a local engine was given no new requests for a while after a connection to it failed before any answer",
            engine_set_asides.clone(),
        );
        Self {
            registry,
            requests,
            in_flight,
            queue_length,
            duration,
            ttfb,
            ttft,
            slot,
            tokens,
            spend,
            breaker_open,
            backends,
            capacity_exhausted,
            config_reloads,
            engine_set_asides,
            spilled_with_local_room,
            peer_report_age,
            peers_shown: Default::default(),
            revision_requests,
            revision_ttft,
            revision_duration,
            shadow,
        }
    }
}

/// One destination's metric handles, resolved once: the per-request path then does no label
/// hashing or allocation for them.
#[derive(Clone, Debug)]
pub struct DestMetrics {
    pub in_flight: sharded::Gauge,
    pub duration: sharded::Histogram,
    pub ttfb: sharded::Histogram,
    pub ttft: sharded::Histogram,
    pub slot: sharded::Histogram,
}

/// The class label of requests that ended before they had a class (an unknown class).
pub use crate::api::NO_CLASS;

impl RouterMetrics {
    pub fn for_destination(&self, destination: &str) -> DestMetrics {
        let d = DestinationLabel {
            destination: destination.to_string(),
        };
        DestMetrics {
            in_flight: self.in_flight.get_or_create(&d).clone(),
            duration: self.duration.get_or_create(&d).clone(),
            ttfb: self.ttfb.get_or_create(&d).clone(),
            ttft: self.ttft.get_or_create(&d).clone(),
            slot: self.slot.get_or_create(&d).clone(),
        }
    }

    pub fn for_revision(&self, name: std::sync::Arc<str>) -> RevisionMetrics {
        let counter = |outcome| {
            self.revision_requests
                .get_or_create(&RevisionOutcome {
                    revision: name.to_string(),
                    outcome,
                })
                .clone()
        };
        RevisionMetrics {
            ok: counter("ok"),
            client_errors: counter("client_error"),
            errors: counter("error"),
            ttft: self
                .revision_ttft
                .get_or_create(&RevisionLabel {
                    revision: name.to_string(),
                })
                .clone(),
            duration: self
                .revision_duration
                .get_or_create(&RevisionLabel {
                    revision: name.to_string(),
                })
                .clone(),
            shadow: self.shadow.clone(),
            name,
        }
    }

    /// Stops exporting a revision that no longer exists (a long-lived router would otherwise
    /// keep every past rollout's series, 120 buckets each).
    pub fn forget_revision(&self, name: &str) {
        let revision = name.to_string();
        for outcome in ["ok", "client_error", "error"] {
            self.revision_requests.remove(&RevisionOutcome {
                revision: revision.clone(),
                outcome,
            });
        }
        for result in ["same", "different", "unanswered", "skipped"] {
            self.shadow.remove(&ShadowLabels {
                revision: revision.clone(),
                result,
            });
        }
        let label = RevisionLabel { revision };
        self.revision_ttft.remove(&label);
        self.revision_duration.remove(&label);
    }

    /// Counts a request of `class` that ended with `outcome`.
    pub fn request(&self, destination: &str, class: &str, outcome: Outcome) {
        self.requests
            .get_or_create(&RequestLabels {
                destination: destination.to_string(),
                class: class.to_string(),
                outcome: outcome.label(),
            })
            .inc();
    }

    /// The queue-length gauge of `class`.
    pub fn queued(&self, class: &str) -> Gauge {
        self.queue_length
            .get_or_create(&ClassLabel {
                class: class.to_string(),
            })
            .clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gauge_has_the_name_the_autoscaler_reads() {
        let m = RouterMetrics::default();
        m.queued("batch").set(3);
        let text = m.render();
        let want = format!(
            "{}{{class=\"batch\"}} 3",
            crate::autoscale::signals::ROUTER_QUEUE_METRIC
        );
        assert!(text.lines().any(|l| l == want), "{text}");
    }
}
