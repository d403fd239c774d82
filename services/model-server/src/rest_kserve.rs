//! KServe v2 / Open Inference Protocol over HTTP, on the REST port beside TF Serving's
//! `/v1` API, so Triton's and KServe's HTTP clients (`tritonclient.http`, KServe's SDK,
//! curl) can call the same models:
//!
//! | route | answers |
//! | --- | --- |
//! | `GET /v2/health/live`, `GET /v2/health/ready` | 200, or 400 while not ready (empty bodies) |
//! | `GET /v2` | server metadata: name, version, extensions |
//! | `GET /v2/models/{m}[/versions/{v}]` | model metadata: versions, platform, tensors |
//! | `GET /v2/models/{m}[/versions/{v}]/ready` | 200, or 400 |
//! | `POST /v2/models/{m}[/versions/{v}]/infer` | inference |
//!
//! Inference takes JSON tensors (`data`, flat or nested) and Triton's binary tensor data
//! extension: an `Inference-Header-Content-Length` header gives the JSON's length and
//! each input with a `binary_data_size` parameter takes its bytes, in input order, from
//! what follows. Outputs come back as JSON, or as binary data when an output asks with
//! `binary_data` or the request with `binary_data_output`. It runs the same path as the
//! gRPC `ModelInfer` ([`crate::grpc::kserve::infer`]): the same admission and limits, canary
//! routing by the same header, the same errors, in the protocol's `{"error": "..."}` form.

use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use proto::inference::InferTensorContents;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::admission::KserveTensor;
use crate::error::ServeError;
use crate::grpc::kserve::{self, KserveCall};
use crate::metrics::Api;
use crate::rest::RestState;
use crate::tensor_codec::Element;
use crate::tensor_json;

/// The binary tensor data extension's header: the length of the JSON part of a body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// What the server metadata lists: the extension this module implements.
const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];

/// A `/v2` route.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    ServerMetadata,
    Live,
    Ready,
    ModelMetadata { model: String, version: String },
    ModelReady { model: String, version: String },
    Infer { model: String, version: String },
}

fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let (model, version, action) = match parts.as_slice() {
        [] if rest.is_empty() || rest == "/" => return Some(Route::ServerMetadata),
        ["health", "live"] => return Some(Route::Live),
        ["health", "ready"] => return Some(Route::Ready),
        ["models", model, "versions", version, action @ ..] => (model, *version, action),
        ["models", model, action @ ..] => (model, "", action),
        _ => return None,
    };
    let (model, version) = ((*model).to_owned(), version.to_owned());
    Some(match action {
        [] => Route::ModelMetadata { model, version },
        ["ready"] => Route::ModelReady { model, version },
        ["infer"] => Route::Infer { model, version },
        _ => return None,
    })
}

