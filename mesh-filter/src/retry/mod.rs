//! Retries with Envoy's semantics: which outcomes are retriable
//! (`retry_on`), how many retries (`num_retries`), how long to wait between
//! tries (fully jittered exponential back-off), and the request headers that
//! change the policy per request (`x-envoy-retry-on`,
//! `x-envoy-retry-grpc-on`, `x-envoy-max-retries`,
//! `x-envoy-retriable-status-codes`).
//!
//! Why a retry *limit* and a *budget* both? `num_retries` bounds what one
//! request may cost; the cluster's retry limit (`max_retries`, or a
//! `retry_budget` as a share of active requests) bounds what all requests
//! together may cost, so that an upstream that fails every request sees at
//! most a bounded multiple of the offered load instead of a retry storm.
//! The budget lives in [`crate::circuit_breaker::ResourceManager`].
//!
//! The pieces:
//! - [`CompiledRetryPolicy`]: a route's policy, compiled once;
//! - [`RetryState`]: one request's state — the effective conditions,
//!   retries left, and the back-off;
//! - [`Outcome`]: what ended one try, as the retry decision sees it;
//! - [`ReplayBody`]: a request body that can be sent again, from a bounded
//!   buffer;
//! - [`RetryLayer`]: all of it as a `tower` layer for any HTTP service.
//!
//! The decision, per try:
//!
//! ```text
//! try ends ──► would_retry(outcome)? ── no ──► done (a retry before it succeeded: retry_success)
//!                   │ yes
//!                   ▼
//!           retries left? ── no ──► done, response flag URX (retry_limit_exceeded)
//!                   │ yes
//!                   ▼
//!           budget/limit allows? ── no ──► done (retry_overflow)
//!                   │ yes
//!                   ▼
//!           back off (jittered), then try again
//! ```

mod body;
mod layer;

use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode};
pub use mesh_core::policy::CompiledRetryPolicy;
use mesh_core::policy::RetryOn;

use crate::fault::View;

pub use body::{ReplayBody, ReplayError, ReplaySource};
pub use layer::{Retry, RetryLayer};

/// `x-envoy-retry-on`.
pub static X_ENVOY_RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
/// `x-envoy-retry-grpc-on`.
pub static X_ENVOY_RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
/// `x-envoy-max-retries`.
pub static X_ENVOY_MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
/// `x-envoy-retriable-status-codes`.
pub static X_ENVOY_RETRIABLE_STATUS_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");
/// `x-envoy-attempt-count`.
pub static X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
/// `x-envoy-overloaded`: a response carrying it is never retried.
pub static X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
/// `x-envoy-ratelimited`: retried only with `envoy-ratelimited`.
pub static X_ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// What ended one try, as the retry decision sees it.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Response headers arrived.
    Response(StatusCode, &'a HeaderMap),
    /// The connection could not be made (nothing was sent).
    ConnectFailure,
    /// The connection or stream ended before the response headers.
    Reset,
    /// The HTTP/2 stream was refused (REFUSED_STREAM).
    RefusedStream,
    /// The per-try timeout passed before the response headers.
    PerTryTimeout,
    /// The try failed in a way that is never retried (a bad request body,
    /// the downstream going away).
    Fatal,
}

/// Envoy's fully jittered exponential back-off: the n-th wait is uniform in
/// `[0, min(base × 2^(n-1), max))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `base`, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            next: base.max(Duration::from_millis(1)),
            max: max.max(base),
        }
    }

    /// The next wait.
    pub fn next_backoff(&mut self) -> Duration {
        let current = self.next;
        self.next = if current < self.max / 2 {
            current * 2
        } else {
            self.max
        };
        let ms = current.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(0..ms)).min(self.max)
    }
}

/// One request's retry state.
#[derive(Debug)]
pub struct RetryState<'p> {
    policy: &'p CompiledRetryPolicy,
    retry_on: RetryOn,
    remaining: u32,
    extra_codes: Vec<u16>,
    backoff: Backoff,
    retried: bool,
}

/// What to do after a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The outcome is final (not retriable).
    No,
    /// Retriable, but no retry is left: Envoy's `URX`.
    LimitExceeded,
    /// Retriable, with a retry left; the caller still has to get a permit
    /// from the retry limit or budget.
    Retry,
}

impl<'p> RetryState<'p> {
    /// The state of a request with `headers` under `policy`. Reads (and
    /// removes, as Envoy does) the `x-envoy-retry-*` request headers; they
    /// are honoured only when `trust_headers`. `None` when no retry can
    /// happen.
    pub fn new(
        policy: &'p CompiledRetryPolicy,
        headers: &mut HeaderMap,
        trust_headers: bool,
    ) -> Option<Self> {
        let mut retry_on = policy.config.retry_on;
        let mut remaining = policy.config.num_retries;
        let mut extra_codes = Vec::new();
        let has_headers = headers.contains_key(&X_ENVOY_RETRY_ON)
            || headers.contains_key(&X_ENVOY_RETRY_GRPC_ON)
            || headers.contains_key(&X_ENVOY_MAX_RETRIES)
            || headers.contains_key(&X_ENVOY_RETRIABLE_STATUS_CODES);
        if has_headers {
            if trust_headers {
                let text = |h: &HeaderName| {
                    headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                if let Some(v) = text(&X_ENVOY_RETRY_ON) {
                    retry_on = retry_on | RetryOn::parse(&v, false).0;
                }
                if let Some(v) = text(&X_ENVOY_RETRY_GRPC_ON) {
                    retry_on = retry_on | RetryOn::parse(&v, true).0;
                }
                if !retry_on.is_empty() {
                    if let Some(n) = text(&X_ENVOY_MAX_RETRIES).and_then(|v| v.trim().parse().ok())
                    {
                        remaining = n;
                    }
                }
                if let Some(v) = text(&X_ENVOY_RETRIABLE_STATUS_CODES) {
                    extra_codes = v
                        .split(',')
                        .filter_map(|c| c.trim().parse::<u16>().ok())
                        .collect();
                }
            }
            headers.remove(&X_ENVOY_RETRY_ON);
            headers.remove(&X_ENVOY_RETRY_GRPC_ON);
            headers.remove(&X_ENVOY_MAX_RETRIES);
            headers.remove(&X_ENVOY_RETRIABLE_STATUS_CODES);
        }
        if retry_on.is_empty() || remaining == 0 {
            return None;
        }
        if !policy.retriable_request_headers.is_empty() {
            let view = View(headers);
            if !policy
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(&view))
            {
                return None;
            }
        }
        Some(RetryState {
            policy,
            retry_on,
            remaining,
            extra_codes,
            backoff: Backoff::new(policy.config.base_interval, policy.config.max_interval),
            retried: false,
        })
    }

