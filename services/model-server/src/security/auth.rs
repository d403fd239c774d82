//! Who may make management calls, as a tower layer on the gRPC server.
//!
//! Management calls change what is served: every method of
//! `tensorflow.serving.ModelService` except `GetModelStatus` (today
//! `HandleReloadConfigRequest`), and every method of `vigil.rollout.v1.RolloutService` except
//! `GetRollout` and `ListRollouts`. Reads are listed rather than writes so that a method added
//! to either service later needs credentials until someone decides otherwise. Everything
//! else (Predict, metadata, status, KServe, health, reflection) is open.
//!
//! Credentials, when `--management_token_file` and/or `--management_allowed_subject` are set:
//! a bearer token (`authorization: Bearer <token>`), compared in constant time with the
//! file's, or a client certificate (verified against the TLS `custom_ca` during the
//! handshake) whose subject is allowed. A subject is allowed when it equals a configured value
//! either as the certificate's common name (`alice`) or as its whole subject in RFC 4514 form,
//! most specific part first (`CN=alice,O=Vigil`). No credentials: `UNAUTHENTICATED`;
//! credentials that are not accepted: `PERMISSION_DENIED`.
//!
//! Each management call, allowed or not, logs one line on target `audit` with who
//! (the certificate subject, `token`, or `anonymous`), the peer address, the method and the
//! outcome. The token itself is never logged.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The gRPC services holding management calls, with their methods that are reads.
const MANAGED_SERVICES: [(&str, &[&str]); 2] = [
    ("tensorflow.serving.ModelService", &["GetModelStatus"]),
    ("vigil.rollout.v1.RolloutService", &["GetRollout", "ListRollouts"]),
];

/// Whether the call at `path` (`/package.Service/Method`) is a management call.
pub fn is_management(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    MANAGED_SERVICES.iter().any(|(managed, reads)| *managed == service && !reads.contains(&method))
}

pub use admin::token::Token;

/// The accepted credentials. The token is replaced when its file changes.
#[derive(Debug, Clone)]
pub struct ManagementAuth {
    token: Option<Arc<ArcSwap<Token>>>,
    subjects: Arc<[String]>,
}

impl ManagementAuth {
    /// No credentials configured: management calls are open (and still audited).
    pub fn open() -> Self {
        Self { token: None, subjects: Arc::new([]) }
    }

    pub fn new(token: Option<Token>, subjects: Vec<String>) -> Self {
        Self { token: token.map(|t| Arc::new(ArcSwap::from_pointee(t))), subjects: subjects.into() }
    }

    /// Whether management calls need credentials.
    pub fn required(&self) -> bool {
        self.token.is_some() || !self.subjects.is_empty()
    }

    /// Replaces the accepted token (the token file changed). No-op without a token file.
    pub fn set_token(&self, token: Token) {
        if let Some(current) = &self.token {
            current.store(Arc::new(token));
        }
    }

    /// The layer for `tonic::transport::Server::builder().layer(...)`.
    pub fn layer(&self) -> ManagementAuthLayer {
        ManagementAuthLayer { auth: self.clone() }
    }

    /// Decides a management call from what the caller presented, and says who it was.
    fn decide<'a>(&self, bearer: &Bearer<'_>, subject: Option<&'a Subject>) -> (Decision, Who<'a>) {
        let presented = match (subject, bearer) {
            (Some(subject), _) => Who::Subject(&subject.full),
            (None, Bearer::Token(_)) => Who::Token,
            (None, _) => Who::Anonymous,
        };
        if !self.required() {
            return (Decision::Allowed("no management credentials are configured"), presented);
        }
        if let Some(subject) = subject
            && self.subjects.iter().any(|allowed| subject.is(allowed))
        {
            return (Decision::Allowed("allowed client certificate subject"), presented);
        }
        match (bearer, &self.token) {
            (Bearer::Token(offered), Some(token)) if token.load().matches(offered) => {
                (Decision::Allowed("bearer token"), Who::Token)
            }
            (Bearer::Token(_), Some(_)) => {
                (Decision::Denied("the bearer token is not the management token"), Who::Token)
            }
            (Bearer::Token(_), None) => {
                (Decision::Denied("this server accepts no bearer token for management calls"), Who::Token)
            }
            (Bearer::Malformed, _) => {
                (Decision::Unauthenticated("the authorization metadata is not `Bearer <token>`"), presented)
            }
            (Bearer::Absent, _) if subject.is_some() => (
                Decision::Denied("the client certificate's subject is not allowed to make management calls"),
                presented,
            ),
            (Bearer::Absent, _) => (
                Decision::Unauthenticated(
                    "management calls need credentials: an `authorization: Bearer <token>` or an allowed client \
                     certificate",
                ),
                presented,
            ),
        }
    }
}

