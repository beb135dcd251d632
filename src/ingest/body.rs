//! Reading a request body within Segment's limits. Limits hold on the
//! decompressed size, and a gzip body is inflated only up to the limit, so a
//! small body that inflates to gigabytes is refused after 500 KB of work.

use crate::segment::LIMIT_REQUEST_BYTES;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("body is not valid gzip: {0}")]
    BadGzip(String),
    #[error("unsupported Content-Encoding `{0}` (use gzip or none)")]
    UnsupportedEncoding(String),
    #[error("could not read the request body: {0}")]
    Read(String),
    #[error("the request body did not arrive within {} seconds", .0.as_secs())]
    Timeout(Duration),
    #[error("the server is reading too many request bodies at once; retry shortly")]
    NoMemory,
}

/// Longest time the body of one request may take to arrive. 500 KB in 20
/// seconds is 25 KB/s, slower than any link a tracking library sits behind;
/// a client slower than that is holding a connection open, and gets `408`.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Reads at most the wire limit within [`BODY_READ_TIMEOUT`], then inflates
/// gzip up to the same limit.
pub async fn read_body(headers: &HeaderMap, body: axum::body::Body) -> Result<Vec<u8>, BodyError> {
    let limit = LIMIT_REQUEST_BYTES;
    let collected = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await
    .map_err(|_| BodyError::Timeout(BODY_READ_TIMEOUT))?;
    let wire = collected
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                BodyError::TooLarge(limit)
            } else if is_budget_exhausted(&*e) {
                BodyError::NoMemory
            } else {
                BodyError::Read(e.to_string())
            }
        })?
        .to_bytes();
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(wire.to_vec()),
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity(wire.len() * 4);
            let mut decoder = flate2::read::MultiGzDecoder::new(&wire[..]).take(limit as u64 + 1);
            decoder
                .read_to_end(&mut out)
                .map_err(|e| BodyError::BadGzip(e.to_string()))?;
            if out.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            Ok(out)
        }
        other => Err(BodyError::UnsupportedEncoding(other.to_string())),
    }
}

/// Most nesting levels a body may have; deeper JSON is refused before it
/// can exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// Parses JSON after checking UTF-8 and the nesting depth.
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("body is not valid UTF-8: {e}"))?;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("JSON nesting deeper than {MAX_DEPTH} levels"));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    serde_json::from_str(text).map_err(|e| format!("body is not valid JSON: {e}"))
}

/// One budget for the request bodies being read, all connections together
/// (`--max-body-memory`). Without it, memory grows with the number of
/// clients that send a large body and stall before its last bytes: each
/// holds up to the 500 KB limit for the body deadline, and a few thousand
/// of them take gigabytes.
///
/// A request that declares its length reserves it before anything is read;
/// a chunked one reserves as its chunks arrive. What cannot be reserved is
/// not read: `503` with `Retry-After`, at once. A reservation lasts until
/// the request is answered, since the handler holds the bytes until then.
///
/// Large bodies may use three quarters of the budget; the last quarter is
/// kept for small ones (up to [`SMALL_BODY`]), so that stalled large
/// uploads cannot shut out the ordinary single-event calls.
///
/// The budget counts wire bytes. The inflated copy of a gzip body (at most
/// 500 KB) is not counted: it exists only once the whole wire body is in,
/// for the moment the handler parses it, so stalling cannot pile it up.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    limit: u64,
    used: AtomicU64,
}

/// A body up to this size may use the whole budget, a larger one only
/// three quarters of it.
pub const SMALL_BODY: u64 = 64 * 1024;

/// `Retry-After` of a request refused for lack of body memory: bodies in
/// flight finish or time out within seconds.
pub const NO_MEMORY_RETRY_AFTER: u32 = 1;

impl BodyBudget {
    /// One per server: every connection's bodies draw on the same `limit`.
    pub fn new(limit: u64) -> BodyBudget {
        BodyBudget {
            inner: Arc::new(BudgetInner {
                limit,
                used: AtomicU64::new(0),
            }),
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// An empty reservation that grows with [`Reservation::grow`].
    pub fn reservation(&self) -> Arc<Reservation> {
        Arc::new(Reservation {
            budget: self.clone(),
            bytes: AtomicU64::new(0),
        })
    }

    fn take(&self, n: u64, request_total: u64) -> bool {
        let cap = if request_total <= SMALL_BODY {
            self.inner.limit
        } else {
            self.inner.limit - self.inner.limit / 4
        };
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= cap).then_some(used + n)
            })
            .is_ok()
    }
}