    /// The effective conditions.
    pub fn retry_on(&self) -> RetryOn {
        self.retry_on
    }

    /// Whether a retry has been made.
    pub fn retried(&self) -> bool {
        self.retried
    }

    /// Whether `outcome` is retriable under the effective conditions.
    pub fn would_retry(&self, outcome: Outcome<'_>) -> bool {
        let on = self.retry_on;
        match outcome {
            Outcome::Fatal => false,
            Outcome::ConnectFailure => on.any(
                RetryOn::FIVE_XX
                    | RetryOn::GATEWAY_ERROR
                    | RetryOn::RESET
                    | RetryOn::CONNECT_FAILURE
                    | RetryOn::RESET_BEFORE_REQUEST,
            ),
            Outcome::Reset | Outcome::PerTryTimeout => {
                on.any(RetryOn::FIVE_XX | RetryOn::GATEWAY_ERROR | RetryOn::RESET)
            }
            Outcome::RefusedStream => on.any(
                RetryOn::FIVE_XX
                    | RetryOn::GATEWAY_ERROR
                    | RetryOn::RESET
                    | RetryOn::REFUSED_STREAM,
            ),
            Outcome::Response(status, headers) => self.would_retry_response(status, headers),
        }
    }

    fn would_retry_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let on = self.retry_on;
        if headers.contains_key(&X_ENVOY_OVERLOADED) {
            return false;
        }
        if headers.contains_key(&X_ENVOY_RATELIMITED) {
            return on.any(RetryOn::ENVOY_RATELIMITED);
        }
        let code = status.as_u16();
        if on.any(RetryOn::FIVE_XX) && status.is_server_error() {
            return true;
        }
        if on.any(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504) {
            return true;
        }
        if on.any(RetryOn::RETRIABLE_4XX) && code == 409 {
            return true;
        }
        if on.any(RetryOn::RETRIABLE_STATUS_CODES)
            && (self.policy.config.retriable_status_codes.contains(&code)
                || self.extra_codes.contains(&code))
        {
            return true;
        }
        if on.any(RetryOn::RETRIABLE_HEADERS) {
            let view = View(headers);
            if self
                .policy
                .retriable_headers
                .iter()
                .any(|m| m.matches(&view))
            {
                return true;
            }
        }
        const GRPC: RetryOn = RetryOn(
            RetryOn::GRPC_CANCELLED.0
                | RetryOn::GRPC_DEADLINE_EXCEEDED.0
                | RetryOn::GRPC_RESOURCE_EXHAUSTED.0
                | RetryOn::GRPC_UNAVAILABLE.0
                | RetryOn::GRPC_INTERNAL.0,
        );
        if on.any(GRPC) {
            // A trailers-only gRPC response carries grpc-status in its
            // headers.
            let grpc = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            let bit = match grpc {
                Some(1) => RetryOn::GRPC_CANCELLED,
                Some(4) => RetryOn::GRPC_DEADLINE_EXCEEDED,
                Some(8) => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                Some(13) => RetryOn::GRPC_INTERNAL,
                Some(14) => RetryOn::GRPC_UNAVAILABLE,
                _ => RetryOn::NONE,
            };
            if on.any(bit) {
                return true;
            }
        }
        false
    }

    /// The decision after a try ended with `outcome`. A `Retry` decision
    /// uses up one retry.
    pub fn decide(&mut self, outcome: Outcome<'_>) -> Decision {
        if !self.would_retry(outcome) {
            return Decision::No;
        }
        if self.remaining == 0 {
            return Decision::LimitExceeded;
        }
        self.remaining -= 1;
        Decision::Retry
    }

    /// Records that a retry is made and returns how long to wait first.
    pub fn start_retry(&mut self) -> Duration {
        self.retried = true;
        self.backoff.next_backoff()
    }

    /// The per-try timeout.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.policy.config.per_try_timeout
    }

    /// The per-try idle timeout.
    pub fn per_try_idle_timeout(&self) -> Option<Duration> {
        self.policy.config.per_try_idle_timeout
    }

    /// Whether retries avoid endpoints already tried, and how many picks
    /// may be made to find one.
    pub fn host_selection(&self) -> (bool, u32) {
        (
            self.policy.config.previous_hosts,
            self.policy.config.host_selection_retry_max_attempts.max(1),
        )
    }
}

#[cfg(test)]
mod tests;
