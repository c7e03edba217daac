//! Checks on the packaging (Helm chart, kustomize config, samples, dashboard) that need no
//! cluster: the CRD copies are current, the two RBAC copies agree and stay least-privilege,
//! every sample passes the CRD's own schema and CEL rules and is consistent with itself, the
//! controller flags in config/ parse, and the dashboard only plots metrics that exist.
//!
//! What a real API server checks on top (admission, RBAC at run time, the core kinds' full
//! schemas) is covered by the e2e suite (`e2e/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde_json::Value;

use spillway::api::{InferenceService, ScalingPolicy};
use spillway::crdgen;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file, as JSON values (empty documents dropped).
fn docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

const REGENERATE: &str = "run `cargo run --locked -- crdgen --out-dir crds` and copy crds/*.yaml to charts/spillway/crds/ and config/crd/bases/";

#[test]
fn chart_and_kustomize_crds_are_current() {
    for crd in crdgen::crds() {
        let want = crdgen::render(&crd).unwrap();
        for dir in ["charts/spillway/crds", "config/crd/bases"] {
            let rel = format!("{dir}/{}", crdgen::file_name(&crd));
            assert!(read(&rel) == want, "{rel} is stale; {REGENERATE}");
        }
    }
    // No stray CRD files either (helm installs every file in crds/).
    for dir in ["crds", "charts/spillway/crds", "config/crd/bases"] {
        let mut names: Vec<String> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = crdgen::crds().iter().map(crdgen::file_name).collect();
        want.sort();
        assert_eq!(names, want, "{dir} holds exactly the generated CRDs");
    }
}

// ---------------------------------------------------------------------------------------
// RBAC

/// (apiGroup, resource) -> verbs, from a rule list.
fn grants(rules: &[PolicyRule]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in rules {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "unexpected rule shape {r:?}"
        );
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                out.entry((g.clone(), res.clone()))
                    .or_default()
                    .extend(r.verbs.iter().cloned());
            }
        }
    }
    out
}

/// What the controller needs, and nothing more (README: "RBAC the controller needs").
fn expected_grants() -> BTreeMap<(String, String), BTreeSet<String>> {
    let read = ["get", "list", "watch"].as_slice();
    // Router objects are also deleted when a service sets router.enabled: false, revisions'
    // when they no longer serve.
    let own_deletable = ["get", "list", "watch", "create", "patch", "delete"].as_slice();
    let table: &[(&str, &[&str], &[&str])] = &[
        (
            "spillway.dev",
            &["inferenceservices", "scalingpolicies"],
            read,
        ),
        (
            "spillway.dev",
            &["inferenceservices/status", "scalingpolicies/status"],
            &["get", "patch"],
        ),
        ("spillway.dev", &["inferenceservices"], &["patch"]),
        ("apps", &["deployments"], own_deletable),
        ("", &["services"], own_deletable),
        ("", &["configmaps", "serviceaccounts"], own_deletable),
        (
            "rbac.authorization.k8s.io",
            &["roles", "rolebindings"],
            own_deletable,
        ),
        ("discovery.k8s.io", &["endpointslices"], read),
        ("policy", &["poddisruptionbudgets"], own_deletable),
        ("", &["pods"], read),
        ("", &["secrets"], &["get"]),
        ("events.k8s.io", &["events"], &["create", "patch"]),
    ];
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (group, resources, verbs) in table {
        for r in *resources {
            out.entry((group.to_string(), r.to_string()))
                .or_default()
                .extend(verbs.iter().map(|v| v.to_string()));
        }
    }
    out
}

