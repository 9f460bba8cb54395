use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::policy::{RetryBudget, RetryOn, RetryPolicy, Thresholds};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

use super::*;
use crate::circuit_breaker::{ResourceManager, RetryStats};

type Req = Request<ReplayBody<Full<Bytes>>>;

fn layer(policy: RetryPolicy, t: Thresholds) -> (RetryLayer, RetryStats) {
    let stats = RetryStats::default();
    let l = RetryLayer::new(
        Arc::new(CompiledRetryPolicy::new(&policy).unwrap()),
        Arc::new(ResourceManager::unregistered(&t)),
        stats.clone(),
    );
    (l, stats)
}

fn policy(on: RetryOn, n: u32) -> RetryPolicy {
    RetryPolicy {
        retry_on: on,
        num_retries: n,
        ..RetryPolicy::default()
    }
}

fn status(code: u16) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn request(body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("/x")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_503_is_retried_and_the_body_replayed() {
    let (l, stats) = layer(policy(RetryOn::FIVE_XX, 2), Thresholds::default());
    let (mock, mut handle) = mock::pair::<Req, Response<()>>();
    let mut svc = l.layer(mock);
    let call = tokio::spawn(async move { svc.ready().await.unwrap().call(request("hello")).await });
    for code in [503, 200] {
        let (req, send) = handle.next_request().await.unwrap();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        send.send_response(status(code));
    }
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(stats.retry.get(), 1);
    assert_eq!(stats.retry_success.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_return_the_last_response_flagged_urx() {
    let (l, stats) = layer(policy(RetryOn::GATEWAY_ERROR, 2), Thresholds::default());
    let (mock, mut handle) = mock::pair::<Req, Response<()>>();
    let mut svc = l.layer(mock);
    let call = tokio::spawn(async move { svc.ready().await.unwrap().call(request("")).await });
    for _ in 0..3 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(status(502));
    }
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.extensions().get::<mesh_core::ResponseFlag>(),
        Some(&mesh_core::ResponseFlag::UpstreamRetryLimitExceeded)
    );
    assert_eq!(stats.retry.get(), 2);
    assert_eq!(stats.retry_limit_exceeded.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_non_retriable_status_is_returned_at_once() {
    // gateway-error does not cover 500.
    let (l, stats) = layer(policy(RetryOn::GATEWAY_ERROR, 3), Thresholds::default());
    let (mock, mut handle) = mock::pair::<Req, Response<()>>();
    let mut svc = l.layer(mock);
    let call = tokio::spawn(async move { svc.ready().await.unwrap().call(request("")).await });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(500));
    assert_eq!(call.await.unwrap().unwrap().status(), 500);
    assert_eq!(stats.retry.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_per_try_timeout_is_retried() {
    let mut p = policy(RetryOn::FIVE_XX, 1);
    p.per_try_timeout = Some(Duration::from_millis(100));
    let (l, _) = layer(p, Thresholds::default());
    let (mock, mut handle) = mock::pair::<Req, Response<()>>();
    let mut svc = l.layer(mock);
    let call = tokio::spawn(async move { svc.ready().await.unwrap().call(request("")).await });
    let (_, slow) = handle.next_request().await.unwrap();
    // The first try never answers; after 100 ms the retry goes out.
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    drop(slow);
}

#[tokio::test(start_paused = true)]
async fn the_retry_limit_refuses_a_retry_as_overflow() {
    let t = Thresholds {
        max_retries: 0,
        ..Thresholds::default()
    };
    let (l, stats) = layer(policy(RetryOn::FIVE_XX, 3), t);
    let (mock, mut handle) = mock::pair::<Req, Response<()>>();
    let mut svc = l.layer(mock);
    let call = tokio::spawn(async move { svc.ready().await.unwrap().call(request("")).await });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(503));
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(stats.retry_overflow.get(), 1);
    assert_eq!(stats.retry.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_buffer_limit_is_not_retried() {
    let (l, _) = layer(policy(RetryOn::FIVE_XX, 3), Thresholds::default());
    let l = l.buffer_limit(3);
    let (mock, mut handle) = mock::pair::<Req, Response<()>>();
    let mut svc = l.layer(mock);
    let call = tokio::spawn(async move { svc.ready().await.unwrap().call(request("hello")).await });
    let (req, send) = handle.next_request().await.unwrap();
    // The first try still gets the whole body.
    assert_eq!(req.into_body().collect().await.unwrap().to_bytes(), "hello");
    send.send_response(status(503));
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
}

#[test]
fn request_headers_extend_the_policy_and_are_removed() {
    let p = CompiledRetryPolicy::simple(RetryOn::NONE, 1);
    let mut h = HeaderMap::new();
    h.insert("x-envoy-retry-on", "retriable-4xx,bogus".parse().unwrap());
    h.insert("x-envoy-max-retries", "4".parse().unwrap());
    let mut st = RetryState::new(&p, &mut h, true).unwrap();
    assert!(h.is_empty());
    assert_eq!(st.retry_on(), RetryOn::RETRIABLE_4XX);
    let empty = HeaderMap::new();
    for _ in 0..4 {
        assert_eq!(
            st.decide(Outcome::Response(StatusCode::CONFLICT, &empty)),
            Decision::Retry
        );
    }
    assert_eq!(
        st.decide(Outcome::Response(StatusCode::CONFLICT, &empty)),
        Decision::LimitExceeded
    );
    // Untrusted: removed but not honoured.
    let mut h = HeaderMap::new();
    h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
    assert!(RetryState::new(&p, &mut h, false).is_none());
    assert!(h.is_empty());
}

#[test]
fn conditions_match_envoy() {
    let p = CompiledRetryPolicy::simple(RetryOn::CONNECT_FAILURE, 1);
    let st = RetryState::new(&p, &mut HeaderMap::new(), true).unwrap();
    assert!(st.would_retry(Outcome::ConnectFailure));
    assert!(!st.would_retry(Outcome::Reset));
    assert!(!st.would_retry(Outcome::PerTryTimeout));

    let p = CompiledRetryPolicy::simple(RetryOn::RESET, 1);
    let st = RetryState::new(&p, &mut HeaderMap::new(), true).unwrap();
    assert!(st.would_retry(Outcome::Reset));
    assert!(st.would_retry(Outcome::ConnectFailure));
    let h = HeaderMap::new();
    assert!(!st.would_retry(Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &h)));

    let p = CompiledRetryPolicy::simple(RetryOn::FIVE_XX, 1);
    let st = RetryState::new(&p, &mut HeaderMap::new(), true).unwrap();
    let mut overloaded = HeaderMap::new();
    overloaded.insert("x-envoy-overloaded", "true".parse().unwrap());
    assert!(!st.would_retry(Outcome::Response(
        StatusCode::SERVICE_UNAVAILABLE,
        &overloaded
    )));

    let p = CompiledRetryPolicy::simple(RetryOn::GRPC_UNAVAILABLE, 1);
    let st = RetryState::new(&p, &mut HeaderMap::new(), true).unwrap();
    let mut grpc = HeaderMap::new();
    grpc.insert("grpc-status", "14".parse().unwrap());
    assert!(st.would_retry(Outcome::Response(StatusCode::OK, &grpc)));
    grpc.insert("grpc-status", "4".parse().unwrap());
    assert!(!st.would_retry(Outcome::Response(StatusCode::OK, &grpc)));

    let mut rp = policy(RetryOn::RETRIABLE_STATUS_CODES, 1);
    rp.retriable_status_codes = vec![418];
    let p = CompiledRetryPolicy::new(&rp).unwrap();
    let st = RetryState::new(&p, &mut HeaderMap::new(), true).unwrap();
    assert!(st.would_retry(Outcome::Response(StatusCode::IM_A_TEAPOT, &h)));
    assert!(!st.would_retry(Outcome::Response(StatusCode::BAD_GATEWAY, &h)));
}

#[test]
fn backoff_is_jittered_exponential_and_capped() {
    let mut b = Backoff::new(Duration::from_millis(25), Duration::from_millis(250));
    let caps = [25, 50, 100, 200, 250, 250];
    for cap in caps {
        let d = b.next_backoff();
        assert!(d < Duration::from_millis(cap), "{d:?} >= {cap}ms");
    }
}

#[tokio::test(start_paused = true)]
async fn the_budget_limits_concurrent_retries() {
    let t = Thresholds {
        retry_budget: Some(RetryBudget {
            budget_percent: 50.0,
            min_retry_concurrency: 0,
        }),
        ..Thresholds::default()
    };
    let m = Arc::new(ResourceManager::unregistered(&t));
    // Two active requests: 50 % allows one retry in flight.
    let _a = m.requests.acquire();
    let _b = m.requests.acquire();
    let first = m.try_retry();
    assert!(first.is_some());
    assert!(m.try_retry().is_none());
    drop(first);
    assert!(m.try_retry().is_some());
}
