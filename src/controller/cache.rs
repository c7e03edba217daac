//! The controller's caches: a reflector per kind, kept by a background task, with a readiness
//! signal that any number of tasks may wait on.
//!
//! Why not `Store::wait_until_ready()`: in kube-runtime 5 it is a `DelayedInit` over a oneshot
//! receiver, which keeps one waker, so of several tasks waiting at once only the last to poll is
//! woken. A `Controller`'s runner waits on its store that way; a second waiter on the same store
//! (the autoscaler did) may sleep until something unrelated wakes it, minutes later. Here only
//! kube-runtime's own `Controller` ever calls `wait_until_ready()`, once per store; everything
//! of ours waits on [`Cache::synced`].

use std::collections::HashMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::watcher;
use tokio::sync::watch;

/// A store and whether its first full list is in.
pub struct Cache<K: kube::Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    synced: watch::Receiver<bool>,
}

impl<K: kube::Resource<DynamicType = ()> + 'static> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            synced: self.synced.clone(),
        }
    }
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Cache<K> {
    /// Resolves once the first full list is in the store (`false`: the cache stopped first).
    pub async fn synced(&self) -> bool {
        self.synced.clone().wait_for(|s| *s).await.is_ok()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// A cache over a store filled by hand, already synced (tests).
    #[cfg(test)]
    pub fn filled(store: Store<K>) -> Self {
        Self {
            store,
            synced: watch::channel(true).1,
        }
    }
}

/// Starts a cache fed by `events` (a watcher, with backoff) for the life of the process. With
/// `subscribe`, also returns a stream of changed objects for a `Controller`
/// (`Controller::for_shared_stream`), so the controller and the autoscaler share one watch and
/// one store; it carries applies only (deletes are in the store, not in the stream), and it must
/// be consumed, or the cache waits for it.
pub fn spawn<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    subscribe: bool,
) -> (Cache<K>, Option<ReflectHandle<K>>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    // Enough for a burst of changes while a reconcile pass is busy; beyond it the watch waits.
    const SUBSCRIBER_BUFFER: usize = 1024;
    let (reader, writer) = if subscribe {
        reflector::store_shared(SUBSCRIBER_BUFFER)
    } else {
        reflector::store()
    };
    let handle = writer.subscribe();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(track_sync(reflector::reflector(writer, events), tx));
    (
        Cache {
            store: reader,
            synced: rx,
        },
        handle,
    )
}

/// The objects of a shared stream whose `metadata.generation` moved (a spec change, or a
/// deletion starting): status-only updates pass no further. `store` is the stream's cache, to
/// forget deleted objects (the stream carries no deletes).
pub fn spec_changes<K>(
    changes: impl Stream<Item = Arc<K>>,
    store: Store<K>,
) -> impl Stream<Item = Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut seen: HashMap<String, i64> = HashMap::new();
    changes.filter(move |obj| {
        if seen.len() > 2 * store.len() + 64 {
            let live: std::collections::HashSet<String> = store
                .state()
                .iter()
                .filter_map(|o| o.meta().uid.clone())
                .collect();
            seen.retain(|uid, _| live.contains(uid));
        }
        let meta = obj.meta();
        let generation = meta.generation.unwrap_or_default();
        let moved =
            seen.insert(meta.uid.clone().unwrap_or_default(), generation) != Some(generation);
        std::future::ready(moved)
    })
}

/// Drives a reflector's event stream: marks the cache synced at the first `InitDone` (the
/// reflector has applied it to the store by then) and logs watch errors, which the watcher
/// retries with backoff.
pub async fn track_sync<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    synced: watch::Sender<bool>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::InitDone) => {
                synced.send_if_modified(|s| !std::mem::replace(s, true));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watch error (retrying with backoff)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::time::Duration;

    /// Several tasks wait at once; every one of them is woken when the list is in. (A
    /// `Store::wait_until_ready()` with two concurrent waiters wakes only one.)
    #[tokio::test]
    async fn every_waiter_is_woken_when_the_first_list_is_in() {
        let (reader, _writer) = reflector::store::<ConfigMap>();
        let (tx, rx) = watch::channel(false);
        let cache = Cache {
            store: reader,
            synced: rx,
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.synced().await })
            })
            .collect();
        // Let every waiter poll (and register its waker) before the list completes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!cache.is_synced());
        let (events_tx, events_rx) = futures::channel::mpsc::unbounded();
        let driver = tokio::spawn(track_sync::<ConfigMap>(events_rx, tx));
        events_tx.unbounded_send(Ok(watcher::Event::Init)).unwrap();
        events_tx
            .unbounded_send(Ok(watcher::Event::InitApply(ConfigMap::default())))
            .unwrap();
        events_tx
            .unbounded_send(Ok(watcher::Event::InitDone))
            .unwrap();
        for w in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("a waiter was not woken")
                .unwrap();
            assert!(woke);
        }
        assert!(cache.is_synced());
        drop(events_tx);
        driver.await.unwrap();
    }

    #[tokio::test]
    async fn only_spec_changes_pass() {
        let obj = |uid: &str, generation: i64, rv: &str| {
            let mut c = ConfigMap::default();
            c.metadata.uid = Some(uid.into());
            c.metadata.generation = Some(generation);
            c.metadata.resource_version = Some(rv.into());
            Arc::new(c)
        };
        let (reader, _writer) = reflector::store::<ConfigMap>();
        let input = vec![
            obj("a", 1, "1"),
            obj("a", 1, "2"), // a status write
            obj("b", 1, "3"),
            obj("a", 2, "4"), // a spec change
            obj("a", 2, "5"),
        ];
        let passed: Vec<String> = spec_changes(futures::stream::iter(input), reader)
            .map(|o| o.metadata.resource_version.clone().unwrap())
            .collect()
            .await;
        assert_eq!(passed, ["1", "3", "4"]);
    }

    #[tokio::test]
    async fn a_cache_whose_watch_ends_unsynced_says_so() {
        let (reader, _writer) = reflector::store::<ConfigMap>();
        let (tx, rx) = watch::channel(false);
        let cache = Cache {
            store: reader,
            synced: rx,
        };
        let events = futures::stream::iter(vec![Ok(watcher::Event::<ConfigMap>::Init)]);
        track_sync(events, tx).await;
        assert!(!cache.synced().await);
    }
}
