//! `device-simulator`: runs a simulated car fleet (see `device_simulator::cli`).

fn main() -> anyhow::Result<()> {
    device_simulator::cli::main(std::env::args_os())
}
