//! Test certificates made on the spot with rcgen (a CA, server certificates for localhost and
//! 127.0.0.1, client certificates by common name), TF Serving SSLConfig files holding them,
//! and TLS clients trusting them: a tonic channel, and a raw rustls connection for looking at
//! the server's certificate and ALPN. Shared by the model server's and `vigil`'s tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Leaf {
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap()
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = issuer.pem();
        Ca { issuer, pem }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with subject `CN=<common_name>,O=Vigil`.
    pub fn client(&self, common_name: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Vigil");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// TF Serving's text-format SSLConfig.
pub fn ssl_config(server: &Leaf, custom_ca: Option<&Ca>, client_verify: bool) -> String {
    let quoted = |pem: &str| pem.replace('\n', "\\n");
    format!(
        "server_key: \"{}\"\nserver_cert: \"{}\"\ncustom_ca: \"{}\"\nclient_verify: {client_verify}\n",
        quoted(&server.key),
        quoted(&server.cert),
        custom_ca.map(|ca| quoted(&ca.pem)).unwrap_or_default()
    )
}

/// Writes `text` to `path` atomically (a rename), as a Secret update or cert-manager does.
pub fn write_atomically(path: &Path, text: &str) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// A gRPC channel over TLS to `addr`, trusting `ca`, with a client certificate if given.
pub async fn tls_channel(addr: SocketAddr, ca: &Ca, client: Option<&Leaf>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert, &client.key));
    }
    Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls)?.connect().await
}

/// A raw TLS connection to `addr` (as `localhost`) offering `alpn`, trusting `ca`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    // ring, as the server uses (deprecated in rustls 0.23.48 for lacking post-quantum kx).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// The leaf certificate the server at `addr` (the gRPC or the REST port) presents to a new
/// connection.
pub async fn presented_certificate(addr: SocketAddr, ca: &Ca) -> std::io::Result<CertificateDer<'static>> {
    let stream = tls_connect(addr, ca, &[b"h2", b"http/1.1"]).await?;
    Ok(stream.get_ref().1.peer_certificates().unwrap()[0].clone())
}
