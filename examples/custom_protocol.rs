//! A new RPC protocol in one small codec: "kv", a length-prefixed protocol
//! invented for this example, gets mesh's routing (by service, method and
//! header), load balancing, timeouts, per-method stats, access logs,
//! pipelining and upstream multiplexing with no other code.
//!
//! ```text
//! u32 length | u32 request id | u8 kind (0 request, 1 response, 2 error)
//! | u8 n | service (n bytes) | u8 m | method (m bytes) | payload
//! ```
//!
//! The program starts two "kv" upstream servers (built on the same
//! framework's server side), runs a proxy from YAML whose `rpc_proxy`
//! uses the registered codec, sends requests through it and prints who
//! answered and the proxy's stats.
//!
//! Run: `cargo run -p mesh-examples --example custom_protocol`

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mesh_bin::rpc::CodecRegistry;
use mesh_bin::{Proxy, ProxyOptions};
use mesh_codec::rpc::server::{serve, ServerConfig};
use mesh_codec::rpc::{Codec, DecodeError, Message, MessageKind, ProxyError};
use mesh_core::config::{NetworkFilter, RpcCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The "kv" codec: everything mesh needs to proxy the protocol.
struct Kv;

impl Codec for Kv {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn decode(&self, src: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > max_frame {
            return Err(DecodeError::too_large(len, max_frame));
        }
        if len < 7 {
            return Err(DecodeError::new("kv: frame shorter than its header"));
        }
        if src.len() < 4 + len {
            return Ok(None);
        }
        let frame = src.split_to(4 + len).freeze();
        let mut b = frame.slice(4..);
        let id = u64::from(b.get_u32());
        let kind = match b.get_u8() {
            0 => MessageKind::Request,
            1 => MessageKind::Response,
            2 => MessageKind::Error,
            k => return Err(DecodeError::new(format!("kv: unknown kind {k}"))),
        };
        let field = |b: &mut Bytes| -> Result<String, DecodeError> {
            let n = usize::from(*b.first().ok_or(DecodeError::new("kv: truncated"))?);
            if b.len() < 1 + n {
                return Err(DecodeError::new("kv: truncated"));
            }
            let s = String::from_utf8_lossy(&b[1..1 + n]).into_owned();
            b.advance(1 + n);
            Ok(s)
        };
        let mut msg = Message::new(id, kind);
        msg.meta.service = field(&mut b)?;
        msg.meta.method = field(&mut b)?;
        msg.body = b;
        Ok(Some(msg))
    }

    fn encode(&self, msg: &Message, id: u64, dst: &mut BytesMut) {
        let (s, m) = (msg.meta.service.as_bytes(), msg.meta.method.as_bytes());
        dst.put_u32((7 + s.len() + m.len() + msg.body.len()) as u32);
        dst.put_u32(id as u32);
        dst.put_u8(match msg.kind {
            MessageKind::Response => 1,
            MessageKind::Error => 2,
            _ => 0,
        });
        dst.put_u8(s.len() as u8);
        dst.put_slice(s);
        dst.put_u8(m.len() as u8);
        dst.put_slice(m);
        dst.put_slice(&msg.body);
    }

    fn error_reply(&self, req: &Message, err: ProxyError, detail: &str) -> Option<Message> {
        let mut m = Message::new(req.id, MessageKind::Error);
        m.body = Bytes::from(format!("{err}: {detail}"));
        Some(m)
    }

    fn max_request_id(&self) -> u64 {
        u64::from(u32::MAX)
    }
}

/// A "kv" upstream named `name`: answers `name: <payload>`.
async fn upstream(name: &'static str) -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let svc = tower::service_fn(move |req: Message| async move {
                let mut resp = Message::new(req.id, MessageKind::Response);
                resp.body = Bytes::from(format!("{name}: {}", String::from_utf8_lossy(&req.body)));
                Ok::<_, Infallible>(Some(resp))
            });
            let config = ServerConfig::default();
            tokio::spawn(async move {
                serve(sock, Arc::new(Kv), &config, svc, CancellationToken::new()).await;
            });
        }
    });
    Ok(port)
}

const CONFIG: &str = r#"
static_resources:
  listeners:
  - name: kv
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: mesh.filters.network.rpc_proxy
        typed_config:
          "@type": type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy
          stat_prefix: kv
          codec: bolt        # replaced by the registered "kv" codec below
          route_config:
            routes:
            - match: {service: {exact: greeter}, method: {exact: hello}}
              route: {cluster: greeters, timeout: 1s}
  clusters:
  - name: greeters
    load_assignment:
      cluster_name: greeters
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_A}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_B}}}
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (a, b) = (upstream("blue").await?, upstream("green").await?);
    let yaml = CONFIG
        .replace("PORT_A", &a.to_string())
        .replace("PORT_B", &b.to_string());
    let mut bootstrap = mesh_bin::bootstrap::load_str(&yaml)?;
    for l in &mut bootstrap.listeners {
        for c in &mut l.filter_chains {
            if let NetworkFilter::Rpc(rpc) = &mut c.terminal {
                rpc.codec = RpcCodec::Custom("kv".into());
            }
        }
    }
    let mut codecs = CodecRegistry::default();
    codecs.register("kv", Arc::new(Kv));
    let options = ProxyOptions {
        rpc_codecs: codecs,
        ..Default::default()
    };
    let proxy = Proxy::start(bootstrap, options, serde_json::Value::Null).await?;
    let addr = proxy.listener_addr("kv").ok_or("no kv listener")?;

    // Pipeline five requests on one connection, then one with no route.
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let mut out = BytesMut::new();
    for i in 0..5u64 {
        let mut m = Message::new(i, MessageKind::Request);
        m.meta.service = "greeter".into();
        m.meta.method = "hello".into();
        m.body = Bytes::from(format!("request {i}"));
        Kv.encode(&m, i, &mut out);
    }
    let mut lost = Message::new(99, MessageKind::Request);
    lost.meta.service = "nobody".into();
    lost.meta.method = "hello".into();
    Kv.encode(&lost, 99, &mut out);
    sock.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let mut answers = 0;
    while answers < 6 {
        if let Some(m) = Kv.decode(&mut buf, 1 << 20)? {
            println!(
                "id {:>2} {:?}: {}",
                m.id,
                m.kind,
                String::from_utf8_lossy(&m.body)
            );
            answers += 1;
        } else if sock.read_buf(&mut buf).await? == 0 {
            return Err("the proxy closed the connection".into());
        }
    }
    let stats = proxy.stats().render_prometheus();
    for line in stats
        .lines()
        .filter(|l| l.starts_with("mesh_rpc_method_request_total"))
    {
        println!("{line}");
    }
    proxy.shutdown().await;
    Ok(())
}
