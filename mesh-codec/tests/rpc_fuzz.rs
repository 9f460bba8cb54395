//! A stable-toolchain fuzz harness for the RPC decoders (cargo-fuzz needs
//! nightly, which this project does not use).
//!
//! For each codec it mutates seed frames (valid requests, responses,
//! heartbeats and errors of every wire variant, plus any files in
//! `tests/fuzz-seeds/<codec>/`) with bit flips, byte changes, interesting
//! integers written over length fields, truncation, duplication and
//! splicing, and checks on every input that:
//!
//! - decoding never panics (a panic fails the test with the input printed);
//! - the buffer never grows past the maximum frame size because of a length
//!   read from the input;
//! - feeding the same bytes in random pieces gives the same messages as
//!   feeding them whole (partial frames are handled by the decoder, not lost
//!   or duplicated);
//! - a decoded message encodes back into a frame that decodes to the same
//!   id, kind and metadata.
//!
//! It runs for `MESH_FUZZ_SECS` seconds per codec (default 2) from a seed
//! taken from `MESH_FUZZ_SEED` (default: time-based, printed so a failure
//! can be replayed).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use mesh_codec::rpc::{bolt, dubbo, thrift, Codec, Message, MessageKind, ProxyError};

const MAX_FRAME: usize = 64 * 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    const INTERESTING: [u32; 10] = [
        0,
        1,
        0x7f,
        0xff,
        0x7fff,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        MAX_FRAME as u32 + 1,
    ];
    for _ in 0..=rng.below(4) {
        match rng.below(8) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 if input.len() >= 4 => {
                let i = rng.below(input.len() - 3);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                input[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 => {
                let n = rng.below(input.len() + 1);
                input.truncate(n);
            }
            4 if !input.is_empty() => {
                let a = rng.below(input.len());
                let b = a + rng.below(input.len() - a);
                let chunk = input[a..b].to_vec();
                let at = rng.below(input.len());
                input.splice(at..at, chunk);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                input.extend_from_slice(other);
            }
            6 if !input.is_empty() => {
                let i = rng.below(input.len());
                input.remove(i);
            }
            _ => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
        }
    }
}

/// Decodes everything decodable from `data` handed over in pieces.
fn decode_all(codec: &dyn Codec, data: &[u8], rng: Option<&mut Rng>) -> (Vec<Message>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut rng = rng;
    loop {
        let step = match rng.as_mut() {
            Some(r) => 1 + r.below(64),
            None => data.len(),
        };
        let end = (pos + step).min(data.len());
        buf.extend_from_slice(&data[pos..end]);
        pos = end;
        loop {
            match codec.decode(&mut buf, MAX_FRAME) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
            assert!(
                buf.capacity() <= 2 * MAX_FRAME + data.len() + 64,
                "buffer grew to {} for a {}-byte input",
                buf.capacity(),
                data.len()
            );
        }
        assert!(
            buf.capacity() <= 2 * MAX_FRAME + data.len() + 64,
            "buffer grew to {} for a {}-byte input",
            buf.capacity(),
            data.len()
        );
        if pos == data.len() {
            return (out, false);
        }
    }
}

fn check(codec: &dyn Codec, data: &[u8], rng: &mut Rng) {
    let (whole, whole_err) = decode_all(codec, data, None);
    let (pieces, pieces_err) = decode_all(codec, data, Some(rng));
    assert_eq!(whole.len(), pieces.len(), "pieces and whole disagree");
    assert_eq!(whole_err, pieces_err, "pieces and whole disagree on errors");
    for (a, b) in whole.iter().zip(&pieces) {
        assert_eq!(a, b);
    }
    for m in &whole {
        let mut out = BytesMut::new();
        codec.encode(m, m.id, &mut out);
        let again = codec
            .decode(&mut out, MAX_FRAME * 2)
            .unwrap_or_else(|e| panic!("re-encoded frame does not decode: {e}"))
            .expect("re-encoded frame is incomplete");
        assert_eq!((again.id, again.kind), (m.id, m.kind));
        assert_eq!(again.meta, m.meta);
        if m.kind == MessageKind::Request {
            // Error replies are always encodable.
            if let Some(e) = codec.error_reply(m, ProxyError::Timeout, "fuzz") {
                let mut out = BytesMut::new();
                codec.encode(&e, e.id, &mut out);
            }
        }
    }
}

fn seed() -> u64 {
    std::env::var("MESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        })
}

fn budget() -> Duration {
    let secs = std::env::var("MESH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn corpus(name: &str, mut seeds: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-seeds")
        .join(name);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                seeds.push(b);
            }
        }
    }
    seeds
}

fn fuzz(name: &str, codec: &dyn Codec, seeds: Vec<Vec<u8>>) {
    let seeds = corpus(name, seeds);
    let s = seed();
    let mut rng = Rng(s);
    let deadline = Instant::now() + budget();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &seeds, &mut input);
        let mut check_rng = Rng(rng.next() | 1);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(codec, &input, &mut check_rng)
        }));
        if let Err(e) = result {
            panic!(
                "{name}: failed on input {:02x?} (MESH_FUZZ_SEED={s}, run {runs}): {:?}",
                input,
                e.downcast_ref::<String>()
                    .map(String::as_str)
                    .or(e.downcast_ref::<&str>().copied())
            );
        }
        runs += 1;
    }
    eprintln!("{name}: {runs} inputs, MESH_FUZZ_SEED={s}");
    assert!(runs > 0);
}

