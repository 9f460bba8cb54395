//! Compiled access-log filters (`AccessLogFilter`).
//!
//! `header_filter`s read request headers, which are gone when the stream
//! ends: they are evaluated when the request is captured, and their results
//! kept as bits of the record; every other filter reads the finished record.

use mesh_core::access_log::{AccessLogFilter, Comparison};
use mesh_core::router::CompiledHeaderMatcher;

use super::LogRecord;

/// Most `header_filter`s the access logs of one HCM may hold.
pub const MAX_HEADER_FILTERS: usize = 64;

/// A compiled filter.
#[derive(Debug)]
pub enum Filter {
    /// `status_code_filter`.
    Status(Comparison, u64),
    /// `duration_filter`.
    Duration(Comparison, u64),
    /// `not_health_check_filter`: mesh has no health-check filter marking
    /// requests as health checks, so every request passes.
    NotHealthCheck,
    /// `response_flag_filter`.
    Flags(Vec<String>),
    /// `header_filter`: the bit of its result in the record.
    Header(u32),
    /// `grpc_status_filter`.
    Grpc(Vec<u32>, bool),
    /// `and_filter`.
    And(Vec<Filter>),
    /// `or_filter`.
    Or(Vec<Filter>),
}

impl Filter {
    /// Compiles `f`; its header matchers are appended to `headers`.
    pub fn compile(
        f: &AccessLogFilter,
        headers: &mut Vec<CompiledHeaderMatcher>,
    ) -> Result<Self, String> {
        Ok(match f {
            AccessLogFilter::StatusCode(c, v) => Filter::Status(*c, *v),
            AccessLogFilter::Duration(c, v) => Filter::Duration(*c, *v),
            AccessLogFilter::NotHealthCheck => Filter::NotHealthCheck,
            AccessLogFilter::ResponseFlag(flags) => Filter::Flags(flags.clone()),
            AccessLogFilter::Header(m) => {
                if headers.len() >= MAX_HEADER_FILTERS {
                    return Err(format!(
                        "filter: at most {MAX_HEADER_FILTERS} header_filters are supported"
                    ));
                }
                let c = CompiledHeaderMatcher::compile(m, "filter.header_filter.header")
                    .map_err(|e| format!("{}: {}", e.path, e.message))?;
                headers.push(c);
                Filter::Header(headers.len() as u32 - 1)
            }
            AccessLogFilter::GrpcStatus(s, exclude) => Filter::Grpc(s.clone(), *exclude),
            AccessLogFilter::And(fs) => Filter::And(
                fs.iter()
                    .map(|f| Filter::compile(f, headers))
                    .collect::<Result<_, _>>()?,
            ),
            AccessLogFilter::Or(fs) => Filter::Or(
                fs.iter()
                    .map(|f| Filter::compile(f, headers))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Whether a `grpc_status_filter` is part of it.
    pub fn reads_grpc_status(&self) -> bool {
        match self {
            Filter::Grpc(..) => true,
            Filter::And(fs) | Filter::Or(fs) => fs.iter().any(Filter::reads_grpc_status),
            _ => false,
        }
    }

    /// Whether `rec` is logged.
    pub fn passes(&self, rec: &LogRecord<'_>) -> bool {
        match self {
            Filter::Status(c, v) => c.test(u64::from(rec.status), *v),
            Filter::Duration(c, v) => c.test(rec.duration.as_millis() as u64, *v),
            Filter::NotHealthCheck => true,
            Filter::Flags(flags) => {
                let set = rec.flags();
                !set.is_empty()
                    && (flags.is_empty()
                        || set.iter().any(|f| flags.iter().any(|x| x == f.as_str())))
            }
            Filter::Header(bit) => rec.header_bits & (1u64 << bit) != 0,
            Filter::Grpc(statuses, exclude) => statuses.contains(&grpc_status(rec)) != *exclude,
            Filter::And(fs) => fs.iter().all(|f| f.passes(rec)),
            Filter::Or(fs) => fs.iter().any(|f| f.passes(rec)),
        }
    }
}

/// The stream's gRPC status as Envoy's `grpc_status_filter` finds it:
/// `grpc-status` from the trailers, else the headers, else mapped from the
/// HTTP status.
pub(super) fn grpc_status(rec: &LogRecord<'_>) -> u32 {
    let from = |v: Option<&http::HeaderValue>| {
        v.and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u32>().ok())
    };
    if let Some(s) = from(rec.grpc_status_trailer).or_else(|| from(rec.grpc_status_header)) {
        return s;
    }
    match rec.status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}
