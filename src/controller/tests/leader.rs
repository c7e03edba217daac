//! Leader election against a mocked API: the Lease created, followed, taken over.

use super::*;
use crate::controller::leader::{LeaseConfig, try_acquire_or_renew};
use k8s_openapi::api::coordination::v1::Lease;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/spillway-system/leases";

fn setup() -> (kube::Api<Lease>, ApiServer, LeaseConfig) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = kube::Api::namespaced(Client::new(svc, "default"), "spillway-system");
    let cfg = LeaseConfig::new(
        "spillway-controller".into(),
        "spillway-system".into(),
        "pod-a".into(),
    );
    (
        api,
        ApiServer {
            handle,
            events: Vec::new(),
        },
        cfg,
    )
}

fn lease(holder: &str, renewed: jiff::Timestamp, transitions: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "spillway-controller", "namespace": "spillway-system", "resourceVersion": "41"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                        "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                        "leaseTransitions": transitions}})
}

#[tokio::test]
async fn creates_a_missing_lease() {
    let (leases, mut api, cfg) = setup();
    let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
    api.not_found(&format!("{LEASES}/spillway-controller"))
        .await;
    let created = api
        .expect(Method::POST, LEASES, StatusCode::CREATED, Value::Null)
        .await;
    assert_eq!(created.body["spec"]["holderIdentity"], "pod-a");
    assert!(round.await.unwrap().unwrap().held);
}

#[tokio::test]
async fn follows_a_live_lease_without_writing() {
    let (leases, mut api, cfg) = setup();
    let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
    api.expect(
        Method::GET,
        &format!("{LEASES}/spillway-controller"),
        StatusCode::OK,
        lease("pod-b", jiff::Timestamp::now(), 2),
    )
    .await;
    assert!(!round.await.unwrap().unwrap().held);
    api.done().await;
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_optimistic_concurrency() {
    let (leases, mut api, cfg) = setup();
    let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
    let stale = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    api.expect(
        Method::GET,
        &format!("{LEASES}/spillway-controller"),
        StatusCode::OK,
        lease("pod-b", stale, 2),
    )
    .await;
    let put = api
        .expect(
            Method::PUT,
            &format!("{LEASES}/spillway-controller"),
            StatusCode::OK,
            Value::Null,
        )
        .await;
    assert_eq!(
        put.body["metadata"]["resourceVersion"], "41",
        "the write must be conditional on what was read"
    );
    assert_eq!(put.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(put.body["spec"]["leaseTransitions"], 3);
    assert!(round.await.unwrap().unwrap().held);
}

#[tokio::test]
async fn losing_the_race_is_not_leadership() {
    let (leases, mut api, cfg) = setup();
    let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
    let stale = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    api.expect(
        Method::GET,
        &format!("{LEASES}/spillway-controller"),
        StatusCode::OK,
        lease("pod-b", stale, 2),
    )
    .await;
    // Another candidate wrote first: the API server rejects our stale resourceVersion.
    api.expect(
            Method::PUT,
            &format!("{LEASES}/spillway-controller"),
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        )
        .await;
    assert!(!round.await.unwrap().unwrap().held);
}
