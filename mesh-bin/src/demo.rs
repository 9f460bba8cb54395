//! Demo upstreams for `mesh demo`: small HTTP/1.1 + h2c servers that answer
//! every request with who they are and what they received, so the
//! quickstart configuration works with nothing else running.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Serves a demo upstream called `name` on `listener` until the process
/// exits. Each reply names the upstream, the method, the path, the
/// request's headers and the body length.
pub async fn serve(listener: tokio::net::TcpListener, name: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| reply(name, req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn reply(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut text = format!(
        "upstream: {name}\nrequest: {} {} {:?}\nbody bytes: {len}\n",
        parts.method,
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
        parts.version
    );
    for (k, v) in &parts.headers {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static(name));
    Ok(resp)
}

/// Binds and starts the demo upstreams named in the quickstart config.
pub async fn start(upstreams: &[(&'static str, SocketAddr)]) -> std::io::Result<()> {
    for (name, addr) in upstreams {
        let l = tokio::net::TcpListener::bind(addr).await?;
        tokio::spawn(serve(l, name));
    }
    Ok(())
}
