//! Local rate limiting (`envoy.filters.http.local_ratelimit`): a token
//! bucket per rule, shared by every worker thread, answering 429 when
//! empty.
//!
//! Why one bucket per rule and not per thread? A per-thread bucket lets
//! `N` workers admit `N ×` the configured rate, and how much gets through
//! then depends on how connections land on threads. One shared bucket
//! admits the configured rate whatever the thread count. It is lock-free:
//! the bucket is a single atomic timestamp (the "empty at" time, as in
//! Envoy's atomic token bucket), refilled continuously at
//! `tokens_per_fill / fill_interval` up to `max_tokens`, and a request
//! takes a token with one compare-and-swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use mesh_core::policy::{
    FractionalPercent, LocalRateLimitConfig, NetworkLocalRateLimit, TokenBucketConfig,
};
use mesh_core::stats::{Counter, Store};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::descriptors::Descriptor;

/// A token bucket refilled continuously, shared by any number of threads.
#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: u64,
    /// Nanoseconds per token.
    nanos_per_token: u64,
    /// The time (nanoseconds since `origin`) at which the bucket would hold
    /// zero tokens; the tokens now are `(now - empty_at) / nanos_per_token`
    /// capped at `max_tokens`.
    empty_at: AtomicU64,
    origin: Instant,
    fill_interval: Duration,
}

impl TokenBucket {
    /// A full bucket of `max_tokens`, gaining `tokens_per_fill` every
    /// `fill_interval`.
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Self {
        let per_token = fill_interval.as_nanos() / u128::from(tokens_per_fill.max(1));
        let nanos_per_token = u64::try_from(per_token).unwrap_or(u64::MAX).max(1);
        TokenBucket {
            max_tokens: u64::from(max_tokens),
            nanos_per_token,
            empty_at: AtomicU64::new(0),
            origin: Instant::now(),
            fill_interval,
        }
    }

    /// Nanoseconds since the origin, plus a full bucket's worth so that the
    /// bucket starts full (empty at 0).
    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        elapsed.saturating_add(self.max_tokens.saturating_mul(self.nanos_per_token))
    }

    /// Takes one token if there is one.
    pub fn try_consume(&self) -> bool {
        let now = self.now();
        let span = self.max_tokens.saturating_mul(self.nanos_per_token);
        let mut current = self.empty_at.load(Ordering::Relaxed);
        loop {
            // Never more than max_tokens: a bucket idle for long is full.
            let empty_at = current.max(now.saturating_sub(span));
            let next = empty_at.saturating_add(self.nanos_per_token);
            if next > now {
                return false;
            }
            match self.empty_at.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(v) => current = v,
            }
        }
    }

    /// Tokens left now.
    pub fn remaining(&self) -> u64 {
        let now = self.now();
        let empty_at = self.empty_at.load(Ordering::Relaxed);
        (now.saturating_sub(empty_at) / self.nanos_per_token).min(self.max_tokens)
    }

    /// How long until the next token arrives (zero while tokens remain).
    pub fn next_token_in(&self) -> Duration {
        let now = self.now();
        let empty_at = self.empty_at.load(Ordering::Relaxed);
        let next = empty_at
            .max(now.saturating_sub(self.max_tokens.saturating_mul(self.nanos_per_token)))
            .saturating_add(self.nanos_per_token);
        Duration::from_nanos(next.saturating_sub(now))
    }

    /// `max_tokens`.
    pub fn max_tokens(&self) -> u64 {
        self.max_tokens
    }

    /// `fill_interval`.
    pub fn fill_interval(&self) -> Duration {
        self.fill_interval
    }
}

/// Envoy's `http_local_rate_limit` stats of one filter.
#[derive(Debug, Clone, Default)]
pub struct LocalRateLimitStats {
    /// `enabled`: requests the limit was checked for.
    pub enabled: Counter,
    /// `enforced`: requests refused with 429.
    pub enforced: Counter,
    /// `rate_limited`: requests over the limit (enforced or not).
    pub rate_limited: Counter,
    /// `ok`: requests under the limit.
    pub ok: Counter,
}

impl LocalRateLimitStats {
    /// Registers `<stat_prefix>.http_local_rate_limit.*` under Envoy's
    /// Prometheus names (`envoy_http_local_rate_limit_ok{envoy_local_http_ratelimit_prefix=...}`).
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let l = vec![("envoy_local_http_ratelimit_prefix", stat_prefix.to_owned())];
        // Envoy has it too; mesh has no runtime shadow mode, so it stays 0.
        store.counter("envoy_http_local_rate_limit_shadow_mode", &l);
        LocalRateLimitStats {
            enabled: store.counter("envoy_http_local_rate_limit_enabled", &l),
            enforced: store.counter("envoy_http_local_rate_limit_enforced", &l),
            rate_limited: store.counter("envoy_http_local_rate_limit_rate_limited", &l),
            ok: store.counter("envoy_http_local_rate_limit_ok", &l),
        }
    }
}

