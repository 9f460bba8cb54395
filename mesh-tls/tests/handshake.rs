//! Real handshakes over loopback TCP between `ServerTls` and `ClientTls`,
//! with certificates made by rcgen at test time.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::tls::*;
use mesh_tls::{ClientTls, HandshakeFailure, SecretStore, ServerTls, TlsStats, UpstreamAlpn};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf signed by `ca` with DNS and URI SANs: (chain PEM, key PEM).
fn leaf(ca: &Ca, dns: &[&str], uris: &[&str], expired: bool) -> (String, String) {
    let mut p =
        CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    for u in uris {
        p.subject_alt_names
            .push(SanType::URI(u.to_string().try_into().unwrap()));
    }
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn inline(s: &str) -> DataSource {
    DataSource::Inline(s.as_bytes().to_vec())
}

fn cert(chain: &str, key: &str) -> TlsCertificate {
    TlsCertificate {
        certificate_chain: inline(chain),
        private_key: inline(key),
    }
}

fn uri_exact(v: &str) -> SanMatcher {
    SanMatcher {
        san_type: SanType2::Uri,
        matcher: StringMatcher {
            kind: StringMatch::Exact(v.into()),
            ignore_case: false,
        },
    }
}
use mesh_core::config::tls::SanType as SanType2;

async fn serve_once(
    server: Arc<ServerTls>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<mesh_tls::PeerIdentity, mesh_tls::HandshakeError>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut tls, id) = server.accept(s, Some(Duration::from_secs(5))).await?;
        let mut buf = [0u8; 4];
        if tls.read_exact(&mut buf).await.is_ok() {
            let _ = tls.write_all(&buf).await;
            let _ = tls.flush().await;
        }
        Ok(id)
    });
    (addr, h)
}

struct Pki {
    ca: Ca,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca = ca("mesh test CA");
    let server = leaf(
        &ca,
        &["server.local"],
        &["spiffe://cluster.local/ns/default/sa/server"],
        false,
    );
    let client = leaf(
        &ca,
        &[],
        &["spiffe://cluster.local/ns/default/sa/web"],
        false,
    );
    Pki { ca, server, client }
}

fn downstream(p: &Pki, require: bool, sans: Vec<SanMatcher>) -> DownstreamTlsContext {
    DownstreamTlsContext {
        common: CommonTlsContext {
            tls_certificates: vec![cert(&p.server.0, &p.server.1)],
            validation: Some(ValidationSource::Static(ValidationContext {
                trusted_ca: Some(inline(&p.ca.cert.pem())),
                match_typed_subject_alt_names: sans,
            })),
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        },
        require_client_certificate: require,
    }
}

fn upstream(p: &Pki, client_cert: bool, sans: Vec<SanMatcher>) -> UpstreamTlsContext {
    UpstreamTlsContext {
        common: CommonTlsContext {
            tls_certificates: if client_cert {
                vec![cert(&p.client.0, &p.client.1)]
            } else {
                vec![]
            },
            validation: Some(ValidationSource::Static(ValidationContext {
                trusted_ca: Some(inline(&p.ca.cert.pem())),
                match_typed_subject_alt_names: sans,
            })),
            ..Default::default()
        },
        sni: Some("server.local".into()),
    }
}

/// A server for `downstream(p, require, sans)`, with its stats.
fn server(p: &Pki, require: bool, sans: Vec<SanMatcher>) -> (Arc<ServerTls>, TlsStats) {
    let stats = TlsStats::detached();
    let tls = ServerTls::new(&downstream(p, require, sans), None, stats.clone()).unwrap();
    (Arc::new(tls), stats)
}

/// A client for `upstream(p, client_cert, sans)`, with its stats.
fn client(p: &Pki, client_cert: bool, sans: Vec<SanMatcher>) -> (ClientTls, TlsStats) {
    let stats = TlsStats::detached();
    let tls = ClientTls::new(&upstream(p, client_cert, sans), None, stats.clone()).unwrap();
    (tls, stats)
}

