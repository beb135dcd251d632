//! The `bench` subcommand runs end to end at a small scale. No speed is
//! asserted here (the figures belong in the README, measured on the machine
//! that runs it), but a figure that a broken measurement would get wrong is:
//! every event sent is counted once and stored once, the drain delivers the
//! whole backlog, each ratio is the quotient of the figures it names,
//! latencies are ordered, the CPU per event of the phases that set the goals
//! is there and counts the forwarders under test, and the printed table
//! shows the figures the JSON holds, each on its own line.

mod common;

use churnzero_forwarder::bench::{BenchArgs, BenchReport, Latency, format_report};
use churnzero_forwarder::devtools::cpu_meter::{CpuCost, CpuReport};
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

const DISTINCT_USERS: u64 = 700;
const IDENTIFY_EVENTS: u64 = 450;

const RATES: [&str; 13] = [
    "raw_sqlite_rows_per_sec_100_per_tx",
    "raw_sqlite_rows_per_sec_1_per_tx",
    "raw_sqlite_lean_rows_per_sec_100_per_tx",
    "batch_ingest_events_per_sec",
    "track_ingest_events_per_sec",
    "track_ingest_empty_events_per_sec",
    "drain_events_per_sec",
    "drain_peak_rss_mb",
    "identify_ingest_events_per_sec",
    "audience_ingest_events_per_sec",
    "distinct_users_ingest_events_per_sec",
    "drain_distinct_users_events_per_sec",
    "drain_distinct_users_peak_rss_mb",
];

const PHASES: [&str; 6] = [
    "batch_ingest_latency",
    "track_ingest_latency",
    "track_ingest_empty_latency",
    "status_latency",
    "identify_ingest_latency",
    "audience_ingest_latency",
];

/// (ratio, numerator, denominator), as the README's Performance section
/// reads them, on either backend.
const COMMON_RATIOS: [(&str, &str, &str); 4] = [
    (
        "ratio_drain_to_batch_ingest",
        "drain_events_per_sec",
        "batch_ingest_events_per_sec",
    ),
    (
        "ratio_drain_distinct_users_to_batch_ingest",
        "drain_distinct_users_events_per_sec",
        "batch_ingest_events_per_sec",
    ),
    (
        "ratio_identify_to_track_batch",
        "identify_ingest_events_per_sec",
        "batch_ingest_events_per_sec",
    ),
    (
        "ratio_audience_to_track_batch",
        "audience_ingest_events_per_sec",
        "batch_ingest_events_per_sec",
    ),
];

/// The ratios to the raw figures of a SQLite run. A denominator `a|b` is
/// the mean of the two: the raw figure at 100 rows a transaction measured
/// before the ingest phases and again after them.
const RATIOS: [(&str, &str, &str); 4] = [
    (
        "ratio_batch_to_raw",
        "batch_ingest_events_per_sec",
        "raw_sqlite_rows_per_sec_100_per_tx|raw_sqlite_rows_per_sec_100_per_tx_after",
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
        "ratio_batch_to_lean_raw",
        "batch_ingest_events_per_sec",
        "raw_sqlite_lean_rows_per_sec_100_per_tx|raw_sqlite_lean_rows_per_sec_100_per_tx_after",
    ),
];

/// The ratios to the raw figures of a PostgreSQL run: its own raw figures.
const PG_RATIOS: [(&str, &str, &str); 3] = [
    (
        "ratio_batch_to_raw",
        "batch_ingest_events_per_sec",
        "raw_postgres_rows_per_sec_100_per_tx|raw_postgres_rows_per_sec_100_per_tx_after",
    ),
    (
        "ratio_track_to_single_commit",
        "track_ingest_events_per_sec",
        "raw_postgres_rows_per_sec_1_per_tx",
    ),
    (
        "ratio_track_empty_to_single_commit",
        "track_ingest_empty_events_per_sec",
        "raw_postgres_rows_per_sec_1_per_tx",
    ),
];

/// The arguments of a run at the test's scale.
fn small_run(cmd: &mut std::process::Command) {
    cmd.arg("bench")
        .args(["--events", &EVENTS.to_string()])
        .args(["--track-events", &TRACK_EVENTS.to_string()])
        .args(["--raw-rows", "3000", "--raw-single-rows", "30"])
        .args(["--batch-connections", &BATCH_CONNECTIONS.to_string()])
        .args(["--track-connections", &TRACK_CONNECTIONS.to_string()])
        .args(["--distinct-users", &DISTINCT_USERS.to_string()])
        .args(["--identify-events", &IDENTIFY_EVENTS.to_string()]);
}

