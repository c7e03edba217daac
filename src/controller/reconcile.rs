//! Reconcile: the I/O around rendering. Reads the policy and owned objects, applies what is
//! ours, leaves what is not, and writes the status fields it owns only when they change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use super::apply::{FIELD_MANAGER, apply, apply_status, patch_replicas, publish_event};
use super::metrics::Metrics;
use super::names::{engine_name, is_owned_by, router_name, service_url};
use super::owned::{Found, OwnedObjects, Plan, fingerprint};
use super::render::{self, RenderInput, Rendered, RouterObjects};
use super::status::{
    EngineReplicas, Problem, current_policy_status, current_reconcile_status, new_problems,
    policy_status, reconcile_status,
};
use crate::api::{InferenceService, ScalingPolicy, ScalingPolicySpec};
use crate::rollout::drive;
use crate::rollout::revision::revision_hash;

/// How often a healthy object is looked at again even without a change (drift repair).
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a service looks again for a provider Secret it is missing. Secrets are not watched
/// (that would take list/watch on every Secret, i.e. read access to all of them), so a Secret
/// created after its service is found by this recheck.
pub const SECRET_RECHECK: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rendering: {0}")]
    Render(#[from] render::RenderError),
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
}

impl Error {
    /// Whether the API server refused to create an object because its namespace is being
    /// deleted (kube-rs keeps no status causes, so the message tells).
    pub fn namespace_terminating(&self) -> bool {
        let api = match self {
            Error::Kube(kube::Error::Api(e))
            | Error::Apply {
                source: kube::Error::Api(e),
                ..
            } => e,
            _ => return false,
        };
        api.code == 403 && api.message.contains("because it is being terminated")
    }

    /// A fixed label value for the error counter.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::Render(_) => "render",
            Error::Apply { .. } => "apply",
        }
    }
}

/// Settings from flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster_domain: String,
    /// Image of the per-service routers.
    pub router_image: String,
}

/// Everything reconcile needs; shared by all reconciliations.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Only the leader writes; reconcile re-checks before every pass.
    pub leader: watch::Receiver<bool>,
    /// Consecutive failures per object, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The InferenceService cache, for counting a policy's users.
    pub services: Store<InferenceService>,
    /// The ScalingPolicy cache.
    pub policies: Store<ScalingPolicy>,
    /// The owned objects as known without asking the API server, and what was last applied.
    pub owned: OwnedObjects,
}

/// Requeue delay after `failures` consecutive errors: 1 s doubling to a 5-minute cap.
pub fn error_backoff(failures: u32) -> Duration {
    let secs = 1u64
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(300))
}

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

impl Context {
    fn record_success<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.failures
            .lock()
            .expect("not poisoned")
            .remove(&key(obj));
    }

    fn record_failure<K: Resource<DynamicType = ()>>(&self, obj: &K) -> u32 {
        let mut f = self.failures.lock().expect("not poisoned");
        let n = f.entry(key(obj)).or_default();
        *n = n.saturating_add(1);
        *n
    }

    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    async fn event(&self, isvc: &InferenceService, type_: EventType, reason: &str, note: String) {
        publish_event(&self.recorder, isvc, type_, reason, note, "Reconcile").await;
    }
}

