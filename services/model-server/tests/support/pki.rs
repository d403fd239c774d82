//! TF Serving SSLConfig files holding test certificates, and TLS clients of the model
//! server: a tonic channel, and the certificate the server presents. The certificates
//! themselves are `test_support::pki`'s. Shared by the model server's and `vigil`'s tests.
#![allow(dead_code, unreachable_pub, unused_imports)] // each suite uses part of it

use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;
pub use test_support::pki::{Ca, Leaf, write_atomically};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

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
    test_support::pki::tls_connect(addr, ca, alpn, None).await
}

/// The leaf certificate the server at `addr` (the gRPC or the REST port) presents to a new
/// connection.
pub async fn presented_certificate(addr: SocketAddr, ca: &Ca) -> std::io::Result<CertificateDer<'static>> {
    let stream = tls_connect(addr, ca, &[b"h2", b"http/1.1"]).await?;
    Ok(stream.get_ref().1.peer_certificates().unwrap()[0].clone())
}
