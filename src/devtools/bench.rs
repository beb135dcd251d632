//! `bench`: sizes a deployment on this machine, in one run. It measures the
//! storage limit (raw inserts on the same disk: SQLite through its C API,
//! and PostgreSQL through sqlx when the run is on PostgreSQL), then the real
//! binary: durable ingest over HTTP (track batches, single events, identify
//! batches carrying ids, Engage audience identifies), status latency at the
//! resulting backlog, startup time with that backlog, and the drain of the
//! backlog to a mock ChurnZero with the forwarder's peak RSS, once with few
//! users and once with every event its own user. The load generator is real
//! concurrent HTTP over sockets. On PostgreSQL every phase runs in a
//! database of its own, made on the given server and dropped at the end,
//! and `--instances` runs several forwarders on each.

use crate::devtools::cpu_meter::{CpuCost, CpuMeter, CpuReport};
use crate::devtools::mock_churnzero::{MockArgs, MockChurnZero};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{Connection, Executor};
use std::ffi::{CString, OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Backlog built through /v1/batch and then drained.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Single-event /v1/track requests to time.
    #[arg(long, default_value_t = 50_000)]
    pub track_events: u64,
    /// Rows for the raw figures at 100 rows a transaction.
    #[arg(long, default_value_t = 500_000)]
    pub raw_rows: u64,
    /// Rows for the raw figures at one row a transaction.
    #[arg(long, default_value_t = 5_000)]
    pub raw_single_rows: u64,
    /// Connections sending /v1/batch.
    #[arg(long, default_value_t = 16)]
    pub batch_connections: usize,
    /// Connections sending /v1/track.
    #[arg(long, default_value_t = 64)]
    pub track_connections: usize,
    /// Directory for the databases (the disk you will run on); a temporary
    /// directory by default.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
    /// A `postgres://` URL: every phase runs on a fresh database made on
    /// that server (and dropped after), the forwarder's `--database` set to
    /// it. A directory or file instead keeps the run on SQLite, with the
    /// bench's databases in a temporary directory beside it (a file itself
    /// is never opened).
    #[arg(long, env = "FORWARDER_DATABASE")]
    pub database: Option<String>,
    /// Forwarder processes sharing each database, the load spread across
    /// them (PostgreSQL only).
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// Events of the drain where every event has a user of its own.
    #[arg(long, default_value_t = 100_000)]
    pub distinct_users: u64,
    /// Events of each identify phase (ids, then Engage audiences).
    #[arg(long, default_value_t = 100_000)]
    pub identify_events: u64,
    /// Connections sending the identify batches.
    #[arg(long, default_value_t = 8)]
    pub identify_connections: usize,
    /// Concurrent connections of the raw PostgreSQL writer.
    #[arg(long, default_value_t = 8)]
    pub raw_connections: usize,
    /// Runs of the whole measurement. With more than one, every figure is
    /// the median of the runs, each ratio the median of the runs' own
    /// ratios (numerator and denominator from the same run), and each goal
    /// lists its value in every run: a disk whose flush time drifts from
    /// minute to minute moves one run's ratios a long way.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// Latency summary of a phase, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One performance goal: the figure, what it must reach, and whether it
/// did, so a run says by itself where it falls short.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    pub value: f64,
    pub target: f64,
    pub met: bool,
    /// The value in each run when `--rounds` is above one (`value` is
    /// their median), so that a median that is met hides no missed run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_round: Vec<f64>,
}

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// `sqlite` or `postgres`: the outbox the forwarder ran on.
    pub backend: String,
    /// Forwarder processes per database (1 on SQLite).
    pub instances: usize,
    /// Runs the figures are the medians of (`--rounds`).
    pub rounds: usize,
    pub raw_sqlite_rows_per_sec_100_per_tx: f64,
    pub raw_sqlite_rows_per_sec_1_per_tx: f64,
    /// Raw SQLite at 100 rows a transaction into a lean table (a unique
    /// message id and a due index only): what a store that kept nothing
    /// else could reach.
    pub raw_sqlite_lean_rows_per_sec_100_per_tx: f64,
    /// The two SQLite figures at 100 rows a transaction measured again
    /// after the batch and track phases (SQLite runs; null on
    /// PostgreSQL). A disk's flush time can drift by a fifth within a
    /// minute: batch ingest is compared with the mean of the figures
    /// measured before and after it, so a drift in either direction moves
    /// the ratio less, and the two figures side by side show how far it
    /// drifted.
    pub raw_sqlite_rows_per_sec_100_per_tx_after: Option<f64>,
    pub raw_sqlite_lean_rows_per_sec_100_per_tx_after: Option<f64>,
    /// Raw PostgreSQL, events-table rows with every index, several
    /// connections (`raw_postgres_connections`); null on SQLite.
    pub raw_postgres_rows_per_sec_100_per_tx: Option<f64>,
    /// The same, measured again after the batch and track phases (see
    /// `raw_sqlite_rows_per_sec_100_per_tx_after`); null on SQLite.
    pub raw_postgres_rows_per_sec_100_per_tx_after: Option<f64>,
    pub raw_postgres_rows_per_sec_1_per_tx: Option<f64>,
    pub raw_postgres_connections: Option<usize>,
    pub batch_ingest_events_per_sec: f64,
    pub batch_ingest_latency: Latency,
    /// /v1/track into a fresh outbox: the usual case of a forwarder whose
    /// delivery keeps up.
    pub track_ingest_empty_events_per_sec: f64,
    pub track_ingest_empty_latency: Latency,
    /// /v1/track on top of the batch phase's backlog.
    pub track_ingest_events_per_sec: f64,
    pub track_ingest_latency: Latency,
    pub status_latency: Latency,
    pub backlog_events: i64,
    pub startup_with_backlog_ms: f64,
    pub drain_events_per_sec: f64,
    pub drain_peak_rss_mb: f64,
    /// Identify batches whose traits carry account and contact ids.
    pub identify_ingest_events_per_sec: f64,
    pub identify_ingest_latency: Latency,
    /// Engage audience identifies (a boolean audience trait each).
    pub audience_ingest_events_per_sec: f64,
    pub audience_ingest_latency: Latency,
    /// The backlog of the distinct-user drain: one event per user.
    pub distinct_users_events: i64,
    pub distinct_users_ingest_events_per_sec: f64,
    pub drain_distinct_users_events_per_sec: f64,
    pub drain_distinct_users_peak_rss_mb: f64,
    /// Batch ingest over the backend's raw figure at 100 rows a
    /// transaction (SQLite: the full-index one; PostgreSQL: its own), the
    /// mean of its measurements before and after.
    pub ratio_batch_to_raw: f64,
    /// Batch ingest over the lean raw SQLite figure (the mean of before
    /// and after); null on PostgreSQL.
    pub ratio_batch_to_lean_raw: Option<f64>,
    /// /v1/track over the backend's raw figure at one row a transaction.
    pub ratio_track_empty_to_single_commit: f64,
    pub ratio_track_to_single_commit: f64,
    pub ratio_drain_to_batch_ingest: f64,
    pub ratio_drain_distinct_users_to_batch_ingest: f64,
    pub ratio_identify_to_track_batch: f64,
    pub ratio_audience_to_track_batch: f64,
    /// CPU time per event on this machine in the phases that set the goals
    /// (Linux only): how many cores a rate needs, and whether a phase ran
    /// out of CPU or waited.
    pub cpu: CpuReport,
    pub goals: Vec<Goal>,
}

