//! `Proxy` embedded in a Rust program: real sockets on 127.0.0.1 ephemeral
//! ports, a hyper upstream and a hyper client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_bin::{bootstrap, Proxy, ProxyOptions};

/// An HTTP/1.1 upstream answering `name`; `/slow` answers after 300 ms.
async fn upstream(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let body = format!("{name} {}", req.uri());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn config(upstream: SocketAddr, refused: SocketAddr) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: web
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/down" }}
                route: {{ cluster: down }}
              - match: {{ prefix: "/api/" }}
                route: {{ cluster: up, prefix_rewrite: "/v2/" }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: up }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
  - name: down
    connect_timeout: 1s
    load_assignment:
      cluster_name: down
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
"#,
        upstream.port(),
        refused.port()
    )
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A port nothing listens on.
fn refused_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn start() -> Proxy {
    let up = upstream("up").await;
    let cfg = config(up, refused_port());
    let b = bootstrap::load_str(&cfg).unwrap();
    Proxy::start(b, ProxyOptions::default(), serde_json::Value::Null)
        .await
        .unwrap()
}

#[tokio::test]
async fn forwards_rewrites_and_counts() {
    let proxy = start().await;
    let addr = proxy.listener_addr("web").unwrap();
    assert_eq!(get(addr, "/hello").await, (200, "up /hello".into()));
    assert_eq!(
        get(addr, "/api/users?x=1").await,
        (200, "up /v2/users?x=1".into())
    );
    let (status, body) = get(addr, "/down").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("upstream connect error"), "{body}");
    let stats = proxy.stats();
    let up = [
        ("envoy_response_code_class", "2".to_owned()),
        ("envoy_cluster_name", "up".to_owned()),
    ];
    assert_eq!(stats.value("envoy_cluster_upstream_rq_xx", &up), Some(2));
    assert_eq!(
        stats.value(
            "envoy_cluster_upstream_cx_connect_fail",
            &[("envoy_cluster_name", "down".into())]
        ),
        Some(1)
    );
    assert_eq!(
        stats.value(
            "mesh_http_downstream_rq_response_flag",
            &[
                ("envoy_http_conn_manager_prefix", "web".into()),
                ("flag", "UF".into())
            ]
        ),
        Some(1)
    );
    assert!(proxy.shutdown().await);
}

#[tokio::test]
async fn drain_lets_in_flight_requests_finish_and_stops_accepting() {
    let proxy = start().await;
    let addr = proxy.listener_addr("web").unwrap();
    let in_flight = tokio::spawn(get(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let drain = proxy.drain().clone();
    let shutdown = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(drain.is_draining());
    // The request that was in flight completes normally...
    assert_eq!(in_flight.await.unwrap(), (200, "up /slow".into()));
    // ...and the drain ends cleanly, well before the drain time.
    assert!(tokio::time::timeout(Duration::from_secs(3), shutdown)
        .await
        .unwrap()
        .unwrap());
    // The listening sockets are closed: new connections are refused.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
