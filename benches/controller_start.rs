//! The controller's cold start on a real control plane (`../shared/kube/cluster`), against the
//! floor of writing the same objects with `kubectl apply --server-side`.
//!
//! `cargo bench --bench controller_start [-- N ...]` (default 100 1000). For each N, on a fresh
//! control plane: N InferenceServices (each with its router) are created, then the controller
//! starts and the clock runs until every service has its nine owned objects and a status. It
//! reports that time, the API requests the controller made per service (the API server's
//! priority-and-fairness count for its ServiceAccount's flow), and the controller's peak RSS
//! and its RSS 30 s later. Then, on another fresh control plane with the same services, the
//! floor: every rendered object in one file, written by `kubectl apply --server-side`
//! (`KUBECTL`, else `kubectl` on PATH). No pods run: there is no kubelet.

#[allow(dead_code)]
#[path = "../tests/cluster/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use spillway::api::{InferenceService, ScalingPolicySpec};
use spillway::controller::render::{RenderInput, render};
use support::operator::{self, Controller};
use support::plane::ControlPlane;

const NS: &str = "bench";
/// The flow schema the API server files a namespaced ServiceAccount's requests under.
const CONTROLLER_FLOW: &str = "service-accounts";

fn service_yaml(i: usize) -> String {
    format!(
        "apiVersion: spillway.dev/v1alpha1\nkind: InferenceService\nmetadata: {{name: svc-{i}, namespace: {NS}}}\nspec:\n  model: {{name: m}}\n  engine: {{image: {img}, args: [engine-sim], maxConcurrency: 8, gpus: 1}}\n",
        img = operator::IMAGE
    )
}

/// A fresh control plane with spillway installed and `n` services created (not timed).
async fn prepared(n: usize) -> anyhow::Result<(Arc<ControlPlane>, Vec<InferenceService>)> {
    let plane = Arc::new(ControlPlane::up().await?);
    operator::install(&plane.client).await?;
    operator::create_namespace(&plane.client, NS).await?;
    let api: Api<InferenceService> = Api::namespaced(plane.client.clone(), NS);
    let created: Vec<InferenceService> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let isvc: InferenceService = serde_saphyr::from_str(&service_yaml(i))?;
                anyhow::Ok(api.create(&PostParams::default(), &isvc).await?)
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    Ok((plane, created))
}

async fn count<K>(client: &Client) -> anyhow::Result<usize>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=spillway");
    Ok(Api::<K>::namespaced(client.clone(), NS)
        .list_metadata(&lp)
        .await?
        .items
        .len())
}

/// Owned objects present, and services with a status.
async fn progress(client: &Client) -> anyhow::Result<(usize, usize)> {
    let objects = count::<Deployment>(client).await?
        + count::<Service>(client).await?
        + count::<ConfigMap>(client).await?
        + count::<ServiceAccount>(client).await?
        + count::<Role>(client).await?
        + count::<RoleBinding>(client).await?
        + count::<PodDisruptionBudget>(client).await?;
    let with_status = Api::<InferenceService>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.observed_generation.is_some() && !st.conditions.is_empty())
        })
        .count();
    Ok((objects, with_status))
}

/// Requests the API server dispatched for a flow schema so far.
async fn dispatched(client: &Client, flow: &str) -> anyhow::Result<f64> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let page = client.request_text(req).await?;
    Ok(support::traffic::sum_metric(
        &page,
        "apiserver_flowcontrol_dispatched_requests_total",
        &[("flow_schema", flow)],
    ))
}

fn rss_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

struct Cold {
    seconds: f64,
    requests: f64,
    peak_mib: f64,
    steady_mib: f64,
}

async fn controller_run(n: usize) -> anyhow::Result<Cold> {
    let (plane, _) = prepared(n).await?;
    let work = support::TempDir::new("bench-controller")?;
    let before = dispatched(&plane.client, CONTROLLER_FLOW).await?;
    let start = Instant::now();
    let mut ctl = Controller::start(&plane, work.path(), "bench").await?;
    let result = measure(&plane, &mut ctl, n, start, before).await;
    if result.is_err() {
        let log = ctl.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("controller log (last lines):");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    ctl.stop().await;
    result
}

async fn measure(
    plane: &ControlPlane,
    ctl: &mut Controller,
    n: usize,
    start: Instant,
    before: f64,
) -> anyhow::Result<Cold> {
    let pid = ctl.pid().context("controller pid")?;
    let want = 9 * n;
    loop {
        let (objects, with_status) = progress(&plane.client).await?;
        if objects >= want && with_status == n {
            break;
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("after 30 min: {objects} of {want} objects, {with_status} of {n} statuses");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let requests = dispatched(&plane.client, CONTROLLER_FLOW).await? - before;
    let peak_mib = rss_kib(pid, "VmHWM:")? as f64 / 1024.0;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let steady_mib = rss_kib(pid, "VmRSS:")? as f64 / 1024.0;
    Ok(Cold {
        seconds,
        requests: requests / n as f64,
        peak_mib,
        steady_mib,
    })
}

async fn floor_run(n: usize) -> anyhow::Result<f64> {
    let (plane, services) = prepared(n).await?;
    let work = support::TempDir::new("bench-floor")?;
    let mut docs = String::new();
    let policy = ScalingPolicySpec::default();
    for isvc in &services {
        let r = render(&RenderInput {
            isvc,
            policy: &policy,
            router_image: operator::IMAGE,
            revision: None,
        })?;
        let router = r.router.context("the router is on by default")?;
        let objects = [
            serde_json::to_value(&r.engine_deployment)?,
            serde_json::to_value(&r.engine_service)?,
            serde_json::to_value(&r.client_service)?,
            serde_json::to_value(&router.config_map)?,
            serde_json::to_value(&router.service_account)?,
            serde_json::to_value(&router.role)?,
            serde_json::to_value(&router.role_binding)?,
            serde_json::to_value(&router.deployment)?,
            serde_json::to_value(&router.pdb)?,
        ];
        for o in objects {
            docs.push_str("---\n");
            docs.push_str(&serde_json::to_string(&o)?);
            docs.push('\n');
        }
    }
    let file = work.path().join("objects.yaml");
    std::fs::write(&file, docs)?;
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let start = Instant::now();
    let out = tokio::process::Command::new(&kubectl)
        .args(["apply", "--server-side", "--field-manager=spillway", "-f"])
        .arg(&file)
        .env("KUBECONFIG", plane.admin_kubeconfig())
        .output()
        .await
        .with_context(|| format!("running {kubectl}"))?;
    let seconds = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (objects, _) = progress(&plane.client).await?;
    if objects < 9 * n {
        bail!("kubectl wrote {objects} of {} objects", 9 * n);
    }
    Ok(seconds)
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "N     controller  floor (kubectl)  ratio  API requests/service  peak RSS  steady RSS"
    );
    for n in sizes {
        let cold = rt.block_on(controller_run(n))?;
        let floor = rt.block_on(floor_run(n))?;
        println!(
            "{n:<5} {:>9.1}s  {floor:>14.1}s  {:>5.2}  {:>20.1}  {:>6.0} MiB  {:>7.0} MiB",
            cold.seconds,
            cold.seconds / floor,
            cold.requests,
            cold.peak_mib,
            cold.steady_mib
        );
    }
    Ok(())
}