/// Whether `path` is one of this protocol's (`/v2` or under it).
pub fn is_kserve_path(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// Whether a `/v2` request is a health check (never shed, like `/live` and `/ready`).
pub fn is_health_path(path: &str) -> bool {
    matches!(route(path), Some(Route::Live | Route::Ready))
}

/// Answers one `/v2` request.
pub async fn handle(state: &RestState, method: &Method, path: &str, headers: &HeaderMap, body: Bytes) -> Response {
    let Some(route) = route(path) else {
        return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": format!("no such endpoint: {path}") })))
            .into_response();
    };
    let inference = &state.inference;
    let yes_or_no = |yes: bool| if yes { StatusCode::OK } else { StatusCode::BAD_REQUEST }.into_response();
    match (method, route) {
        (&Method::GET, Route::Live) => StatusCode::OK.into_response(),
        (&Method::GET, Route::Ready) => yes_or_no(inference.repository.readiness().is_ok()),
        (&Method::GET, Route::ServerMetadata) => axum::Json(json!({
            "name": kserve::SERVER_NAME,
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": EXTENSIONS,
        }))
        .into_response(),
        (&Method::GET, Route::ModelReady { model, version }) => {
            yes_or_no(kserve::model_ready(inference, &model, &version))
        }
        (&Method::GET, Route::ModelMetadata { model, version }) => {
            match kserve::model_metadata(inference, &model, &version) {
                Ok(m) => {
                    let tensor = |t: &proto::inference::model_metadata_response::TensorMetadata| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape });
                    axum::Json(json!({
                        "name": m.name,
                        "versions": m.versions,
                        "platform": m.platform,
                        "inputs": m.inputs.iter().map(tensor).collect::<Vec<_>>(),
                        "outputs": m.outputs.iter().map(tensor).collect::<Vec<_>>(),
                    }))
                    .into_response()
                }
                Err(e) => error(&e),
            }
        }
        (&Method::POST, Route::Infer { model, version }) => {
            let started = Instant::now();
            let mut target = None;
            let routing_key = headers.get(canary::ROUTING_KEY_METADATA).map(|v| v.as_bytes().to_vec());
            let run = infer(state, model, version, routing_key, headers, body, &mut target);
            let result = match state.request_timeout {
                Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                    Err(ServeError::DeadlineExceeded(format!("the request took more than {} s", limit.as_secs_f64())))
                }),
                None => run.await,
            };
            state.metrics.observe_result(Api::KserveRestInfer, target.as_ref(), started, &result);
            result.unwrap_or_else(|e| error(&e))
        }
        (method, _) => error(&ServeError::InvalidArgument(format!("{method} {path} is not a supported request"))),
    }
}

/// The protocol's error form: `{"error": "..."}` with the HTTP status of the error's code.
fn error(error: &ServeError) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": error.to_string() }))).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

fn invalid(message: String) -> ServeError {
    ServeError::InvalidArgument(message)
}

/// A parameter of a JSON type, or `None` when not given.
fn parameter<'a, T>(
    parameters: &'a Map<String, Value>,
    key: &str,
    whose: &str,
    read: impl Fn(&'a Value) -> Option<T>,
    kind: &str,
) -> Result<Option<T>, ServeError> {
    match parameters.get(key) {
        None => Ok(None),
        Some(value) => {
            read(value).map(Some).ok_or_else(|| invalid(format!("{whose} parameter {key:?} must be {kind}")))
        }
    }
}

async fn infer(
    state: &RestState,
    model: String,
    version: String,
    routing_key: Option<Vec<u8>>,
    headers: &HeaderMap,
    body: Bytes,
    target: &mut Option<(String, i64, String)>,
) -> Result<Response, ServeError> {
    let (json_part, mut binary) = split_body(headers, &body)?;
    let request: InferRequestJson =
        serde_json::from_slice(json_part).map_err(|e| invalid(format!("the inference request: {e}")))?;
    let signature = parameter(&request.parameters, "signature_name", "the request's", Value::as_str, "a string")?;
    let all_binary =
        parameter(&request.parameters, "binary_data_output", "the request's", Value::as_bool, "a boolean")?
            .unwrap_or(false);
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let whose = format!("input {:?}'s", input.name);
        let size = parameter(&input.parameters, "binary_data_size", &whose, Value::as_u64, "a byte count")?;
        let (contents, raw) = match (size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!("input {:?} has both data and binary_data_size", input.name)));
            }
            (None, None) => {
                return Err(invalid(format!("input {:?} has neither data nor binary_data_size", input.name)));
            }
            (Some(size), None) => (None, Some(take(&mut binary, size, &input.name)?.to_vec())),
            (None, Some(data)) => (Some(contents(&input.name, &input.datatype, data)?), None),
        };
        inputs.push((input.name, KserveTensor { datatype: input.datatype, shape: input.shape, contents, raw }));
    }
    if !binary.is_empty() {
        return Err(invalid(format!("{} bytes of binary data follow the last input's", binary.len())));
    }
    // Whether each output comes back as binary data: its own parameter, else the request's.
    let mut binary_outputs = Vec::with_capacity(request.outputs.len());
    for output in &request.outputs {
        let whose = format!("output {:?}'s", output.name);
        binary_outputs.push(parameter(&output.parameters, "binary_data", &whose, Value::as_bool, "a boolean")?);
    }
    let call = KserveCall {
        model,
        version,
        signature: signature.map(str::to_owned),
        inputs,
        outputs: request.outputs.iter().map(|o| o.name.clone()).collect(),
        routing_key,
    };
    let answer = kserve::infer(&state.inference, call, target).await?;

    let mut outputs = Vec::with_capacity(answer.outputs.len());
    let mut appended: Vec<u8> = Vec::new();
    for (index, (name, element, tensor)) in answer.outputs.into_iter().enumerate() {
        let mut output = json!({
            "name": name,
            "datatype": element.kserve_name(),
            "shape": tensor.shape(),
        });
        if binary_outputs.get(index).copied().flatten().unwrap_or(all_binary) {
            let bytes = tensor.as_bytes();
            output["parameters"] = json!({ "binary_data_size": bytes.len() });
            appended.extend_from_slice(bytes);
        } else {
            output["data"] = Value::Array(tensor_json::flat_values(&tensor).map_err(ServeError::Internal)?);
        }
        outputs.push(output);
    }
    let mut response = json!({
        "model_name": answer.model,
        "model_version": answer.version.to_string(),
        "outputs": outputs,
    });
    if let Some(id) = request.id {
        response["id"] = Value::String(id);
    }
    let mut body = serde_json::to_vec(&response).map_err(|e| ServeError::Internal(e.to_string()))?;
    if appended.is_empty() {
        return Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response());
    }
    let json_length = HeaderValue::from(body.len());
    body.extend_from_slice(&appended);
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::HeaderName::from_static(HEADER_LENGTH), json_length),
        ],
        body,
    )
        .into_response())
}

