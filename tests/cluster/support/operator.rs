//! spillway on the control plane: its CRDs and the chart's RBAC installed, controller processes
//! running as the chart's ServiceAccount, and the kubectl-like reads the scenarios assert on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Event, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::pinned_kind;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
pub use spillway::api::InferenceService;
use tokio::process::Command;

use super::plane::ControlPlane;
use super::procs::{Proc, spillway_bin};
use super::{eventually, free_port};

pub const SYSTEM_NS: &str = "spillway-system";
pub const CONTROLLER_SA: &str = "spillway-controller";
/// The engine (and router) image in the scenarios' services; the kubelet stand-in runs the
/// binary under test whatever the image says.
pub const IMAGE: &str = "spillway:test";
pub const TEST_MANAGER: &str = "spillway-tier";
/// What the controller logs once its caches are synced and it starts deciding.
pub const SYNCED_LOG: &str = "caches synced";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Server-side applies every document of a YAML text (as `kubectl apply --server-side` would),
/// in `namespace` for namespaced kinds.
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    namespace: &str,
    manager: &str,
) -> anyhow::Result<()> {
    for doc in serde_saphyr::from_multiple::<Value>(yaml)? {
        if doc.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(doc.clone())?;
        let types = obj
            .types
            .clone()
            .context("object without apiVersion/kind")?;
        let (group, version) = types
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", &types.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let (ar, caps) = pinned_kind(client, &gvk).await?;
        let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            Api::namespaced_with(
                client.clone(),
                obj.namespace().as_deref().unwrap_or(namespace),
                &ar,
            )
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&doc),
        )
        .await
        .with_context(|| format!("applying {} {}", types.kind, obj.name_any()))?;
    }
    Ok(())
}

pub async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&ns))
        .await?;
    Ok(())
}

/// The CRDs from `crds/` (Established), and the controller's ServiceAccount and RBAC from
/// `config/rbac` (the chart's rules; `tests/packaging.rs` keeps the two equal).
pub async fn install(client: &Client) -> anyhow::Result<()> {
    for f in ["crds/inferenceservices.yaml", "crds/scalingpolicies.yaml"] {
        apply_yaml(client, &std::fs::read_to_string(repo(f))?, "", TEST_MANAGER).await?;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "inferenceservices.spillway.dev",
        "scalingpolicies.spillway.dev",
    ] {
        eventually(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || async {
                let crd = crds.get(name).await.map_err(|e| e.to_string())?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            },
        )
        .await?;
    }
    create_namespace(client, SYSTEM_NS).await?;
    for f in [
        "service_account.yaml",
        "role.yaml",
        "role_binding.yaml",
        "leader_election_role.yaml",
        "leader_election_role_binding.yaml",
    ] {
        apply_yaml(
            client,
            &std::fs::read_to_string(repo("config/rbac").join(f))?,
            SYSTEM_NS,
            TEST_MANAGER,
        )
        .await?;
    }
    Ok(())
}

/// A controller process, as the chart runs it: leader-elected on the `spillway-controller`
/// Lease in `spillway-system`, with a token of the chart's ServiceAccount.
pub struct Controller {
    pub identity: String,
    pub metrics: String,
    proc: Proc,
}

impl Controller {
    pub async fn start(
        plane: &Arc<ControlPlane>,
        work: &Path,
        identity: &str,
    ) -> anyhow::Result<Self> {
        let kubeconfig = work.join(format!("{identity}.kubeconfig"));
        plane
            .token_kubeconfig(SYSTEM_NS, CONTROLLER_SA, &kubeconfig)
            .await?;
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(spillway_bin());
        cmd.args([
            "controller",
            "--metrics-addr",
            &metrics,
            "--identity",
            identity,
            "--router-image",
            IMAGE,
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", SYSTEM_NS)
        .env("SPILLWAY_LOG", "info,spillway=debug,kube=warn")
        .env("NO_COLOR", "1")
        .env_remove("SPILLWAY_METRICS_ADDR");
        let proc = Proc::spawn(identity, cmd, &work.join(format!("{identity}.log")))?;
        Ok(Self {
            identity: identity.to_string(),
            metrics,
            proc,
        })
    }

    #[allow(dead_code)] // benches/controller_start.rs
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// SIGKILL: a crashed process or a lost node; its Lease is not released.
    pub async fn kill(&mut self) {
        self.proc.kill().await;
    }

    pub async fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(10)).await;
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }
}

pub async fn isvc(client: &Client, ns: &str, name: &str) -> Result<InferenceService, String> {
    Api::<InferenceService>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| e.to_string())
}

/// A status condition's (status, reason).
pub fn condition(isvc: &InferenceService, type_: &str) -> Option<(String, String)> {
    isvc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The engine Deployment's `spec.replicas`.
pub async fn engine_replicas(client: &Client, ns: &str, name: &str) -> Result<i32, String> {
    let d = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns)
        .get(&format!("{name}-engine"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(d.spec.and_then(|s| s.replicas).unwrap_or(0))
}

/// Events on the InferenceService `name` with `reason`: their notes.
pub async fn events(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> Result<Vec<String>, String> {
    let lp = ListParams::default().fields(&format!("involvedObject.name={name},reason={reason}"));
    let list = Api::<Event>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(list.items.into_iter().filter_map(|e| e.message).collect())
}

/// Deletes a pod (the kubelet here stops its process and force-deletes it).
pub async fn delete_pod(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
        .delete(name, &Default::default())
        .await?;
    Ok(())
}
