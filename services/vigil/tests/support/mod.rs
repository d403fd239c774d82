//! What the `vigil` command's tests share: running the real binary and reading what it
//! printed.

use std::process::Command;
use std::time::Instant;

use serde_json::Value;

/// What one `vigil ...` run printed, and how it exited.
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }

    /// The value of a `label: value` line of the text output.
    pub(crate) fn field(&self, label: &str) -> &str {
        let prefix = format!("{label}:");
        let line = self.stdout.lines().find(|l| l.starts_with(&prefix));
        line.unwrap_or_else(|| panic!("no {label:?} line in:\n{}", self.stdout))[prefix.len()..].trim()
    }
}

/// `run` exited with `code` because nothing answers at `url`, and said so naming the
/// server it tried (`what`) and how to point it elsewhere (`flag`, `variable`).
pub(crate) fn assert_unreachable(run: &Run, code: i32, what: &str, url: &str, flag: &str, variable: &str) {
    assert_eq!(run.code, code, "{}", run.stderr);
    assert!(run.stderr.contains(&format!("{what} at {url}")), "{}", run.stderr);
    assert!(run.stderr.contains(flag) && run.stderr.contains(variable), "{}", run.stderr);
}

/// A command line's words, for arguments without spaces written as one line.
pub(crate) fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Runs `vigil <args>` with `env` set and the variables naming servers (`VIGIL_PROCESSOR`,
/// `VIGIL_MODEL_SERVER`) otherwise removed; blocking, so off the runtime the services run on.
pub(crate) async fn vigil(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
    command.args(args).env_remove("VIGIL_PROCESSOR").env_remove("VIGIL_MODEL_SERVER");
    for (name, value) in env {
        command.env(name, value);
    }
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("vigil runs");
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    println!(
        "$ vigil {} ({:.1} s)\n{}{}[exit {}]",
        args.join(" "),
        started.elapsed().as_secs_f64(),
        run.stdout,
        run.stderr,
        run.code
    );
    run
}
