//! The autoscaler loop, the I/O around `autoscale`: one loop per service on its own timer (a slow service never delays
//! another), scraping the ready engine pods, calling `decide()`, patching replicas under the
//! autoscaler's field manager, and writing its status fields and Events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use super::apply::{REPLICAS_FIELD_MANAGER, apply_status, patch_replicas, publish_event};
use super::cache::Cache;
use super::metrics::Metrics;
use super::names::{LABEL_COMPONENT, LABEL_INSTANCE, LABEL_REVISION, engine_name};
use super::scrape::{Scraper, metrics_url};
use crate::api::{
    InferenceService, PolicyMode, ROLLOUT_ANNOTATION, RevisionRole, RolloutCommand, RolloutPhase,
    ScalingPolicy, ScalingPolicySpec,
};
use crate::autoscale::decide::{Decision, History, Observed, PodSample, SignalsConfigured, decide};
use crate::autoscale::latency::Buckets;
use crate::autoscale::observe::{ColdStart, EnginePod, PodState, classify_one};
use crate::autoscale::signals::{self, RouterSample, SignalSelectors};
use crate::autoscale::status::{AutoscalerStatus, TickFacts, autoscaler_status, needs_write};
use crate::clock::Millis;
use crate::rollout::gate::Window;
use crate::rollout::machine::{Rollout, Stage};
use crate::rollout::revision::revision_hash;
use crate::rollout::{drive, record};
use crate::router::config::ROUTER_PORT;

/// What a service's loop remembers between ticks.
#[derive(Default)]
pub struct ServiceState {
    pub history: History,
    pub cold_start: ColdStart,
    last_written: Option<(AutoscalerStatus, Millis)>,
    started: bool,
    /// The replicas last patched, and when.
    last_patch: Option<(i32, Millis)>,
    /// Each router pod's last sample, for the spill rate since.
    routers: HashMap<String, (Millis, RouterSample)>,
    /// What each revision's engines answered this tick, by the routers' counts.
    revision_added: BTreeMap<String, Window>,
    /// The rollout as this loop last decided it (read from status once, at the start).
    rollout: Option<Rollout>,
    rollout_read: bool,
    /// The gate's windows: the candidate's and the stable's answers in the current stage.
    gate: Option<GateWindows>,
    /// The revision this loop scales (its Deployment's name).
    stable: String,
    /// The candidate's own loop state while traffic moves to it (by its name).
    candidate: Option<(String, Box<ServiceState>)>,
}

/// An engine pod and its revision's hash (`None`: the first revision's, `<name>-engine`).
type RevisionPod = (Option<String>, EnginePod);

/// The pods of revision `rev` (`initial`: the first revision's name).
fn pods_of(pods: &[RevisionPod], rev: &drive::Revision, initial: &str) -> Vec<EnginePod> {
    let want = (rev.name != initial).then_some(rev.hash.as_str());
    pods.iter()
        .filter(|(h, _)| h.as_deref() == want)
        .map(|(_, p)| p.clone())
        .collect()
}

/// Answers since a stage began: they belong to the stage `key` names.
struct GateWindows {
    key: (String, Stage, Millis),
    candidate: Window,
    stable: Window,
}

/// How long a patched replica count is trusted over a cache that does not show it yet.
const PATCH_VISIBLE_MS: Millis = 30_000;

/// One service as a tick sees it.
#[derive(Clone, Copy)]
pub struct TickInput<'a> {
    pub isvc: &'a InferenceService,
    pub policy: &'a ScalingPolicySpec,
    pub pods: &'a [EnginePod],
    /// The engine Deployment's `spec.replicas`.
    pub current_replicas: i32,
    /// The ready routers: pod name and `/metrics` URL (their queue counts into queue depth,
    /// what they spill into the concurrency signal).
    pub routers: &'a [(String, String)],
    pub now: Millis,
}

