//! Where requests go: local engines (their list kept across updates) and burst providers
//! (their load, breaker and key kept across reloads by name).

use std::sync::Arc;
use std::time::Duration;

use crate::api::{Pricing, ProviderEndpoint};
use crate::clock::Millis;
use crate::router::breaker::CircuitBreaker;
use crate::router::config::{ProviderConfig, RouterConfig};
use crate::router::fast::Backend;
use crate::router::keys::{KeyState, read_key};
use crate::router::metrics::{self, DestMetrics, RevisionMetrics, RouterMetrics};

/// A burst provider as configured; in-flight requests keep the snapshot they started with.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    /// The provider's base URL without a trailing slash (e.g. `https://api.together.xyz/v1`).
    pub base: String,
    pub model: String,
    pub key_file: Option<String>,
    pub max_concurrency: u32,
    pub timeout: Duration,
    pub pricing: Option<Pricing>,
    /// The endpoints requests may spill to it on.
    pub endpoints: Vec<ProviderEndpoint>,
    /// Answers keep its model name.
    pub expose_model: bool,
    pub metrics: DestMetrics,
}

impl Provider {
    fn new(p: &ProviderConfig, m: &RouterMetrics) -> Self {
        Self {
            metrics: m.for_destination(&p.name),
            name: p.name.clone(),
            base: p.url.trim_end_matches('/').to_string(),
            model: p.model.clone(),
            key_file: p.api_key_file.clone(),
            max_concurrency: p.max_concurrency,
            timeout: Duration::from_secs(u64::from(p.timeout_seconds)),
            pricing: p.pricing.clone(),
            endpoints: p.endpoints.clone(),
            expose_model: p.expose_model,
        }
    }

    /// Whether a request for `endpoint` may spill to it (`None`: one that may not spill).
    pub fn serves(&self, endpoint: Option<ProviderEndpoint>) -> bool {
        endpoint.is_some_and(|e| self.endpoints.contains(&e))
    }
}

/// Where a leased request goes.
#[derive(Clone, Debug)]
pub enum Dest {
    Local(Arc<Backend>),
    Provider(Arc<Provider>),
}

impl Dest {
    /// The metrics label: `local`, or the provider's name.
    pub fn label(&self) -> &str {
        match self {
            Dest::Local(_) => metrics::LOCAL,
            Dest::Provider(p) => &p.name,
        }
    }
}

/// Circuit breaker settings for every provider.
#[derive(Clone, Copy, Debug)]
pub struct BreakerSettings {
    pub failures: u32,
    pub open: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open: Duration::from_secs(30),
        }
    }
}

/// Destinations a retried request must not go back to, and the revision it is meant for.
#[derive(Clone, Debug, Default)]
pub struct Excluded {
    pub locals: Vec<String>,
    pub providers: Vec<String>,
    /// Not an exclusion: the revision whose engines it goes to first (see
    /// `BackendLoad::preferred`). Chosen once, kept through retries and the queue.
    pub revision: Option<Arc<str>>,
}

impl Excluded {
    /// Nothing excluded (whatever the revision).
    pub fn is_empty(&self) -> bool {
        self.locals.is_empty() && self.providers.is_empty()
    }

    /// What a queued retry stays away from: the providers. A failed engine is set aside for
    /// a while instead, for every request, and may take the retry once it is back.
    pub fn providers_only(&self) -> Self {
        Self {
            providers: self.providers.clone(),
            revision: self.revision.clone(),
            ..Self::default()
        }
    }

    pub fn add(&mut self, dest: &Dest) {
        match dest {
            Dest::Local(b) => self.locals.push(b.addr.clone()),
            Dest::Provider(p) => self.providers.push(p.name.clone()),
        }
    }
}

/// A provider with its live load, breaker and key.
pub(super) struct ProviderSlot {
    pub p: Arc<Provider>,
    pub in_flight: u32,
    /// What this router may have on it: `maxConcurrency`, or what its peers leave it.
    pub cap: u32,
    pub breaker: CircuitBreaker,
    pub key: KeyState,
}

