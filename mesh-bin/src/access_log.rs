//! Access logs (`access_log` on the HTTP connection manager and the TCP
//! proxy): Envoy's default format, or the `log_format` configured
//! (`text_format`, `text_format_source`, `json_format` with Envoy's command
//! operators, see [`format`]), for the streams the `filter` lets through
//! (see [`filter`]).
//!
//! Formats are compiled once, when the logger is built: request and
//! response headers are captured only when some format or filter reads
//! them, and a line is rendered into one `String` that is handed to the
//! writer thread as it is.
//!
//! Workers never write to a log themselves: they hand each finished line to
//! a writer thread over a bounded queue and go on. The writer drains the
//! queue in batches and flushes after each batch, so a slow disk or a
//! blocked stdout pipe cannot stall request processing. If the queue is
//! full (the sink cannot keep up), the line is dropped and counted in
//! `mesh_access_log_dropped`.

pub mod body;
pub mod filter;
pub mod flags;
pub mod format;
pub mod listener;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue};
use mesh_core::config::{AccessLog, AccessLogSink};
use mesh_core::flags::ResponseFlag;
use mesh_core::headers::StreamInfo;
use mesh_core::identity::PeerIdentity;
use mesh_core::router::{CompiledHeaderMatcher, CompiledRoute};
use mesh_core::stats::{Counter, Store};

use self::body::BodyMark;
use self::filter::Filter;
use self::flags::FlagSet;
use self::format::{Compiled, Needs};

/// Lines that may wait for the writer thread.
const QUEUE: usize = 16 * 1024;

/// A line for every sink.
const ALL_SINKS: usize = usize::MAX;

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// A new downstream connection id (`%CONNECTION_ID%`), unique in the process.
pub fn next_connection_id() -> u64 {
    CONNECTION_IDS.fetch_add(1, Ordering::Relaxed)
}

/// One configured access log, compiled.
#[derive(Debug)]
struct Log {
    /// `None`: the proxy's own line (RPC proxies without `log_format`).
    format: Option<Compiled>,
    filter: Option<Filter>,
    sink: usize,
    /// The longest line so far, to size the next one in one allocation.
    hint: AtomicUsize,
}

/// The configured access logs of one HCM or TCP proxy.
#[derive(Clone)]
pub struct AccessLogger {
    tx: SyncSender<(usize, String)>,
    dropped: Counter,
    inner: Arc<Inner>,
}

struct Inner {
    logs: Vec<Log>,
    needs: Needs,
    header_filters: Vec<CompiledHeaderMatcher>,
    hostname: String,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger").finish_non_exhaustive()
    }
}

