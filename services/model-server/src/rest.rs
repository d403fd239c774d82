//! TF Serving's REST API on `--rest_api_port`, plus the operational endpoints every Vigil
//! service has (`/live`, `/ready`, `/metrics`, and the `--monitoring_config_file` path).
//! KServe v2's HTTP routes (`/v2/...`) are in [`crate::rest_kserve`].
//!
//! TF Serving's paths put a verb after a colon inside a segment
//! (`/v1/models/m/versions/2:predict`), which route patterns cannot express, so `/v1/`
//! paths are parsed by [`parse_model_path`] in a fallback handler.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::admission::WireTensor;
use crate::error::ServeError;
use crate::inference::{Inference, InferenceRequest};
use crate::metrics::{Api, Metrics};
use crate::overload::InFlight;
use crate::repository::VersionSelector;
use crate::tensor_json;

#[derive(Debug, Clone)]
pub struct RestState {
    pub inference: Inference,
    pub metrics: Metrics,
    /// The in-flight pool gRPC requests draw from too.
    pub in_flight: InFlight,
    pub request_timeout: Option<Duration>,
}

/// The REST router; `monitoring_path` is the Prometheus path from `--monitoring_config_file`.
/// Bodies over `max_body_bytes` are refused (413) before they are read whole
/// ([`admin::body_limit`]): a JSON body expands ~16x once parsed (every number a 32-byte
/// value), so this is the REST budget.
pub fn router(state: RestState, monitoring_path: Option<String>, max_body_bytes: usize) -> Router {
    let limit =
        admin::body_limit::BodyLimit { max_bytes: max_body_bytes, setting: "--rest_max_body_bytes", refused: None };
    let model_api = limit.apply(Router::new().fallback(model_api));
    admin::health_routes(state.clone(), monitoring_path.as_deref()).merge(model_api.with_state(state))
}

/// Ready once every configured model has a version loaded; the metrics are the server's
/// own registry.
impl admin::Health for RestState {
    fn readiness(&self) -> Result<(), String> {
        self.inference.repository.readiness()
    }

    fn metrics_text(&self) -> Result<Vec<u8>, String> {
        Ok(self.metrics.render().into_bytes())
    }
}

/// What a `/v1/models/...` path addresses.
#[derive(Debug, PartialEq, Eq)]
pub struct ModelPath {
    pub model: String,
    pub selector: VersionSelector,
    pub action: Action,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Status,
    Metadata,
    Verb(String),
}

/// Parses `/v1/models/{m}[/versions/{v}|/labels/{l}][/metadata|:{verb}]`.
pub fn parse_model_path(path: &str) -> Option<ModelPath> {
    let rest = path.strip_prefix("/v1/models/")?;
    let (rest, verb) = match rest.rsplit_once(':') {
        Some((head, verb)) if !verb.contains('/') => (head, Some(verb.to_owned())),
        _ => (rest, None),
    };
    let mut parts: Vec<&str> = rest.split('/').collect();
    let metadata = verb.is_none() && parts.last() == Some(&"metadata");
    if metadata {
        parts.pop();
    }
    let (model, selector) = match parts.as_slice() {
        [model] => (*model, VersionSelector::Latest),
        [model, "versions", v] => (*model, VersionSelector::Version(v.parse().ok()?)),
        [model, "labels", l] => (*model, VersionSelector::Label((*l).to_owned())),
        _ => return None,
    };
    if model.is_empty() {
        return None;
    }
    let action = match (verb, metadata) {
        (Some(verb), _) => Action::Verb(verb),
        (None, true) => Action::Metadata,
        (None, false) => Action::Status,
    };
    Some(ModelPath { model: model.to_owned(), selector, action })
}

fn error_response(error: &ServeError) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": error.to_string() }))).into_response()
}

async fn model_api(
    State(state): State<RestState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if crate::rest_kserve::is_kserve_path(uri.path()) {
        // Health checks are never shed; model calls hold a permit while they run.
        if crate::rest_kserve::is_health_path(uri.path()) {
            return crate::rest_kserve::handle(&state, &method, uri.path(), &headers, body).await;
        }
        let Some(_permit) = state.in_flight.try_acquire("rest") else {
            return error_response(&ServeError::Overloaded(state.in_flight.refusal()));
        };
        return crate::rest_kserve::handle(&state, &method, uri.path(), &headers, body).await;
    }
    let Some(path) = parse_model_path(uri.path()) else {
        return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": format!("no such endpoint: {}", uri.path()) })))
            .into_response();
    };
    // Probes and metrics above are never shed; model calls hold a permit while they run.
    let Some(_permit) = state.in_flight.try_acquire("rest") else {
        return error_response(&ServeError::Overloaded(state.in_flight.refusal()));
    };
    let result = match (&method, &path.action) {
        (&Method::GET, Action::Status) => status(&state, &path),
        (&Method::GET, Action::Metadata) => metadata(&state, &path),
        (&Method::POST, Action::Verb(verb)) if verb == "predict" => {
            let routing_key = headers.get(canary::ROUTING_KEY_METADATA).map(|v| v.as_bytes().to_vec());
            let predict = predict(&state, path, routing_key, &body);
            match state.request_timeout {
                Some(limit) => tokio::time::timeout(limit, predict).await.unwrap_or_else(|_| {
                    Err(ServeError::DeadlineExceeded(format!("the request took more than {} s", limit.as_secs_f64())))
                }),
                None => predict.await,
            }
        }
        (&Method::POST, Action::Verb(verb)) if verb == "classify" || verb == "regress" => Err(
            ServeError::Unimplemented(format!(":{verb} is not supported: it needs tf.Example inputs; use :predict")),
        ),
        _ => Err(ServeError::InvalidArgument(format!("{method} {} is not a supported request", uri.path()))),
    };
    match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(error) => error_response(&error),
    }
}

