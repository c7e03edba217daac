//! The autoscaler's I/O: scraping real HTTP servers on 127.0.0.1, and the replicas patch,
//! Events and status it sends to a mocked API server.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::api::{InferenceService, ScalingPolicy, ScalingPolicySpec};
use crate::autoscale::decide::{Driver, MetricsState};
use crate::autoscale::observe::{EnginePod, PodState};
use crate::controller::autoscaler::{Autoscaler, ServiceState, TickInput, observe_and_decide};
use crate::controller::cache::Cache;
use crate::controller::metrics::Metrics;
use crate::controller::scrape::Scraper;
use crate::test_support::{ApiServer, isvc_from_yaml, minimal_isvc_yaml};

fn vllm_page(waiting: u32, running: u32, kv: f64) -> String {
    format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n\
         # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {running}\n\
         # TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
    )
}

/// Serves `pages` in turn (one per connection, cycling) on 127.0.0.1 until the handle is
/// aborted; at most `max_requests` connections.
async fn page_server(
    pages: Vec<(u16, String)>,
    max_requests: usize,
) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        for i in 0..max_requests {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (status, body) = pages[i % pages.len()].clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, task)
}

fn ready_pod(name: &str) -> EnginePod {
    EnginePod {
        name: name.into(),
        ip: Some("127.0.0.1".into()),
        state: PodState::Ready,
        cold_start_ms: Some(180_000),
    }
}

fn service_on(port: u16) -> InferenceService {
    let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    isvc.spec.engine.port = port.into();
    isvc
}

#[tokio::test]
async fn scrapes_loopback_engines_and_decides_from_what_answered() {
    // Two pods answer with 10 waiting each; the third's scrape fails.
    let (port, server) = page_server(
        vec![
            (200, vllm_page(10, 4, 0.5)),
            (200, vllm_page(10, 4, 0.5)),
            (500, String::new()),
        ],
        3,
    )
    .await;
    let isvc = service_on(port);
    let pods = vec![ready_pod("a"), ready_pod("b"), ready_pod("c")];
    let scraper = Scraper::new(8, Duration::from_secs(2));
    let mut state = ServiceState::default();
    let mut policy = ScalingPolicySpec {
        max_replicas: 16,
        ..ScalingPolicySpec::default()
    };
    policy.scale_up.max_pods = 100;
    policy.scale_up.max_percent = 1000;
    let metrics = Metrics::default();
    let input = TickInput {
        isvc: &isvc,
        policy: &policy,
        pods: &pods,
        current_replicas: 3,
        routers: &[],
        now: 0,
    };
    let d = observe_and_decide(&scraper, &input, &mut state, Some(&metrics)).await;
    // Averaged over the 2 that answered, applied to all 3 ready: ceil(3 × 10/4) = 8.
    assert_eq!(
        d.metrics,
        MetricsState::Partial {
            responding: 2,
            ready: 3
        }
    );
    assert_eq!(
        (d.desired, d.driver),
        (8, Driver::QueueDepth),
        "{}",
        d.reason
    );
    assert_eq!(d.queue_depth, Some(20.0));
    assert!(
        metrics
            .encode()
            .contains("spillway_controller_autoscaler_scrape_errors_total{reason=\"status\"} 1")
    );
    assert_eq!(state.cold_start.seconds(), Some(180));
    server.abort();
}

