//! The control plane from `../shared/kube/cluster`: started once per run, stopped on drop.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use super::{TempDir, run};

/// Where the shared cluster script is: `SPILLWAY_KUBE_CLUSTER`, else `../shared/kube/cluster`.
pub fn script() -> PathBuf {
    std::env::var_os("SPILLWAY_KUBE_CLUSTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kube/cluster"))
}

/// Stops the control planes of earlier runs whose process is gone (a run killed before it could
/// stop them): their folders are `spillway-plane-<pid>` under the temp dir.
pub fn remove_leftovers() {
    let script = script();
    let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("spillway-plane-") else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let (Some(s), Some(p)) = (script.to_str(), d.path().to_str()) {
            let _ = run(s, &["down", p]);
        }
        let _ = std::fs::remove_dir_all(d.path());
    }
}

pub struct ControlPlane {
    dir: TempDir,
    pub client: Client,
    /// The API server's URL and CA, for kubeconfigs of other users.
    server: String,
    ca_data: String,
}

impl ControlPlane {
    pub async fn up() -> anyhow::Result<Self> {
        let dir = TempDir::new("plane")?;
        let script = script();
        let path = dir.path().to_str().context("temp dir path")?;
        // Blocking, about ten seconds; nothing else runs yet.
        run(script.to_str().context("script path")?, &["up", path])?;
        let kubeconfig = Kubeconfig::read_from(dir.path().join("kubeconfig"))?;
        let cluster = kubeconfig
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .context("kubeconfig has no cluster")?;
        let plane_config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(plane_config)?;
        Ok(Self {
            client,
            server: cluster.server.context("kubeconfig has no server")?,
            ca_data: cluster
                .certificate_authority_data
                .context("kubeconfig has no CA data")?,
            dir,
        })
    }

    /// The admin's kubeconfig file.
    #[allow(dead_code)] // benches/controller_start.rs
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Adds (or updates) a Ready node with `gpus` `nvidia.com/gpu`, labelled `spillway.test/node`.
    pub async fn node(&self, name: &str, gpus: u32) -> anyhow::Result<()> {
        let script = script();
        let path = self.dir.path().to_str().context("temp dir path")?;
        run(
            script.to_str().context("script path")?,
            &["node", path, name, &gpus.to_string()],
        )?;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"labels": {"spillway.test/node": name}}});
        nodes
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await?;
        Ok(())
    }

    /// A kubeconfig file for ServiceAccount `ns/sa`, with a token from the TokenRequest API.
    pub async fn token_kubeconfig(&self, ns: &str, sa: &str, file: &Path) -> anyhow::Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = api
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .with_context(|| format!("token for ServiceAccount {ns}/{sa}"))?
            .status
            .context("TokenRequest without status")?
            .token;
        if token.is_empty() {
            bail!("empty token for {ns}/{sa}");
        }
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\", certificate-authority-data: {}}}\nusers:\n- name: {sa}\n  user: {{token: {token}}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {sa}, namespace: {ns}}}\ncurrent-context: test\n",
            self.server, self.ca_data
        );
        std::fs::write(file, yaml)?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let script = script();
        if let (Some(s), Some(d)) = (script.to_str(), self.dir.path().to_str())
            && let Err(e) = run(s, &["down", d])
        {
            eprintln!("cluster: stopping the control plane: {e:#}");
        }
    }
}