#[test]
fn rbac_copies_agree_and_are_least_privilege() {
    let chart: Vec<PolicyRule> =
        serde_saphyr::from_str(&read("charts/spillway/files/controller-rules.yaml")).unwrap();
    let role: ClusterRole =
        serde_json::from_value(docs("config/rbac/role.yaml").remove(0)).unwrap();
    let kustomize = role.rules.unwrap();
    assert_eq!(
        chart, kustomize,
        "charts/spillway/files/controller-rules.yaml and config/rbac/role.yaml differ"
    );
    let got = grants(&chart);
    for ((group, resource), verbs) in &got {
        assert!(
            group != "*" && resource != "*" && !verbs.contains("*"),
            "wildcard in {group}/{resource}"
        );
    }
    assert_eq!(
        got[&(String::new(), "secrets".to_string())],
        BTreeSet::from(["get".to_string()]),
        "Secrets: get only, never list/watch"
    );
    assert_eq!(got, expected_grants());

    // Leader election: namespaced, and get/update only on the one Lease.
    let le: Role =
        serde_json::from_value(docs("config/rbac/leader_election_role.yaml").remove(0)).unwrap();
    let rules = le.rules.unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(["spillway-controller".to_string()].as_slice())
    );
    assert_eq!(rules[0].verbs, ["get", "update"]);
    assert_eq!(rules[1].verbs, ["create"]);
    let chart_rbac = read("charts/spillway/templates/rbac.yaml");
    assert!(chart_rbac.contains("verbs: [get, update]") && chart_rbac.contains("verbs: [create]"));
}

// ---------------------------------------------------------------------------------------
// The controller's flags in config/manager parse with the real CLI.

#[derive(Parser, Debug)]
struct ControllerCli {
    #[command(flatten)]
    log: spillway::telemetry::LogArgs,
    #[command(subcommand)]
    cmd: ControllerCmd,
}

#[derive(clap::Subcommand, Debug)]
enum ControllerCmd {
    Controller(spillway::controller::ControllerArgs),
}

#[test]
fn manager_args_parse() {
    let d: Deployment =
        serde_json::from_value(docs("config/manager/manager.yaml").remove(0)).unwrap();
    let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let args = c.args.clone().unwrap();
    let cli = ControllerCli::try_parse_from(std::iter::once("spillway".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("config/manager/manager.yaml args: {e}"));
    let ControllerCmd::Controller(a) = cli.cmd;
    assert!(a.leader_elect);
    assert_eq!(a.lease_name, "spillway-controller");
    assert_eq!(a.metrics_addr.port(), 8080);
    // The same lease name as the Lease object and the leader-election Role.
    assert_eq!(
        docs("config/manager/lease.yaml")[0]["metadata"]["name"],
        "spillway-controller"
    );
}

// ---------------------------------------------------------------------------------------
// Samples

/// Checks `v` against a CRD structural schema the way the API server's schema validation
/// does for what our CRDs use: types, unknown fields (the API server would silently prune
/// them, so a typo'd field just vanishes), required, enum, ranges, lengths, patterns.
fn check_schema(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != true {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            errs.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        errs.push(format!("{path}: {v} is not one of {allowed:?}"));
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                errs.push(format!("{path}: must be an object"));
                return;
            };
            for req in schema["required"].as_array().into_iter().flatten() {
                let req = req.as_str().unwrap();
                if !obj.contains_key(req) {
                    errs.push(format!("{path}.{req}: required"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, child) in obj {
                let here = format!("{path}.{k}");
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    check_schema(s, child, &here, errs);
                } else if schema["additionalProperties"].is_object() {
                    check_schema(&schema["additionalProperties"], child, &here, errs);
                } else if schema["x-kubernetes-preserve-unknown-fields"] != true
                    && schema["additionalProperties"] != true
                {
                    errs.push(format!("{here}: unknown field"));
                }
            }
        }
        Some("array") => {
            let Some(items) = v.as_array() else {
                errs.push(format!("{path}: must be a list"));
                return;
            };
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                errs.push(format!("{path}: more than {max} items"));
            }
            for (i, item) in items.iter().enumerate() {
                check_schema(&schema["items"], item, &format!("{path}[{i}]"), errs);
            }
        }
        Some("string") => {
            let Some(s) = v.as_str() else {
                errs.push(format!("{path}: must be a string, got {v}"));
                return;
            };
            let n = s.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|m| n < m)
                || schema["maxLength"].as_u64().is_some_and(|m| n > m)
            {
                errs.push(format!("{path}: length {n} out of range"));
            }
            if let Some(p) = schema["pattern"].as_str()
                && !regex::Regex::new(p).unwrap().is_match(s)
            {
                errs.push(format!("{path}: {s:?} does not match {p}"));
            }
        }
        Some(t @ ("integer" | "number")) => {
            let ok = if t == "integer" {
                v.is_i64() || v.is_u64()
            } else {
                v.is_number()
            };
            if !ok {
                errs.push(format!("{path}: must be an {t}, got {v}"));
                return;
            }
            let x = v.as_f64().unwrap();
            if schema["minimum"].as_f64().is_some_and(|m| x < m)
                || schema["maximum"].as_f64().is_some_and(|m| x > m)
            {
                errs.push(format!("{path}: {x} out of range"));
            }
        }
        Some("boolean") if !v.is_boolean() => {
            errs.push(format!("{path}: must be true or false, got {v}"));
        }
        Some("boolean") | None => {}
        Some(other) => errs.push(format!("{path}: schema type {other} not handled")),
    }
}