/// Scrapes one service's ready pods (concurrently) and decides. No API writes: the controller,
/// the benchmark and tests share it.
pub async fn observe_and_decide(
    scraper: &Scraper,
    input: &TickInput<'_>,
    state: &mut ServiceState,
    metrics: Option<&Metrics>,
) -> Decision {
    let TickInput {
        isvc,
        policy,
        pods,
        current_replicas,
        routers,
        now,
    } = *input;
    if !state.started {
        state.history = History::starting_at(now, current_replicas);
        state.started = true;
    }
    let engine = &isvc.spec.engine;
    let selectors: SignalSelectors = signals::selectors(&engine.metrics);
    let ready: Vec<&EnginePod> = pods.iter().filter(|p| p.state == PodState::Ready).collect();
    let scrapes = ready.iter().map(|p| {
        let selectors = &selectors;
        async move {
            // A ready pod without an IP has nothing to scrape: missing, never zero.
            let Some(ip) = &p.ip else {
                return PodSample::default();
            };
            let url = metrics_url(ip, engine.port, &engine.metrics.path);
            let started = std::time::Instant::now();
            let page = scraper.fetch_bytes(&url).await.and_then(|b| {
                String::from_utf8(b.into()).map_err(|_| super::scrape::ScrapeError::NotUtf8)
            });
            if let Some(m) = metrics {
                m.scrape_observed(
                    started.elapsed().as_secs_f64(),
                    page.as_ref().err().map(|e| e.metric_reason()),
                );
            }
            match page.map(|text| signals::extract(&text, selectors)) {
                Ok(Ok(s)) => PodSample {
                    queue_depth: s.queue_depth,
                    in_flight: s.in_flight,
                    gpu_memory: s.gpu_memory,
                },
                Ok(Err(e)) => {
                    if let Some(m) = metrics {
                        m.scrape_observed(0.0, Some("parse"));
                    }
                    tracing::debug!(pod = %p.name, error = %e, "unparseable metrics page");
                    PodSample::default()
                }
                Err(e) => {
                    tracing::debug!(pod = %p.name, error = %e, "scrape failed");
                    PodSample::default()
                }
            }
        }
    });
    let router_scrapes = routers.iter().map(|(pod, url)| async move {
        let text = scraper.fetch(url).await.ok()?;
        let sample = signals::router_sample(&text).ok().flatten()?;
        Some((pod, sample))
    });
    let (samples, router) = futures::join!(join_all(scrapes), join_all(router_scrapes));
    let router: Vec<(&String, RouterSample)> = router.into_iter().flatten().collect();
    // The spill since each router's last sample; a router seen for the first time (or restarted)
    // gives its rate from the next tick on.
    let local_only_classes = isvc
        .spec
        .request_classes
        .as_ref()
        .map(|c| c.local_only())
        .unwrap_or_default();
    let (spills, local_only): (Vec<f64>, Vec<f64>) = router
        .iter()
        .filter_map(|(pod, cur)| {
            let (at, prev) = state.routers.get(*pod)?;
            Some((
                signals::spilled_slots(prev, *at, cur, now)?,
                signals::local_only_slots(prev, *at, cur, now, &local_only_classes)?,
            ))
        })
        .unzip();
    let priced = isvc
        .spec
        .burst
        .as_ref()
        .is_some_and(|b| b.providers.iter().any(|p| p.pricing.is_some()));
    let provider_price =
        signals::provider_price(&router.iter().map(|(_, s)| s).collect::<Vec<_>>(), priced);
    let ttft = local_ttft_since(&router, &state.routers);
    state.revision_added = revisions_since(&router, &state.routers);
    // A router whose scrape failed keeps its last sample as the base for its next rate.
    for (pod, s) in &router {
        state.routers.insert((*pod).clone(), (now, s.clone()));
    }
    state
        .routers
        .retain(|pod, _| routers.iter().any(|(p, _)| p == pod));
    // What the measured routers spilled stands for all of them; until every one is measured
    // nothing scales down (a router's missing rate is never read as "nothing spilled").
    let spill_incomplete = spills.len() < routers.len();
    let for_all = |v: &[f64]| {
        (!v.is_empty()).then(|| v.iter().sum::<f64>() * routers.len() as f64 / v.len() as f64)
    };
    let (spilled, local_only) = (for_all(&spills), for_all(&local_only));
    state.cold_start.observe(pods);
    let observed = Observed {
        current_replicas,
        ready: samples,
        starting: pods
            .iter()
            .filter(|p| p.state == PodState::Starting)
            .count() as i32,
        unschedulable: pods
            .iter()
            .filter(|p| p.state == PodState::Unschedulable)
            .count() as i32,
        router_queue: (!router.is_empty()).then(|| router.iter().map(|(_, s)| s.queue).sum()),
        spilled,
        spill_incomplete,
        cold_start_ms: state.cold_start.seconds().map(|s| s * 1000),
        ttft,
        provider_price,
        local_only,
        created_at: isvc
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond())
            .unwrap_or(0),
    };
    let configured = SignalsConfigured {
        queue_depth: selectors.has_queue_depth(),
        gpu_memory: selectors.has_gpu_memory(),
        max_concurrency: engine.max_concurrency.max(0) as u32,
        gpus: engine.gpus.max(0) as u32,
    };
    let d = decide(policy, configured, &observed, &state.history, now);
    state.history = d.history.clone();
    d
}

