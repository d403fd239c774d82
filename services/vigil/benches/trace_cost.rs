//! What tracing costs per reading: the exact calls ingest, the stream processor and the
//! model server make for one reading (ingest's span and its Kafka headers, the
//! processor's reading span, a Predict client span and its gRPC metadata, the model
//! server's layer span, the attributes each notes), run back to back in one thread under
//! three setups side by side:
//!
//! - **off**: no exporter configured (the default: the global provider is a no-op, spans
//!   only pass the context on);
//! - **sampled 1%**: the SDK with `parentbased_traceidratio` 0.01, exporting to a
//!   discarding exporter through the batch processor (readings arrive without a device
//!   context, so ingest's root span decides);
//! - **all**: the SDK sampling everything into the same exporter.
//!
//! Each is compared with a reference the pipeline pays per reading anyway: encoding the
//! reading's 17-input `PredictRequest` and decoding it again (prost), as the processor and
//! the model server do. Rounds interleave the setups; medians are reported.
//!
//! Run: `cargo bench -p vigil --bench trace_cost` (writes
//! `benchmarks/results/trace-cost.json`; see docs/benchmarks.md).

use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use prost::Message as _;
use serde_json::json;
use tonic::codegen::http;
use tower::Layer as _;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const READINGS_PER_ROUND: u32 = 20_000;
const ROUNDS: usize = 9;

/// Takes every batch and drops it: the SDK's cost without a network.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Off,
    Sampled,
    All,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Off => "off (no exporter)",
            Setup::Sampled => "sampled 1%",
            Setup::All => "all sampled",
        }
    }

    fn install(self) -> Option<SdkTracerProvider> {
        let sampler = match self {
            Setup::Off => {
                opentelemetry::global::set_tracer_provider(opentelemetry::trace::noop::NoopTracerProvider::new());
                return None;
            }
            Setup::Sampled => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.01))),
            Setup::All => Sampler::AlwaysOn,
        };
        let provider = SdkTracerProvider::builder().with_sampler(sampler).with_batch_exporter(Discard).build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        Some(provider)
    }
}

/// One reading's tracing, as the three services do it.
async fn one_reading(server: &mut impl tower::Service<http::Request<()>, Response = http::Response<()>>) {
    // Ingest: the message's span, its record's headers, the confirmed write.
    let cx = ingest::trace::mqtt_message("vehicles/sensor/data/car-17", &[]);
    let mut record = ingest::record::OutRecord {
        topic: "vigil-readings".into(),
        topic_label: "vigil-readings".into(),
        key: Some(b"car-17".to_vec()),
        payload: Vec::new(),
        headers: vec![("mqtt.topic".into(), b"vehicles/sensor/data/car-17".to_vec())],
        dead_letter: None,
    };
    ingest::trace::attach(&cx, &mut record);
    let written =
        Ok(ingest::kafka::Written { topic: record.topic.clone(), partition: 3, offset: 42, dead_letter: None });
    ingest::trace::written(&cx, &written);

    // The processor: the reading's span from the record's headers, one Predict call.
    let mut source = stream_processor::output::Source {
        topic: record.topic.clone(),
        partition: 3,
        offset: 42,
        key: record.key.clone(),
        timestamp: None,
        headers: record.headers.into_iter().filter(|(k, _)| k == "traceparent" || k == "tracestate").collect(),
    };
    let reading = stream_processor::trace::reading(&mut source);
    let call = stream_processor::trace::predict_call(&reading, Some("car-17"), 1, &[]);
    let mut metadata = tonic::metadata::MetadataMap::new();
    telemetry::context_into_metadata(&call, &mut metadata);

    // The model server's layer, on a request carrying that metadata.
    let mut request = http::Request::new(());
    *request.uri_mut() = http::Uri::from_static("/tensorflow.serving.PredictionService/Predict");
    *request.headers_mut() = metadata.into_headers();
    let response = server.call(request).await;
    std::hint::black_box(&response);

    stream_processor::trace::predict_done(&call, &Ok::<(), tonic::Status>(()));
    let scored = stream_processor::model::Scored {
        score: 0.42,
        threshold: 1.0,
        model_name: "car-anomaly".into(),
        model_version: 2,
        latency: Duration::from_micros(900),
        waited: Duration::ZERO,
    };
    stream_processor::trace::scored(&reading, "car-17", &scored);
    reading.span().end();
}

