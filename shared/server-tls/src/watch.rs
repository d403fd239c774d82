//! Files re-read while serving: contents that changed and are valid are applied; contents
//! that are unreadable or invalid are logged once and the ones in use kept. Contents are
//! compared, not modification times: a Kubernetes Secret update swaps a symlink, which
//! leaves the file's own mtime behind.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Files' contents as last read, to notice a change. Never printed: they hold keys and
/// tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct Contents(Arc<[String]>);

impl Contents {
    pub fn new(contents: Vec<String>) -> Self {
        Self(contents.into())
    }
}

impl std::fmt::Debug for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<contents>")
    }
}

/// What one poll found.
enum Polled<T> {
    Unchanged,
    Unreadable(String),
    Changed(Contents, Result<T, String>),
}

/// Files being re-read: which (for the log), how often, their contents in use, until when.
pub struct Watched {
    pub what: String,
    pub every: Duration,
    pub last: Contents,
    pub stop: watch::Receiver<bool>,
}

/// Re-reads files every `every` and applies contents that changed and parse.
pub async fn watch_files<T: Send + 'static>(
    watched: Watched,
    read: impl Fn() -> Result<Vec<String>, String> + Send + Sync + 'static,
    parse: impl Fn(&[String]) -> Result<T, String> + Send + Sync + 'static,
    apply: impl Fn(T),
) {
    let Watched { what, every, mut last, mut stop } = watched;
    let (read, parse) = (Arc::new(read), Arc::new(parse));
    let mut reported: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let (read, parse, previous) = (read.clone(), parse.clone(), last.clone());
        // Reading is blocking IO and building a TLS config parses keys: off the async threads.
        let polled = tokio::task::spawn_blocking(move || match read() {
            Err(e) => Polled::Unreadable(e),
            Ok(contents) if *contents == *previous.0 => Polled::Unchanged,
            Ok(contents) => {
                let parsed = parse(&contents);
                Polled::Changed(Contents(contents.into()), parsed)
            }
        })
        .await;
        match polled {
            Ok(Polled::Unchanged) => reported = None,
            Ok(Polled::Unreadable(error)) => {
                if reported.as_ref() != Some(&error) {
                    tracing::error!(files = %what, %error, "file unreadable; keeping the one in use");
                    reported = Some(error);
                }
            }
            Ok(Polled::Changed(contents, Ok(value))) => {
                apply(value);
                last = contents;
                reported = None;
                tracing::info!(files = %what, "file changed; new connections and calls use it");
            }
            Ok(Polled::Changed(contents, Err(error))) => {
                // Remembered, so the same bad contents are reported once.
                last = contents;
                reported = None;
                tracing::error!(files = %what, %error, "file changed but is not valid; keeping the one in use");
            }
            Err(e) => tracing::error!(files = %what, error = %e, "file poll task failed"),
        }
    }
}