/// Error policy for both controllers: exponential per-object backoff, counted by reason.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let n = ctx.record_failure(obj.as_ref());
    let controller = if K::kind(&()) == "ScalingPolicy" {
        "scalingpolicy"
    } else {
        "inferenceservice"
    };
    ctx.metrics
        .reconcile_failed(controller, err.metric_reason());
    let delay = error_backoff(n);
    tracing::warn!(object = %key(obj.as_ref()), error = %err, failures = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Reconciles one InferenceService.
pub async fn reconcile(isvc: Arc<InferenceService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("inferenceservice");
    if !ctx.is_leader() {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // Being deleted: ownerReferences let the garbage collector remove everything we own.
    if isvc.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = isvc.namespace().ok_or(render::RenderError::NoNamespace)?;
    let name = isvc.name_any();
    let mut problems = Vec::new();

    if let Err(msg) = isvc.spec.validate(&name) {
        problems.push(Problem::InvalidSpec(msg));
    }
    if let Some(msg) = isvc.spec.over_router_shares() {
        problems.push(Problem::RouterReplicasOverLimit(msg));
    }
    let policy = resolve_policy(&ctx, &ns, &isvc, &mut problems).await?;
    // The revisions that exist; the spec's is rendered, a stable one serving something else
    // is left as it runs (a changed model or engine never rolls it in place).
    let plan = drive::plan(
        &name,
        &engine_name(&name),
        &revision_hash(&isvc.spec),
        isvc.status.as_ref(),
    );
    let serving = plan.candidate.as_ref().unwrap_or(&plan.stable);

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let engine = if problems
        .iter()
        .any(|p| matches!(p, Problem::InvalidSpec(_)))
    {
        // Leave objects as they are; just report what exists.
        deployments
            .get_opt(&plan.stable.name)
            .await?
            .filter(|d| is_owned_by(&d.metadata, &isvc))
            .map(|d| engine_replicas(&d))
    } else {
        let rendered = render::render(&RenderInput {
            isvc: &isvc,
            policy: &policy,
            router_image: &ctx.settings.router_image,
            revision: Some(serving),
        })?;
        let ensured = match ensure_objects(&ctx, &isvc, &rendered, &policy, &mut problems).await {
            Ok(e) => remove_stale_revisions(&ctx, &isvc, &plan).await.map(|()| e),
            Err(e) => Err(e),
        };
        match ensured {
            // Status counts the revision that serves.
            Ok(_) if plan.candidate.is_some() => deployments
                .get_opt(&plan.stable.name)
                .await?
                .filter(|d| is_owned_by(&d.metadata, &isvc))
                .map(|d| engine_replicas(&d)),
            Ok(engine) => engine,
            // The namespace is being deleted, and the service with it: recreating what the
            // namespace deletion removes would fight it (and fail). Nothing to report.
            Err(e) if e.namespace_terminating() => {
                tracing::debug!(service = %name, namespace = %ns, "namespace is being deleted; not recreating owned objects");
                return Ok(Action::await_change());
            }
            Err(e) => {
                problems.push(Problem::ApplyFailed(e.to_string()));
                ctx.event(&isvc, EventType::Warning, "ApplyFailed", e.to_string())
                    .await;
                // Report what still serves: a failed PDB or Role must not read as an outage.
                let engine = deployments
                    .get_opt(&plan.stable.name)
                    .await
                    .ok()
                    .flatten()
                    .filter(|d| is_owned_by(&d.metadata, &isvc))
                    .map(|d| engine_replicas(&d));
                write_status(&ctx, &isvc, &ns, engine, &problems).await?;
                return Err(e);
            }
        }
    };

    write_status(&ctx, &isvc, &ns, engine, &problems).await?;
    ctx.record_success(isvc.as_ref());
    if problems
        .iter()
        .any(|p| matches!(p, Problem::InvalidSpec(_)))
    {
        // A spec change triggers the next pass; retrying an invalid spec would change nothing.
        return Ok(Action::await_change());
    }
    if problems
        .iter()
        .any(|p| matches!(p, Problem::SecretNotFound(..)))
    {
        return Ok(Action::requeue(SECRET_RECHECK));
    }
    Ok(Action::requeue(RESYNC))
}

/// The referenced policy, or the built-in defaults with a problem noted. A policy missing from
/// the cache is looked up in the API server before it is called missing (it may have been
/// created a moment ago, together with the service). A policy that is named but missing or
/// invalid never lets requests burst: it may have said `Never`.
async fn resolve_policy(
    ctx: &Context,
    ns: &str,
    isvc: &InferenceService,
    problems: &mut Vec<Problem>,
) -> Result<ScalingPolicySpec, Error> {
    let Some(r) = &isvc.spec.scaling_policy_ref else {
        return Ok(ScalingPolicySpec::default());
    };
    let cached = ctx
        .policies
        .get(&ObjectRef::new(&r.name).within(ns))
        .map(|p| (*p).clone());
    let found = match cached {
        Some(p) => Some(p),
        None => {
            Api::<ScalingPolicy>::namespaced(ctx.client.clone(), ns)
                .get_opt(&r.name)
                .await?
        }
    };
    match found {
        None => {
            problems.push(Problem::PolicyNotFound(r.name.clone()));
            Ok(ScalingPolicySpec::unknown())
        }
        Some(p) => match p.spec.validate() {
            Ok(()) => Ok(p.spec),
            Err(m) => {
                problems.push(Problem::InvalidPolicy(r.name.clone(), m));
                Ok(ScalingPolicySpec::unknown())
            }
        },
    }
}

fn engine_replicas(d: &Deployment) -> EngineReplicas {
    let s = d.status.clone().unwrap_or_default();
    EngineReplicas {
        replicas: s.replicas.unwrap_or(0),
        ready: s.ready_replicas.unwrap_or(0),
    }
}

/// An owned object, type-erased so one loop creates-or-applies every kind.
struct Owned {
    kind: &'static str,
    resource: ApiResource,
    object: DynamicObject,
}

fn owned<K>(obj: &K) -> Result<Owned, Error>
where
    K: Resource<DynamicType = ()> + Serialize,
{
    let object = serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| Error::Render(render::RenderError::Serialize(e.to_string())))?;
    Ok(Owned {
        kind: match K::kind(&()) {
            std::borrow::Cow::Borrowed(k) => k,
            std::borrow::Cow::Owned(_) => "object",
        },
        resource: ApiResource::erase::<K>(&()),
        object,
    })
}

/// The router's objects in apply order (config and RBAC before the pods that use them).
fn router_objects(r: &RouterObjects) -> Result<Vec<Owned>, Error> {
    Ok(vec![
        owned(&r.config_map)?,
        owned(&r.service_account)?,
        owned(&r.role)?,
        owned(&r.role_binding)?,
        owned(&r.deployment)?,
        owned(&r.pdb)?,
    ])
}

/// Creates or applies every owned object that is ours; an object of the same name owned by
/// anyone else is left alone and reported.
async fn ensure_objects(
    ctx: &Context,
    isvc: &InferenceService,
    rendered: &Rendered,
    policy: &ScalingPolicySpec,
    problems: &mut Vec<Problem>,
) -> Result<Option<EngineReplicas>, Error> {
    let ns = isvc.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);

    let engine_name = rendered
        .engine_deployment
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    let key = format!("Deployment/{ns}/{engine_name}");
    let hash = fingerprint(&rendered.engine_deployment);
    let cached = ctx
        .owned
        .deployments
        .store
        .get(&ObjectRef::new(&engine_name).within(&ns))
        .map(|d| (*d).clone());
    let from_cache = cached.is_some();
    let live = match cached {
        Some(d) => Some(d),
        None => deployments.get_opt(&engine_name).await?,
    };
    let apply_failed = |source| Error::Apply {
        kind: "Deployment",
        name: engine_name.clone(),
        source,
    };
    let is_ours = live
        .as_ref()
        .is_some_and(|d| is_owned_by(&d.metadata, isvc));
    let found = live.as_ref().map(|d| Found {
        meta: &d.metadata,
        cached: from_cache,
    });
    let engine = match ctx.owned.plan(&key, hash, found, is_ours) {
        Plan::Create => {
            // Created by server-side apply like every other object (so fields later removed from
            // the spec are removed from the Deployment too), then replicas set once under the
            // autoscaler's field manager; reconcile's applies never mention replicas.
            apply(&deployments, &rendered.engine_deployment)
                .await
                .map_err(apply_failed)?;
            let initial = policy.initial_replicas();
            let scaled = patch_replicas(&ctx.client, &ns, &engine_name, initial)
                .await
                .map_err(apply_failed)?;
            ctx.owned.record(key, hash, &scaled.metadata);
            ctx.event(
                isvc,
                EventType::Normal,
                "Created",
                format!("Created engine Deployment {engine_name} with {initial} replicas"),
            )
            .await;
            Some(EngineReplicas {
                replicas: 0,
                ready: 0,
            })
        }
        Plan::Foreign => {
            problems.push(Problem::ObjectConflict(format!(
                "Deployment {ns}/{engine_name}"
            )));
            None
        }
        Plan::Keep => live.as_ref().map(engine_replicas),
        Plan::Apply => {
            // The uid makes the API server refuse the write if the object was replaced since.
            let mut engine = rendered.engine_deployment.clone();
            engine.metadata.uid = live.as_ref().and_then(|d| d.metadata.uid.clone());
            let applied = apply(&deployments, &engine).await.map_err(apply_failed)?;
            ctx.owned.record(key, hash, &applied.metadata);
            Some(engine_replicas(&applied))
        }
    };

    let mut services = vec![owned(&rendered.engine_service)?];
    if let Some(r) = &rendered.revision_service {
        services.push(owned(r)?);
    }
    ensure_owned(ctx, isvc, services, problems).await?;
    let client = vec![owned(&rendered.client_service)?];
    match &rendered.router {
        Some(r) => {
            check_provider_secrets(ctx, isvc, problems).await?;
            ensure_owned(ctx, isvc, router_objects(r)?, problems).await?;
            // Clients move to the router only once it exists...
            ensure_owned(ctx, isvc, client, problems).await?;
        }
        None => {
            // ...and back to the engines before a router is removed.
            ensure_owned(ctx, isvc, client, problems).await?;
            remove_router(ctx, isvc, &ns).await?;
        }
    }
    Ok(engine)
}

