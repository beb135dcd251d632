//! Prometheus exposition. Counters and histograms are recorded where things
//! happen (ingest, delivery); the outbox gauges are refreshed from the status
//! counters at scrape time, so a scrape costs the same as `/status` and never
//! scans the backlog.
//!
//! Every metric is exported under the `churnzero_forwarder_` prefix (the
//! recorder adds it, so the code records short names such as
//! `events_accepted_total`). [`METRICS`] lists them all with their help text.

use super::OperatorState;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::sync::OnceLock;
use std::time::Duration;

/// The namespace of every exported metric.
pub const PREFIX: &str = "churnzero_forwarder_";

/// What a metric is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric this service exports (without the prefix), its kind and its
/// help text. Kept in one place so the docs and the `# HELP` lines agree.
pub const METRICS: &[(&str, Kind, &str)] = &[
    (
        "ingest_requests_total",
        Kind::Counter,
        "Segment API requests answered, by HTTP status.",
    ),
    (
        "events_accepted_total",
        Kind::Counter,
        "Events durably stored in the outbox.",
    ),
    (
        "events_rejected_total",
        Kind::Counter,
        "Events refused by validation (not stored).",
    ),
    (
        "events_undated_total",
        Kind::Counter,
        "Events kept although a date field (label field) was not a date; receivedAt was used.",
    ),
    (
        "events_rate_limited_total",
        Kind::Counter,
        "Events refused with 429 by the per-client rate limit (not stored).",
    ),
    (
        "client_rate_limit_tracked",
        Kind::Gauge,
        "Client addresses the per-client rate limiter holds state for.",
    ),
    (
        "client_rate_limit_resets_total",
        Kind::Counter,
        "Times the per-client rate limiter started afresh because too many addresses were active.",
    ),
    (
        "events_filtered_total",
        Kind::Counter,
        "Events acknowledged but not forwarded because of their integrations object.",
    ),
    (
        "events_duplicate_total",
        Kind::Counter,
        "Events acknowledged but not stored again: messageId seen within the dedup window.",
    ),
    (
        "events_delivered_total",
        Kind::Counter,
        "Events settled as delivered to ChurnZero.",
    ),
    (
        "events_retried_total",
        Kind::Counter,
        "Failed delivery attempts scheduled for another try.",
    ),
    (
        "events_dead_total",
        Kind::Counter,
        "Events that became dead letters.",
    ),
    (
        "events_held_total",
        Kind::Counter,
        "Times an event was held waiting for its identity.",
    ),
    (
        "churnzero_requests_total",
        Kind::Counter,
        "Requests to ChurnZero, by outcome: delivered, retry or rejected.",
    ),
    (
        "churnzero_request_duration_seconds",
        Kind::Histogram,
        "Duration of one request to ChurnZero.",
    ),
    (
        "churnzero_pauses_total",
        Kind::Counter,
        "Times the delivery pool paused because ChurnZero was failing or rate limiting.",
    ),
    (
        "flow_concurrency_limit",
        Kind::Gauge,
        "Requests to ChurnZero allowed in flight now (adaptive, at most --workers).",
    ),
    (
        "flow_in_flight",
        Kind::Gauge,
        "Requests to ChurnZero in flight now, both lanes.",
    ),
    (
        "flow_rtt_baseline_seconds",
        Kind::Gauge,
        "Baseline round-trip time of one ChurnZero request (EWMA; 0 before the first).",
    ),
    (
        "flow_rate_cap_actions_per_second",
        Kind::Gauge,
        "This instance's share of --max-actions-per-second (0 when there is no cap).",
    ),
    (
        "flow_rate_wait_seconds",
        Kind::Histogram,
        "Time a request waited for the rate cap's tokens (its sum: seconds throttled).",
    ),
    (
        "delivery_latency_seconds",
        Kind::Histogram,
        "Time from acceptance to delivery of an event.",
    ),
    (
        "outbox_events",
        Kind::Gauge,
        "Events in the outbox by state: pending, in_flight, held, dead.",
    ),
    (
        "outbox_oldest_pending_age_seconds",
        Kind::Gauge,
        "Age of the oldest event waiting for delivery (0 when none).",
    ),
    (
        "outbox_oldest_held_age_seconds",
        Kind::Gauge,
        "Age of the oldest event waiting for its identity (0 when none).",
    ),
    (
        "last_delivery_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the last delivery (0 before the first).",
    ),
    (
        "sync_pending_contacts",
        Kind::Gauge,
        "Contacts with audience updates waiting for the next sync.",
    ),
    (
        "sync_last_run_sent",
        Kind::Gauge,
        "Attribute updates the last audience sync sent.",
    ),
    (
        "sync_last_run_skipped",
        Kind::Gauge,
        "Attribute updates the last audience sync skipped as unchanged.",
    ),
    (
        "sync_last_run_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the last audience sync (0 before the first).",
    ),
    (
        "sync_next_run_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the next scheduled audience sync (0 when unknown).",
    ),
    (
        "delivery_claims_total",
        Kind::Counter,
        "Claims that leased events for delivery; with delivery_claimed_events_total, the events a claim takes on average.",
    ),
    (
        "delivery_claimed_events_total",
        Kind::Counter,
        "Events leased by delivery claims (an event claimed again after a retry counts again).",
    ),
    (
        "outbox_commit_duration_seconds",
        Kind::Histogram,
        "Duration of one outbox transaction (a group commit of many requests), fsync included.",
    ),
    (
        "sync_runs_total",
        Kind::Counter,
        "Audience sync windows run.",
    ),
    (
        "sync_run_duration_seconds",
        Kind::Histogram,
        "Duration of one audience sync window, pacing included.",
    ),
    (
        "sync_requests_total",
        Kind::Counter,
        "Audience sync requests to ChurnZero, by outcome.",
    ),
    (
        "sync_actions_sent_total",
        Kind::Counter,
        "Contact setAttribute actions the audience sync delivered.",
    ),
    (
        "sync_values_sent_total",
        Kind::Counter,
        "Audience attribute values delivered.",
    ),
    (
        "sync_values_skipped_total",
        Kind::Counter,
        "Audience attribute values not sent because ChurnZero already has them.",
    ),
    (
        "sync_values_dropped_total",
        Kind::Counter,
        "Audience attribute values ChurnZero refused for good.",
    ),
    (
        "sync_unresolved_users",
        Kind::Gauge,
        "Users with audience updates whose ids are not known yet.",
    ),
];

