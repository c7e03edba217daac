//! e. Every controller ran as the chart's ServiceAccount and every router as its rendered
//! ServiceAccount (tokens from the TokenRequest API): none of them was refused anything by RBAC,
//! nor logged any other refusal as a warning.
//! Runs last and reads the logs of everything the scenarios before it started.

use anyhow::ensure;

use super::Env;

/// An RBAC refusal ("... is forbidden: User ... cannot list ..."), or any other refusal logged
/// as a warning or an error. (A debug line about a namespace being deleted is neither.)
fn refusal(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    lower.contains("forbidden")
        && (lower.contains(" cannot ") || line.contains(" WARN ") || line.contains(" ERROR "))
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    let mut read = 0;
    let mut refused = Vec::new();
    for entry in std::fs::read_dir(env.work.path())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let controller = name.starts_with("ctl-");
        let router = name.contains("-router-");
        if !name.ends_with(".log") || !(controller || router) {
            continue;
        }
        read += 1;
        for line in std::fs::read_to_string(&path)?.lines() {
            if refusal(line) {
                refused.push(format!("{name}: {line}"));
            }
        }
    }
    ensure!(
        read > 0,
        "no controller or router log to read: run it after the other scenarios"
    );
    ensure!(
        refused.is_empty(),
        "refused by RBAC:\n{}",
        refused.join("\n")
    );
    Ok(format!(
        "no \"forbidden\" in {read} controller and router logs"
    ))
}
