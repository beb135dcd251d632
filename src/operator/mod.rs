//! Operator endpoints: liveness, readiness, status, Prometheus metrics, the
//! status page and the dead-letter admin API.

pub mod admin;
pub mod metrics_export;

use crate::outbox::{Outbox, OutboxStatus};
use crate::secret::Secret;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared state of the operator routes.
#[derive(Clone)]
pub struct OperatorState {
    pub outbox: Outbox,
    /// Set when shutdown begins: `/readyz` turns 503 so load balancers stop
    /// sending traffic before the listener closes.
    pub draining: Arc<AtomicBool>,
    pub admin_token: Option<Secret>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Flow control toward ChurnZero; `None` when this process delivers
    /// nothing. Its figures are composed into `/status` here, beside the
    /// outbox's, as they belong to this process and not to the database.
    pub flow: Option<Arc<crate::delivery::flow::FlowControl>>,
}

/// `/healthz`, `/readyz`, `/status`, `/metrics`, `/` and `/admin/*`.
pub fn router(state: OperatorState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_export::render))
        .route("/", get(page))
        .merge(admin::router())
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<OperatorState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": "draining" })),
        )
            .into_response();
    }
    match state.outbox.ping().await {
        Ok(()) => axum::Json(json!({ "ready": true })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": format!("database: {e}") })),
        )
            .into_response(),
    }
}

async fn status(State(state): State<OperatorState>) -> Response {
    match state.outbox.status().await {
        Ok(s) => match &state.flow {
            None => axum::Json::<OutboxStatus>(s).into_response(),
            Some(flow) => {
                let mut v = serde_json::to_value(&s).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        "flow".into(),
                        serde_json::to_value(flow.status()).unwrap_or_default(),
                    );
                }
                axum::Json(v).into_response()
            }
        },
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

/// The status page: one static file compiled into the binary, so it works
/// on a machine without network access and needs no build step.
const PAGE: &str = include_str!("status_page.html");

/// The page's Content-Security-Policy: its own inline script (by hash) and
/// styles, and requests to this server only.
fn page_csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map(|(script, _)| script)
            .unwrap_or_default();
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
        )
    })
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, page_csp()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_one_inline_script_and_no_external_resources() {
        assert_eq!(PAGE.matches("<script").count(), 1);
        for needle in ["src=\"http", "href=\"http", "url(http", "@import", "//cdn"] {
            assert!(!PAGE.contains(needle), "page must not load {needle}");
        }
        assert!(page_csp().contains("script-src 'sha256-"));
    }
}