/// Applies each object that changed since it was last applied, unless one of the same name
/// belongs to someone else.
async fn ensure_owned(
    ctx: &Context,
    isvc: &InferenceService,
    objects: Vec<Owned>,
    problems: &mut Vec<Problem>,
) -> Result<(), Error> {
    let ns = isvc.namespace().unwrap_or_default();
    for o in objects {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &o.resource);
        let name = o.object.metadata.name.clone().unwrap_or_default();
        let key = format!("{}/{ns}/{name}", o.kind);
        let hash = fingerprint(&o.object);
        let cached = ctx.owned.cached(o.kind, &ns, &name);
        let from_cache = cached.is_some();
        let live = match cached {
            Some(meta) => Some(meta),
            None => api.get_metadata_opt(&name).await?.map(|m| m.metadata),
        };
        let is_ours = live.as_ref().is_some_and(|m| is_owned_by(m, isvc));
        let found = live.as_ref().map(|meta| Found {
            meta,
            cached: from_cache,
        });
        match ctx.owned.plan(&key, hash, found, is_ours) {
            Plan::Keep => {}
            Plan::Foreign => {
                problems.push(Problem::ObjectConflict(format!("{} {ns}/{name}", o.kind)));
            }
            Plan::Apply | Plan::Create => {
                // The uid makes the API server refuse the write if the object was replaced
                // since it was found.
                let mut object = o.object;
                object.metadata.uid = live.and_then(|m| m.uid);
                let applied = apply(&api, &object).await.map_err(|source| Error::Apply {
                    kind: o.kind,
                    name: name.clone(),
                    source,
                })?;
                ctx.owned.record(key, hash, &applied.metadata);
            }
        }
    }
    Ok(())
}

