//! Decode + encode throughput of each RPC codec on a typical request and
//! response: the work the proxy does per message besides routing and I/O.
//! The baseline beside each codec is a plain copy of the same bytes (what a
//! TCP proxy costs for them).
//!
//! `cargo bench -p mesh-codec --bench rpc_codecs -- --warm-up-time 1 --measurement-time 2`

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_codec::rpc::{bolt, dubbo, thrift, Codec, Message, MessageKind};

const MAX: usize = 8 * 1024 * 1024;

fn round_trip(codec: &dyn Codec, frame: &[u8], buf: &mut BytesMut, out: &mut BytesMut) -> usize {
    buf.extend_from_slice(frame);
    out.clear();
    // Re-encode with a rewritten id, as the upstream side does.
    if let Ok(Some(msg)) = codec.decode(buf, MAX) {
        codec.encode(&msg, msg.id + 1, out);
    }
    out.len()
}

fn frames() -> Vec<(&'static str, Box<dyn Codec>, Vec<u8>)> {
    let mut v: Vec<(&'static str, Box<dyn Codec>, Vec<u8>)> = Vec::new();
    let att = vec![
        ("group".to_string(), "blue".to_string()),
        ("x-request-id".to_string(), "0123456789abcdef".to_string()),
    ];
    v.push((
        "dubbo_request",
        Box::new(dubbo::Dubbo),
        dubbo::request(
            1,
            "com.example.GreeterService",
            "1.0.0",
            "sayHello",
            &["world", &"x".repeat(200)],
            &att,
        )
        .to_vec(),
    ));
    v.push((
        "bolt_request",
        Box::new(bolt::Bolt),
        bolt::request(1, "com.example.Greeter:1.0", "sayHello", &[7u8; 256]).to_vec(),
    ));
    for (name, wire) in [("thrift_framed_binary", 1u32), ("thrift_framed_compact", 5)] {
        let codec = thrift::Thrift::default();
        let mut m = Message::new(1, MessageKind::Request);
        m.meta.method = "sayHello".into();
        m.wire = wire;
        let mut body = BytesMut::new();
        if wire & 4 != 0 {
            body.extend_from_slice(&[0x18, 0x7f]);
            body.extend_from_slice(&[b'x'; 127]);
            body.extend_from_slice(&[0x18, 0x7f]);
            body.extend_from_slice(&[b'y'; 127]);
            body.extend_from_slice(&[0]);
        } else {
            for _ in 0..2 {
                body.extend_from_slice(&[11, 0, 1, 0, 0, 0, 127]);
                body.extend_from_slice(&[b'x'; 127]);
            }
            body.extend_from_slice(&[0]);
        }
        m.body = body.freeze();
        let mut out = BytesMut::new();
        codec.encode(&m, 1, &mut out);
        v.push((name, Box::new(codec), out.to_vec()));
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("rpc_decode_encode");
    for (name, codec, frame) in frames() {
        g.throughput(Throughput::Bytes(frame.len() as u64));
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut out = BytesMut::with_capacity(64 * 1024);
        g.bench_function(name, |b| {
            b.iter(|| {
                round_trip(
                    codec.as_ref(),
                    std::hint::black_box(&frame),
                    &mut buf,
                    &mut out,
                )
            })
        });
        g.bench_function(format!("{name}_copy_baseline"), |b| {
            b.iter(|| {
                out.clear();
                out.extend_from_slice(std::hint::black_box(&frame));
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
