//! Starts the model server in-process on pre-bound loopback listeners, with model
//! directories copied from the TF-exported fixtures, and builds requests. The benches
//! include it too (for the server's config from flags and reload requests).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use model_server::config::{ServeArgs, ServerConfig};
use model_server::server::{self, Listeners};
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{
    ModelConfig, ModelConfigList, ModelServerConfig, ModelSpec, ReloadConfigRequest, model_server_config,
};
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};
use serde_json::Value;
use test_support::Endpoint;
use tokio::sync::oneshot;
use tonic::transport::Channel;

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// The server's config from these flags, as on its command line (without the binary name).
pub fn serve_config(flags: &[impl AsRef<str>]) -> ServerConfig {
    let args = std::iter::once("model-server").chain(flags.iter().map(AsRef::as_ref));
    TestCli::try_parse_from(args).unwrap().serve.resolve().unwrap()
}

/// A channel to the server at `addr` once it accepts connections (a server finishes its
/// initial loads before it does); panics after `within`.
pub async fn channel_to(addr: SocketAddr, within: Duration) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    let connected = test_support::observe_until(within, async || endpoint.connect().await, Result::is_ok).await;
    connected.unwrap_or_else(|e| panic!("the server at {addr} accepted no connection within {within:?}: {e}"))
}

/// `tests/fixtures/savedmodels/<name>` in the workspace.
pub fn fixture_root(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels").join(name)
}

pub use test_support::copy_dir;

/// A model base path holding the fixture `fixture` (its version 1) as each of `versions`.
pub fn model_base(root: &Path, model: &str, fixture: &str, versions: &[i64]) -> PathBuf {
    let base = root.join(model);
    for v in versions {
        add_version(&base, fixture, *v);
    }
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// Copies a fixture in as version `version`, atomically (a rename), as deploy tools do.
pub fn add_version(base: &Path, fixture: &str, version: i64) {
    let staging = base.join(format!(".staging-{version}"));
    copy_dir(&fixture_root(fixture).join("1"), &staging);
    std::fs::rename(&staging, base.join(version.to_string())).unwrap();
}

/// `--enable_batching` with `parameters` (TF Serving's BatchingParameters, text format)
/// written to a file under `root`: the flags for [`TestServer::serving`].
pub fn batching_flags(root: &Path, parameters: &str) -> [String; 2] {
    let file = root.join("batching.config");
    std::fs::write(&file, parameters).unwrap();
    ["--enable_batching=true".to_owned(), format!("--batching_parameters_file={}", file.display())]
}

pub struct TestServer {
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with these flags (as on the command line, without the binary name).
    pub async fn start(flags: &[&str]) -> TestServer {
        let config = serve_config(flags);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, rest_addr) = (grpc.local_addr().unwrap(), rest.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(config, Listeners { grpc, rest: Some(rest) }, async {
            let _ = stopped.await;
        }));
        TestServer { grpc: grpc_addr, rest: rest_addr, stop: Some(stop), task: Some(task) }
    }

    /// Starts a server of one model, `model` from `base`, with `flags` after its own.
    pub async fn serving(model: &str, base: &Path, flags: &[&str]) -> TestServer {
        let (name, base) = (format!("--model_name={model}"), format!("--model_base_path={}", base.display()));
        let all: Vec<&str> = [name.as_str(), base.as_str()].into_iter().chain(flags.iter().copied()).collect();
        TestServer::start(&all).await
    }

    pub async fn channel(&self) -> Channel {
        channel_to(self.grpc, Duration::from_secs(30)).await
    }

    pub async fn predict_client(&self) -> PredictionServiceClient<Channel> {
        PredictionServiceClient::new(self.channel().await)
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

pub fn shape(dims: &[usize]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims.iter().map(|&d| tensor_shape_proto::Dim { size: d as i64, ..Default::default() }).collect(),
        ..Default::default()
    })
}

pub fn float_tensor(dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto { dtype: 1, tensor_shape: shape(dims), float_val: values.to_vec(), ..Default::default() }
}

pub fn spec(model: &str, version: Option<i64>, label: Option<&str>, signature: &str) -> Option<ModelSpec> {
    let version_choice = match (version, label) {
        (Some(v), _) => Some(VersionChoice::Version(v)),
        (None, Some(l)) => Some(VersionChoice::VersionLabel(l.to_owned())),
        (None, None) => None,
    };
    Some(ModelSpec { name: model.to_owned(), version_choice, signature_name: signature.to_owned() })
}

/// The autoencoder's TF-computed golden cases: (input rows, expected output rows).
pub fn autoencoder_golden() -> Vec<(Vec<usize>, Vec<f32>, Vec<f32>)> {
    let text = std::fs::read_to_string(fixture_root("autoencoder").join("golden.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let input = &case["inputs"]["sensors"];
            let output = &case["outputs"]["output_0"];
            let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let shape = input["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (shape, floats(&input["values"]), floats(&output["values"]))
        })
        .collect()
}

pub fn assert_close(actual: &[f32], expected: &[f32], context: &str) {
    assert_eq!(actual.len(), expected.len(), "{context}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= 1e-5 + 1e-5 * e.abs(), "{context}: element {i}: {a} vs TensorFlow's {e}");
    }
}

/// GET over HTTP/1.1; returns the body (panics on a non-2xx status).
pub async fn get_text(addr: SocketAddr, path: &str) -> String {
    Endpoint::new(addr).text(path).await
}

/// `HandleReloadConfigRequest` replacing the model list with `models`.
pub fn reload_request(models: Vec<ModelConfig>) -> ReloadConfigRequest {
    ReloadConfigRequest {
        config: Some(ModelServerConfig {
            config: Some(model_server_config::Config::ModelConfigList(ModelConfigList { config: models })),
        }),
        ..Default::default()
    }
}
