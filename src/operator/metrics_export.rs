//! Prometheus exposition. Counters are recorded where things happen; the
//! outbox gauges are refreshed from the status counters at scrape time, so a
//! scrape costs the same as `/status`.

use super::OperatorState;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same
/// handle (tests start many servers in one process).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        300.0, 1800.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

pub(super) async fn render(State(state): State<OperatorState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    if let Ok(s) = state.outbox.reader.status().await {
        metrics::gauge!("outbox_events", "state" => "pending").set(s.pending as f64);
        metrics::gauge!("outbox_events", "state" => "in_flight").set(s.in_flight as f64);
        metrics::gauge!("outbox_events", "state" => "held").set(s.held as f64);
        metrics::gauge!("outbox_events", "state" => "dead").set(s.dead as f64);
        metrics::gauge!("outbox_delivered_total").set(s.delivered as f64);
        metrics::gauge!("outbox_oldest_pending_age_seconds").set(s.oldest_pending_age_seconds);
        metrics::gauge!("sync_pending_contacts").set(s.sync.pending_contacts as f64);
        metrics::gauge!("sync_last_run_sent").set(s.sync.last_run_sent as f64);
        metrics::gauge!("sync_last_run_skipped").set(s.sync.last_run_skipped as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
