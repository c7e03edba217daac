//! What reconcile knows of the objects it owns without asking the API server: a cache of each
//! owned kind (metadata only, but for Deployments, whose status the autoscaler and the Ready
//! condition read), and what it last applied to each object.
//!
//! A pass writes an object only when the rendered object changed since reconcile last applied
//! it, or the object changed since (someone edited it: its generation, or for kinds without
//! one its resourceVersion, moved). So the passes that follow reconcile's own writes, a
//! Deployment's rollout or the periodic resync cost no request for objects that are as they
//! should be. An object missing from the caches is read from the API server before it is
//! written: the caches hold only objects labelled as spillway's, and one of the same name that
//! is not spillway's must not be overwritten.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use super::cache::{self, Cache, Change};
use super::names::{LABEL_COMPONENT, LABEL_INSTANCE, MANAGED_SELECTOR, is_owned_by};
use crate::api::InferenceService;

/// Where a change to an owned object is sent: the owning service, to reconcile.
pub type Trigger = futures::channel::mpsc::UnboundedSender<ObjectRef<InferenceService>>;

/// The InferenceService that controls `obj`, if one does.
pub fn owner<K: Resource>(obj: &K) -> Option<ObjectRef<InferenceService>> {
    let meta = obj.meta();
    let ns = meta.namespace.as_deref()?;
    meta.owner_references
        .as_deref()?
        .iter()
        .find(|r| {
            r.controller == Some(true)
                && r.kind == "InferenceService"
                && r.api_version.starts_with(crate::api::GROUP)
        })
        .map(|r| ObjectRef::new(&r.name).within(ns))
}

/// A cache listener that sends the owner of each changed (or deleted) object to `trigger`.
fn to_owner<K: Resource>(trigger: Trigger) -> impl FnMut(Change<'_, K>) + Send + 'static {
    move |change| {
        if let Some(r) = owner(change.object()) {
            // The receiver goes only when the controllers stop.
            let _ = trigger.unbounded_send(r);
        }
    }
}

type Meta<K> = Cache<PartialObjectMeta<K>>;

pub struct OwnedObjects {
    /// Every Deployment spillway manages, without pod templates (the autoscaler reads the
    /// engines' replicas from it too).
    pub deployments: Cache<Deployment>,
    services: Meta<Service>,
    config_maps: Meta<ConfigMap>,
    service_accounts: Meta<ServiceAccount>,
    roles: Meta<Role>,
    role_bindings: Meta<RoleBinding>,
    pdbs: Meta<PodDisruptionBudget>,
    /// By "kind/namespace/name": the rendered object's hash and the object's version after
    /// reconcile applied it.
    applied: Mutex<HashMap<String, (u64, String)>>,
}

/// An API of kind `K` in `namespace`, or across all namespaces.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn metadata_cache<K>(client: &Client, namespace: Option<&str>, trigger: Trigger) -> Meta<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // An API of PartialObjectMeta<K> lists and watches metadata only.
    let events = watcher::watcher(
        api::<PartialObjectMeta<K>>(client, namespace),
        watcher::Config::default().labels(MANAGED_SELECTOR),
    )
    .default_backoff()
    .modify(|m: &mut PartialObjectMeta<K>| m.managed_fields_mut().clear());
    cache::spawn(events, to_owner(trigger))
}

/// What a pass should do with one owned object.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// As reconcile last applied it, and unchanged since: nothing to write.
    Keep,
    /// Reconcile's own, changed on either side since it was last applied: apply it.
    Apply,
    /// Absent: create it (by applying it).
    Create,
    /// Someone else's object of the same name: leave it alone.
    Foreign,
}

/// The version that moves when someone else changes an object: where it has a generation
/// (which a status update does not move), the generation and its labels, annotations and
/// owners; else its resourceVersion.
fn version(meta: &ObjectMeta) -> String {
    match meta.generation {
        Some(g) => {
            let marks = (&meta.labels, &meta.annotations, &meta.owner_references);
            format!("g{g}-{:x}", fingerprint(&marks))
        }
        None => meta.resource_version.clone().unwrap_or_default(),
    }
}

/// An owned object as found: its metadata, and whether a cache had it. Only a cached object
/// is known to carry spillway's labels (so the caches see its next change), and only a cached
/// one may be kept without a write.
#[derive(Clone, Copy)]
pub struct Found<'a> {
    pub meta: &'a ObjectMeta,
    pub cached: bool,
}

