//! The drain at shutdown: open connections finish the response in progress (a stream runs to
//! its end) and close; when the drain runs out, requests still waiting for a slot are answered
//! 503 to retry elsewhere rather than have their connections closed under them.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::state::RouterState;

/// After the drain timeout, how long requests still waiting in the queue have to send their 503.
const LAST_ANSWERS: Duration = Duration::from_secs(1);

pub(super) struct Drain {
    start: watch::Sender<bool>,
}

impl Drain {
    pub fn new() -> Self {
        Self {
            start: watch::channel(false).0,
        }
    }

    /// Ready once the drain has started: a connection then finishes its response and closes.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.start.subscribe();
        async move {
            // A dropped sender ends the wait too.
            let _ = rx.wait_for(|started| *started).await;
        }
    }

    /// Starts the drain and waits up to `timeout` for the connections in `tasks` to end.
    pub async fn run(self, tasks: &mut JoinSet<()>, state: &RouterState, timeout: Duration) {
        let _ = self.start.send(true);
        tracing::info!(connections = tasks.len(), "router draining");
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(timeout, all).await.is_ok() {
            return;
        }
        state.refuse_waiting();
        let answered = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(LAST_ANSWERS, answered).await;
        tracing::warn!(
            connections = tasks.len(),
            "drain timeout: closing remaining connections"
        );
        tasks.shutdown().await;
    }
}
