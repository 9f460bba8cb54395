//! Access logs (`access_log` on the HTTP connection manager and the TCP
//! proxy) in Envoy's default format, so log pipelines built for Envoy parse
//! mesh's lines unchanged:
//!
//! ```text
//! [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
//! %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
//! ```
//!
//! (one line). Custom `log_format`s are refused by the loader until the
//! formatter lands with the filter work. Lines are written whole, under a
//! lock, by the worker that finished the request.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use mesh_core::config::AccessLog;
use mesh_core::flags::ResponseFlag;

enum Sink {
    Stdout,
    Stderr,
    File(Mutex<std::fs::File>),
}

/// The configured access-log sinks of one HCM or TCP proxy.
#[derive(Clone)]
pub struct AccessLogger {
    sinks: Arc<Vec<Sink>>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl AccessLogger {
    /// Opens the sinks; `None` when none is configured. A file that cannot
    /// be opened is an error naming it.
    pub fn new(configs: &[AccessLog]) -> Result<Option<Self>, String> {
        if configs.is_empty() {
            return Ok(None);
        }
        let mut sinks = Vec::new();
        for c in configs {
            sinks.push(match c {
                AccessLog::Stdout => Sink::Stdout,
                AccessLog::Stderr => Sink::Stderr,
                AccessLog::File(path) => Sink::File(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("access_log file {path:?}: {e}"))?,
                )),
            });
        }
        Ok(Some(AccessLogger {
            sinks: Arc::new(sinks),
        }))
    }

    /// Writes one line to every sink.
    pub fn write(&self, line: &str) {
        for s in self.sinks.iter() {
            let r = match s {
                Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
                Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
                Sink::File(f) => f
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(line.as_bytes()),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "access log write failed");
            }
        }
    }
}

/// What one HTTP request's log line needs, captured before the request is
/// consumed.
#[derive(Debug)]
pub struct HttpLogEntry {
    /// When the request started.
    pub start: SystemTime,
    /// Monotonic start, for `%DURATION%`.
    pub started: Instant,
    /// `:method`.
    pub method: http::Method,
    /// `:path` (with query) as received.
    pub path: String,
    /// Downstream protocol.
    pub version: http::Version,
    /// `x-forwarded-for`, `user-agent`, `x-request-id`, `:authority`.
    pub xff: Option<http::HeaderValue>,
    /// `user-agent`.
    pub user_agent: Option<http::HeaderValue>,
    /// `x-request-id`.
    pub request_id: Option<http::HeaderValue>,
    /// `:authority`.
    pub authority: Option<String>,
    /// Request body bytes (from `content-length`).
    pub bytes_received: u64,
}

impl HttpLogEntry {
    /// Captures the request fields of the log line.
    pub fn capture<B>(req: &http::Request<B>) -> Self {
        let h = req.headers();
        HttpLogEntry {
            start: SystemTime::now(),
            started: Instant::now(),
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
            version: req.version(),
            xff: h.get("x-forwarded-for").cloned(),
            user_agent: h.get(http::header::USER_AGENT).cloned(),
            request_id: h.get("x-request-id").cloned(),
            authority: mesh_core::view::RequestView::authority(req).map(str::to_owned),
            bytes_received: h
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }

    /// The line, with the response facts known at the end of the stream.
    pub fn format(
        &self,
        status: u16,
        flag: Option<ResponseFlag>,
        bytes_sent: u64,
        upstream: Option<SocketAddr>,
    ) -> String {
        let mut s = String::with_capacity(256);
        let opt = |v: &Option<http::HeaderValue>| -> String {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let proto = match self.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        };
        let _ = writeln!(
            s,
            "[{}] \"{} {} {}\" {} {} {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"",
            format_time(self.start),
            self.method,
            self.path,
            proto,
            status,
            flag.map(ResponseFlag::as_str).unwrap_or("-"),
            self.bytes_received,
            bytes_sent,
            self.started.elapsed().as_millis(),
            opt(&self.xff),
            opt(&self.user_agent),
            opt(&self.request_id),
            self.authority.as_deref().unwrap_or("-"),
            upstream
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        s
    }
}

/// `%START_TIME%`'s default form: `2026-11-22T06:26:22.566Z`.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, sec) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{:03}Z",
        d.subsec_millis()
    )
}

/// Envoy's default line for a TCP proxy connection:
/// `[START] "- - -" 0 FLAGS RECEIVED SENT DURATION - "-" "-" "-" "-" "UPSTREAM"`.
pub fn tcp_line(
    start: SystemTime,
    started: Instant,
    flag: Option<ResponseFlag>,
    received: u64,
    sent: u64,
    upstream: Option<SocketAddr>,
) -> String {
    format!(
        "[{}] \"- - -\" 0 {} {received} {sent} {} - \"-\" \"-\" \"-\" \"-\" \"{}\"\n",
        format_time(start),
        flag.map(ResponseFlag::as_str).unwrap_or("-"),
        started.elapsed().as_millis(),
        upstream
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_328_782_566);
        assert_eq!(format_time(t), "2026-11-22T06:26:22.566Z");
        assert_eq!(
            format_time(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn line_has_envoys_default_shape() {
        let req = http::Request::builder()
            .uri("/a?b=1")
            .header("host", "example.com")
            .header("user-agent", "curl/8")
            .header("x-request-id", "abc")
            .body(())
            .unwrap();
        let e = HttpLogEntry::capture(&req);
        let line = e.format(
            503,
            Some(ResponseFlag::UpstreamConnectionFailure),
            91,
            Some("10.0.0.1:80".parse().unwrap()),
        );
        let rest = line.split_once("] ").unwrap().1;
        assert!(
            rest.starts_with("\"GET /a?b=1 HTTP/1.1\" 503 UF 0 91 "),
            "{line}"
        );
        assert!(
            rest.ends_with("\"-\" \"curl/8\" \"abc\" \"example.com\" \"10.0.0.1:80\"\n"),
            "{line}"
        );
    }
}
