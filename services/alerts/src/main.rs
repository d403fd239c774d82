//! `alerts`: windowed alert rules over the scores topic (see `alerts::cli`).

fn main() -> anyhow::Result<()> {
    alerts::cli::main(std::env::args_os())
}
