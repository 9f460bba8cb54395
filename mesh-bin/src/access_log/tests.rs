use super::*;
use mesh_core::access_log::{
    parse_format, AccessLogFilter, Comparison, JsonNode, LogFormat, LogFormatKind,
};

/// A logger writing to a file in `dir`, and the file.
fn logger(dir: &tempfile::TempDir, logs: Vec<AccessLog>) -> (AccessLogger, std::path::PathBuf) {
    let path = dir.path().join("access.log");
    let logs = logs
        .into_iter()
        .map(|mut l| {
            l.sink = AccessLogSink::File(path.display().to_string());
            l
        })
        .collect::<Vec<_>>();
    let log = AccessLogger::new(&logs, &Store::new()).unwrap().unwrap();
    (log, path)
}

fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n || Instant::now() > deadline {
            return text.lines().map(str::to_owned).collect();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn text(f: &str) -> AccessLog {
    AccessLog {
        sink: AccessLogSink::Stdout,
        format: Some(LogFormat {
            kind: LogFormatKind::Text(parse_format(f).unwrap()),
            omit_empty_values: false,
        }),
        filter: None,
    }
}

fn json(fields: &[(&str, &str)], omit: bool) -> AccessLog {
    AccessLog {
        sink: AccessLogSink::Stdout,
        format: Some(LogFormat {
            kind: LogFormatKind::Json(
                fields
                    .iter()
                    .map(|(k, v)| {
                        let node = if v.starts_with('%') || v.contains(' ') {
                            JsonNode::Template(parse_format(v).unwrap())
                        } else {
                            JsonNode::Literal((*v).to_owned())
                        };
                        ((*k).to_owned(), node)
                    })
                    .collect(),
            ),
            omit_empty_values: omit,
        }),
        filter: None,
    }
}

fn info() -> StreamInfo {
    StreamInfo {
        downstream_remote: "10.1.2.3:5555".parse().unwrap(),
        downstream_local: "127.0.0.1:8080".parse().unwrap(),
        protocol: http::Version::HTTP_11,
        connection_id: 42,
    }
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .uri("/a?b=1")
        .header("host", "example.com")
        .header("user-agent", "curl/8")
        .header("x-request-id", "abc")
        .body(())
        .unwrap()
}

fn end(status: u16, flag: Option<ResponseFlag>) -> HttpEnd<'static> {
    HttpEnd {
        status,
        details: response_code_details(flag, flag.is_none()),
        flag,
        bytes_sent: 91,
        upstream: Some("10.0.0.1:80".parse().unwrap()),
        trailers: &[],
    }
}

#[test]
fn lines_reach_the_file_in_order_from_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(&dir, vec![AccessLogSink::Stdout.into()]);
    for i in 0..500 {
        log.write(format!("line {i}\n"));
    }
    let expected: Vec<String> = (0..500).map(|i| format!("line {i}")).collect();
    assert_eq!(lines(&path, 500), expected);
}

#[test]
fn start_time_is_rfc3339_utc() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_328_782_566);
    assert_eq!(format_time(t), "2026-11-22T06:26:22.566Z");
    assert_eq!(
        format_time(SystemTime::UNIX_EPOCH),
        "1970-01-01T00:00:00.000Z"
    );
}

#[test]
fn start_time_strftime_formats() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_328_782_566_123_456);
    let f = |s: &str| {
        let tf = mesh_core::access_log::parse_time_format(s).unwrap();
        let mut out = String::new();
        format::write_time(&mut out, t, Some(&tf)).unwrap();
        out
    };
    assert_eq!(f("%Y-%m-%dT%H:%M:%S.%3fZ"), "2026-11-22T06:26:22.566Z");
    assert_eq!(f("%f"), "566123456");
    assert_eq!(f("%6f|%1f"), "566123|5");
    assert_eq!(f("%E3S"), "22.566");
    assert_eq!(f("%s"), "1795328782");
    assert_eq!(
        f("%a %b %e %T %j %y %z %Z %%"),
        "Sun Nov 22 06:26:22 326 26 +0000 UTC %"
    );
    assert_eq!(f("%A %B %F"), "Sunday November 2026-11-22");
}

#[test]
fn default_line_has_envoys_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(&dir, vec![AccessLogSink::Stdout.into()]);
    let mut e = log.capture(&request(), &info(), true);
    let mut h = HeaderMap::new();
    h.insert("x-envoy-upstream-service-time", HeaderValue::from(7));
    log.capture_response(&mut e, &h);
    log.log_http(&e, &end(503, Some(ResponseFlag::UpstreamConnectionFailure)));
    let line = &lines(&path, 1)[0];
    let rest = line.split_once("] ").unwrap().1;
    assert_eq!(
        rest,
        "\"GET /a?b=1 HTTP/1.1\" 503 UF 0 91 0 7 \"-\" \"curl/8\" \"abc\" \"example.com\" \"10.0.0.1:80\""
    );
}

