//! Reading a request body within Segment's limits. Limits hold on the
//! decompressed size, and a gzip body is inflated only up to the limit, so a
//! small body that inflates to gigabytes is refused after 500 KB of work.

use crate::segment::LIMIT_REQUEST_BYTES;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use std::io::Read;
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
}