fn encoded(codec: &dyn Codec, m: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec.encode(m, m.id, &mut out);
    out.to_vec()
}

#[test]
fn fuzz_thrift() {
    let codec = thrift::Thrift::default();
    let mut seeds = Vec::new();
    // Unframed/framed (bit 0) strict binary, lax binary (2), compact (4),
    // and the header transport (8) with binary or compact.
    for wire in [0u32, 1, 2, 3, 4, 5, 8, 12] {
        let mut call = Message::new(7, MessageKind::Request);
        call.meta.method = "Calc:add".into();
        call.wire = wire;
        if wire & 8 != 0 {
            call.meta.headers = vec![("x-route".into(), "blue".into()), ("k".into(), "".into())];
        }
        call.body = if wire & 4 != 0 {
            // compact: i32 field 1 = 2, list<string> field 2 = ["ab"], STOP
            bytes::Bytes::from_static(&[0x15, 0x04, 0x19, 0x18, 0x02, b'a', b'b', 0x00])
        } else {
            bytes::Bytes::from_static(&[
                8, 0, 1, 0, 0, 0, 2, 15, 0, 2, 11, 0, 0, 0, 1, 0, 0, 0, 2, b'a', b'b', 13, 0, 3, 8,
                12, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0,
            ])
        };
        seeds.push(encoded(&codec, &call));
        let e = codec
            .error_reply(&call, ProxyError::NoRoute, "no route")
            .expect("an error reply");
        seeds.push(encoded(&codec, &e));
        let mut oneway = call.clone();
        oneway.kind = MessageKind::Oneway;
        seeds.push(encoded(&codec, &oneway));
    }
    fuzz("thrift", &codec, seeds.clone());
    // Configured lax binary, unframed.
    let lax = thrift::Thrift {
        transport: Some(thrift::Transport::Unframed),
        protocol: Some(thrift::Protocol::LaxBinary),
        ..thrift::Thrift::default()
    };
    let mut call = Message::new(9, MessageKind::Request);
    call.meta.method = "ping".into();
    call.wire = 2;
    call.body = bytes::Bytes::from_static(&[0]);
    fuzz("thrift-lax", &lax, vec![encoded(&lax, &call)]);
}

#[test]
fn fuzz_dubbo() {
    let codec = dubbo::Dubbo;
    let req = dubbo::request(
        3,
        "com.example.Greeter",
        "1.0.0",
        "sayHello",
        &["world", &"long".repeat(20)],
        &[
            ("group".into(), "g".into()),
            ("x-canary".into(), "1".into()),
        ],
    )
    .to_vec();
    let parsed = codec
        .decode(&mut BytesMut::from(&req[..]), MAX_FRAME)
        .expect("seed decodes")
        .expect("seed is whole");
    let err = codec
        .error_reply(&parsed, ProxyError::Timeout, "timeout")
        .expect("an error reply");
    let hb = codec.heartbeat(4).expect("a heartbeat");
    // A request whose argument is an object with a class definition.
    let mut obj = BytesMut::new();
    for s in ["2.0.2", "svc", "", "m", "Lcom/example/Pt;"] {
        mesh_codec::rpc::hessian::write_string(&mut obj, s);
    }
    obj.extend_from_slice(&[
        b'C', 2, b'P', b't', 0x92, 1, b'x', 1, b'y', 0x60, 0x91, 0x92,
    ]);
    mesh_codec::rpc::hessian::write_string_map(&mut obj, &[("k".into(), "v".into())]);
    let mut objreq = vec![0xda, 0xbb, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    objreq.extend_from_slice(&(obj.len() as u32).to_be_bytes());
    objreq.extend_from_slice(&obj);
    fuzz(
        "dubbo",
        &codec,
        vec![req, encoded(&codec, &err), encoded(&codec, &hb), objreq],
    );
}

#[test]
fn fuzz_bolt() {
    let codec = bolt::Bolt;
    let req = bolt::request(11, "com.example.Hello:1.0", "sayHello", b"content").to_vec();
    let parsed = codec
        .decode(&mut BytesMut::from(&req[..]), MAX_FRAME)
        .expect("seed decodes")
        .expect("seed is whole");
    let err = codec
        .error_reply(&parsed, ProxyError::NoRoute, "no route")
        .expect("an error reply");
    let hb = codec.heartbeat(12).expect("a heartbeat");
    let legacy: &[u8] = b"O\xbccom.alipay.sofa.rpc.core.request.SofaRequest\x95\nmethodName\rmethodArgSigs\x17targetServiceUniqueName\rtargetAppName\x0crequestPropso\x90\x06whoamiN";
    let with_hessian = bolt::request(13, "svc:1.0", "", legacy).to_vec();
    fuzz(
        "bolt",
        &codec,
        vec![
            req,
            encoded(&codec, &err),
            encoded(&codec, &hb),
            with_hessian,
        ],
    );
}