const WRITE_KEY: &str = "bench-write-key";
const APP_KEY: &str = "bench-app-key";

fn latency(mut samples: Vec<f64>) -> Latency {
    if samples.is_empty() {
        return Latency {
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
        };
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Latency {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: *samples.last().expect("not empty"),
    }
}

/// The outbox's events table with every index, as the raw figure writes it.
const SQLITE_FULL_SCHEMA: &str =
    "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, \
     message_id TEXT NOT NULL, kind TEXT NOT NULL, order_key TEXT NOT NULL, payload TEXT NOT NULL, \
     state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, accepted_at INTEGER NOT NULL, \
     next_attempt_at INTEGER NOT NULL, first_attempt_at INTEGER, lease_until INTEGER, \
     finished_at INTEGER, last_error TEXT, reason TEXT, history TEXT);
     CREATE INDEX events_due ON events (next_attempt_at, id) WHERE state = 0;
     CREATE INDEX events_key ON events (order_key, id) WHERE state NOT IN (2, 3);
     CREATE INDEX events_heads ON events (id) WHERE state = 0;
     CREATE INDEX events_dead ON events (id) WHERE state = 3;
     CREATE INDEX events_held ON events (id) WHERE state = 4;
     CREATE INDEX events_finished ON events (finished_at) WHERE state = 2;";

/// The least an outbox needs: the same columns, a unique message id (for
/// duplicates) and the due index (for delivery), nothing else.
const SQLITE_LEAN_SCHEMA: &str = "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, \
     message_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, order_key TEXT NOT NULL, payload TEXT NOT NULL, \
     state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, accepted_at INTEGER NOT NULL, \
     next_attempt_at INTEGER NOT NULL, first_attempt_at INTEGER, lease_until INTEGER, \
     finished_at INTEGER, last_error TEXT, reason TEXT, history TEXT);
     CREATE INDEX events_due ON events (next_attempt_at, id) WHERE state = 0;";

/// Raw SQLite through its C API: outbox-shaped rows (`schema`), WAL,
/// synchronous=FULL. This is the storage ceiling the forwarder's figures
/// are compared with.
/// The rate in rows/s, and what it cost on this machine.
fn raw_sqlite(
    path: &Path,
    schema: &str,
    rows: u64,
    per_tx: u64,
) -> anyhow::Result<(f64, Option<CpuCost>)> {
    use libsqlite3_sys as ffi;
    let _ = std::fs::remove_file(path);
    let cpath = CString::new(path.to_string_lossy().as_bytes())?;
    let mut db: *mut ffi::sqlite3 = std::ptr::null_mut();
    // SAFETY: plain use of the SQLite C API; every handle is closed below and
    // every string passed is NUL-terminated and outlives the call.
    unsafe {
        let flags = ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_CREATE;
        if ffi::sqlite3_open_v2(cpath.as_ptr(), &mut db, flags, std::ptr::null()) != ffi::SQLITE_OK
        {
            bail!("cannot open {}", path.display());
        }
        let exec = |sql: &str| -> anyhow::Result<()> {
            let c = CString::new(sql)?;
            if ffi::sqlite3_exec(
                db,
                c.as_ptr(),
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ) != ffi::SQLITE_OK
            {
                bail!("sqlite exec failed: {sql}");
            }
            Ok(())
        };
        exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")?;
        exec(schema)?;
        let sql = CString::new(
            "INSERT INTO events (source, message_id, kind, order_key, payload, state, accepted_at, next_attempt_at) \
             VALUES (?1, ?2, 'track', ?3, ?4, 0, ?5, ?5)",
        )?;
        let mut stmt: *mut ffi::sqlite3_stmt = std::ptr::null_mut();
        if ffi::sqlite3_prepare_v2(db, sql.as_ptr(), -1, &mut stmt, std::ptr::null_mut())
            != ffi::SQLITE_OK
        {
            bail!("prepare failed");
        }
        let payload = sample_event(0, 0).to_string();
        let meter = CpuMeter::start(&[]);
        let started = Instant::now();
        let mut i = 0u64;
        while i < rows {
            exec("BEGIN IMMEDIATE")?;
            for _ in 0..per_tx.min(rows - i) {
                let mid = CString::new(format!("msg-{i}"))?;
                let key = CString::new(format!("user-{}", i % 1000))?;
                let body = CString::new(payload.as_str())?;
                let src = c"0123456789abcdef";
                ffi::sqlite3_bind_text(stmt, 1, src.as_ptr(), -1, ffi::SQLITE_TRANSIENT());
                ffi::sqlite3_bind_text(stmt, 2, mid.as_ptr(), -1, ffi::SQLITE_TRANSIENT());
                ffi::sqlite3_bind_text(stmt, 3, key.as_ptr(), -1, ffi::SQLITE_TRANSIENT());
                ffi::sqlite3_bind_text(stmt, 4, body.as_ptr(), -1, ffi::SQLITE_TRANSIENT());
                ffi::sqlite3_bind_int64(stmt, 5, i as i64);
                if ffi::sqlite3_step(stmt) != ffi::SQLITE_DONE {
                    bail!("insert failed");
                }
                ffi::sqlite3_reset(stmt);
                i += 1;
            }
            exec("COMMIT")?;
        }
        let elapsed = started.elapsed();
        let cost = meter.finish(rows);
        ffi::sqlite3_finalize(stmt);
        ffi::sqlite3_close(db);
        Ok((rows as f64 / elapsed.as_secs_f64(), cost))
    }
}

/// The events table of the PostgreSQL schema with its indexes, taken from
/// the migration itself so the raw figure writes what the outbox writes.
fn pg_events_schema() -> &'static str {
    const MIGRATION: &str = include_str!("../../migrations/postgres/0001_outbox.sql");
    let start = MIGRATION
        .find("CREATE TABLE events")
        .expect("the migration creates events");
    let end = MIGRATION
        .find("CREATE TABLE order_keys")
        .expect("the migration creates order_keys");
    &MIGRATION[start..end]
}