/// The outcome, with why (logged, and the refusal's message).
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Allowed(&'static str),
    Unauthenticated(&'static str),
    Denied(&'static str),
}

/// Who made a management call, as the audit line names them.
#[derive(Debug, PartialEq, Eq)]
enum Who<'a> {
    /// A verified client certificate, by its subject.
    Subject(&'a str),
    /// A bearer token (right or wrong).
    Token,
    Anonymous,
}

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Subject(subject) => f.write_str(subject),
            Who::Token => f.write_str("token"),
            Who::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// What the `authorization` metadata holds.
#[derive(Debug)]
enum Bearer<'a> {
    Absent,
    Malformed,
    Token(&'a [u8]),
}

impl<'a> Bearer<'a> {
    fn from_headers(headers: &'a http::HeaderMap) -> Self {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            // None, or several (ambiguous: refuse rather than pick one).
            return if headers.contains_key(http::header::AUTHORIZATION) { Bearer::Malformed } else { Bearer::Absent };
        };
        let bytes = value.as_bytes();
        // The scheme is case-insensitive (RFC 9110); one space, as clients send it.
        match bytes.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty() => {
                Bearer::Token(token)
            }
            _ => Bearer::Malformed,
        }
    }
}

pub use server_tls::Subject;

/// The peer address and verified client certificate subject of a request's connection.
fn peer<B>(request: &http::Request<B>) -> (Option<SocketAddr>, Option<Subject>) {
    let extensions = request.extensions();
    if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
        let subject = tls.peer_certs().and_then(|certs| certs.first().and_then(|leaf| Subject::from_der(leaf)));
        return (tls.get_ref().remote_addr(), subject);
    }
    (extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr), None)
}

/// See [`ManagementAuth::layer`].
#[derive(Debug, Clone)]
pub struct ManagementAuthLayer {
    auth: ManagementAuth,
}

