//! spillway end-to-end suite: installs the Helm chart into a real cluster, applies the samples,
//! checks what a release needs, uninstalls, and checks nothing is left. See e2e/README.md.
//!
//! It runs only with SPILLWAY_E2E=1 and an explicit KUBECONFIG (never the default
//! ~/.kube/config or an in-cluster account), against a `kind-*` context or the context named in
//! SPILLWAY_E2E_CONTEXT, and only where spillway's CRDs are not installed yet: it creates and
//! deletes cluster-scoped objects. Otherwise it prints why it skipped and passes, so
//! `cargo test` runs it harmlessly everywhere.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use spillway::api::{InferenceService, ScalingPolicy};

type Res<T = ()> = Result<T, String>;

const RELEASE: &str = "spillway-e2e";
/// The chart's full name for this release (it contains the chart name, so it is the release).
const FULLNAME: &str = "spillway-e2e";
const SYSTEM_NS: &str = "spillway-e2e-system";
const NS: &str = "spillway-e2e";
const LEASE: &str = "spillway-controller";
const SAMPLE_IMAGE: &str = "ghcr.io/spillway-dev/spillway:0.1.0";
const FIELD_MANAGER: &str = "spillway-e2e";
const CRD_NAMES: [&str; 2] = [
    "inferenceservices.spillway.dev",
    "scalingpolicies.spillway.dev",
];

struct Settings {
    image: String,
    helm: String,
    keep: bool,
}

