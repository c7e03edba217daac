//! The operator: reconciles InferenceServices into owned objects and keeps ScalingPolicy
//! status current. Pure parts: [`render`], [`status`], [`leader::decide`]; the rest is I/O.

pub mod apply;
pub mod autoscaler;
pub mod cache;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod owned;
pub mod reconcile;
pub mod render;
pub mod scrape;
pub mod status;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::api::{InferenceService, RevisionRole, ScalingPolicy};
use metrics::{Health, Metrics};
use reconcile::{Context, Settings};

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080", env = "SPILLWAY_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Cluster DNS domain, for the service URL in status.
    #[arg(long, default_value = "cluster.local", env = "SPILLWAY_CLUSTER_DOMAIN")]
    pub cluster_domain: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SPILLWAY_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Elect a leader among controller replicas; only the leader writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "SPILLWAY_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "spillway-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE or the client).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: the pod name, from POD_NAME or HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Image of the per-service router Deployments (the spillway image).
    #[arg(long, env = "SPILLWAY_ROUTER_IMAGE", default_value = concat!("ghcr.io/spillway-dev/spillway:", env!("CARGO_PKG_VERSION")))]
    pub router_image: String,
    /// Most engine metrics scrapes in flight at once, across all services.
    #[arg(long, default_value_t = 256)]
    pub max_concurrent_scrapes: usize,
    /// Timeout of one metrics scrape, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub scrape_timeout_ms: u64,
    /// Most reconciliations running at once, and most autoscaler API writes in flight at once.
    /// The API server queues all of the controller's requests in one flow, the leader Lease's
    /// renewals among them: unbounded, a cold start of a thousand services starves the renewal
    /// and the leader steps down.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent_reconciles: u16,
}

pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    health.alive.store(true, Ordering::Relaxed);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::runtime::shutdown_signal().await;
        tracing::info!("shutdown signal received");
        shutdown_tx.send_replace(true);
    });

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
    let mut http_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(
        axum::serve(listener, metrics::router(metrics.clone(), health.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            })
            .into_future(),
    );

    let (leader_tx, mut leader_rx) = watch::channel(!args.leader_elect);
    // The election stops on shutdown, and also when the controllers stop after lost leadership,
    // so the process exits (and restarts as a candidate) instead of idling as a lease holder.
    let (election_stop_tx, election_stop_rx) = watch::channel(false);
    let mut stop_on_shutdown = shutdown_rx.clone();
    let election_stopper = election_stop_tx.clone();
    tokio::spawn(async move {
        let _ = stop_on_shutdown.wait_for(|s| *s).await;
        election_stopper.send_replace(true);
    });
    let election = if args.leader_elect {
        let ns = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("spillway-{}", std::process::id()));
        let cfg = leader::LeaseConfig::new(args.lease_name.clone(), ns.clone(), identity);
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
        Some(tokio::spawn(leader::run(
            leases,
            cfg,
            leader_tx,
            election_stop_rx,
        )))
    } else {
        None
    };
    health.ready.store(true, Ordering::Relaxed);

    // Standby until elected (or shut down).
    let mut stop = shutdown_rx.clone();
    tokio::select! {
        r = leader_rx.wait_for(|l| *l) => { r.context("leader election stopped")?; }
        _ = stop.wait_for(|s| *s) => {}
    }
    let result = if *shutdown_rx.borrow() {
        Ok(())
    } else {
        metrics.leader.set(1);
        run_controllers(
            &args,
            client,
            metrics.clone(),
            leader_rx.clone(),
            shutdown_rx.clone(),
        )
        .await
    };
    metrics.leader.set(0);
    health.alive.store(false, Ordering::Relaxed);
    election_stop_tx.send_replace(true);
    if let Some(e) = election {
        let _ = e.await;
    }
    if result.is_err() {
        // Lost leadership: exit now; the metrics server would otherwise wait for SIGTERM.
        server.abort();
    } else {
        let _ = server.await;
    }
    result
}

