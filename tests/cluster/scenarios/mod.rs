//! The scenarios (issue 18 lists them as a to g) and what they share: the environment, the
//! objects they apply, and the waits they repeat.

mod cost;
mod deadline;
mod failover;
mod forecast;
mod gitops;
mod latency;
mod lifecycle;
mod metrics_lost;
mod rbac;
mod rollout;
mod scale_up;
mod shared;
mod startup;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::support::kubelet::{Kubelet, PodInfo};
use crate::support::net::Bridge;
use crate::support::operator::{self, Controller, TEST_MANAGER, apply_yaml, create_namespace};
use crate::support::plane::ControlPlane;
use crate::support::procs::{Proc, spillway_bin};
use crate::support::{TempDir, eventually, free_port};

/// A scenario: its name (also its namespace and its node's name) and what it runs.
pub struct Scenario(pub &'static str, pub Run);
pub type Run = for<'a> fn(&'a Env) -> BoxFuture<'a, anyhow::Result<String>>;

pub static ALL: &[Scenario] = &[
    Scenario("a-startup", |e| Box::pin(startup::run(e))),
    Scenario("b-scale-up", |e| Box::pin(scale_up::run(e))),
    Scenario("c-metrics-lost", |e| Box::pin(metrics_lost::run(e))),
    Scenario("d-failover", |e| Box::pin(failover::run(e))),
    Scenario("f-lifecycle", |e| Box::pin(lifecycle::run(e))),
    Scenario("g-gitops", |e| Box::pin(gitops::run(e))),
    Scenario("h-shared", |e| Box::pin(shared::run(e))),
    Scenario("i-forecast", |e| Box::pin(forecast::run(e))),
    Scenario("j-latency", |e| Box::pin(latency::run(e))),
    Scenario("k-rollout", |e| Box::pin(rollout::run(e))),
    Scenario("l-cost", |e| Box::pin(cost::run(e))),
    Scenario("m-deadline", |e| Box::pin(deadline::run(e))),
    // Last: it reads the logs of everything the others started.
    Scenario("e-rbac", |e| Box::pin(rbac::run(e))),
];

pub struct Env {
    pub plane: Arc<ControlPlane>,
    pub client: Client,
    pub kubelet: Kubelet,
    pub work: TempDir,
}

impl Env {
    pub async fn up() -> anyhow::Result<Self> {
        crate::support::plane::remove_leftovers();
        crate::support::net::remove_leftovers();
        let plane = Arc::new(ControlPlane::up().await?);
        operator::install(&plane.client).await?;
        let work = TempDir::new("tier")?;
        let kubelet = Kubelet::start(plane.clone(), Bridge::create()?, work.path());
        Ok(Self {
            client: plane.client.clone(),
            plane,
            kubelet,
            work,
        })
    }

    pub async fn down(self) {
        self.kubelet.shutdown().await;
        // The plane stops when its last handle goes.
    }