/// Runs `bench` at the test's scale with databases in `dir`; its stdout.
/// One run at a time: each starts forwarders of its own, and two runs at
/// once would only measure each other.
fn bench(dir: &Path, json: bool) -> String {
    bench_with(dir, if json { &["--json"] } else { &[] })
}

/// `bench` with more arguments.
fn bench_with(dir: &Path, args: &[&str]) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = std::process::Command::new(common::binary_path());
    small_run(&mut cmd);
    cmd.env_remove("FORWARDER_DATABASE").arg("--dir").arg(dir);
    cmd.args(args);
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

fn check_ratios<'a>(report: &Value, ratios: impl Iterator<Item = &'a (&'a str, &'a str, &'a str)>) {
    for (ratio, num, den) in ratios {
        let parts: Vec<f64> = den.split('|').map(|d| f(report, d)).collect();
        let expected = f(report, num) / (parts.iter().sum::<f64>() / parts.len() as f64);
        let got = f(report, ratio);
        assert!(
            (got - expected).abs() <= expected * 1e-9,
            "{ratio} = {got}, but {num} / {den} = {expected}"
        );
    }
}

/// The CPU figures of a run on Linux: every phase that set a goal has
/// them; the phases with forwarders running count the forwarders' CPU
/// (a wrong process id or a meter that read nothing gives 0), which is a
/// part of the machine's; the raw phases run no forwarder.
fn check_cpu(report: &Value) {
    let cpu = &report["cpu"];
    for (phase, events) in [
        ("batch_ingest", EVENTS),
        ("track_ingest_empty", TRACK_EVENTS),
        ("drain", EVENTS + TRACK_EVENTS),
    ] {
        let c = &cpu[phase];
        let (machine, forwarder) = (f(c, "machine_us_per_event"), f(c, "forwarder_us_per_event"));
        // Process times and the machine's are sampled apart: allow a few
        // clock ticks (10 ms each) of difference over the phase.
        let ticks = 5.0 * 10_000.0 / events as f64;
        assert!(forwarder > 0.0, "{phase}: {c}");
        assert!(forwarder <= machine + ticks, "{phase}: {c}");
        let busy = f(c, "machine_busy");
        assert!(busy > 0.0 && busy <= 1.0, "{phase}: {c}");
    }
    for phase in ["raw_100_per_tx", "raw_1_per_tx"] {
        let c = &cpu[phase];
        assert!(c["forwarder_us_per_event"].is_null(), "{phase}: {c}");
        assert!(f(c, "machine_us_per_event") >= 0.0, "{phase}: {c}");
        assert!(f(c, "bench_us_per_event") >= 0.0, "{phase}: {c}");
    }
    // The bench process's own share is not asserted above 0: at this scale
    // a phase can take less than one clock tick of it (cpu_meter's unit
    // tests check that the meter counts this process).
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

    for field in RATES.iter().chain(
        [
            "startup_with_backlog_ms",
            "raw_sqlite_rows_per_sec_100_per_tx_after",
            "raw_sqlite_lean_rows_per_sec_100_per_tx_after",
        ]
        .iter(),
    ) {
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
    check_ratios(&report, RATIOS.iter().chain(COMMON_RATIOS.iter()));
    check_cpu(&report);
    assert_eq!(report["backend"], "sqlite", "{report}");
    assert_eq!(report["instances"], 1, "{report}");
    assert!(report["raw_postgres_rows_per_sec_100_per_tx"].is_null());
    assert!(report["raw_postgres_rows_per_sec_100_per_tx_after"].is_null());
    assert_eq!(report["distinct_users_events"], DISTINCT_USERS as i64);
    assert_eq!(
        report["goals"].as_array().map(Vec::len),
        Some(8),
        "{report}"
    );

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

/// `--rounds 2`: each goal lists both runs' values and reports their median
/// (for two, their mean), met or missed by that median, and the report's
/// ratio is the goal's figure: the median of the runs' own ratios.
#[tokio::test]
async fn rounds_report_the_median_and_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let report: Value = serde_json::from_str(&bench_with(dir.path(), &["--json", "--rounds", "2"]))
        .expect("JSON report");
    assert_eq!(report["rounds"], 2, "{report}");
    let goals = report["goals"].as_array().expect("goals");
    assert_eq!(goals.len(), 8, "{report}");
    for g in goals {
        let runs: Vec<f64> = g["per_round"]
            .as_array()
            .unwrap_or_else(|| panic!("no per_round: {g}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(runs.len(), 2, "{g}");
        let (value, target) = (f(g, "value"), f(g, "target"));
        let median = (runs[0] + runs[1]) / 2.0;
        assert!(
            (value - median).abs() <= 1e-9 * median.abs().max(1.0),
            "{g}"
        );
        let name = g["goal"].as_str().unwrap();
        let lower_is_better = name.contains("p99") || name.contains("RSS");
        let met = if lower_is_better {
            value < target
        } else {
            value >= target
        };
        assert_eq!(g["met"], met, "{g}");
        if name == "distinct-user drain / batch ingest" {
            assert_eq!(
                f(&report, "ratio_drain_distinct_users_to_batch_ingest"),
                value
            );
        }
    }
    // Figures that are the same in every run stay what they were.
    assert_eq!(
        report["backlog_events"],
        (EVENTS + TRACK_EVENTS) as i64,
        "{report}"
    );
    assert_eq!(report["backend"], "sqlite");
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
        backend: "sqlite".into(),
        instances: 1,
        rounds: 1,
        raw_sqlite_lean_rows_per_sec_100_per_tx: 140_000.0,
        raw_sqlite_rows_per_sec_100_per_tx_after: Some(99_000.0),
        raw_sqlite_lean_rows_per_sec_100_per_tx_after: Some(150_000.0),
        raw_postgres_rows_per_sec_100_per_tx: None,
        raw_postgres_rows_per_sec_100_per_tx_after: None,
        raw_postgres_rows_per_sec_1_per_tx: None,
        raw_postgres_connections: None,
        identify_ingest_events_per_sec: 31_000.0,
        identify_ingest_latency: distinct(5.0),
        audience_ingest_events_per_sec: 32_000.0,
        audience_ingest_latency: distinct(6.0),
        distinct_users_events: 700,
        distinct_users_ingest_events_per_sec: 41_000.0,
        drain_distinct_users_events_per_sec: 21_000.0,
        drain_distinct_users_peak_rss_mb: 30.5,
        ratio_batch_to_lean_raw: Some(0.37),
        ratio_drain_distinct_users_to_batch_ingest: 0.4,
        ratio_identify_to_track_batch: 0.6,
        ratio_audience_to_track_batch: 0.62,
        cpu: CpuReport {
            raw_1_per_tx: Some(CpuCost {
                machine_us_per_event: 180.5,
                forwarder_us_per_event: None,
                bench_us_per_event: 30.25,
                rest_us_per_event: 150.25,
                machine_busy: 0.85,
            }),
            track_ingest_empty: Some(CpuCost {
                machine_us_per_event: 120.5,
                forwarder_us_per_event: Some(60.25),
                bench_us_per_event: 10.0,
                rest_us_per_event: 50.25,
                machine_busy: 0.78,
            }),
            ..CpuReport::default()
        },
        goals: Vec::new(),
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
        database: None,
        instances: 1,
        distinct_users: DISTINCT_USERS,
        identify_events: IDENTIFY_EVENTS,
        identify_connections: 8,
        raw_connections: 8,
        rounds: 1,
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
        ("raw SQLite lean, 100 rows/transaction", vec![140_000.0]),
        ("raw SQLite, 100 rows/tx, after ingest", vec![99_000.0]),
        (
            "raw SQLite lean, 100 rows/tx, after ingest",
            vec![150_000.0],
        ),
        (
            "identify x100 (ids), 8 connections",
            vec![31_000.0, 50.0, 5.0, 99.0, 5.25, 5.5],
        ),
        (
            "audience x100, 8 connections",
            vec![32_000.0, 50.0, 6.0, 99.0, 6.25, 6.5],
        ),
        ("/v1/batch, 700 distinct users", vec![41_000.0]),
        ("drain, every event its own user", vec![21_000.0, 30.5]),
        ("ratio batch ingest / lean raw (100/tx)", vec![0.37]),
        ("ratio distinct-user drain / batch ingest", vec![0.4]),
        ("ratio identify / track batch", vec![0.6]),
        ("ratio audience / track batch", vec![0.62]),
        ("CPU per row, raw 1 row/tx", vec![180.5, 30.2, 150.2, 85.0]),
        (
            "CPU per event, /v1/track, empty outbox",
            vec![120.5, 60.2, 10.0, 50.2, 78.0],
        ),
    ] {
        assert_eq!(row(&rows, label), expected, "line `{label}`");
    }
    // A phase without CPU figures (no /proc) prints no line for them.
    assert!(
        !rows.iter().any(|(l, _)| l == "CPU per event, drain"),
        "{rows:?}"
    );

    // The median of several runs says so, and each goal line lists every
    // run's value after the median's.
    let mut medians = report.clone();
    medians.rounds = 3;
    medians.goals = churnzero_forwarder::bench::goals(&medians);
    medians.goals[5].per_round = vec![0.45, 0.4, 0.38];
    let rows = figures(&format_report(&medians, &args));
    assert_eq!(
        row(&rows, "runs (each figure below is their median)"),
        [3.0]
    );
    assert_eq!(
        row(&rows, "goal distinct-user drain / batch ingest"),
        [0.4, 0.5, 0.45, 0.4, 0.38]
    );

    // A real run's table: its ratios are the quotients of the rates it
    // prints (to the rounding of the print).
    let dir = tempfile::tempdir().unwrap();
    let rows = figures(&bench(dir.path(), false));
    // A denominator `a|b` is the mean of two printed rates.
    let rate = |label: &str| {
        let parts: Vec<f64> = label.split('|').map(|l| row(&rows, l)[0]).collect();
        parts.iter().sum::<f64>() / parts.len() as f64
    };
    for (ratio, num, den) in [
        (
            "ratio batch ingest / raw (100/tx)",
            batch.as_str(),
            "raw SQLite, 100 rows/transaction|raw SQLite, 100 rows/tx, after ingest",
        ),
        (
            "ratio batch ingest / lean raw (100/tx)",
            batch.as_str(),
            "raw SQLite lean, 100 rows/transaction|raw SQLite lean, 100 rows/tx, after ingest",
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

fn pg_server() -> String {
    std::env::var("FORWARDER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".into())
}

/// The PostgreSQL server's admin connection, or `None` (with one loud
/// line) when there is none; under `CI=true` no server is a failure.
async fn pg_admin() -> Option<sqlx::PgConnection> {
    use sqlx::Connection;
    let url = format!("{}/test", pg_server());
    match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url)).await {
        Ok(Ok(c)) => Some(c),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "connect timed out".into(),
            };
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("PostgreSQL at {url} is required under CI: {why}");
            }
            eprintln!("SKIPPED: bench on PostgreSQL needs a server at {url} ({why})");
            None
        }
    }
}

