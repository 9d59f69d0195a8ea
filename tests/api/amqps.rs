//! `amqps://`: a relay process reaches RabbitMQ through TLS (a TLS-terminating proxy in front
//! of the local broker, with a certificate from a test CA the relay is told to trust).

use crate::helpers::{
    fixture, make_certificates, missing_finds, spawn_relay, write_relay_config, RabbitEnv,
};
use fake_centercode::{FakeCentercode, FakeConfig};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;

/// Accept TLS on a free port and forward the plaintext to the broker.
async fn tls_proxy(certs: &std::path::Path, broker: String) -> (u16, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counter = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, broker, counter) = (acceptor.clone(), broker.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(broker).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                }
            });
        }
    });
    (port, handshakes)
}

// Multi-threaded: the proxy must run while `spawn_relay` blocks reading the child's stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_talks_to_rabbitmq_over_amqps() {
    // Arrange: a test CA, a TLS proxy to the broker, and a relay configured with amqps://.
    let env = RabbitEnv::new().await;
    let broker = crate::helpers::broker_address(&env.url);
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let (port, handshakes) = tls_proxy(certs.path(), broker).await;
    let credentials = env
        .url
        .trim_start_matches("amqp://")
        .split('@')
        .next()
        .unwrap()
        .to_owned();
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_relay_config(
        dir.path(),
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\nworkers = 1\n[queue]\nbackend = \"rabbitmq\"\nurl = \"amqps://{credentials}@localhost:{port}/%2f\"\nprefix = \"{}\"\nredis_url = \"{}\"\n[worker]\nretry_schedule_secs = [0.2]\n[centercode]\napi_key = \"test-key\"\n",
            env.prefix, env.redis_url
        ),
        &centercode.base_url(),
    );
    let ca = certs.path().join("ca.pem");
    let (mut child, base) = spawn_relay(
        &config,
        &["serve"],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        Stdio::null(),
    );

    // Act
    let r = reqwest::Client::new()
        .post(format!("{base}/salesforce/outbound/gdpr"))
        .header("Content-Type", "text/xml")
        .body(fixture("om_contact_batch_4.xml"))
        .send()
        .await
        .unwrap();

    // Assert: acknowledged after the broker confirmed over TLS, then delivered.
    assert_eq!(r.status(), 200);
    let expected = [
        "jonas.berg@example.com",
        "aisha.okafor@example.net",
        "li.wei@example.cn",
        "sofia.hernandez@example.es",
    ]
    .map(str::to_owned)
    .into();
    let missing = missing_finds(&centercode, &expected, Duration::from_secs(20)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(missing, 0);
    assert!(
        handshakes.load(Ordering::SeqCst) >= 1,
        "the relay connected through TLS"
    );
}