fn crd_schema(kind: &str) -> Value {
    crdgen::openapi_schema(kind).unwrap()
}

/// Schema, then CEL (defaults applied first, as the API server does), then the controller's
/// own validation. Returns every problem.
fn validate_custom_object(obj: &Value) -> Vec<String> {
    let kind = obj["kind"].as_str().unwrap();
    let schema = crd_schema(kind);
    let mut errs = Vec::new();
    for k in obj.as_object().unwrap().keys() {
        if !["apiVersion", "kind", "metadata", "spec"].contains(&k.as_str()) {
            errs.push(format!("{k}: unexpected top-level field"));
        }
    }
    if obj["apiVersion"] != "spillway.dev/v1alpha1" {
        errs.push(format!("apiVersion {}", obj["apiVersion"]));
    }
    check_schema(
        &schema["properties"]["spec"],
        &obj["spec"],
        "spec",
        &mut errs,
    );
    if let Err(e) = kube_cel::Validator::new().validate_with_defaults(&schema, obj, None) {
        errs.push(format!("CEL: {e:?}"));
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match kind {
        "InferenceService" => match serde_json::from_value::<InferenceService>(obj.clone()) {
            Ok(isvc) => {
                if let Err(e) = isvc.spec.validate(name) {
                    errs.push(e);
                }
            }
            Err(e) => errs.push(format!("does not parse: {e}")),
        },
        "ScalingPolicy" => {
            if let Err(e) = serde_json::from_value::<ScalingPolicy>(obj.clone()) {
                errs.push(format!("does not parse: {e}"));
            }
        }
        k => errs.push(format!("unknown kind {k}")),
    }
    errs
}

#[test]
fn schema_check_catches_the_usual_mistakes() {
    let base = serde_json::json!({
        "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "m"},
        "spec": {"model": {"name": "m"}, "engine": {"image": "e:1", "gpus": 0}}
    });
    assert_eq!(validate_custom_object(&base), Vec::<String>::new());
    let cases: &[(&str, &str, Value, &str)] = &[
        (
            "typo",
            "/spec/engine",
            serde_json::json!({"image": "e", "gpu": 0}),
            "spec.engine.gpu: unknown field",
        ),
        (
            "type",
            "/spec/engine",
            serde_json::json!({"image": "e", "gpus": "1"}),
            "must be an integer",
        ),
        (
            "range",
            "/spec/engine",
            serde_json::json!({"image": "e", "port": 70000}),
            "out of range",
        ),
        (
            "enum",
            "/spec/engine",
            serde_json::json!({"image": "e", "metrics": {"preset": "vLLM"}}),
            "is not one of",
        ),
        (
            "required",
            "/spec/model",
            serde_json::json!({}),
            "spec.model.name: required",
        ),
        (
            "pattern",
            "/spec/burst",
            serde_json::json!({"providers": [{"name": "Bad_Name", "url": "https://x", "model": "m",
                                              "apiKeySecretRef": {"name": "s", "key": "k"}}]}),
            "does not match",
        ),
        (
            "CEL",
            "/spec/burst",
            serde_json::json!({"providers": [{"name": "p", "url": "ftp://x", "model": "m",
                                              "apiKeySecretRef": {"name": "s", "key": "k"}}]}),
            "must start with http",
        ),
    ];
    for (what, ptr, value, want) in cases {
        let mut obj = base.clone();
        let (parent, key) = ptr.rsplit_once('/').unwrap();
        obj.pointer_mut(parent).unwrap()[key] = value.clone();
        let errs = validate_custom_object(&obj).join("\n");
        assert!(errs.contains(want), "{what}: {errs:?} lacks {want:?}");
    }
}

#[derive(Parser, Debug)]
struct SimCli {
    #[command(flatten)]
    args: spillway::engine_sim::EngineSimArgs,
}

/// Parses `engine-sim ...` container args with the real CLI.
fn sim_args(args: &[String], what: &str) -> spillway::engine_sim::EngineSimArgs {
    assert_eq!(
        args.first().map(String::as_str),
        Some("engine-sim"),
        "{what}"
    );
    let argv = std::iter::once("spillway-engine-sim").chain(args[1..].iter().map(String::as_str));
    let a = SimCli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{what}: engine-sim args do not parse: {e}"))
        .args;
    assert_eq!(a.host, "0.0.0.0", "{what}: must listen on 0.0.0.0 in a pod");
    a
}

const SAMPLES: [&str; 3] = ["vllm.yaml", "engine-sim.yaml", "burst.yaml"];

#[test]
fn samples_are_valid_and_consistent() {
    let listed = docs("config/samples/kustomization.yaml").remove(0);
    let listed: Vec<&str> = listed["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, SAMPLES, "config/samples/kustomization.yaml");
    let mut on_disk: Vec<String> = std::fs::read_dir(root().join("config/samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut want: Vec<String> = SAMPLES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(on_disk, want, "every sample is listed and checked");

    let mut saw_sim = false;
    let mut saw_burst = false;
    let mut saw_gpu = false;
    for file in SAMPLES {
        let rel = format!("config/samples/{file}");
        let docs = docs(&rel);
        let (mut secrets, mut deployments, mut services, mut policies, mut isvcs) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            BTreeSet::new(),
            Vec::new(),
        );
        for d in &docs {
            let kind = d["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{rel}: no kind"));
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                d["metadata"].get("namespace").is_none(),
                "{rel}: {kind}/{name}: samples carry no namespace (apply with -n)"
            );
            let what = format!("{rel}: {kind}/{name}");
            match kind {
                "InferenceService" | "ScalingPolicy" => {
                    let errs = validate_custom_object(d);
                    assert!(errs.is_empty(), "{what}:\n  {}", errs.join("\n  "));
                    if kind == "ScalingPolicy" {
                        policies.insert(name);
                    } else {
                        isvcs.push(serde_json::from_value::<InferenceService>(d.clone()).unwrap());
                    }
                }
                "Secret" => secrets.push(serde_json::from_value::<Secret>(d.clone()).unwrap()),
                "Deployment" => {
                    deployments.push(serde_json::from_value::<Deployment>(d.clone()).unwrap())
                }
                "Service" => services.push(serde_json::from_value::<Service>(d.clone()).unwrap()),
                other => panic!("{what}: unexpected kind {other}"),
            }
        }
        let secret_has = |name: &str, key: &str| {
            secrets.iter().any(|s| {
                s.metadata.name.as_deref() == Some(name)
                    && s.string_data.as_ref().is_some_and(|d| d.contains_key(key))
            })
        };
        // Plain Deployments (the fake provider): selector matches the template, Secrets resolve,
        // engine-sim args parse.
        let mut provider_models = BTreeMap::new();
        for d in &deployments {
            let name = d.metadata.name.clone().unwrap();
            let spec = d.spec.as_ref().unwrap();
            let tmpl_labels = spec
                .template
                .metadata
                .as_ref()
                .unwrap()
                .labels
                .clone()
                .unwrap();
            for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
                assert_eq!(
                    tmpl_labels.get(k),
                    Some(v),
                    "{rel}: {name}: selector vs template"
                );
            }
            for c in &spec.template.spec.as_ref().unwrap().containers {
                for e in c.env.iter().flatten() {
                    if let Some(r) = e
                        .value_from
                        .as_ref()
                        .and_then(|f| f.secret_key_ref.as_ref())
                    {
                        assert!(
                            secret_has(&r.name, &r.key),
                            "{rel}: {name}: Secret {}/{}",
                            r.name,
                            r.key
                        );
                    }
                }
                let args = c.args.clone().unwrap_or_default();
                if args.first().map(String::as_str) == Some("engine-sim") {
                    let a = sim_args(&args, &format!("{rel}: {name}"));
                    provider_models.insert(name.clone(), (a.model, a.port, tmpl_labels.clone()));
                }
            }
        }
        for isvc in &isvcs {
            let name = isvc.metadata.name.clone().unwrap();
            let what = format!("{rel}: InferenceService/{name}");
            let spec = &isvc.spec;
            if let Some(p) = &spec.scaling_policy_ref {
                assert!(
                    policies.contains(&p.name),
                    "{what}: policy {} not in the file",
                    p.name
                );
            }
            let e = &spec.engine;
            if e.args.first().map(String::as_str) == Some("engine-sim") {
                let a = sim_args(&e.args, &what);
                assert_eq!(
                    a.model, spec.model.name,
                    "{what}: --model vs spec.model.name"
                );
                assert_eq!(
                    a.max_concurrency as i32, e.max_concurrency,
                    "{what}: --max-concurrency"
                );
                assert_eq!(i32::from(a.port), e.port, "{what}: --port vs engine.port");
                assert_eq!(e.gpus, 0, "{what}: the simulated engine needs no GPU");
                assert_eq!(format!("{:?}", a.preset), format!("{:?}", e.metrics.preset));
                assert_eq!(e.health_path, "/health");
                assert!(
                    e.image.starts_with("ghcr.io/spillway-dev/spillway:"),
                    "{what}: image"
                );
                saw_sim = true;
            } else if e.gpus > 0 {
                saw_gpu = true;
            }
            for p in spec.burst.iter().flat_map(|b| &b.providers) {
                assert!(
                    secret_has(&p.api_key_secret_ref.name, &p.api_key_secret_ref.key),
                    "{what}: provider {}: Secret {}/{} is not in the file",
                    p.name,
                    p.api_key_secret_ref.name,
                    p.api_key_secret_ref.key
                );
                // http://<service>:<port>/v1 must reach an engine-sim of this file serving p.model.
                let rest = p
                    .url
                    .strip_prefix("http://")
                    .expect("in-cluster provider over http");
                let (hostport, _) = rest.split_once('/').unwrap();
                let (host, port) = hostport.split_once(':').unwrap();
                let port: i32 = port.parse().unwrap();
                let svc = services
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(host))
                    .unwrap_or_else(|| panic!("{what}: no Service {host}"));
                let sspec = svc.spec.as_ref().unwrap();
                assert!(
                    sspec.ports.iter().flatten().any(|sp| sp.port == port),
                    "{what}: port"
                );
                let (model, _, labels) = provider_models
                    .values()
                    .find(|(_, _, labels)| {
                        sspec
                            .selector
                            .as_ref()
                            .unwrap()
                            .iter()
                            .all(|(k, v)| labels.get(k) == Some(v))
                    })
                    .unwrap_or_else(|| panic!("{what}: Service {host} selects no engine-sim"));
                assert!(!labels.is_empty());
                assert_eq!(
                    model, &p.model,
                    "{what}: provider model vs the fake provider's --model"
                );
                saw_burst = true;
            }
        }
    }
    assert!(
        saw_sim && saw_burst && saw_gpu,
        "a GPU sample, a gpus: 0 sample and a burst sample"
    );
}

