//! Request bodies read whole under a limit, for the HTTP endpoints that take one (ingest's
//! `POST /v1/readings`, the model server's REST API), refused with a 413 that the client
//! actually reads.
//!
//! Why not axum's `DefaultBodyLimit` alone: it stops reading at the limit and answers while
//! the client is still sending. A socket closed with unread bytes in it is reset by the
//! kernel, and a client still writing then gets "broken pipe" or "connection reset" instead
//! of the 413 (CI saw it with a streamed 400 KiB body against a 128 KiB limit). So past the
//! limit the rest of the body is read and thrown away, up to [`DRAIN_BYTES`] more within
//! [`DRAIN_TIME`], and only then does the 413 go out. Thrown away costs no memory: what a
//! request can make the process hold is still the limit. A body bigger than that (declared or
//! found while draining) gets its 413 at once with `Connection: close`.

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use prometheus::IntCounter;

/// How much of a body past the limit is read and discarded so that the client reads the 413.
pub const DRAIN_BYTES: u64 = 1 << 20;
/// How long that may take.
pub const DRAIN_TIME: Duration = Duration::from_secs(2);

/// The limit on one route set's request bodies.
#[derive(Debug, Clone)]
pub struct BodyLimit {
    pub max_bytes: usize,
    /// The setting that raises it, named in the 413 (e.g. `http.max_body_bytes`).
    pub setting: &'static str,
    /// Counted once per body refused for its size, if the service counts refusals.
    pub refused: Option<IntCounter>,
}

impl BodyLimit {
    /// `router` with every request body read whole before a handler sees it, and refused
    /// (413, a JSON `{"error": ...}`) past the limit. Handlers then take the body as `Bytes`.
    pub fn apply<S: Clone + Send + Sync + 'static>(self, router: Router<S>) -> Router<S> {
        // The extractor's own limit (2 MB by default) would otherwise refuse what this allows.
        router
            .layer(axum::extract::DefaultBodyLimit::max(self.max_bytes))
            .layer(axum::middleware::from_fn_with_state(self, read_whole))
    }
}

async fn read_whole(State(limit): State<BodyLimit>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match read(body, declared, limit.max_bytes).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(Unread::TooLarge { drained }) => {
            if let Some(refused) = &limit.refused {
                refused.inc();
            }
            let message = format!("the request body is over {} bytes ({})", limit.max_bytes, limit.setting);
            let mut response = (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(error_body(&message))).into_response();
            if !drained {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        Err(Unread::Broken(error)) => {
            let message = format!("the request body could not be read: {error}");
            (StatusCode::BAD_REQUEST, axum::Json(error_body(&message))).into_response()
        }
    }
}

fn error_body(message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

#[derive(Debug)]
enum Unread {
    /// Over the limit; `drained` when the whole body was read (and discarded), so the
    /// connection can carry on.
    TooLarge {
        drained: bool,
    },
    Broken(axum::Error),
}

/// The body, whole, if it is at most `max` bytes; else reads and discards the rest, so that
/// at most `max` + [`DRAIN_BYTES`] bytes of it are read in all.
async fn read(mut body: Body, declared: Option<u64>, max: usize) -> Result<Bytes, Unread> {
    let max = max as u64;
    let budget = max + DRAIN_BYTES;
    if let Some(length) = declared.filter(|&length| length > max) {
        let drained = length <= budget && drain(body, budget).await;
        return Err(Unread::TooLarge { drained });
    }
    let mut whole = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Unread::Broken)?.into_data() else { continue };
        let read = (whole.len() + data.len()) as u64;
        if read > max {
            drop(whole);
            return Err(Unread::TooLarge { drained: drain(body, budget - read.min(budget)).await });
        }
        whole.extend_from_slice(&data);
    }
    Ok(Bytes::from(whole))
}

/// Reads and discards the rest of `body`; true when it ended within `budget` bytes and
/// [`DRAIN_TIME`].
async fn drain(mut body: Body, budget: u64) -> bool {
    let to_end = async {
        let mut discarded = 0_u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            discarded += frame.data_ref().map_or(0, |data| data.len() as u64);
            if discarded > budget {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIME, to_end).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(chunks: usize, size: usize) -> Body {
        Body::from_stream(futures::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(vec![b' '; size]))))
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let bytes = read(streamed(4, 1000), None, 4000).await.unwrap();
        assert_eq!(bytes.len(), 4000);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_drained_when_the_rest_is_small_and_not_when_it_is_not() {
        assert!(matches!(read(streamed(5, 1000), None, 4000).await, Err(Unread::TooLarge { drained: true })));
        let huge = (4000 + DRAIN_BYTES as usize) / 1000 + 1;
        assert!(matches!(read(streamed(huge, 1000), None, 4000).await, Err(Unread::TooLarge { drained: false })));
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_and_drained_only_within_the_budget() {
        assert!(matches!(read(streamed(5, 1000), Some(5000), 4000).await, Err(Unread::TooLarge { drained: true })));
        let most = 4000 + DRAIN_BYTES as usize;
        let within = read(streamed(most / 1000, 1000), Some(most as u64), 4000).await;
        assert!(matches!(within, Err(Unread::TooLarge { drained: true })));
        assert!(matches!(
            read(Body::empty(), Some(most as u64 + 1), 4000).await,
            Err(Unread::TooLarge { drained: false })
        ));
    }
}
