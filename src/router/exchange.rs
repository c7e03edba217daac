//! The exchange with the service's other routers (the I/O around `router::peers`): this
//! router's report goes to every peer over UDP when its counts change (changes within
//! [`MIN_GAP`] go out together) and at least every [`HEARTBEAT`]; a peer's report whose counts
//! moved is answered at once, so the acknowledgement a busy peer waits for comes within a
//! round trip. Only reports from a listed peer's address count. Nothing here goes through the
//! Kubernetes API: peers are listed by the EndpointSlice watch (`cluster`) or the config.

use std::net::{ToSocketAddrs, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::peers::Ledger;
use super::peers::wire::{MAX_REPORT, Report};
use super::state::RouterState;
use crate::clock::Millis;

/// Reports go out at least this often (carrying acknowledgements too).
pub const HEARTBEAT: Duration = Duration::from_millis(50);
/// And at most this often: changes within it go out in one report.
pub const MIN_GAP: Duration = Duration::from_millis(1);

/// The running exchange; dropping it stops it (the router then hears nobody, so its peers
/// soon count it as silent, and it them).
pub struct Exchange {
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Exchange {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts sharing every limit with the peers: `name` is this router's name among them (its
/// pod name), `socket` is bound where the peers send (`peers.port`), `peers` are static peer
/// addresses (a cluster lists them later with [`RouterState::set_peers`]). Runs in the current
/// runtime.
pub fn start(
    state: &Arc<RouterState>,
    socket: StdUdpSocket,
    name: String,
    peers: &[String],
) -> std::io::Result<Exchange> {
    socket.set_nonblocking(true)?;
    let socket = Arc::new(UdpSocket::from_std(socket)?);
    join(state, name);
    // Static peers may be names: resolved once, here.
    let resolved: Vec<String> = peers
        .iter()
        .flat_map(|p| match p.to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
            Err(e) => {
                tracing::warn!(peer = %p, error = %e, "peer router address not resolved");
                Vec::new()
            }
        })
        .collect();
    state.set_peers(&resolved);
    Ok(Exchange {
        tasks: [
            tokio::spawn(send(state.clone(), socket.clone())),
            tokio::spawn(receive(state.clone(), socket)),
        ],
    })
}

/// Shares the limits without an exchange (its socket could not be bound): the router hears
/// nobody, so it keeps to its fixed share, never more.
pub fn join(state: &Arc<RouterState>, name: String) {
    let cfg = state.config();
    let (routers, stale) = cfg
        .peers
        .as_ref()
        .map_or((1, 500), |p| (p.replicas, p.stale_after_milliseconds));
    state.join_peers(Ledger::new(name, boot_id(), routers, stale as Millis));
}

/// Tells this process from an earlier one of the same name.
fn boot_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

async fn send(state: Arc<RouterState>, socket: Arc<UdpSocket>) {
    let mut last = Instant::now() - HEARTBEAT;
    let mut ticked = last;
    let mut too_big = false;
    loop {
        let _ = tokio::time::timeout(HEARTBEAT, state.report_due().notified()).await;
        let since = last.elapsed();
        if since < MIN_GAP {
            tokio::time::sleep(MIN_GAP - since).await;
        }
        last = Instant::now();
        if let Some((report, to)) = state.peer_report() {
            match report.encode() {
                Some(bytes) => {
                    for addr in &to {
                        if let Err(e) = socket.send_to(&bytes, addr.as_str()).await {
                            tracing::debug!(peer = %addr, error = %e, "report not sent");
                        }
                    }
                }
                None if !too_big => {
                    too_big = true;
                    tracing::warn!(
                        "report to peer routers over {MAX_REPORT} bytes: not sent, so each router keeps to its fixed share"
                    );
                }
                None => {}
            }
        }
        // Peers falling silent change the caps with no report to say so.
        if ticked.elapsed() >= HEARTBEAT {
            ticked = Instant::now();
            state.peer_tick();
        }
    }
}

async fn receive(state: Arc<RouterState>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_REPORT + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "reading a peer report");
                tokio::time::sleep(MIN_GAP).await;
                continue;
            }
        };
        let Some(report) = (n <= MAX_REPORT)
            .then(|| Report::decode(&buf[..n]))
            .flatten()
        else {
            tracing::debug!(%from, "not a peer report");
            continue;
        };
        if state.peer_heard(from, report) {
            state.report_due().notify_one();
        }
    }
}