impl<S> tower::Layer<S> for ManagementAuthLayer {
    type Service = ManagementAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ManagementAuthService { inner, auth: self.auth.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct ManagementAuthService<S> {
    inner: S,
    auth: ManagementAuth,
}

impl<S, B, R> tower::Service<http::Request<B>> for ManagementAuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if !is_management(path) {
            return Box::pin(self.inner.call(request));
        }
        let bearer = Bearer::from_headers(request.headers());
        let (address, subject) = peer(&request);
        let (decision, who) = self.auth.decide(&bearer, subject.as_ref());
        let who = who.to_string();
        let peer = address.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let refusal = match decision {
            Decision::Allowed(why) => {
                tracing::info!(target: "audit", who, peer, method = path, outcome = "allowed", why, "management call");
                None
            }
            Decision::Unauthenticated(why) => {
                tracing::info!(target: "audit", who, peer, method = path, outcome = "unauthenticated", why, "management call");
                Some(tonic::Status::unauthenticated(why))
            }
            Decision::Denied(why) => {
                tracing::info!(target: "audit", who, peer, method = path, outcome = "permission_denied", why, "management call");
                Some(tonic::Status::permission_denied(why))
            }
        };
        match refusal {
            None => Box::pin(self.inner.call(request)),
            Some(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;

    const ROLLOUT: &str = "/vigil.rollout.v1.RolloutService/";

    #[test]
    fn management_calls_are_everything_but_the_listed_reads_of_the_managed_services() {
        for path in [
            "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
            "/vigil.rollout.v1.RolloutService/StartRollout",
            "/vigil.rollout.v1.RolloutService/SetCanaryWeight",
            "/vigil.rollout.v1.RolloutService/PromoteRollout",
            "/vigil.rollout.v1.RolloutService/AbortRollout",
            "/vigil.rollout.v1.RolloutService/SomeMethodAddedLater",
        ] {
            assert!(is_management(path), "{path}");
        }
        for path in [
            "/tensorflow.serving.ModelService/GetModelStatus",
            "/vigil.rollout.v1.RolloutService/GetRollout",
            "/vigil.rollout.v1.RolloutService/ListRollouts",
            "/tensorflow.serving.PredictionService/Predict",
            "/inference.GRPCInferenceService/ModelInfer",
            "/grpc.health.v1.Health/Check",
            "/",
            "",
        ] {
            assert!(!is_management(path), "{path}");
        }
    }

    fn token(text: &str) -> Token {
        Token::from_file_text(text).unwrap()
    }

    fn subject(cn: &str) -> Subject {
        Subject { full: format!("CN={cn},O=Vigil"), common_name: Some(cn.to_owned()) }
    }

    /// The decision's kind and who it names.
    fn decided(auth: &ManagementAuth, bearer: Bearer<'_>, subject: Option<&Subject>) -> (&'static str, String) {
        let (decision, who) = auth.decide(&bearer, subject);
        let kind = match decision {
            Decision::Allowed(_) => "allowed",
            Decision::Unauthenticated(_) => "unauthenticated",
            Decision::Denied(_) => "denied",
        };
        (kind, who.to_string())
    }

    #[test]
    fn no_credentials_is_unauthenticated_and_wrong_ones_are_denied() {
        let auth = ManagementAuth::new(Some(token("s3cret\n")), vec!["ops".into(), "CN=deployer,O=Vigil".into()]);
        let ops = subject("ops");
        let deployer = subject("deployer");
        let intruder = subject("intruder");
        let expect = |bearer, subject, kind: &str, who: &str| {
            assert_eq!(decided(&auth, bearer, subject), (kind, who.to_owned()), "{kind} {who}");
        };
        expect(Bearer::Token(b"s3cret"), None, "allowed", "token");
        expect(Bearer::Absent, Some(&ops), "allowed", "CN=ops,O=Vigil");
        expect(Bearer::Absent, Some(&deployer), "allowed", "CN=deployer,O=Vigil");
        expect(Bearer::Token(b"s3cret"), Some(&intruder), "allowed", "token");
        expect(Bearer::Absent, None, "unauthenticated", "anonymous");
        expect(Bearer::Malformed, None, "unauthenticated", "anonymous");
        expect(Bearer::Token(b"s3cre"), None, "denied", "token");
        expect(Bearer::Token(b"s3cres"), None, "denied", "token");
        expect(Bearer::Absent, Some(&intruder), "denied", "CN=intruder,O=Vigil");
        // O=Vigil alone is a part of the subject, not the subject.
        let partial = ManagementAuth::new(None, vec!["O=Vigil".into()]);
        assert_eq!(decided(&partial, Bearer::Absent, Some(&ops)).0, "denied");
        assert_eq!(decided(&partial, Bearer::Token(b"x"), None).0, "denied");
    }

    #[test]
    fn a_replaced_token_file_replaces_the_accepted_token() {
        let auth = ManagementAuth::new(Some(token("old")), vec![]);
        auth.set_token(token("new"));
        assert_eq!(decided(&auth, Bearer::Token(b"old"), None).0, "denied");
        assert_eq!(decided(&auth, Bearer::Token(b"new"), None).0, "allowed");
    }

    #[test]
    fn token_files_refuse_empty_or_several_tokens_and_never_print_theirs() {
        assert!(Token::from_file_text(" \n").is_err());
        assert!(Token::from_file_text("one two").is_err());
        assert_eq!(format!("{:?}", token("s3cret")), "Token(<redacted>)");
    }

    #[test]
    fn bearer_metadata_is_parsed_strictly() {
        let parse = |values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in values {
                headers.append(http::header::AUTHORIZATION, value.parse().unwrap());
            }
            format!("{:?}", Bearer::from_headers(&headers))
        };
        assert_eq!(parse(&[]), "Absent");
        assert_eq!(parse(&["Bearer abc"]), format!("{:?}", Bearer::Token(b"abc")));
        assert_eq!(parse(&["bearer abc"]), format!("{:?}", Bearer::Token(b"abc")));
        assert_eq!(parse(&["Basic abc"]), "Malformed");
        assert_eq!(parse(&["Bearer "]), "Malformed");
        assert_eq!(parse(&["Bearer a", "Bearer b"]), "Malformed");
    }

    #[test]
    fn a_certificates_subject_reads_in_rfc_4514_order_with_its_common_name() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Vigil");
        params.distinguished_name.push(rcgen::DnType::CommonName, "deployer");
        let cert = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let subject = Subject::from_der(cert.der()).unwrap();
        assert_eq!(subject.common_name.as_deref(), Some("deployer"));
        assert_eq!(subject.full, "CN=deployer,O=Vigil");
        assert!(Subject::from_der(b"not a certificate").is_none());
    }

    /// Calls the layer over a service answering 200 to everything; returns the gRPC
    /// status it answered ("0" when passed through) and the log lines.
    fn call(auth: &ManagementAuth, path: &str, authorization: Option<&str>) -> (String, String) {
        let captured = test_support::CapturedLogs::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let status = tracing::subscriber::with_default(subscriber, || {
            let inner = tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            });
            let service = tower::Layer::layer(&auth.layer(), inner);
            let mut request = http::Request::builder().uri(format!("http://localhost{path}"));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let mut request = request.body(()).unwrap();
            let peer: SocketAddr = "127.0.0.1:4242".parse().unwrap();
            request.extensions_mut().insert(TcpConnectInfo { local_addr: None, remote_addr: Some(peer) });
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let response = runtime.block_on(service.oneshot(request)).unwrap();
            response.headers().get("grpc-status").map_or("0".to_owned(), |v| v.to_str().unwrap().to_owned())
        });
        let logs = captured.text();
        (status, logs)
    }

    #[test]
    fn every_management_call_is_audited_once_and_the_token_never_is() {
        let auth = ManagementAuth::new(Some(token("s3cret-token")), vec![]);
        let unauthenticated = tonic::Code::Unauthenticated as i32;
        let denied = tonic::Code::PermissionDenied as i32;

        let (status, logs) = call(&auth, &format!("{ROLLOUT}StartRollout"), None);
        assert_eq!(status, unauthenticated.to_string());
        assert_eq!(logs.lines().count(), 1, "{logs}");
        assert!(logs.contains("audit") && logs.contains("who=\"anonymous\""), "{logs}");
        assert!(logs.contains("peer=\"127.0.0.1:4242\"") && logs.contains("outcome=\"unauthenticated\""), "{logs}");
        assert!(logs.contains("method=\"/vigil.rollout.v1.RolloutService/StartRollout\""), "{logs}");

        let (status, logs) = call(&auth, &format!("{ROLLOUT}AbortRollout"), Some("Bearer s3cret-wrong"));
        assert_eq!(status, denied.to_string());
        assert!(logs.contains("who=\"token\"") && logs.contains("outcome=\"permission_denied\""), "{logs}");

        let (status, logs) = call(&auth, &format!("{ROLLOUT}PromoteRollout"), Some("Bearer s3cret-token"));
        assert_eq!(status, "0");
        assert_eq!(logs.lines().count(), 1, "{logs}");
        assert!(logs.contains("who=\"token\"") && logs.contains("outcome=\"allowed\""), "{logs}");
        assert!(!logs.contains("s3cret"), "the token leaked into the log: {logs}");

        let (status, logs) = call(&auth, &format!("{ROLLOUT}ListRollouts"), None);
        assert_eq!((status.as_str(), logs.as_str()), ("0", ""), "reads pass without credentials or an audit line");
    }

    #[test]
    fn without_configured_credentials_management_calls_pass_and_are_still_audited() {
        let (status, logs) =
            call(&ManagementAuth::open(), "/tensorflow.serving.ModelService/HandleReloadConfigRequest", None);
        assert_eq!(status, "0");
        assert!(logs.contains("outcome=\"allowed\"") && logs.contains("who=\"anonymous\""), "{logs}");
    }
}