/// Buckets of the ChurnZero request duration: milliseconds to the timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of the acceptance-to-delivery latency: from a flush interval to
/// the retry budget.
/// Buckets of one outbox transaction: sub-millisecond to a slow disk.
const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets of one audience sync window: seconds to hours.
const SYNC_RUN_BUCKETS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Adds [`PREFIX`] to every metric name on its way to the exporter.
///
/// `metrics::counter!` asks the recorder for its handle on every call, and
/// the hot paths call it per request: the handle each key got is kept, so
/// that a repeat is one lookup by the key's precomputed hash instead of a
/// formatted name, a copied key and the exporter's own lookup (about 3% of
/// a `/v1/track` request's instructions). The exporter keeps every series
/// it saw anyway, so the cache holds no key it would not.
struct Prefixed {
    recorder: PrometheusRecorder,
    counters: HandleCache<Counter>,
    gauges: HandleCache<Gauge>,
    histograms: HandleCache<Histogram>,
}

/// Handles by unprefixed key.
type HandleCache<H> = std::sync::RwLock<std::collections::HashMap<Key, H>>;

/// The handle kept for `key`, or the one `register` makes (kept for next
/// time).
fn cached<H: Clone>(cache: &HandleCache<H>, key: &Key, register: impl FnOnce() -> H) -> H {
    if let Some(h) = cache.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return h.clone();
    }
    let handle = register();
    cache
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_insert(handle)
        .clone()
}

fn prefixed(name: &str) -> String {
    format!("{PREFIX}{name}")
}

