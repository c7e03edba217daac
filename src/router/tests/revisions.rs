//! Revisions through the router: requests split between two revisions' engines by weight, and
//! a revision in its shadow stage gets a mirrored share it answers for nobody.

use std::collections::BTreeMap;

use super::*;
use crate::router::revisions::{Listed, Route};

fn route(name: &str, weight: u32, shadow: u32) -> Route {
    Route {
        name: name.into(),
        weight,
        shadow,
    }
}

/// Two engines of 4 slots: `svc-engine` lists both (its selector spans every engine pod), the
/// candidate's Service `svc-c` the second, which is therefore the candidate's.
async fn setup(
    routes: Vec<Route>,
    candidate_tokens_per_second: f64,
) -> (RouterServer, EngineSimServer, EngineSimServer) {
    let stable = engine(4, 1000.0).await;
    let candidate = engine(4, candidate_tokens_per_second).await;
    let r = router("maxConcurrencyPerBackend: 4\n", vec![]).await;
    let (s, c) = (stable.addr().to_string(), candidate.addr().to_string());
    let listed = Listed {
        by_service: BTreeMap::from([
            ("svc-engine".to_string(), vec![s.clone(), c.clone()]),
            ("svc-c".to_string(), vec![c]),
        ]),
        pods: BTreeMap::new(),
    };
    r.state().set_engine_addrs("svc-engine".into(), listed);
    r.state().set_routes(routes);
    (r, stable, candidate)
}

async fn served(e: &EngineSimServer) -> f64 {
    let t = get(e.addr(), "/metrics").await.text();
    sample(&t, "engine_sim_requests_total{outcome=\"success\"}").unwrap_or(0.0)
}

/// 100 requests in a row from one serving thread: exactly the weights, each measured under
/// its revision.
#[tokio::test]
async fn requests_split_by_weight_and_are_counted_per_revision() {
    bounded(async {
        let (r, stable, candidate) = setup(
            vec![route("svc-engine", 70, 0), route("svc-c", 30, 0)],
            1000.0,
        )
        .await;
        for _ in 0..100 {
            assert_eq!(post(r.addr(), chat(2, false)).await.status, StatusCode::OK);
        }
        assert_eq!(
            (served(&stable).await, served(&candidate).await),
            (70.0, 30.0)
        );
        let t = wait_metrics(&r, |t| {
            sample(
                t,
                "spillway_router_revision_requests_total{revision=\"svc-c\",outcome=\"ok\"}",
            ) == Some(30.0)
        })
        .await;
        assert_eq!(
            sample(
                &t,
                "spillway_router_revision_requests_total{revision=\"svc-engine\",outcome=\"ok\"}"
            ),
            Some(70.0)
        );
        let durations =
            "spillway_router_revision_request_duration_seconds_count{revision=\"svc-c\"}";
        assert_eq!(sample(&t, durations), Some(30.0));
        // Once status no longer lists it, its series go.
        r.state().set_routes(vec![route("svc-engine", 100, 0)]);
        let t = get(r.addr(), "/metrics").await.text();
        assert!(!t.contains("revision=\"svc-c\""), "{t}");
        assert!(t.contains("revision=\"svc-engine\""));
        r.stop().await;
        stable.stop().await.unwrap();
        candidate.stop().await.unwrap();
    })
    .await;
}

/// In its shadow stage the candidate serves no client, gets half the requests mirrored, and
/// each mirrored pair is compared; streamed mirrors give it a time to first token.
#[tokio::test]
async fn a_shadowed_revision_gets_its_share_mirrored_and_compared() {
    bounded(async {
        let (r, stable, candidate) =
            setup(vec![route("svc-engine", 100, 0), route("svc-c", 0, 50)], 1000.0).await;
        for i in 0..100 {
            let reply = post(r.addr(), chat(3, i % 2 == 0)).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
        assert_eq!(served(&stable).await, 100.0, "every client answered by the stable");
        let compared = |t: &str| {
            ["same", "different", "unanswered"]
                .iter()
                .map(|res| {
                    let k = format!(
                        "spillway_router_shadow_requests_total{{revision=\"svc-c\",result=\"{res}\"}}"
                    );
                    sample(t, &k).unwrap_or(0.0)
                })
                .sum::<f64>()
        };
        let t = wait_metrics(&r, |t| compared(t) == 50.0).await;
        assert_eq!(served(&candidate).await, 50.0, "half mirrored");
        assert_eq!(
            sample(&t, "spillway_router_revision_requests_total{revision=\"svc-c\",outcome=\"ok\"}"),
            Some(50.0)
        );
        assert_eq!(
            sample(&t, "spillway_router_shadow_requests_total{revision=\"svc-c\",result=\"unanswered\"}"),
            None
        );
        let streamed = sample(
            &t,
            "spillway_router_revision_time_to_first_token_seconds_count{revision=\"svc-c\"}",
        );
        assert!(streamed.is_some_and(|n| n > 0.0), "{t}");
        r.stop().await;
        stable.stop().await.unwrap();
        candidate.stop().await.unwrap();
    })
    .await;
}

/// A mirror never waits: with the candidate's slots all held, its turn is skipped and the
/// client's request is served as ever.
#[tokio::test]
async fn a_mirror_without_a_free_slot_is_skipped() {
    bounded(async {
        let (r, stable, candidate) = setup(
            vec![route("svc-engine", 100, 0), route("svc-c", 0, 100)],
            10.0,
        )
        .await;
        // Four streams, mirrored to a candidate that answers them for 6 s: its 4 slots held.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(hold_stream(r.addr(), 60).await);
        }
        let reply = post(r.addr(), chat(2, false)).await;
        assert_eq!(reply.status, StatusCode::OK);
        let t = wait_metrics(&r, |t| {
            sample(
                t,
                "spillway_router_shadow_requests_total{revision=\"svc-c\",result=\"skipped\"}",
            ) == Some(1.0)
        })
        .await;
        assert!(t.contains("skipped"));
        drop(held);
        r.stop().await;
        stable.stop().await.unwrap();
        candidate.stop().await.unwrap();
    })
    .await;
}
