//! Shared test harness: a real mock ChurnZero, a real forwarder (in-process
//! over real sockets, or the real binary as a child process), a real SQLite
//! file, and waits on observable state rather than sleeps.
#![allow(dead_code)]

use churnzero_forwarder::config::{LogFormat, Settings};
use churnzero_forwarder::mock_churnzero::{MockArgs, MockChurnZero};
use churnzero_forwarder::secret::Secret;
use churnzero_forwarder::server::Server;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const WRITE_KEY: &str = "test-write-key";
pub const APP_KEY: &str = "test-app-key-5ecret";
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub async fn mock() -> MockChurnZero {
    MockChurnZero::start(MockArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        fail_rate: 0.0,
        fail_status: 503,
        latency: Duration::ZERO,
        quiet: true,
    })
    .await
    .expect("mock starts")
}

/// Settings tuned for tests: short flush and retry delays.
pub fn settings(db: &Path, churnzero_url: &str) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: db.to_path_buf(),
        write_keys: vec![Secret::new(WRITE_KEY)],
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        churnzero_url: churnzero_url.trim_end_matches('/').to_string(),
        churnzero_app_key: Secret::new(APP_KEY),
        workers: 4,
        batch_size: 100,
        flush_interval: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        retry_budget: Duration::from_secs(3600),
        sync_interval: Duration::from_secs(7200),
        sync_max_per_minute: 6000,
        dedup_window: Duration::from_secs(86400),
        retention: Duration::from_secs(86400),
        max_backlog: 10_000_000,
        mapping: None,
        log_format: LogFormat::Text,
        deliver: true,
        maintenance_interval: Duration::from_millis(200),
        clients: Default::default(),
        listener: Default::default(),
    }
}

pub async fn start(settings: Settings) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Server::start(settings, listener)
        .await
        .expect("server starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// POSTs a JSON body with Basic auth (`key:`), returning status and JSON.
pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v)
}

