//! The router's settings: the file it reads standalone, and the ConfigMap `<name>-router`
//! the controller renders (same shape; keys may grow). Never holds a secret: API keys are
//! files (a mounted Secret), named by `apiKeyFile`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{
    BurstMode, InferenceService, Pricing, ProviderEndpoint, RequestClasses, ScalingPolicySpec,
    default_provider_endpoints,
};

/// ConfigMap key holding the config.
pub const CONFIG_KEY: &str = "router.yaml";
/// Where provider API keys are mounted in router pods: one file per provider, named after it.
pub const KEYS_DIR: &str = "/etc/spillway/keys";
/// Port the router listens on in a cluster.
pub const ROUTER_PORT: u16 = 8080;
/// UDP port routers exchange their counts on (`peers.port`).
pub const PEER_PORT: u16 = 8081;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Static engine addresses (`host:port`); in a cluster they come from EndpointSlices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
    /// Requests one engine gets at once from this router while it shares with no peer: alone,
    /// `engine.maxConcurrency`; one of several, its even share (the whole is in
    /// `peers.shared`). So are the providers' `maxConcurrency` and the budget.
    #[serde(default = "default_concurrency")]
    pub max_concurrency_per_backend: u32,
    /// The service's other routers, with which this one shares every limit that holds across
    /// them (engine slots, provider concurrency, the budget). Absent: this router keeps to the
    /// limits above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub burst: BurstConfig,
    /// The service's request classes (see `InferenceService.spec.requestClasses`); without
    /// them every request is of one class that bursts as `burst.mode` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_classes: Option<RequestClasses>,
    /// Where this router runs in a cluster (absent standalone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// How a router finds and hears its peers (see `router::peers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeersConfig {
    /// How many routers the service runs: until it has heard them, a router counts each
    /// as using its even share of every limit.
    pub replicas: u32,
    /// UDP port the routers send their reports to (and this one listens on, at the listen
    /// address's IP).
    #[serde(default = "default_peer_port")]
    pub port: u16,
    /// Static peers (`host:port`) for a router run by hand; in a cluster they are the router
    /// pods the client Service's EndpointSlices list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// A peer not heard from for this long counts as using its even share (or what it last
    /// reported, if more).
    #[serde(default = "default_stale_after")]
    pub stale_after_milliseconds: u64,
    /// The limits the routers share, whole; each one absent is the top-level one. (The
    /// top-level ones are a router's share, so that a router of an earlier version reading
    /// this config, which knows no peers, keeps to its share during an upgrade.)
    #[serde(default)]
    pub shared: SharedLimits,
}

/// The whole of each limit the routers share (see [`PeersConfig::shared`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency_per_backend: Option<u32>,
    /// Each provider's `maxConcurrency`, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub providers: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spend_per_hour: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueConfig {
    #[serde(default = "default_queue_limit")]
    pub limit: u32,
    #[serde(default = "default_queue_timeout")]
    pub timeout_seconds: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BurstConfig {
    #[serde(default)]
    pub mode: BurstMode,
    #[serde(default)]
    pub max_queue_wait_milliseconds: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfig {
    pub name: String,
    /// Base URL of the OpenAI-compatible API (…/v1).
    pub url: String,
    /// The provider's model name; `model` in the request is rewritten to it.
    pub model: String,
    /// File holding the API key (re-read when it changes). The key itself is never in config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    #[serde(default = "default_concurrency")]
    pub max_concurrency: u32,
    #[serde(default = "default_provider_timeout")]
    pub timeout_seconds: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// The endpoints requests may spill to it on (default: chat, completions).
    #[serde(default = "default_provider_endpoints")]
    pub endpoints: Vec<ProviderEndpoint>,
    /// Answers keep the provider's model name instead of the one the client asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expose_model: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_minute: Option<u32>,
    /// Decimal string, e.g. "5.00".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spend_per_hour: Option<String>,
}

/// In a cluster: which InferenceService this router serves (its status carries the capacity
/// state) and which headless Service's EndpointSlices list the engines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    pub namespace: String,
    pub inference_service: String,
    pub engine_service: String,
    pub engine_port: u16,
    /// The Service in front of the routers: its EndpointSlices list this router's peers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub router_service: String,
    /// The model name clients send (for `/v1/models`).
    pub model: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            limit: default_queue_limit(),
            timeout_seconds: default_queue_timeout(),
        }
    }
}

