//! Child processes that are always stopped: SIGTERM with a bounded grace, then SIGKILL; killed
//! on drop. Output goes to a log file the scenarios can read.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

/// The spillway binary under test.
pub fn spillway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spillway")
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    #[allow(dead_code)] // benches/controller_start.rs
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, at once (a crash, a node lost).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = super::run("kill", &["-TERM", &pid.to_string()]);
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        self.kill().await;
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
