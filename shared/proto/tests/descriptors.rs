//! The compiled descriptor set carries the services and field numbers clients depend on.

use prost::Message;
use prost_types::FileDescriptorSet;

fn set() -> FileDescriptorSet {
    FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap()
}

#[test]
fn services_and_methods_are_the_published_ones() {
    let set = set();
    let methods = |package: &str, service: &str| -> Vec<String> {
        set.file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == service)
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect()
    };
    assert_eq!(
        methods("tensorflow.serving", "PredictionService"),
        ["Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata"]
    );
    assert_eq!(methods("tensorflow.serving", "ModelService"), ["GetModelStatus", "HandleReloadConfigRequest"]);
    assert_eq!(
        methods("inference", "GRPCInferenceService"),
        ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
    );
}

#[test]
fn field_numbers_that_matter_on_the_wire() {
    let set = set();
    let number = |message: &str, field: &str| -> i32 {
        let (package, name) = message.rsplit_once('.').unwrap();
        set.file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == name)
            .and_then(|m| m.field.iter().find(|f| f.name() == field))
            .unwrap_or_else(|| panic!("{message}.{field}"))
            .number()
    };
    assert_eq!(number("tensorflow.TensorProto", "tensor_content"), 4);
    assert_eq!(number("tensorflow.TensorProto", "float_val"), 5);
    assert_eq!(number("tensorflow.TensorProto", "half_val"), 13);
    assert_eq!(number("tensorflow.serving.ModelSpec", "version_label"), 4);
    assert_eq!(number("tensorflow.serving.PredictRequest", "output_filter"), 3);
    assert_eq!(number("tensorflow.serving.PredictResponse", "model_spec"), 2);
    assert_eq!(number("tensorflow.serving.ModelConfig", "model_version_policy"), 7);
    assert_eq!(number("tensorflow.serving.PredictionLog", "predict_log"), 6);
    assert_eq!(number("inference.ModelInferRequest", "raw_input_contents"), 7);
    assert_eq!(number("inference.ModelInferResponse", "raw_output_contents"), 6);
}

#[test]
fn json_names_follow_upstream() {
    // TF Serving declares snake_case JSON names for these; reflection-based JSON tools use them.
    let set = set();
    let json_name = |message: &str, field: &str| -> String {
        set.file
            .iter()
            .filter(|f| f.package() == "tensorflow.serving")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == message)
            .and_then(|m| m.field.iter().find(|f| f.name() == field))
            .unwrap_or_else(|| panic!("{message}.{field}"))
            .json_name()
            .to_owned()
    };
    assert_eq!(json_name("StatusProto", "error_code"), "error_code");
    assert_eq!(json_name("StatusProto", "error_message"), "error_message");
    assert_eq!(json_name("GetModelStatusResponse", "model_version_status"), "model_version_status");
}
