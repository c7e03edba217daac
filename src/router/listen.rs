//! Accepting connections: one listener, its connections spread over the serving threads, each
//! served by hyper until it ends or the drain closes it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::app::App;
use super::drain::Drain;
use super::routes::handle;

/// Slow clients may not hold a connection open without sending a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A non-blocking listener with room for connection bursts (std's default backlog is 128).
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Connections a serving thread takes before others get new ones: a few busy connections
/// keep one event loop awake, and spreading them would wake several loops per request.
pub(super) const PACK_CONNECTIONS: usize = 8;

/// Where thread 0 sends each accepted connection.
pub(super) struct Spread {
    /// Open connections per thread.
    pub open: Vec<Arc<AtomicUsize>>,
    /// To threads 1.., in order.
    pub handoff: Vec<tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>>,
}

impl Spread {
    /// Thread 0 up to `PACK_CONNECTIONS`, then the thread with the fewest (the lowest first).
    fn pick(&self) -> usize {
        let n = |i: usize| self.open[i].load(Ordering::Relaxed);
        if n(0) < PACK_CONNECTIONS {
            return 0;
        }
        (0..self.open.len()).min_by_key(|&i| n(i)).unwrap_or(0)
    }
}

pub(super) enum Source {
    Listener(std::net::TcpListener),
    Tokio(TcpListener, Option<Spread>),
    /// Connections thread 0 handed over, already counted in the counter.
    Handoff(
        tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
        Arc<AtomicUsize>,
    ),
}

impl Source {
    /// The next connection for this thread, and whether it is counted in `open` already;
    /// `None` once the hand-off has stopped.
    pub async fn next(&mut self) -> Option<(TcpStream, bool)> {
        match self {
            Source::Listener(_) => None,
            Source::Tokio(l, spread) => loop {
                let s = crate::runtime::accept(l).await;
                let Some(spread) = spread.as_ref() else {
                    return Some((s, false));
                };
                let to = spread.pick();
                if to == 0 {
                    return Some((s, false));
                }
                // Counted now, so a burst of connections does not all go to one thread.
                spread.open[to].fetch_add(1, Ordering::Relaxed);
                match s.into_std() {
                    Ok(s) => {
                        // That thread has stopped (a shutdown under way): this one serves it.
                        if let Err(back) = spread.handoff[to - 1].send(s) {
                            spread.open[to].fetch_sub(1, Ordering::Relaxed);
                            match TcpStream::from_std(back.0) {
                                Ok(s) => return Some((s, false)),
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not serve a connection")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        spread.open[to].fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "could not hand a connection over");
                    }
                }
            },
            Source::Handoff(rx, open) => loop {
                let s = rx.recv().await?;
                if let Some(s) = take_over(s, open) {
                    return Some((s, true));
                }
            },
        }
    }

    /// At shutdown: connections handed over but not yet served, to be served like the rest.
    fn leftovers(&mut self) -> Vec<TcpStream> {
        let Source::Handoff(rx, open) = self else {
            return Vec::new();
        };
        rx.close();
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|s| take_over(s, open))
            .collect()
    }
}

fn take_over(s: std::net::TcpStream, open: &AtomicUsize) -> Option<TcpStream> {
    match TcpStream::from_std(s) {
        Ok(s) => Some(s),
        Err(e) => {
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "could not take a connection over");
            None
        }
    }
}

/// Serves connections from `source` until `shutdown`, then drains them.
pub(super) async fn serve(
    app: Arc<App>,
    mut source: Source,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let drain = Drain::new();
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            s = source.next() => s,
        };
        let Some((stream, counted)) = stream else {
            // The accepting thread stopped: wait for our own stop.
            shutdown.as_mut().await;
            break;
        };
        if !counted {
            app.open.fetch_add(1, Ordering::Relaxed);
        }
        // Made before the spawn: a task aborted before its first poll still counts out.
        let open = Open(app.open.clone());
        tasks.spawn(connection(app.clone(), stream, drain.started(), open));
    }
    app.state.set_closing();
    let leftovers = source.leftovers();
    if !leftovers.is_empty() {
        for stream in leftovers {
            let open = Open(app.open.clone());
            tasks.spawn(connection(app.clone(), stream, drain.started(), open));
        }
        // Let them read the requests already sent before the drain closes idle connections.
        tokio::task::yield_now().await;
    }
    drop(source);
    drain.run(&mut tasks, &app.state, drain_timeout).await;
}

/// Counts a connection out of its thread when it ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    app: Arc<App>,
    stream: TcpStream,
    drain: impl Future<Output = ()>,
    _open: Open,
) {
    let svc = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(handle(&app, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Answers are mostly small and whole (see `relay`): copying them after the head costs
        // less than handing the kernel a list of buffers.
        .writev(false);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = drain => {
            // Finishes the response in progress (a stream runs to its end), then closes.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_pack_onto_the_first_thread_then_go_to_the_least_busy() {
        let spread = |counts: &[usize]| Spread {
            open: counts
                .iter()
                .map(|&n| Arc::new(AtomicUsize::new(n)))
                .collect(),
            handoff: Vec::new(),
        };
        assert_eq!(spread(&[0, 0, 0]).pick(), 0);
        assert_eq!(spread(&[PACK_CONNECTIONS - 1, 0, 0]).pick(), 0);
        assert_eq!(spread(&[PACK_CONNECTIONS, 0, 0]).pick(), 1);
        assert_eq!(spread(&[PACK_CONNECTIONS, 3, 2]).pick(), 2);
        assert_eq!(spread(&[PACK_CONNECTIONS, 9, 9]).pick(), 0);
        assert_eq!(spread(&[20, 20, 20]).pick(), 0, "ties go to the lowest");
    }

    /// At shutdown the other threads stop taking connections before the first stops
    /// accepting: one accepted for them meanwhile is served, not closed unanswered.
    #[tokio::test]
    async fn a_connection_for_a_thread_that_has_stopped_is_served_by_the_first() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        drop(rx);
        let open = vec![
            Arc::new(AtomicUsize::new(PACK_CONNECTIONS)),
            Arc::new(AtomicUsize::new(0)),
        ];
        let mut source = Source::Tokio(
            l,
            Some(Spread {
                open: open.clone(),
                handoff: vec![tx],
            }),
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), source.next()).await;
        let (_, counted) = next.expect("the connection was dropped").unwrap();
        assert!(!counted, "the serving thread counts it");
        assert_eq!(open[1].load(Ordering::Relaxed), 0);
    }
}
