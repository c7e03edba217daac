//! The per-service router: the data plane that spills over to external providers when GPU
//! capacity is exhausted.

// Pure: every decision, over plain data.
/// Where one request goes, and the retry and queue rules.
pub mod admission;
/// A provider's circuit breaker.
pub mod breaker;
/// The burst budget: requests per minute and spend per hour.
pub mod budget;
/// Request classes: a request's class resolved from its header, and what it may do.
pub mod classes;
/// The router's config file (`router.yaml`).
pub mod config;
/// The inference endpoints forwarded, and which may spill.
pub mod endpoints;
/// The model name in a provider's answer, written back as the client asked.
pub mod model_name;
/// How a request ended: its metric label and its OpenAI error.
pub mod outcome;
/// The routers' shared view of an engine's load, and its fallback to fixed shares.
pub mod peers;
/// The FIFO of waiting requests.
pub mod queue;
/// Revisions: which engines serve which, and which one a request is meant for.
pub mod revisions;
/// Shadow traffic: which requests are mirrored, and how answers compare.
pub mod shadow;
/// Usage read from provider answers as they pass.
pub mod usage;

// Live state around the pure cores.
/// The lock-free local path and per-thread metrics, fenced in with their invariants.
pub mod fast;
/// Provider API keys read from files.
pub mod keys;
/// Prometheus metrics.
pub mod metrics;
/// Engines, providers, budget and queue behind one lock, and leases on them.
pub mod state;

// I/O.
/// A serving thread's pool and clients.
mod app;
/// EndpointSlices, the ConfigMap and the service's status watched in a cluster.
pub mod cluster;
/// Finishing in-flight requests at shutdown.
mod drain;
/// HTTP/1.1 to local engines.
pub mod engine;
/// The exchange of reports with the service's other routers.
pub mod exchange;
/// Accepting connections and spreading them over the threads.
mod listen;
mod mirror;
/// A completion's way upstream, with the retry policy.
mod proxy;
/// The answer's way back to the client.
mod relay;
/// The route table.
mod routes;
/// Starting and stopping the server and its threads.
pub mod server;
/// Config and key files watched for changes.
pub mod sources;

#[cfg(test)]
mod tests;

use std::time::Duration;

use clap::Args;

pub use server::{RouterOptions, RouterServer};
pub use state::BreakerSettings;

use config::RouterConfig;

#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// Router config file (the ConfigMap's `router.yaml`); re-read when it changes. With a
    /// `cluster` section (and without --standalone) backends, config and capacity state are
    /// watched through the Kubernetes API instead.
    #[arg(long, env = "SPILLWAY_ROUTER_CONFIG")]
    pub config: Option<String>,
    /// A local engine `host:port`, added to the config's `backends` (repeatable).
    #[arg(long = "backend")]
    pub backends: Vec<String>,
    /// Address to listen on; overrides the config's `listen`.
    #[arg(long)]
    pub listen: Option<String>,
    /// Model name `/v1/models` lists when the config has no `cluster.model`.
    #[arg(long)]
    pub model: Option<String>,
    /// Treat in-cluster capacity as exhausted (burst mode `CapacityExhausted`), for local use.
    #[arg(long)]
    pub capacity_exhausted: bool,
    /// Ignore the config's `cluster` section: no Kubernetes API access.
    #[arg(long)]
    pub standalone: bool,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// How often the config file and provider key files are checked for changes, in ms.
    #[arg(long, default_value_t = 1000)]
    pub reload_interval_ms: u64,
    /// Consecutive failures (5xx, 429, 401, 403, timeouts, connection errors, answers cut off)
    /// that open a provider's circuit breaker.
    #[arg(long, default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an open breaker stays open before one probe request, in seconds.
    #[arg(long, default_value_t = 30)]
    pub breaker_open_seconds: u64,
    /// Serving threads, each with its own runtime and engine connection pool (default: one per
    /// CPU the process may use, at most 4). The first accepts and packs connections onto as few
    /// threads as the load needs.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest a local engine may take to send response headers (then 504) or pause mid-answer
    /// (then the answer is cut off), in seconds.
    #[arg(long, default_value_t = 600)]
    pub engine_timeout_seconds: u64,
    /// On SIGTERM, longest wait for in-flight requests and streams, in seconds.
    #[arg(long, default_value_t = 300)]
    pub drain_timeout_seconds: u64,
    /// On SIGTERM, how long to go on accepting new connections (with `/readyz` failing) before
    /// the drain, in seconds: Services keep sending a terminating pod connections until their
    /// endpoints catch up. A second signal skips it.
    #[arg(long, default_value_t = 0)]
    pub shutdown_delay_seconds: u64,
}