/// Raw PostgreSQL: events-table rows (every column and index the outbox
/// has, no triggers) from `connections` concurrent connections, each
/// transaction one multi-row `INSERT ... SELECT FROM unnest(...)` of
/// `per_tx` rows, `synchronous_commit` as the server has it.
async fn raw_postgres(
    url: &str,
    rows: u64,
    per_tx: u64,
    connections: usize,
) -> anyhow::Result<(f64, Option<CpuCost>)> {
    let mut setup = sqlx::PgConnection::connect(url).await?;
    setup.execute(pg_events_schema()).await?;
    let _ = setup.close().await;
    let payload = Arc::new(sample_event(0, 0).to_string());
    let next = Arc::new(AtomicU64::new(0));
    let chunks = rows.div_ceil(per_tx);
    let mut conns = Vec::new();
    for _ in 0..connections.max(1) {
        conns.push(sqlx::PgConnection::connect(url).await?);
    }
    let meter = CpuMeter::start(&[]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut conn in conns {
        let (next, payload) = (next.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    break;
                }
                let first = c * per_tx;
                let n = per_tx.min(rows - first);
                let mids: Vec<String> = (first..first + n).map(|i| format!("msg-{i}")).collect();
                let keys: Vec<String> = (first..first + n)
                    .map(|i| format!("user-{}", i % 1000))
                    .collect();
                let bodies: Vec<&str> = (0..n).map(|_| payload.as_str()).collect();
                sqlx::query(
                    "INSERT INTO events (source, message_id, kind, order_key, payload, state, accepted_at, next_attempt_at) \
                     SELECT '0123456789abcdef', m, 'track', o, p, 0, $4, $4 \
                     FROM unnest($1::text[], $2::text[], $3::text[]) AS t(m, o, p)",
                )
                .bind(&mids)
                .bind(&keys)
                .bind(&bodies)
                .bind(first as i64)
                .execute(&mut conn)
                .await?;
            }
            let _ = conn.close().await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    Ok((rows as f64 / elapsed.as_secs_f64(), meter.finish(rows)))
}

fn sample_event(i: u64, user: u64) -> Value {
    json!({"type": "track", "userId": format!("user-{user}"), "event": "Report Exported",
           "messageId": format!("bench-{i}"),
           "properties": {"quantity": 1, "description": format!("export {i}")},
           "context": {"traits": {"accountExternalId": format!("acct-{}", user % 50), "contactExternalId": format!("user-{user}")},
                       "library": {"name": "analytics-node", "version": "2.1.0"}}})
}

/// Where the run's databases live.
enum Target {
    /// SQLite files in a directory.
    Sqlite(PathBuf),
    /// Databases of their own on a PostgreSQL server.
    Postgres(PgServer),
}

struct PgServer {
    /// The URL given (its database is used only to create and drop ours).
    admin: String,
    made: Vec<String>,
    /// Databases made so far: each name is used once.
    serial: u32,
}

/// Whether a --database value is a PostgreSQL URL.
fn is_postgres_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// `url` with its database name replaced by `name` (query kept).
fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[authority..].find('/') {
        Some(slash) => &head[..authority + slash],
        None => head,
    };
    format!("{base}/{name}{query}")
}

impl Target {
    fn backend(&self) -> &'static str {
        match self {
            Target::Sqlite(_) => "sqlite",
            Target::Postgres(_) => "postgres",
        }
    }

    /// A fresh, empty database for one phase: what to pass as --database.
    async fn fresh(&mut self, name: &str) -> anyhow::Result<OsString> {
        match self {
            Target::Sqlite(dir) => {
                let path = dir.join(format!("{name}.db"));
                remove_sqlite(&path);
                Ok(path.into_os_string())
            }
            Target::Postgres(pg) => {
                pg.serial += 1;
                let db = format!("cfwbench_{}_{}", std::process::id(), pg.serial);
                let mut admin = sqlx::PgConnection::connect(&pg.admin)
                    .await
                    .context("connecting to the PostgreSQL server given in --database")?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
                    .await?;
                admin
                    .execute(format!("CREATE DATABASE {db}").as_str())
                    .await
                    .context("creating the bench's database (the role needs CREATEDB)")?;
                let _ = admin.close().await;
                pg.made.push(db.clone());
                Ok(with_database(&pg.admin, &db).into())
            }
        }
    }

    /// Removes a phase's database once its figures are taken.
    async fn discard(&mut self, db: &OsStr) {
        match self {
            Target::Sqlite(_) => remove_sqlite(Path::new(db)),
            Target::Postgres(pg) => {
                let url = db.to_string_lossy();
                if let Some(name) = pg.made.iter().find(|n| url.contains(n.as_str())).cloned() {
                    pg.drop_database(&name).await;
                    pg.made.retain(|n| *n != name);
                }
            }
        }
    }

    /// Drops whatever databases are left (PostgreSQL; SQLite files go with
    /// their directory).
    async fn cleanup(&mut self) {
        if let Target::Postgres(pg) = self {
            for name in std::mem::take(&mut pg.made) {
                pg.drop_database(&name).await;
            }
        }
    }
}

impl PgServer {
    async fn drop_database(&self, name: &str) {
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await;
            let _ = admin.close().await;
        }
    }
}

fn remove_sqlite(path: &Path) {
    let name = path.as_os_str().to_os_string();
    for suffix in ["", "-wal", "-shm", "-reserve", "-journal"] {
        let mut p = name.clone();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

struct Forwarder {
    child: Child,
    base: String,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Forwarder {
    async fn start(
        db: &OsStr,
        churnzero: &str,
        deliver: bool,
    ) -> anyhow::Result<(Forwarder, Duration)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // BENCH_FORWARDER_BIN runs another build of the forwarder under the
        // same load (to compare two versions); this binary by default.
        let exe = match std::env::var_os("BENCH_FORWARDER_BIN") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()?,
        };
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--database")
            .arg(db)
            .args([
                "--write-key",
                WRITE_KEY,
                "--churnzero-url",
                churnzero,
                "--churnzero-app-key",
                APP_KEY,
            ])
            .args(["--flush-interval", "100ms", "--dedup-window", "1h"])
            // Every load connection comes from one address: the per-client
            // cap is for the internet, not for a load generator.
            .args(["--max-connections-per-client", "0"])
            // The forwarder under test logs warnings only, unless
            // BENCH_FORWARDER_LOG asks for more (e.g. the writer's trace
            // lines, to see where a group's time goes).
            .env(
                "RUST_LOG",
                std::env::var("BENCH_FORWARDER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("FORWARDER_DATABASE")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if !deliver {
            cmd.arg("--no-delivery");
        }
        let started = Instant::now();
        let child = cmd.spawn().context("starting the forwarder")?;
        let base = format!("http://127.0.0.1:{port}");
        let mut fwd = Forwarder { child, base };
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", fwd.base)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(exit)) = fwd.child.try_wait() {
                bail!("the forwarder exited before it was ready ({exit})");
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the forwarder did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok((fwd, started.elapsed()))
    }

    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let mut child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("true runs"),
        );
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }

    async fn status(&self) -> anyhow::Result<Value> {
        Ok(reqwest::get(format!("{}/status", self.base))
            .await?
            .json()
            .await?)
    }
}

