//! `max_requests_per_connection` in the endpoint pools, against a real
//! hyper server that counts the connections it accepts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_codec::http::client::{EndpointPool, PoolConfig, PoolProtocol};
use mesh_codec::http::ProxyBody;
use tokio::net::TcpListener;

/// A server answering "ok" over HTTP/1.1 or h2c; returns its address and
/// its accepted-connection count.
async fn server(h2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(ProxyBody::full("ok")))
                });
                let io = TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, count)
}

async fn run(h2: bool, max: Option<u32>, requests: usize) -> usize {
    let (addr, count) = server(h2).await;
    let pool = EndpointPool::new(
        addr,
        PoolConfig {
            protocol: if h2 {
                PoolProtocol::Http2
            } else {
                PoolProtocol::Http1
            },
            connect_timeout: Duration::from_secs(1),
            max_idle: 16,
            idle_timeout: None,
            max_requests_per_connection: max,
        },
    );
    for _ in 0..requests {
        let uri = if h2 {
            format!("http://{addr}/")
        } else {
            "/".to_owned()
        };
        let mut req = Request::get(uri).body(ProxyBody::default()).unwrap();
        if !h2 {
            req.headers_mut()
                .insert(http::header::HOST, "x".parse().unwrap());
        }
        let (resp, on_end) = pool.send(req, false).await.unwrap();
        let mut body = resp.into_body();
        let mut n = 0;
        while let Some(f) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Ok(d) = f.unwrap().into_data() {
                n += d.len();
            }
        }
        assert_eq!(n, 2);
        if let Some(mut e) = on_end {
            e.fire(true, n as u64);
        }
    }
    count.load(Ordering::SeqCst)
}

#[tokio::test]
async fn http1_connection_closes_after_max_requests() {
    assert_eq!(run(false, None, 5).await, 1);
    assert_eq!(run(false, Some(2), 5).await, 3);
    assert_eq!(run(false, Some(1), 3).await, 3);
}

#[tokio::test]
async fn http2_connection_takes_no_streams_after_max_requests() {
    assert_eq!(run(true, None, 5).await, 1);
    assert_eq!(run(true, Some(2), 5).await, 3);
    assert_eq!(run(true, Some(1), 3).await, 3);
}