/// The reference: one reading's PredictRequest encoded and decoded.
fn reference_work(request: &proto::tensorflow::serving::PredictRequest) {
    let bytes = request.encode_to_vec();
    let decoded = proto::tensorflow::serving::PredictRequest::decode(bytes.as_slice()).unwrap();
    std::hint::black_box(decoded);
}

fn predict_request() -> proto::tensorflow::serving::PredictRequest {
    use proto::tensorflow::{DataType, TensorProto, TensorShapeProto, tensor_shape_proto};
    let inputs = sensor::signals()
        .iter()
        .take(17)
        .map(|signal| {
            let tensor = TensorProto {
                dtype: DataType::DtFloat as i32,
                tensor_shape: Some(TensorShapeProto {
                    dim: vec![tensor_shape_proto::Dim { size: 1, ..Default::default() }],
                    ..Default::default()
                }),
                float_val: vec![1.5],
                ..Default::default()
            };
            (signal.name.to_owned(), tensor)
        })
        .collect();
    proto::tensorflow::serving::PredictRequest {
        model_spec: Some(proto::tensorflow::serving::ModelSpec { name: "car-anomaly".into(), ..Default::default() }),
        inputs,
        output_filter: vec!["anomaly_score".into(), "threshold".into()],
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut server =
        telemetry::GrpcTraceLayer::new("vigil-model-server").layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
    let request = predict_request();
    let setups = [Setup::Off, Setup::Sampled, Setup::All];
    let mut per_reading: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut reference = Vec::new();
    for round in 0..ROUNDS {
        for (index, setup) in setups.iter().enumerate().cycle().skip(round % setups.len()).take(setups.len()) {
            let provider = setup.install();
            runtime.block_on(async {
                for _ in 0..1_000 {
                    one_reading(&mut server).await; // warm-up
                }
                let started = Instant::now();
                for _ in 0..READINGS_PER_ROUND {
                    one_reading(&mut server).await;
                }
                per_reading[index].push(started.elapsed().as_nanos() as f64 / f64::from(READINGS_PER_ROUND));
            });
            if let Some(provider) = provider {
                provider.shutdown().unwrap();
            }
        }
        let started = Instant::now();
        for _ in 0..READINGS_PER_ROUND {
            reference_work(&request);
        }
        reference.push(started.elapsed().as_nanos() as f64 / f64::from(READINGS_PER_ROUND));
    }
    let reference_ns = median(&mut reference);
    println!("reference (PredictRequest encode + decode): {reference_ns:.0} ns per reading");
    let mut results = Vec::new();
    for (index, setup) in setups.iter().enumerate() {
        let rounds = per_reading[index].clone();
        let ns = median(&mut per_reading[index]);
        println!("{:<20} {:>7.0} ns per reading ({:.2}x the reference)", setup.name(), ns, ns / reference_ns);
        results.push(json!({
            "setup": setup.name(),
            "ns_per_reading": ns.round(),
            "vs_reference": (ns / reference_ns * 100.0).round() / 100.0,
            "rounds_ns": rounds.iter().map(|v| v.round()).collect::<Vec<_>>(),
        }));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("benchmarks/results/trace-cost.json");
    let report = json!({
        "benchmark": "tracing calls of ingest, stream processor and model server for one reading (4 spans, context through Kafka headers and gRPC metadata), one thread",
        "reference": "encode + decode of the reading's 17-input PredictRequest (prost)",
        "reference_ns_per_reading": reference_ns.round(),
        "readings_per_round": READINGS_PER_ROUND,
        "rounds": ROUNDS,
        "results": results,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    println!("wrote {}", out.display());
}