/// The body's JSON part and the binary data after it (`Inference-Header-Content-Length`).
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ServeError> {
    let Some(value) = headers.get(HEADER_LENGTH) else { return Ok((body, &[])) };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| invalid(format!("header Inference-Header-Content-Length {value:?} is not a byte count")))?;
    if length > body.len() {
        return Err(invalid(format!(
            "header Inference-Header-Content-Length is {length}, more than the body's {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(length))
}

/// The next `size` bytes of the binary part, for input `name`.
fn take<'a>(binary: &mut &'a [u8], size: u64, name: &str) -> Result<&'a [u8], ServeError> {
    let size = usize::try_from(size).ok().filter(|&s| s <= binary.len()).ok_or_else(|| {
        invalid(format!("input {name:?}: binary_data_size is {size}, but {} bytes of binary data remain", binary.len()))
    })?;
    let (taken, rest) = binary.split_at(size);
    *binary = rest;
    Ok(taken)
}

/// JSON `data` (flat or nested, row-major) as the typed contents of `datatype`. The shape
/// is checked against the signature, and the count against the shape, at admission.
fn contents(name: &str, datatype: &str, data: &Value) -> Result<InferTensorContents, ServeError> {
    let element = Element::from_kserve_name(datatype)
        .ok_or_else(|| invalid(format!("input {name:?} has datatype {datatype:?}, which this server cannot run")))?;
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let bad = |index: usize, value: &Value| {
        let kind = match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number out of range",
            Value::String(_) => "a string",
            Value::Array(_) | Value::Object(_) => "an object",
        };
        invalid(format!("input {name:?}: data element {index} is {kind}, not {datatype}"))
    };
    fn each<T>(
        flat: &[&Value],
        read: impl Fn(&Value) -> Option<T>,
        bad: impl Fn(usize, &Value) -> ServeError,
    ) -> Result<Vec<T>, ServeError> {
        flat.iter().enumerate().map(|(i, v)| read(v).ok_or_else(|| bad(i, v))).collect()
    }
    let mut c = InferTensorContents::default();
    match element {
        Element::Bool => c.bool_contents = each(&flat, Value::as_bool, bad)?,
        Element::I8 | Element::I16 | Element::I32 => {
            c.int_contents = each(&flat, |v| v.as_i64().and_then(|x| i32::try_from(x).ok()), bad)?;
        }
        Element::I64 => c.int64_contents = each(&flat, Value::as_i64, bad)?,
        Element::U8 | Element::U16 | Element::U32 => {
            c.uint_contents = each(&flat, |v| v.as_u64().and_then(|x| u32::try_from(x).ok()), bad)?;
        }
        Element::U64 => c.uint64_contents = each(&flat, Value::as_u64, bad)?,
        Element::F32 => c.fp32_contents = each(&flat, |v| v.as_f64().map(|x| x as f32), bad)?,
        Element::F64 => c.fp64_contents = each(&flat, Value::as_f64, bad)?,
        Element::F16 => return Err(invalid(format!("input {name:?}: send FP16 as binary data (binary_data_size)"))),
    }
    Ok(c)
}

