"""Groups a flat `perf report --sort dso,sym --stdio` (read from stdin) by kind of work.

Each symbol goes to the first kind whose pattern it matches, so the order matters (a
kernel symbol of the scheduler is "kernel: scheduling" before "kernel: other"). Prints
each kind's share of the samples read, largest first.
"""

import re
import sys
from collections import Counter

KINDS = [
    ("allocation (mimalloc; glibc malloc for librdkafka)", r"\bmi_|_mi_|malloc|\bfree\b|cfree|_int_free|unlink_chunk|calloc|realloc"),
    ("librdkafka (protocol, queues, LZ4, CRC)", r"\brd_|LZ4|lz4|crc32"),
    ("kernel: scheduling and wake-ups", r"\[k\].*(task_switch|schedule|futex|_raw_spin|try_to_wake|enqueue|dequeue|update_curr|psi_|pick_next|ttwu|select_task)"),
    ("kernel: network, syscalls, other", r"\[k\]"),
    ("clock reads", r"clock_gettime|vdso"),
    ("memcpy / memset", r"memmove|memset|memcpy"),
    ("model run (tract)", r"tract|fma_mmm|ndarray|pack_k|savedmodel"),
    ("protobuf (prost)", r"prost"),
    ("gRPC (tonic, h2, hyper)", r"tonic|\bh2::|hyper|\bhttp::"),
    ("metrics (prometheus)", r"prometheus"),
    ("tracing (opentelemetry, tracing)", r"opentelemetry|tracing"),
    ("async runtime, futures, channels", r"tokio|futures|oneshot|mpsc|Notify|[Ss]emaphore|LocalKey"),
    ("the processor's own code", r"stream_processor"),
    ("the model server's own code", r"model_server"),
    ("reading checks (sensor)", r"sensor::"),
    ("the bench's load and readers", r"\bpipeline::"),
    ("libc, other", r"libc|pthread|poll"),
]


def main() -> None:
    shares: Counter[str] = Counter()
    total = 0.0
    for line in sys.stdin:
        match = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(.*)", line)
        if not match:
            continue
        percent, symbol = float(match.group(1)), f"{match.group(2)} {match.group(3)}"
        total += percent
        kind = next((name for name, pattern in KINDS if re.search(pattern, symbol)), "other")
        shares[kind] += percent
    if total == 0:
        sys.exit("no samples read")
    for kind, percent in shares.most_common():
        print(f"{percent / total * 100:5.1f}%  {kind}")


if __name__ == "__main__":
    main()
