//! Two routers in front of one engine, sharing its limit through their exchange (UDP on
//! 127.0.0.1): all of it for the busy one, never more than the stated bound together, and the
//! fixed share when a peer falls silent.

use std::net::UdpSocket;

use super::*;
use crate::router::exchange::{self, Exchange};
use crate::router::peers::ahead;

const PEERS: &str = "peers: {replicas: 2, staleAfterMilliseconds: 300}\n";

struct Pair {
    a: RouterServer,
    b: RouterServer,
    ex_a: Option<Exchange>,
    ex_b: Option<Exchange>,
    udp_b: SocketAddr,
    udp_a: SocketAddr,
}

/// Routers `a` and `b` with config `yaml` (plus `PEERS`) in front of `engine`, each listing
/// the other as its peer, once each has heard the other.
async fn pair(yaml: &str, engine: &EngineSimServer) -> Pair {
    pair_on(yaml, vec![engine.addr().to_string()]).await
}

/// [`pair`] in front of `backends` (none: every request spills).
async fn pair_on(yaml: &str, backends: Vec<String>) -> Pair {
    let yaml = format!("{yaml}{PEERS}");
    let (sa, sb) = (udp(), udp());
    let (udp_a, udp_b) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let a = router(&yaml, backends.clone()).await;
    let b = router(&yaml, backends).await;
    let ex_a = exchange::start(a.state(), sa, "a".into(), &[udp_b.to_string()]).unwrap();
    let ex_b = exchange::start(b.state(), sb, "b".into(), &[udp_a.to_string()]).unwrap();
    until_heard(&a, udp_b).await;
    until_heard(&b, udp_a).await;
    Pair {
        a,
        b,
        ex_a: Some(ex_a),
        ex_b: Some(ex_b),
        udp_a,
        udp_b,
    }
}

fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

fn peer_age(metrics: &str, peer: SocketAddr) -> Option<f64> {
    sample(
        metrics,
        &format!("spillway_router_peer_report_age_seconds{{peer=\"{peer}\"}}"),
    )
}

/// Until `r` has heard `peer` within the last 100 ms.
async fn until_heard(r: &RouterServer, peer: SocketAddr) {
    wait_metrics(r, |t| peer_age(t, peer).is_some_and(|s| s < 0.1)).await;
}

async fn router_metrics(r: &RouterServer) -> String {
    get(r.addr(), "/metrics").await.text()
}

const SPILL: &str = "maxConcurrencyPerBackend: 8\nqueue: {limit: 100, timeoutSeconds: 20}\nburst:\n  mode: Saturated\n  providers:\n";