/// Deletes the engine Deployments and Services of revisions the plan no longer names (a
/// previous revision whose time is up, a candidate rolled back and replaced). Only objects
/// this service owns, found in the caches by the engine labels.
async fn remove_stale_revisions(
    ctx: &Context,
    isvc: &InferenceService,
    plan: &drive::Plan,
) -> Result<(), Error> {
    let ns = isvc.namespace().unwrap_or_default();
    let name = isvc.name_any();
    let keep = |n: &str| {
        n == plan.stable.name
            || plan.candidate.as_ref().is_some_and(|c| c.name == n)
            || plan.previous.as_ref().is_some_and(|p| p.name == n)
    };
    let (all_d, all_s) = ctx.owned.engines(isvc);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let stale_d: Vec<String> = all_d.into_iter().filter(|n| !keep(n)).collect();
    // `<name>-engine` selects every revision's pods: it stays (routers fall back on it).
    let stale_s: Vec<String> = all_s
        .into_iter()
        .filter(|n| !keep(n) && *n != engine_name(&name))
        .collect();
    // Already gone (the cache lags behind a delete): nothing to do.
    let deleted = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
        Ok(()) => Ok(true),
    };
    for d in &stale_d {
        if !deleted(
            deployments
                .delete(d, &DeleteParams::default())
                .await
                .map(|_| ()),
        )? {
            continue;
        }
        ctx.event(
            isvc,
            EventType::Normal,
            "RevisionRemoved",
            format!("Deleted engine Deployment {d}: its revision no longer serves"),
        )
        .await;
    }
    for s in &stale_s {
        deleted(
            services
                .delete(s, &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
    }
    Ok(())
}

/// A provider whose key Secret is missing is reported (the router starts without that key and
/// serves locally); the Secret's content is never read, only whether it exists.
async fn check_provider_secrets(
    ctx: &Context,
    isvc: &InferenceService,
    problems: &mut Vec<Problem>,
) -> Result<(), Error> {
    let Some(burst) = &isvc.spec.burst else {
        return Ok(());
    };
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &isvc.namespace().unwrap_or_default());
    for p in &burst.providers {
        if secrets
            .get_metadata_opt(&p.api_key_secret_ref.name)
            .await?
            .is_none()
        {
            problems.push(Problem::SecretNotFound(
                p.name.clone(),
                p.api_key_secret_ref.name.clone(),
            ));
        }
    }
    Ok(())
}