    /// Deletes a scenario's namespace: its pods' processes stop as their pods are deleted, so
    /// they do not run on through the scenarios after it.
    pub async fn finish(&self, ns: &str) {
        let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone())
            .delete(ns, &Default::default())
            .await;
    }

    /// A namespace of the scenario's own and a node of the same name with `gpus` GPUs (the
    /// scenario's engines select it).
    pub async fn prepare(&self, ns: &str, gpus: u32) -> anyhow::Result<()> {
        create_namespace(&self.client, ns).await?;
        self.plane.node(ns, gpus).await
    }

    pub async fn apply(&self, ns: &str, yaml: &str) -> anyhow::Result<()> {
        apply_yaml(&self.client, yaml, ns, TEST_MANAGER).await
    }

    pub async fn controller(&self, identity: &str) -> anyhow::Result<Controller> {
        Controller::start(&self.plane, self.work.path(), identity).await
    }

    pub fn pods(&self, ns: &str, component: &str) -> Vec<PodInfo> {
        self.kubelet
            .pods(ns)
            .into_iter()
            .filter(|p| p.component == component)
            .collect()
    }

    /// The first router pod's `ip:port`.
    pub fn router_addr(&self, ns: &str) -> anyhow::Result<String> {
        self.pods(ns, "router")
            .first()
            .map(|p| format!("{}:8080", p.ip))
            .ok_or_else(|| anyhow::anyhow!("no router pod"))
    }

    /// Waits until `engines` engine pods and `routers` router pods of `ns` report Ready.
    pub async fn ready_pods(
        &self,
        ns: &str,
        engines: usize,
        routers: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        eventually(
            &format!("{engines} ready engine pods in {ns}"),
            limit,
            || async {
                let list = pods
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let ready = |component: &str| {
                    list.items
                        .iter()
                        .filter(|p| {
                            p.metadata
                                .labels
                                .as_ref()
                                .and_then(|l| l.get("app.kubernetes.io/component"))
                                .map(String::as_str)
                                == Some(component)
                        })
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|cs| {
                                    cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .count()
                };
                let (e, r) = (ready("engine"), ready("router"));
                if e == engines && r == routers {
                    Ok(Some(()))
                } else {
                    Err(format!("{e} engines and {r} routers ready"))
                }
            },
        )
        .await
    }

    /// What a person would look at after a failure: statuses, events, pods, logs' tails.
    pub async fn diagnostics(&self, ns: &str) {
        use kube::ResourceExt;
        let isvcs: Api<operator::InferenceService> = Api::namespaced(self.client.clone(), ns);
        if let Ok(list) = isvcs.list(&ListParams::default()).await {
            for i in list.items {
                println!(
                    "  infsvc {}: status {}",
                    i.name_any(),
                    serde_json::to_string(&i.status).unwrap_or_default()
                );
            }
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for p in list.items {
                let s = p.status.unwrap_or_default();
                println!(
                    "  pod {}: phase {:?} ip {:?} conditions {:?}",
                    p.metadata.name.unwrap_or_default(),
                    s.phase,
                    s.pod_ip,
                    s.conditions
                        .unwrap_or_default()
                        .iter()
                        .map(|c| format!(
                            "{}={}({})",
                            c.type_,
                            c.status,
                            c.reason.clone().unwrap_or_default()
                        ))
                        .collect::<Vec<_>>()
                );
            }
        }
        let events: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.client.clone(), ns);
        if let Ok(list) = events.list(&ListParams::default()).await {
            for e in list.items.iter().rev().take(20) {
                println!(
                    "  event {} {}: {}",
                    e.involved_object.name.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default()
                );
            }
        }
        for entry in std::fs::read_dir(self.work.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.ends_with(".log")
                && (name.starts_with(ns) || !name.contains('-') || name.starts_with("ctl"))
            {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                println!("  --- {name} (last {} lines)", tail.len());
                for l in tail.iter().rev() {
                    println!("  | {l}");
                }
            }
        }
    }
}

/// A ScalingPolicy `name` with `spec` (YAML flow mapping entries, e.g. `maxReplicas: 4`).
pub fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: spillway.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n"
    )
}

/// The model every scenario serves.
pub const MODEL: &str = "test/model";

/// An InferenceService `name` on engine-sim (`gpus: 1`) on node `node`, scaling with `policy`.
/// `extra` is appended to the spec (YAML at two spaces' indent).
pub fn service(name: &str, node: &str, policy: &str, max_concurrency: u32, extra: &str) -> String {
    format!(
        r#"apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {{name: {name}}}
spec:
  model: {{name: {MODEL}}}
  engine:
    image: {image}
    args: ["engine-sim", "--host", "0.0.0.0", "--port", "8000", "--model", "{MODEL}",
           "--max-concurrency", "{max_concurrency}", "--prefill-ms", "100", "--tokens-per-second", "20"]
    port: 8000
    healthPath: /health
    metrics: {{preset: vllm}}
    maxConcurrency: {max_concurrency}
    gpus: 1
    nodeSelector: {{spillway.test/node: {node}}}
    startupTimeoutSeconds: 60
    terminationGracePeriodSeconds: 5
  scalingPolicyRef: {{name: {policy}}}
{extra}"#,
        image = operator::IMAGE
    )
}

/// A fake burst provider: engine-sim on 127.0.0.1 checking the bearer `key` and serving
/// `provider-model`, with `key` in the Secret `provider-key` of `ns`; with its port.
pub async fn start_provider(env: &Env, ns: &str, key: &str) -> anyhow::Result<(Proc, u16)> {
    env.apply(
        ns,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: provider-key}}\nstringData: {{api-key: {key}}}\n"
        ),
    )
    .await?;
    let port = free_port();
    let mut cmd = tokio::process::Command::new(spillway_bin());
    cmd.args([
        "engine-sim",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--model",
        "provider-model",
        "--max-concurrency",
        "64",
        "--latency-ms",
        "200",
        "--tokens-per-second",
        "2000",
    ])
    .env("SPILLWAY_ENGINE_SIM_API_KEY", key)
    .env("NO_COLOR", "1");
    let p = Proc::spawn(
        "provider",
        cmd,
        &env.work.path().join(format!("provider-{port}.log")),
    )?;
    let addr = format!("127.0.0.1:{port}");
    eventually("the fake provider", Duration::from_secs(10), || async {
        Ok(crate::support::traffic::get_ok(&addr, "/health")
            .await
            .then_some(()))
    })
    .await?;
    Ok((p, port))
}