async fn roundtrip(
    client: &ClientTls,
    addr: std::net::SocketAddr,
) -> Result<mesh_tls::PeerIdentity, mesh_tls::HandshakeError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tls, id) = client
        .connect(
            tcp,
            UpstreamAlpn::Http2,
            addr.ip(),
            Some(Duration::from_secs(5)),
        )
        .await?;
    tls.write_all(b"ping").await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    Ok(id)
}

#[tokio::test]
async fn mutual_tls_with_spiffe_sans_both_ways() {
    let p = pki();
    let (server, sstats) = server(
        &p,
        true,
        vec![uri_exact("spiffe://cluster.local/ns/default/sa/web")],
    );
    let (client, _) = client(
        &p,
        true,
        vec![uri_exact("spiffe://cluster.local/ns/default/sa/server")],
    );
    let (addr, h) = serve_once(server).await;
    let up = roundtrip(&client, addr).await.unwrap();
    assert_eq!(
        up.uri_sans,
        vec!["spiffe://cluster.local/ns/default/sa/server"]
    );
    assert_eq!(up.alpn.as_deref(), Some("h2"));
    let down = h.await.unwrap().unwrap();
    assert_eq!(
        down.uri_sans,
        vec!["spiffe://cluster.local/ns/default/sa/web"]
    );
    assert_eq!(
        down.principal(),
        Some("spiffe://cluster.local/ns/default/sa/web")
    );
    assert_eq!(down.sni.as_deref(), Some("server.local"));
    assert_eq!(down.tls_version, "TLSv1.3");
    assert_eq!(sstats.handshake.get(), 1);
    assert_eq!(sstats.tls13.get(), 1);
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let p = pki();
    let (server, sstats) = server(&p, true, vec![]);
    let (client, _) = client(&p, false, vec![]);
    let (addr, h) = serve_once(server).await;
    // TLS 1.3: the client finishes first; the refusal shows on the server
    // and as an alert on the client's first read.
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok((mut tls, _)) = client
        .connect(tcp, UpstreamAlpn::Raw, addr.ip(), None)
        .await
    {
        let _ = tls.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        assert!(tls.read_exact(&mut buf).await.is_err());
    }
    let e = h.await.unwrap().unwrap_err();
    assert_eq!(e.reason, HandshakeFailure::NoCertificate);
    assert_eq!(sstats.fail_verify_no_cert.get(), 1);
    assert_eq!(sstats.connection_error.get(), 0);
}

#[tokio::test]
async fn client_san_mismatch_and_foreign_ca_are_refused() {
    let p = pki();
    let (server, sstats) = server(
        &p,
        true,
        vec![uri_exact("spiffe://cluster.local/ns/default/sa/other")],
    );
    let (client, _) = client(&p, true, vec![]);
    let (addr, h) = serve_once(server.clone()).await;
    let _ = roundtrip_allow_fail(&client, addr).await;
    assert_eq!(
        h.await.unwrap().unwrap_err().reason,
        HandshakeFailure::VerifySan
    );
    assert_eq!(sstats.fail_verify_san.get(), 1);

    // A client certificate from another CA.
    let other = ca("other CA");
    let foreign = leaf(
        &other,
        &[],
        &["spiffe://cluster.local/ns/default/sa/web"],
        false,
    );
    let mut ctx = upstream(&p, false, vec![]);
    ctx.common.tls_certificates = vec![cert(&foreign.0, &foreign.1)];
    let client = ClientTls::new(&ctx, None, TlsStats::detached()).unwrap();
    let (addr, h) = serve_once(server).await;
    let _ = roundtrip_allow_fail(&client, addr).await;
    assert_eq!(
        h.await.unwrap().unwrap_err().reason,
        HandshakeFailure::VerifyError
    );
}