#[tokio::test]
async fn a_spike_on_a_real_engine_sim_is_decided_in_the_same_tick() {
    use crate::engine_sim::{EngineSimConfig, EngineSimServer};
    let config = EngineSimConfig {
        max_concurrency: 1,
        tokens_per_second: 5.0,
        ..EngineSimConfig::default()
    };
    let engine = EngineSimServer::start(config).await.unwrap();
    let port = engine.addr().port();
    // 9 requests against 1 slot: 8 wait.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut inflight = Vec::new();
    for _ in 0..9 {
        let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::from(
                r#"{"prompt":"hi","max_tokens":20}"#,
            ))
            .unwrap();
        inflight.push(tokio::spawn(client.request(req)));
    }
    // Wait until the engine shows the queue (bounded).
    let scraper = Scraper::new(8, Duration::from_secs(2));
    let mut waiting = 0.0;
    for _ in 0..100 {
        let page = scraper
            .fetch(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap();
        waiting = crate::autoscale::signals::extract(
            &page,
            &crate::autoscale::signals::selectors(&Default::default()),
        )
        .unwrap()
        .queue_depth
        .unwrap_or(0.0);
        if waiting >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(waiting, 8.0);
    let isvc = service_on(port);
    let policy = ScalingPolicySpec {
        max_replicas: 4,
        ..ScalingPolicySpec::default()
    };
    let input = TickInput {
        isvc: &isvc,
        policy: &policy,
        pods: &[ready_pod("a")],
        current_replicas: 1,
        routers: &[],
        now: 0,
    };
    let d = observe_and_decide(&scraper, &input, &mut ServiceState::default(), None).await;
    // 8 waiting on 1 replica against 4 per replica wants 2; the default up rule allows +1 from 1.
    assert_eq!(d.desired, 2, "{}", d.reason);
    for r in inflight {
        r.abort();
    }
    engine.stop().await.unwrap();
}

struct Fixture {
    autoscaler: Autoscaler,
    api: ApiServer,
    _leader: watch::Sender<bool>,
}

fn fixture(isvc: &InferenceService, replicas: i32, policy: Option<ScalingPolicy>) -> Fixture {
    let (client, api) = ApiServer::new();
    let mut services = Writer::<InferenceService>::default();
    services.apply_watcher_event(&watcher::Event::Apply(isvc.clone()));
    let mut policies = Writer::<ScalingPolicy>::default();
    if let Some(p) = policy {
        policies.apply_watcher_event(&watcher::Event::Apply(p));
    }
    let mut deployments = Writer::<Deployment>::default();
    deployments.apply_watcher_event(&watcher::Event::Apply(
        serde_json::from_value(json!({
            "metadata": {"name": "llama-engine", "namespace": "ml"},
            "spec": {"replicas": replicas, "selector": {}, "template": {}}
        }))
        .unwrap(),
    ));
    let mut pods = Writer::<Pod>::default();
    for i in 0..2 {
        pods.apply_watcher_event(&watcher::Event::Apply(
            serde_json::from_value(json!({
                "metadata": {"name": format!("llama-engine-{i}"), "namespace": "ml",
                             "creationTimestamp": "2026-01-01T00:00:00Z",
                             "labels": {"app.kubernetes.io/instance": "llama", "app.kubernetes.io/component": "engine"}},
                "status": {"phase": "Running", "podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:04:00Z"}]}
            }))
            .unwrap(),
        ));
    }
    let (leader_tx, leader) = watch::channel(true);
    Fixture {
        autoscaler: Autoscaler {
            client: client.clone(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "spillway-autoscaler".into(),
                    instance: None,
                },
            ),
            scraper: Scraper::new(8, Duration::from_secs(2)),
            metrics: Arc::new(Metrics::default()),
            services: Cache::filled(services.as_reader()),
            policies: Cache::filled(policies.as_reader()),
            pods: Cache::filled(pods.as_reader()),
            deployments: Cache::filled(deployments.as_reader()),
            leader,
            writes: tokio::sync::Semaphore::new(4),
        },
        api,
        _leader: leader_tx,
    }
}

fn policy(mode: &str) -> ScalingPolicy {
    serde_json::from_value(json!({
        "apiVersion": "spillway.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": "fast", "namespace": "ml"},
        "spec": {"minReplicas": 1, "maxReplicas": 8, "mode": mode, "scaleUp": {"maxPods": 8, "maxPercent": 400}}
    }))
    .unwrap()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

