//! CORS for the ingest routes (`--cors-origins`). analytics.js posts from
//! the customer's pages, another origin than the forwarder; without these
//! headers the browser hides the answer, the library sees a failure and
//! sends the stored event again. Operator and admin routes get none of
//! this: they never answer a page of another origin.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may reuse a preflight answer. Chromium caps it at
/// two hours, so more would mean nothing.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(7200);

/// The request headers analytics.js sends: `Content-Type: text/plain`,
/// `Authorization: Basic` (write key), and `X-Retry-Count` on retries.
/// `Content-Encoding` for clients that gzip.
pub const ALLOWED_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
    header::CONTENT_ENCODING,
    HeaderName::from_static("x-retry-count"),
];

/// The answer headers a page must be able to read: analytics.js waits
/// `x-ratelimit-reset` seconds (or `Retry-After`) after a 429.
pub const EXPOSED_HEADERS: [HeaderName; 2] = [
    header::RETRY_AFTER,
    HeaderName::from_static("x-ratelimit-reset"),
];

/// Which page origins may send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Any origin (`*`), the default: a write key is public anyway.
    #[default]
    Any,
    /// Only these, as browsers write them (`https://app.example.com`).
    List(Vec<String>),
}

impl CorsOrigins {
    /// Parses `--cors-origins`: `*`, or a list of `scheme://host[:port]`.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<CorsOrigins, String> {
        let items: Vec<&str> = items
            .iter()
            .map(|s| s.as_ref().trim())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() || items.contains(&"*") {
            return Ok(CorsOrigins::Any);
        }
        let mut list = Vec::new();
        for item in items {
            let origin = item.trim_end_matches('/').to_ascii_lowercase();
            let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                    && !rest.is_empty()
                    && !rest.contains('/')
                    && HeaderValue::from_str(&origin).is_ok()
            }) || origin == "null";
            if !valid {
                return Err(format!(
                    "`{item}` is not an origin (write it as the browser does: https://app.example.com, no path)"
                ));
            }
            list.push(origin);
        }
        Ok(CorsOrigins::List(list))
    }

    /// Whether a request carrying this `Origin` may be answered.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            CorsOrigins::Any => true,
            CorsOrigins::List(list) => {
                let origin = origin.trim_end_matches('/').to_ascii_lowercase();
                list.contains(&origin)
            }
        }
    }

    /// The tower-http layer that answers preflights and adds the headers.
    pub fn layer(&self) -> CorsLayer {
        let origin = match self {
            CorsOrigins::Any => AllowOrigin::any(),
            CorsOrigins::List(list) => AllowOrigin::list(
                list.iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok())
                    .collect::<Vec<_>>(),
            ),
        };
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(ALLOWED_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .max_age(PREFLIGHT_MAX_AGE)
    }
}

/// Runs outside [`CorsOrigins::layer`]: a request from an origin that is
/// not allowed gets 403 (nothing is stored: a text/plain post needs no
/// preflight, so the browser would have delivered it), and an allowed
/// preflight gets 204 instead of the layer's 200.
pub async fn guard(origins: CorsOrigins, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("").to_string());
    if let Some(origin) = &origin {
        if !origins.allows(origin) {
            metrics::counter!("ingest_requests_total", "status" => "403").increment(1);
            let body = serde_json::json!({
                "success": false,
                "error": "this origin may not send here (see --cors-origins)",
            });
            return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
        }
    }
    let preflight = request.method() == Method::OPTIONS;
    let mut response = next.run(request).await;
    if preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse() {
        assert_eq!(CorsOrigins::parse(&["*"]).unwrap(), CorsOrigins::Any);
        assert_eq!(CorsOrigins::parse::<&str>(&[]).unwrap(), CorsOrigins::Any);
        let l =
            CorsOrigins::parse(&["https://App.example.com/", " http://localhost:3000"]).unwrap();
        assert!(l.allows("https://app.example.com"));
        assert!(l.allows("http://localhost:3000"));
        assert!(!l.allows("http://localhost:3001"));
        assert!(!l.allows("https://evil.example"));
        for bad in [
            "app.example.com",
            "https://app.example.com/path",
            "https://",
        ] {
            assert!(CorsOrigins::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
