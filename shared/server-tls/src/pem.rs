//! A rustls server config from PEM contents.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Which part of the TLS settings an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The server's certificate chain.
    Certificate,
    /// The server's private key.
    Key,
    /// The CA certificates client certificates are verified against.
    ClientCa,
    /// Client certificates required without a CA to verify them against.
    ClientVerify,
}

/// Why the PEM contents make no server config; the message never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PemError {
    pub part: Part,
    pub message: String,
}

fn error(part: Part, message: impl Into<String>) -> PemError {
    PemError { part, message: message.into() }
}

/// A server config for `certificate` (PEM chain, leaf first) and `key` (PEM). With
/// `client_ca` (PEM, may be empty) clients may present a certificate, which is verified
/// against it; with `client_verify` they must. No ALPN protocols are set.
pub fn server_config(
    certificate: &str,
    key: &str,
    client_ca: &str,
    client_verify: bool,
) -> Result<rustls::ServerConfig, PemError> {
    let certs = certificates(certificate).map_err(|message| error(Part::Certificate, message))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => error(Part::Key, "no PEM private key found"),
        e => error(Part::Key, format!("not a PEM private key ({e})")),
    })?;
    let provider = crate::crypto_provider();
    let verifier = if client_ca.trim().is_empty() {
        if client_verify {
            return Err(error(
                Part::ClientVerify,
                "needs custom_ca (the CA certificates client certificates are verified against)",
            ));
        }
        WebPkiClientVerifier::no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for (i, ca) in
            certificates(client_ca).map_err(|message| error(Part::ClientCa, message))?.into_iter().enumerate()
        {
            roots.add(ca).map_err(|e| error(Part::ClientCa, format!("certificate {}: {e}", i + 1)))?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let builder = if client_verify { builder } else { builder.allow_unauthenticated() };
        builder.build().map_err(|e| error(Part::ClientCa, e.to_string()))?
    };
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(Part::Certificate, e.to_string()))?
        .with_client_cert_verifier(verifier)
        // Checks that the key is the certificate's.
        .with_single_cert(certs, key)
        .map_err(|e| error(Part::Key, format!("{e} (the key must be the certificate's)")))
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}
