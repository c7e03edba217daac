//! Engine and router metrics pages read into signals, per preset and selector.

use crate::api::{EngineMetrics, GpuMemoryMetric, MetricSelector, MetricsPreset};
use crate::autoscale::promtext::ParseErrorKind;
use crate::autoscale::signals::*;
use std::collections::BTreeMap;

const VLLM_PAGE: &str = include_str!("../testdata/vllm.prom");

fn metrics(preset: MetricsPreset) -> EngineMetrics {
    EngineMetrics {
        preset,
        ..EngineMetrics::default()
    }
}

fn sel(name: &str, labels: &[(&str, &str)]) -> MetricSelector {
    MetricSelector {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn read(page: &str, m: &EngineMetrics) -> PodSignals {
    extract(page, &selectors(m)).expect("page parses")
}

#[test]
fn vllm_preset_on_a_real_page() {
    assert_eq!(
        read(VLLM_PAGE, &metrics(MetricsPreset::Vllm)),
        PodSignals {
            queue_depth: Some(3.0),
            in_flight: Some(12.0),
            gpu_memory: Some(0.4471830985915493),
        }
    );
}

#[test]
fn vllm_falls_back_to_gpu_cache_usage_perc() {
    let page = "\
vllm:num_requests_waiting{model_name=\"m\"} 1.0
vllm:num_requests_running{model_name=\"m\"} 2.0
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25
";
    assert_eq!(
        read(page, &metrics(MetricsPreset::Vllm)).gpu_memory,
        Some(0.25)
    );
}

#[test]
fn vllm_prefers_kv_cache_usage_perc_when_both_are_present() {
    let page = "\
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.75
";
    assert_eq!(
        read(page, &metrics(MetricsPreset::Vllm)).gpu_memory,
        Some(0.75)
    );
}

#[test]
fn sglang_preset() {
    let page = "\
sglang:num_running_reqs{model_name=\"m\"} 162.0
sglang:token_usage{model_name=\"m\"} 0.28
sglang:num_queue_reqs{model_name=\"m\"} 2826.0
sglang:num_used_tokens{model_name=\"m\"} 123859.0
";
    assert_eq!(
        read(page, &metrics(MetricsPreset::Sglang)),
        PodSignals {
            queue_depth: Some(2826.0),
            in_flight: Some(162.0),
            gpu_memory: Some(0.28),
        }
    );
}

#[test]
fn tgi_preset_has_no_gpu_memory() {
    let s = selectors(&metrics(MetricsPreset::Tgi));
    assert!(s.has_queue_depth() && s.has_in_flight());
    assert!(!s.has_gpu_memory());
    let page = "tgi_queue_size 7\ntgi_batch_current_size 32\n";
    assert_eq!(
        extract(page, &s).unwrap(),
        PodSignals {
            queue_depth: Some(7.0),
            in_flight: Some(32.0),
            gpu_memory: None,
        }
    );
}

#[test]
fn triton_preset_sums_models_and_gpus() {
    let s = selectors(&metrics(MetricsPreset::Triton));
    assert!(!s.has_in_flight());
    assert!(s.has_queue_depth() && s.has_gpu_memory());
    let page = "\
nv_inference_pending_request_count{model=\"resnet50\",version=\"1\"} 4
nv_inference_pending_request_count{model=\"bert\",version=\"2\"} 3
nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-a\"} 60
nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-a\"} 80
nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-b\"} 20
nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-b\"} 80
";
    assert_eq!(
        extract(page, &s).unwrap(),
        PodSignals {
            queue_depth: Some(7.0),
            in_flight: None,
            gpu_memory: Some(0.5),
        }
    );
}

#[test]
fn absent_metrics_are_none_not_zero() {
    for preset in [
        MetricsPreset::Vllm,
        MetricsPreset::Sglang,
        MetricsPreset::Tgi,
        MetricsPreset::Triton,
    ] {
        let s = read("# nothing here\nunrelated_metric 5\n", &metrics(preset));
        assert_eq!(s, PodSignals::default(), "{preset:?}");
    }
    // A histogram's series do not count as the gauge itself.
    let page = "vllm:num_requests_waiting_bucket{le=\"+Inf\"} 9\n";
    assert_eq!(read(page, &metrics(MetricsPreset::Vllm)).queue_depth, None);
}

#[test]
fn zero_is_kept_as_zero() {
    let page = "tgi_queue_size 0\ntgi_batch_current_size 0.0\n";
    let s = read(page, &metrics(MetricsPreset::Tgi));
    assert_eq!((s.queue_depth, s.in_flight), (Some(0.0), Some(0.0)));
}

#[test]
fn series_of_several_models_are_summed() {
    let page = "\
vllm:num_requests_waiting{engine=\"0\",model_name=\"a\"} 2
vllm:num_requests_waiting{engine=\"1\",model_name=\"a\"} 3
vllm:num_requests_waiting{engine=\"0\",model_name=\"b\"} 5
";
    assert_eq!(
        read(page, &metrics(MetricsPreset::Vllm)).queue_depth,
        Some(10.0)
    );
}

#[test]
fn explicit_overrides_take_precedence() {
    let m = EngineMetrics {
        preset: MetricsPreset::Vllm,
        queue_depth: Some(sel("my_queue", &[])),
        in_flight: Some(sel("my_running", &[])),
        gpu_memory: Some(GpuMemoryMetric {
            fraction: Some(sel("my_mem", &[])),
            used: None,
            total: None,
        }),
        ..EngineMetrics::default()
    };
    let page = "\
vllm:num_requests_waiting 100
vllm:num_requests_running 100
vllm:kv_cache_usage_perc 0.99
my_queue 1
my_running 2
my_mem 0.5
";
    assert_eq!(
        read(page, &m),
        PodSignals {
            queue_depth: Some(1.0),
            in_flight: Some(2.0),
            gpu_memory: Some(0.5),
        }
    );
}

#[test]
fn an_override_adds_a_signal_the_preset_lacks() {
    let m = EngineMetrics {
        preset: MetricsPreset::Triton,
        in_flight: Some(sel("nv_inference_exec_active", &[])),
        ..EngineMetrics::default()
    };
    let s = selectors(&m);
    assert!(s.has_in_flight());
    assert_eq!(
        extract("nv_inference_exec_active 4\n", &s)
            .unwrap()
            .in_flight,
        Some(4.0)
    );
}

#[test]
fn used_total_override() {
    let m = EngineMetrics {
        preset: MetricsPreset::Tgi,
        gpu_memory: Some(GpuMemoryMetric {
            fraction: None,
            used: Some(sel("mem_used", &[("kind", "hbm")])),
            total: Some(sel("mem_total", &[("kind", "hbm")])),
        }),
        ..EngineMetrics::default()
    };
    let page = "\
mem_used{kind=\"hbm\",gpu=\"0\"} 30
mem_total{kind=\"hbm\",gpu=\"0\"} 40
mem_used{kind=\"hbm\",gpu=\"1\"} 10
mem_total{kind=\"hbm\",gpu=\"1\"} 40
mem_used{kind=\"host\"} 1000
mem_total{kind=\"host\"} 1000
";
    assert!(selectors(&m).has_gpu_memory());
    assert_eq!(read(page, &m).gpu_memory, Some(0.5));
    // Half of the pair missing: no fraction.
    assert_eq!(read("mem_used{kind=\"hbm\"} 30\n", &m).gpu_memory, None);
    // A zero total cannot give a fraction.
    let zero = "mem_used{kind=\"hbm\"} 0\nmem_total{kind=\"hbm\"} 0\n";
    assert_eq!(read(zero, &m).gpu_memory, None);
}

#[test]
fn incomplete_gpu_override_keeps_the_preset() {
    let m = EngineMetrics {
        preset: MetricsPreset::Sglang,
        gpu_memory: Some(GpuMemoryMetric {
            fraction: None,
            used: Some(sel("mem_used", &[])),
            total: None,
        }),
        ..EngineMetrics::default()
    };
    assert_eq!(
        read("sglang:token_usage 0.3\nmem_used 5\n", &m).gpu_memory,
        Some(0.3)
    );
}

#[test]
fn label_matcher_keeps_only_series_with_all_labels() {
    let m = EngineMetrics {
        preset: MetricsPreset::Vllm,
        queue_depth: Some(sel(
            "vllm:num_requests_waiting",
            &[("model_name", "say \"hi\""), ("engine", "0")],
        )),
        ..EngineMetrics::default()
    };
    let page = "\
vllm:num_requests_waiting{engine=\"0\",model_name=\"say \\\"hi\\\"\"} 2
vllm:num_requests_waiting{engine=\"1\",model_name=\"say \\\"hi\\\"\"} 3
vllm:num_requests_waiting{model_name=\"say \\\"hi\\\"\"} 5
vllm:num_requests_waiting{engine=\"0\",model_name=\"other\"} 7
";
    assert_eq!(read(page, &m).queue_depth, Some(2.0));
    // Matching labels but none matching the name: absent, not zero.
    assert_eq!(
        read("vllm:num_requests_waiting{engine=\"9\"} 1\n", &m).queue_depth,
        None
    );
}

#[test]
fn nan_and_negative_values_make_the_signal_missing() {
    let vllm = metrics(MetricsPreset::Vllm);
    let page = "\
vllm:num_requests_waiting{model_name=\"a\"} NaN
vllm:num_requests_running{model_name=\"a\"} -1
vllm:kv_cache_usage_perc{model_name=\"a\"} +Inf
";
    assert_eq!(read(page, &vllm), PodSignals::default());
    // One bad series among good ones spoils the sum rather than shrinking it.
    let mixed = "\
vllm:num_requests_waiting{model_name=\"a\"} 4
vllm:num_requests_waiting{model_name=\"b\"} NaN
";
    assert_eq!(read(mixed, &vllm).queue_depth, None);
}

#[test]
fn gpu_fraction_is_clamped() {
    let vllm = metrics(MetricsPreset::Vllm);
    assert_eq!(
        read("vllm:kv_cache_usage_perc 1.3\n", &vllm).gpu_memory,
        Some(1.0)
    );
    let triton = metrics(MetricsPreset::Triton);
    let page = "nv_gpu_memory_used_bytes 90\nnv_gpu_memory_total_bytes 80\n";
    assert_eq!(read(page, &triton).gpu_memory, Some(1.0));
}

#[test]
fn dcgm_used_free_pair() {
    let s = SignalSelectors::preset(MetricsPreset::Tgi).with_gpu_memory(GpuMemorySource::dcgm(&[
        ("namespace", "ml"),
        ("pod", "chat-engine-0"),
    ]));
    assert!(s.has_gpu_memory());
    let page = "\
DCGM_FI_DEV_FB_FREE{gpu=\"0\", UUID=\"GPU-1\", namespace=\"ml\", pod=\"chat-engine-0\"} 20480
DCGM_FI_DEV_FB_USED{gpu=\"0\", UUID=\"GPU-1\", namespace=\"ml\", pod=\"chat-engine-0\"} 61440
DCGM_FI_DEV_FB_FREE{gpu=\"1\", UUID=\"GPU-2\", namespace=\"ml\", pod=\"chat-engine-0\"} 61440
DCGM_FI_DEV_FB_USED{gpu=\"1\", UUID=\"GPU-2\", namespace=\"ml\", pod=\"chat-engine-0\"} 20480
DCGM_FI_DEV_FB_FREE{gpu=\"2\", UUID=\"GPU-3\", namespace=\"ml\", pod=\"other-0\"} 0
DCGM_FI_DEV_FB_USED{gpu=\"2\", UUID=\"GPU-3\", namespace=\"ml\", pod=\"other-0\"} 81920
";
    assert_eq!(extract(page, &s).unwrap().gpu_memory, Some(0.5));
    let only_used = "DCGM_FI_DEV_FB_USED{namespace=\"ml\",pod=\"chat-engine-0\"} 1\n";
    assert_eq!(extract(only_used, &s).unwrap().gpu_memory, None);
    let idle = "DCGM_FI_DEV_FB_USED{namespace=\"ml\",pod=\"chat-engine-0\"} 0\n\
                DCGM_FI_DEV_FB_FREE{namespace=\"ml\",pod=\"chat-engine-0\"} 0\n";
    assert_eq!(extract(idle, &s).unwrap().gpu_memory, None);
}

#[test]
fn parse_errors_are_returned() {
    let e = extract(
        "vllm:num_requests_waiting 1\nbroken{\n",
        &selectors(&metrics(MetricsPreset::Vllm)),
    )
    .unwrap_err();
    assert_eq!((e.line, e.kind), (2, ParseErrorKind::UnterminatedLabels));
}

#[test]
fn router_sample_reads_the_router_gauge() {
    let page = "\
# HELP spillway_router_queue_length Requests waiting in the router.
# TYPE spillway_router_queue_length gauge
spillway_router_queue_length 6
";
    let queue = |page: &str| router_sample(page).unwrap().map(|s| s.queue);
    assert_eq!(queue(page), Some(6.0));
    assert_eq!(queue("other 1\n"), None);
    assert_eq!(queue("spillway_router_queue_length 0\n"), Some(0.0));
    assert_eq!(queue("spillway_router_queue_length NaN\n"), None);
    assert_eq!(
        router_sample("spillway_router_queue_length x\n")
            .unwrap_err()
            .line,
        1
    );
}

#[test]
fn router_sample_splits_slot_totals_into_local_and_spilled() {
    let page = concat!(
        "spillway_router_queue_length 2\n",
        // In flight at providers is served demand, not a queue.
        "spillway_router_in_flight{destination=\"together\"} 5\n",
        "spillway_router_slot_duration_seconds_sum{destination=\"local\"} 80.0\n",
        "spillway_router_slot_duration_seconds_count{destination=\"local\"} 10\n",
        "spillway_router_slot_duration_seconds_bucket{destination=\"local\",le=\"+Inf\"} 10\n",
        "spillway_router_slot_duration_seconds_sum{destination=\"together\"} 3.0\n",
        "spillway_router_slot_duration_seconds_count{destination=\"together\"} 20\n",
        "spillway_router_slot_duration_seconds_sum{destination=\"groq\"} 1.0\n",
        "spillway_router_slot_duration_seconds_count{destination=\"groq\"} 10\n",
    );
    let s = router_sample(page).unwrap().unwrap();
    assert_eq!(s.queue, 2.0);
    assert_eq!(
        s.local,
        SlotTotals {
            count: 10.0,
            seconds: 80.0
        }
    );
    assert_eq!(
        s.spilled,
        SlotTotals {
            count: 30.0,
            seconds: 4.0
        }
    );
    // Without the queue gauge this is not a spillway router page; a bad total spoils it.
    assert_eq!(
        router_sample("spillway_router_in_flight{destination=\"a\"} 3\n").unwrap(),
        None
    );
    let bad = "spillway_router_queue_length 0\nspillway_router_slot_duration_seconds_count{destination=\"local\"} -1\n";
    assert_eq!(router_sample(bad).unwrap(), None);
}

#[test]
fn spilled_demand_is_spill_rate_times_local_hold_time() {
    let at = |local: (f64, f64), spilled: (f64, f64)| RouterSample {
        queue: 0.0,
        local: SlotTotals {
            count: local.0,
            seconds: local.1,
        },
        spilled: SlotTotals {
            count: spilled.0,
            seconds: spilled.1,
        },
        ..RouterSample::default()
    };
    // Local requests hold a slot 8 s; 18 requests went to a fast provider in 2 s: 9/s × 8 s
    // = 72 slots of demand, although each held the provider for only 0.1 s.
    let prev = at((10.0, 80.0), (2.0, 0.2));
    let cur = at((10.0, 80.0), (20.0, 2.0));
    assert_eq!(spilled_slots(&prev, 0, &cur, 2_000), Some(72.0));
    // Nothing spilled: no demand.
    assert_eq!(spilled_slots(&cur, 0, &cur, 2_000), Some(0.0));
    // No local request has ended yet: the providers' hold time stands in.
    let (p0, p1) = (at((0.0, 0.0), (0.0, 0.0)), at((0.0, 0.0), (4.0, 2.0)));
    assert_eq!(spilled_slots(&p0, 0, &p1, 2_000), Some(1.0));
    // A restarted router (counters went back) or no time passed: not comparable.
    assert_eq!(spilled_slots(&cur, 0, &prev, 2_000), None);
    assert_eq!(
        spilled_slots(&prev, 0, &at((5.0, 40.0), (20.0, 2.0)), 2_000),
        None
    );
    assert_eq!(spilled_slots(&prev, 2_000, &cur, 2_000), None);
}

/// The latency objective reads the local engines' streamed answers only: a provider's time to
/// first token says nothing about the engines.
#[test]
fn router_sample_reads_the_local_time_to_first_token_histogram() {
    let page = concat!(
        "spillway_router_queue_length{class=\"default\"} 0\n",
        "spillway_router_time_to_first_token_seconds_bucket{destination=\"local\",le=\"0.1\"} 90\n",
        "spillway_router_time_to_first_token_seconds_bucket{destination=\"local\",le=\"1.0\"} 98\n",
        "spillway_router_time_to_first_token_seconds_bucket{destination=\"local\",le=\"+Inf\"} 100\n",
        "spillway_router_time_to_first_token_seconds_count{destination=\"local\"} 100\n",
        "spillway_router_time_to_first_token_seconds_bucket{destination=\"together\",le=\"0.1\"} 0\n",
        "spillway_router_time_to_first_token_seconds_bucket{destination=\"together\",le=\"1.0\"} 0\n",
        "spillway_router_time_to_first_token_seconds_bucket{destination=\"together\",le=\"+Inf\"} 500\n",
    );
    let s = router_sample(page).unwrap().unwrap();
    let b = s.local_ttft.expect("local histogram");
    assert_eq!(b.count(), 100.0);
    // p95 inside (0.1, 1]: 0.1 + 0.9 × 5/8.
    assert!((b.quantile(0.95).unwrap() - 0.6625).abs() < 1e-9);
    // No histogram yet (an older router, or nothing streamed): none, not zero.
    let none = router_sample("spillway_router_queue_length 0\n")
        .unwrap()
        .unwrap();
    assert_eq!(none.local_ttft, None);
    // A broken histogram is no latency reading; the queue still counts.
    let bad = "spillway_router_queue_length 3\nspillway_router_time_to_first_token_seconds_bucket{destination=\"local\",le=\"0.1\"} 5\n";
    let s = router_sample(bad).unwrap().expect("the queue still reads");
    assert_eq!((s.queue, s.local_ttft), (3.0, None));
    let nan = "spillway_router_queue_length 3\nspillway_router_time_to_first_token_seconds_bucket{destination=\"local\",le=\"+Inf\"} NaN\n";
    assert_eq!(router_sample(nan).unwrap().unwrap().local_ttft, None);
}

/// A router's per-revision answers, as the rollout gate reads them: requests of every outcome,
/// errors and 4xx apart, and the time to first token histogram; a malformed one is no reading.
#[test]
fn revision_totals_from_a_router_page() {
    let page = "spillway_router_queue_length{class=\"default\"} 0\n\
        spillway_router_revision_requests_total{revision=\"svc-1a2b3c\",outcome=\"ok\"} 90\n\
        spillway_router_revision_requests_total{revision=\"svc-1a2b3c\",outcome=\"client_error\"} 4\n\
        spillway_router_revision_requests_total{revision=\"svc-1a2b3c\",outcome=\"error\"} 6\n\
        spillway_router_revision_time_to_first_token_seconds_bucket{revision=\"svc-1a2b3c\",le=\"0.1\"} 30\n\
        spillway_router_revision_time_to_first_token_seconds_bucket{revision=\"svc-1a2b3c\",le=\"+Inf\"} 50\n\
        spillway_router_revision_time_to_first_token_seconds_bucket{revision=\"svc-engine\",le=\"0.1\"} 9\n\
        spillway_router_revision_time_to_first_token_seconds_bucket{revision=\"svc-engine\",le=\"+Inf\"} 5\n";
    let s = router_sample(page).unwrap().unwrap();
    let c = &s.revisions["svc-1a2b3c"];
    assert_eq!((c.requests, c.errors, c.client_errors), (100.0, 6.0, 4.0));
    assert_eq!(c.ttft.as_ref().map(|b| b.count()), Some(50.0));
    assert_eq!(
        s.revisions["svc-engine"].ttft, None,
        "counts that go down are no histogram"
    );
}

/// A router's page, rendered by the router's own registry: what providers charged and for how
/// many answers, requests answered locally and waiting by class; from two samples, the price of a slot-second at the
/// providers and the demand of the classes that may not burst.
#[test]
fn spend_and_local_only_demand_from_a_router_page() {
    use crate::router::metrics::{DestinationLabel, ProviderLabel, RouterMetrics};
    use crate::router::outcome::Outcome;
    let m = RouterMetrics::default();
    let slot = |d: &str, seconds: f64, n: usize| {
        let h = m.slot.get_or_create(&DestinationLabel {
            destination: d.into(),
        });
        (0..n).for_each(|_| h.observe(seconds));
    };
    // 10 local answers holding a slot 2 s each, 4 of them `restricted`; 5 sent to a provider
    // that charged 0.01 in all.
    slot("local", 2.0, 10);
    slot("fast", 0.5, 5);
    (0..4).for_each(|_| m.request("local", "restricted", Outcome::Success));
    (0..6).for_each(|_| m.request("local", "standard", Outcome::Success));
    (0..5).for_each(|_| m.request("fast", "standard", Outcome::Success));
    // An error is not charged, so it is no answer to spread the spend over.
    m.request("fast", "standard", Outcome::UpstreamError);
    m.spend
        .get_or_create(&ProviderLabel {
            provider: "fast".into(),
        })
        .inc_by(0.01);
    m.queued("restricted").set(3);
    let prev = router_sample(&m.render()).unwrap().unwrap();
    assert!((prev.spend - 0.01).abs() < 1e-12, "{prev:?}");
    assert_eq!(prev.local_by_class["restricted"], 4.0);
    assert_eq!(
        prev.local_by_class["standard"], 6.0,
        "provider answers are not local"
    );
    assert_eq!(prev.provider_answered, 5.0);
    assert_eq!(prev.queue_by_class["restricted"], 3.0);
    // 0.002 a request over a 2 s hold: 0.001 a slot-second.
    let price = provider_per_slot([&prev]).unwrap();
    assert!((price - 0.001).abs() < 1e-12, "{price}");
    // 8 more restricted answers in 4 s: 2 a second × 2 s = 4 slots, plus 3 waiting.
    slot("local", 2.0, 8);
    (0..8).for_each(|_| m.request("local", "restricted", Outcome::Success));
    let cur = router_sample(&m.render()).unwrap().unwrap();
    let demand = local_only_slots(&prev, 0, &cur, 4_000, &["restricted"]).unwrap();
    assert!((demand - 7.0).abs() < 1e-9, "{demand}");
    assert_eq!(local_only_slots(&prev, 0, &cur, 4_000, &[]), Some(0.0));
    // No spend (no pricing configured), or nothing answered locally yet: no price.
    let unpriced = RouterSample {
        spend: 0.0,
        ..cur.clone()
    };
    assert_eq!(provider_per_slot([&unpriced]), None);
    assert_eq!(provider_per_slot([&RouterSample::default()]), None);
    // As the autoscaler reads it: a price; answers that cost nothing (those providers have
    // no pricing) or no pricing at all: unpriced; nothing answered yet: unmeasured.
    use crate::autoscale::cost::ProviderPrice;
    assert!(
        matches!(provider_price(&[&cur], true), ProviderPrice::PerSlotSecond(p) if (p - 0.001).abs() < 1e-12)
    );
    assert_eq!(provider_price(&[&unpriced], true), ProviderPrice::Unpriced);
    assert_eq!(provider_price(&[&cur], false), ProviderPrice::Unpriced);
    assert_eq!(
        provider_price(&[&RouterSample::default()], true),
        ProviderPrice::Unmeasured
    );
}
