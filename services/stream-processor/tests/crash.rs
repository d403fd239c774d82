//! The `stream-processor` binary killed mid-stream (SIGKILL: no drain, no commit) and
//! started again: every reading is scored, and the repeats are bounded by what was in
//! flight plus what was confirmed since the last commit. Kafka is the in-process mock
//! cluster and the model server runs in this process; the processor is a real process.

mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const IN_FLIGHT: usize = 16;

struct ProcessorProcess {
    child: Child,
    admin: String,
}

impl ProcessorProcess {
    fn start(kafka: &embedded_brokers::KafkaCluster, model: std::net::SocketAddr) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stream-processor"))
            .args(["--kafka-brokers", kafka.bootstrap_servers(), "--admin-listen", "127.0.0.1:0"])
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(["--model-endpoints", &format!("http://{model}"), "--group-id", "crash-test"])
            .env("PROCESSOR_MAX_IN_FLIGHT_PER_PARTITION", IN_FLIGHT.to_string())
            .env("PROCESSOR_CONSUMER__SESSION_TIMEOUT_MS", "6000")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let admin = loop {
            let line = lines.next().expect("the processor exited before serving /ready").unwrap();
            eprintln!("processor: {line}");
            if line.contains("serving /live") {
                break format!("http://{}", line.rsplit("address=").next().unwrap().trim());
            }
        };
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| eprintln!("processor: {line}")));
        Self { child, admin }
    }

    async fn scored(&self) -> f64 {
        metric(&self.admin, "processor_scores_total").await
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), rustix::process::Signal::TERM)
            .unwrap();
        self.child.wait().unwrap()
    }
}

/// A failed assertion must not leave the process running (it would hold the test's
/// output pipe open and keep consuming).
impl Drop for ProcessorProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_processor_loses_no_reading_and_repeats_at_most_its_window() {
    let kafka = kafka();
    let server = ModelServer::start(&[]).await;
    let readings = fleet_readings(50, 60, 13);
    let total = readings.len();
    // Readings arrive steadily while the processor runs, is killed and comes back.
    let started = Instant::now();
    let producing = {
        let (servers, readings) = (kafka.bootstrap_servers().to_owned(), readings.clone());
        tokio::spawn(async move {
            let producer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &servers)
                .set("enable.idempotence", "true")
                .set("linger.ms", "1")
                .create::<rdkafka::producer::FutureProducer>()
                .unwrap();
            for chunk in readings.chunks(50) {
                let mut deliveries = Vec::new();
                for reading in chunk {
                    let payload = prost::Message::encode_to_vec(reading);
                    let record = rdkafka::producer::FutureRecord::to(READINGS)
                        .key(reading.device_id.as_bytes())
                        .payload(&payload);
                    deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
                }
                for delivery in deliveries {
                    delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    let first = ProcessorProcess::start(&kafka, server.grpc);
    eventually(Duration::from_secs(60), "scores flowing before the kill", || async { first.scored().await >= 600.0 })
        .await;
    first.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = ProcessorProcess::start(&kafka, server.grpc);
    producing.await.unwrap();
    let rate = total as f64 / started.elapsed().as_secs_f64();

    let records = read(&kafka, SCORES, move |r| distinct(r) >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored after the crash");
    let repeats = records.len() - total;
    // Lost with the process: what was in flight (its outputs may be written, its
    // offset not committed) and what was confirmed since the last auto-commit: one
    // interval (100 ms) plus the commit's own round trip, which on a loaded 2-core
    // machine (this test, the processor, the model server and the mock cluster) was
    // seen to take longer than another interval; 0.5 s in all.
    let bound = PARTITIONS as usize * IN_FLIGHT + (rate * 0.5).ceil() as usize;
    eprintln!("{repeats} repeats after the crash (bound {bound}, {rate:.0} readings/s)");
    assert!(repeats <= bound, "{repeats} repeats exceed the in-flight windows plus a commit interval ({bound})");

    // A graceful stop drains and exits cleanly.
    assert!(second.terminate().success(), "SIGTERM: a clean exit");
    server.stop().await;
}
