//! Plays kubelet for spillway's pods (there is no kubelet on the test control plane).
//!
//! A pod bound to a node becomes a process of the spillway binary under test, run with the
//! container's args: an engine pod in a network namespace of its own on the test bridge, a
//! router pod in the host namespace on an address of its own on the bridge (it must reach the
//! API server, which listens on 127.0.0.1 only), in a private mount namespace where its volumes (the
//! ConfigMap, the projected provider keys) are mounted at their mount paths, with a token of its
//! ServiceAccount. The pod's status follows: Running with its IP, then Ready as its readiness
//! probe answers (period and failure threshold as the pod says). A pod marked for deletion has its
//! process stopped and is then force-deleted.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret, Volume};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::Command;
use tokio::task::JoinHandle;

use super::net::{Bridge, HostAddr, PodNet};
use super::plane::ControlPlane;
use super::procs::{Proc, spillway_bin};

/// The label every pod spillway renders carries.
const MANAGED: &str = "app.kubernetes.io/managed-by=spillway";
/// Longest a stopping pod's process gets after SIGTERM here (the pods ask for minutes).
const STOP_GRACE: Duration = Duration::from_secs(8);

struct RunningPod {
    namespace: String,
    name: String,
    component: String,
    ip: Ipv4Addr,
    proc: tokio::sync::Mutex<Proc>,
    prober: JoinHandle<()>,
    // Dropped after the process stops: the namespace or address, and the volume files.
    _net: Option<PodNet>,
    _addr: Option<HostAddr>,
    dir: PathBuf,
}

struct Inner {
    client: Client,
    plane: Arc<ControlPlane>,
    bridge: Bridge,
    work: PathBuf,
    /// By pod uid. `None`: being started.
    pods: Mutex<HashMap<String, Option<Arc<RunningPod>>>>,
}

pub struct Kubelet {
    inner: Arc<Inner>,
    watch: JoinHandle<()>,
}

/// What a scenario may know of a running pod.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub component: String,
    pub ip: Ipv4Addr,
}

impl Kubelet {
    pub fn start(plane: Arc<ControlPlane>, bridge: Bridge, work: &Path) -> Self {
        let inner = Arc::new(Inner {
            client: plane.client.clone(),
            plane,
            bridge,
            work: work.to_path_buf(),
            pods: Mutex::new(HashMap::new()),
        });
        let watch = tokio::spawn(watch_pods(inner.clone()));
        Self { inner, watch }
    }

    /// The pods of `namespace` running now.
    pub fn pods(&self, namespace: &str) -> Vec<PodInfo> {
        let pods = self.inner.pods.lock().expect("not poisoned");
        let mut out: Vec<PodInfo> = pods
            .values()
            .flatten()
            .filter(|p| p.namespace == namespace)
            .map(|p| PodInfo {
                name: p.name.clone(),
                component: p.component.clone(),
                ip: p.ip,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// SIGKILLs a pod's process and leaves its status to the readiness probe, as when a
    /// container dies between probes.
    pub async fn kill(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let pod = {
            let pods = self.inner.pods.lock().expect("not poisoned");
            pods.values()
                .flatten()
                .find(|p| p.namespace == namespace && p.name == name)
                .cloned()
        };
        let pod = pod.with_context(|| format!("no running pod {namespace}/{name}"))?;
        pod.proc.lock().await.kill().await;
        Ok(())
    }

    /// Stops every process it started and deletes their namespaces.
    pub async fn shutdown(self) {
        self.watch.abort();
        let pods: Vec<Arc<RunningPod>> = {
            let mut pods = self.inner.pods.lock().expect("not poisoned");
            pods.drain().filter_map(|(_, p)| p).collect()
        };
        futures::future::join_all(pods.iter().map(|p| stop_process(p))).await;
    }
}

async fn watch_pods(inner: Arc<Inner>) {
    let api: Api<Pod> = Api::all(inner.client.clone());
    let mut events = watcher(api, watcher::Config::default().labels(MANAGED))
        .default_backoff()
        .boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                on_pod(&inner, p);
            }
            Ok(watcher::Event::Delete(p)) => {
                let uid = p.uid().unwrap_or_default();
                let gone = inner.pods.lock().expect("not poisoned").remove(&uid);
                if let Some(Some(pod)) = gone {
                    tokio::spawn(async move { stop_process(&pod).await });
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("kubelet: pod watch: {e}"),
        }
    }
}

fn on_pod(inner: &Arc<Inner>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        let running = inner.pods.lock().expect("not poisoned").remove(&uid);
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Some(Some(p)) = running {
                stop_process(&p).await;
            }
            force_delete(&inner.client, &pod).await;
        });
        return;
    }
    let bound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    if !bound {
        return;
    }
    {
        let mut pods = inner.pods.lock().expect("not poisoned");
        if pods.contains_key(&uid) {
            return;
        }
        pods.insert(uid.clone(), None);
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        match start_pod(&inner, &pod).await {
            Ok(p) => {
                let orphan = {
                    let mut pods = inner.pods.lock().expect("not poisoned");
                    match pods.get_mut(&uid) {
                        Some(slot) => {
                            *slot = Some(p);
                            None
                        }
                        None => Some(p),
                    }
                };
                // Deleted while starting.
                if let Some(p) = orphan {
                    stop_process(&p).await;
                }
            }
            Err(e) => {
                // A kubelet retries a container that failed to start; so does this, a second
                // later, with the pod as it is then (unless it is gone).
                eprintln!("kubelet: starting pod {name}: {e:#} (retrying)");
                inner.pods.lock().expect("not poisoned").remove(&uid);
                tokio::time::sleep(Duration::from_secs(1)).await;
                let api: Api<Pod> =
                    Api::namespaced(inner.client.clone(), &pod.namespace().unwrap_or_default());
                if let Ok(Some(now)) = api.get_opt(&pod.name_any()).await
                    && now.uid() == Some(uid)
                {
                    on_pod(&inner, now);
                }
            }
        }
    });
}