/// The forwarders of one phase: `instances` processes on one database,
/// started together.
struct Fleet {
    fwds: Vec<Forwarder>,
}

impl Fleet {
    /// Starts them all at once; the time until the last is ready.
    async fn start(
        db: &OsStr,
        churnzero: &str,
        deliver: bool,
        instances: usize,
    ) -> anyhow::Result<(Fleet, Duration)> {
        let started = Instant::now();
        let all = futures_util::future::join_all(
            (0..instances.max(1)).map(|_| Forwarder::start(db, churnzero, deliver)),
        )
        .await;
        let mut fwds = Vec::new();
        for r in all {
            fwds.push(r?.0);
        }
        Ok((Fleet { fwds }, started.elapsed()))
    }

    fn bases(&self) -> Vec<String> {
        self.fwds.iter().map(|f| f.base.clone()).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.fwds.iter().map(|f| f.child.id()).collect()
    }

    /// Status from the first instance (on PostgreSQL it counts every
    /// instance's events).
    async fn status(&self) -> anyhow::Result<Value> {
        self.fwds[0].status().await
    }

    fn peak_rss_mb(&self) -> f64 {
        self.fwds
            .iter()
            .map(Forwarder::peak_rss_mb)
            .fold(0.0, f64::max)
    }

    async fn stop(self) {
        futures_util::future::join_all(self.fwds.into_iter().map(Forwarder::stop)).await;
    }

    /// Waits until nothing is pending or in flight; the events per second.
    async fn drain(&self, backlog: i64) -> anyhow::Result<f64> {
        let started = Instant::now();
        loop {
            let s = self.status().await?;
            if s["pending"].as_i64() == Some(0) && s["in_flight"].as_i64() == Some(0) {
                break;
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("drain did not finish within an hour");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drain_time = started.elapsed();
        let drained = self.status().await?["delivered"].as_i64().unwrap_or(0);
        if drained < backlog {
            bail!("drained {drained} of {backlog} events");
        }
        Ok(backlog as f64 / drain_time.as_secs_f64())
    }
}

/// What the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A track event of one of 10,000 users, its ids in `context.traits`.
    Track,
    /// A track event of a user of its own (`user-<i>`).
    DistinctTrack,
    /// An identify whose traits carry the account and contact ids.
    Identify,
    /// An Engage audience identify: one boolean audience trait.
    Audience,
}

/// The body of one load request, written straight into a string: the load
/// generator shares the machine with the forwarder, so it should spend as
/// little CPU per request as it can. `batch` wraps the events in a /v1/batch
/// body; otherwise the body is the one /v1/track event.
fn request_body(shape: Shape, first_id: u64, per_request: u64, batch: bool) -> String {
    use std::fmt::Write;
    let mut body = String::with_capacity(400 * per_request as usize + 16);
    let one = |body: &mut String, i: u64, with_type: bool| {
        let user = if shape == Shape::DistinctTrack {
            i
        } else {
            i % 10_000
        };
        let account = user % 50;
        let _ = match shape {
            Shape::Track | Shape::DistinctTrack => write!(
                body,
                r#"{{{}"userId":"user-{user}","event":"Report Exported","messageId":"bench-{i}","properties":{{"quantity":1,"description":"export {i}"}},"context":{{"traits":{{"accountExternalId":"acct-{account}","contactExternalId":"user-{user}"}},"library":{{"name":"analytics-node","version":"2.1.0"}}}}}}"#,
                if with_type { r#""type":"track","# } else { "" },
            ),
            Shape::Identify => write!(
                body,
                r#"{{"type":"identify","userId":"user-{user}","messageId":"bench-{i}","traits":{{"accountExternalId":"acct-{account}","contactExternalId":"user-{user}","email":"user-{user}@example.com","firstName":"Ada","plan":"pro","logins":{i}}},"context":{{"library":{{"name":"analytics-node","version":"2.1.0"}}}}}}"#,
            ),
            Shape::Audience => write!(
                body,
                r#"{{"type":"identify","userId":"user-{user}","messageId":"bench-{i}","traits":{{"power_users":{}}},"context":{{"personas":{{"computation_class":"audience","computation_key":"power_users","computation_id":"aud_power_users","space_id":"spa_bench"}},"library":{{"name":"analytics-node","version":"2.1.0"}}}}}}"#,
                i % 3 != 0,
            ),
        };
    };
    if !batch {
        one(&mut body, first_id, false);
    } else {
        body.push_str(r#"{"batch":["#);
        for k in 0..per_request {
            if k > 0 {
                body.push(',');
            }
            one(&mut body, first_id + k, true);
        }
        body.push_str("]}");
    }
    body
}

/// One keep-alive HTTP/1.1 connection of the load generator: writes a
/// request, reads the status line, the headers and a Content-Length body.
struct LoadConnection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
    head: String,
}

impl LoadConnection {
    async fn open(addr: &str) -> anyhow::Result<LoadConnection> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(LoadConnection {
            stream: tokio::io::BufReader::new(stream),
            head: String::new(),
        })
    }

    async fn post(
        &mut self,
        host: &str,
        path: &str,
        auth: &str,
        body: &[u8],
    ) -> anyhow::Result<u16> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: {auth}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(body).await?;
        self.head.clear();
        if self.stream.read_line(&mut self.head).await? == 0 {
            bail!("the forwarder closed the connection");
        }
        let status: u16 = self
            .head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("malformed status line")?;
        let mut length = 0usize;
        loop {
            self.head.clear();
            self.stream.read_line(&mut self.head).await?;
            let line = self.head.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().context("bad content-length")?;
                }
            }
        }
        let mut sink = vec![0u8; length];
        self.stream.read_exact(&mut sink).await?;
        Ok(status)
    }
}