/// The local time to first token the routers measured since their last samples, summed; a
/// router seen for the first time gives its increments from the next tick on.
fn local_ttft_since(
    now: &[(&String, RouterSample)],
    before: &HashMap<String, (Millis, RouterSample)>,
) -> Option<Buckets> {
    let mut sum: Option<Buckets> = None;
    for (pod, cur) in now {
        let (Some((_, prev)), Some(c)) = (before.get(*pod), &cur.local_ttft) else {
            continue;
        };
        // No histogram before: nothing had been answered yet.
        let Some(added) = prev
            .local_ttft
            .as_ref()
            .map_or(Some(c.clone()), |p| c.since(p))
        else {
            continue;
        };
        sum.get_or_insert_with(Buckets::default).add(&added);
    }
    sum
}

/// What each revision's engines answered since the routers' last samples, summed; a router
/// seen for the first time (or restarted) gives its increments from the next tick on.
fn revisions_since(
    now: &[(&String, RouterSample)],
    before: &HashMap<String, (Millis, RouterSample)>,
) -> BTreeMap<String, Window> {
    let mut out: BTreeMap<String, Window> = BTreeMap::new();
    for (pod, cur) in now {
        let Some((_, prev)) = before.get(*pod) else {
            continue;
        };
        for (rev, totals) in &cur.revisions {
            if let Some(w) = Window::since(totals, prev.revisions.get(rev)) {
                out.entry(rev.clone()).or_insert_with(Window::empty).add(&w);
            }
        }
    }
    out
}

/// Everything the loops share.
pub struct Autoscaler {
    pub client: Client,
    pub recorder: Recorder,
    pub scraper: Scraper,
    pub metrics: Arc<Metrics>,
    pub services: Cache<InferenceService>,
    pub policies: Cache<ScalingPolicy>,
    pub pods: Cache<Pod>,
    pub deployments: Cache<Deployment>,
    pub leader: watch::Receiver<bool>,
    /// Bounds the API writes in flight across all loops: a thousand services deciding at once
    /// must not queue the leader Lease's renewal behind a thousand writes.
    pub writes: tokio::sync::Semaphore,
}

/// The policy a service scales with: the defaults without a reference, its referenced valid
/// policy, or `None` when the referenced one is missing or invalid — then the autoscaler holds
/// the current replicas (never the defaults' bounds) and reconcile reports the problem.
pub fn effective_policy(
    isvc: &InferenceService,
    policies: &Store<ScalingPolicy>,
) -> Option<ScalingPolicySpec> {
    let Some(r) = &isvc.spec.scaling_policy_ref else {
        return Some(ScalingPolicySpec::default());
    };
    let ns = isvc.namespace().unwrap_or_default();
    policies
        .get(&ObjectRef::new(&r.name).within(&ns))
        .map(|p| p.spec.clone())
        .filter(|s| s.validate().is_ok())
}

fn now_ms() -> Millis {
    jiff::Timestamp::now().as_millisecond()
}

