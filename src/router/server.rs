//! The router's HTTP side, on hyper directly: per-connection tasks we track for a graceful drain,
//! and a response body that relays upstream frames as they arrive (no buffering; a provider
//! stream whose usage chunk is taken out holds back at most a partial line) while it holds the
//! request's lease, times it, and reads provider usage on the way through.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::app::{App, Limits};
use super::config::RouterConfig;
use super::listen::{Source, Spread, bind, serve};
use super::state::{BreakerSettings, RouterState};

/// Server settings besides the live config.
#[derive(Clone, Debug)]
pub struct RouterOptions {
    pub config: RouterConfig,
    /// Backends given on the command line, added to the config's.
    pub extra_backends: Vec<String>,
    pub max_body_bytes: usize,
    /// Served model name for `/v1/models` when the config does not name one.
    pub model: Option<String>,
    pub breaker: BreakerSettings,
    /// Longest a shutdown waits for in-flight requests (streams included).
    pub drain_timeout: Duration,
    pub capacity_exhausted: bool,
    /// Longest a local engine may take to send response headers (a hung engine must not hold
    /// its clients and slots forever; past it the client gets 504), or pause mid-answer (past
    /// it the answer is cut off).
    pub engine_timeout: Duration,
    /// The backends will come from EndpointSlices: none until then, and not ready before the
    /// first list (an empty list would send everything to providers or the queue).
    pub in_cluster: bool,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            config: RouterConfig::from_yaml("{}").unwrap_or_else(|_| unreachable!()),
            extra_backends: Vec::new(),
            max_body_bytes: 16 << 20,
            model: None,
            breaker: BreakerSettings::default(),
            drain_timeout: Duration::from_secs(300),
            capacity_exhausted: false,
            engine_timeout: Duration::from_secs(600),
            in_cluster: false,
        }
    }
}

impl RouterOptions {
    fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            model: self.model.clone(),
            engine_timeout: self.engine_timeout,
        }
    }
}

/// The local backends of a standalone router: the config's plus the command line's.
pub fn standalone_backends(config: &RouterConfig, extra: &[String]) -> Vec<String> {
    let mut all = config.backends.clone();
    all.extend(extra.iter().cloned());
    all
}

fn state_for(opts: &RouterOptions) -> Arc<RouterState> {
    let backends = if opts.in_cluster {
        Vec::new()
    } else {
        standalone_backends(&opts.config, &opts.extra_backends)
    };
    let state = RouterState::new(opts.config.clone(), backends, opts.breaker);
    state.set_synced(!opts.in_cluster);
    state.set_capacity_exhausted(opts.capacity_exhausted);
    state
}

enum Worker {
    Task(tokio::task::JoinHandle<()>),
    Thread(std::thread::JoinHandle<()>),
}

/// A running router. Dropping it stops the server.
pub struct RouterServer {
    addr: SocketAddr,
    state: Arc<RouterState>,
    /// Open client connections per serving thread.
    open: Vec<Arc<AtomicUsize>>,
    stop: watch::Sender<bool>,
    workers: Vec<Worker>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = rx.wait_for(|s| *s).await;
}

impl RouterServer {
    /// Serves on an already bound listener, in the current runtime.
    pub fn start_on(opts: RouterOptions, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = state_for(&opts);
        let open = Arc::new(AtomicUsize::new(0));
        let app = App::new(state.clone(), opts.limits(), open.clone());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            app,
            Source::Tokio(listener, None),
            opts.drain_timeout,
            stopped(rx),
        ));
        Ok(Self {
            addr,
            state,
            open: vec![open],
            stop,
            workers: vec![Worker::Task(task)],
        })
    }

    /// Serves `config.listen` on `threads` threads, each with its own single-threaded runtime
    /// and its own upstream pools: a request, its engine connection and its response stay on
    /// one thread, with no cross-thread wake-ups (the shape of nginx's workers). Thread 0
    /// accepts and packs connections onto as few threads as the load needs (see `Spread`):
    /// an event loop that is already awake serves a request for less than one woken up for
    /// it. Routing state is shared, so limits and the queue are global.
    pub fn start_threads(opts: RouterOptions, threads: usize) -> std::io::Result<Self> {
        let addr = opts
            .config
            .listen
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                std::io::Error::other(format!("{:?} names no address", opts.config.listen))
            })?;
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let state = state_for(&opts);
        let (stop, rx) = watch::channel(false);
        let threads = threads.max(1);
        let open: Vec<Arc<AtomicUsize>> = (0..threads).map(|_| Arc::default()).collect();
        let mut handoff = Vec::new();
        let mut sources = vec![Source::Listener(listener)];
        for counter in &open[1..] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            handoff.push(tx);
            sources.push(Source::Handoff(rx, counter.clone()));
        }
        let mut spread = Some(Spread {
            open: open.clone(),
            handoff,
        });
        let mut workers = Vec::new();
        for (i, source) in sources.into_iter().enumerate() {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
            let (state, opts, rx) = (state.clone(), opts.clone(), rx.clone());
            let (counter, spread) = (open[i].clone(), spread.take());
            let h = std::thread::Builder::new()
                .name(format!("router-{i}"))
                .spawn(move || {
                    super::fast::sharded::use_shard(i);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let source = match source {
                            Source::Listener(l) => match TcpListener::from_std(l) {
                                Ok(l) => Source::Tokio(l, spread),
                                Err(e) => {
                                    let _ = ready_tx.send(Err(e));
                                    return;
                                }
                            },
                            other => other,
                        };
                        let _ = ready_tx.send(Ok(()));
                        let app = App::new(state, opts.limits(), counter);
                        serve(app, source, opts.drain_timeout, stopped(rx)).await;
                    });
                })?;
            workers.push(Worker::Thread(h));
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("router thread failed to start"))??;
        }
        Ok(Self {
            addr,
            state,
            open,
            stop,
            workers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open client connections on each serving thread.
    pub fn connections(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// The live state: config, backends and capacity setters for sources and tests.
    pub fn state(&self) -> &Arc<RouterState> {
        &self.state
    }

    /// Shuts down as a pod should: readiness fails at once, new connections are still served
    /// for `delay` (Services send them until their endpoints drop the pod) unless `cut_short`
    /// ends first, then [`Self::stop`].
    pub async fn close(self, delay: Duration, cut_short: impl Future<Output = ()>) {
        self.state.set_closing();
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutdown requested: still serving while endpoints update"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cut_short => {}
            }
        }
        tracing::info!("shutdown: finishing in-flight requests");
        self.stop().await;
    }

    /// Stops accepting, lets in-flight requests (streams too) finish, then returns.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for w in std::mem::take(&mut self.workers) {
            let r = match w {
                Worker::Task(t) => t.await.map_err(|e| e.to_string()),
                Worker::Thread(h) => tokio::task::spawn_blocking(move || h.join())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|_| "router thread panicked".to_string())),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "router worker failed");
            }
        }
    }
}

impl Drop for RouterServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