impl Default for BurstConfig {
    fn default() -> Self {
        Self {
            mode: BurstMode::Saturated,
            max_queue_wait_milliseconds: 0,
            providers: Vec::new(),
            budget: None,
        }
    }
}

fn default_listen() -> String {
    format!("127.0.0.1:{ROUTER_PORT}")
}
fn default_peer_port() -> u16 {
    PEER_PORT
}
fn default_stale_after() -> u64 {
    500
}
fn default_concurrency() -> u32 {
    64
}
fn default_queue_limit() -> u32 {
    1000
}
fn default_queue_timeout() -> u32 {
    30
}
fn default_provider_timeout() -> u32 {
    120
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing router config: {0}")]
    Parse(String),
    #[error("invalid router config: {0}")]
    Invalid(String),
}

impl RouterConfig {
    /// Parses and validates YAML (or JSON, a subset).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: RouterConfig =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        if self.max_concurrency_per_backend == 0 {
            errs.push("maxConcurrencyPerBackend must be >= 1".to_string());
        }
        if let Some(p) = &self.peers {
            if p.replicas == 0 {
                errs.push("peers.replicas must be >= 1".to_string());
            }
            if p.stale_after_milliseconds == 0 {
                errs.push("peers.staleAfterMilliseconds must be >= 1".to_string());
            }
            if let Some(s) = p.shared.max_spend_per_hour.as_deref()
                && let Err(e) = super::budget::parse_spend(s)
            {
                errs.push(format!("peers.shared: {e}"));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.burst.providers {
            if !names.insert(p.name.as_str()) {
                errs.push(format!("provider name {:?} is not unique", p.name));
            }
            if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                errs.push(format!(
                    "provider {:?}: url {:?} must start with http:// or https://",
                    p.name, p.url
                ));
            }
            if p.max_concurrency == 0 {
                errs.push(format!(
                    "provider {:?}: maxConcurrency must be >= 1",
                    p.name
                ));
            }
        }
        if let Some(classes) = &self.request_classes {
            let providers: Vec<&str> = self
                .burst
                .providers
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            errs.extend(classes.problems(&providers));
        }
        if let Some(s) = self
            .burst
            .budget
            .as_ref()
            .and_then(|b| b.max_spend_per_hour.as_deref())
            && let Err(e) = super::budget::parse_spend(s)
        {
            errs.push(e);
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs.join("; ")))
        }
    }
}