/// A hash of a rendered object, to tell whether it changed since it was last applied.
pub fn fingerprint(object: &impl serde::Serialize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(object)
        .expect("a rendered object serialises")
        .hash(&mut h);
    h.finish()
}

impl OwnedObjects {
    /// Starts the caches; every change to an owned object (its deletion too) sends its owner to
    /// `trigger`.
    pub fn start(client: &Client, namespace: Option<&str>, trigger: Trigger) -> Self {
        let deployments = watcher::watcher(
            api::<Deployment>(client, namespace),
            watcher::Config::default().labels(MANAGED_SELECTOR),
        )
        .default_backoff()
        .modify(|d: &mut Deployment| {
            d.managed_fields_mut().clear();
            if let Some(spec) = d.spec.as_mut() {
                spec.template = Default::default();
            }
        });
        Self {
            deployments: cache::spawn(deployments, to_owner(trigger.clone())),
            services: metadata_cache(client, namespace, trigger.clone()),
            config_maps: metadata_cache(client, namespace, trigger.clone()),
            service_accounts: metadata_cache(client, namespace, trigger.clone()),
            roles: metadata_cache(client, namespace, trigger.clone()),
            role_bindings: metadata_cache(client, namespace, trigger.clone()),
            pdbs: metadata_cache(client, namespace, trigger),
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves once every cache holds its first full list (`false`: one stopped first).
    pub async fn synced(&self) -> bool {
        self.deployments.synced().await
            && self.services.synced().await
            && self.config_maps.synced().await
            && self.service_accounts.synced().await
            && self.roles.synced().await
            && self.role_bindings.synced().await
            && self.pdbs.synced().await
    }

    /// The cached metadata of the owned object `kind` `ns/name`.
    /// The engine Deployments and Services of `owner` in the caches: every revision's.
    pub fn engines(&self, owner: &InferenceService) -> (Vec<String>, Vec<String>) {
        let ns = owner.namespace();
        let name = owner.name_any();
        let mine = |m: &ObjectMeta| {
            m.namespace == ns
                && is_owned_by(m, owner)
                && m.labels.as_ref().is_some_and(|l| {
                    l.get(LABEL_INSTANCE) == Some(&name)
                        && l.get(LABEL_COMPONENT).map(String::as_str) == Some("engine")
                })
        };
        let deployments = self
            .deployments
            .store
            .state()
            .iter()
            .filter(|d| mine(&d.metadata))
            .map(|d| d.name_any())
            .collect();
        let services = self
            .services
            .store
            .state()
            .iter()
            .filter(|s| mine(&s.metadata))
            .map(|s| s.name_any())
            .collect();
        (deployments, services)
    }

    pub fn cached(&self, kind: &str, ns: &str, name: &str) -> Option<ObjectMeta> {
        fn get<K: Resource<DynamicType = ()> + Clone>(
            c: &Meta<K>,
            ns: &str,
            name: &str,
        ) -> Option<ObjectMeta> {
            c.store
                .get(&ObjectRef::new(name).within(ns))
                .map(|m| m.metadata.clone())
        }
        match kind {
            "Deployment" => self
                .deployments
                .store
                .get(&ObjectRef::new(name).within(ns))
                .map(|d| d.metadata.clone()),
            "Service" => get(&self.services, ns, name),
            "ConfigMap" => get(&self.config_maps, ns, name),
            "ServiceAccount" => get(&self.service_accounts, ns, name),
            "Role" => get(&self.roles, ns, name),
            "RoleBinding" => get(&self.role_bindings, ns, name),
            "PodDisruptionBudget" => get(&self.pdbs, ns, name),
            _ => None,
        }
    }

    /// What to do with an owned object rendered as `hash`, as found (`None`: absent).
    /// `owned` says whether the found object belongs to the service.
    pub fn plan(&self, key: &str, hash: u64, live: Option<Found<'_>>, owned: bool) -> Plan {
        let Some(live) = live else {
            return Plan::Create;
        };
        if !owned {
            return Plan::Foreign;
        }
        let applied = self.applied.lock().expect("not poisoned");
        match applied.get(key) {
            Some((h, v)) if live.cached && *h == hash && *v == version(live.meta) => Plan::Keep,
            _ => Plan::Apply,
        }
    }

    /// Forgets `key` (reconcile deleted the object).
    pub fn forget(&self, key: &str) {
        self.applied.lock().expect("not poisoned").remove(key);
    }

    /// Remembers that `key` ("Kind/namespace/name") was applied as `hash` and is now at
    /// `after`.
    pub fn record(&self, key: String, hash: u64, after: &ObjectMeta) {
        let mut applied = self.applied.lock().expect("not poisoned");
        applied.insert(key, (hash, version(after)));
        // Entries of deleted objects go once the memo is well past what the caches hold.
        if applied.len() > 2 * self.cached_len() + 64 {
            applied.retain(|key, _| {
                let mut parts = key.splitn(3, '/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(kind), Some(ns), Some(name)) => self.cached(kind, ns, name).is_some(),
                    _ => false,
                }
            });
        }
    }

    /// Empty caches, already synced, and a writer for the Deployments' (tests).
    #[cfg(test)]
    pub fn for_tests() -> (Self, kube::runtime::reflector::store::Writer<Deployment>) {
        fn meta<K: Resource<DynamicType = ()> + Clone + 'static>() -> Meta<K> {
            Cache::filled(kube::runtime::reflector::store().0)
        }
        let deployments = kube::runtime::reflector::store::Writer::default();
        let owned = Self {
            deployments: Cache::filled(deployments.as_reader()),
            services: meta(),
            config_maps: meta(),
            service_accounts: meta(),
            roles: meta(),
            role_bindings: meta(),
            pdbs: meta(),
            applied: Mutex::new(HashMap::new()),
        };
        (owned, deployments)
    }

    fn cached_len(&self) -> usize {
        self.deployments.store.len()
            + self.services.store.len()
            + self.config_maps.store.len()
            + self.service_accounts.store.len()
            + self.roles.store.len()
            + self.role_bindings.store.len()
            + self.pdbs.store.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(generation: Option<i64>, rv: &str) -> ObjectMeta {
        ObjectMeta {
            generation,
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn an_object_is_written_again_only_when_either_side_changed() {
        let (o, _) = OwnedObjects::for_tests();
        let key = "Deployment/ml/llama-engine";
        fn cached(meta: &ObjectMeta) -> Option<Found<'_>> {
            Some(Found { meta, cached: true })
        }
        let (g1, g2, g2_status, g3) = (
            meta(Some(1), "10"),
            meta(Some(2), "11"),
            meta(Some(2), "12"),
            meta(Some(3), "13"),
        );
        // Absent: create it. Someone else's: leave it.
        assert_eq!(o.plan(key, 1, None, true), Plan::Create);
        assert_eq!(o.plan(key, 1, cached(&g1), false), Plan::Foreign);
        // Ours but never applied by this process (a restart): apply once.
        assert_eq!(o.plan(key, 1, cached(&g1), true), Plan::Apply);
        o.record(key.into(), 1, &g2);
        // A status update moves the resourceVersion, not the generation: keep.
        assert_eq!(o.plan(key, 1, cached(&g2_status), true), Plan::Keep);
        // Read from the API server (the caches lost it: its labels were edited away): apply.
        let fetched = Some(Found {
            meta: &g2_status,
            cached: false,
        });
        assert_eq!(o.plan(key, 1, fetched, true), Plan::Apply);
        // Someone edited its spec or its labels, or the rendering changed: apply.
        assert_eq!(o.plan(key, 1, cached(&g3), true), Plan::Apply);
        let mut relabelled = g2_status.clone();
        relabelled.labels = Some([("app.kubernetes.io/instance".into(), "x".into())].into());
        assert_eq!(o.plan(key, 1, cached(&relabelled), true), Plan::Apply);
        assert_eq!(o.plan(key, 2, cached(&g2_status), true), Plan::Apply);
        // Kinds without a generation go by resourceVersion.
        let cm = "ConfigMap/ml/llama-router";
        let (v20, v21) = (meta(None, "20"), meta(None, "21"));
        o.record(cm.into(), 7, &v20);
        assert_eq!(o.plan(cm, 7, cached(&v20), true), Plan::Keep);
        assert_eq!(o.plan(cm, 7, cached(&v21), true), Plan::Apply);
        o.forget(cm);
        assert_eq!(o.plan(cm, 7, cached(&v20), true), Plan::Apply);
    }
}
