//! Management calls (model config reloads, rollout changes) need credentials when the server
//! is given them, over real TLS connections: no credentials answer UNAUTHENTICATED, wrong
//! ones PERMISSION_DENIED, the token file's token or an allowed client certificate pass, a
//! rotated token file takes effect without a restart, and reads (Predict, status, rollout
//! reads) need nothing.

#[path = "support/pki.rs"]
mod pki;
mod support;

use std::time::Duration;

use pki::{Ca, Leaf, ssl_config, tls_channel, write_atomically};
use proto::tensorflow::serving::model_server_config;
use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::{
    GetModelStatusRequest, ModelConfig, ModelConfigList, ModelServerConfig, PredictRequest, ReloadConfigRequest,
};
use proto::vigil::rollout::v1 as rollout;
use proto::vigil::rollout::v1::rollout_service_client::RolloutServiceClient;
use support::*;
use test_support::eventually;
use tonic::Code;
use tonic::transport::Channel;

/// A request carrying `authorization: Bearer <token>` when a token is given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// The code a management call (a reload to the config already served) answers with.
async fn reload(channel: &Channel, base: &std::path::Path, token: Option<&str>) -> Code {
    let config = ModelConfig {
        name: "ae".into(),
        base_path: base.display().to_string(),
        model_platform: "tensorflow".into(),
        ..Default::default()
    };
    let request = ReloadConfigRequest {
        config: Some(ModelServerConfig {
            config: Some(model_server_config::Config::ModelConfigList(ModelConfigList { config: vec![config] })),
        }),
        ..Default::default()
    };
    match ModelServiceClient::new(channel.clone()).handle_reload_config_request(with_token(request, token)).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_need_the_token_or_an_allowed_certificate_and_reads_need_nothing() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let ca = Ca::new("test CA");
    // custom_ca without client_verify: certificates are optional, verified when presented.
    let ssl = root.path().join("ssl.cfg");
    std::fs::write(&ssl, ssl_config(&ca.server(), Some(&ca), false)).unwrap();
    let token_file = root.path().join("token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let server = TestServer::serving(
        "ae",
        &base,
        &[
            &format!("--ssl_config_file={}", ssl.display()),
            &format!("--management_token_file={}", token_file.display()),
            "--management_allowed_subject=deployer",
            "--security_files_poll_wait_seconds=1",
        ],
    )
    .await;
    let anonymous = tls_channel(server.grpc, &ca, None).await.unwrap();

    // Reads: no credentials needed.
    let (dims, input, _) = autoencoder_golden().remove(0);
    let predict = PredictRequest {
        model_spec: spec("ae", None, None, ""),
        inputs: [("sensors".to_owned(), float_tensor(&dims, &input))].into(),
        output_filter: vec![],
    };
    let mut predictions =
        proto::tensorflow::serving::prediction_service_client::PredictionServiceClient::new(anonymous.clone());
    predictions.predict(predict).await.expect("Predict needs no credentials");
    let status = GetModelStatusRequest { model_spec: spec("ae", None, None, "") };
    ModelServiceClient::new(anonymous.clone()).get_model_status(status).await.expect("status needs none");
    let mut rollouts = RolloutServiceClient::new(anonymous.clone());
    rollouts.list_rollouts(rollout::ListRolloutsRequest {}).await.expect("listing rollouts needs none");

    // Management calls.
    assert_eq!(reload(&anonymous, &base, None).await, Code::Unauthenticated);
    assert_eq!(reload(&anonymous, &base, Some("wrong-token")).await, Code::PermissionDenied);
    assert_eq!(reload(&anonymous, &base, Some("first-token")).await, Code::Ok);
    let abort = rollout::AbortRolloutRequest { model: "ae".into(), reason: String::new() };
    let refused = rollouts.abort_rollout(abort).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("Bearer"), "the refusal says what is missing: {}", refused.message());

    let certified = |leaf: Leaf| {
        let ca = &ca;
        let addr = server.grpc;
        async move { tls_channel(addr, ca, Some(&leaf)).await.unwrap() }
    };
    let deployer = certified(ca.client("deployer")).await;
    assert_eq!(reload(&deployer, &base, None).await, Code::Ok, "an allowed subject needs no token");
    let intruder = certified(ca.client("intruder")).await;
    assert_eq!(reload(&intruder, &base, None).await, Code::PermissionDenied);
    assert_eq!(reload(&intruder, &base, Some("first-token")).await, Code::Ok, "the token suffices with any cert");

    // Rotating the token file: the old token stops working, the new one works.
    write_atomically(&token_file, "second-token\n");
    eventually(Duration::from_secs(30), "the rotated token file to be read", async || {
        reload(&anonymous, &base, Some("first-token")).await != Code::Ok
    })
    .await;
    assert_eq!(reload(&anonymous, &base, Some("first-token")).await, Code::PermissionDenied);
    assert_eq!(reload(&anonymous, &base, Some("second-token")).await, Code::Ok);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_subjects_without_client_certificates_are_a_configuration_error() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let ca = Ca::new("test CA");
    let ssl = root.path().join("ssl.cfg");
    std::fs::write(&ssl, ssl_config(&ca.server(), None, false)).unwrap();
    let parse = |flags: &[String]| {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: model_server::config::ServeArgs,
        }
        let args = std::iter::once("model-server".to_owned())
            .chain([format!("--model_base_path={}", base.display())])
            .chain(flags.iter().cloned());
        <Cli as clap::Parser>::try_parse_from(args).unwrap().serve.resolve().map(|_| ())
    };
    let error = parse(&["--management_allowed_subject=deployer".into()]).unwrap_err();
    assert!(error.contains("--management_allowed_subject needs") && error.contains("custom_ca"), "{error}");
    let error =
        parse(&["--management_allowed_subject=deployer".into(), format!("--ssl_config_file={}", ssl.display())])
            .unwrap_err();
    assert!(error.contains("custom_ca"), "{error}");
    let empty = root.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let error = parse(&[format!("--management_token_file={}", empty.display())]).unwrap_err();
    assert!(error.contains("empty-token") && error.contains("empty"), "{error}");
}