/// Sends `total` events of `shape` from `connections` concurrent
/// connections (spread over `bases` in turn), `per_request` at a time, and
/// returns events/s and per-request latencies.
async fn load(
    bases: &[String],
    path: &str,
    shape: Shape,
    total: u64,
    per_request: u64,
    connections: usize,
    first_id: u64,
) -> anyhow::Result<(f64, Latency)> {
    use base64::Engine;
    let next = Arc::new(AtomicU64::new(0));
    let requests = total.div_ceil(per_request);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let next = next.clone();
        let host = bases[c % bases.len()]
            .trim_start_matches("http://")
            .to_string();
        let (auth, path) = (auth.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let mut conn = LoadConnection::open(&host).await?;
            let mut samples = Vec::new();
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= requests {
                    break;
                }
                // The last request carries what is left, so that exactly
                // `total` events are sent and counted.
                let body = request_body(
                    shape,
                    first_id + r * per_request,
                    per_request.min(total - r * per_request),
                    per_request > 1,
                );
                let t = Instant::now();
                let status = conn.post(&host, &path, &auth, body.as_bytes()).await?;
                if !(200..300).contains(&status) {
                    bail!("ingest answered {status}");
                }
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    Ok((total as f64 / elapsed.as_secs_f64(), latency(all)))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let postgres = args.database.as_deref().filter(|d| is_postgres_url(d));
    if postgres.is_none() && args.instances != 1 {
        bail!("--instances needs a PostgreSQL --database: one SQLite file has one owner");
    }
    if !(1..=16).contains(&args.instances) {
        bail!("--instances must be between 1 and 16");
    }
    if !(1..=20).contains(&args.rounds) {
        bail!("--rounds must be between 1 and 20");
    }
    // A directory or file given as --database keeps the run on its disk,
    // in a directory of the bench's own (removed after, like the default).
    let beside = match (&args.dir, &args.database, postgres) {
        (None, Some(d), None) => {
            let p = PathBuf::from(d);
            Some(if p.is_dir() {
                p
            } else {
                p.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."))
            })
        }
        _ => None,
    };
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = beside.unwrap_or_else(std::env::temp_dir).join(format!(
                "churnzero-forwarder-bench-{}",
                uuid::Uuid::new_v4()
            ));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let mut target = match postgres {
        Some(url) => Target::Postgres(PgServer {
            admin: url.to_string(),
            made: Vec::new(),
            serial: 0,
        }),
        None => Target::Sqlite(dir.clone()),
    };
    let mut reports = Vec::new();
    let mut result = Ok(());
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            say(&args, &format!("round {round} of {}", args.rounds));
        }
        match measure(&args, &dir, &mut target).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let result = result.and_then(|()| median_report(&reports));
    target.cleanup().await;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_report(&report, &args));
    }
    Ok(())
}

fn say(args: &BenchArgs, msg: &str) {
    if !args.json {
        eprintln!("bench: {msg}");
    }
}

/// Raw SQLite at `per_tx` rows a transaction into `schema`, on a blocking
/// thread; the file is removed after.
async fn raw_sqlite_in(
    dir: &Path,
    name: &str,
    schema: &'static str,
    rows: u64,
    per_tx: u64,
) -> anyhow::Result<(f64, Option<CpuCost>)> {
    let path = dir.join(name);
    let p = path.clone();
    let raw = tokio::task::spawn_blocking(move || raw_sqlite(&p, schema, rows, per_tx)).await??;
    remove_sqlite(&path);
    Ok(raw)
}

/// Builds a backlog of `events` of `shape` with delivery off, then drains
/// it: (ingest events/s, drain events/s, peak RSS MB, backlog).
async fn ingest_then_drain(
    args: &BenchArgs,
    db: &OsStr,
    churnzero: &str,
    shape: Shape,
    events: u64,
) -> anyhow::Result<(f64, f64, f64, i64)> {
    let (fleet, _) = Fleet::start(db, churnzero, false, args.instances).await?;
    let (ingest, _) = load(
        &fleet.bases(),
        "/v1/batch",
        shape,
        events,
        100,
        args.batch_connections,
        0,
    )
    .await?;
    let backlog = fleet.status().await?["pending"].as_i64().unwrap_or(0);
    fleet.stop().await;
    let (fleet, _) = Fleet::start(db, churnzero, true, args.instances).await?;
    let rate = fleet.drain(backlog).await?;
    let rss = fleet.peak_rss_mb();
    fleet.stop().await;
    Ok((ingest, rate, rss, backlog))
}

