//! mesh-filter's retry layer in a plain tower stack, without the proxy.
//!
//! A flaky in-process service fails every other request with 503. Wrapped
//! in `RetryLayer` (Envoy's `retry_on: 5xx`, `num_retries: 2`, with a
//! cluster retry budget), every call succeeds, and the retry stats show how
//! many retries it took. A request body is replayed on each try.
//!
//! Run: `cargo run -p mesh-examples --example resilient_client`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::policy::{RetryBudget, RetryOn, RetryPolicy, Thresholds};
use mesh_filter::circuit_breaker::{ResourceManager, RetryStats};
use mesh_filter::retry::{CompiledRetryPolicy, ReplayBody, RetryLayer};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

type Body = ReplayBody<Full<Bytes>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    // Fails every odd call; echoes the body length otherwise.
    let flaky = service_fn(move |req: Request<Body>| {
        let n = seen.fetch_add(1, Ordering::Relaxed);
        async move {
            let body = req.into_body().collect().await.map_err(|e| e.to_string())?;
            let len = body.to_bytes().len();
            let mut resp = Response::new(format!("got {len} bytes on call {n}"));
            if n % 2 == 0 {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, BoxError>(resp)
        }
    });

    let policy = RetryPolicy {
        retry_on: RetryOn::FIVE_XX,
        num_retries: 2,
        ..RetryPolicy::default()
    };
    let limits = ResourceManager::unregistered(&Thresholds {
        retry_budget: Some(RetryBudget::default()),
        ..Thresholds::default()
    });
    let stats = RetryStats::default();
    let layer = RetryLayer::new(
        Arc::new(CompiledRetryPolicy::new(&policy)?),
        Arc::new(limits),
        stats.clone(),
    );
    let mut svc = layer.layer(flaky);

    for i in 0..3 {
        let req =
            Request::post("/orders").body(Full::new(Bytes::from(vec![b'x'; 100 * (i + 1)])))?;
        let resp = svc.ready().await?.call(req).await?;
        println!("{} {}", resp.status(), resp.body());
    }
    println!(
        "upstream calls: {}, retries: {}, retried successes: {}",
        calls.load(Ordering::Relaxed),
        stats.retry.get(),
        stats.retry_success.get()
    );
    Ok(())
}
