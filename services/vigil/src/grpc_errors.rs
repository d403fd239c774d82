//! How the CLI words a failed call: the gRPC code's name and an error's chain of causes,
//! the same for `vigil rollout` and `vigil replay`.

/// The gRPC code's canonical name in words ("invalid argument"), which operators search
/// docs and dashboards by; tonic's own descriptions are sentences.
pub fn code_name(code: tonic::Code) -> String {
    proto::status_code_name(code).to_ascii_lowercase().replace('_', " ")
}

/// The error and its causes, each once (tonic's transport errors say little at the top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}