async fn stop_process(p: &RunningPod) {
    p.prober.abort();
    p.proc.lock().await.stop(STOP_GRACE).await;
    let _ = std::fs::remove_dir_all(&p.dir);
}

async fn force_delete(client: &Client, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name_any(), &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => eprintln!("kubelet: force-deleting {}: {e}", pod.name_any()),
    }
}

async fn start_pod(inner: &Arc<Inner>, pod: &Pod) -> anyhow::Result<Arc<RunningPod>> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let container = spec.containers.first().context("pod without containers")?;
    let component = pod
        .labels()
        .get("app.kubernetes.io/component")
        .cloned()
        .unwrap_or_default();
    let dir = inner.work.join(format!("{ns}-{name}"));
    std::fs::create_dir_all(&dir)?;
    let mut env = resolve_env(
        &inner.client,
        &ns,
        pod,
        container.env.as_deref().unwrap_or_default(),
    )
    .await?;
    let args = container.args.clone().unwrap_or_default();
    let log = dir.with_extension("log");

    let (ip, net, addr, cmd) = if component == "router" {
        let addr = inner.bridge.host_addr()?;
        let ip = addr.ip;
        let sa = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        let kubeconfig = dir.join("kubeconfig");
        inner.plane.token_kubeconfig(&ns, &sa, &kubeconfig).await?;
        env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        let mounts = materialize_volumes(
            &inner.client,
            &ns,
            spec.volumes.as_deref().unwrap_or_default(),
            container,
            &dir,
        )
        .await?;
        let port = container_port(container, "http").context("router without an http port")?;
        let mut full = args.clone();
        full.extend(["--listen".to_string(), format!("{ip}:{port}")]);
        (
            ip,
            None,
            Some(addr),
            in_mount_namespace(&dir, &mounts, &full)?,
        )
    } else {
        let net = inner.bridge.pod_net()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.ns, spillway_bin()])
            .args(&args);
        (net.ip, Some(net), None, cmd)
    };
    let mut cmd = cmd;
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .envs(&env);
    let proc = Proc::spawn(&format!("{ns}/{name}"), cmd, &log)?;

    let api: Api<Pod> = Api::namespaced(inner.client.clone(), &ns);
    patch_status(&api, &name, container, ip, false).await?;
    let probe = readiness(container).context("container without an HTTP readiness probe")?;
    let prober = tokio::spawn(run_probe(api, name.clone(), container.clone(), ip, probe));
    Ok(Arc::new(RunningPod {
        namespace: ns,
        name,
        component,
        ip,
        proc: tokio::sync::Mutex::new(proc),
        prober,
        _net: net,
        _addr: addr,
        dir,
    }))
}

/// The environment a container gets: values, the downward API and Secret keys.
async fn resolve_env(
    client: &Client,
    ns: &str,
    pod: &Pod,
    vars: &[EnvVar],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for v in vars {
        let value = if let Some(val) = &v.value {
            val.clone()
        } else if let Some(from) = &v.value_from {
            if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "metadata.namespace" => ns.to_string(),
                    "metadata.name" => pod.name_any(),
                    other => bail!("env {}: fieldRef {other} is not played here", v.name),
                }
            } else if let Some(s) = &from.secret_key_ref {
                let secret = Api::<Secret>::namespaced(client.clone(), ns)
                    .get(&s.name)
                    .await?;
                secret_value(&secret, &s.key)
                    .with_context(|| format!("env {}: key {}", v.name, s.key))?
            } else {
                bail!("env {}: valueFrom kind not played here", v.name);
            }
        } else {
            String::new()
        };
        out.insert(v.name.clone(), value);
    }
    Ok(out)
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key).cloned())
        })
}