impl Recorder for Prefixed {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.recorder
            .describe_counter(prefixed(key.as_str()).into(), unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.recorder
            .describe_gauge(prefixed(key.as_str()).into(), unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.recorder
            .describe_histogram(prefixed(key.as_str()).into(), unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        cached(&self.counters, key, || {
            self.recorder.register_counter(
                &Key::from_parts(prefixed(key.name()), key.labels()),
                metadata,
            )
        })
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        cached(&self.gauges, key, || {
            self.recorder.register_gauge(
                &Key::from_parts(prefixed(key.name()), key.labels()),
                metadata,
            )
        })
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        cached(&self.histograms, key, || {
            self.recorder.register_histogram(
                &Key::from_parts(prefixed(key.name()), key.labels()),
                metadata,
            )
        })
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same
/// handle (tests start many servers in one process). Counters start at zero
/// so that dashboards and alerts see every series from the first scrape.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(prefixed("churnzero_request_duration_seconds")),
                    REQUEST_BUCKETS,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full(prefixed("flow_rate_wait_seconds")),
                    REQUEST_BUCKETS,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full(prefixed("delivery_latency_seconds")),
                    LATENCY_BUCKETS,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full(prefixed("outbox_commit_duration_seconds")),
                    COMMIT_BUCKETS,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full(prefixed("sync_run_duration_seconds")),
                    SYNC_RUN_BUCKETS,
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(Prefixed {
                recorder,
                counters: Default::default(),
                gauges: Default::default(),
                histograms: Default::default(),
            })
            .ok()?;
            describe_all();
            // Histogram samples are buffered until upkeep folds them in;
            // without a scrape they would pile up, so fold them regularly.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .clone()
}

fn describe_all() {
    for (name, kind, help) in METRICS {
        let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
        let name = KeyName::from_const_str(name);
        metrics::with_recorder(|r| match kind {
            Kind::Counter => r.describe_counter(name, unit, (*help).into()),
            Kind::Gauge => r.describe_gauge(name, unit, (*help).into()),
            Kind::Histogram => r.describe_histogram(name, unit, (*help).into()),
        });
    }
    register_all_at_zero();
}

/// Label values each labelled series starts with, so every series exists
/// from the first scrape (an `absent()` alert must not fire on a quiet
/// instance, and a rate needs its zero).
const STARTING_LABELS: &[(&str, &str, &[&str])] = &[
    ("ingest_requests_total", "status", &["200"]),
    (
        "churnzero_requests_total",
        "outcome",
        &["delivered", "retry", "rejected"],
    ),
    (
        "sync_requests_total",
        "outcome",
        &["delivered", "retry", "rejected"],
    ),
    (
        "outbox_events",
        "state",
        &["pending", "in_flight", "held", "dead"],
    ),
];

/// Registers every series of [`METRICS`] at zero: counters and gauges
/// with value 0, histograms with empty buckets.
fn register_all_at_zero() {
    for (name, kind, _) in METRICS {
        let labelled = STARTING_LABELS.iter().find(|(n, _, _)| n == name);
        let keys: Vec<Key> = match labelled {
            Some((_, label, values)) => values
                .iter()
                .map(|v| Key::from_parts(*name, vec![metrics::Label::new(*label, *v)]))
                .collect(),
            None => vec![Key::from_static_name(name)],
        };
        for key in keys {
            let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
            metrics::with_recorder(|r| match kind {
                Kind::Counter => r.register_counter(&key, &meta).increment(0),
                // Raised by zero: registered without overwriting a value.
                Kind::Gauge => r.register_gauge(&key, &meta).increment(0.0),
                // Registering is enough: the exporter renders its buckets.
                Kind::Histogram => drop(r.register_histogram(&key, &meta)),
            });
        }
    }
}

fn unix_seconds(t: &Option<String>) -> f64 {
    t.as_deref()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
        .unwrap_or(0.0)
}

pub(super) async fn render(State(state): State<OperatorState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    if let Some(flow) = &state.flow {
        let f = flow.status();
        metrics::gauge!("flow_concurrency_limit").set(f.concurrency_limit as f64);
        metrics::gauge!("flow_in_flight").set(f.in_flight as f64);
        metrics::gauge!("flow_rtt_baseline_seconds").set(f.rtt_baseline_ms.unwrap_or(0.0) / 1000.0);
        metrics::gauge!("flow_rate_cap_actions_per_second")
            .set(f.instance_actions_per_second as f64);
    }
    match state.outbox.status().await {
        Ok(s) => {
            for (label, n) in [
                ("pending", s.pending),
                ("in_flight", s.in_flight),
                ("held", s.held),
                ("dead", s.dead),
            ] {
                metrics::gauge!("outbox_events", "state" => label).set(n as f64);
            }
            metrics::gauge!("outbox_oldest_pending_age_seconds").set(s.oldest_pending_age_seconds);
            metrics::gauge!("outbox_oldest_held_age_seconds").set(s.oldest_held_age_seconds);
            metrics::gauge!("last_delivery_timestamp_seconds")
                .set(unix_seconds(&s.last_delivery_at));
            metrics::gauge!("sync_pending_contacts").set(s.sync.pending_contacts as f64);
            metrics::gauge!("sync_last_run_sent").set(s.sync.last_run_sent as f64);
            metrics::gauge!("sync_last_run_skipped").set(s.sync.last_run_skipped as f64);
            metrics::gauge!("sync_last_run_timestamp_seconds")
                .set(unix_seconds(&s.sync.last_run_at));
            metrics::gauge!("sync_next_run_timestamp_seconds")
                .set(unix_seconds(&s.sync.next_run_at));
        }
        Err(e) => {
            // Still serve the counters: a scrape that fails entirely hides
            // the very errors an operator needs to see.
            tracing::warn!(error = %e, "reading the outbox for /metrics failed");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A key is registered with the exporter once; a repeat gets the kept
    /// handle, and keys that differ only in a label value keep apart (else
    /// `ingest_requests_total{status="400"}` would count the 200s).
    #[test]
    fn each_key_is_registered_once_and_labels_keep_keys_apart() {
        let cache: HandleCache<usize> = Default::default();
        let registered = AtomicUsize::new(0);
        let register = || registered.fetch_add(1, Ordering::Relaxed);
        let ok = Key::from_parts(
            "ingest_requests_total",
            vec![metrics::Label::new("status", "200")],
        );
        let bad = Key::from_parts(
            "ingest_requests_total",
            vec![metrics::Label::new("status", "400")],
        );
        assert_eq!(cached(&cache, &ok, register), 0);
        assert_eq!(cached(&cache, &ok, register), 0);
        assert_eq!(cached(&cache, &bad, register), 1);
        assert_eq!(cached(&cache, &ok, register), 0);
        assert_eq!(cached(&cache, &bad, register), 1);
        assert_eq!(registered.load(Ordering::Relaxed), 2);
    }
}
