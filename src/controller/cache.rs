//! The controller's caches: a reflector per kind, kept by a background task, with a readiness
//! signal that any number of tasks may wait on, and a listener told of each change once the
//! store holds it.
//!
//! Why not `Store::wait_until_ready()`: in kube-runtime 5 it is a `DelayedInit` over a oneshot
//! receiver, which keeps one waker, so of several tasks waiting at once only the last to poll is
//! woken. A `Controller`'s runner waits on its store that way; a second waiter on the same store
//! (the autoscaler did) may sleep until something unrelated wakes it, minutes later. Here only
//! kube-runtime's own `Controller` ever calls `wait_until_ready()`, once per store; everything
//! of ours waits on [`Cache::synced`].
//!
//! Why listeners rather than kube-runtime's shared streams (`Writer::subscribe`): those carry
//! no deletes, hold the watch once their buffer is full and nobody reads, and stall for good
//! when an object leaves the store between being sent and being read. A listener runs after the
//! store has applied the change, so a reconcile it triggers reads at least that change.

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, Store};
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

/// A change a cache's listener hears of, after the store holds it.
#[derive(Debug)]
pub enum Change<'a, K> {
    /// Added, modified, or seen in a (re)list.
    Applied(&'a K),
    Deleted(&'a K),
}

impl<K> Clone for Change<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Change<'_, K> {}

impl<'a, K> Change<'a, K> {
    pub fn object(&self) -> &'a K {
        match self {
            Change::Applied(o) | Change::Deleted(o) => o,
        }
    }
}

/// Starts a cache fed by `events` (a watcher, with backoff) for the life of the process;
/// `on_change` hears of every change once the store holds it.
pub fn spawn<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    on_change: impl FnMut(Change<'_, K>) + Send + 'static,
) -> Cache<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(track_sync(
        reflector::reflector(writer, events),
        reader.clone(),
        tx,
        on_change,
    ));
    Cache {
        store: reader,
        synced: rx,
    }
}

/// Drives a reflector's event stream: tells `on_change` of each object the reflector has just
/// applied to `store` (a (re)list's objects at its end, when the store swaps them in), marks
/// the cache synced at the first `InitDone`, and logs watch errors, which the watcher retries
/// with backoff.
pub async fn track_sync<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    store: Store<K>,
    synced: watch::Sender<bool>,
    mut on_change: impl FnMut(Change<'_, K>),
) where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Apply(o)) => on_change(Change::Applied(&o)),
            Ok(watcher::Event::Delete(o)) => on_change(Change::Deleted(&o)),
            Ok(watcher::Event::InitDone) => {
                for o in store.state() {
                    on_change(Change::Applied(&o));
                }
                synced.send_if_modified(|s| !std::mem::replace(s, true));
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => tracing::warn!(error = %e, "watch error (retrying with backoff)"),
        }
    }
}

/// Each object's last seen `metadata.generation`, to tell spec changes (and a deletion
/// starting) from status writes.
#[derive(Default)]
pub struct Generations(HashMap<String, i64>);

impl Generations {
    /// Whether `change` is one a reconcile should follow: a new object, a moved generation, or
    /// a deletion. Status-only updates are not.
    pub fn moved<K: kube::Resource>(&mut self, change: Change<'_, K>) -> bool {
        let meta = change.object().meta();
        let uid = meta.uid.clone().unwrap_or_default();
        match change {
            Change::Deleted(_) => {
                self.0.remove(&uid);
                true
            }
            Change::Applied(_) => {
                let generation = meta.generation.unwrap_or_default();
                self.0.insert(uid, generation) != Some(generation)
            }
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
        let driver = tokio::spawn(track_sync::<ConfigMap>(
            events_rx,
            cache.store.clone(),
            tx,
            |_| {},
        ));
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
    async fn listeners_hear_each_change_after_the_store_holds_it() {
        let obj = |name: &str| {
            let mut c = ConfigMap::default();
            c.metadata.name = Some(name.into());
            c.metadata.namespace = Some("ml".into());
            c
        };
        let (reader, writer) = reflector::store::<ConfigMap>();
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(obj("a"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(obj("b"))),
            Ok(watcher::Event::Delete(obj("a"))),
        ]);
        let (tx, _rx) = watch::channel(false);
        let store = reader.clone();
        let mut heard = Vec::new();
        track_sync(reflector::reflector(writer, events), reader, tx, |c| {
            let name = c.object().metadata.name.clone().unwrap();
            let in_store = store
                .get(&reflector::ObjectRef::new(&name).within("ml"))
                .is_some();
            let what = match c {
                Change::Applied(_) => "applied",
                Change::Deleted(_) => "deleted",
            };
            heard.push(format!("{what} {name} in store: {in_store}"));
        })
        .await;
        // A list's objects are heard of at its end, once the store holds them.
        assert_eq!(
            heard,
            [
                "applied a in store: true",
                "applied b in store: true",
                "deleted a in store: false"
            ]
        );
    }

    #[test]
    fn only_spec_changes_and_deletions_move_generations() {
        let obj = |uid: &str, generation: i64| {
            let mut c = ConfigMap::default();
            c.metadata.uid = Some(uid.into());
            c.metadata.generation = Some(generation);
            c
        };
        let mut g = Generations::default();
        let (a1, a2, b1) = (obj("a", 1), obj("a", 2), obj("b", 1));
        assert!(g.moved(Change::Applied(&a1)), "first sight");
        assert!(!g.moved(Change::Applied(&a1)), "a status write");
        assert!(g.moved(Change::Applied(&b1)));
        assert!(g.moved(Change::Applied(&a2)), "a spec change");
        assert!(g.moved(Change::Deleted(&a2)));
        assert!(
            g.moved(Change::Applied(&a2)),
            "recreated: first sight again"
        );
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
        track_sync(events, cache.store.clone(), tx, |_| {}).await;
        assert!(!cache.synced().await);
    }
}