// ---------------------------------------------------------------------------------------
// Chart files

#[test]
fn chart_values_schema_and_dashboard_are_sound() {
    let schema: Value = serde_json::from_str(&read("charts/spillway/values.schema.json")).unwrap();
    let values: Value = serde_saphyr::from_str(&read("charts/spillway/values.yaml")).unwrap();
    // Every top-level and controller value is declared (the schema rejects unknown keys).
    for (section, props) in [
        (&values, &schema["properties"]),
        (
            &values["controller"],
            &schema["properties"]["controller"]["properties"],
        ),
    ] {
        for k in section.as_object().unwrap().keys() {
            assert!(
                props.get(k).is_some(),
                "values.yaml key {k} missing from values.schema.json"
            );
        }
    }
    // The chart README documents every top-level value.
    let readme = read("charts/spillway/README.md");
    for k in values.as_object().unwrap().keys() {
        assert!(
            readme.contains(&format!("`{k}")),
            "charts/spillway/README.md lacks {k}"
        );
    }

    // The dashboard plots only metrics the controller or the router export.
    let dash: Value =
        serde_json::from_str(&read("charts/spillway/dashboards/spillway.json")).unwrap();
    // Families appear in the exposition once they have a series: record one of each.
    let metrics = spillway::controller::metrics::Metrics::default();
    drop(metrics.reconcile_started("inferenceservice"));
    metrics.reconcile_failed("inferenceservice", "api");
    metrics.scrape_observed(0.01, Some("timeout"));
    let decision = spillway::autoscale::decide::decide(
        &spillway::api::ScalingPolicySpec::default(),
        spillway::autoscale::decide::SignalsConfigured::default(),
        &spillway::autoscale::decide::Observed {
            current_replicas: 1,
            ..Default::default()
        },
        &spillway::autoscale::decide::History::default(),
        0,
    );
    metrics.decision_observed("ml", "llama", 1, &decision);
    // And the router's families, each with a series.
    let router = spillway::router::metrics::RouterMetrics::default();
    let dest = router.for_destination("together");
    dest.in_flight.inc();
    dest.ttfb.observe(0.1);
    router.request(
        "together",
        "standard",
        spillway::router::outcome::Outcome::Success,
    );
    router.queued("standard").set(1);
    router
        .spend
        .get_or_create(&spillway::router::metrics::ProviderLabel {
            provider: "together".into(),
        })
        .inc_by(0.1);

    let exported = metrics.encode() + &router.render();
    let re = regex::Regex::new(r"spillway_[a-z_]+").unwrap();
    let mut seen = BTreeSet::new();
    let mut stack = vec![&dash];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(expr) = m.get("expr").and_then(Value::as_str) {
                    seen.extend(re.find_iter(expr).map(|m| m.as_str().to_string()));
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    for name in &seen {
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "dashboard uses {name}, which neither the controller nor the router exports; they export:\n{}",
            exported
                .lines()
                .filter(|l| l.starts_with("# TYPE"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for family in [
        "spillway_controller_reconciliations",
        "spillway_controller_leader",
        "spillway_controller_autoscaler_desired_replicas",
        "spillway_controller_autoscaler_scrape_errors",
        "spillway_router_requests",
        "spillway_router_time_to_first_byte_seconds",
        "spillway_router_provider_spend",
    ] {
        assert!(
            seen.iter().any(|s| s.starts_with(family)),
            "dashboard lacks {family}"
        );
    }
}

#[test]
fn dockerfile_builds_what_ci_builds() {
    let df = read("Dockerfile");
    assert!(df.contains("cargo build --release --locked"));
    assert!(df.contains("USER 65532:65532") || df.contains(":nonroot"));
    assert!(Path::new(&root().join(".dockerignore")).exists());
}