/// The providers a config names, each with a closed breaker and its key read now.
pub(super) fn provider_slots(
    cfg: &RouterConfig,
    breaker: BreakerSettings,
    m: &RouterMetrics,
) -> Vec<ProviderSlot> {
    cfg.burst
        .providers
        .iter()
        .map(|p| ProviderSlot {
            key: read_key(p.api_key_file.as_deref()),
            p: Arc::new(Provider::new(p, m)),
            in_flight: 0,
            cap: p.max_concurrency,
            breaker: CircuitBreaker::new(breaker.failures, breaker.open.as_millis() as Millis),
        })
        .collect()
}

/// Replaces `current` with `configured` (the providers of a new config): each keeps the load
/// and breaker of the one of its name before, or of a retired one still serving requests;
/// providers left out with requests on them are retired with their count.
pub(super) fn carry_over_providers(
    current: &mut Vec<ProviderSlot>,
    retired: &mut Vec<(String, u32)>,
    mut configured: Vec<ProviderSlot>,
) {
    for slot in &mut configured {
        if let Some(old) = current.iter().find(|o| o.p.name == slot.p.name) {
            slot.in_flight = old.in_flight;
            slot.breaker = old.breaker.clone();
        } else if let Some(i) = retired.iter().position(|(n, _)| *n == slot.p.name) {
            slot.in_flight = retired.swap_remove(i).1;
        }
    }
    let old = std::mem::replace(current, configured);
    retired.extend(
        old.into_iter()
            .filter(|o| o.in_flight > 0 && !current.iter().any(|n| n.p.name == o.p.name))
            .map(|o| (o.p.name.clone(), o.in_flight)),
    );
}

/// Frees a slot of provider `name`, current or retired.
pub(super) fn release_provider(
    current: &mut [ProviderSlot],
    retired: &mut Vec<(String, u32)>,
    name: &str,
) {
    if let Some(s) = current.iter_mut().find(|s| s.p.name == name) {
        s.in_flight = s.in_flight.saturating_sub(1);
    } else if let Some(i) = retired.iter().position(|(n, _)| n == name) {
        let n = &mut retired[i].1;
        *n = n.saturating_sub(1);
        if *n == 0 {
            retired.swap_remove(i);
        }
    }
}

/// The engine list for `addrs`, each with its revision (duplicates dropped): engines already
/// known (of the same revision) keep their count. Returns it with the removed engines
/// something still holds (a lease, a thread's copy), kept so that one that comes back keeps
/// its count and is not overloaded.
pub(super) fn replace_backends(
    mut old: Vec<Arc<Backend>>,
    addrs: Vec<(String, Option<Arc<RevisionMetrics>>)>,
) -> (Vec<Arc<Backend>>, Vec<Arc<Backend>>) {
    let mut next: Vec<Arc<Backend>> = Vec::with_capacity(addrs.len());
    let name = |r: &Option<Arc<RevisionMetrics>>| r.as_ref().map(|m| m.name.clone());
    for (a, rev) in addrs {
        if next.iter().any(|b| b.addr == a) {
            continue;
        }
        let b = match old
            .iter()
            .position(|b| b.addr == a && name(&b.revision) == name(&rev))
        {
            Some(i) => old.swap_remove(i),
            None => Arc::new(Backend::of_revision(a, rev)),
        };
        next.push(b);
    }
    // Held only here: no lease counts on it and no thread's copy can take a slot on it.
    let draining = old
        .into_iter()
        .filter(|b| Arc::strong_count(b) > 1)
        .collect();
    (next, draining)
}

/// The budget caps a config sets: requests per minute, spend per hour.
pub(super) fn budget_limits(cfg: &RouterConfig) -> (Option<u32>, Option<f64>) {
    let b = cfg.burst.budget.as_ref();
    (
        b.and_then(|b| b.max_requests_per_minute),
        b.and_then(|b| b.max_spend_per_hour.as_deref())
            .and_then(|s| crate::router::budget::parse_spend(s).ok()),
    )
}
