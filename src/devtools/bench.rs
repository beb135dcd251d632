//! `bench`: sizes a deployment on this machine, in one run. It measures the
//! storage limit (raw SQLite inserts through the C API on the same disk), then
//! the real binary: durable ingest over HTTP (batch and single-event), status
//! latency at the resulting backlog, startup time with that backlog, and the
//! drain of the backlog to a mock ChurnZero with the forwarder's peak RSS.
//! The load generator is real concurrent HTTP over sockets.

use crate::devtools::mock_churnzero::{MockArgs, MockChurnZero};
use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::ffi::CString;
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
    /// Rows for the raw SQLite figure at 100 rows a transaction.
    #[arg(long, default_value_t = 500_000)]
    pub raw_rows: u64,
    /// Rows for the raw SQLite figure at one row a transaction.
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
}

/// Latency summary of a phase, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub raw_sqlite_rows_per_sec_100_per_tx: f64,
    pub raw_sqlite_rows_per_sec_1_per_tx: f64,
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
    pub ratio_batch_to_raw: f64,
    pub ratio_track_empty_to_single_commit: f64,
    pub ratio_track_to_single_commit: f64,
    pub ratio_drain_to_batch_ingest: f64,
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

/// Raw SQLite through its C API: outbox-shaped rows (same columns and
/// indexes as the events table), WAL, synchronous=FULL. This is the storage
/// ceiling the forwarder's figures are compared with.
fn raw_sqlite(path: &Path, rows: u64, per_tx: u64) -> anyhow::Result<f64> {
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
        exec(
            "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, \
             message_id TEXT NOT NULL, kind TEXT NOT NULL, order_key TEXT NOT NULL, payload TEXT NOT NULL, \
             state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, accepted_at INTEGER NOT NULL, \
             next_attempt_at INTEGER NOT NULL, first_attempt_at INTEGER, lease_until INTEGER, \
             finished_at INTEGER, last_error TEXT, reason TEXT, history TEXT);
             CREATE INDEX events_due ON events (next_attempt_at, id) WHERE state = 0;
             CREATE INDEX events_key ON events (order_key, id) WHERE state IN (0, 1, 4, 5);
             CREATE INDEX events_heads ON events (id) WHERE state = 0;
             CREATE INDEX events_dead ON events (id) WHERE state = 3;
             CREATE INDEX events_held ON events (id) WHERE state = 4;
             CREATE INDEX events_finished ON events (finished_at) WHERE state = 2;",
        )?;
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
        ffi::sqlite3_finalize(stmt);
        ffi::sqlite3_close(db);
        Ok(rows as f64 / elapsed.as_secs_f64())
    }
}

fn sample_event(i: u64, user: u64) -> Value {
    json!({"type": "track", "userId": format!("user-{user}"), "event": "Report Exported",
           "messageId": format!("bench-{i}"),
           "properties": {"quantity": 1, "description": format!("export {i}")},
           "context": {"traits": {"accountExternalId": format!("acct-{}", user % 50), "contactExternalId": format!("user-{user}")},
                       "library": {"name": "analytics-node", "version": "2.1.0"}}})
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
        db: &Path,
        churnzero: &str,
        deliver: bool,
    ) -> anyhow::Result<(Forwarder, Duration)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let exe = std::env::current_exe()?;
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
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if !deliver {
            cmd.arg("--no-delivery");
        }
        let started = Instant::now();
        let child = cmd.spawn().context("starting the forwarder")?;
        let base = format!("http://127.0.0.1:{port}");
        let fwd = Forwarder { child, base };
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", fwd.base)).send().await {
                if r.status().is_success() {
                    break;
                }
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