fn open(configs: &[AccessLog]) -> Result<Vec<Box<dyn std::io::Write + Send>>, String> {
    let mut sinks: Vec<Box<dyn std::io::Write + Send>> = Vec::new();
    for c in configs {
        sinks.push(match &c.sink {
            AccessLogSink::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            AccessLogSink::Stderr => Box::new(std::io::BufWriter::new(std::io::stderr())),
            AccessLogSink::File(path) => Box::new(std::io::BufWriter::new(
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

fn writer(rx: Receiver<(usize, String)>, mut sinks: Vec<Box<dyn std::io::Write + Send>>) {
    let mut failed = false;
    let mut write = |(sink, line): (usize, String),
                     sinks: &mut Vec<Box<dyn std::io::Write + Send>>| {
        for (i, s) in sinks.iter_mut().enumerate() {
            if sink != ALL_SINKS && sink != i {
                continue;
            }
            if let Err(e) = s.write_all(line.as_bytes()) {
                if !failed {
                    tracing::warn!(error = %e, "access log write failed");
                    failed = true;
                }
            }
        }
    };
    // Ends when every sender (every worker's logger) is gone.
    while let Ok(msg) = rx.recv() {
        write(msg, &mut sinks);
        while let Ok(msg) = rx.try_recv() {
            write(msg, &mut sinks);
        }
        for s in sinks.iter_mut() {
            let _ = s.flush();
        }
    }
}

/// The machine's host name (`%HOSTNAME%`).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

impl AccessLogger {
    /// Compiles the formats and filters, opens the sinks and starts their
    /// writer thread; `None` when no log is configured. A file that cannot
    /// be opened is an error naming it; errors name the log's index.
    pub fn new(configs: &[AccessLog], store: &Store) -> Result<Option<Self>, String> {
        Self::build(configs, store, false)
    }

    fn build(
        configs: &[AccessLog],
        store: &Store,
        own_default: bool,
    ) -> Result<Option<Self>, String> {
        if configs.is_empty() {
            return Ok(None);
        }
        let mut needs = Needs::default();
        let mut header_filters = Vec::new();
        let mut logs = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let format = if own_default && c.format.is_none() {
                None
            } else {
                let f = needs
                    .compile(c.format.as_ref())
                    .map_err(|e| format!("[{i}].typed_config.log_format: {e}"))?;
                Some(f)
            };
            let filter = c
                .filter
                .as_ref()
                .map(|f| Filter::compile(f, &mut header_filters))
                .transpose()
                .map_err(|e| format!("[{i}].{e}"))?;
            logs.push(Log {
                format,
                filter,
                sink: i,
                hint: AtomicUsize::new(256),
            });
        }
        if logs
            .iter()
            .any(|l| l.filter.as_ref().is_some_and(Filter::reads_grpc_status))
        {
            // grpc_status_filter reads grpc-status wherever it is.
            needs.grpc_status();
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
            inner: Arc::new(Inner {
                logs,
                needs,
                header_filters,
                hostname: hostname(),
            }),
        }))
    }

    /// As [`AccessLogger::new`], for proxies that write their own default
    /// line (RPC): a log without `log_format` gets the line given to
    /// [`AccessLogger::log_own`].
    pub fn new_own_default(configs: &[AccessLog], store: &Store) -> Result<Option<Self>, String> {
        Self::build(configs, store, true)
    }

    /// `%HOSTNAME%`.
    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }

    /// Queues one line for every sink; never blocks.
    pub fn write(&self, line: String) {
        self.send(ALL_SINKS, line);
    }

    fn send(&self, sink: usize, line: String) {
        match self.tx.try_send((sink, line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Logs `rec` to every log whose filter lets it through.
    pub fn log(&self, rec: &LogRecord<'_>) {
        self.log_own(rec, String::new);
    }

    /// As [`AccessLogger::log`]; logs without a format get `own()`.
    pub fn log_own(&self, rec: &LogRecord<'_>, own: impl Fn() -> String) {
        for l in &self.inner.logs {
            if l.filter.as_ref().is_some_and(|f| !f.passes(rec)) {
                continue;
            }
            let Some(format) = &l.format else {
                self.send(l.sink, own());
                continue;
            };
            let mut line = String::with_capacity(l.hint.load(Ordering::Relaxed));
            format.render(rec, &mut line);
            if line.len() > l.hint.load(Ordering::Relaxed) {
                l.hint.store(line.len().min(64 * 1024), Ordering::Relaxed);
            }
            self.send(l.sink, line);
        }
    }

    /// A TCP proxy connection's record.
    pub fn log_tcp(
        &self,
        start: SystemTime,
        started: Instant,
        received: u64,
        sent: u64,
        outcome: &listener::TcpOutcome,
        conn: &TcpConn<'_>,
    ) {
        let rec = LogRecord {
            flag: outcome.flag,
            extra_flags: outcome.extra_flags(),
            bytes_received: received,
            bytes_sent: sent,
            upstream_host: outcome.upstream,
            upstream_unconnected: outcome.upstream_local.is_none(),
            upstream_local: outcome.upstream_local,
            upstream_failure: outcome.failure.as_deref(),
            upstream_cluster: outcome.cluster.as_ref().map(|c| c.config.name.as_str()),
            attempts: outcome.upstream.map(|_| 1),
            downstream_remote: Some(conn.peer),
            downstream_direct_remote: Some(conn.peer),
            downstream_local: conn.local,
            connection_id: Some(conn.id),
            tls: conn.tls,
            ..LogRecord::new(start, started.elapsed(), &self.inner.hostname)
        };
        self.log(&rec);
    }

    /// Captures what the formats and filters read from a request, before
    /// the request is consumed. With `trust_xff` (the HCM's
    /// `use_remote_address: false`, Envoy's default) the downstream remote
    /// address is the last `x-forwarded-for` entry when there is one, as in
    /// Envoy; the socket peer stays the direct remote address.
    pub fn capture<B>(
        &self,
        req: &http::Request<B>,
        info: &StreamInfo,
        trust_xff: bool,
    ) -> HttpLogEntry {
        let n = &self.inner.needs;
        let h = req.headers();
        let mut header_bits = 0u64;
        for (i, m) in self.inner.header_filters.iter().enumerate() {
            if m.matches(req) {
                header_bits |= 1 << i;
            }
        }
        let remote = trust_xff
            .then(|| last_xff(h))
            .flatten()
            .unwrap_or(info.downstream_remote);
        HttpLogEntry {
            remote,
            start: SystemTime::now(),
            started: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            authority: mesh_core::view::RequestView::authority(req).map(str::to_owned),
            headers: n.req.iter().map(|name| h.get(name).cloned()).collect(),
            header_bits,
            bytes_received: h
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            info: *info,
            tls: req.extensions().get::<Arc<PeerIdentity>>().cloned(),
            route: None,
            cluster: None,
            attempts: None,
            resp_headers: Vec::new(),
            response_duration: None,
            request_duration: None,
            flags: FlagSet::default(),
            body: None,
            upstream_failure: None,
            upstream_local: None,
            upstream_host: None,
        }
    }

    /// Captures the attachments the formats read and the `header_filter`
    /// results of an RPC request (read as routing reads it).
    pub fn capture_rpc(&self, req: &impl mesh_core::view::RequestView) -> RpcCapture {
        let mut header_bits = 0u64;
        for (i, m) in self.inner.header_filters.iter().enumerate() {
            if m.matches(req) {
                header_bits |= 1 << i;
            }
        }
        RpcCapture {
            headers: self
                .inner
                .needs
                .req
                .iter()
                .map(|name| req.header(name.as_str()).map(str::to_owned))
                .collect(),
            header_bits,
        }
    }

    /// Captures what the formats read from the final response headers.
    pub fn capture_response(&self, entry: &mut HttpLogEntry, headers: &HeaderMap) {
        let n = &self.inner.needs;
        if !n.resp.is_empty() {
            entry.resp_headers = n
                .resp
                .iter()
                .map(|name| headers.get(name).cloned())
                .collect();
        }
    }

    /// Logs a finished HTTP stream.
    pub fn log_http(&self, entry: &HttpLogEntry, end: &HttpEnd<'_>) {
        let grpc_header = self
            .inner
            .needs
            .grpc_status_slot()
            .and_then(|i| entry.resp_headers.get(i).and_then(Option::as_ref));
        let grpc_trailer = self
            .inner
            .needs
            .grpc_trailer_slot()
            .and_then(|i| end.trailers.get(i).and_then(Option::as_ref));
        let rec = LogRecord {
            request: Some(entry),
            resp_headers: &entry.resp_headers,
            trailers: end.trailers,
            status: end.status,
            details: Some(end.details),
            flag: end.flag,
            extra_flags: entry.flags,
            bytes_received: match &entry.body {
                Some(b) if entry.bytes_received == 0 => b.bytes(),
                _ => entry.bytes_received,
            },
            bytes_sent: end.bytes_sent,
            request_duration: entry
                .request_duration
                .or_else(|| entry.body.as_ref().and_then(|b| b.ended())),
            upstream_failure: entry.upstream_failure.as_deref(),
            upstream_local: entry.upstream_local,
            response_duration: entry.response_duration,
            upstream_host: end.upstream,
            upstream_unconnected: end.flag == Some(ResponseFlag::UpstreamConnectionFailure),
            upstream_cluster: entry.cluster.as_deref(),
            downstream_remote: Some(entry.remote),
            downstream_direct_remote: Some(entry.info.downstream_remote),
            downstream_local: Some(entry.info.downstream_local),
            route_name: entry.route.as_ref().map(|r| r.name.as_str()),
            connection_id: Some(entry.info.connection_id),
            attempts: entry.attempts,
            tls: entry.tls.as_deref(),
            header_bits: entry.header_bits,
            grpc_status_header: grpc_header,
            grpc_status_trailer: grpc_trailer,
            ..LogRecord::new(entry.start, entry.started.elapsed(), &self.inner.hostname)
        };
        self.log(&rec);
    }

    /// Whether some format reads the upstream connection's local address
    /// (only then is it carried to the line).
    pub fn wants_upstream_local(&self) -> bool {
        self.inner.needs.upstream_local
    }

    /// Whether some format reads response trailers.
    pub fn wants_trailers(&self) -> bool {
        !self.inner.needs.trailers.is_empty()
    }

    /// Captures the trailers the formats and filters read.
    pub fn capture_trailers(&self, trailers: &HeaderMap) -> Vec<Option<HeaderValue>> {
        self.inner
            .needs
            .trailers
            .iter()
            .map(|name| trailers.get(name).cloned())
            .collect()
    }
}

/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` of a proxy-made HTTP response,
/// carried in its extensions to the log line.
#[derive(Debug, Clone)]
pub struct UpstreamFailure(pub String);

/// `%RESPONSE_CODE_DETAILS%` of a proxy-made HTTP response when its flag
/// alone does not tell (`upstream_per_try_timeout`), in its extensions.
#[derive(Debug, Clone, Copy)]
pub struct LocalDetails(pub &'static str);

/// What an RPC request's log line needs from the request, captured
/// before it is sent (see [`AccessLogger::capture_rpc`]).
#[derive(Debug, Default)]
pub struct RpcCapture {
    /// The attachments the formats read, in [`format::Needs`] order.
    pub headers: Vec<Option<String>>,
    /// Results of the `header_filter`s, one bit each.
    pub header_bits: u64,
}

/// An RPC request, for `%REQ(...)%` and `%PROTOCOL%`: the method is
/// `:method`, the service `:path` and `:authority`, attachments headers.
#[derive(Debug)]
pub struct RpcRequest<'a> {
    /// The method.
    pub method: &'a str,
    /// The service (interface).
    pub service: &'a str,
    /// The codec (`dubbo`, `thrift`, `bolt`).
    pub protocol: &'a str,
    /// The captured attachments.
    pub capture: &'a RpcCapture,
}

/// The downstream side of a TCP proxy connection, for its log line.
#[derive(Debug, Clone, Copy)]
pub struct TcpConn<'a> {
    /// The peer.
    pub peer: SocketAddr,
    /// The local address, when known.
    pub local: Option<SocketAddr>,
    /// The connection id.
    pub id: u64,
    /// The TLS session, for TLS connections.
    pub tls: Option<&'a PeerIdentity>,
}

/// How an HTTP stream ended, for its log line.
#[derive(Debug)]
pub struct HttpEnd<'a> {
    /// The response status sent.
    pub status: u16,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub details: &'a str,
    /// The response flag, if any.
    pub flag: Option<ResponseFlag>,
    /// Response body bytes sent downstream.
    pub bytes_sent: u64,
    /// The upstream endpoint, if one was picked.
    pub upstream: Option<SocketAddr>,
    /// The captured response trailers (see [`AccessLogger::capture_trailers`]).
    pub trailers: &'a [Option<HeaderValue>],
}

/// What one HTTP request's log line needs, captured before the request is
/// consumed and completed as the stream goes on.
#[derive(Debug)]
pub struct HttpLogEntry {
    /// When the request started.
    pub start: SystemTime,
    /// Monotonic start, for `%DURATION%`.
    pub started: Instant,
    /// `:method`.
    pub method: http::Method,
    /// The request target as received.
    pub uri: http::Uri,
    /// Downstream protocol.
    pub version: http::Version,
    /// `:authority`.
    pub authority: Option<String>,
    /// The request headers the formats read, in [`format::Needs`] order.
    pub headers: Vec<Option<HeaderValue>>,
    /// Results of the `header_filter`s, one bit each.
    pub header_bits: u64,
    /// Request body bytes (from `content-length`).
    pub bytes_received: u64,
    /// The connection's addresses and id.
    pub info: StreamInfo,
    /// The downstream remote address (see [`AccessLogger::capture`]).
    pub remote: SocketAddr,
    /// The TLS session, for requests over TLS.
    pub tls: Option<Arc<PeerIdentity>>,
    /// The matched route.
    pub route: Option<Arc<CompiledRoute>>,
    /// The upstream cluster.
    pub cluster: Option<Arc<str>>,
    /// Upstream attempts made.
    pub attempts: Option<u32>,
    /// The response headers the formats read.
    pub resp_headers: Vec<Option<HeaderValue>>,
    /// Start to the upstream response's headers.
    pub response_duration: Option<Duration>,
    /// Start to the request's end, when known (a request without a body
    /// ends with its headers).
    pub request_duration: Option<Duration>,
    /// Flags set along the way besides the final one (`DI`, or `URX`
    /// after a failed last try).
    pub flags: FlagSet,
    /// The request body's end and bytes, when watched (see
    /// [`AccessLogger::watch_body`]).
    pub body: Option<Arc<BodyMark>>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_failure: Option<String>,
    /// The local address of the upstream connection that carried the
    /// response (when a format reads it).
    pub upstream_local: Option<SocketAddr>,
    /// The endpoint of the latest try.
    pub upstream_host: Option<SocketAddr>,
}

/// An HTTP request's log entry until its line is written. A request whose
/// handling ends before a response, because the downstream went away, is
/// logged when dropped, as Envoy logs it: status 0, `DC`,
/// `downstream_remote_disconnect`.
#[derive(Debug)]
pub struct PendingHttpLog<'a> {
    logger: Option<&'a AccessLogger>,
    /// The entry; taken when the line is written or handed on.
    pub entry: Option<HttpLogEntry>,
}

impl<'a> PendingHttpLog<'a> {
    /// Holds `entry` for `logger`.
    pub fn new(logger: Option<&'a AccessLogger>, entry: Option<HttpLogEntry>) -> Self {
        PendingHttpLog { logger, entry }
    }
}

impl Drop for PendingHttpLog<'_> {
    fn drop(&mut self) {
        if let (Some(l), Some(e)) = (self.logger, self.entry.take()) {
            let flag = Some(ResponseFlag::DownstreamConnectionTermination);
            l.log_http(
                &e,
                &HttpEnd {
                    status: 0,
                    details: response_code_details(flag, false),
                    flag,
                    bytes_sent: 0,
                    upstream: e.upstream_host,
                    trailers: &[],
                },
            );
        }
    }
}

impl HttpLogEntry {
    /// Records the route and cluster the request was sent to.
    pub fn routed(&mut self, route: &Arc<CompiledRoute>, cluster: &Arc<str>) {
        self.route = Some(route.clone());
        self.cluster = Some(cluster.clone());
    }
}

/// Everything an access-log line may show about one stream. Fields a
/// proxy does not know stay `None` and render as `-` (or `null`).
#[derive(Debug)]
pub struct LogRecord<'a> {
    /// `%START_TIME%`.
    pub start: SystemTime,
    /// `%DURATION%`.
    pub duration: Duration,
    /// The HTTP request (`None` for TCP).
    pub request: Option<&'a HttpLogEntry>,
    /// Captured response headers.
    pub resp_headers: &'a [Option<HeaderValue>],
    /// Captured response trailers.
    pub trailers: &'a [Option<HeaderValue>],
    /// `%RESPONSE_CODE%` (`0` without one).
    pub status: u16,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub details: Option<&'a str>,
    /// `%RESPONSE_FLAGS%`.
    pub flag: Option<ResponseFlag>,
    /// Flags set with `flag`, in the order set (`URX` or `UO` of the retry
    /// decision before the last try's failure, `DI` of an injected delay);
    /// `flag` goes last unless listed here (see [`LogRecord::flags`]).
    pub extra_flags: FlagSet,
    /// `%BYTES_RECEIVED%`.
    pub bytes_received: u64,
    /// `%BYTES_SENT%`.
    pub bytes_sent: u64,
    /// `%REQUEST_DURATION%`.
    pub request_duration: Option<Duration>,
    /// `%RESPONSE_DURATION%`.
    pub response_duration: Option<Duration>,
    /// `%UPSTREAM_HOST%`.
    pub upstream_host: Option<SocketAddr>,
    /// No connection to `upstream_host` was made (its connect failed):
    /// `%UPSTREAM_REMOTE_ADDRESS%` is `-`, as in Envoy.
    pub upstream_unconnected: bool,
    /// `%UPSTREAM_CLUSTER%`.
    pub upstream_cluster: Option<&'a str>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    pub upstream_local: Option<SocketAddr>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_failure: Option<&'a str>,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    pub downstream_remote: Option<SocketAddr>,
    /// `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%`.
    pub downstream_direct_remote: Option<SocketAddr>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    pub downstream_local: Option<SocketAddr>,
    /// `%ROUTE_NAME%`.
    pub route_name: Option<&'a str>,
    /// `%HOSTNAME%`.
    pub hostname: &'a str,
    /// `%CONNECTION_ID%`.
    pub connection_id: Option<u64>,
    /// `%UPSTREAM_REQUEST_ATTEMPT_COUNT%`.
    pub attempts: Option<u32>,
    /// The downstream TLS session.
    pub tls: Option<&'a PeerIdentity>,
    /// `header_filter` results.
    pub header_bits: u64,
    /// `grpc-status` of the response headers.
    pub grpc_status_header: Option<&'a HeaderValue>,
    /// `grpc-status` of the response trailers.
    pub grpc_status_trailer: Option<&'a HeaderValue>,
    /// `%DOWNSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub downstream_failure: Option<&'a str>,
    /// `%CONNECTION_TERMINATION_DETAILS%`.
    pub termination_details: Option<&'a str>,
    /// `%PROTOCOL%` of a connection's line (a request's line takes the
    /// request's version).
    pub protocol: Option<http::Version>,
    /// `%REQUESTED_SERVER_NAME%` from the TLS inspector, when no TLS
    /// session holds it.
    pub sni: Option<&'a str>,
    /// The RPC request (`None` for HTTP and TCP).
    pub rpc: Option<&'a RpcRequest<'a>>,
}

impl<'a> LogRecord<'a> {
    /// A record with only the start, duration and host name known.
    pub fn new(start: SystemTime, duration: Duration, hostname: &'a str) -> Self {
        LogRecord {
            start,
            duration,
            request: None,
            resp_headers: &[],
            trailers: &[],
            status: 0,
            details: None,
            flag: None,
            extra_flags: FlagSet::default(),
            bytes_received: 0,
            bytes_sent: 0,
            request_duration: None,
            response_duration: None,
            upstream_host: None,
            upstream_unconnected: false,
            upstream_cluster: None,
            upstream_local: None,
            upstream_failure: None,
            downstream_remote: None,
            downstream_direct_remote: None,
            downstream_local: None,
            route_name: None,
            hostname,
            connection_id: None,
            attempts: None,
            tls: None,
            header_bits: 0,
            grpc_status_header: None,
            grpc_status_trailer: None,
            downstream_failure: None,
            termination_details: None,
            protocol: None,
            sni: None,
            rpc: None,
        }
    }
}

impl LogRecord<'_> {
    /// Every flag of the stream in the order set: the extra ones, then
    /// `flag` unless they hold it already.
    pub fn flags(&self) -> FlagSet {
        self.extra_flags.union(FlagSet::of(self.flag))
    }

    /// `%UPSTREAM_REMOTE_ADDRESS%`: the upstream host, once connected to.
    pub fn upstream_remote(&self) -> Option<SocketAddr> {
        self.upstream_host.filter(|_| !self.upstream_unconnected)
    }
}

/// The last address of `x-forwarded-for` (port 0), as Envoy reads it.
fn last_xff(h: &HeaderMap) -> Option<SocketAddr> {
    let v = h
        .get_all("x-forwarded-for")
        .iter()
        .next_back()?
        .to_str()
        .ok()?;
    let ip: std::net::IpAddr = v.rsplit(',').next()?.trim().parse().ok()?;
    Some(SocketAddr::new(ip, 0))
}

/// `%START_TIME%`'s default form: `2026-11-22T06:26:22.566Z`.
pub fn format_time(t: SystemTime) -> String {
    let mut s = String::with_capacity(24);
    let _ = format::write_time(&mut s, t, None);
    s
}

/// `%RESPONSE_CODE_DETAILS%` of a proxy-made reply: as
/// [`response_code_details`], with the transport failure reason of a
/// failed connect as Envoy adds it:
/// `upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}`.
pub fn failure_details(
    flag: Option<ResponseFlag>,
    failure: Option<&str>,
) -> std::borrow::Cow<'static, str> {
    match (flag, failure) {
        (Some(ResponseFlag::UpstreamConnectionFailure), Some(reason)) => {
            format!("upstream_reset_before_response_started{{remote_connection_failure|{reason}}}")
                .into()
        }
        _ => response_code_details(flag, false).into(),
    }
}

/// `%RESPONSE_CODE_DETAILS%` for a reply: `via_upstream` for an upstream's
/// response, else the reason of mesh's local reply, as Envoy names it.
pub fn response_code_details(flag: Option<ResponseFlag>, from_upstream: bool) -> &'static str {
    match flag {
        None if from_upstream => "via_upstream",
        None => "direct_response",
        Some(ResponseFlag::NoRouteFound) => "route_not_found",
        Some(ResponseFlag::NoClusterFound) => "cluster_not_found",
        Some(ResponseFlag::NoHealthyUpstream) => "no_healthy_upstream",
        Some(ResponseFlag::UpstreamRequestTimeout) => "upstream_response_timeout",
        Some(ResponseFlag::UpstreamConnectionFailure) => {
            "upstream_reset_before_response_started{remote_connection_failure}"
        }
        Some(ResponseFlag::UpstreamConnectionTermination) => {
            "upstream_reset_before_response_started{connection_termination}"
        }
        Some(ResponseFlag::UpstreamRemoteReset) => {
            "upstream_reset_before_response_started{remote_reset}"
        }
        Some(ResponseFlag::UpstreamOverflow) => "upstream_reset_before_response_started{overflow}",
        Some(ResponseFlag::UpstreamRetryLimitExceeded) => "upstream_reset_after_response_started",
        Some(ResponseFlag::DownstreamConnectionTermination) => "downstream_remote_disconnect",
        Some(ResponseFlag::StreamIdleTimeout) => "stream_idle_timeout",
        Some(ResponseFlag::DownstreamProtocolError) => "protocol_error",
        Some(ResponseFlag::UpstreamProtocolError) => {
            "upstream_reset_before_response_started{protocol_error}"
        }
        Some(ResponseFlag::RateLimited) => "local_rate_limited",
        Some(ResponseFlag::FaultInjected) => "fault_filter_abort",
        Some(ResponseFlag::DelayInjected) => "via_upstream",
        Some(ResponseFlag::DurationTimeout) => "max_duration_timeout",
    }
}

#[cfg(test)]
mod tests;