#[test]
fn text_format_operators() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(
        &dir,
        vec![text(
            "%REQ(:METHOD)% %REQ(X-MISSING?USER-AGENT):4% %REQ(:SCHEME)% %RESP(X-A)% %RESPONSE_CODE% \
             %RESPONSE_CODE_DETAILS% %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% \
             %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_PORT% %CONNECTION_ID% %UPSTREAM_CLUSTER% \
             %UPSTREAM_REQUEST_ATTEMPT_COUNT% %DOWNSTREAM_PEER_URI_SAN% %ROUTE_NAME% %PROTOCOL%\n",
        )],
    );
    let mut e = log.capture(&request(), &info(), true);
    e.cluster = Some("backend".into());
    e.attempts = Some(2);
    let mut h = HeaderMap::new();
    h.insert("x-a", HeaderValue::from_static("yes"));
    log.capture_response(&mut e, &h);
    log.log_http(&e, &end(200, None));
    assert_eq!(
        lines(&path, 1),
        vec![
            "GET curl http yes 200 via_upstream 10.1.2.3:5555 10.1.2.3 127.0.0.1:8080 8080 42 \
             backend 2 - - HTTP/1.1"
        ]
    );
}

#[test]
fn only_the_headers_formats_read_are_captured() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = logger(&dir, vec![text("%REQ(USER-AGENT)% %RESP(X-A)%\n")]);
    let mut e = log.capture(&request(), &info(), true);
    assert_eq!(e.headers.len(), 1);
    let mut h = HeaderMap::new();
    h.insert("x-a", HeaderValue::from_static("1"));
    h.insert("x-b", HeaderValue::from_static("2"));
    log.capture_response(&mut e, &h);
    assert_eq!(e.resp_headers.len(), 1);
}

#[test]
fn tls_operators_read_the_peer_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(
        &dir,
        vec![text(
            "%DOWNSTREAM_PEER_URI_SAN%|%DOWNSTREAM_PEER_DNS_SAN%|%DOWNSTREAM_PEER_SUBJECT%|\
             %DOWNSTREAM_PEER_ISSUER%|%DOWNSTREAM_PEER_SERIAL%|%DOWNSTREAM_PEER_FINGERPRINT_256%|\
             %DOWNSTREAM_TLS_VERSION%|%DOWNSTREAM_TLS_CIPHER%|%REQUESTED_SERVER_NAME%|%REQ(:SCHEME)%\n",
        )],
    );
    let mut req = request();
    req.extensions_mut().insert(Arc::new(PeerIdentity {
        uri_sans: vec![
            "spiffe://cluster.local/ns/default/sa/web".into(),
            "spiffe://b".into(),
        ],
        dns_sans: vec!["web.local".into()],
        subject: "CN=web".into(),
        issuer: "CN=ca".into(),
        serial: "1f".into(),
        fingerprint_256: "ab".repeat(32),
        tls_version: "TLSv1.3",
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        sni: Some("web.example".into()),
        ..Default::default()
    }));
    let e = log.capture(&req, &info(), true);
    log.log_http(&e, &end(200, None));
    assert_eq!(
        lines(&path, 1)[0],
        format!(
            "spiffe://cluster.local/ns/default/sa/web,spiffe://b|web.local|CN=web|CN=ca|1f|{}|\
             TLSv1.3|TLS_AES_128_GCM_SHA256|web.example|https",
            "ab".repeat(32)
        )
    );
}

#[test]
fn json_values_keep_envoys_types() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(
        &dir,
        vec![json(
            &[
                ("code", "%RESPONSE_CODE%"),
                ("method", "%REQ(:METHOD)%"),
                ("missing", "%REQ(X-NOPE)%"),
                ("mixed", "%REQ(:METHOD)% %REQ(X-NOPE)%"),
                ("bytes", "%BYTES_SENT%"),
                ("ua", "%REQ(USER-AGENT)%"),
                ("const", "7"),
            ],
            false,
        )],
    );
    let mut req = request();
    req.headers_mut()
        .insert("user-agent", HeaderValue::from_static("a\"b\\c"));
    let e = log.capture(&req, &info(), true);
    log.log_http(&e, &end(201, None));
    let v: serde_json::Value = serde_json::from_str(&lines(&path, 1)[0]).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"code": 201, "method": "GET", "missing": null,
            "mixed": "GET -", "bytes": 91, "ua": "a\"b\\c", "const": 7})
    );
}