/// Renders the router config for a service and its effective policy (what the controller
/// writes into ConfigMap `<name>-router`).
pub fn render(
    isvc: &InferenceService,
    policy: &ScalingPolicySpec,
    engine_service: &str,
) -> RouterConfig {
    let spec = &isvc.spec;
    let burst = spec.burst.as_ref();
    // The routers share each limit whole through their peers (`peers.shared`); the top-level
    // limits are each router's even share, rounded down, for a router that hears no peer, and
    // for a router of an earlier version that reads this config during an upgrade.
    let replicas = spec.router.replicas.max(1);
    let whole = |n: i32| n.max(1) as u32;
    let share = |n: i32| (n.max(1) / replicas).max(1) as u32;
    let providers = burst.map_or(&[][..], |b| &b.providers[..]);
    let budget = burst.and_then(|b| b.budget.as_ref());
    RouterConfig {
        listen: format!("0.0.0.0:{ROUTER_PORT}"),
        backends: Vec::new(),
        max_concurrency_per_backend: share(spec.engine.max_concurrency),
        peers: Some(PeersConfig {
            replicas: whole(spec.router.replicas),
            port: PEER_PORT,
            addresses: Vec::new(),
            stale_after_milliseconds: default_stale_after(),
            shared: SharedLimits {
                max_concurrency_per_backend: Some(whole(spec.engine.max_concurrency)),
                providers: providers
                    .iter()
                    .map(|p| (p.name.clone(), whole(p.max_concurrency)))
                    .collect(),
                // 0 stays 0: no spill at all.
                max_requests_per_minute: budget
                    .and_then(|b| b.max_requests_per_minute)
                    .map(|m| m.max(0) as u32),
                max_spend_per_hour: budget.and_then(|b| b.max_spend_per_hour.clone()),
            },
        }),
        queue: QueueConfig {
            limit: spec.router.queue_limit.max(0) as u32,
            timeout_seconds: spec.router.queue_timeout_seconds.max(1) as u32,
        },
        burst: BurstConfig {
            mode: policy.burst.mode,
            max_queue_wait_milliseconds: policy.burst.max_queue_wait_milliseconds.max(0) as u64,
            providers: burst
                .map(|b| {
                    b.providers
                        .iter()
                        .map(|p| ProviderConfig {
                            name: p.name.clone(),
                            url: p.url.clone(),
                            model: p.model.clone(),
                            api_key_file: Some(format!("{KEYS_DIR}/{}", key_path(p))),
                            max_concurrency: share(p.max_concurrency),
                            timeout_seconds: p.timeout_seconds.max(1) as u32,
                            pricing: p.pricing.clone(),
                            endpoints: p.endpoints.clone(),
                            expose_model: p.expose_model,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            budget: budget.map(|b| BudgetConfig {
                max_requests_per_minute: b
                    .max_requests_per_minute
                    .map(|m| if m > 0 { share(m) } else { 0 }),
                max_spend_per_hour: b
                    .max_spend_per_hour
                    .as_deref()
                    .map(|s| spend_share(s, replicas)),
            }),
        },
        request_classes: spec.request_classes.clone(),
        cluster: Some(ClusterConfig {
            namespace: isvc.metadata.namespace.clone().unwrap_or_default(),
            inference_service: isvc.metadata.name.clone().unwrap_or_default(),
            engine_service: engine_service.to_string(),
            engine_port: spec.engine.port.clamp(1, 65535) as u16,
            router_service: isvc.metadata.name.clone().unwrap_or_default(),
            model: spec.model.name.clone(),
        }),
    }
}

/// Where a provider's key is projected, under `KEYS_DIR`: the provider's name, then a digest of
/// its Secret's name and key. A provider given another Secret has no key until the new one is
/// projected (the ConfigMap reaches the router sooner than the kubelet updates the volume),
/// rather than sending the old key to what may be a new URL; and the ConfigMap names no Secret.
pub fn key_path(p: &crate::api::Provider) -> String {
    // FNV-1a: stable across builds, unlike std's hasher (the path must not move on upgrade).
    let r = &p.api_key_secret_ref;
    let digest = [r.name.as_bytes(), &[0], r.key.as_bytes()]
        .concat()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{}/{digest:016x}", p.name)
}

/// One router replica's share of a spend cap, rounded down to the micro-unit so that the shares
/// never add up to more than the cap; a cap that is not a number passes as it is.
fn spend_share(cap: &str, replicas: i32) -> String {
    match super::budget::parse_spend(cap) {
        Ok(v) => {
            let micros = (v * 1e6).round() as u64 / replicas.max(1) as u64;
            let s = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        Err(_) => cap.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::isvc_from_yaml;

    #[test]
    fn the_design_example_parses_with_defaults() {
        let cfg = RouterConfig::from_yaml(
            r#"
listen: 127.0.0.1:8080
backends: ["127.0.0.1:9001", "127.0.0.1:9002"]
maxConcurrencyPerBackend: 64
queue: {limit: 1000, timeoutSeconds: 30}
burst:
  mode: Saturated
  maxQueueWaitMilliseconds: 0
  providers:
  - {name: together, url: "https://api.together.xyz/v1", model: "meta-llama/x", apiKeyFile: /etc/spillway/keys/together, maxConcurrency: 64}
  budget: {maxRequestsPerMinute: 600, maxSpendPerHour: "5.00"}
"#,
        )
        .unwrap();
        assert_eq!(cfg.backends.len(), 2);
        assert_eq!(cfg.burst.providers[0].timeout_seconds, 120);
        assert_eq!(
            cfg.burst.budget.as_ref().unwrap().max_requests_per_minute,
            Some(600)
        );
        let minimal = RouterConfig::from_yaml("backends: [\"127.0.0.1:1\"]\n").unwrap();
        assert_eq!(minimal.queue, QueueConfig::default());
        assert_eq!(minimal.burst.mode, BurstMode::Saturated);
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let e = RouterConfig::from_yaml(
            "burst:\n  providers:\n  - {name: a, url: ftp://x, model: m}\n  - {name: a, url: https://y, model: m}\n  budget: {maxSpendPerHour: lots}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not unique") && e.contains("ftp://") && e.contains("lots"),
            "{e}"
        );
        assert!(RouterConfig::from_yaml("queue: [").is_err());
        let classes = RouterConfig::from_yaml(
            "requestClasses:\n  defaultClass: x\n  classes:\n  - {name: a, burst: Never}\n  - {name: a, providers: [nope]}\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "\"a\" is not unique",
            "provider \"nope\"",
            "\"x\" is not one",
        ] {
            assert!(classes.contains(want), "{classes} lacks {want}");
        }
    }

    #[test]
    fn rendered_from_spec_and_policy_without_secrets() {
        let isvc = isvc_from_yaml(
            r#"
apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {name: llama, namespace: ml, uid: u}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct}
  engine: {image: e, port: 8001, maxConcurrency: 8}
  router: {queueLimit: 50, queueTimeoutSeconds: 10}
  burst:
    providers:
    - {name: together, url: "https://api.together.xyz/v1", model: turbo, apiKeySecretRef: {name: together-key, key: api-key},
       pricing: {inputPerMillionTokens: 0.18, outputPerMillionTokens: 0.18}}
    budget: {maxRequestsPerMinute: 600, maxSpendPerHour: "5.00"}
  requestClasses:
    defaultClass: restricted
    classes:
    - {name: restricted, burst: Never, priority: 100}
    - {name: opt-in, providers: [together]}
"#,
        );
        let mut policy = ScalingPolicySpec::default();
        policy.burst.mode = BurstMode::CapacityExhausted;
        policy.burst.max_queue_wait_milliseconds = 250;
        let cfg = render(&isvc, &policy, "llama-engine");
        // Limits that hold across routers (the engine's maxConcurrency 8, the provider's
        // default 64, the budget) are shared whole by the default 2 replicas as peers; the
        // top-level ones are each router's share, all a router of an earlier version uses.
        let peers = cfg.peers.as_ref().unwrap();
        assert_eq!((peers.replicas, peers.port), (2, PEER_PORT));
        assert_eq!(
            peers.shared,
            SharedLimits {
                max_concurrency_per_backend: Some(8),
                providers: BTreeMap::from([("together".into(), 64)]),
                max_requests_per_minute: Some(600),
                max_spend_per_hour: Some("5.00".into()),
            }
        );
        assert_eq!(cfg.max_concurrency_per_backend, 4);
        assert_eq!(cfg.burst.providers[0].max_concurrency, 32);
        let budget = cfg.burst.budget.as_ref().unwrap();
        assert_eq!(budget.max_requests_per_minute, Some(300));
        assert_eq!(budget.max_spend_per_hour.as_deref(), Some("2.5"));
        assert_eq!((cfg.queue.limit, cfg.queue.timeout_seconds), (50, 10));
        assert_eq!(cfg.burst.mode, BurstMode::CapacityExhausted);
        assert_eq!(cfg.burst.max_queue_wait_milliseconds, 250);
        // The classes as declared: the router enforces them.
        assert_eq!(cfg.request_classes, isvc.spec.request_classes);
        let p = &cfg.burst.providers[0];
        assert_eq!(
            p.api_key_file.as_deref(),
            Some(
                format!(
                    "/etc/spillway/keys/{}",
                    key_path(&isvc.spec.burst.as_ref().unwrap().providers[0])
                )
                .as_str()
            )
        );
        // Another Secret, or another key in it: another file.
        let mut other = isvc.spec.burst.as_ref().unwrap().providers[0].clone();
        let before = key_path(&other);
        assert!(before.starts_with("together/"), "{before}");
        other.api_key_secret_ref.key = "api-key-2".into();
        assert_ne!(key_path(&other), before);
        other.api_key_secret_ref.key = "api-key".into();
        other.api_key_secret_ref.name = "together-key-2".into();
        assert_ne!(key_path(&other), before);
        let c = cfg.cluster.as_ref().unwrap();
        assert_eq!(
            (c.engine_service.as_str(), c.engine_port),
            ("llama-engine", 8001)
        );
        assert_eq!(c.router_service, "llama");
        // What lands in the ConfigMap names the Secret's file, never a key.
        let yaml = serde_saphyr::to_string(&cfg).unwrap();
        assert!(
            !yaml.contains("together-key") && !yaml.contains("api-key"),
            "{yaml}"
        );
        assert_eq!(RouterConfig::from_yaml(&yaml).unwrap(), cfg);
    }

    #[test]
    fn a_spend_share_never_adds_up_to_more_than_the_cap() {
        assert_eq!(spend_share("5.00", 2), "2.5");
        assert_eq!(spend_share("5", 3), "1.666666");
        assert_eq!(spend_share("0.000001", 2), "0");
        assert_eq!(spend_share("7", 1), "7");
        assert_eq!(spend_share("lots", 2), "lots");
    }
}