impl Autoscaler {
    /// The service's engine pods (with their revision's hash; none for the first revision's)
    /// and router pods, classified, in one pass over the cache and without copying any pod.
    fn service_pods(&self, isvc: &InferenceService) -> (Vec<RevisionPod>, Vec<EnginePod>) {
        let ns = isvc.namespace();
        let name = isvc.name_any();
        let (mut engines, mut routers) = (Vec::new(), Vec::new());
        for p in self.pods.store.state() {
            if p.namespace() != ns || p.labels().get(LABEL_INSTANCE) != Some(&name) {
                continue;
            }
            match p.labels().get(LABEL_COMPONENT).map(String::as_str) {
                Some("engine") => {
                    let rev = p.labels().get(LABEL_REVISION).cloned();
                    engines.extend(classify_one(&p).map(|e| (rev, e)));
                }
                Some("router") => routers.extend(classify_one(&p)),
                _ => continue,
            }
        }
        (engines, routers)
    }

    /// One tick for one service: observe, decide, act. Returns the policy interval to wait.
    pub async fn tick(&self, isvc: &InferenceService, state: &mut ServiceState) -> Duration {
        let Some(policy) = effective_policy(isvc, &self.policies.store) else {
            return Duration::from_secs(2);
        };
        let interval = Duration::from_secs(policy.interval_seconds.max(1) as u64);
        let ns = isvc.namespace().unwrap_or_default();
        let name = isvc.name_any();
        let view = with_last_written(isvc, state.last_written.as_ref().map(|(s, _)| s));
        let plan = drive::plan(
            &name,
            &engine_name(&name),
            &revision_hash(&isvc.spec),
            view.status.as_ref(),
        );
        let Some(deployment) = self
            .deployments
            .store
            .get(&ObjectRef::new(&plan.stable.name).within(&ns))
        else {
            return interval; // not created yet: reconcile's job
        };
        // A promotion hands scaling to another Deployment: the last patch and the history
        // were the old one's.
        if state.stable != plan.stable.name {
            if !state.stable.is_empty() {
                state.last_patch = None;
                state.started = false;
            }
            state.stable = plan.stable.name.clone();
        }
        let cached = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        // The cache may not show our last patch yet; trust the patch for a while so a scale is
        // neither repeated nor counted twice by the rate limits.
        let current = match state.last_patch {
            Some((value, at)) if cached != value && now_ms() - at < PATCH_VISIBLE_MS => value,
            _ => cached,
        };
        let (all_pods, routers) = self.service_pods(isvc);
        // The stable scales on its own engines (a candidate's or a previous revision's are
        // not its capacity).
        let pods = pods_of(&all_pods, &plan.stable, &engine_name(&name));
        // Ready routers' metrics: their queue and what they spill.
        let router_urls: Vec<(String, String)> = routers
            .iter()
            .filter(|p| p.state == PodState::Ready)
            .filter_map(|p| {
                let ip = p.ip.as_deref()?;
                Some((
                    p.name.clone(),
                    metrics_url(ip, ROUTER_PORT.into(), "/metrics"),
                ))
            })
            .collect();
        let now = now_ms();
        let input = TickInput {
            isvc,
            policy: &policy,
            pods: &pods,
            current_replicas: current,
            routers: &router_urls,
            now,
        };
        let mut d = observe_and_decide(&self.scraper, &input, state, Some(&self.metrics)).await;
        self.metrics.decision_observed(&ns, &name, current, &d);
        let pass = self
            .rollout_pass(isvc, &view, &plan, state, now, &policy, &all_pods)
            .await;
        if pass.hold_stable && d.desired < current {
            d.desired = current;
            d.reason = format!("holding {current} while traffic moves to a new revision");
        }
        // Promoted this tick: the new stable keeps what it has until the next tick decides.
        let stable_same = pass.stable.name == plan.stable.name;

        let mut scaled = false;
        if policy.mode == PolicyMode::Active
            && stable_same
            && d.desired != current
            && *self.leader.borrow()
        {
            let patched = self
                .write(patch_replicas(
                    &self.client,
                    &ns,
                    &plan.stable.name,
                    d.desired,
                ))
                .await;
            match patched {
                Ok(_) => {
                    state.last_patch = Some((d.desired, now));
                    state.history.record_scale(now, current, d.desired);
                    scaled = true;
                    tracing::info!(service = %name, namespace = %ns, from = current, to = d.desired, reason = %d.reason, "scaled");
                    self.event(
                        isvc,
                        EventType::Normal,
                        "Scaled",
                        format!("from {current} to {}: {}", d.desired, d.reason),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "patching replicas failed");
                    self.event(
                        isvc,
                        EventType::Warning,
                        "ScaleFailed",
                        format!("from {current} to {}: {e}", d.desired),
                    )
                    .await;
                }
            }
        } else if policy.mode == PolicyMode::Advisory
            && d.desired != current
            && isvc.status.as_ref().and_then(|s| s.desired_replicas) != Some(d.desired)
        {
            self.event(
                isvc,
                EventType::Normal,
                "Recommendation",
                format!(
                    "Advisory: would scale from {current} to {}: {}",
                    d.desired, d.reason
                ),
            )
            .await;
        }

        let facts = TickFacts {
            decision: &d,
            current,
            unschedulable: pods
                .iter()
                .filter(|p| p.state == PodState::Unschedulable)
                .count() as i32,
            mode: policy.mode,
            burst_mode: policy.burst.mode,
            scaled,
            cold_start_seconds: state.cold_start.seconds(),
            now: Time(
                jiff::Timestamp::from_millisecond(now).unwrap_or_else(|_| jiff::Timestamp::now()),
            ),
        };
        let mut status = autoscaler_status(&view, &facts);
        status.stable_revision = Some(pass.stable.name.clone());
        status.candidate_revision = pass
            .revisions
            .iter()
            .find(|r| r.role == RevisionRole::Candidate)
            .map(|r| r.name.clone());
        status.revisions = pass.revisions;
        status.rollout = pass.rollout.as_ref().map(record::to_status);
        let since = state
            .last_written
            .as_ref()
            .map_or(i64::MAX, |(_, t)| now - t);
        if needs_write(state.last_written.as_ref().map(|(s, _)| s), &status, since)
            && *self.leader.borrow()
        {
            match self
                .write(write_status(&self.client, &ns, &name, &status))
                .await
            {
                Ok(()) => state.last_written = Some((status, now)),
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "writing autoscaler status failed")
                }
            }
        }
        interval
    }

    /// One pass of the service's rollout: the gate's windows fed, the machine advanced, the
    /// candidate sized, a command acted on once (and its annotation removed), Events on each
    /// turn. Runs whatever the policy mode: a rollout is not autoscaling.
    #[allow(clippy::too_many_arguments)]
    async fn rollout_pass(
        &self,
        isvc: &InferenceService,
        view: &InferenceService,
        plan: &drive::Plan,
        state: &mut ServiceState,
        now: Millis,
        policy: &ScalingPolicySpec,
        pods: &[RevisionPod],
    ) -> drive::Pass {
        let ns = isvc.namespace().unwrap_or_default();
        let name = isvc.name_any();
        if !state.rollout_read {
            state.rollout = view
                .status
                .as_ref()
                .and_then(|s| s.rollout.as_ref())
                .and_then(record::from_status);
            state.rollout_read = true;
        }
        // This tick's answers go to the stage they were given in.
        if let Some(r) = &state.rollout {
            let key = (r.candidate.clone(), r.stage, r.since);
            let g = state.gate.get_or_insert_with(|| GateWindows {
                key: key.clone(),
                candidate: Window::empty(),
                stable: Window::empty(),
            });
            if g.key != key {
                *g = GateWindows {
                    key,
                    candidate: Window::empty(),
                    stable: Window::empty(),
                };
            }
            if let Some(w) = state.revision_added.get(&r.candidate) {
                g.candidate.add(w);
            }
            if let Some(w) = state.revision_added.get(&r.stable) {
                g.stable.add(w);
            }
        }
        let replicas = |r: Option<&drive::Revision>| {
            r.and_then(|r| {
                self.deployments
                    .store
                    .get(&ObjectRef::new(&r.name).within(&ns))
            })
            .map(|d| drive::Replicas {
                replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                ready: d
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0),
            })
            .unwrap_or_default()
        };
        let annotation = isvc.annotations().get(ROLLOUT_ANNOTATION).cloned();
        let command = annotation.as_deref().and_then(RolloutCommand::parse);
        let startup = i64::from(isvc.spec.engine.startup_timeout_seconds.max(0));
        let seen = drive::Seen {
            spec: isvc.spec.rollout.as_ref(),
            plan,
            rollout: state.rollout.as_ref(),
            stable: replicas(Some(&plan.stable)),
            candidate: replicas(plan.candidate.as_ref()),
            previous: replicas(plan.previous.as_ref()),
            now,
            windows: state.gate.as_ref().map(|g| (&g.candidate, &g.stable)),
            command,
            ready_deadline_ms: (startup + 600) * 1000,
        };
        let pass = drive::pass(&seen);
        let leader = *self.leader.borrow();
        let target = match &pass.candidate_replicas {
            // Advisory: the stage's need only (a rollout is not autoscaling).
            Some((c, want)) if pass.hold_stable && policy.mode == PolicyMode::Active => {
                let d = self
                    .candidate_decision(isvc, c, *want, state, now, policy, pods)
                    .await;
                Some((c, (*want).max(d)))
            }
            Some((c, want)) => Some((c, *want)),
            None => {
                state.candidate = None;
                None
            }
        };
        if let Some((c, want)) = &target
            && leader
            && replicas(Some(c)).replicas != *want
            && self
                .deployments
                .store
                .get(&ObjectRef::new(&c.name).within(&ns))
                .is_some()
        {
            match self
                .write(patch_replicas(&self.client, &ns, &c.name, *want))
                .await
            {
                Ok(_) => {
                    tracing::info!(service = %name, revision = %c.name, replicas = want, "candidate sized")
                }
                Err(e) => {
                    tracing::warn!(service = %name, revision = %c.name, error = %e, "sizing the candidate failed")
                }
            }
        }
        // Read once, acted on or not: a command left standing would act on the next rollout.
        if let Some(a) = &annotation
            && leader
        {
            if !pass.command_used {
                let why = if command.is_none() {
                    format!(
                        "unknown {ROLLOUT_ANNOTATION} command {a:?}: use pause, resume, promote or abort"
                    )
                } else {
                    format!(
                        "{ROLLOUT_ANNOTATION}={a} ignored: it changes nothing in the rollout as it stands (or there is none)"
                    )
                };
                self.event(isvc, EventType::Warning, "RolloutCommandIgnored", why)
                    .await;
            }
            if let Err(e) = self
                .write(remove_annotation(&self.client, &ns, &name))
                .await
            {
                tracing::warn!(service = %name, error = %e, "removing the rollout command failed");
            }
        }
        let before = state
            .rollout
            .as_ref()
            .map(|r| (r.candidate.clone(), r.phase));
        let after = pass
            .rollout
            .as_ref()
            .map(|r| (r.candidate.clone(), r.phase));
        if let Some(r) = pass.rollout.as_ref().filter(|_| before != after && leader) {
            let (type_, reason) = match r.phase {
                RolloutPhase::Progressing if before.is_none_or(|b| b.0 != r.candidate) => {
                    (EventType::Normal, "RolloutStarted")
                }
                RolloutPhase::Progressing => (EventType::Normal, "RolloutResumed"),
                RolloutPhase::Paused => (EventType::Normal, "RolloutPaused"),
                RolloutPhase::Promoted => (EventType::Normal, "RolloutPromoted"),
                RolloutPhase::RolledBack => (EventType::Warning, "RolloutRolledBack"),
                RolloutPhase::Failed => (EventType::Warning, "RolloutFailed"),
            };
            tracing::info!(service = %name, candidate = %r.candidate, phase = r.phase.as_str(), message = %r.message, "rollout");
            self.event(isvc, type_, reason, r.message.clone()).await;
        }
        state.rollout = pass.rollout.clone();
        pass
    }

    /// What the candidate's own engines ask for while traffic moves to it: its queue, memory
    /// and concurrency, within the policy, and never below what its stage needs (`need`).
    #[allow(clippy::too_many_arguments)]
    async fn candidate_decision(
        &self,
        isvc: &InferenceService,
        c: &drive::Revision,
        need: i32,
        state: &mut ServiceState,
        now: Millis,
        policy: &ScalingPolicySpec,
        pods: &[RevisionPod],
    ) -> i32 {
        let ns = isvc.namespace().unwrap_or_default();
        let current = self
            .deployments
            .store
            .get(&ObjectRef::new(&c.name).within(&ns))
            .and_then(|d| d.spec.as_ref().and_then(|s| s.replicas))
            .unwrap_or(0);
        let within = drive::candidate_policy(policy, need);
        let pods = pods_of(pods, c, &engine_name(&isvc.name_any()));
        let s = match &mut state.candidate {
            Some((name, s)) if *name == c.name => s,
            slot => &mut slot.insert((c.name.clone(), Box::default())).1,
        };
        let input = TickInput {
            isvc,
            policy: &within,
            pods: &pods,
            current_replicas: current,
            routers: &[],
            now,
        };
        let d = observe_and_decide(&self.scraper, &input, s, None).await;
        if d.desired != current {
            s.history.record_scale(now, current, d.desired);
        }
        d.desired
    }

    async fn event(&self, isvc: &InferenceService, type_: EventType, reason: &str, note: String) {
        self.write(publish_event(
            &self.recorder,
            isvc,
            type_,
            reason,
            note,
            "Scale",
        ))
        .await;
    }

    /// Runs one API write once a permit is free.
    async fn write<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        let _permit = self.writes.acquire().await;
        call.await
    }

    /// Runs one loop per service until `shutdown`; loops start and stop as services come and go.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Deciding before the caches are filled would read a missing policy, Deployment or pod.
        let ready = async {
            self.services.synced().await
                && self.policies.synced().await
                && self.pods.synced().await
                && self.deployments.synced().await
        };
        tokio::select! {
            synced = ready => if !synced { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tracing::info!("caches synced; autoscaler started");
        let mut loops: HashMap<
            ObjectRef<InferenceService>,
            (watch::Sender<bool>, tokio::task::JoinHandle<()>),
        > = HashMap::new();
        loop {
            let live: Vec<ObjectRef<InferenceService>> = self
                .services
                .store
                .state()
                .iter()
                .filter(|s| s.metadata.deletion_timestamp.is_none())
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect();
            for key in &live {
                if !loops.contains_key(key) {
                    let (tx, rx) = watch::channel(false);
                    let handle = tokio::spawn(service_loop(self.clone(), key.clone(), rx));
                    loops.insert(key.clone(), (tx, handle));
                }
            }
            loops.retain(|key, (tx, _)| {
                let keep = live.contains(key);
                if !keep {
                    tx.send_replace(true);
                    self.metrics
                        .forget_service(key.namespace.as_deref().unwrap_or_default(), &key.name);
                }
                keep
            });
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        for (_, (tx, handle)) in loops {
            tx.send_replace(true);
            let _ = handle.await;
        }
    }
}

async fn service_loop(
    a: Arc<Autoscaler>,
    key: ObjectRef<InferenceService>,
    mut stop: watch::Receiver<bool>,
) {
    let mut state = ServiceState::default();
    loop {
        let Some(isvc) = a.services.store.get(&key) else {
            return;
        };
        let interval = a.tick(&isvc, &mut state).await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The service as last seen, with what this loop last wrote laid over it (the cache may lag
/// behind our own writes; decisions must not be lost to that).
fn with_last_written(isvc: &InferenceService, last: Option<&AutoscalerStatus>) -> InferenceService {
    let mut view = isvc.clone();
    if let Some(w) = last {
        let s = view.status.get_or_insert_with(Default::default);
        s.desired_replicas = Some(w.desired_replicas);
        s.decisions = w.decisions.clone();
        s.last_scale_time = w.last_scale_time.clone().or(s.last_scale_time.clone());
        if !w.revisions.is_empty() {
            s.revisions = w.revisions.clone();
            s.rollout = w.rollout.clone();
        }
        for c in &w.conditions {
            s.conditions.retain(|x| x.type_ != c.type_);
            s.conditions.push(c.clone());
        }
    }
    view
}

/// Removes the rollout command annotation once acted on (a standing command would act on
/// the next rollout too).
async fn remove_annotation(client: &Client, ns: &str, name: &str) -> Result<(), kube::Error> {
    let api: Api<InferenceService> = Api::namespaced(client.clone(), ns);
    let patch = serde_json::json!({"metadata": {"annotations": {ROLLOUT_ANNOTATION: null}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Writes the autoscaler's status fields (server-side apply, its own field manager).
pub async fn write_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: &AutoscalerStatus,
) -> Result<(), kube::Error> {
    let api: Api<InferenceService> = Api::namespaced(client.clone(), ns);
    apply_status(&api, name, REPLICAS_FIELD_MANAGER, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(answers: &[(f64, usize)]) -> RouterSample {
        let mut b = Buckets::exponential(0.1, 2.0, 4);
        for &(s, n) in answers {
            for _ in 0..n {
                b.observe(s);
            }
        }
        RouterSample {
            local_ttft: Some(b),
            ..RouterSample::default()
        }
    }

    /// A revision's pods by their label: the first revision's have none (its selector
    /// predates revisions), every later one's carry its hash.
    #[test]
    fn each_revision_scales_on_its_own_pods() {
        let pod = |name: &str| EnginePod {
            name: name.into(),
            ip: None,
            state: PodState::Ready,
            cold_start_ms: None,
        };
        let pods: Vec<RevisionPod> = vec![
            (None, pod("svc-engine-a")),
            (Some("1a2b3c4d5e".into()), pod("svc-1a2b3c-b")),
            (Some("1a2b3c4d5e".into()), pod("svc-1a2b3c-c")),
        ];
        let names = |r: &drive::Revision| -> Vec<String> {
            pods_of(&pods, r, "svc-engine")
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        let first = drive::Revision {
            name: "svc-engine".into(),
            hash: "ffffffffff".into(),
        };
        let candidate = drive::Revision {
            name: "svc-1a2b3c".into(),
            hash: "1a2b3c4d5e".into(),
        };
        assert_eq!(names(&first), ["svc-engine-a"]);
        assert_eq!(names(&candidate), ["svc-1a2b3c-b", "svc-1a2b3c-c"]);
    }

    /// Each router's increment since its last sample, summed; a router seen for the first
    /// time, one restarted (counts went down) and one whose scrape failed give nothing this
    /// tick; one whose histogram was absent before gives all it has.
    #[test]
    fn local_ttft_is_what_each_router_added_since_its_last_sample() {
        let (a, b, c, d, e) = ["a", "b", "c", "d", "e"].map(String::from).into();
        let before: HashMap<String, (Millis, RouterSample)> = HashMap::from([
            (a.clone(), (0, sample(&[(0.05, 10)]))),
            (b.clone(), (0, sample(&[(0.05, 10)]))),
            (c.clone(), (0, RouterSample::default())),
            (e.clone(), (0, sample(&[(0.05, 3)]))),
        ]);
        let now = vec![
            // 5 more answers, all slow.
            (&a, sample(&[(0.05, 10), (0.5, 5)])),
            // Restarted: fewer than before.
            (&b, sample(&[(0.05, 2)])),
            // Nothing streamed before: all 4 are new.
            (&c, sample(&[(0.05, 4)])),
            // New router: a baseline only.
            (&d, sample(&[(0.05, 7)])),
        ];
        let sum = local_ttft_since(&now, &before).expect("two routers measured");
        assert_eq!(sum.count(), 9.0);
        assert!(
            sum.quantile(0.9).unwrap() > 0.2,
            "the slow answers are in it"
        );
        // Nobody measured: no reading (not an empty one).
        assert_eq!(local_ttft_since(&now[3..], &before), None);
    }
}
