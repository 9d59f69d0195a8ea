//! HTTPS for the gateway: a rustls server configuration from PEM files, with optional
//! client-certificate verification (mutual TLS).

use crate::settings::TlsSettings;
use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Build the rustls configuration. The ring provider is named explicitly, so a second
/// provider enabled elsewhere in the dependency tree cannot make rustls panic.
pub fn server_config(tls: &TlsSettings) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .with_context(|| format!("reading server.tls.cert_file {}", tls.cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing server.tls.cert_file {}", tls.cert_file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "server.tls.cert_file {} holds no certificate",
        tls.cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .with_context(|| format!("reading server.tls.key_file {}", tls.key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading server.tls.client_ca {}", ca.display()))?
            {
                roots.add(cert?).with_context(|| {
                    format!("adding a CA from server.tls.client_ca {}", ca.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("server.tls: certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