#[tokio::test]
async fn all_traffic_on_one_router_runs_the_whole_engine_before_anything_spills() {
    bounded(async {
        let keys = TempDir::new("peers-one");
        let key = keys.file("key", "k1");
        let e = engine(8, 20.0).await;
        let p = provider("burst", "k1", FaultConfig::default()).await;
        let yaml = format!("{SPILL}{}", provider_yaml("burst", &p, &key, ""));
        let pair = pair(&yaml, &e).await;
        // Eight streams at once, all to router a: a fixed share would run 4 and spill 4.
        let mut held = Vec::new();
        let opened = futures::future::join_all((0..8).map(|_| hold_stream(pair.a.addr(), 400)));
        held.extend(opened.await);
        assert_eq!(engine_running(&e).await, 8.0);
        let t = router_metrics(&pair.a).await;
        assert_eq!(local_in_flight(&t), 8.0, "{t}");
        // The ninth finds the engine full, in the view of both routers (once b has heard a's
        // last report): it spills.
        assert_eq!(
            served_by(&post(pair.a.addr(), chat(2, false)).await),
            "burst-model"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            served_by(&post(pair.b.addr(), chat(2, false)).await),
            "burst-model"
        );
        let t = router_metrics(&pair.a).await;
        assert_eq!(
            sample(&t, "spillway_router_spilled_with_local_room_total"),
            Some(0.0)
        );
        drop(held);
        pair.stop().await;
        e.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// Short requests on both routers at once, more than the engine takes: the engine, sized to
/// refuse anything past `8 + ahead(8)` (the bound for two routers), refuses nothing.
#[tokio::test]
async fn traffic_on_both_routers_keeps_the_engine_within_the_bound() {
    bounded(async {
        let keys = TempDir::new("peers-both");
        let key = keys.file("key", "k1");
        let e = engine((8 + ahead(8)) as usize, 400.0).await;
        let p = provider("burst", "k1", FaultConfig::default()).await;
        let yaml = format!("{SPILL}{}", provider_yaml("burst", &p, &key, ""));
        let pair = pair(&yaml, &e).await;
        // 12 clients on each router, 15 requests each.
        let clients = (0..24).map(|i| {
            let to = if i % 2 == 0 {
                pair.a.addr()
            } else {
                pair.b.addr()
            };
            async move {
                let mut statuses = Vec::new();
                for _ in 0..15 {
                    statuses.push(post(to, chat(8, false)).await.status);
                }
                statuses
            }
        });
        let statuses: Vec<StatusCode> = futures::future::join_all(clients)
            .await
            .into_iter()
            .flatten()
            .collect();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        let engine_metrics = get(e.addr(), "/metrics").await.text();
        assert_eq!(
            sample(
                &engine_metrics,
                "engine_sim_requests_total{outcome=\"rejected\"}"
            )
            .unwrap_or(0.0),
            0.0,
            "the engine ran more than 8 + {}",
            ahead(8)
        );
        // Both routers used the engine, and the overflow went to the provider.
        let (ta, tb) = (router_metrics(&pair.a).await, router_metrics(&pair.b).await);
        assert!(requests(&ta, "local", None) > 0.0 && requests(&tb, "local", None) > 0.0);
        assert!(requests(&ta, "burst", None) + requests(&tb, "burst", None) > 0.0);
        let peak = sample(&engine_metrics, "engine_sim_peak_running").unwrap();
        eprintln!("engine peak running: {peak}");
        assert!(peak <= f64::from(8 + ahead(8)));
        pair.stop().await;
        e.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A peer that stops reporting counts as using its fixed share (or what it last said, if
/// more): the survivor runs 4 of 8, and all 8 again once the peer is back.
#[tokio::test]
async fn a_silent_peer_leaves_the_survivor_its_fixed_share_until_it_is_back() {
    bounded(async {
        let keys = TempDir::new("peers-silent");
        let key = keys.file("key", "k1");
        let e = engine(8, 20.0).await;
        let p = provider("burst", "k1", FaultConfig::default()).await;
        let yaml = format!("{SPILL}{}", provider_yaml("burst", &p, &key, ""));
        let mut pair = pair(&yaml, &e).await;
        // b runs 2 streams, then falls silent (its exchange stops; its streams go on).
        let on_b = futures::future::join_all((0..2).map(|_| hold_stream(pair.b.addr(), 400))).await;
        until_heard(&pair.a, pair.udp_b).await;
        drop(pair.ex_b.take());
        wait_metrics(&pair.a, |t| {
            peer_age(t, pair.udp_b).is_some_and(|s| s > 0.3)
        })
        .await;
        // a counts b at its share (4, more than the 2 it said): 4 local, the rest spill.
        let on_a = futures::future::join_all((0..6).map(|_| hold_stream(pair.a.addr(), 400))).await;
        let t = router_metrics(&pair.a).await;
        assert_eq!(local_in_flight(&t), 4.0, "{t}");
        assert_eq!(engine_running(&e).await, 6.0);
        assert!(
            sample(&t, "spillway_router_spilled_with_local_room_total").unwrap_or(0.0) >= 1.0,
            "spills while b's last report showed room are counted: {t}"
        );
        drop(on_a);
        drop(on_b);
        wait_metrics(&pair.a, |t| local_in_flight(t) == 0.0).await;
        // b is back (a new process would be the same: a new boot, counts from 0).
        let sb = UdpSocket::bind(pair.udp_b).unwrap();
        pair.ex_b = Some(
            exchange::start(pair.b.state(), sb, "b".into(), &[pair.udp_a.to_string()]).unwrap(),
        );
        until_heard(&pair.a, pair.udp_b).await;
        let on_a = futures::future::join_all((0..8).map(|_| hold_stream(pair.a.addr(), 400))).await;
        let t = router_metrics(&pair.a).await;
        assert_eq!(local_in_flight(&t), 8.0, "{t}");
        drop(on_a);
        pair.stop().await;
        e.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A provider's concurrency is shared like an engine's: one busy router may use all 4 slots
/// (a fixed share would be 2), and the other's request waits while they are taken.
#[tokio::test]
async fn a_providers_concurrency_is_shared_by_both_routers() {
    bounded(async {
        let keys = TempDir::new("peers-provider");
        let key = keys.file("key", "k1");
        let p = provider("burst", "k1", FaultConfig::default()).await;
        let yaml = format!(
            "queue: {{limit: 10, timeoutSeconds: 20}}\nburst:\n  providers:\n{}",
            provider_yaml("burst", &p, &key, "").replace("maxConcurrency: 8", "maxConcurrency: 4")
        );
        let pair = pair_on(&yaml, vec![]).await;
        let on_a =
            futures::future::join_all((0..4).map(|_| hold_stream(pair.a.addr(), 4000))).await;
        let t = router_metrics(&pair.a).await;
        assert_eq!(
            sample(&t, "spillway_router_in_flight{destination=\"burst\"}"),
            Some(4.0),
            "{t}"
        );
        // Once b has heard a's 4 (a reports within a millisecond of a change; before that b
        // could take one more, within the bound), its request waits until a's streams end.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b_addr = pair.b.addr();
        let waiting = tokio::spawn(async move { post(b_addr, chat(1, false)).await });
        until_queued(&pair.b, 1.0).await;
        drop(on_a);
        assert_eq!(served_by(&waiting.await.unwrap()), "burst-model");
        pair.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

/// Both budget caps are shared: requests per minute (4 here; a fixed share would be 2) and
/// spend per hour (what one router spent, the other cannot spend again).
#[tokio::test]
async fn the_burst_budget_is_shared_by_both_routers() {
    bounded(async {
        let keys = TempDir::new("peers-budget");
        let key = keys.file("key", "k1");
        let p = provider("burst", "k1", FaultConfig::default()).await;
        let yaml = |budget: &str, pricing: &str| {
            format!(
                "queue: {{limit: 10, timeoutSeconds: 1}}\nburst:\n  providers:\n{}  budget: {budget}\n",
                provider_yaml("burst", &p, &key, pricing)
            )
        };
        let pair = pair_on(&yaml("{maxRequestsPerMinute: 4}", ""), vec![]).await;
        for _ in 0..4 {
            assert_eq!(served_by(&post(pair.a.addr(), chat(1, false)).await), "burst-model");
        }
        // b hears a's 4 (reported as each was sent): the minute's budget is spent.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reply = post(pair.b.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        pair.stop().await;

        // A dollar per token against $5 an hour: one request costs more than $2.50 (a fixed
        // share), so a second one from a is allowed only by the shared cap, and after it b,
        // which spent nothing, may spend nothing.
        let pricing = ", pricing: {inputPerMillionTokens: 1000000, outputPerMillionTokens: 1000000}";
        let pair = pair_on(&yaml("{maxSpendPerHour: \"5.00\"}", pricing), vec![]).await;
        let spend = |t: &str| {
            sample(t, "spillway_router_provider_spend_total{provider=\"burst\"}").unwrap_or(0.0)
        };
        assert_eq!(served_by(&post(pair.a.addr(), chat(1, false)).await), "burst-model");
        let one = spend(&wait_metrics(&pair.a, |t| spend(t) > 0.0).await);
        assert!(one > 2.5 && one < 5.0, "one request cost {one}");
        assert_eq!(served_by(&post(pair.a.addr(), chat(1, false)).await), "burst-model");
        // b hears a's spend with its next report.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reply = post(pair.b.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        pair.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

/// A peer that reports to a router but never acknowledges it (it does not hear the router,
/// or does not list it yet) is silent to it: the router keeps to its fixed share and spills
/// the rest at once, rather than waiting for acknowledgements that never come.
#[tokio::test]
async fn a_peer_that_never_acknowledges_leaves_the_fixed_share_not_a_wait() {
    bounded(async {
        let keys = TempDir::new("peers-deaf");
        let key = keys.file("key", "k1");
        let e = engine(8, 20.0).await;
        let p = provider("burst", "k1", FaultConfig::default()).await;
        let yaml = format!(
            "{}{}{PEERS}",
            SPILL.replace("timeoutSeconds: 20", "timeoutSeconds: 2"),
            provider_yaml("burst", &p, &key, "")
        );
        let deaf = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (sa, deaf_addr) = (udp(), deaf.local_addr().unwrap());
        let a_udp = sa.local_addr().unwrap();
        let a = router(&yaml, vec![e.addr().to_string()]).await;
        let _ex = exchange::start(a.state(), sa, "a".into(), &[deaf_addr.to_string()]).unwrap();
        // It says it runs nothing, every 20 ms, and acknowledges nothing.
        let talker = tokio::spawn(async move {
            for seq in 1..=500u64 {
                let r = crate::router::peers::Report {
                    from: "deaf".into(),
                    boot: 1,
                    seq,
                    counts: Default::default(),
                    acks: Default::default(),
                };
                let _ = deaf.send_to(&r.encode().unwrap(), a_udp).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        until_heard(&a, deaf_addr).await;
        let held = futures::future::join_all((0..6).map(|_| hold_stream(a.addr(), 400))).await;
        let t = router_metrics(&a).await;
        assert_eq!(local_in_flight(&t), 4.0, "{t}");
        assert_eq!(
            sample(&t, "spillway_router_in_flight{destination=\"burst\"}"),
            Some(2.0),
            "{t}"
        );
        drop(held);
        talker.abort();
        a.stop().await;
        e.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A router is not ready until it has heard every peer it lists (each then counts it), or
/// has waited four staleness bounds for them.
#[tokio::test]
async fn readiness_waits_for_the_listed_peers() {
    bounded(async {
        let e = engine(8, 20.0).await;
        let (sa, silent) = (udp(), udp());
        let yaml = "maxConcurrencyPerBackend: 8\nburst: {mode: Never}\n";
        let a = router(&format!("{yaml}{PEERS}"), vec![e.addr().to_string()]).await;
        let started = Instant::now();
        let _ex = exchange::start(
            a.state(),
            sa,
            "a".into(),
            &[silent.local_addr().unwrap().to_string()],
        )
        .unwrap();
        let r = get(a.addr(), "/readyz").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.text().contains("peer routers"), "{}", r.text());
        loop {
            if get(a.addr(), "/readyz").await.status == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(4 * 300));
        // A pair that hears each other is ready as soon as both have been heard.
        let pair = pair(yaml, &e).await;
        for r in [&pair.a, &pair.b] {
            assert_eq!(get(r.addr(), "/readyz").await.status, StatusCode::OK);
        }
        pair.stop().await;
        a.stop().await;
        e.stop().await.unwrap();
    })
    .await;
}

impl Pair {
    async fn stop(mut self) {
        drop((self.ex_a.take(), self.ex_b.take()));
        self.a.stop().await;
        self.b.stop().await;
    }
}
