//! The controller's Prometheus metrics and its /metrics, /healthz and /readyz endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    /// A fixed set of values (see `Error::metric_reason`), never a message.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Metric handles; cheap to share.
pub struct Metrics {
    pub registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabel, Histogram>,
    pub leader: Gauge,
    replicas: Family<ServiceLabels, Gauge>,
    desired: Family<ServiceLabels, Gauge>,
    scrape_duration: Histogram,
    scrape_errors: Family<ReasonLabel, Counter>,
    decisions: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("spillway_controller");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let leader = Gauge::default();
        registry.register("reconciliations", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by reason",
            errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconciliation took",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let replicas = Family::<ServiceLabels, Gauge>::default();
        let desired = Family::<ServiceLabels, Gauge>::default();
        let scrape_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let scrape_errors = Family::<ReasonLabel, Counter>::default();
        let decisions = Family::<ReasonLabel, Counter>::default();
        let auto = registry.sub_registry_with_prefix("autoscaler");
        auto.register(
            "replicas",
            "Engine replicas (Deployment spec.replicas) per service",
            replicas.clone(),
        );
        auto.register(
            "desired_replicas",
            "Replicas the last decision asked for, per service",
            desired.clone(),
        );
        auto.register_with_unit(
            "scrape_duration",
            "Time one engine metrics scrape took",
            prometheus_client::registry::Unit::Seconds,
            scrape_duration.clone(),
        );
        auto.register(
            "scrape_errors",
            "Failed engine metrics scrapes, by reason",
            scrape_errors.clone(),
        );
        auto.register(
            "decisions",
            "Scaling decisions, by the signal or rule that drove them",
            decisions.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            replicas,
            desired,
            scrape_duration,
            scrape_errors,
            decisions,
        }
    }
}

/// Records one reconciliation's count and duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let l = ControllerLabel {
            controller: self.controller,
        };
        self.metrics
            .duration
            .get_or_create(&l)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, controller: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { controller, reason })
            .inc();
    }

    /// One scrape: its duration, and its error reason if it failed (a fixed set of values).
    pub fn scrape_observed(&self, seconds: f64, error: Option<&'static str>) {
        if seconds > 0.0 {
            self.scrape_duration.observe(seconds);
        }
        if let Some(reason) = error {
            self.scrape_errors
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
    }

    /// One decision for a service.
    pub fn decision_observed(
        &self,
        namespace: &str,
        service: &str,
        current: i32,
        d: &crate::autoscale::decide::Decision,
    ) {
        let l = ServiceLabels {
            namespace: namespace.to_string(),
            service: service.to_string(),
        };
        self.replicas.get_or_create(&l).set(current.into());
        self.desired.get_or_create(&l).set(d.desired.into());
        self.decisions
            .get_or_create(&ReasonLabel {
                reason: d.driver.as_str(),
            })
            .inc();
    }

    /// Drops a deleted service's series so the label set stays bounded by live services.
    pub fn forget_service(&self, namespace: &str, service: &str) {
        let l = ServiceLabels {
            namespace: namespace.to_string(),
            service: service.to_string(),
        };
        self.replicas.remove(&l);
        self.desired.remove(&l);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Process health as the probes see it.
#[derive(Default)]
pub struct Health {
    /// Set once the API client works and the watches started.
    pub ready: AtomicBool,
    /// Cleared when a component died and the process should be restarted.
    pub alive: AtomicBool,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn serve_metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    flag(s.health.alive.load(Ordering::Relaxed))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    flag(s.health.ready.load(Ordering::Relaxed) && s.health.alive.load(Ordering::Relaxed))
}

fn flag(ok: bool) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ok\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_have_conventional_names_and_bounded_labels() {
        let m = Metrics::default();
        drop(m.reconcile_started("inferenceservice"));
        m.reconcile_failed("inferenceservice", "api");
        let text = m.encode();
        assert!(text.contains(
            "spillway_controller_reconciliations_total{controller=\"inferenceservice\"} 1"
        ));
        assert!(text.contains("spillway_controller_reconcile_errors_total{controller=\"inferenceservice\",reason=\"api\"} 1"));
        assert!(text.contains("spillway_controller_reconcile_duration_seconds_count{controller=\"inferenceservice\"} 1"));
        assert!(text.contains("spillway_controller_leader 0"));
    }

    #[tokio::test]
    async fn probes_follow_health_flags() {
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            axum::serve(listener, router(metrics, health.clone()))
                .with_graceful_shutdown(async {
                    rx.await.ok();
                })
                .into_future(),
        );
        let status = |path: &'static str| async move {
            crate::test_support::net::get(addr, path)
                .await
                .status
                .as_u16()
        };
        assert_eq!(status("/healthz").await, 503);
        health.alive.store(true, Ordering::Relaxed);
        assert_eq!(status("/healthz").await, 200);
        assert_eq!(status("/readyz").await, 503);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(status("/readyz").await, 200);
        let text = crate::test_support::net::get(addr, "/metrics").await.text();
        assert!(text.contains("spillway_controller_leader"), "{text}");
        tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
