//! Standalone sources: the config file (re-read when its modification time or size changes) and
//! provider key files (re-read on every tick: they are tiny, and a Secret volume swaps a
//! symlink, which an mtime check on the link would miss).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::config::RouterConfig;
use super::metrics::OutcomeLabel;
use super::server::standalone_backends;
use super::state::RouterState;

/// Applies a config and counts the reload.
pub fn apply(state: &Arc<RouterState>, config: RouterConfig, backends: Option<Vec<String>>) {
    state
        .metrics
        .config_reloads
        .get_or_create(&OutcomeLabel { outcome: "applied" })
        .inc();
    state.set_config(config);
    if let Some(b) = backends {
        state.set_backends(b);
    }
}

/// Counts a config that did not parse or validate; the previous one stays.
pub fn invalid(state: &RouterState, source: &str, e: &dyn std::fmt::Display) {
    tracing::error!(source, error = %e, "router config rejected; keeping the previous one");
    state
        .metrics
        .config_reloads
        .get_or_create(&OutcomeLabel { outcome: "invalid" })
        .inc();
}

fn stamp(path: &str) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Polls the config file; in standalone mode its `backends` (plus `extra`) are the backends.
pub fn spawn_config_watch(
    state: Arc<RouterState>,
    path: String,
    extra_backends: Vec<String>,
    manage_backends: bool,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = stamp(&path);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = stamp(&path);
            if now == last {
                continue;
            }
            last = now;
            match RouterConfig::from_file(&path) {
                Ok(cfg) => {
                    let backends =
                        manage_backends.then(|| standalone_backends(&cfg, &extra_backends));
                    tracing::info!(path, "router config reloaded");
                    apply(&state, cfg, backends);
                }
                Err(e) => invalid(&state, &path, &e),
            }
        }
    })
}

/// Re-reads provider key files every `every`.
pub fn spawn_key_refresh(state: Arc<RouterState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let s = state.clone();
            // File reads block; keep them off the request workers' hot path.
            let _ = tokio::task::spawn_blocking(move || s.refresh_keys()).await;
        }
    })
}
