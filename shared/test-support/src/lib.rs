//! What Vigil's test suites and benches share, one home per piece instead of a copy per
//! suite (the copies had drifted in their deadlines, messages and error handling). A
//! dev-dependency only:
//!
//! - [`wait`]: waiting on observable state with a deadline ([`eventually`],
//!   [`wait_until`], [`observe_until`]), never a guessed sleep;
//! - [`metrics`]: one series of a Prometheus text exposition ([`metric`]) or a total over
//!   series ([`metric_total`]);
//! - [`endpoint`]: a service's `/ready` and `/metrics` over HTTP ([`Endpoint`]);
//! - [`child`]: a service binary as a child process, its addresses read from its output,
//!   killed or terminated ([`ChildService`]);
//! - [`files`]: a file written to a temporary directory for the code under test to read
//!   ([`temp_file`]);
//! - [`names`]: names unique in the test run ([`unique_name`]);
//! - [`kafka`]: records produced and confirmed, and a topic read back, on the shared
//!   `kafka` crate and the embedded brokers;
//! - [`tail`]: topics followed from their beginning with each record's times, never
//!   trusting a watermark (tansu's are wrong) ([`Tail`]);
//! - [`logs`]: log output captured in memory ([`CapturedLogs`]);
//! - [`pki`]: test certificates (a CA, server and client certificates) and a TLS client.
//!
//! What stays in each suite's own support: starting that service in process, its config and
//! what its records mean.

#![forbid(unsafe_code)]

pub mod child;
pub mod endpoint;
pub mod files;
pub mod kafka;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod pki;
pub mod tail;
pub mod wait;

pub use child::{ChildService, Output};
pub use endpoint::Endpoint;
pub use files::{TempFile, copy_dir, temp_file};
pub use logs::CapturedLogs;
pub use metrics::{metric, metric_total};
pub use names::unique_name;
pub use tail::{Tail, TailedRecord};
pub use wait::{Poll, eventually, observe_until, wait_until};
