//! Names no other test in this run has: for what a broker keeps per name (a consumer
//! group's static member ids, say), where two tests, or two instances in one test, sharing
//! a name would disturb each other.

use std::sync::atomic::{AtomicU64, Ordering};

/// `<prefix>-<process id>-<n>`, `n` counting up in this process.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
