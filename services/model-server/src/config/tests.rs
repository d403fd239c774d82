//! Unit tests of `config.rs`, kept apart so the module reads as code.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn rollout_kafka_properties_come_from_the_environment_and_flags_win() {
    let properties = rollout_kafka_properties(
        env(&[
            ("MODEL_SERVER_ROLLOUT_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
            ("MODEL_SERVER_ROLLOUT_KAFKA__SASL_PASSWORD", "from-env"),
            ("MODEL_SERVER_ROLLOUT_KAFKA_BROKERS", "not a property"),
            ("INGEST_KAFKA__SASL_PASSWORD", "not ours"),
        ]),
        &["sasl.password=from=flag".into(), "sasl.mechanism=SCRAM-SHA-512".into()],
    )
    .unwrap();
    assert_eq!(
        properties,
        vec![
            ("sasl.mechanism".to_owned(), "SCRAM-SHA-512".to_owned()),
            ("sasl.password".to_owned(), "from=flag".to_owned()),
            ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
        ]
    );
}

#[test]
fn rollout_kafka_properties_refuse_what_the_server_sets_or_cannot_parse() {
    let error = rollout_kafka_properties(env(&[]), &["bootstrap.servers=x:9092".into()]).unwrap_err();
    assert!(error.contains("--rollout_kafka_brokers"), "{error}");
    let error = rollout_kafka_properties(env(&[("MODEL_SERVER_ROLLOUT_KAFKA__GROUP_ID", "g")]), &[]).unwrap_err();
    assert!(error.contains("\"group.id\""), "{error}");
    let error = rollout_kafka_properties(env(&[]), &["sasl.mechanism".into()]).unwrap_err();
    assert!(error.contains("KEY=VALUE"), "{error}");
}