/// Runs until SIGTERM or ctrl-c, then drains in-flight requests.
pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => RouterConfig::from_file(path)?,
        None => RouterConfig::from_yaml("{}")?,
    };
    if let Some(l) = &args.listen {
        config.listen = l.clone();
    }
    let cluster = config.cluster.clone().filter(|_| !args.standalone);
    let listen = config.listen.clone();
    let opts = RouterOptions {
        config,
        // In a cluster the EndpointSlices are the backends; the static lists are ignored.
        extra_backends: args.backends.clone(),
        in_cluster: cluster.is_some(),
        max_body_bytes: args.max_body_bytes,
        model: args.model.clone(),
        breaker: BreakerSettings {
            failures: args.breaker_failures,
            open: Duration::from_secs(args.breaker_open_seconds),
        },
        drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
        engine_timeout: Duration::from_secs(args.engine_timeout_seconds.max(1)),
        capacity_exhausted: args.capacity_exhausted,
    };
    let threads = args.threads.unwrap_or_else(|| {
        default_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    let server = RouterServer::start_threads(opts, threads)
        .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    let state = server.state().clone();
    let every = Duration::from_millis(args.reload_interval_ms.max(50));
    let mut peering = None;
    sources::spawn_key_refresh(state.clone(), every);
    match &cluster {
        Some(c) => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
            cluster::spawn(client.clone(), c.clone(), state.clone());
            peering = Some(client);
        }
        None => {
            if let Some(path) = &args.config {
                sources::spawn_config_watch(
                    state.clone(),
                    path.clone(),
                    args.backends.clone(),
                    true,
                    every,
                );
            }
        }
    }
    let _exchange = share_limits(&state, server.addr(), cluster.as_ref(), peering);
    let cfg = state.config();
    tracing::info!(
        addr = %server.addr(),
        backends = state.backends().len(),
        providers = cfg.burst.providers.len(),
        mode = ?cfg.burst.mode,
        cluster = cluster.is_some(),
        threads,
        "router listening"
    );
    shutdown_signal().await;
    let delay = Duration::from_secs(args.shutdown_delay_seconds);
    server.close(delay, shutdown_signal()).await;
    tracing::info!("router stopped");
    Ok(())
}

/// With a `peers` section, shares every limit with the service's other routers: reports on
/// UDP `peers.port` at the listen address's IP, peers from the config or (in a cluster) the
/// client Service's EndpointSlices. A port that cannot be bound leaves the router on its fixed
/// share.
fn share_limits(
    state: &std::sync::Arc<state::RouterState>,
    listen: std::net::SocketAddr,
    cluster: Option<&config::ClusterConfig>,
    client: Option<kube::Client>,
) -> Option<exchange::Exchange> {
    let peers = state.config().peers.clone()?;
    let name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| listen.to_string());
    let at = std::net::SocketAddr::new(listen.ip(), peers.port);
    let ex = match std::net::UdpSocket::bind(at)
        .and_then(|s| exchange::start(state, s, name.clone(), &peers.addresses))
    {
        Ok(ex) => Some(ex),
        Err(e) => {
            tracing::error!(%at, error = %e, "cannot exchange reports with peer routers: keeping to the fixed share");
            exchange::join(state, name.clone());
            None
        }
    };
    if let (Some(c), Some(client)) = (cluster, client)
        && !c.router_service.is_empty()
    {
        cluster::spawn_peers(client, c, state.clone(), name, peers.port);
    }
    ex
}

/// Serving threads when `--threads` is not given. A pod without a CPU limit sees every CPU of
/// its node (dozens on a GPU node): each thread keeps its own timers and engine connections, and
/// a router needing more than a few cores is better scaled out in replicas.
const MAX_DEFAULT_THREADS: usize = 4;

fn default_threads(cpus: usize) -> usize {
    cpus.clamp(1, MAX_DEFAULT_THREADS)
}

async fn shutdown_signal() {
    crate::runtime::shutdown_signal().await;
}

#[cfg(test)]
mod args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RouterArgs,
    }

    #[test]
    fn default_threads_follow_the_cpus_up_to_a_few() {
        let got: Vec<usize> = [0, 1, 2, 4, 96].into_iter().map(default_threads).collect();
        assert_eq!(got, [1, 1, 2, 4, 4]);
    }

    #[test]
    fn flags_parse_with_repeated_backends() {
        let a = Cli::try_parse_from([
            "x",
            "--backend",
            "127.0.0.1:1",
            "--backend",
            "127.0.0.1:2",
            "--capacity-exhausted",
            "--max-body-bytes",
            "10",
        ])
        .unwrap()
        .args;
        assert_eq!(a.backends, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(a.capacity_exhausted && !a.standalone);
        assert_eq!((a.max_body_bytes, a.breaker_failures), (10, 5));
        assert!(Cli::try_parse_from(["x", "--max-body-bytes", "lots"]).is_err());
    }
}
