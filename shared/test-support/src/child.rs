//! A service binary run as a child process, as an operator runs it: the addresses it bound
//! read from what it prints (a service given port 0 logs the address it got), its output
//! echoed into the test's, and stopped with SIGKILL (a crash: no drain, no commit), SIGTERM
//! (the graceful stop Kubernetes asks for) or SIGINT (Ctrl-C). Dropped, a child still
//! running is killed, so a failed assertion leaves no process behind holding the test's
//! output open or consuming its topics.

use std::io::{BufRead as _, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::wait::Poll;

/// Which of the child's streams carries the lines a test reads: the services log to
/// stderr; the model server prints its addresses, and `vigil up` its progress, to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// A running child process and the lines it has printed on one stream.
#[derive(Debug)]
pub struct ChildService {
    name: String,
    child: Child,
    /// Lines the reader thread has read and the test has not looked at yet.
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildService {
    /// Starts `command` with `output` piped to a thread that echoes each line to the test's
    /// output (prefixed with `name`) and keeps it for [`ChildService::wait_for_line`]; the
    /// other stream and the environment are as `command` sets them.
    pub fn spawn(name: &str, mut command: Command, output: Output) -> Self {
        match output {
            Output::Stdout => command.stdout(Stdio::piped()),
            Output::Stderr => command.stderr(Stdio::piped()),
        };
        let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        let stream: Box<dyn Read + Send> = match output {
            Output::Stdout => Box::new(child.stdout.take().expect("stdout is piped")),
            Output::Stderr => Box::new(child.stderr.take().expect("stderr is piped")),
        };
        let (send, lines) = mpsc::channel();
        let prefix = name.to_owned();
        std::thread::Builder::new()
            .name(format!("{name} output"))
            .spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("{prefix}| {line}");
                    // Once the test has dropped the receiver, go on reading: a child
                    // writing to a full pipe would block.
                    let _ = send.send(line);
                }
            })
            .expect("a thread to read the child's output");
        Self { name: name.to_owned(), child, lines, seen: Vec::new() }
    }

    /// Reads lines until one satisfies `wanted` and returns it; panics naming `what` when
    /// none has within `within` or the child closed its output (it exited) first.
    pub fn wait_for_line(&mut self, within: Duration, what: &str, mut wanted: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("{}: waited {within:?} for {what}", self.name),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{} closed its output (it exited?) before {what}", self.name)
                }
            }
        }
    }

    /// The next line, within `within`.
    pub fn next_line(&mut self, within: Duration) -> String {
        self.wait_for_line(within, "its next line", |_| true)
    }

    /// The address logged on the first line that contains `marker`, from its `address=`
    /// field: the services log `serving /live, /ready, /metrics address=127.0.0.1:port`.
    pub fn logged_address(&mut self, marker: &str, within: Duration) -> SocketAddr {
        let [address] = self.logged_addresses([marker], within);
        address
    }

    /// [`ChildService::logged_address`] for several listeners, logged in any order (a
    /// service that binds its gRPC and admin ports logs each as it goes): the address on
    /// the first line containing each of `markers`.
    pub fn logged_addresses<const N: usize>(&mut self, markers: [&str; N], within: Duration) -> [SocketAddr; N] {
        let mut lines: [Option<String>; N] = std::array::from_fn(|_| None);
        let what = format!("lines saying {markers:?}");
        self.wait_for_line(within, &what, |line| {
            for (marker, found) in markers.iter().zip(lines.iter_mut()) {
                if found.is_none() && line.contains(marker) {
                    *found = Some(line.to_owned());
                }
            }
            lines.iter().all(Option::is_some)
        });
        lines.map(|line| {
            let line = line.expect("every marker was found");
            let field = line.rsplit("address=").next().and_then(|rest| rest.split_whitespace().next());
            field
                .and_then(|address| address.parse().ok())
                .unwrap_or_else(|| panic!("{}: no address= field with an address in {line:?}", self.name))
        })
    }

    /// Every line read so far, in order.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The process id (for /proc).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and waits for the process to be gone: a crash.
    pub fn kill(mut self) {
        self.child.kill().unwrap_or_else(|e| panic!("killing {}: {e}", self.name));
        self.child.wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name));
    }

    /// SIGTERM, and its exit status once it has exited (killed, with a panic, when that
    /// takes longer than `within`).
    pub fn terminate(mut self, within: Duration) -> ExitStatus {
        self.signal(Signal::TERM);
        self.wait_exit(within)
    }

    /// SIGINT, as Ctrl-C in a terminal sends; see [`ChildService::wait_exit`].
    pub fn interrupt(&self) {
        self.signal(Signal::INT);
    }

    /// Waits for the process to exit and reads the rest of its output into
    /// [`ChildService::seen`]; kills it and panics when it has not exited within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let name = &self.name;
        let child = &mut self.child;
        let status = Poll::within(within).every(Duration::from_millis(20)).observe_blocking(
            || child.try_wait().unwrap_or_else(|e| panic!("waiting for {name}: {e}")),
            Option::is_some,
        );
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("{} did not exit within {within:?}", self.name);
        };
        // The process is gone, so its end of the pipe is closed: this ends.
        self.seen.extend(self.lines.iter());
        status
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal)
            .unwrap_or_else(|e| panic!("sending {signal:?} to {}: {e}", self.name));
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    const WITHIN: Duration = Duration::from_secs(10);

    #[test]
    fn reads_the_logged_address_and_keeps_the_lines_seen() {
        let script = "echo starting >&2; echo 'INFO serving /live, /ready, /metrics address=127.0.0.1:4321' >&2; \
                      sleep 30";
        let mut child = ChildService::spawn("logger", shell(script), Output::Stderr);
        assert_eq!(child.logged_address("serving /live", WITHIN), SocketAddr::from(([127, 0, 0, 1], 4321)));
        assert_eq!(child.seen().len(), 2);
        assert!(child.is_running());
        child.kill();
    }

    #[test]
    fn reads_several_logged_addresses_in_the_order_asked_whatever_the_order_logged() {
        let script = "echo 'INFO serving /live address=127.0.0.1:2' >&2; echo 'INFO serving gRPC address=127.0.0.1:1' >&2; \
                      sleep 30";
        let mut child = ChildService::spawn("two-listeners", shell(script), Output::Stderr);
        let [grpc, admin] = child.logged_addresses(["serving gRPC", "serving /live"], WITHIN);
        assert_eq!((grpc.port(), admin.port()), (1, 2));
        child.kill();
    }

    #[test]
    fn terminate_sends_sigterm_and_returns_the_exit_status() {
        let script = "trap 'exit 3' TERM; echo ready; while :; do sleep 0.1; done";
        let mut child = ChildService::spawn("trap", shell(script), Output::Stdout);
        assert_eq!(child.next_line(WITHIN), "ready");
        assert_eq!(child.terminate(WITHIN).code(), Some(3));
    }

    #[test]
    fn wait_exit_reads_the_rest_of_the_output() {
        let mut child = ChildService::spawn("short", shell("echo one; echo two; echo three"), Output::Stdout);
        child.wait_for_line(WITHIN, "the first line", |line| line == "one");
        assert!(child.wait_exit(WITHIN).success());
        assert_eq!(child.seen(), ["one", "two", "three"]);
    }

    #[test]
    #[should_panic(expected = "closed its output (it exited?) before a line that never comes")]
    fn a_child_that_exits_first_fails_the_wait_naming_it() {
        let mut child = ChildService::spawn("quitter", shell("echo bye"), Output::Stdout);
        child.wait_for_line(WITHIN, "a line that never comes", |_| false);
    }

    #[test]
    fn dropping_a_running_child_kills_it() {
        let child = ChildService::spawn("sleeper", shell("echo up; sleep 30"), Output::Stdout);
        let pid = child.id();
        drop(child);
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default().contains("State:\tZ");
        assert!(!alive, "the child {pid} outlived its ChildService");
    }
}
