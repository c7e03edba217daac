//! The metric names each preset serves.

use super::*;

#[tokio::test]
async fn every_preset_serves_its_metric_names() {
    bounded(async {
        use crate::api::MetricsPreset;
        for (preset, names) in [
            (
                MetricsPreset::Vllm,
                &[
                    "vllm:num_requests_waiting{model_name=\"m1\"}",
                    "vllm:num_requests_running{model_name=\"m1\"}",
                    "vllm:gpu_cache_usage_perc{model_name=\"m1\"}",
                    "vllm:kv_cache_usage_perc{model_name=\"m1\"}",
                ][..],
            ),
            (
                MetricsPreset::Sglang,
                &[
                    "sglang:num_queue_reqs{",
                    "sglang:num_running_reqs{",
                    "sglang:token_usage{",
                ][..],
            ),
            (
                MetricsPreset::Tgi,
                &["tgi_queue_size ", "tgi_batch_current_size "][..],
            ),
            (
                MetricsPreset::Triton,
                &[
                    "nv_inference_pending_request_count{",
                    "nv_gpu_memory_used_bytes{",
                    "nv_gpu_memory_total_bytes{",
                ][..],
            ),
        ] {
            let srv = EngineSimServer::start(EngineSimConfig { preset, ..fast() })
                .await
                .unwrap();
            let r = get(srv.addr(), "/metrics").await;
            assert!(
                r.headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("application/openmetrics-text")
            );
            let t = r.text();
            for name in names {
                assert_eq!(
                    sample(&t, name),
                    if name.starts_with("nv_gpu_memory_total") {
                        80.0 * (1u64 << 30) as f64
                    } else {
                        0.0
                    },
                    "{name}"
                );
            }
            srv.stop().await.unwrap();
        }
    })
    .await
}

#[tokio::test]
async fn same_seed_gives_same_text() {
    bounded(async {
        let mut texts = Vec::new();
        for seed in [1, 1, 2] {
            let srv = EngineSimServer::start(EngineSimConfig { seed, ..fast() })
                .await
                .unwrap();
            let r = post_json(srv.addr(), "/v1/chat/completions", chat(8, false)).await;
            texts.push(
                r.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            srv.stop().await.unwrap();
        }
        assert_eq!(texts[0], texts[1]);
        assert_ne!(texts[0], texts[2]);
    })
    .await
}