#[tokio::test]
async fn active_tick_patches_replicas_records_an_event_and_status() {
    let (port, server) = page_server(vec![(200, vllm_page(12, 8, 0.7))], 2).await;
    let mut isvc = service_on(port);
    isvc.spec.scaling_policy_ref = Some(crate::api::PolicyRef {
        name: "fast".into(),
    });
    let Fixture {
        autoscaler,
        mut api,
        ..
    } = fixture(&isvc, 2, Some(policy("Active")));
    let tick = tokio::spawn(async move {
        let mut state = ServiceState::default();
        let interval = autoscaler.tick(&isvc, &mut state).await;
        (interval, state)
    });
    let patch = api
        .expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/ml/deployments/llama-engine",
            StatusCode::OK,
            json!({"metadata": {"name": "llama-engine", "namespace": "ml"}, "spec": {"replicas": 6, "selector": {}, "template": {}}}),
        )
        .await;
    // Only replicas, under the autoscaler's own field manager.
    assert!(
        patch.query.contains("fieldManager=spillway-autoscaler")
            && patch.query.contains("force=true")
    );
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert_eq!(patch.body["spec"], json!({"replicas": 6}), "2 × 12/4 = 6");
    let status = api
        .expect_status(
            "/apis/spillway.dev/v1alpha1/namespaces/ml/inferenceservices/llama/status",
            &service_on(port),
        )
        .await;
    assert!(status.query.contains("fieldManager=spillway-autoscaler"));
    let s = &status.body["status"];
    assert_eq!(s["desiredReplicas"], 6);
    assert_eq!(s["decisions"][0]["from"], 2);
    assert_eq!(s["decisions"][0]["to"], 6);
    assert!(
        s["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("queue depth 12/4 per replica")
    );
    assert_eq!(s["coldStartSeconds"], 240);
    assert_eq!(condition(s, "ScalingActive")["status"], "True");
    assert_eq!(condition(s, "CapacityExhausted")["status"], "False");
    assert!(s.get("lastScaleTime").is_some());
    let (interval, state) = tick.await.unwrap();
    assert_eq!(interval, Duration::from_secs(2));
    let events = api.done().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "Scaled");
    assert!(
        events[0]["note"]
            .as_str()
            .unwrap()
            .starts_with("from 2 to 6: queue depth 12/4 per replica")
    );
    drop(state);
    server.abort();
}

#[tokio::test]
async fn advisory_mode_never_patches_replicas() {
    let (port, server) = page_server(vec![(200, vllm_page(12, 8, 0.7))], 2).await;
    let mut isvc = service_on(port);
    isvc.spec.scaling_policy_ref = Some(crate::api::PolicyRef {
        name: "fast".into(),
    });
    let Fixture {
        autoscaler,
        mut api,
        ..
    } = fixture(&isvc, 2, Some(policy("Advisory")));
    let tick =
        tokio::spawn(async move { autoscaler.tick(&isvc, &mut ServiceState::default()).await });
    // The first write is the status: no Deployment patch came before it.
    let status = api
        .expect_status(
            "/apis/spillway.dev/v1alpha1/namespaces/ml/inferenceservices/llama/status",
            &service_on(port),
        )
        .await;
    let s = &status.body["status"];
    assert_eq!(s["desiredReplicas"], 6);
    assert_eq!(condition(s, "ScalingActive")["reason"], "Advisory");
    assert!(s.get("lastScaleTime").is_none());
    tick.await.unwrap();
    let events = api.done().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "Recommendation");
    server.abort();
}

#[tokio::test]
async fn unreachable_engines_hold_replicas_and_report_metrics_unavailable() {
    // Nothing listens on this port (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let isvc = service_on(port);
    let Fixture {
        autoscaler,
        mut api,
        ..
    } = fixture(&isvc, 2, None);
    let tick =
        tokio::spawn(async move { autoscaler.tick(&isvc, &mut ServiceState::default()).await });
    let status = api
        .expect_status(
            "/apis/spillway.dev/v1alpha1/namespaces/ml/inferenceservices/llama/status",
            &service_on(port),
        )
        .await;
    let s = &status.body["status"];
    assert_eq!(
        s["desiredReplicas"], 2,
        "missing metrics are never read as zero"
    );
    assert_eq!(condition(s, "ScalingActive")["status"], "False");
    assert_eq!(
        condition(s, "ScalingActive")["reason"],
        "MetricsUnavailable"
    );
    assert!(s.get("metrics").is_none());
    tick.await.unwrap();
    assert!(api.done().await.is_empty());
}