/// Writes each mounted volume's files under `dir`; returns (source dir, mount path) pairs.
async fn materialize_volumes(
    client: &Client,
    ns: &str,
    volumes: &[Volume],
    container: &Container,
    dir: &Path,
) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut mounts = Vec::new();
    for m in container.volume_mounts.as_deref().unwrap_or_default() {
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .with_context(|| format!("no volume {}", m.name))?;
        // The API token volume the ServiceAccount admission adds: the process gets a token of
        // the same ServiceAccount through KUBECONFIG instead (the API server is not where the
        // in-cluster config would look for it).
        let token_volume = v.projected.as_ref().is_some_and(|p| {
            p.sources
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|s| s.service_account_token.is_some())
        });
        if token_volume {
            continue;
        }
        let src = dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&src)?;
        if let Some(cm) = &v.config_map {
            let data = Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get(&cm.name)
                .await?
                .data
                .unwrap_or_default();
            for (k, val) in data {
                std::fs::write(src.join(k), val)?;
            }
        } else if let Some(p) = &v.projected {
            for s in p.sources.as_deref().unwrap_or_default() {
                let Some(sp) = &s.secret else { continue };
                let secret = match Api::<Secret>::namespaced(client.clone(), ns)
                    .get_opt(&sp.name)
                    .await?
                {
                    Some(s) => s,
                    None if sp.optional == Some(true) => continue,
                    None => bail!("secret {} not found", sp.name),
                };
                for item in sp.items.as_deref().unwrap_or_default() {
                    let Some(value) = secret_value(&secret, &item.key) else {
                        continue;
                    };
                    let file = src.join(&item.path);
                    std::fs::create_dir_all(file.parent().expect("a parent"))?;
                    std::fs::write(&file, value)?;
                }
            }
        } else if v.empty_dir.is_none() {
            bail!("volume {}: kind not played here", v.name);
        }
        mounts.push((src, m.mount_path.clone()));
    }
    Ok(mounts)
}

/// `spillway <args>` in a private mount namespace with the volumes bind-mounted at their paths.
/// Mount paths are under /etc, which gets a private overlay so nothing on the host changes.
fn in_mount_namespace(
    dir: &Path,
    mounts: &[(PathBuf, String)],
    args: &[String],
) -> anyhow::Result<Command> {
    let upper = dir.join("etc-upper");
    let work = dir.join("etc-work");
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    let mut script = format!(
        "set -e\nmount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc\n",
        upper.display(),
        work.display()
    );
    for (src, path) in mounts {
        if !path.starts_with("/etc/") || path.contains(['\'', ' ']) {
            bail!("mount path {path} is not played here");
        }
        script.push_str(&format!(
            "mkdir -p '{path}'\nmount --bind '{}' '{path}'\n",
            src.display()
        ));
    }
    script.push_str("exec \"$@\"\n");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
        spillway_bin(),
    ])
    .args(args);
    Ok(cmd)
}

fn container_port(c: &Container, name: &str) -> Option<i32> {
    c.ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// An HTTP readiness probe: path, port, period, failure threshold.
struct Probe {
    path: String,
    port: i32,
    period: Duration,
    failures: u32,
}

fn readiness(c: &Container) -> Option<Probe> {
    let p = c.readiness_probe.as_ref()?;
    let get = p.http_get.as_ref()?;
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => {
            container_port(c, s)?
        }
    };
    Some(Probe {
        path: get.path.clone().unwrap_or_else(|| "/".into()),
        port,
        period: Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64),
        failures: p.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

/// Probes until aborted: quickly until the first success (the process is starting), then every
/// period; Ready follows as a kubelet would set it.
async fn run_probe(api: Api<Pod>, name: String, container: Container, ip: Ipv4Addr, probe: Probe) {
    let mut ready = false;
    let mut ever_ready = false;
    let mut failed = 0u32;
    loop {
        let ok = super::traffic::get_ok(&format!("{ip}:{}", probe.port), &probe.path).await;
        failed = if ok { 0 } else { failed + 1 };
        let now_ready = if ok {
            true
        } else if failed >= probe.failures {
            false
        } else {
            ready
        };
        if now_ready != ready {
            match patch_status(&api, &name, &container, ip, now_ready).await {
                Ok(()) => {
                    ready = now_ready;
                    ever_ready |= ready;
                }
                Err(e) => eprintln!("kubelet: pod {name} status: {e:#}"),
            }
        }
        let wait = if ever_ready {
            probe.period
        } else {
            Duration::from_millis(200)
        };
        tokio::time::sleep(wait).await;
    }
}

async fn patch_status(
    api: &Api<Pod>,
    name: &str,
    c: &Container,
    ip: Ipv4Addr,
    ready: bool,
) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now().to_string();
    let r = if ready { "True" } else { "False" };
    let body = json!({"status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "startTime": now,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": r, "lastTransitionTime": now},
            {"type": "Ready", "status": r, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": c.name, "ready": ready, "restartCount": 0, "started": true,
            "image": c.image.clone().unwrap_or_default(), "imageID": "",
            "state": {"running": {"startedAt": now}},
        }],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&body))
        .await
        .with_context(|| format!("patching the status of pod {name}"))?;
    Ok(())
}