fn status(state: &RestState, path: &ModelPath) -> Result<Value, ServeError> {
    let statuses = state.inference.repository.status(&path.model, &path.selector)?;
    Ok(json!({
        "model_version_status": statuses.iter().map(|s| json!({
            "version": s.version.to_string(),
            "state": s.state.name(),
            "status": {
                "error_code": if s.error.is_some() { "UNKNOWN" } else { "OK" },
                "error_message": s.error.clone().unwrap_or_default(),
            },
        })).collect::<Vec<_>>(),
    }))
}

fn metadata(state: &RestState, path: &ModelPath) -> Result<Value, ServeError> {
    let version = state.inference.repository.resolve(&path.model, &path.selector)?;
    let tensor = |t: &savedmodel::TensorSpec| {
        let shape = match &t.shape {
            Some(dims) => {
                json!({ "dim": dims.iter().map(|d| json!({ "size": d.to_string(), "name": "" })).collect::<Vec<_>>(), "unknown_rank": false })
            }
            None => json!({ "dim": [], "unknown_rank": true }),
        };
        json!({ "dtype": t.dtype.as_str_name(), "tensor_shape": shape, "name": t.tensor_name })
    };
    let signatures: serde_json::Map<String, Value> = version
        .specs
        .iter()
        .map(|(name, spec)| {
            let inputs: serde_json::Map<String, Value> =
                spec.inputs.iter().map(|(k, t)| (k.clone(), tensor(t))).collect();
            let outputs: serde_json::Map<String, Value> =
                spec.outputs.iter().map(|(k, t)| (k.clone(), tensor(t))).collect();
            (name.clone(), json!({ "inputs": inputs, "outputs": outputs, "method_name": spec.method_name }))
        })
        .collect();
    Ok(json!({
        "model_spec": { "name": version.model, "signature_name": "", "version": version.version.to_string() },
        "metadata": { "signature_def": { "signature_def": signatures } },
    }))
}

async fn predict(
    state: &RestState,
    path: ModelPath,
    routing_key: Option<Vec<u8>>,
    body: &[u8],
) -> Result<Value, ServeError> {
    let started = Instant::now();
    let mut target = None;
    let result = predict_inner(state, path, routing_key, body, &mut target).await;
    state.metrics.observe_result(Api::RestPredict, target.as_ref(), started, &result);
    result
}

async fn predict_inner(
    state: &RestState,
    path: ModelPath,
    routing_key: Option<Vec<u8>>,
    body: &[u8],
    target: &mut Option<(String, i64, String)>,
) -> Result<Value, ServeError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| ServeError::InvalidArgument(format!("the request body is not valid JSON: {e}")))?;
    let signature = match body.get("signature_name") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ServeError::InvalidArgument("signature_name must be a string".into())),
    };
    let version = state.inference.resolve(&path.model, &path.selector, routing_key.as_deref())?;
    let signature_name = signature.clone().filter(|s| !s.is_empty()).unwrap_or(savedmodel::DEFAULT_SIGNATURE.into());
    *target = Some(version.metrics_target(&signature_name));
    let spec = version.specs.get(&signature_name).ok_or_else(|| ServeError::SignatureNotFound {
        model: version.model.clone(),
        version: version.version,
        signature: signature_name.clone(),
        available: version.specs.keys().cloned().collect(),
    })?;
    let rows_form = body.get("instances").is_some();
    let inputs = tensor_json::parse_request(body, spec)
        .map_err(|e| ServeError::InvalidArgument(format!("model {:?}: {e}", version.model)))?
        .into_iter()
        .map(|(name, value)| (name, WireTensor::Json(value)))
        .collect();
    let answer = state
        .inference
        .run(
            InferenceRequest {
                model: path.model,
                // Pin the version resolved above, so the signature checked is the one run.
                selector: VersionSelector::Version(version.version),
                signature,
                inputs,
                output_filter: Vec::new(),
                routing_key: None, // the version is pinned above
                row_keys: None,
            },
            target,
        )
        .await?;
    if rows_form {
        tensor_json::predictions_to_json(&answer.outputs).map_err(ServeError::InvalidArgument)
    } else {
        let mut value = tensor_json::outputs_to_json(&answer.outputs);
        // A single output is returned bare, as TF Serving does.
        if let Some(outputs) = value.get("outputs").and_then(Value::as_object)
            && outputs.len() == 1
        {
            let only = outputs.values().next().cloned().unwrap_or(Value::Null);
            value = json!({ "outputs": only });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_serving_paths_parse() {
        let p = parse_model_path("/v1/models/ae/versions/2:predict").unwrap();
        assert_eq!(
            (p.model.as_str(), p.selector, p.action),
            ("ae", VersionSelector::Version(2), Action::Verb("predict".into()))
        );
        let p = parse_model_path("/v1/models/ae/labels/stable/metadata").unwrap();
        assert_eq!((p.selector, p.action), (VersionSelector::Label("stable".into()), Action::Metadata));
        let p = parse_model_path("/v1/models/ae").unwrap();
        assert_eq!((p.selector, p.action), (VersionSelector::Latest, Action::Status));
        assert!(parse_model_path("/v1/models/ae/versions/x").is_none());
        assert!(parse_model_path("/v1/models/").is_none());
        assert!(parse_model_path("/v2/models/ae").is_none());
    }
}
