//! The `bench` subcommand runs end to end at a small scale. No speed is
//! asserted here (the figures belong in the README, measured on the machine
//! that runs it), but a figure that a broken measurement would get wrong is:
//! every event sent is counted once and stored once, the drain delivers the
//! whole backlog, each ratio is the quotient of the figures it names,
//! latencies are ordered, and the printed table shows the figures the JSON
//! holds, each on its own line.

mod common;

use churnzero_forwarder::bench::{BenchArgs, BenchReport, Latency, format_report};
use serde_json::Value;
use sqlx::ConnectOptions;
use std::path::Path;
use std::time::Duration;

/// Not a multiple of the 100 events a batch request carries, so the last
/// batch request is a short one.
const EVENTS: u64 = 3050;
const TRACK_EVENTS: u64 = 300;
const BATCH_CONNECTIONS: usize = 4;
const TRACK_CONNECTIONS: usize = 8;

const RATES: [&str; 7] = [
    "raw_sqlite_rows_per_sec_100_per_tx",
    "raw_sqlite_rows_per_sec_1_per_tx",
    "batch_ingest_events_per_sec",
    "track_ingest_events_per_sec",
    "track_ingest_empty_events_per_sec",
    "drain_events_per_sec",
    "drain_peak_rss_mb",
];

const PHASES: [&str; 4] = [
    "batch_ingest_latency",
    "track_ingest_latency",
    "track_ingest_empty_latency",
    "status_latency",
];

/// (ratio, numerator, denominator), as the README's Performance section
/// reads them.
const RATIOS: [(&str, &str, &str); 4] = [
    (
        "ratio_batch_to_raw",
        "batch_ingest_events_per_sec",
        "raw_sqlite_rows_per_sec_100_per_tx",
    ),
    (
        "ratio_track_to_single_commit",
        "track_ingest_events_per_sec",
        "raw_sqlite_rows_per_sec_1_per_tx",
    ),
    (
        "ratio_track_empty_to_single_commit",
        "track_ingest_empty_events_per_sec",
        "raw_sqlite_rows_per_sec_1_per_tx",
    ),
    (
        "ratio_drain_to_batch_ingest",
        "drain_events_per_sec",
        "batch_ingest_events_per_sec",
    ),
];

/// Runs `bench` at the test's scale with databases in `dir`; its stdout.
/// One run at a time: each starts forwarders of its own, and two runs at
/// once would only measure each other.
fn bench(dir: &Path, json: bool) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = std::process::Command::new(common::binary_path());
    cmd.arg("bench")
        .args(["--events", &EVENTS.to_string()])
        .args(["--track-events", &TRACK_EVENTS.to_string()])
        .args(["--raw-rows", "3000", "--raw-single-rows", "30"])
        .args(["--batch-connections", &BATCH_CONNECTIONS.to_string()])
        .args(["--track-connections", &TRACK_CONNECTIONS.to_string()])
        .arg("--dir")
        .arg(dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn f(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing: {report}"))
}

fn latency(report: &Value, phase: &str) -> Latency {
    Latency {
        p50_ms: f(&report[phase], "p50_ms"),
        p99_ms: f(&report[phase], "p99_ms"),
        max_ms: f(&report[phase], "max_ms"),
    }
}

#[tokio::test]
async fn bench_figures_agree_with_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let report: Value = serde_json::from_str(&bench(dir.path(), true)).expect("JSON report");

    for field in RATES.iter().chain(["startup_with_backlog_ms"].iter()) {
        assert!(f(&report, field) > 0.0, "{field}: {report}");
    }
    for phase in PHASES {
        let l = latency(&report, phase);
        assert!(
            0.0 < l.p50_ms && l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
            "{phase}: {}",
            report[phase]
        );
    }
    for (ratio, num, den) in RATIOS {
        let expected = f(&report, num) / f(&report, den);
        let got = f(&report, ratio);
        assert!(
            (got - expected).abs() <= expected * 1e-9,
            "{ratio} = {got}, but {num} / {den} = {expected}"
        );
    }

    // What the run left in its outbox: every event sent through /v1/batch
    // and /v1/track stored once under its own id, none taken for a
    // duplicate, and the whole backlog the report names delivered.
    let sent = (EVENTS + TRACK_EVENTS) as i64;
    assert_eq!(report["backlog_events"], sent, "{report}");
    let mut db = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("bench.db"))
        .read_only(true)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let (rows, distinct, delivered): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT message_id), COALESCE(SUM(state = 2), 0) FROM events",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!((rows, distinct, delivered), (sent, sent, sent));
    let (first, last): (i64, i64) = sqlx::query_as(
        "SELECT MIN(CAST(substr(message_id, 7) AS INTEGER)), \
                MAX(CAST(substr(message_id, 7) AS INTEGER)) FROM events",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(
        (first, last),
        (0, sent - 1),
        "the ids bench-0 to bench-{}",
        sent - 1
    );
    let totals: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, value FROM totals WHERE name IN ('accepted', 'duplicates', 'delivered') \
         ORDER BY name",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        totals,
        vec![
            ("accepted".to_string(), sent),
            ("delivered".to_string(), sent),
            ("duplicates".to_string(), 0),
        ]
    );
}

