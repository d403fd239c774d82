//! Who a verified client certificate names.

use x509_cert::der::Decode as _;

/// A verified client certificate's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// RFC 4514, most specific part first: `CN=alice,O=Vigil`.
    pub full: String,
    pub common_name: Option<String>,
}

impl Subject {
    /// The subject of a DER certificate; `None` if it does not parse (it has passed
    /// rustls' verification, so that would be a parser gap, treated as no certificate).
    pub fn from_der(der: &[u8]) -> Option<Subject> {
        let cert = x509_cert::Certificate::from_der(der).ok()?;
        let subject = &cert.tbs_certificate.subject;
        let common_name = subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .filter(|atv| atv.oid == x509_cert::der::oid::db::rfc4519::CN)
            .find_map(|atv| {
                use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
                use x509_cert::der::{Tag, Tagged as _};
                match atv.value.tag() {
                    Tag::Utf8String => Utf8StringRef::try_from(&atv.value).ok().map(|s| s.as_str().to_owned()),
                    Tag::PrintableString => {
                        PrintableStringRef::try_from(&atv.value).ok().map(|s| s.as_str().to_owned())
                    }
                    Tag::Ia5String => Ia5StringRef::try_from(&atv.value).ok().map(|s| s.as_str().to_owned()),
                    _ => None,
                }
            });
        Some(Subject { full: subject.to_string(), common_name })
    }

    /// The subject of the leaf certificate a TLS connection's client presented (and
    /// rustls verified), if any.
    pub fn of_peer(connection: &rustls::ServerConnection) -> Option<Subject> {
        connection.peer_certificates().and_then(|certs| certs.first()).and_then(|leaf| Subject::from_der(leaf))
    }

    /// Whether `allowed` is this subject, whole (RFC 4514) or as its common name.
    pub fn is(&self, allowed: &str) -> bool {
        self.full == allowed || self.common_name.as_deref() == Some(allowed)
    }
}
