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
//! formatter lands with the filter work.
//!
//! Workers never write to a log themselves: they hand each finished line to
//! a writer thread over a bounded queue and go on. The writer drains the
//! queue in batches and flushes after each batch, so a slow disk or a
//! blocked stdout pipe cannot stall request processing. If the queue is
//! full (the sink cannot keep up), the line is dropped and counted in
//! `mesh_access_log_dropped`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Instant, SystemTime};

use mesh_core::config::AccessLog;
use mesh_core::flags::ResponseFlag;
use mesh_core::stats::{Counter, Store};

/// Lines that may wait for the writer thread.
const QUEUE: usize = 16 * 1024;

/// The configured access-log sinks of one HCM or TCP proxy.
#[derive(Clone)]
pub struct AccessLogger {
    tx: SyncSender<String>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger").finish_non_exhaustive()
    }
}

fn open(configs: &[AccessLog]) -> Result<Vec<Box<dyn std::io::Write + Send>>, String> {
    let mut sinks: Vec<Box<dyn std::io::Write + Send>> = Vec::new();
    for c in configs {
        sinks.push(match c {
            AccessLog::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            AccessLog::Stderr => Box::new(std::io::BufWriter::new(std::io::stderr())),
            AccessLog::File(path) => Box::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("access_log file {path:?}: {e}"))?,
            )),
        });
    }
    Ok(sinks)
}

fn writer(rx: Receiver<String>, mut sinks: Vec<Box<dyn std::io::Write + Send>>) {
    let mut failed = false;
    let mut write = |line: &str, sinks: &mut Vec<Box<dyn std::io::Write + Send>>| {
        for s in sinks.iter_mut() {
            if let Err(e) = s.write_all(line.as_bytes()) {
                if !failed {
                    tracing::warn!(error = %e, "access log write failed");
                    failed = true;
                }
            }
        }
    };
    // Ends when every sender (every worker's logger) is gone.
    while let Ok(line) = rx.recv() {
        write(&line, &mut sinks);
        while let Ok(line) = rx.try_recv() {
            write(&line, &mut sinks);
        }
        for s in sinks.iter_mut() {
            let _ = s.flush();
        }
    }
}

impl AccessLogger {
    /// Opens the sinks and starts their writer thread; `None` when none is
    /// configured. A file that cannot be opened is an error naming it.
    pub fn new(configs: &[AccessLog], store: &Store) -> Result<Option<Self>, String> {
        if configs.is_empty() {
            return Ok(None);
        }
        let sinks = open(configs)?;
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("mesh-access-log".into())
            .spawn(move || writer(rx, sinks))
            .map_err(|e| format!("access_log: cannot start its writer thread: {e}"))?;
        Ok(Some(AccessLogger {
            tx,
            dropped: store.counter("mesh_access_log_dropped", &[]),
        }))
    }

    /// Queues one line for every sink; never blocks.
    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
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
        upstream_service_time_ms: Option<u64>,
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
            "[{}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"",
            format_time(self.start),
            self.method,
            self.path,
            proto,
            status,
            flag.map(ResponseFlag::as_str).unwrap_or("-"),
            self.bytes_received,
            bytes_sent,
            self.started.elapsed().as_millis(),
            upstream_service_time_ms
                .map(|ms| ms.to_string())
                .unwrap_or_else(|| "-".into()),
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
    fn lines_reach_the_file_in_order_from_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let store = Store::new();
        let log = AccessLogger::new(&[AccessLog::File(path.display().to_string())], &store)
            .unwrap()
            .unwrap();
        for i in 0..500 {
            log.write(format!("line {i}\n"));
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 500 || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let expected: Vec<String> = (0..500).map(|i| format!("line {i}")).collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        assert_eq!(store.value("mesh_access_log_dropped", &[]), Some(0));
    }

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
            Some(7),
        );
        let rest = line.split_once("] ").unwrap().1;
        assert!(rest.contains(" 7 \"-\" \"curl/8\""), "{line}");
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
