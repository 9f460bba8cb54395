//! [`RetryLayer`]: Envoy-style retries for any `tower` HTTP service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower::{BoxError, Layer, Service, ServiceExt};

use super::{CompiledRetryPolicy, Decision, Outcome, ReplayBody, ReplaySource, RetryState};
use crate::circuit_breaker::{ResourceManager, RetryStats};

/// Retries requests to the inner service under a route retry policy, with
/// a cluster's retry limit or budget.
///
/// Errors of the inner service count as resets ([`Outcome::Reset`]); a try
/// that outlives `per_try_timeout` counts as [`Outcome::PerTryTimeout`].
/// When retries are exhausted the last response is returned (or the last
/// error), with the response extension [`mesh_core::ResponseFlag`]
/// `UpstreamRetryLimitExceeded` (`URX`) on a response.
///
/// ```
/// use std::sync::Arc;
/// use mesh_core::policy::{RetryOn, Thresholds};
/// use mesh_filter::circuit_breaker::{ResourceManager, RetryStats};
/// use mesh_filter::retry::{CompiledRetryPolicy, RetryLayer};
///
/// let layer = RetryLayer::new(
///     Arc::new(CompiledRetryPolicy::simple(RetryOn::FIVE_XX, 2)),
///     Arc::new(ResourceManager::unregistered(&Thresholds::default())),
///     RetryStats::default(),
/// );
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer {
    policy: Arc<CompiledRetryPolicy>,
    limits: Arc<ResourceManager>,
    stats: RetryStats,
    buffer_limit: usize,
    attempt_count_header: bool,
}

impl RetryLayer {
    /// Retries under `policy`, limited by `limits` (retry limit or
    /// budget), counting in `stats`. Request bodies are replayed from a
    /// buffer of up to 1 MiB (Envoy's default connection buffer limit).
    pub fn new(
        policy: Arc<CompiledRetryPolicy>,
        limits: Arc<ResourceManager>,
        stats: RetryStats,
    ) -> Self {
        RetryLayer {
            policy,
            limits,
            stats,
            buffer_limit: 1 << 20,
            attempt_count_header: false,
        }
    }

    /// Keeps at most `bytes` of a request body for replay; a longer body is
    /// not retried (`per_request_buffer_limit_bytes`).
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// Sends `x-envoy-attempt-count` with each try
    /// (`include_request_attempt_count`).
    pub fn attempt_count_header(mut self, on: bool) -> Self {
        self.attempt_count_header = on;
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Retry<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready clone serves the first try; later tries wait for
        // readiness of a fresh clone.
        let clone = self.inner.clone();
        let first = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move { run(first, layer, req).await })
    }
}

async fn run<S, B, RB>(
    mut svc: S,
    layer: RetryLayer,
    req: Request<B>,
) -> Result<Response<RB>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
{
    let (mut parts, body) = req.into_parts();
    let mut state = RetryState::new(&layer.policy, &mut parts.headers, true);
    let mut source = ReplaySource::new(body, layer.buffer_limit);
    let mut attempt: u32 = 0;
    let mut first = true;
    // Held from a retry's scheduling until its try ends, as Envoy does.
    let mut retry_permit = None;
    loop {
        attempt += 1;
        let Some(body) = source.body() else {
            return Err("request body too large to retry".into());
        };
        let mut head = parts.clone();
        if layer.attempt_count_header {
            head.headers.insert(
                super::X_ENVOY_ATTEMPT_COUNT.clone(),
                HeaderValue::from(attempt),
            );
        }
        if !first {
            svc = svc.clone();
            svc.ready().await.map_err(Into::into)?;
        }
        first = false;
        let call = svc.call(Request::from_parts(head, body));
        let per_try = state.as_ref().and_then(|s| s.per_try_timeout());
        let result = match per_try {
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(TryTimeout.into()),
            },
            None => call.await.map_err(Into::into),
        };
        let Some(st) = state.as_mut() else {
            return result;
        };
        drop(retry_permit.take());
        let decision = match &result {
            Ok(resp) => st.decide(Outcome::Response(resp.status(), resp.headers())),
            Err(e) if e.is::<TryTimeout>() => st.decide(Outcome::PerTryTimeout),
            Err(_) => st.decide(Outcome::Reset),
        };
        match decision {
            Decision::No => {
                if st.retried() {
                    layer.stats.retry_success.inc();
                }
                return result;
            }
            Decision::LimitExceeded => {
                layer.stats.retry_limit_exceeded.inc();
                return result.map(|mut r| {
                    r.extensions_mut()
                        .insert(mesh_core::ResponseFlag::UpstreamRetryLimitExceeded);
                    r
                });
            }
            Decision::Retry => {
                if !source.can_replay() {
                    return result;
                }
                let Some(permit) = layer.limits.try_retry() else {
                    layer.stats.retry_overflow.inc();
                    return result;
                };
                drop(result);
                layer.stats.retry.inc();
                let wait = st.start_retry();
                if !wait.is_zero() {
                    layer.stats.retry_backoff_exponential.inc();
                    tokio::time::sleep(wait).await;
                }
                retry_permit = Some(permit);
            }
        }
    }
}

/// A try outlived the per-try timeout.
#[derive(Debug)]
pub struct TryTimeout;

impl std::fmt::Display for TryTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("per-try timeout")
    }
}

impl std::error::Error for TryTimeout {}
