//! Embedding mesh's router and a load-balanced cluster in a Rust program,
//! without the `mesh` binary and without any YAML.
//!
//! The program builds a route table from the typed configuration model,
//! a weighted round-robin balancer over two in-process upstreams, and
//! serves them as a `tower::Service` that any hyper/axum/tonic stack could
//! call. It then sends a few requests through it and prints who answered.
//!
//! Run: `cargo run -p mesh-examples --example embedded_router`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_codec::http::client::{EndpointPool, PoolConfig, PoolProtocol};
use mesh_codec::http::ProxyBody;
use mesh_core::config::{
    Action, ClusterSpecifier, HeaderMatchKind, HeaderMatcher, HeaderMutations, LbPolicy, PathMatch,
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use mesh_core::router::{CompiledAction, RouteTable};
use mesh_lb::{Balancer, EndpointSpec};
use tower::{Service, ServiceExt};

/// A tower Service: route a request, pick an endpoint, forward it.
#[derive(Clone)]
struct Gateway {
    routes: Arc<RouteTable>,
    backends: Arc<Balancer>,
    pools: Arc<std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<EndpointPool>>>>,
}

impl Gateway {
    fn pool(&self, addr: SocketAddr) -> Arc<EndpointPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(addr)
            .or_insert_with(|| {
                EndpointPool::new(
                    addr,
                    PoolConfig {
                        protocol: PoolProtocol::Http1,
                        connect_timeout: Duration::from_secs(1),
                        max_idle: 64,
                        idle_timeout: Some(Duration::from_secs(60)),
                        max_requests_per_connection: None,
                    },
                )
            })
            .clone()
    }

    async fn call_inner(self, req: Request<ProxyBody>) -> Response<ProxyBody> {
        let Some(m) = self.routes.route(&req) else {
            return status(StatusCode::NOT_FOUND);
        };
        match &m.route.action {
            CompiledAction::DirectResponse { status: s, body } => {
                let mut r = Response::new(ProxyBody::full(body.clone().unwrap_or_default()));
                *r.status_mut() = *s;
                r
            }
            CompiledAction::Route(_) => {
                let Some(endpoint) = self.backends.pick() else {
                    return status(StatusCode::SERVICE_UNAVAILABLE);
                };
                match self.pool(endpoint.addr).send(req, false).await {
                    Ok((resp, on_end)) => resp.map(|b| {
                        ProxyBody::Upstream(mesh_codec::http::body::UpstreamBody::new(
                            b, on_end, None,
                        ))
                    }),
                    Err(_) => status(StatusCode::SERVICE_UNAVAILABLE),
                }
            }
            CompiledAction::Redirect(_) => status(StatusCode::NOT_IMPLEMENTED),
        }
    }
}

fn status(s: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Empty);
    *r.status_mut() = s;
    r
}

impl Service<Request<ProxyBody>> for Gateway {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.call_inner(req).await) })
    }
}

/// A tiny upstream that answers with its name.
async fn upstream(name: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn route(path: PathMatch, headers: Vec<HeaderMatcher>, action: Action) -> Route {
    Route {
        name: String::new(),
        matcher: RouteMatch {
            path,
            case_sensitive: true,
            headers,
            query_parameters: vec![],
            grpc: false,
        },
        action,
        headers: HeaderMutations::default(),
        policy: Default::default(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = upstream("a").await?;
    let b = upstream("b").await?;

    let routes = RouteTable::new(&RouteConfiguration {
        name: "embedded".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![
                route(
                    PathMatch::Prefix("/".into()),
                    vec![HeaderMatcher {
                        name: "x-maintenance".into(),
                        kind: HeaderMatchKind::Present(true),
                        invert: false,
                        treat_missing_as_empty: false,
                    }],
                    Action::DirectResponse {
                        status: 503,
                        body: Some(Bytes::from_static(b"down for maintenance")),
                    },
                ),
                route(
                    PathMatch::Prefix("/api".into()),
                    vec![],
                    Action::Route(RouteAction {
                        timeout: Some(Duration::from_secs(5)),
                        ..RouteAction::new(ClusterSpecifier::Cluster("backends".into()))
                    }),
                ),
            ],
            headers: HeaderMutations::default(),
            policy: Default::default(),
        }],
        headers: HeaderMutations::default(),
    })?;

    let spec = |addr: SocketAddr, weight| EndpointSpec::new(addr).with_weight(weight);
    let backends = Balancer::with_endpoints(LbPolicy::RoundRobin, vec![spec(a, 3), spec(b, 1)]);

    let mut gateway = Gateway {
        routes: Arc::new(routes),
        backends: Arc::new(backends),
        pools: Default::default(),
    };

    for (path, maintenance) in [
        ("/api/1", false),
        ("/api/2", false),
        ("/api/3", false),
        ("/api/4", false),
        ("/api/5", true),
        ("/other", false),
    ] {
        let mut req = Request::builder().uri(path).header("host", "example.com");
        if maintenance {
            req = req.header("x-maintenance", "1");
        }
        let req = req.body(ProxyBody::Empty)?;
        let resp = gateway.ready().await?.call(req).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        println!("{path:8} -> {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}
