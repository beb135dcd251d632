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
    match state.outbox.reader.ping().await {
        Ok(()) => axum::Json(json!({ "ready": true })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": format!("database: {e}") })),
        )
            .into_response(),
    }
}

async fn status(State(state): State<OperatorState>) -> Response {
    match state.outbox.reader.status().await {
        Ok(s) => axum::Json::<OutboxStatus>(s).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn page() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("status_page.html")),
    )
}
