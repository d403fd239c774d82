//! `model-server`: serves TensorFlow SavedModels (see `model_server::cli`).

use std::process::ExitCode;

// mimalloc returns freed pages to the OS: after a large model version unloads, RSS falls
// back (measured: 330 -> 50 MiB) where glibc's malloc kept ~150 MiB of it. See
// docs/benchmarks.md ("Reload and unload").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    model_server::cli::main(std::env::args_os())
}