/// The figures of a printed table, line by line: (label, numbers).
fn figures(table: &str) -> Vec<(String, Vec<f64>)> {
    table
        .lines()
        .map(|line| {
            let label = line[..44.min(line.len())].trim().to_string();
            let numbers = line[44.min(line.len())..]
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|w| w.trim_matches('.').parse::<f64>().ok())
                .collect();
            (label, numbers)
        })
        .collect()
}

fn row<'a>(rows: &'a [(String, Vec<f64>)], label: &str) -> &'a [f64] {
    &rows
        .iter()
        .find(|(l, _)| l == label)
        .unwrap_or_else(|| panic!("no line `{label}` in {rows:?}"))
        .1
}

#[test]
fn printed_table_shows_the_json_figures() {
    // The table of one report holds that report's figures, on their lines.
    let distinct = |n: f64| Latency {
        p50_ms: n,
        p99_ms: n + 0.25,
        max_ms: n + 0.5,
    };
    let report = BenchReport {
        raw_sqlite_rows_per_sec_100_per_tx: 101_000.0,
        raw_sqlite_rows_per_sec_1_per_tx: 1_100.0,
        batch_ingest_events_per_sec: 52_000.0,
        batch_ingest_latency: distinct(1.0),
        track_ingest_empty_events_per_sec: 3_300.0,
        track_ingest_empty_latency: distinct(2.0),
        track_ingest_events_per_sec: 2_200.0,
        track_ingest_latency: distinct(3.0),
        status_latency: distinct(4.0),
        backlog_events: 3350,
        startup_with_backlog_ms: 77.0,
        drain_events_per_sec: 26_000.0,
        drain_peak_rss_mb: 40.5,
        ratio_batch_to_raw: 0.51,
        ratio_track_empty_to_single_commit: 3.0,
        ratio_track_to_single_commit: 2.0,
        ratio_drain_to_batch_ingest: 0.5,
    };
    let args = BenchArgs {
        events: EVENTS,
        track_events: TRACK_EVENTS,
        raw_rows: 3000,
        raw_single_rows: 30,
        batch_connections: BATCH_CONNECTIONS,
        track_connections: TRACK_CONNECTIONS,
        dir: None,
        json: false,
    };
    let rows = figures(&format_report(&report, &args));
    let batch = format!("/v1/batch x100, {BATCH_CONNECTIONS} connections");
    let track_empty = format!("/v1/track, {TRACK_CONNECTIONS} connections, empty outbox");
    let track = format!("/v1/track, {TRACK_CONNECTIONS} connections, at the backlog");
    for (label, expected) in [
        ("raw SQLite, 100 rows/transaction", vec![101_000.0]),
        ("raw SQLite, 1 row/transaction", vec![1_100.0]),
        (&batch, vec![52_000.0, 50.0, 1.0, 99.0, 1.25, 1.5]),
        (&track_empty, vec![3_300.0, 50.0, 2.0, 99.0, 2.25, 2.5]),
        (&track, vec![2_200.0, 50.0, 3.0, 99.0, 3.25, 3.5]),
        ("/status at 3350 pending", vec![50.0, 4.0, 99.0, 4.25, 4.5]),
        ("startup with that backlog", vec![77.0]),
        ("drain to mock ChurnZero", vec![26_000.0, 40.5]),
        ("ratio batch ingest / raw (100/tx)", vec![0.51]),
        ("ratio track (empty outbox) / raw (1/tx)", vec![3.0]),
        ("ratio track (at the backlog) / raw (1/tx)", vec![2.0]),
        ("ratio drain / batch ingest", vec![0.5]),
    ] {
        assert_eq!(row(&rows, label), expected, "line `{label}`");
    }

    // A real run's table: its ratios are the quotients of the rates it
    // prints (to the rounding of the print).
    let dir = tempfile::tempdir().unwrap();
    let rows = figures(&bench(dir.path(), false));
    let rate = |label: &str| row(&rows, label)[0];
    for (ratio, num, den) in [
        (
            "ratio batch ingest / raw (100/tx)",
            batch.as_str(),
            "raw SQLite, 100 rows/transaction",
        ),
        (
            "ratio track (empty outbox) / raw (1/tx)",
            track_empty.as_str(),
            "raw SQLite, 1 row/transaction",
        ),
        (
            "ratio track (at the backlog) / raw (1/tx)",
            track.as_str(),
            "raw SQLite, 1 row/transaction",
        ),
        (
            "ratio drain / batch ingest",
            "drain to mock ChurnZero",
            batch.as_str(),
        ),
    ] {
        let (n, d) = (rate(num), rate(den));
        // Rates print as whole numbers (each off by up to 0.5), ratios to
        // two decimals.
        let slack = 0.005 + (n + 0.5) / (d - 0.5) - n / d + 1e-9;
        assert!(
            (rate(ratio) - n / d).abs() <= slack,
            "`{ratio}` prints {}, but {n} / {d} = {}",
            rate(ratio),
            n / d
        );
    }
    let status = format!("/status at {} pending", EVENTS + TRACK_EVENTS);
    let l = row(&rows, &status);
    assert!(l[1] <= l[3] && l[3] <= l[4], "{status}: {l:?}");
}