/// One configured limit: its bucket, switches and replies.
#[derive(Debug)]
pub struct LocalRateLimiter {
    /// The configuration.
    pub config: LocalRateLimitConfig,
    bucket: Option<TokenBucket>,
    /// `descriptors` and their buckets, slowest-filling first (the order
    /// Envoy takes their tokens in).
    descriptors: Vec<(Descriptor, TokenBucket)>,
    stats: LocalRateLimitStats,
    status: StatusCode,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The filter is not enabled for this request.
    Skipped,
    /// Under the limit.
    Allowed,
    /// Over the limit, but not enforced: let through.
    Shadowed,
    /// Over the limit: answer with the limiter's status (429).
    Limited,
}

fn roll(p: &FractionalPercent) -> bool {
    if p.numerator >= p.denominator {
        return true;
    }
    p.numerator > 0 && fastrand::u32(0..p.denominator) < p.numerator
}

impl LocalRateLimiter {
    /// A limiter for `config`, counting in `stats`.
    pub fn new(config: &LocalRateLimitConfig, stats: LocalRateLimitStats) -> Self {
        let bucket = |t: &TokenBucketConfig| {
            TokenBucket::new(t.max_tokens, t.tokens_per_fill, t.fill_interval)
        };
        let mut descriptors: Vec<(Descriptor, TokenBucket)> = config
            .descriptors
            .iter()
            .map(|d| (d.entries.clone(), bucket(&d.token_bucket)))
            .collect();
        descriptors.sort_by_key(|(_, b)| std::cmp::Reverse(b.nanos_per_token));
        LocalRateLimiter {
            bucket: config.token_bucket.as_ref().map(bucket),
            descriptors,
            status: StatusCode::from_u16(config.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            config: config.clone(),
            stats,
        }
    }

    /// Checks (and takes a token for) one request.
    pub fn check(&self) -> Verdict {
        self.check_descriptors(&[]).0
    }

    /// Whether the limiter has `descriptors` (so the request's descriptors
    /// are worth computing).
    pub fn has_descriptors(&self) -> bool {
        !self.descriptors.is_empty()
    }

    /// Checks one request with its descriptors, as Envoy does: every
    /// configured descriptor among them gives a token, slowest-filling
    /// first, stopping at the first empty bucket; then the default bucket
    /// gives one when no descriptor matched or
    /// `always_consume_default_token_bucket` is set. Also returns the bucket
    /// the `x-ratelimit-*` headers describe.
    pub fn check_descriptors(&self, request: &[Descriptor]) -> (Verdict, Option<&TokenBucket>) {
        if !roll(&self.config.filter_enabled) {
            return (Verdict::Skipped, None);
        }
        self.stats.enabled.inc();
        let mut matched: Vec<&TokenBucket> = Vec::new();
        if !self.descriptors.is_empty() {
            for d in request {
                if let Some((_, b)) = self.descriptors.iter().find(|(e, _)| e == d) {
                    matched.push(b);
                }
            }
            matched.sort_by_key(|b| std::cmp::Reverse(b.nanos_per_token));
        }
        let mut verdict = (true, matched.first().copied());
        if let Some(empty) = matched.iter().find(|b| !b.try_consume()) {
            verdict = (false, Some(*empty));
        } else if matched.is_empty() || self.config.always_consume_default_token_bucket {
            if let Some(b) = &self.bucket {
                verdict = (b.try_consume(), Some(b));
            }
        }
        let (allowed, bucket) = verdict;
        if allowed {
            self.stats.ok.inc();
            return (Verdict::Allowed, bucket);
        }
        self.stats.rate_limited.inc();
        if roll(&self.config.filter_enforced) {
            self.stats.enforced.inc();
            (Verdict::Limited, bucket)
        } else {
            (Verdict::Shadowed, bucket)
        }
    }

    /// The status of a limited request (429 unless `status` is set).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `x-ratelimit-*` headers (`enable_x_ratelimit_headers:
    /// DRAFT_VERSION_03`), when enabled: limit, remaining, reset (seconds).
    /// `bucket` is the one [`Self::check_descriptors`] returned; the reset
    /// is the whole seconds until its next token.
    pub fn rate_limit_headers(
        &self,
        bucket: Option<&TokenBucket>,
    ) -> Option<[(HeaderValue, &'static str); 3]> {
        if !self.config.x_ratelimit_headers {
            return None;
        }
        let b = bucket?;
        let reset = b.next_token_in().as_secs();
        Some([
            (HeaderValue::from(b.max_tokens()), "x-ratelimit-limit"),
            (HeaderValue::from(b.remaining()), "x-ratelimit-remaining"),
            (HeaderValue::from(reset), "x-ratelimit-reset"),
        ])
    }
}

/// [`LocalRateLimiter`] as a `tower` layer: requests over the limit get the
/// limiter's status (429) with body `local_rate_limited` without reaching
/// the inner service.
#[derive(Debug, Clone)]
pub struct LocalRateLimitLayer {
    limiter: Arc<LocalRateLimiter>,
}

impl LocalRateLimitLayer {
    /// Limits with `limiter` (share the `Arc` to share the bucket).
    pub fn new(limiter: Arc<LocalRateLimiter>) -> Self {
        LocalRateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for LocalRateLimitLayer {
    type Service = LocalRateLimit<S>;
    fn layer(&self, inner: S) -> LocalRateLimit<S> {
        LocalRateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service made by [`LocalRateLimitLayer`].
#[derive(Debug, Clone)]
pub struct LocalRateLimit<S> {
    inner: S,
    limiter: Arc<LocalRateLimiter>,
}

impl<S, B, RB> Service<Request<B>> for LocalRateLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: From<&'static str> + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.limiter.check() == Verdict::Limited {
            let mut r = Response::new(RB::from("local_rate_limited"));
            *r.status_mut() = self.limiter.status();
            r.extensions_mut()
                .insert(mesh_core::ResponseFlag::RateLimited);
            return Box::pin(async move { Ok(r) });
        }
        Box::pin(self.inner.call(req))
    }
}

/// `envoy.filters.network.local_ratelimit`: one token per connection of a
/// filter chain, from a bucket shared by every worker thread.
#[derive(Debug)]
pub struct ConnectionRateLimiter {
    bucket: TokenBucket,
    enabled: bool,
    rate_limited: Counter,
}

impl ConnectionRateLimiter {
    /// A limiter for `config`, counting refused connections in
    /// `local_rate_limit.<stat_prefix>.rate_limited` (Prometheus
    /// `envoy_local_rate_limit_rate_limited{envoy_local_network_ratelimit_prefix=...}`).
    pub fn new(config: &NetworkLocalRateLimit, store: &Store) -> Self {
        let t = config.token_bucket;
        ConnectionRateLimiter {
            bucket: TokenBucket::new(t.max_tokens, t.tokens_per_fill, t.fill_interval),
            enabled: config.enabled,
            rate_limited: store.counter(
                "envoy_local_rate_limit_rate_limited",
                &[(
                    "envoy_local_network_ratelimit_prefix",
                    config.stat_prefix.clone(),
                )],
            ),
        }
    }

    /// Whether a new connection may go on (takes a token); a refused one
    /// is counted.
    pub fn admit(&self) -> bool {
        if !self.enabled || self.bucket.try_consume() {
            return true;
        }
        self.rate_limited.inc();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max: u32, per_fill: u32, every: Duration) -> LocalRateLimiter {
        LocalRateLimiter::new(
            &LocalRateLimitConfig {
                token_bucket: Some(TokenBucketConfig {
                    max_tokens: max,
                    tokens_per_fill: per_fill,
                    fill_interval: every,
                }),
                filter_enabled: FractionalPercent::HUNDRED,
                filter_enforced: FractionalPercent::HUNDRED,
                ..LocalRateLimitConfig::default()
            },
            LocalRateLimitStats::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_starts_full_and_refills_at_the_rate() {
        let l = limiter(3, 1, Duration::from_secs(1));
        for _ in 0..3 {
            assert_eq!(l.check(), Verdict::Allowed);
        }
        assert_eq!(l.check(), Verdict::Limited);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(l.check(), Verdict::Limited);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(l.check(), Verdict::Allowed);
        assert_eq!(l.check(), Verdict::Limited);
        // Idle for long: full again, never more than max_tokens.
        tokio::time::advance(Duration::from_secs(100)).await;
        let allowed = (0..10).filter(|_| l.check() == Verdict::Allowed).count();
        assert_eq!(allowed, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn threads_share_one_bucket() {
        let l = Arc::new(limiter(100, 100, Duration::from_secs(3600)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..100).filter(|_| l.check() == Verdict::Allowed).count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn disabled_and_shadow_modes() {
        let mut cfg = LocalRateLimitConfig {
            token_bucket: Some(TokenBucketConfig {
                max_tokens: 1,
                tokens_per_fill: 1,
                fill_interval: Duration::from_secs(3600),
            }),
            ..LocalRateLimitConfig::default()
        };
        // Envoy's defaults: enabled 0 %, so nothing is checked.
        let l = LocalRateLimiter::new(&cfg, LocalRateLimitStats::default());
        assert_eq!(l.check(), Verdict::Skipped);
        cfg.filter_enabled = FractionalPercent::HUNDRED;
        let stats = LocalRateLimitStats::default();
        let l = LocalRateLimiter::new(&cfg, stats.clone());
        assert_eq!(l.check(), Verdict::Allowed);
        assert_eq!(l.check(), Verdict::Shadowed);
        assert_eq!(stats.rate_limited.get(), 1);
        assert_eq!(stats.enforced.get(), 0);
    }

    fn desc(k: &str, v: &str) -> Descriptor {
        vec![(k.to_owned(), v.to_owned())]
    }

    #[tokio::test(start_paused = true)]
    async fn descriptors_take_from_their_own_buckets() {
        let every = |max| TokenBucketConfig {
            max_tokens: max,
            tokens_per_fill: 1,
            fill_interval: Duration::from_secs(10),
        };
        let mut cfg = LocalRateLimitConfig {
            token_bucket: Some(every(3)),
            filter_enabled: FractionalPercent::HUNDRED,
            filter_enforced: FractionalPercent::HUNDRED,
            descriptors: vec![
                mesh_core::policy::LocalRateLimitDescriptor {
                    entries: desc("user", "a"),
                    token_bucket: every(1),
                },
                mesh_core::policy::LocalRateLimitDescriptor {
                    entries: desc("path", "/p"),
                    token_bucket: TokenBucketConfig {
                        max_tokens: 5,
                        tokens_per_fill: 5,
                        fill_interval: Duration::from_secs(1),
                    },
                },
            ],
            always_consume_default_token_bucket: false,
            ..LocalRateLimitConfig::default()
        };
        let l = LocalRateLimiter::new(&cfg, LocalRateLimitStats::default());
        let a = [desc("user", "a")];
        let (v, b) = l.check_descriptors(&a);
        assert_eq!((v, b.map(|b| b.max_tokens())), (Verdict::Allowed, Some(1)));
        assert_eq!(l.check_descriptors(&a).0, Verdict::Limited);
        // The default bucket was spared.
        assert_eq!(l.check_descriptors(&[]).1.map(|b| b.remaining()), Some(2));
        // The bucket refills at its own rate.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(l.check_descriptors(&a).0, Verdict::Allowed);
        // The slowest-filling matched bucket is taken from first: once it is
        // empty the faster one is not touched.
        let both = [desc("path", "/p"), desc("user", "a")];
        let (v, b) = l.check_descriptors(&both);
        assert_eq!((v, b.map(|b| b.max_tokens())), (Verdict::Limited, Some(1)));
        let path = l
            .descriptors
            .iter()
            .find(|(e, _)| e[0].0 == "path")
            .unwrap();
        assert_eq!(path.1.remaining(), 5);
        // always_consume_default_token_bucket: the default bucket decides last.
        cfg.always_consume_default_token_bucket = true;
        let l = LocalRateLimiter::new(&cfg, LocalRateLimitStats::default());
        let p = [desc("path", "/p")];
        let verdicts: Vec<_> = (0..4).map(|_| l.check_descriptors(&p).0).collect();
        assert_eq!(verdicts[..3], [Verdict::Allowed; 3]);
        assert_eq!(verdicts[3], Verdict::Limited);
        assert_eq!(l.check_descriptors(&p).1.map(|b| b.max_tokens()), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_reset_header_counts_seconds_to_the_next_token() {
        let b = TokenBucket::new(1, 1, Duration::from_secs(30));
        assert_eq!(b.next_token_in(), Duration::ZERO);
        assert!(b.try_consume());
        assert_eq!(b.next_token_in(), Duration::from_secs(30));
        tokio::time::advance(Duration::from_millis(10_500)).await;
        assert_eq!(b.next_token_in().as_secs(), 19);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_take_one_token_each() {
        let store = Store::new();
        let mut cfg = NetworkLocalRateLimit {
            stat_prefix: "tcp".into(),
            token_bucket: TokenBucketConfig {
                max_tokens: 2,
                tokens_per_fill: 1,
                fill_interval: Duration::from_secs(1),
            },
            enabled: true,
        };
        let l = ConnectionRateLimiter::new(&cfg, &store);
        assert!(l.admit() && l.admit());
        assert!(!l.admit());
        assert_eq!(l.rate_limited.get(), 1);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(l.admit());
        assert!(!l.admit());
        // `runtime_enabled: false`: everything passes, nothing counted.
        cfg.enabled = false;
        let off = ConnectionRateLimiter::new(&cfg, &Store::new());
        assert!((0..10).all(|_| off.admit()));
        assert_eq!(off.rate_limited.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_answers_429() {
        use tower::ServiceExt;
        let l = Arc::new(limiter(1, 1, Duration::from_secs(60)));
        let inner = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(String::from("hello")))
        });
        let mut svc = LocalRateLimitLayer::new(l).layer(inner);
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.body(), "local_rate_limited");
    }
}