async fn measure(args: &BenchArgs, dir: &Path, target: &mut Target) -> anyhow::Result<BenchReport> {
    let n = args.instances;
    say(
        args,
        &format!("raw SQLite, {} rows at 100 a transaction", args.raw_rows),
    );
    let (raw100, sqlite_cpu100) =
        raw_sqlite_in(dir, "raw100.db", SQLITE_FULL_SCHEMA, args.raw_rows, 100).await?;
    say(
        args,
        &format!(
            "raw SQLite, {} rows at one a transaction",
            args.raw_single_rows
        ),
    );
    let (raw1, sqlite_cpu1) =
        raw_sqlite_in(dir, "raw1.db", SQLITE_FULL_SCHEMA, args.raw_single_rows, 1).await?;
    say(
        args,
        &format!(
            "raw SQLite, lean table, {} rows at 100 a transaction",
            args.raw_rows
        ),
    );
    let (lean100, _) =
        raw_sqlite_in(dir, "lean100.db", SQLITE_LEAN_SCHEMA, args.raw_rows, 100).await?;

    let (mut pg100, mut pg1) = (None, None);
    let (mut cpu_raw100, mut cpu_raw1) = (sqlite_cpu100, sqlite_cpu1);
    if let Target::Postgres(_) = target {
        for (per_tx, rows, out, cpu) in [
            (100, args.raw_rows, &mut pg100, &mut cpu_raw100),
            (1, args.raw_single_rows, &mut pg1, &mut cpu_raw1),
        ] {
            say(
                args,
                &format!(
                    "raw PostgreSQL, {rows} rows at {per_tx} a transaction, {} connections",
                    args.raw_connections
                ),
            );
            let db = target.fresh("raw").await?;
            let (rate, cost) =
                raw_postgres(&db.to_string_lossy(), rows, per_tx, args.raw_connections).await?;
            *out = Some(rate);
            *cpu = cost;
            target.discard(&db).await;
        }
    }
    // One a transaction: the ceiling of /v1/track. (The ceilings at 100 a
    // transaction are measured again after the ingest phases, below.)
    let ceiling1 = pg1.unwrap_or(raw1);

    let mock = MockChurnZero::start(MockArgs {
        listen: "127.0.0.1:0".parse()?,
        quiet: true,
        ..MockArgs::default()
    })
    .await?;
    mock.state().set_count_only(true);
    let cz = mock.url();

    let fresh_db = target.fresh("track-fresh").await?;
    let (fleet, _) = Fleet::start(&fresh_db, &cz, false, n).await?;
    say(
        args,
        &format!(
            "durable ingest into an empty outbox: {} events through /v1/track, {} connections",
            args.track_events, args.track_connections
        ),
    );
    let meter = CpuMeter::start(&fleet.pids());
    let (track_empty_rate, track_empty_lat) = load(
        &fleet.bases(),
        "/v1/track",
        Shape::Track,
        args.track_events,
        1,
        args.track_connections,
        args.events + args.track_events,
    )
    .await?;
    let cpu_track_empty = meter.finish(args.track_events);
    fleet.stop().await;
    target.discard(&fresh_db).await;

    let db = target.fresh("bench").await?;
    let (fleet, _) = Fleet::start(&db, &cz, false, n).await?;
    say(
        args,
        &format!(
            "durable ingest: {} events through /v1/batch, 100 a request, {} connections",
            args.events, args.batch_connections
        ),
    );
    let meter = CpuMeter::start(&fleet.pids());
    let (batch_rate, batch_lat) = load(
        &fleet.bases(),
        "/v1/batch",
        Shape::Track,
        args.events,
        100,
        args.batch_connections,
        0,
    )
    .await?;
    let cpu_batch = meter.finish(args.events);
    say(
        args,
        &format!(
            "durable ingest at the backlog: {} events through /v1/track, {} connections",
            args.track_events, args.track_connections
        ),
    );
    let (track_rate, track_lat) = load(
        &fleet.bases(),
        "/v1/track",
        Shape::Track,
        args.track_events,
        1,
        args.track_connections,
        args.events,
    )
    .await?;
    say(args, "status latency at the backlog");
    let http = reqwest::Client::new();
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = http
            .get(format!("{}/status", fleet.fwds[0].base))
            .send()
            .await?;
        let _ = r.bytes().await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let status_lat = latency(samples);
    let backlog = fleet.status().await?["pending"].as_i64().unwrap_or(0);
    fleet.stop().await;

    // The ceilings that batch ingest is compared with, again, with no
    // forwarder running (see `raw_sqlite_rows_per_sec_100_per_tx_after`).
    let (mut raw100_after, mut lean100_after, mut pg100_after) = (None, None, None);
    if let Target::Postgres(_) = target {
        say(
            args,
            &format!(
                "raw PostgreSQL again, {} rows at 100 a transaction",
                args.raw_rows
            ),
        );
        let raw_db = target.fresh("raw-after").await?;
        pg100_after = Some(
            raw_postgres(
                &raw_db.to_string_lossy(),
                args.raw_rows,
                100,
                args.raw_connections,
            )
            .await?
            .0,
        );
        target.discard(&raw_db).await;
    } else {
        say(
            args,
            &format!(
                "raw SQLite again, {} rows at 100 a transaction, full and lean",
                args.raw_rows
            ),
        );
        raw100_after = Some(
            raw_sqlite_in(
                dir,
                "raw100-after.db",
                SQLITE_FULL_SCHEMA,
                args.raw_rows,
                100,
            )
            .await?
            .0,
        );
        lean100_after = Some(
            raw_sqlite_in(
                dir,
                "lean100-after.db",
                SQLITE_LEAN_SCHEMA,
                args.raw_rows,
                100,
            )
            .await?
            .0,
        );
    }
    let mean = |before: f64, after: Option<f64>| after.map_or(before, |a| (before + a) / 2.0);
    let ceiling100 = match pg100 {
        Some(before) => mean(before, pg100_after),
        None => mean(raw100, raw100_after),
    };
    let lean_ceiling = mean(lean100, lean100_after);

    say(
        args,
        &format!("drain: {backlog} events to the mock ChurnZero"),
    );
    let (fleet, startup) = Fleet::start(&db, &cz, true, n).await?;
    let meter = CpuMeter::start(&fleet.pids());
    let drain_rate = fleet.drain(backlog).await?;
    let cpu_drain = meter.finish(u64::try_from(backlog).unwrap_or(0));
    let rss = fleet.peak_rss_mb();
    fleet.stop().await;

    say(
        args,
        &format!(
            "distinct users: {} events, each its own user, ingested then drained",
            args.distinct_users
        ),
    );
    let distinct_db = target.fresh("distinct").await?;
    let (distinct_ingest, distinct_rate, distinct_rss, distinct_backlog) = ingest_then_drain(
        args,
        &distinct_db,
        &cz,
        Shape::DistinctTrack,
        args.distinct_users,
    )
    .await?;
    target.discard(&distinct_db).await;

    let mut identify = Vec::new();
    for (shape, name) in [(Shape::Identify, "identify"), (Shape::Audience, "audience")] {
        say(
            args,
            &format!(
                "{name} batches: {} events, 100 a request, {} connections",
                args.identify_events, args.identify_connections
            ),
        );
        let db = target.fresh(name).await?;
        let (fleet, _) = Fleet::start(&db, &cz, false, n).await?;
        identify.push(
            load(
                &fleet.bases(),
                "/v1/batch",
                shape,
                args.identify_events,
                100,
                args.identify_connections,
                0,
            )
            .await?,
        );
        fleet.stop().await;
        target.discard(&db).await;
    }
    mock.shutdown().await;
    let (audience_rate, audience_lat) = identify.pop().expect("two phases");
    let (identify_rate, identify_lat) = identify.pop().expect("two phases");

    let mut report = BenchReport {
        backend: target.backend().to_string(),
        instances: n,
        rounds: 1,
        raw_sqlite_rows_per_sec_100_per_tx: raw100,
        raw_sqlite_rows_per_sec_1_per_tx: raw1,
        raw_sqlite_lean_rows_per_sec_100_per_tx: lean100,
        raw_sqlite_rows_per_sec_100_per_tx_after: raw100_after,
        raw_sqlite_lean_rows_per_sec_100_per_tx_after: lean100_after,
        raw_postgres_rows_per_sec_100_per_tx: pg100,
        raw_postgres_rows_per_sec_100_per_tx_after: pg100_after,
        raw_postgres_rows_per_sec_1_per_tx: pg1,
        raw_postgres_connections: pg100.map(|_| args.raw_connections),
        batch_ingest_events_per_sec: batch_rate,
        batch_ingest_latency: batch_lat,
        track_ingest_empty_events_per_sec: track_empty_rate,
        track_ingest_empty_latency: track_empty_lat,
        track_ingest_events_per_sec: track_rate,
        track_ingest_latency: track_lat,
        status_latency: status_lat,
        backlog_events: backlog,
        startup_with_backlog_ms: startup.as_secs_f64() * 1000.0,
        drain_events_per_sec: drain_rate,
        drain_peak_rss_mb: rss,
        identify_ingest_events_per_sec: identify_rate,
        identify_ingest_latency: identify_lat,
        audience_ingest_events_per_sec: audience_rate,
        audience_ingest_latency: audience_lat,
        distinct_users_events: distinct_backlog,
        distinct_users_ingest_events_per_sec: distinct_ingest,
        drain_distinct_users_events_per_sec: distinct_rate,
        drain_distinct_users_peak_rss_mb: distinct_rss,
        ratio_batch_to_raw: batch_rate / ceiling100,
        ratio_batch_to_lean_raw: pg100.is_none().then(|| batch_rate / lean_ceiling),
        ratio_track_empty_to_single_commit: track_empty_rate / ceiling1,
        ratio_track_to_single_commit: track_rate / ceiling1,
        ratio_drain_to_batch_ingest: drain_rate / batch_rate,
        ratio_drain_distinct_users_to_batch_ingest: distinct_rate / batch_rate,
        ratio_identify_to_track_batch: identify_rate / batch_rate,
        ratio_audience_to_track_batch: audience_rate / batch_rate,
        cpu: CpuReport {
            raw_100_per_tx: cpu_raw100,
            raw_1_per_tx: cpu_raw1,
            batch_ingest: cpu_batch,
            track_ingest_empty: cpu_track_empty,
            drain: cpu_drain,
        },
        goals: Vec::new(),
    };
    report.goals = goals(&report);
    Ok(report)
}