#[tokio::test]
async fn the_routers_queue_and_spill_are_scraped_into_their_signals() {
    let isvc_slots = service_on(0).spec.engine.max_concurrency as u32;
    // Both engines are full and nothing waits in them.
    let (engine_port, engine) = page_server(vec![(200, vllm_page(0, isvc_slots, 0.5))], 4).await;
    let router_page = |spilled: u32| {
        format!(
            "spillway_router_queue_length 4\n\
             spillway_router_in_flight{{destination=\"together\"}} 1\n\
             spillway_router_slot_duration_seconds_sum{{destination=\"local\"}} 80\n\
             spillway_router_slot_duration_seconds_count{{destination=\"local\"}} 10\n\
             spillway_router_slot_duration_seconds_sum{{destination=\"together\"}} 2\n\
             spillway_router_slot_duration_seconds_count{{destination=\"together\"}} {spilled}\n"
        )
    };
    let (router_port, router) =
        page_server(vec![(200, router_page(2)), (200, router_page(20))], 2).await;
    let mut isvc = service_on(engine_port);
    isvc.spec.engine.max_concurrency = isvc_slots as i32;
    let pods = vec![ready_pod("a"), ready_pod("b")];
    let mut policy = ScalingPolicySpec {
        max_replicas: 64,
        ..ScalingPolicySpec::default()
    };
    policy.scale_up.max_pods = 100;
    policy.scale_up.max_percent = 1000;
    let routers = vec![(
        "router-0".to_string(),
        format!("http://127.0.0.1:{router_port}/metrics"),
    )];
    let mut input = TickInput {
        isvc: &isvc,
        policy: &policy,
        pods: &pods,
        current_replicas: 2,
        routers: &routers,
        now: 0,
    };
    let scraper = Scraper::new(8, Duration::from_secs(2));
    let mut state = ServiceState::default();
    let first = observe_and_decide(&scraper, &input, &mut state, None).await;
    // Only the queue counts as waiting (the provider's in-flight request is served demand);
    // the spill rate needs a second sample.
    assert_eq!(first.queue_depth, Some(4.0));
    assert_eq!(first.spilled, None);
    input.now = 2_000;
    let d = observe_and_decide(&scraper, &input, &mut state, None).await;
    // 18 requests spilled in 2 s, each would hold a local slot 8 s: 72 slots of demand on top
    // of two full replicas.
    assert_eq!(d.spilled, Some(72.0));
    let want = ((2 * isvc_slots + 72) as f64 / isvc_slots as f64).ceil() as i32;
    assert_eq!(d.desired, want, "{}", d.reason);
    assert_eq!(d.signal, Some(Driver::Concurrency), "{}", d.reason);
    assert!(d.reason.contains("72 spilled to providers"), "{}", d.reason);
    engine.abort();
    router.abort();
}

#[tokio::test]
async fn a_missing_referenced_policy_holds_replicas_instead_of_applying_defaults() {
    let (port, server) = page_server(vec![(200, vllm_page(0, 0, 0.0))], 2).await;
    let mut isvc = service_on(port);
    isvc.spec.scaling_policy_ref = Some(crate::api::PolicyRef {
        name: "gone".into(),
    });
    // 12 replicas: the built-in defaults (max 4) would cut them to 4 at once.
    let Fixture {
        autoscaler, api, ..
    } = fixture(&isvc, 12, None);
    autoscaler.tick(&isvc, &mut ServiceState::default()).await;
    assert!(api.done().await.is_empty(), "no patch, no status, no event");
    server.abort();
}