/// Runs both controllers until shutdown (Ok) or lost leadership (Err: the process restarts and
/// stands for election again, as client-go controllers do).
async fn run_controllers(
    args: &ControllerArgs,
    client: Client,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ns = args.namespace.as_deref();
    // Owned objects only: a label selector keeps the caches to spillway's objects.
    let labelled = watcher::Config::default().labels(names::MANAGED_SELECTOR);
    // What to reconcile: services, and policies (for their status). Every trigger comes from a
    // cache's own events, after the cache holds them, so a pass never reads older data than
    // what triggered it.
    let (isvc_tx, isvc_rx) = mpsc::unbounded::<ObjectRef<InferenceService>>();
    let (policy_tx, policy_rx) = mpsc::unbounded::<ObjectRef<ScalingPolicy>>();

    // One watch and one store of each kind, shared by reconcile and the autoscaler; managed
    // fields are dropped (nothing reads them).
    let service_cache = {
        let tx = isvc_tx.clone();
        // Status writes (the autoscaler's every few seconds, reconcile's own) change nothing
        // to reconcile: only a service's spec changes trigger it, and the autoscaler's turns
        // of a rollout (which revisions exist, and their roles: what reconcile renders).
        let mut generations = cache::Generations::default();
        let mut roles: std::collections::HashMap<String, Vec<(String, RevisionRole)>> =
            Default::default();
        cache::spawn(
            watcher::watcher(
                owned::api::<InferenceService>(&client, ns),
                Default::default(),
            )
            .default_backoff()
            .modify(|s: &mut InferenceService| s.managed_fields_mut().clear()),
            move |change| {
                let moved = generations.moved(change);
                let uid = change.object().metadata.uid.clone().unwrap_or_default();
                let turned = match change {
                    cache::Change::Applied(s) => {
                        let now: Vec<(String, RevisionRole)> = s
                            .status
                            .iter()
                            .flat_map(|st| &st.revisions)
                            .map(|r| (r.name.clone(), r.role))
                            .collect();
                        roles
                            .insert(uid, now.clone())
                            .is_some_and(|before| before != now)
                    }
                    cache::Change::Deleted(_) => {
                        roles.remove(&uid);
                        false
                    }
                };
                if (moved || turned)
                    && let cache::Change::Applied(s) = change
                {
                    let _ = tx.unbounded_send(ObjectRef::from_obj(s));
                }
            },
        )
    };
    let store = service_cache.store.clone();
    let policy_cache = {
        let (tx, services) = (isvc_tx.clone(), store.clone());
        let mut generations = cache::Generations::default();
        cache::spawn(
            watcher::watcher(owned::api::<ScalingPolicy>(&client, ns), Default::default())
                .default_backoff()
                .modify(|p: &mut ScalingPolicy| p.managed_fields_mut().clear()),
            move |change| {
                if !generations.moved(change) {
                    return;
                }
                let policy = change.object();
                if let cache::Change::Applied(p) = change {
                    let _ = policy_tx.unbounded_send(ObjectRef::from_obj(p));
                }
                // A new, changed or deleted policy: re-render every service that uses it.
                let (pns, name) = (policy.namespace(), policy.name_any());
                for s in services.state() {
                    if s.namespace() == pns && reconcile::references(&s, &name) {
                        let _ = tx.unbounded_send(ObjectRef::from_obj(s.as_ref()));
                    }
                }
            },
        )
    };
    // Engine and router pods: readiness, IPs, scheduling (for the autoscaler).
    let pod_cache = cache::spawn(
        watcher::watcher(owned::api::<Pod>(&client, ns), labelled)
            .default_backoff()
            .modify(|p: &mut Pod| {
                // Only metadata and status are read; dropping the rest keeps the cache small.
                p.managed_fields_mut().clear();
                p.spec = None;
            }),
        |_| {},
    );
    let owned_objects = owned::OwnedObjects::start(&client, ns, isvc_tx);
    let deployments = owned_objects.deployments.clone();

    let config = kube::runtime::controller::Config::default()
        .concurrency(args.max_concurrent_reconciles.max(1));
    // The controllers' own trigger streams stay empty; the caches' listeners feed them.
    let isvc_controller = Controller::for_stream(futures::stream::pending(), store.clone())
        .reconcile_on(isvc_rx)
        .with_config(config.clone());
    let reporter = Reporter {
        controller: "spillway-controller".into(),
        instance: args.identity.clone(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        settings: Settings {
            cluster_domain: args.cluster_domain.clone(),
            router_image: args.router_image.clone(),
        },
        leader: leader.clone(),
        failures: Default::default(),
        services: store.clone(),
        policies: policy_cache.store.clone(),
        owned: owned_objects,
    });

    let stop = |mut rx: watch::Receiver<bool>, mut leader: watch::Receiver<bool>| async move {
        tokio::select! {
            _ = rx.wait_for(|s| *s) => {}
            _ = leader.wait_for(|l| !*l) => {}
        }
    };

    let isvc_run = isvc_controller
        .graceful_shutdown_on(stop(shutdown.clone(), leader.clone()))
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "inferenceservice controller event");
            }
        });

    let policy_controller =
        Controller::for_stream(futures::stream::pending(), policy_cache.store.clone())
            .reconcile_on(policy_rx)
            .with_config(config);
    let autoscaler = Arc::new(autoscaler::Autoscaler {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "spillway-autoscaler".into(),
                instance: args.identity.clone(),
            },
        ),
        scraper: scrape::Scraper::new(
            args.max_concurrent_scrapes,
            std::time::Duration::from_millis(args.scrape_timeout_ms),
        ),
        metrics: ctx.metrics.clone(),
        services: service_cache,
        policies: policy_cache,
        pods: pod_cache,
        deployments,
        leader: leader.clone(),
        writes: tokio::sync::Semaphore::new(args.max_concurrent_reconciles.max(1).into()),
    });
    let (autoscaler_stop_tx, autoscaler_stop) = watch::channel(false);
    let autoscaler_run = tokio::spawn(autoscaler.run(autoscaler_stop));

    let policy_run = policy_controller
        .graceful_shutdown_on(stop(shutdown.clone(), leader.clone()))
        .run(reconcile::reconcile_policy, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "scalingpolicy controller event");
            }
        });

    tracing::info!("controllers started");
    tokio::join!(isvc_run, policy_run);
    autoscaler_stop_tx.send_replace(true);
    let _ = autoscaler_run.await;
    if *shutdown.borrow() {
        tracing::info!("controllers stopped");
        Ok(())
    } else {
        anyhow::bail!("lost leadership; exiting so this replica can stand for election again")
    }
}