async fn roundtrip_allow_fail(client: &ClientTls, addr: std::net::SocketAddr) -> bool {
    let tcp = TcpStream::connect(addr).await.unwrap();
    match client
        .connect(tcp, UpstreamAlpn::Raw, addr.ip(), None)
        .await
    {
        Ok((mut tls, _)) => {
            let _ = tls.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.is_ok()
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn upstream_san_mismatch_fails_the_client_handshake() {
    let p = pki();
    let (server, _) = server(&p, false, vec![]);
    let (client, cstats) = client(
        &p,
        true,
        vec![uri_exact("spiffe://cluster.local/ns/default/sa/db")],
    );
    let (addr, _h) = serve_once(server).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = client
        .connect(tcp, UpstreamAlpn::Raw, addr.ip(), None)
        .await
        .unwrap_err();
    assert_eq!(e.reason, HandshakeFailure::VerifySan);
    assert_eq!(cstats.fail_verify_san.get(), 1);
}

#[tokio::test]
async fn plain_text_and_stalled_clients() {
    let p = pki();
    let (server, sstats) = server(&p, false, vec![]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = server.clone();
    let h = tokio::spawn(async move {
        let mut out = Vec::new();
        for _ in 0..2 {
            let (s, _) = l.accept().await.unwrap();
            out.push(
                srv.accept(s, Some(Duration::from_millis(300)))
                    .await
                    .map(|_| ())
                    .unwrap_err()
                    .reason,
            );
        }
        out
    });
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf).await;
    let _stalled = TcpStream::connect(addr).await.unwrap();
    let reasons = h.await.unwrap();
    assert_eq!(
        reasons,
        vec![HandshakeFailure::NotTls, HandshakeFailure::Timeout]
    );
    assert_eq!(sstats.failures(HandshakeFailure::Timeout), 1);
    assert_eq!(sstats.connection_error.get(), 2);
}

#[tokio::test]
async fn rotation_through_the_secret_store_refuses_bad_certificates() {
    let p = pki();
    let store = SecretStore::new(None);
    let secret = |chain: &str, key: &str| Secret {
        name: "server_cert".into(),
        kind: SecretKind::TlsCertificate(cert(chain, key)),
    };
    store.update(&secret(&p.server.0, &p.server.1)).unwrap();
    let mut ctx = downstream(&p, false, vec![]);
    ctx.common.tls_certificates.clear();
    ctx.common.tls_certificate_sds = vec![SdsSecretConfig {
        name: "server_cert".into(),
        source: SdsSource::Xds(Default::default()),
    }];
    let server = Arc::new(ServerTls::new(&ctx, Some(store.clone()), TlsStats::detached()).unwrap());
    let (client, _) = client(&p, false, vec![]);

    let serial_seen = |server: Arc<ServerTls>| {
        let client = &client;
        async move {
            let (addr, h) = serve_once(server).await;
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut tls, _) = client
                .connect(tcp, UpstreamAlpn::Raw, addr.ip(), None)
                .await
                .unwrap();
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            tls.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.unwrap();
            h.await.unwrap().unwrap();
            x509_serial(leaf.as_ref())
        }
    };
    let first = serial_seen(server.clone()).await;

    // A new certificate is used by the next handshake.
    let next = leaf(&p.ca, &["server.local"], &[], false);
    store.update(&secret(&next.0, &next.1)).unwrap();
    let second = serial_seen(server.clone()).await;
    assert_ne!(first, second);

    // Bad updates are refused and the current one keeps serving.
    assert!(store.update(&secret("not a pem", &next.1)).is_err());
    let mismatched = leaf(&p.ca, &["server.local"], &[], false);
    assert!(store.update(&secret(&mismatched.0, &next.1)).is_err());
    let expired = leaf(&p.ca, &["server.local"], &[], true);
    let e = store.update(&secret(&expired.0, &expired.1)).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    assert_eq!(serial_seen(server).await, second);
}

fn x509_serial(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.tbs_certificate.raw_serial().to_vec()
}
