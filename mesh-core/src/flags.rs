//! Envoy response flags: why the proxy, not the upstream, produced or ended
//! a response. Every proxy-made error carries one, in the access log
//! (`%RESPONSE_FLAGS%`) and in stats, with Envoy's short names so that
//! existing alerts and log queries keep working.

/// One Envoy response flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// `NR`: no route matched (404), or no matching filter chain.
    NoRouteFound,
    /// `UH`: no healthy upstream host (503).
    NoHealthyUpstream,
    /// `UF`: upstream connection failure (503).
    UpstreamConnectionFailure,
    /// `UT`: upstream request timeout (504).
    UpstreamRequestTimeout,
    /// `UC`: upstream connection terminated before a response (503).
    UpstreamConnectionTermination,
    /// `UR`: upstream reset the stream (503).
    UpstreamRemoteReset,
    /// `UO`: upstream overflow, e.g. a circuit breaker (503).
    UpstreamOverflow,
    /// `NC`: the route's cluster does not exist (503).
    NoClusterFound,
    /// `DC`: the downstream connection ended mid-stream.
    DownstreamConnectionTermination,
    /// `SI`: stream idle timeout (408).
    StreamIdleTimeout,
    /// `DPE`: the downstream request had an HTTP protocol error.
    DownstreamProtocolError,
    /// `UPE`: the upstream response had an HTTP protocol error.
    UpstreamProtocolError,
    /// `URX`: the retry limit was reached (the last try's response or
    /// failure is what the downstream got).
    UpstreamRetryLimitExceeded,
    /// `RL`: rate limited locally (429).
    RateLimited,
    /// `FI`: a fault was injected (abort).
    FaultInjected,
    /// `DI`: a delay was injected.
    DelayInjected,
    /// `DT`: the stream ran past its `max_stream_duration`.
    DurationTimeout,
}

impl ResponseFlag {
    /// Envoy's short name (`UF`).
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::DurationTimeout => "DT",
        }
    }

    /// Every flag, for pre-creating per-flag stats.
    pub const ALL: [ResponseFlag; 17] = [
        ResponseFlag::NoRouteFound,
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamRequestTimeout,
        ResponseFlag::UpstreamConnectionTermination,
        ResponseFlag::UpstreamRemoteReset,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::NoClusterFound,
        ResponseFlag::DownstreamConnectionTermination,
        ResponseFlag::StreamIdleTimeout,
        ResponseFlag::DownstreamProtocolError,
        ResponseFlag::UpstreamProtocolError,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::RateLimited,
        ResponseFlag::FaultInjected,
        ResponseFlag::DelayInjected,
        ResponseFlag::DurationTimeout,
    ];

    /// Position in [`ResponseFlag::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

impl std::fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