/// The report of several runs: each figure the median of the runs' (ratios
/// too: each run's own ratio, never a ratio of medians), the goals checked
/// against those medians, with every run's value beside them.
pub fn median_report(reports: &[BenchReport]) -> anyhow::Result<BenchReport> {
    let Some(first) = reports.first() else {
        bail!("no run to report");
    };
    if reports.len() == 1 {
        return Ok(first.clone());
    }
    let values = reports
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let mut report: BenchReport = serde_json::from_value(median_value(&values))?;
    report.rounds = reports.len();
    report.goals = goals(&report);
    for (i, g) in report.goals.iter_mut().enumerate() {
        g.per_round = reports.iter().map(|r| r.goals[i].value).collect();
    }
    Ok(report)
}

/// Field by field, the median of the numbers at the same place in
/// `values` (the mean of the middle two for an even count; integers stay
/// integers); anything else is taken from the first.
fn median_value(values: &[Value]) -> Value {
    fn median<T: Copy + PartialOrd>(mut xs: Vec<T>, mean: impl Fn(T, T) -> T) -> T {
        xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let n = xs.len();
        if n % 2 == 1 {
            xs[n / 2]
        } else {
            mean(xs[n / 2 - 1], xs[n / 2])
        }
    }
    match &values[0] {
        Value::Object(fields) => Value::Object(
            fields
                .keys()
                .map(|k| {
                    let at: Vec<Value> = values
                        .iter()
                        .map(|v| v.get(k).cloned().unwrap_or(Value::Null))
                        .collect();
                    (k.clone(), median_value(&at))
                })
                .collect(),
        ),
        Value::Number(_) => {
            if let Some(ints) = values.iter().map(Value::as_i64).collect::<Option<Vec<_>>>() {
                json!(median(ints, |a, b| (a + b) / 2))
            } else if let Some(xs) = values.iter().map(Value::as_f64).collect::<Option<Vec<_>>>() {
                json!(median(xs, |a, b| (a + b) / 2.0))
            } else {
                values[0].clone()
            }
        }
        other => other.clone(),
    }
}

/// The performance goals, checked against one run's figures.
pub fn goals(r: &BenchReport) -> Vec<Goal> {
    let goal = |goal: &str, value: f64, target: f64, at_least: bool| Goal {
        goal: goal.to_string(),
        value,
        target,
        met: if at_least {
            value >= target
        } else {
            value < target
        },
        per_round: Vec::new(),
    };
    let batch_raw = r.ratio_batch_to_lean_raw.unwrap_or(r.ratio_batch_to_raw);
    vec![
        goal(
            if r.ratio_batch_to_lean_raw.is_some() {
                "batch ingest / lean raw (100/tx)"
            } else {
                "batch ingest / raw (100/tx)"
            },
            batch_raw,
            0.5,
            true,
        ),
        goal(
            "track (empty) / raw (1/tx)",
            r.ratio_track_empty_to_single_commit,
            3.0,
            true,
        ),
        goal(
            "track (empty) p99 ms",
            r.track_ingest_empty_latency.p99_ms,
            50.0,
            false,
        ),
        goal("drain events/s", r.drain_events_per_sec, 10_000.0, true),
        goal("drain peak RSS MB", r.drain_peak_rss_mb, 100.0, false),
        goal(
            "distinct-user drain / batch ingest",
            r.ratio_drain_distinct_users_to_batch_ingest,
            0.5,
            true,
        ),
        goal(
            "identify batch / track batch",
            r.ratio_identify_to_track_batch,
            0.5,
            true,
        ),
        goal(
            "audience batch / track batch",
            r.ratio_audience_to_track_batch,
            0.5,
            true,
        ),
    ]
}