#[test]
fn omit_empty_values_drops_missing_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(
        &dir,
        vec![
            json(
                &[
                    ("a", "%REQ(X-NOPE)%"),
                    ("m", "%REQ(:METHOD)%"),
                    ("b", "%REQ(X-NOPE)%"),
                ],
                true,
            ),
            {
                let mut t = text("[%REQ(X-NOPE)%]\n");
                if let Some(f) = t.format.as_mut() {
                    f.omit_empty_values = true;
                }
                t
            },
        ],
    );
    let e = log.capture(&request(), &info(), true);
    log.log_http(&e, &end(200, None));
    let mut got = lines(&path, 2);
    got.sort();
    assert_eq!(got, vec!["[]".to_owned(), "{\"m\":\"GET\"}".to_owned()]);
}

#[test]
fn filters_choose_the_lines() {
    let dir = tempfile::tempdir().unwrap();
    let with = |f: AccessLogFilter, tag: &str| {
        let mut l = text(&format!("{tag} %RESPONSE_CODE%\n"));
        l.filter = Some(f);
        l
    };
    let header = mesh_core::config::HeaderMatcher {
        name: "x-debug".into(),
        kind: mesh_core::config::HeaderMatchKind::Present(true),
        invert: false,
        treat_missing_as_empty: false,
    };
    let (log, path) = logger(
        &dir,
        vec![
            with(AccessLogFilter::StatusCode(Comparison::Ge, 500), "5xx"),
            with(AccessLogFilter::ResponseFlag(vec!["UF".into()]), "uf"),
            with(AccessLogFilter::ResponseFlag(vec![]), "anyflag"),
            with(AccessLogFilter::Header(header.clone()), "debug"),
            with(
                AccessLogFilter::And(vec![
                    AccessLogFilter::StatusCode(Comparison::Eq, 200),
                    AccessLogFilter::NotHealthCheck,
                ]),
                "ok",
            ),
            with(
                AccessLogFilter::Or(vec![
                    AccessLogFilter::Duration(Comparison::Ge, 60_000),
                    AccessLogFilter::GrpcStatus(vec![14], false),
                ]),
                "unavailable",
            ),
        ],
    );
    let e = log.capture(&request(), &info(), true);
    log.log_http(&e, &end(200, None));
    let mut dbg = request();
    dbg.headers_mut()
        .insert("x-debug", HeaderValue::from_static("1"));
    let e = log.capture(&dbg, &info(), true);
    log.log_http(&e, &end(503, Some(ResponseFlag::UpstreamConnectionFailure)));
    let e = log.capture(&request(), &info(), true);
    log.log_http(&e, &end(504, Some(ResponseFlag::UpstreamRequestTimeout)));
    let mut got = lines(&path, 9);
    got.sort();
    assert_eq!(
        got,
        vec![
            "5xx 503",
            "5xx 504",
            "anyflag 503",
            "anyflag 504",
            "debug 503",
            "ok 200",
            "uf 503",
            "unavailable 503",
            "unavailable 504"
        ]
    );
}

#[test]
fn tcp_lines_show_dashes_for_http_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(&dir, vec![AccessLogSink::Stdout.into()]);
    let conn = TcpConn {
        peer: "10.1.2.3:5555".parse().unwrap(),
        local: None,
        id: 1,
        tls: None,
    };
    let outcome = super::listener::TcpOutcome {
        upstream: Some("10.0.0.1:80".parse().unwrap()),
        ..Default::default()
    };
    log.log_tcp(SystemTime::now(), Instant::now(), 5, 6, &outcome, &conn);
    let line = &lines(&path, 1)[0];
    let rest = line.split_once("] ").unwrap().1;
    assert!(rest.starts_with("\"- - -\" 0 - 5 6 "), "{line}");
    assert!(
        rest.ends_with(" - \"-\" \"-\" \"-\" \"-\" \"10.0.0.1:80\""),
        "{line}"
    );
}

#[test]
fn remote_address_comes_from_xff_unless_use_remote_address() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = logger(
        &dir,
        vec![text(
            "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%\n",
        )],
    );
    let mut req = request();
    req.headers_mut().insert(
        "x-forwarded-for",
        HeaderValue::from_static("1.1.1.1, 10.9.9.9"),
    );
    log.log_http(&log.capture(&req, &info(), true), &end(200, None));
    log.log_http(&log.capture(&req, &info(), false), &end(200, None));
    assert_eq!(
        lines(&path, 2),
        vec!["10.9.9.9:0 10.1.2.3", "10.1.2.3:5555 10.1.2.3"]
    );
}
