//! A canary rollout seen from the scores: the processor sends each reading's device id as
//! the routing key, so with the model server splitting car-anomaly 75/25 between v1 and
//! v2, every device's scores come from one version, the one its bucket picks, and the
//! score records say which.

mod support;

use std::collections::BTreeMap;

use canary::split::{Weight, bucket};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_devices_scores_come_from_the_version_its_routing_key_picks() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.config");
    std::fs::write(
        &models,
        format!(
            "model_config_list {{ config {{ name: \"car-anomaly\" base_path: \"{}\" model_platform: \"tensorflow\"\n\
               model_version_policy {{ all {{}} }} }} }}",
            root().join("deploy/models/car-anomaly").display()
        ),
    )
    .unwrap();
    let rollouts = dir.path().join("rollouts.toml");
    std::fs::write(
        &rollouts,
        "[[rollouts]]\nmodel = \"car-anomaly\"\nstable = 1\ncanary = 2\ncanary_weight_percent = 25\n",
    )
    .unwrap();
    let server = ModelServer::start(&[
        &format!("--model_config_file={}", models.display()),
        &format!("--rollout_config_file={}", rollouts.display()),
    ])
    .await;
    let kafka = kafka();
    let processor = Processor::start(config(&kafka, &[server.grpc])).await;
    let readings = fleet_readings(40, 10, 21);
    produce_readings(&kafka, &readings).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| r.len() >= total).await;

    let canary_buckets = Weight::from_percent(25.0).unwrap().basis_points();
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (score, record) in scores(&records).iter().zip(&records) {
        let expected = if bucket("car-anomaly", score.device_id.as_bytes()) < canary_buckets { 2 } else { 1 };
        assert_eq!(score.model_version, expected, "{} was scored by the wrong version", score.device_id);
        assert_eq!(record.header("vigil.model.version"), Some(expected.to_string().as_bytes()));
        versions.entry(score.device_id.clone()).or_default().push(score.model_version);
    }
    let on_canary = versions.values().filter(|v| v[0] == 2).count();
    assert!(on_canary > 0 && on_canary < versions.len(), "both versions scored some devices: {on_canary} of 40");
    processor.stop().await;
    server.stop().await;
}