#[tokio::test]
async fn bench_on_postgres_reports_its_own_raw_figures_and_cleans_up() {
    let Some(mut admin) = pg_admin().await else {
        return;
    };
    let mut cmd = std::process::Command::new(common::binary_path());
    small_run(&mut cmd);
    cmd.args(["--instances", "2", "--raw-connections", "3", "--json"])
        .env_remove("FORWARDER_DATABASE")
        .arg("--database")
        .arg(format!("{}/test", pg_server()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");

    assert_eq!(report["backend"], "postgres", "{report}");
    assert_eq!(report["instances"], 2, "{report}");
    assert_eq!(report["raw_postgres_connections"], 3, "{report}");
    for field in RATES.iter().chain(
        [
            "raw_postgres_rows_per_sec_100_per_tx",
            "raw_postgres_rows_per_sec_100_per_tx_after",
            "raw_postgres_rows_per_sec_1_per_tx",
            "startup_with_backlog_ms",
        ]
        .iter(),
    ) {
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
    check_ratios(&report, PG_RATIOS.iter().chain(COMMON_RATIOS.iter()));
    check_cpu(&report);
    assert!(report["ratio_batch_to_lean_raw"].is_null(), "{report}");
    assert!(
        report["raw_sqlite_rows_per_sec_100_per_tx_after"].is_null()
            && report["raw_sqlite_lean_rows_per_sec_100_per_tx_after"].is_null(),
        "{report}"
    );
    // Every event sent is in the backlog, spread over two instances or not.
    assert_eq!(
        report["backlog_events"],
        (EVENTS + TRACK_EVENTS) as i64,
        "{report}"
    );
    assert_eq!(report["distinct_users_events"], DISTINCT_USERS as i64);

    // The databases the run made are gone.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(format!("cfwbench\\_{pid}\\_%"))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "databases of bench {pid} left behind");
}