pub async fn status(base: &str) -> Value {
    client()
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `check` until it returns Some or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `/status` shows `field == n`.
pub async fn wait_status(base: &str, field: &str, n: i64) -> Value {
    let mut last = Value::Null;
    let started = Instant::now();
    loop {
        if let Ok(r) = client().get(format!("{base}/status")).send().await {
            if let Ok(s) = r.json::<Value>().await {
                if s[field].as_i64() == Some(n) {
                    return s;
                }
                last = s;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            panic!("timed out waiting for {field} == {n}; last status {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn track(user: &str, event: &str, n: usize) -> Value {
    json!({"type": "track", "userId": user, "event": event,
           "properties": {"description": format!("{event} #{n}"), "seq": n},
           "context": {"traits": {"accountExternalId": "acct-1", "contactExternalId": user}}})
}

pub fn identify(user: &str, account: &str) -> Value {
    json!({"type": "identify", "userId": user,
           "traits": {"email": format!("{user}@example.com"), "accountExternalId": account}})
}

/// The real binary, as a child process.
pub struct Binary {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

pub fn binary_path() -> &'static str {
    env!("CARGO_BIN_EXE_churnzero-forwarder")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Binary {
    /// Starts `serve` on a free port and waits for `/readyz`.
    pub async fn serve(db: &Path, churnzero_url: &str, extra: &[&str]) -> Binary {
        Binary::serve_with_env(db, churnzero_url, extra, &[]).await
    }

    pub async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(r) = client().get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "binary exited early with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!(
                    "binary not ready: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        send_signal(self.child.id() as i32, "TERM");
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal with the `kill` command (no libc dependency needed).
pub fn send_signal(pid: i32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

impl Binary {
    /// Like [`Binary::serve`], with extra environment variables (for example
    /// `RUST_LOG`) and without the admin token unless `extra` passes one.
    pub async fn serve_with_env(
        db: &Path,
        churnzero_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Binary {
        let port = free_port();
        let log = db.with_extension(format!("log.{port}"));
        let logfile = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(binary_path());
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--database")
            .arg(db)
            .args([
                "--write-key",
                WRITE_KEY,
                "--churnzero-url",
                churnzero_url,
                "--churnzero-app-key",
                APP_KEY,
            ])
            .args([
                "--flush-interval",
                "50ms",
                "--retry-initial",
                "50ms",
                "--retry-max",
                "500ms",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logfile);
        let child = cmd.spawn().expect("binary starts");
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Binary { child, base, log };
        b.wait_ready().await;
        b
    }
}

/// Runs the real binary with `args` to completion, without blocking the
/// runtime (an in-process mock or server keeps serving meanwhile):
/// (exit code, stdout, stderr).
pub async fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary_path())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Event name the operator scenario's mock rejects with a 400.
pub const POISON: &str = "Poison Pill";

/// Makes the mock reject (400) every request holding a [`POISON`] event.
pub fn poison_mock(mock: &MockChurnZero) {
    mock.state()
        .set_faults(churnzero_forwarder::mock_churnzero::Faults {
            poison_event_name: Some(POISON.into()),
            ..Default::default()
        });
}

/// What [`operator_scenario`] leaves in the outbox once it settles.
pub struct Scenario {
    pub accepted: i64,
    pub delivered: i64,
    pub dead: i64,
    pub held: i64,
    pub pending: i64,
    pub filtered: i64,
    pub duplicates: i64,
    pub rejected: i64,
    /// Requests answered 200, 400 and 401.
    pub ok_requests: i64,
    pub bad_requests: i64,
    pub unauthorized_requests: i64,
}

/// A known mix for operator tests (the mock must be poisoned with
/// [`poison_mock`]): 6 delivered, 2 dead (poison, user `u-poison`), 1 held
/// (user `nobody` has no ids) with 2 pending queued behind it, 1 filtered,
/// 1 duplicate, 2 rejected. The two queued behind the held event count
/// as held too (none can be sent before it): `held` 3, `pending` 0.
/// Waits until delivery has settled.
pub async fn operator_scenario(base: &str) -> Scenario {
    let mut batch: Vec<Value> = (1..=5).map(|n| track("u-good", "Good", n)).collect();
    batch.push(track("u-poison", POISON, 1));
    batch.push(track("u-poison", POISON, 2));
    for n in 1..=3 {
        batch.push(json!({"type": "track", "userId": "nobody", "event": "Unknown", "properties": {"seq": n}}));
    }
    batch.push(
        json!({"type": "track", "userId": "u-filtered", "event": "Filtered",
                      "integrations": {"All": false}}),
    );
    batch.push(json!({"type": "track", "userId": "u-invalid"}));
    let (code, body) = post(base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["rejected"].as_array().map(Vec::len), Some(1), "{body}");

    let mut dup = track("u-dup", "Good", 9);
    dup["messageId"] = json!("dup-1");
    for _ in 0..2 {
        let (code, body) = post(base, "/v1/track", &dup).await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, _) = post(base, "/v1/track", &json!({"userId": "u-x"})).await;
    assert_eq!(code, 400);
    let r = client()
        .post(format!("{base}/v1/track"))
        .basic_auth("wrong-key", Some(""))
        .json(&track("u-x", "E", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let s = Scenario {
        accepted: 11,
        delivered: 6,
        dead: 2,
        held: 3,
        pending: 0,
        filtered: 1,
        duplicates: 1,
        rejected: 2,
        ok_requests: 3,
        bad_requests: 1,
        unauthorized_requests: 1,
    };
    wait_status(base, "delivered", s.delivered).await;
    wait_status(base, "dead", s.dead).await;
    wait_status(base, "held", s.held).await;
    wait_status(base, "pending", s.pending).await;
    wait_status(base, "in_flight", 0).await;
    s
}

impl Binary {
    /// Peak resident memory of the process so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