/// `router.enabled: false`: removes a router this service owned before (Service `<name>` is
/// pointed back at the engines by the same pass).
async fn remove_router(ctx: &Context, isvc: &InferenceService, ns: &str) -> Result<(), Error> {
    let name = router_name(&isvc.name_any());
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let Some(existing) = deployments.get_opt(&name).await? else {
        return Ok(());
    };
    if !is_owned_by(&existing.metadata, isvc) {
        return Ok(());
    }
    // The Deployment goes last: while it exists a later pass finishes a removal cut short.
    let kinds = [
        ApiResource::erase::<PodDisruptionBudget>(&()),
        ApiResource::erase::<RoleBinding>(&()),
        ApiResource::erase::<Role>(&()),
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<Deployment>(&()),
    ];
    for ar in kinds {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.owned.forget(&format!("{}/{ns}/{name}", ar.kind));
    }
    ctx.event(
        isvc,
        EventType::Normal,
        "RouterRemoved",
        format!("router.enabled is false: removed {name}"),
    )
    .await;
    Ok(())
}

/// Writes reconcile's status fields (server-side apply on the status subresource) if they changed,
/// and a Warning event for each newly degraded reason.
async fn write_status(
    ctx: &Context,
    isvc: &InferenceService,
    ns: &str,
    engine: Option<EngineReplicas>,
    problems: &[Problem],
) -> Result<(), Error> {
    let now = Time(jiff::Timestamp::now());
    let url = service_url(&isvc.name_any(), ns, &ctx.settings.cluster_domain);
    let desired = reconcile_status(isvc, engine, problems, url, &now);
    for p in new_problems(isvc, problems) {
        if !matches!(p, Problem::ApplyFailed(_)) {
            ctx.event(isvc, EventType::Warning, p.reason(), p.message())
                .await;
        }
    }
    if current_reconcile_status(isvc).as_ref() == Some(&desired) {
        return Ok(());
    }
    let api: Api<InferenceService> = Api::namespaced(ctx.client.clone(), ns);
    apply_status(&api, &isvc.name_any(), FIELD_MANAGER, &desired).await?;
    Ok(())
}

/// Reconciles one ScalingPolicy: validity and how many services use it.
pub async fn reconcile_policy(
    policy: Arc<ScalingPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("scalingpolicy");
    if !ctx.is_leader() {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let users = count_users(&ctx.services, &ns, &name);
    let desired = policy_status(&policy, users, &Time(jiff::Timestamp::now()));
    if current_policy_status(&policy).as_ref() != Some(&desired) {
        let api: Api<ScalingPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        apply_status(&api, &name, FIELD_MANAGER, &desired).await?;
    }
    ctx.record_success(policy.as_ref());
    // Counts also change when a service stops referencing the policy, which no policy event shows.
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Services in `ns` that reference policy `name`.
pub fn count_users(services: &Store<InferenceService>, ns: &str, name: &str) -> i32 {
    services
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns) && references(s, name))
        .count() as i32
}

/// Whether `isvc` references the policy `name`.
pub fn references(isvc: &InferenceService, name: &str) -> bool {
    isvc.spec
        .scaling_policy_ref
        .as_ref()
        .is_some_and(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_exponential_and_capped() {
        let d: Vec<u64> = (1..=12).map(|n| error_backoff(n).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(error_backoff(u32::MAX).as_secs(), 300);
    }
}