/// Decides whether to run at all. `Err` = skip, with the reason printed.
fn opted_in() -> Result<(), String> {
    const HOW: &str = "to run it against a throwaway cluster: SPILLWAY_E2E=1 KUBECONFIG=<file> cargo test --locked --test e2e (e2e/README.md)";
    if std::env::var("SPILLWAY_E2E").as_deref() != Ok("1") {
        return Err(format!(
            "SPILLWAY_E2E is not 1. This suite installs spillway (CRDs, cluster RBAC) into a real cluster and deletes it again; {HOW}"
        ));
    }
    if std::env::var("KUBECONFIG").unwrap_or_default().is_empty() {
        return Err(format!(
            "KUBECONFIG is not set (the suite never falls back to ~/.kube/config or an in-cluster account); {HOW}"
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Err(why) = opted_in() {
        println!("e2e: SKIPPED: {why}");
        return ExitCode::SUCCESS;
    }
    let settings = Settings {
        image: std::env::var("SPILLWAY_E2E_IMAGE").unwrap_or_else(|_| "spillway:e2e".into()),
        helm: std::env::var("SPILLWAY_E2E_HELM").unwrap_or_else(|_| "helm".into()),
        keep: std::env::var("SPILLWAY_E2E_KEEP").as_deref() == Ok("1"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(settings))
}

/// Records step results; the first failure stops the remaining checks (cleanup still runs).
struct Suite {
    passed: usize,
    failed: usize,
}

impl Suite {
    async fn step<T>(
        &mut self,
        name: &str,
        limit: Duration,
        fut: impl Future<Output = Res<T>>,
    ) -> Res<T> {
        let start = Instant::now();
        println!("e2e: {name} ...");
        let out = match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {limit:?}")),
        };
        let secs = start.elapsed().as_secs_f64();
        match &out {
            Ok(_) => {
                self.passed += 1;
                println!("e2e: ok   {name} ({secs:.1}s)");
            }
            Err(e) => {
                self.failed += 1;
                println!("e2e: FAIL {name} ({secs:.1}s): {e}");
            }
        }
        out
    }
}

async fn run(s: Settings) -> ExitCode {
    let mut suite = Suite {
        passed: 0,
        failed: 0,
    };
    let client = match suite
        .step(
            "connect and check the target",
            Duration::from_secs(30),
            preflight(),
        )
        .await
    {
        Ok(c) => c,
        Err(_) => {
            // Refused or unreachable: nothing was installed, so nothing to clean up.
            println!("e2e: {} passed, {} failed", suite.passed, suite.failed);
            return ExitCode::FAILURE;
        }
    };
    let body = checks(&mut suite, &client, &s).await;
    if body.is_err() {
        diagnostics(&client).await;
    }
    if s.keep {
        println!("e2e: SPILLWAY_E2E_KEEP=1: leaving the release, samples and CRDs installed");
    } else if body.is_ok() {
        // The uninstall checks are part of the suite.
        let _ = uninstall_checks(&mut suite, &client, &s).await;
    } else {
        best_effort_cleanup(&client, &s).await;
    }
    println!("e2e: {} passed, {} failed", suite.passed, suite.failed);
    if suite.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Connects, and refuses anything that does not look like a disposable test cluster.
async fn preflight() -> Res<Client> {
    let kubeconfig = kube::config::Kubeconfig::read().map_err(|e| format!("KUBECONFIG: {e}"))?;
    let context = kubeconfig.current_context.clone().unwrap_or_default();
    let allowed = std::env::var("SPILLWAY_E2E_CONTEXT").unwrap_or_default();
    if !(context.starts_with("kind-") || (!allowed.is_empty() && context == allowed)) {
        return Err(format!(
            "refusing to run against context {context:?}: it is not a kind-* context. If it is a disposable test cluster, confirm with SPILLWAY_E2E_CONTEXT={context}"
        ));
    }
    let config = kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig: {e}"))?;
    println!(
        "e2e: context {context:?}, API server {}",
        config.cluster_url
    );
    let client = Client::try_from(config).map_err(|e| format!("client: {e}"))?;
    let v = client
        .apiserver_version()
        .await
        .map_err(|e| format!("API server unreachable: {e}"))?;
    println!(
        "e2e: Kubernetes {}.{} ({})",
        v.major, v.minor, v.git_version
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in CRD_NAMES {
        if crds.get_opt(name).await.map_err(fmt)?.is_some() {
            return Err(format!(
                "CRD {name} already exists: spillway is installed in this cluster. The suite installs and deletes the CRDs (and with them every InferenceService); use a fresh cluster"
            ));
        }
    }
    Ok(client)
}

fn fmt(e: kube::Error) -> String {
    format!("{e}")
}

fn repo_path(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command (helm) to completion, off the async threads.
async fn command(program: &str, args: Vec<String>) -> Res<String> {
    let program = program.to_string();
    let shown = format!("{program} {}", args.join(" "));
    println!("e2e:   $ {shown}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program).args(&args).output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{shown}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{shown}: {}\n{text}", out.status))
    }
}

fn image_parts(image: &str) -> (String, String) {
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => {
            (image[..i].to_string(), image[i + 1..].to_string())
        }
        _ => (image.to_string(), "latest".to_string()),
    }
}

fn helm_install_args(s: &Settings, verb: &str) -> Vec<String> {
    let (repo, tag) = image_parts(&s.image);
    [
        verb,
        RELEASE,
        &repo_path("charts/spillway"),
        "--namespace",
        SYSTEM_NS,
        "--set",
        &format!("image.repository={repo}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        "controller.replicas=2",
        "--wait",
        "--timeout",
        "5m",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain((verb == "install").then(|| "--create-namespace".to_string()))
    .collect()
}

/// Polls `f` every 2 s until it returns `Some`; the step's timeout bounds it.
async fn poll<T, F, Fut>(what: &str, mut f: F) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Res<Option<T>>>,
{
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => {
                if e != last {
                    println!("e2e:   waiting for {what}: {e}");
                    last = e;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.iter().find(|c| c.type_ == t)
}

async fn checks(suite: &mut Suite, client: &Client, s: &Settings) -> Res {
    let min = |m: u64| Duration::from_secs(60 * m);

    suite
        .step(
            "helm install (CRDs, RBAC, 2 controller replicas)",
            min(6),
            async {
                command(&s.helm, helm_install_args(s, "install"))
                    .await
                    .map(drop)
            },
        )
        .await?;

    suite
        .step(
            "CRDs installed, established and equal to crds/",
            min(1),
            crds_established(client),
        )
        .await?;

    suite
        .step(
            "controller available, exactly one leader",
            min(3),
            controller_up(client),
        )
        .await?;

    suite
        .step(
            "RBAC: the chart's ServiceAccount has what it needs and no more",
            min(1),
            rbac(client),
        )
        .await?;

    suite
        .step(
            "API server rejects bad specs (schema and CEL)",
            min(1),
            rejections(client),
        )
        .await?;

    suite
        .step(
            "apply config/samples (server-side, strict)",
            min(1),
            apply_samples(client, &s.image),
        )
        .await?;

    suite
        .step(
            "sim-llama: owned objects, Ready, status",
            min(4),
            sim_ready(client, "sim-llama"),
        )
        .await?;

    suite
        .step(
            "sim-llama answers through its client Service",
            min(2),
            chat(client, "sim-llama"),
        )
        .await?;

    suite
        .step(
            "ScalingPolicy status: Valid, counts its services",
            min(1),
            policy_status(client),
        )
        .await?;

    suite
        .step(
            "burst sample: fake provider up, Secret found, service Ready",
            min(4),
            burst(client),
        )
        .await?;

    suite
        .step(
            "vLLM sample without GPUs: objects rendered, pod unschedulable, reported",
            min(3),
            gpu_sample(client),
        )
        .await?;

    suite
        .step(
            "helm upgrade (same chart) keeps everything serving",
            min(6),
            async {
                command(&s.helm, helm_install_args(s, "upgrade")).await?;
                controller_up(client).await?;
                sim_ready(client, "sim-llama").await?;
                chat(client, "sim-llama").await
            },
        )
        .await?;

    suite
        .step(
            "controller logs: no RBAC denials",
            min(1),
            no_forbidden_in_logs(client),
        )
        .await?;

    suite
        .step(
            "deleting the InferenceServices garbage-collects what they owned",
            min(3),
            delete_services(client),
        )
        .await?;
    Ok(())
}

async fn crds_established(client: &Client) -> Res {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in ["inferenceservices.yaml", "scalingpolicies.yaml"] {
        let local: CustomResourceDefinition = serde_saphyr::from_str(
            &std::fs::read_to_string(repo_path(&format!("crds/{file}")))
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("crds/{file}: {e}"))?;
        let name = local.name_any();
        let live = poll(&format!("CRD {name} Established"), || async {
            let crd = api.get(&name).await.map_err(fmt)?;
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            Ok(established.then_some(crd))
        })
        .await?;
        let schema = |c: &CustomResourceDefinition| {
            serde_json::to_value(&c.spec.versions[0].schema).unwrap_or_default()
        };
        if live.spec.names != local.spec.names || schema(&live) != schema(&local) {
            return Err(format!("CRD {name} on the server differs from crds/{file}"));
        }
    }
    Ok(())
}

fn instance_selector() -> ListParams {
    ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"))
}

async fn controller_up(client: &Client) -> Res {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM_NS);
    poll("controller Deployment available 2/2", || async {
        let d = deployments.get(FULLNAME).await.map_err(fmt)?;
        let st = d.status.unwrap_or_default();
        if st.available_replicas == Some(2) && st.updated_replicas == Some(2) {
            Ok(Some(()))
        } else {
            Err(format!(
                "available {:?}, updated {:?}",
                st.available_replicas, st.updated_replicas
            ))
        }
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);
    poll("a controller pod holding the Lease", || async {
        let names: Vec<String> = pods
            .list(&instance_selector())
            .await
            .map_err(fmt)?
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect();
        let lease = leases.get(LEASE).await.map_err(fmt)?;
        let holder = lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        if names.contains(&holder) {
            println!("e2e:   leader: {holder}");
            Ok(Some(()))
        } else {
            Err(format!("holder {holder:?}, pods {names:?}"))
        }
    })
    .await
}

async fn rbac(client: &Client) -> Res {
    let user = format!("system:serviceaccount:{SYSTEM_NS}:{FULLNAME}");
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    // (allowed?, namespace, group, resource, subresource, verb, name)
    let cases: &[(bool, &str, &str, &str, &str, &str, &str)] = &[
        (
            true,
            NS,
            "spillway.dev",
            "inferenceservices",
            "",
            "watch",
            "",
        ),
        (
            true,
            "",
            "spillway.dev",
            "inferenceservices",
            "",
            "list",
            "",
        ),
        (true, NS, "spillway.dev", "scalingpolicies", "", "watch", ""),
        (
            true,
            NS,
            "spillway.dev",
            "inferenceservices",
            "status",
            "patch",
            "",
        ),
        (
            true,
            NS,
            "spillway.dev",
            "scalingpolicies",
            "status",
            "patch",
            "",
        ),
        (true, NS, "apps", "deployments", "", "create", ""),
        (true, NS, "apps", "deployments", "", "patch", ""),
        (true, NS, "", "services", "", "create", ""),
        (true, NS, "", "configmaps", "", "patch", ""),
        (true, NS, "", "serviceaccounts", "", "create", ""),
        (
            true,
            NS,
            "rbac.authorization.k8s.io",
            "roles",
            "",
            "create",
            "",
        ),
        (
            true,
            NS,
            "rbac.authorization.k8s.io",
            "rolebindings",
            "",
            "patch",
            "",
        ),
        (
            true,
            NS,
            "discovery.k8s.io",
            "endpointslices",
            "",
            "watch",
            "",
        ),
        (true, NS, "policy", "poddisruptionbudgets", "", "create", ""),
        (true, "", "", "pods", "", "watch", ""),
        (true, NS, "", "secrets", "", "get", "fake-provider-key"),
        (true, NS, "events.k8s.io", "events", "", "create", ""),
        (
            true,
            SYSTEM_NS,
            "coordination.k8s.io",
            "leases",
            "",
            "update",
            LEASE,
        ),
        (
            true,
            SYSTEM_NS,
            "coordination.k8s.io",
            "leases",
            "",
            "create",
            "",
        ),
        // Least privilege: none of these.
        (false, NS, "", "secrets", "", "list", ""),
        (false, "", "", "secrets", "", "watch", ""),
        // delete only for removing a router when router.enabled turns false.
        (true, NS, "apps", "deployments", "", "delete", ""),
        (false, NS, "", "services", "", "delete", ""),
        (false, NS, "", "pods", "", "create", ""),
        (false, NS, "", "pods", "exec", "create", ""),
        (
            false,
            NS,
            "spillway.dev",
            "inferenceservices",
            "",
            "delete",
            "",
        ),
        (
            false,
            NS,
            "spillway.dev",
            "inferenceservices",
            "",
            "patch",
            "",
        ),
        (false, "", "", "nodes", "", "list", ""),
        (
            false,
            "",
            "rbac.authorization.k8s.io",
            "clusterroles",
            "",
            "create",
            "",
        ),
        (
            false,
            NS,
            "rbac.authorization.k8s.io",
            "roles",
            "",
            "escalate",
            "",
        ),
        (
            false,
            "",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
            "create",
            "",
        ),
        (
            false,
            NS,
            "coordination.k8s.io",
            "leases",
            "",
            "update",
            LEASE,
        ),
        (
            false,
            SYSTEM_NS,
            "coordination.k8s.io",
            "leases",
            "",
            "update",
            "someone-elses-lease",
        ),
    ];
    let mut wrong = Vec::new();
    for (want, ns, group, resource, sub, verb, name) in cases {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{SYSTEM_NS}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    namespace: opt(ns),
                    group: Some(group.to_string()),
                    resource: opt(resource),
                    subresource: opt(sub),
                    verb: opt(verb),
                    name: opt(name),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let got = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(fmt)?
            .status
            .map(|s| s.allowed)
            .unwrap_or(false);
        if got != *want {
            let what = format!(
                "{verb} {group}/{resource}{}{} in {ns:?}",
                if sub.is_empty() { "" } else { "/" },
                sub
            );
            wrong.push(format!("{what}: allowed={got}, expected {want}"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

async fn ensure_namespace(client: &Client, name: &str) -> Res {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .unwrap();
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
        .await
        .map(drop)
        .map_err(fmt)
}

/// POSTs an object with dryRun=All and fieldValidation=Strict; the server's answer.
async fn dry_run_create(client: &Client, plural: &str, obj: &Value) -> Res<Result<(), String>> {
    let req = http::Request::post(format!(
        "/apis/spillway.dev/v1alpha1/namespaces/{NS}/{plural}?dryRun=All&fieldValidation=Strict"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(obj).unwrap())
    .map_err(|e| e.to_string())?;
    match client.request_text(req).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(status)) => Ok(Err(format!("{} {}", status.code, status.message))),
        Err(e) => Err(fmt(e)),
    }
}

async fn rejections(client: &Client) -> Res {
    ensure_namespace(client, NS).await?;
    let isvc = |name: &str, spec: Value| json!({"apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name}, "spec": spec});
    let policy = |spec: Value| json!({"apiVersion": "spillway.dev/v1alpha1", "kind": "ScalingPolicy", "metadata": {"name": "p"}, "spec": spec});
    let engine = json!({"image": "e:1", "gpus": 0});
    let provider = |name: &str, url: &str| json!({"name": name, "url": url, "model": "m", "apiKeySecretRef": {"name": "s", "key": "k"}});
    let cases: Vec<(&str, &str, Value, Option<&str>)> = vec![
        (
            "valid service",
            "inferenceservices",
            isvc("ok", json!({"model": {"name": "m"}, "engine": engine})),
            None,
        ),
        ("valid policy", "scalingpolicies", policy(json!({})), None),
        (
            "minReplicas 0",
            "scalingpolicies",
            policy(json!({"minReplicas": 0})),
            Some("minReplicas"),
        ),
        (
            "max below min",
            "scalingpolicies",
            policy(json!({"minReplicas": 3, "maxReplicas": 2})),
            Some("maxReplicas must be >= minReplicas"),
        ),
        (
            "gpu memory target 1.5",
            "scalingpolicies",
            policy(json!({"targets": {"gpuMemoryUtilization": 1.5}})),
            Some("gpuMemoryUtilization must be in (0, 1]"),
        ),
        (
            "launch above max",
            "scalingpolicies",
            policy(json!({"maxReplicas": 2, "launch": {"replicas": 3}})),
            Some("launch.replicas must be <= maxReplicas"),
        ),
        (
            "negative gpus",
            "inferenceservices",
            isvc(
                "x",
                json!({"model": {"name": "m"}, "engine": {"image": "e", "gpus": -1}}),
            ),
            Some("gpus"),
        ),
        (
            "burst without router",
            "inferenceservices",
            isvc(
                "x",
                json!({"model": {"name": "m"}, "engine": engine, "router": {"enabled": false}, "burst": {"providers": [provider("a", "https://x")]}}),
            ),
            Some("burst providers need the router"),
        ),
        (
            "duplicate providers",
            "inferenceservices",
            isvc(
                "x",
                json!({"model": {"name": "m"}, "engine": engine, "burst": {"providers": [provider("a", "https://x"), provider("a", "https://y")]}}),
            ),
            Some("provider names must be unique"),
        ),
        (
            "ftp provider",
            "inferenceservices",
            isvc(
                "x",
                json!({"model": {"name": "m"}, "engine": engine, "burst": {"providers": [provider("a", "ftp://x")]}}),
            ),
            Some("must start with http:// or https://"),
        ),
        (
            "name too long",
            "inferenceservices",
            isvc(
                &"x".repeat(57),
                json!({"model": {"name": "m"}, "engine": engine}),
            ),
            Some("at most 56 characters"),
        ),
        (
            "unknown field",
            "inferenceservices",
            isvc(
                "x",
                json!({"model": {"name": "m"}, "engine": {"image": "e", "gpu": 1}}),
            ),
            Some("unknown field"),
        ),
        (
            "port out of range",
            "inferenceservices",
            isvc(
                "x",
                json!({"model": {"name": "m"}, "engine": {"image": "e", "port": 70000}}),
            ),
            Some("port"),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, plural, obj, want) in cases {
        match (want, dry_run_create(client, plural, &obj).await?) {
            (None, Ok(())) => {}
            (None, Err(e)) => wrong.push(format!("{what}: rejected: {e}")),
            (Some(w), Ok(())) => wrong.push(format!(
                "{what}: accepted, expected a rejection mentioning {w:?}"
            )),
            (Some(w), Err(e)) if e.contains(w) => println!("e2e:   rejected {what}: {e}"),
            (Some(w), Err(e)) => wrong.push(format!("{what}: rejected, but without {w:?}: {e}")),
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

async fn apply_samples(client: &Client, image: &str) -> Res {
    for file in ["engine-sim.yaml", "burst.yaml", "vllm.yaml"] {
        let text = std::fs::read_to_string(repo_path(&format!("config/samples/{file}")))
            .map_err(|e| e.to_string())?
            .replace(SAMPLE_IMAGE, image);
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| format!("{file}: {e}"))?;
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let obj: DynamicObject = serde_json::from_value(doc).map_err(|e| e.to_string())?;
            let tm = obj.types.clone().ok_or("no apiVersion/kind")?;
            let gvk = GroupVersionKind::try_from(&tm).map_err(|e| e.to_string())?;
            let (ar, _) = kube::discovery::pinned_kind(client, &gvk)
                .await
                .map_err(fmt)?;
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
            let name = obj.name_any();
            // Server-side apply validates strictly: an unknown field fails here.
            let mut pp = PatchParams::apply(FIELD_MANAGER);
            pp.field_validation = Some(kube::api::ValidationDirective::Strict);
            api.patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .map_err(|e| format!("{file}: {} {name}: {e}", tm.kind))?;
            println!("e2e:   applied {file}: {} {name}", tm.kind);
        }
    }
    Ok(())
}

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "InferenceService")
}

async fn sim_ready(client: &Client, name: &str) -> Res {
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let isvc = poll(&format!("{name} Ready"), || async {
        let i = isvcs.get(name).await.map_err(fmt)?;
        let st = i.status.clone().unwrap_or_default();
        let ready = condition(&st.conditions, "Ready");
        let fresh = st.observed_generation == i.metadata.generation;
        match ready {
            Some(c) if c.status == "True" && fresh => Ok(Some(i)),
            Some(c) => Err(format!("Ready={} {}: {}", c.status, c.reason, c.message)),
            None => Err("no Ready condition yet".into()),
        }
    })
    .await?;
    let uid = isvc.uid().unwrap_or_default();
    let st = isvc.status.clone().unwrap_or_default();
    let want_url = format!("http://{name}.{NS}.svc.cluster.local");
    if st.url.as_deref() != Some(want_url.as_str()) {
        return Err(format!("status.url {:?}, expected {want_url}", st.url));
    }
    if st.ready_replicas.unwrap_or(0) < 1 {
        return Err(format!("status.readyReplicas {:?}", st.ready_replicas));
    }
    if let Some(c) = condition(&st.conditions, "Degraded")
        && c.status == "True"
    {
        return Err(format!("Degraded: {} {}", c.reason, c.message));
    }
    let engine = deployments
        .get(&format!("{name}-engine"))
        .await
        .map_err(fmt)?;
    let client_svc = services.get(name).await.map_err(fmt)?;
    let engine_svc = services.get(&format!("{name}-engine")).await.map_err(fmt)?;
    for (what, meta) in [
        ("Deployment engine", &engine.metadata),
        ("Service", &client_svc.metadata),
        ("Service engine", &engine_svc.metadata),
    ] {
        if !owned_by(meta, &uid) {
            return Err(format!(
                "{what} {} lacks a controller ownerReference to the InferenceService",
                meta.name.clone().unwrap_or_default()
            ));
        }
        let managed = meta
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by"));
        if managed.map(String::as_str) != Some("spillway") {
            return Err(format!(
                "{what}: app.kubernetes.io/managed-by is {managed:?}"
            ));
        }
    }
    // With the router built, the client Service points at it: it must be up too.
    if let Some(router) = deployments
        .get_opt(&format!("{name}-router"))
        .await
        .map_err(fmt)?
    {
        if !owned_by(&router.metadata, &uid) {
            return Err("router Deployment not owned by the InferenceService".into());
        }
        poll("router Deployment available", || async {
            let d = deployments
                .get(&format!("{name}-router"))
                .await
                .map_err(fmt)?;
            let st = d.status.unwrap_or_default();
            Ok((st.available_replicas.unwrap_or(0) >= 1).then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// A raw request through the API server's service proxy; (status, body).
/// (The API server consumes and strips any Authorization header, so no bearer key can be sent.)
async fn proxy(
    client: &Client,
    method: &str,
    service: &str,
    path: &str,
    body: Option<Value>,
) -> Res<(u16, String)> {
    let req = http::Request::builder()
        .method(method)
        .uri(format!(
            "/api/v1/namespaces/{NS}/services/{service}/proxy{path}"
        ))
        .header("content-type", "application/json")
        .body(
            body.map(|b| serde_json::to_vec(&b).unwrap())
                .unwrap_or_default()
                .into(),
        )
        .map_err(|e| e.to_string())?;
    let res = client.send(req).await.map_err(fmt)?;
    let status = res.status().as_u16();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

async fn chat(client: &Client, name: &str) -> Res {
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let service = format!("{name}:http");
    poll("a chat completion through the client Service", || async {
        let (code, body) = proxy(client, "GET", &service, "/v1/models", None).await?;
        if code != 200 || !body.contains(model) {
            return Err(format!("/v1/models: {code} {body}"));
        }
        let req = json!({"model": model, "messages": [{"role": "user", "content": "hello from e2e"}], "max_tokens": 8});
        let (code, body) = proxy(client, "POST", &service, "/v1/chat/completions", Some(req)).await?;
        if code != 200 {
            return Err(format!("/v1/chat/completions: {code} {body}"));
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let content = v["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        if content.is_empty() || v["usage"]["completion_tokens"] != 8 || v["model"] != model {
            return Err(format!("unexpected answer: {body}"));
        }
        println!("e2e:   answered: {content:?}");
        Ok(Some(()))
    })
    .await
}

async fn policy_status(client: &Client) -> Res {
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), NS);
    poll("ScalingPolicy sim Valid with 1 service", || async {
        let p = api.get("sim").await.map_err(fmt)?;
        let st = p.status.unwrap_or_default();
        let valid = condition(&st.conditions, "Valid").is_some_and(|c| c.status == "True");
        if valid && st.services == Some(1) {
            Ok(Some(()))
        } else {
            Err(format!("Valid={valid}, services={:?}", st.services))
        }
    })
    .await
}

async fn burst(client: &Client) -> Res {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    poll("fake-provider available", || async {
        let d = deployments.get("fake-provider").await.map_err(fmt)?;
        Ok((d.status.unwrap_or_default().available_replicas.unwrap_or(0) >= 1).then_some(()))
    })
    .await?;
    // The Secret reaches the provider: it demands a key (without SPILLWAY_ENGINE_SIM_API_KEY
    // it would answer 200). The key itself cannot be sent through the API server's proxy.
    let req = json!({"model": "provider-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (code, body) = proxy(
        client,
        "POST",
        "fake-provider:http",
        "/v1/chat/completions",
        Some(req),
    )
    .await?;
    if code != 401 {
        return Err(format!(
            "fake provider without a key: {code} {body}, expected 401"
        ));
    }
    sim_ready(client, "sim-burst").await
}

async fn gpu_sample(client: &Client) -> Res {
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let d = poll("llama-8b-engine rendered", || async {
        deployments.get_opt("llama-8b-engine").await.map_err(fmt)
    })
    .await?;
    let limits = d
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| {
            p.containers[0]
                .resources
                .clone()
                .unwrap_or_default()
                .limits
                .unwrap_or_default()
        })
        .unwrap_or_default();
    if limits.get("nvidia.com/gpu").map(|q| q.0.as_str()) != Some("1") {
        return Err(format!(
            "engine limits {limits:?}, expected nvidia.com/gpu: 1"
        ));
    }
    poll("llama-8b reports its unschedulable replica", || async {
        let i = isvcs.get("llama-8b").await.map_err(fmt)?;
        let st = i.status.unwrap_or_default();
        let ready = condition(&st.conditions, "Ready").map(|c| c.status.clone());
        let exhausted =
            condition(&st.conditions, "CapacityExhausted").is_some_and(|c| c.status == "True");
        if ready.as_deref() == Some("True") {
            return Err("Ready=True without a GPU?".into());
        }
        if st.unschedulable_replicas.unwrap_or(0) >= 1 || exhausted {
            Ok(Some(()))
        } else {
            Err(format!(
                "Ready={ready:?}, unschedulableReplicas={:?}, CapacityExhausted={exhausted}",
                st.unschedulable_replicas
            ))
        }
    })
    .await
}

async fn no_forbidden_in_logs(client: &Client) -> Res {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    let mut bad = Vec::new();
    for p in pods.list(&instance_selector()).await.map_err(fmt)? {
        let logs = pods
            .logs(&p.name_any(), &LogParams::default())
            .await
            .map_err(fmt)?;
        bad.extend(
            logs.lines()
                .filter(|l| l.to_lowercase().contains("forbidden"))
                .take(5)
                .map(|l| format!("{}: {l}", p.name_any())),
        );
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("\n"))
    }
}

async fn delete_services(client: &Client) -> Res {
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), NS);
    for name in ["sim-llama", "sim-burst", "llama-8b"] {
        isvcs
            .delete(name, &DeleteParams::foreground())
            .await
            .map_err(fmt)?;
    }
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=spillway");
    poll("owned objects gone", || async {
        let mut left = Vec::new();
        left.extend(names::<Deployment>(client, NS, &managed).await?);
        left.extend(names::<Service>(client, NS, &managed).await?);
        left.extend(names::<ConfigMap>(client, NS, &managed).await?);
        left.extend(names::<ServiceAccount>(client, NS, &managed).await?);
        left.extend(names::<Role>(client, NS, &managed).await?);
        left.extend(names::<RoleBinding>(client, NS, &managed).await?);
        left.extend(names::<PodDisruptionBudget>(client, NS, &managed).await?);
        left.extend(names::<InferenceService>(client, NS, &ListParams::default()).await?);
        if left.is_empty() {
            Ok(Some(()))
        } else {
            Err(format!("left: {left:?}"))
        }
    })
    .await
}

async fn names<K>(client: &Client, ns: &str, lp: &ListParams) -> Res<Vec<String>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(lp)
        .await
        .map_err(fmt)?
        .items
        .iter()
        .map(|o| format!("{}/{}", K::kind(&K::DynamicType::default()), o.name_any()))
        .collect())
}

async fn cluster_names<K>(client: &Client, lp: &ListParams) -> Res<Vec<String>>
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    Ok(api
        .list(lp)
        .await
        .map_err(fmt)?
        .items
        .iter()
        .map(|o| format!("{}/{}", K::kind(&K::DynamicType::default()), o.name_any()))
        .collect())
}

async fn uninstall_checks(suite: &mut Suite, client: &Client, s: &Settings) -> Res {
    let min = |m: u64| Duration::from_secs(60 * m);
    suite
        .step(
            "helm uninstall leaves nothing of the release behind",
            min(4),
            async {
                command(
                    &s.helm,
                    vec![
                        "uninstall".into(),
                        RELEASE.into(),
                        "--namespace".into(),
                        SYSTEM_NS.into(),
                        "--wait".into(),
                        "--timeout".into(),
                        "3m".into(),
                    ],
                )
                .await?;
                let sel = instance_selector();
                poll("release objects gone", || async {
                    let mut left = Vec::new();
                    left.extend(names::<Deployment>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<Pod>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<Service>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<ServiceAccount>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<Role>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<RoleBinding>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<PodDisruptionBudget>(client, SYSTEM_NS, &sel).await?);
                    left.extend(names::<ConfigMap>(client, SYSTEM_NS, &sel).await?);
                    // The Lease by name: the controller must not have recreated it on its way out.
                    left.extend(names::<Lease>(client, SYSTEM_NS, &ListParams::default()).await?);
                    left.extend(cluster_names::<ClusterRole>(client, &sel).await?);
                    left.extend(cluster_names::<ClusterRoleBinding>(client, &sel).await?);
                    if left.is_empty() {
                        Ok(Some(()))
                    } else {
                        Err(format!("left: {left:?}"))
                    }
                })
                .await?;
                // Helm keeps crds/ on uninstall, by design (README: Uninstall).
                let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
                for name in CRD_NAMES {
                    if crds.get_opt(name).await.map_err(fmt)?.is_none() {
                        return Err(format!("CRD {name} is gone: helm should have kept it"));
                    }
                }
                Ok(())
            },
        )
        .await?;
    suite
        .step("delete the CRDs and the test namespaces", min(4), async {
            delete_crds_and_namespaces(client).await;
            poll("CRDs and namespaces gone", || async {
                let mut left = Vec::new();
                let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
                let nss: Api<Namespace> = Api::all(client.clone());
                for name in CRD_NAMES {
                    if crds.get_opt(name).await.map_err(fmt)?.is_some() {
                        left.push(name.to_string());
                    }
                }
                for ns in [NS, SYSTEM_NS] {
                    if nss.get_opt(ns).await.map_err(fmt)?.is_some() {
                        left.push(format!("namespace {ns}"));
                    }
                }
                if left.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(format!("left: {left:?}"))
                }
            })
            .await
        })
        .await
}

async fn delete_crds_and_namespaces(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in CRD_NAMES {
        let _ = crds.delete(name, &DeleteParams::default()).await;
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in [NS, SYSTEM_NS] {
        let _ = nss.delete(ns, &DeleteParams::default()).await;
    }
}

async fn best_effort_cleanup(client: &Client, s: &Settings) {
    println!(
        "e2e: cleaning up after the failure (SPILLWAY_E2E_KEEP=1 keeps everything for debugging)"
    );
    let _ = command(
        &s.helm,
        vec![
            "uninstall".into(),
            RELEASE.into(),
            "--namespace".into(),
            SYSTEM_NS.into(),
            "--wait".into(),
            "--timeout".into(),
            "2m".into(),
        ],
    )
    .await;
    delete_crds_and_namespaces(client).await;
}

/// What a person would look at first when a step failed.
async fn diagnostics(client: &Client) {
    println!("e2e: ---- diagnostics ----");
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    if let Ok(list) = pods.list(&instance_selector()).await {
        for p in list {
            let lp = LogParams {
                tail_lines: Some(40),
                ..LogParams::default()
            };
            let logs = pods
                .logs(&p.name_any(), &lp)
                .await
                .unwrap_or_else(|e| e.to_string());
            println!("e2e: logs of {}:\n{logs}", p.name_any());
        }
    }
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), NS);
    if let Ok(list) = events.list(&ListParams::default()).await {
        for e in list.items.iter().rev().take(30) {
            println!(
                "e2e: event {} {}/{}: {} {}",
                e.type_.clone().unwrap_or_default(),
                e.involved_object.kind.clone().unwrap_or_default(),
                e.involved_object.name.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            );
        }
    }
    let isvcs: Api<InferenceService> = Api::namespaced(client.clone(), NS);
    if let Ok(list) = isvcs.list(&ListParams::default()).await {
        for i in list {
            println!(
                "e2e: {} status: {}",
                i.name_any(),
                serde_json::to_string(&i.status).unwrap_or_default()
            );
        }
    }
}