/// The report as a table a person reads.
pub fn format_report(r: &BenchReport, args: &BenchArgs) -> String {
    let lat = |l: &Latency| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50_ms, l.p99_ms, l.max_ms
        )
    };
    let mut out = String::new();
    let mut line = |label: String, figure: String| {
        out.push_str(&format!("{label:<44}{figure}\n"));
    };
    let rate = |v: f64, unit: &str| format!("{v:>12.0} {unit}");
    let ratio = |v: f64| format!("{v:>12.2}");
    line(
        "backend".into(),
        format!("{:>12}", format!("{} x{}", r.backend, r.instances)),
    );
    if r.rounds > 1 {
        line(
            "runs (each figure below is their median)".into(),
            format!("{:>12}", r.rounds),
        );
    }
    line(
        "raw SQLite, 100 rows/transaction".into(),
        rate(r.raw_sqlite_rows_per_sec_100_per_tx, "rows/s"),
    );
    line(
        "raw SQLite, 1 row/transaction".into(),
        rate(r.raw_sqlite_rows_per_sec_1_per_tx, "rows/s"),
    );
    line(
        "raw SQLite lean, 100 rows/transaction".into(),
        rate(r.raw_sqlite_lean_rows_per_sec_100_per_tx, "rows/s"),
    );
    if let Some(after) = r.raw_sqlite_rows_per_sec_100_per_tx_after {
        line(
            "raw SQLite, 100 rows/tx, after ingest".into(),
            rate(after, "rows/s"),
        );
    }
    if let Some(after) = r.raw_sqlite_lean_rows_per_sec_100_per_tx_after {
        line(
            "raw SQLite lean, 100 rows/tx, after ingest".into(),
            rate(after, "rows/s"),
        );
    }
    if let (Some(a), Some(b), Some(c)) = (
        r.raw_postgres_rows_per_sec_100_per_tx,
        r.raw_postgres_rows_per_sec_1_per_tx,
        r.raw_postgres_connections,
    ) {
        line(
            format!("raw PostgreSQL, 100 rows/tx, {c} conns"),
            rate(a, "rows/s"),
        );
        if let Some(after) = r.raw_postgres_rows_per_sec_100_per_tx_after {
            line(
                "raw PostgreSQL, 100 rows/tx, after ingest".into(),
                rate(after, "rows/s"),
            );
        }
        line(
            format!("raw PostgreSQL, 1 row/tx, {c} conns"),
            rate(b, "rows/s"),
        );
    }
    let with_lat = |v: f64, l: &Latency| format!("{}  {}", rate(v, "events/s"), lat(l));
    line(
        format!("/v1/batch x100, {} connections", args.batch_connections),
        with_lat(r.batch_ingest_events_per_sec, &r.batch_ingest_latency),
    );
    line(
        format!(
            "/v1/track, {} connections, empty outbox",
            args.track_connections
        ),
        with_lat(
            r.track_ingest_empty_events_per_sec,
            &r.track_ingest_empty_latency,
        ),
    );
    line(
        format!(
            "/v1/track, {} connections, at the backlog",
            args.track_connections
        ),
        with_lat(r.track_ingest_events_per_sec, &r.track_ingest_latency),
    );
    line(
        format!("/status at {} pending", r.backlog_events),
        format!("{:>12}  {}", "", lat(&r.status_latency)),
    );
    line(
        "startup with that backlog".into(),
        format!("{:>12.0} ms", r.startup_with_backlog_ms),
    );
    line(
        "drain to mock ChurnZero".into(),
        format!(
            "{}  peak RSS {:.1} MB",
            rate(r.drain_events_per_sec, "events/s"),
            r.drain_peak_rss_mb
        ),
    );
    line(
        format!(
            "identify x100 (ids), {} connections",
            args.identify_connections
        ),
        with_lat(r.identify_ingest_events_per_sec, &r.identify_ingest_latency),
    );
    line(
        format!("audience x100, {} connections", args.identify_connections),
        with_lat(r.audience_ingest_events_per_sec, &r.audience_ingest_latency),
    );
    line(
        format!("/v1/batch, {} distinct users", r.distinct_users_events),
        rate(r.distinct_users_ingest_events_per_sec, "events/s"),
    );
    line(
        "drain, every event its own user".into(),
        format!(
            "{}  peak RSS {:.1} MB",
            rate(r.drain_distinct_users_events_per_sec, "events/s"),
            r.drain_distinct_users_peak_rss_mb
        ),
    );
    line(
        "ratio batch ingest / raw (100/tx)".into(),
        ratio(r.ratio_batch_to_raw),
    );
    if let Some(lean) = r.ratio_batch_to_lean_raw {
        line("ratio batch ingest / lean raw (100/tx)".into(), ratio(lean));
    }
    line(
        "ratio track (empty outbox) / raw (1/tx)".into(),
        ratio(r.ratio_track_empty_to_single_commit),
    );
    line(
        "ratio track (at the backlog) / raw (1/tx)".into(),
        ratio(r.ratio_track_to_single_commit),
    );
    line(
        "ratio drain / batch ingest".into(),
        ratio(r.ratio_drain_to_batch_ingest),
    );
    line(
        "ratio distinct-user drain / batch ingest".into(),
        ratio(r.ratio_drain_distinct_users_to_batch_ingest),
    );
    line(
        "ratio identify / track batch".into(),
        ratio(r.ratio_identify_to_track_batch),
    );
    line(
        "ratio audience / track batch".into(),
        ratio(r.ratio_audience_to_track_batch),
    );
    // Where the CPU went: the forwarder, this process (the load generator,
    // or the raw writer's client), and the rest of the machine (a local
    // database server, the kernel).
    for (label, cost) in [
        ("CPU per row, raw 100 rows/tx", &r.cpu.raw_100_per_tx),
        ("CPU per row, raw 1 row/tx", &r.cpu.raw_1_per_tx),
        ("CPU per event, /v1/batch x100", &r.cpu.batch_ingest),
        (
            "CPU per event, /v1/track, empty outbox",
            &r.cpu.track_ingest_empty,
        ),
        ("CPU per event, drain", &r.cpu.drain),
    ] {
        if let Some(c) = cost {
            let forwarder = c
                .forwarder_us_per_event
                .map(|f| format!("forwarder {f:.1}, "))
                .unwrap_or_default();
            line(
                label.into(),
                format!(
                    "{:>9.1} µs  ({forwarder}bench {:.1}, rest {:.1}; machine {:.0}% busy)",
                    c.machine_us_per_event,
                    c.bench_us_per_event,
                    c.rest_us_per_event,
                    c.machine_busy * 100.0
                ),
            );
        }
    }
    for g in &r.goals {
        let runs = if g.per_round.is_empty() {
            String::new()
        } else {
            let each: Vec<String> = g
                .per_round
                .iter()
                .map(|v| goal_figure(*v, g.target))
                .collect();
            format!(" (runs: {})", each.join(" "))
        };
        line(
            format!("goal {}", g.goal),
            format!(
                "{:>12}  {} against {}{runs}",
                if g.met { "met" } else { "MISSED" },
                goal_figure(g.value, g.target),
                g.target
            ),
        );
    }
    out
}

/// A goal's figure to two decimals, or three where two would print the
/// target itself for a value on either side of it ("0.50 against 0.5",
/// missed, reads as a contradiction).
fn goal_figure(value: f64, target: f64) -> String {
    let two = format!("{value:.2}");
    if value != target && two.parse::<f64>() == Ok(target) {
        format!("{value:.3}")
    } else {
        two
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_next_to_its_target_gets_a_third_decimal() {
        assert_eq!(goal_figure(0.4966, 0.5), "0.497");
        assert_eq!(goal_figure(0.5031, 0.5), "0.503");
        assert_eq!(goal_figure(0.5, 0.5), "0.50");
        assert_eq!(goal_figure(0.4412, 0.5), "0.44");
        assert_eq!(goal_figure(9.3214, 50.0), "9.32");
    }

    #[test]
    fn the_median_is_taken_field_by_field() {
        let runs = [
            json!({"rate": 30.0, "n": 7, "lat": {"p99": 9.0}, "backend": "postgres", "raw": null}),
            json!({"rate": 10.0, "n": 7, "lat": {"p99": 1.0}, "backend": "postgres", "raw": null}),
            json!({"rate": 20.5, "n": 7, "lat": {"p99": 5.0}, "backend": "postgres", "raw": null}),
        ];
        assert_eq!(
            median_value(&runs),
            json!({"rate": 20.5, "n": 7, "lat": {"p99": 5.0}, "backend": "postgres", "raw": null})
        );
        // An even count: the mean of the middle two; integers stay integers.
        let two = [json!({"rate": 3.0, "n": 4}), json!({"rate": 1.0, "n": 8})];
        let m = median_value(&two);
        assert_eq!(m, json!({"rate": 2.0, "n": 6}));
        assert!(m["n"].is_i64());
    }
}
