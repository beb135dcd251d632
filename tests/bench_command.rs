//! The `bench` subcommand runs end to end at a small scale and reports every
//! figure the Performance section relies on. No speed is asserted here: the
//! figures belong in the README, measured on the machine that runs it.

mod common;

use serde_json::Value;

#[test]
fn bench_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::binary_path())
        .args([
            "bench",
            "--events",
            "3000",
            "--track-events",
            "300",
            "--raw-rows",
            "3000",
        ])
        .args([
            "--raw-single-rows",
            "30",
            "--batch-connections",
            "4",
            "--track-connections",
            "8",
            "--json",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    for field in [
        "raw_sqlite_rows_per_sec_100_per_tx",
        "raw_sqlite_rows_per_sec_1_per_tx",
        "batch_ingest_events_per_sec",
        "track_ingest_events_per_sec",
        "track_ingest_empty_events_per_sec",
        "drain_events_per_sec",
        "drain_peak_rss_mb",
        "startup_with_backlog_ms",
        "ratio_batch_to_raw",
        "ratio_track_to_single_commit",
        "ratio_track_empty_to_single_commit",
        "ratio_drain_to_batch_ingest",
    ] {
        let v = report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {report}"));
        assert!(v > 0.0, "{field} = {v}");
    }
    for phase in [
        "batch_ingest_latency",
        "track_ingest_latency",
        "track_ingest_empty_latency",
        "status_latency",
    ] {
        assert!(
            report[phase]["p99_ms"].as_f64().unwrap() >= report[phase]["p50_ms"].as_f64().unwrap()
        );
    }
    // The whole backlog built by ingest was drained.
    assert_eq!(report["backlog_events"], serde_json::json!(3300));
}
