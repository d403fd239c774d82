//! `stream-processor`: scores every reading with the model server and writes the scores
//! back to Kafka (see `stream_processor::cli`).

// Per reading the processor allocates many small, short-lived buffers (protobuf tensors,
// gRPC frames, Kafka records) across threads; glibc's malloc spent a third of the
// benchmark's CPU in arena locks and chunk consolidation. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    stream_processor::cli::main(std::env::args_os())
}