/// The leaves of nested arrays, row-major. serde_json's parser bounds the nesting (128).
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_the_protocols() {
        let model = |m: &str, v: &str| (m.to_owned(), v.to_owned());
        assert_eq!(route("/v2"), Some(Route::ServerMetadata));
        assert_eq!(route("/v2/"), Some(Route::ServerMetadata));
        assert_eq!(route("/v2/health/live"), Some(Route::Live));
        assert_eq!(route("/v2/health/ready"), Some(Route::Ready));
        let (m, v) = model("ae", "");
        assert_eq!(route("/v2/models/ae"), Some(Route::ModelMetadata { model: m.clone(), version: v.clone() }));
        assert_eq!(route("/v2/models/ae/ready"), Some(Route::ModelReady { model: m.clone(), version: v.clone() }));
        assert_eq!(route("/v2/models/ae/infer"), Some(Route::Infer { model: m, version: v }));
        let (m, v) = model("ae", "2");
        assert_eq!(
            route("/v2/models/ae/versions/2"),
            Some(Route::ModelMetadata { model: m.clone(), version: v.clone() })
        );
        assert_eq!(route("/v2/models/ae/versions/2/infer"), Some(Route::Infer { model: m, version: v }));
        let nothings = [
            "/v2/models",
            "/v2/models/ae/predict",
            "/v2/health",
            "/v2/models/ae/versions",
            "/v2/models/ae/versions/2/x/infer",
            "/v1/models/ae",
        ];
        for nothing in nothings {
            assert_eq!(route(nothing), None, "{nothing}");
        }
    }

    #[test]
    fn json_data_flat_or_nested_becomes_typed_contents() {
        let nested = contents("x", "FP32", &json!([[1.5, 2], [3, 4]])).unwrap();
        assert_eq!(nested.fp32_contents, vec![1.5, 2.0, 3.0, 4.0]);
        assert_eq!(contents("x", "INT64", &json!([1, -2])).unwrap().int64_contents, vec![1, -2]);
        assert_eq!(contents("x", "BOOL", &json!([true, false])).unwrap().bool_contents, vec![true, false]);
    }

    #[test]
    fn bad_json_data_is_refused_naming_the_input_and_element() {
        let error = |datatype: &str, data: Value| contents("sensors", datatype, &data).unwrap_err().to_string();
        let message = error("FP32", json!([1.0, "2"]));
        assert!(
            message.contains("\"sensors\"") && message.contains("element 1") && message.contains("a string"),
            "{message}"
        );
        assert!(error("INT32", json!([1, 3_000_000_000_i64])).contains("out of range"));
        assert!(error("UINT8", json!([-1])).contains("element 0"));
        assert!(error("BYTES", json!(["a"])).contains("cannot run"));
    }

    #[test]
    fn the_binary_part_is_split_by_the_header_and_taken_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("2"));
        let (json_part, mut binary) = split_body(&headers, b"{}abcdef").unwrap();
        assert_eq!(json_part, b"{}");
        assert_eq!(take(&mut binary, 4, "a").unwrap(), b"abcd");
        assert!(take(&mut binary, 4, "b").unwrap_err().to_string().contains("2 bytes of binary data remain"));
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("99"));
        assert!(split_body(&headers, b"{}").unwrap_err().to_string().contains("more than the body's 2 bytes"));
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("-1"));
        assert!(split_body(&headers, b"{}").is_err());
    }
}