/// The body of one load request, written straight into a string: the load
/// generator shares the machine with the forwarder, so it should spend as
/// little CPU per request as it can. `batch` wraps the events in a /v1/batch
/// body; otherwise the body is the one /v1/track event.
fn request_body(first_id: u64, per_request: u64, batch: bool) -> String {
    use std::fmt::Write;
    let mut body = String::with_capacity(400 * per_request as usize + 16);
    let one = |body: &mut String, i: u64, with_type: bool| {
        let user = i % 10_000;
        let _ = write!(
            body,
            r#"{{{}"userId":"user-{user}","event":"Report Exported","messageId":"bench-{i}","properties":{{"quantity":1,"description":"export {i}"}},"context":{{"traits":{{"accountExternalId":"acct-{}","contactExternalId":"user-{user}"}},"library":{{"name":"analytics-node","version":"2.1.0"}}}}}}"#,
            if with_type { r#""type":"track","# } else { "" },
            user % 50,
        );
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

/// Sends `total` events from `connections` concurrent connections, `per_request`
/// at a time, and returns events/s and per-request latencies.
async fn load(
    base: &str,
    path: &str,
    total: u64,
    per_request: u64,
    connections: usize,
    first_id: u64,
) -> anyhow::Result<(f64, Latency)> {
    use base64::Engine;
    let next = Arc::new(AtomicU64::new(0));
    let requests = total.div_ceil(per_request);
    let host = base.trim_start_matches("http://").to_string();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let next = next.clone();
        let (host, auth, path) = (host.clone(), auth.clone(), path.to_string());
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
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!(
                "churnzero-forwarder-bench-{}",
                uuid::Uuid::new_v4()
            ));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let result = measure(&args, &dir).await;
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

async fn measure(args: &BenchArgs, dir: &Path) -> anyhow::Result<BenchReport> {
    say(
        args,
        &format!("raw SQLite, {} rows at 100 a transaction", args.raw_rows),
    );
    let raw_dir = dir.to_path_buf();
    let (raw_rows, raw_single) = (args.raw_rows, args.raw_single_rows);
    let raw100 =
        tokio::task::spawn_blocking(move || raw_sqlite(&raw_dir.join("raw100.db"), raw_rows, 100))
            .await??;
    say(
        args,
        &format!(
            "raw SQLite, {} rows at one a transaction",
            args.raw_single_rows
        ),
    );
    let raw_dir = dir.to_path_buf();
    let raw1 =
        tokio::task::spawn_blocking(move || raw_sqlite(&raw_dir.join("raw1.db"), raw_single, 1))
            .await??;
    for f in ["raw100.db", "raw1.db"] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.join(format!("{f}{suffix}")));
        }
    }

    let mock = MockChurnZero::start(MockArgs {
        listen: "127.0.0.1:0".parse()?,
        quiet: true,
        ..MockArgs::default()
    })
    .await?;
    mock.state().set_count_only(true);

    let fresh_db = dir.join("track-fresh.db");
    let (fwd, _) = Forwarder::start(&fresh_db, &mock.url(), false).await?;
    say(
        args,
        &format!(
            "durable ingest into an empty outbox: {} events through /v1/track, {} connections",
            args.track_events, args.track_connections
        ),
    );
    let (track_empty_rate, track_empty_lat) = load(
        &fwd.base,
        "/v1/track",
        args.track_events,
        1,
        args.track_connections,
        args.events + args.track_events,
    )
    .await?;
    fwd.stop().await;
    for suffix in ["", "-wal", "-shm", "-reserve"] {
        let _ = std::fs::remove_file(dir.join(format!("track-fresh.db{suffix}")));
    }

    let db = dir.join("bench.db");
    let (fwd, _) = Forwarder::start(&db, &mock.url(), false).await?;
    say(
        args,
        &format!(
            "durable ingest: {} events through /v1/batch, 100 a request, {} connections",
            args.events, args.batch_connections
        ),
    );
    let (batch_rate, batch_lat) = load(
        &fwd.base,
        "/v1/batch",
        args.events,
        100,
        args.batch_connections,
        0,
    )
    .await?;
    say(
        args,
        &format!(
            "durable ingest at the backlog: {} events through /v1/track, {} connections",
            args.track_events, args.track_connections
        ),
    );
    let (track_rate, track_lat) = load(
        &fwd.base,
        "/v1/track",
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
        let r = http.get(format!("{}/status", fwd.base)).send().await?;
        let _ = r.bytes().await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let status_lat = latency(samples);
    let backlog = fwd.status().await?["pending"].as_i64().unwrap_or(0);
    fwd.stop().await;

    say(
        args,
        &format!("drain: {backlog} events to the mock ChurnZero"),
    );
    let (fwd, startup) = Forwarder::start(&db, &mock.url(), true).await?;
    let started = Instant::now();
    loop {
        let s = fwd.status().await?;
        if s["pending"].as_i64() == Some(0) && s["in_flight"].as_i64() == Some(0) {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("drain did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_time = started.elapsed();
    let drained = fwd.status().await?["delivered"].as_i64().unwrap_or(0);
    let rss = fwd.peak_rss_mb();
    fwd.stop().await;
    mock.shutdown().await;
    if drained < backlog {
        bail!("drained {drained} of {backlog} events");
    }
    let drain_rate = backlog as f64 / drain_time.as_secs_f64();
    Ok(BenchReport {
        raw_sqlite_rows_per_sec_100_per_tx: raw100,
        raw_sqlite_rows_per_sec_1_per_tx: raw1,
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
        ratio_batch_to_raw: batch_rate / raw100,
        ratio_track_empty_to_single_commit: track_empty_rate / raw1,
        ratio_track_to_single_commit: track_rate / raw1,
        ratio_drain_to_batch_ingest: drain_rate / batch_rate,
    })
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
    out.push_str(&format!(
        "{:<44}{:>12.0} rows/s\n",
        "raw SQLite, 100 rows/transaction", r.raw_sqlite_rows_per_sec_100_per_tx
    ));
    out.push_str(&format!(
        "{:<44}{:>12.0} rows/s\n",
        "raw SQLite, 1 row/transaction", r.raw_sqlite_rows_per_sec_1_per_tx
    ));
    out.push_str(&format!(
        "{:<44}{:>12.0} events/s  {}\n",
        format!("/v1/batch x100, {} connections", args.batch_connections),
        r.batch_ingest_events_per_sec,
        lat(&r.batch_ingest_latency)
    ));
    out.push_str(&format!(
        "{:<44}{:>12.0} events/s  {}\n",
        format!(
            "/v1/track, {} connections, empty outbox",
            args.track_connections
        ),
        r.track_ingest_empty_events_per_sec,
        lat(&r.track_ingest_empty_latency)
    ));
    out.push_str(&format!(
        "{:<44}{:>12.0} events/s  {}\n",
        format!(
            "/v1/track, {} connections, at the backlog",
            args.track_connections
        ),
        r.track_ingest_events_per_sec,
        lat(&r.track_ingest_latency)
    ));
    out.push_str(&format!(
        "{:<44}{:>12}  {}\n",
        format!("/status at {} pending", r.backlog_events),
        "",
        lat(&r.status_latency)
    ));
    out.push_str(&format!(
        "{:<44}{:>12.0} ms\n",
        "startup with that backlog", r.startup_with_backlog_ms
    ));
    out.push_str(&format!(
        "{:<44}{:>12.0} events/s  peak RSS {:.1} MB\n",
        "drain to mock ChurnZero", r.drain_events_per_sec, r.drain_peak_rss_mb
    ));
    out.push_str(&format!(
        "{:<44}{:>12.2}\n",
        "ratio batch ingest / raw (100/tx)", r.ratio_batch_to_raw
    ));
    out.push_str(&format!(
        "{:<44}{:>12.2}\n",
        "ratio track (empty outbox) / raw (1/tx)", r.ratio_track_empty_to_single_commit
    ));
    out.push_str(&format!(
        "{:<44}{:>12.2}\n",
        "ratio track (at the backlog) / raw (1/tx)", r.ratio_track_to_single_commit
    ));
    out.push_str(&format!(
        "{:<44}{:>12.2}\n",
        "ratio drain / batch ingest", r.ratio_drain_to_batch_ingest
    ));
    out
}
