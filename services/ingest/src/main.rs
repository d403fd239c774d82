//! `ingest`: the MQTT -> Kafka bridge (see `ingest::cli`).

fn main() -> anyhow::Result<()> {
    ingest::cli::main(std::env::args_os())
}