/// The body memory one request holds; given back when the last handle is
/// dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: BodyBudget,
    bytes: AtomicU64,
}

impl Reservation {
    /// Reserves `n` more bytes for this request, if the budget has them.
    pub fn grow(&self, n: u64) -> bool {
        let total = self.bytes.load(Ordering::Acquire) + n;
        if self.budget.take(n, total) {
            self.bytes.fetch_add(n, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        self.budget.inner.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The error a chunked body yields when its next chunk finds no room.
#[derive(Debug, thiserror::Error)]
#[error("no memory left for request bodies")]
pub struct BudgetExhausted;

fn is_budget_exhausted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BudgetExhausted>() {
            return true;
        }
        if let Some(axum_err) = err.downcast_ref::<axum::Error>() {
            if let Some(inner) = std::error::Error::source(axum_err) {
                if inner.is::<BudgetExhausted>() {
                    return true;
                }
            }
        }
        cur = err.source();
    }
    false
}

pin_project_lite::pin_project! {
    /// A body of unknown length that reserves each chunk before handing it on.
    struct Metered {
        #[pin]
        inner: axum::body::Body,
        reservation: Arc<Reservation>,
    }
}

impl http_body::Body for Metered {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !this.reservation.grow(data.len() as u64) {
                        return std::task::Poll::Ready(Some(Err(Box::new(BudgetExhausted))));
                    }
                }
                std::task::Poll::Ready(Some(Ok(frame)))
            }
            std::task::Poll::Ready(Some(Err(e))) => std::task::Poll::Ready(Some(Err(e.into()))),
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware that holds every request's body to the [`BodyBudget`]: a
/// declared length is reserved up front (or the request is refused before
/// its body is read), an undeclared one chunk by chunk. The reservation is
/// kept until the answer is ready.
pub async fn limit_body_memory(
    axum::extract::State(budget): axum::extract::State<BodyBudget>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use http_body::Body as _;
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next
            .run(axum::extract::Request::from_parts(parts, body))
            .await;
    }
    let reservation = budget.reservation();
    let body = match body.size_hint().exact() {
        Some(n) => {
            // More than the limit is never read, whatever is declared.
            let n = n.min(LIMIT_REQUEST_BYTES as u64 + 1);
            if !reservation.grow(n) {
                return no_memory();
            }
            body
        }
        None => axum::body::Body::new(Metered {
            inner: body,
            reservation: reservation.clone(),
        }),
    };
    let response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    drop(reservation);
    response
}

fn no_memory() -> axum::response::Response {
    use axum::response::IntoResponse;
    tracing::debug!("request refused: body memory budget used up");
    super::ApiError {
        retry_after: Some(NO_MEMORY_RETRY_AFTER),
        ..super::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            BodyError::NoMemory.to_string(),
        )
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_and_utf8_are_checked() {
        assert!(parse_json(b"{\"a\": [1, {\"b\": \"[[[[\"}]}").is_ok());
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse_json(deep.as_bytes()).unwrap_err().contains("nesting"));
        assert!(
            parse_json(&[b'{', 0xff, b'}'])
                .unwrap_err()
                .contains("UTF-8")
        );
        assert!(parse_json(b"{nope").unwrap_err().contains("JSON"));
    }

    #[test]
    fn large_bodies_leave_a_quarter_of_the_budget_to_small_ones() {
        let budget = BodyBudget::new(1000 * 1024);
        let large: Vec<_> = (0..3)
            .map(|_| {
                let r = budget.reservation();
                assert!(r.grow(250 * 1024));
                r
            })
            .collect();
        let fourth = budget.reservation();
        assert!(!fourth.grow(250 * 1024), "three quarters are used");
        let small = budget.reservation();
        assert!(small.grow(60 * 1024), "the last quarter takes small bodies");
        drop(fourth);
        drop(large);
        drop(small);
        assert_eq!(budget.used(), 0, "every reservation is given back");
    }
}
