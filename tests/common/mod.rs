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
        ..MockArgs::default()
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
        adaptive_concurrency: true,
        max_actions_per_second: 0,
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

/// The Prometheus exposition of the server at `base`.
pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One unlabelled sample of the server's `/metrics`, named without the
/// `churnzero_forwarder_` prefix. Every documented series is exported from
/// the first scrape, so a missing one fails the test.
pub async fn metric(base: &str, name: &str) -> f64 {
    let text = metrics_text(base).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("churnzero_forwarder_{name} ")))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
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

/// Waits until every acknowledged event (by its `description`, the tests'
/// unique event label) has reached the mock: the "nothing acknowledged is
/// lost" check of the crash, restart and multi-instance tests.
pub async fn wait_all_acked_at_mock(
    state: &churnzero_forwarder::mock_churnzero::MockState,
    acked: &std::collections::HashSet<String>,
    timeout: Duration,
) {
    wait_for("every acknowledged event at the mock", timeout, || {
        let got: std::collections::HashSet<String> = state
            .actions()
            .iter()
            .filter_map(|a| a["description"].as_str().map(String::from))
            .collect();
        async move { acked.is_subset(&got).then_some(()) }
    })
    .await;
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

/// A port for a child process to bind, for callers that must name one up
/// front; [`Binary::serve`] needs none (its child binds port 0). Ports come
/// from below the kernel's ephemeral range, where the `bind(:0)` of the
/// in-process servers and mocks and the local ends of outgoing connections
/// never land, and each is handed out once per test binary, so two tests of
/// one binary never race for the same port. A port is checked free when it
/// is handed out; a process outside this test binary can still take it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    if ephemeral_low <= LOW + 1000 {
        // No room below the ephemeral range: let the kernel choose.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = ephemeral_low - LOW;
    // Test binaries of other runs start elsewhere in the range.
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (offset + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {ephemeral_low}");
}

/// The TCP port a process is listening on, read from /proc (its socket
/// inodes against the LISTEN entries of /proc/net/tcp{,6}): how the harness
/// learns the port a child bound with `--listen 127.0.0.1:0`, with no port
/// handed over between a probe and the child's bind, and whatever the
/// child's log level. `None` until the child listens.
pub fn listening_port(pid: u32) -> Option<u16> {
    let sockets: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let l = link.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local_address rem_address st ... uid timeout inode
                let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
                if *state != "0A" || !sockets.contains(*inode) {
                    return None;
                }
                u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
            })
        })
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
        if std::thread::panicking() {
            // A failing test keeps its child's log for whoever reads the failure.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "the forwarder's log is kept at {}",
                self.log.display()
            );
        } else if self.log.starts_with(url_log_dir()) {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Where the logs of children serving a `postgres://` database go: such a
/// database has no directory of its own to hold them beside it.
fn url_log_dir() -> PathBuf {
    std::env::temp_dir().join("churnzero-forwarder-test-logs")
}

/// The log file of the `n`th child of this test binary serving `db`: beside
/// a SQLite file, or under [`url_log_dir`] (removed with the child) for a URL.
pub fn log_path(db: &Path, n: u32) -> PathBuf {
    if churnzero_forwarder::outbox::postgres_url(db).is_none() {
        return db.with_extension(format!("log.{n}"));
    }
    let dir = url_log_dir();
    std::fs::create_dir_all(&dir).expect("log directory");
    dir.join(format!("{}-{n}.log", std::process::id()))
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
        let mut b = Binary::serve_spawn(db, churnzero_url, extra, env);
        b.wait_listening().await;
        b.wait_ready().await;
        b
    }

    /// Starts `serve` without waiting for anything.
    fn serve_spawn(db: &Path, churnzero_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Binary {
        use std::sync::atomic::{AtomicU32, Ordering};
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = log_path(db, n);
        let logfile = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(binary_path());
        // Port 0: the child binds a port of its own, read back from /proc,
        // so no other test can take it between a probe and the bind.
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
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
        Binary {
            child,
            base: String::new(),
            log,
        }
    }

    /// Like `serve`, but returns as soon as the port listens, before
    /// `/readyz` answers: for what a signal or a request does that early.
    pub async fn serve_listening(db: &Path, churnzero_url: &str) -> Binary {
        let mut b = Binary::serve_spawn(db, churnzero_url, &[], &[]);
        b.wait_listening().await;
        b
    }

    /// Waits until the child listens, and points `base` at its port.
    async fn wait_listening(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(port) = listening_port(self.child.id()) {
                self.base = format!("http://127.0.0.1:{port}");
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("binary exited early with {status}: {}", self.logs());
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("binary not listening after 30 s: {}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

// ---------------------------------------------------------------------------
// Outside programs the tests drive.
//
// `cargo test` needs a Rust toolchain, Python 3 with its `venv` module and
// Node 20 with npm; everything a package registry provides beyond that is
// installed by the tests themselves, on first use, under `target/test-deps/`
// (never into the source tree or the system):
//
// - [`python_with_segment`]: a virtualenv holding the pinned
//   segment-analytics-python;
// - [`node_compat_dir`]: `npm ci` of tests/compat's package.json and lock,
//   beside a copy of tests/compat's scripts.
//
// What needs root stays with `.ci/run`, which installs it: headless Chromium,
// found by [`chromium`]. Outside CI a test that needs it is skipped with one
// line on the terminal saying how to install it; under `CI=true` its absence
// fails the run, so CI never passes without running it.
//
// Each install is built in a directory of its own and published by writing
// `<name>.ready` (the install's stamp and directory) atomically once it is
// complete, so test threads and test binaries that ask at once never see a
// half-made install: a reader either finds a finished one or builds its own.
// Threads of one test binary wait for each other instead of racing. Deleting
// `target/test-deps/` starts over.
// ---------------------------------------------------------------------------

/// The segment-analytics-python release the compatibility tests pin.
pub const SEGMENT_PYTHON_VERSION: &str = "2.4.0";

/// `true` under `CI=true` (or `CI=1`), where a missing prerequisite fails the
/// run instead of skipping a test.
pub fn under_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true") | Ok("1")
    )
}

/// Writes straight to the terminal: libtest captures `eprintln!` of passing
/// tests, and a skip or a slow first install must be seen.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Skips the calling test (the caller returns) with one loud line outside
/// CI; under `CI=true` panics instead, so that CI cannot pass by skipping.
/// `missing` says what this machine lacks, `install` how to get it.
pub fn skip_outside_ci(missing: &str, install: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    if under_ci() {
        panic!("{test} cannot run: {missing}; CI=true forbids skipping it: {install}");
    }
    say(&format!("SKIPPED {test}: {missing}; {install} to run it"));
}

/// Headless Chromium for the browser tests: `$CHROMIUM`, else `chromium` or
/// `chromium-browser` on PATH. `None` (after [`skip_outside_ci`]'s line) means
/// the caller returns; under `CI=true` a missing browser panics here.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip_outside_ci(
            "headless Chromium is not installed",
            "install it with `apt-get install chromium` (as .ci/run does) or point $CHROMIUM at a binary",
        );
    }
    found
}

/// The cache of installed test prerequisites: `target/test-deps/` (beside
/// the profile directory that holds the binary under test).
pub fn test_deps_dir() -> PathBuf {
    Path::new(binary_path())
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("test-deps"))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps"))
}

/// tests/compat in the source tree: the client scripts and the npm manifest.
pub fn compat_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

/// Python with segment-analytics-python [`SEGMENT_PYTHON_VERSION`]
/// importable: `$PYTHON` when set (the caller vouches for it), else the
/// interpreter of a virtualenv under [`test_deps_dir`], made with
/// `python3 -m venv` and `pip install` on first use (a few seconds) and
/// reused after. Blocks while installing: call it before starting servers in
/// a current-thread runtime. Panics with what to install when Python 3 or
/// its venv module is missing, or the install fails.
pub fn python_with_segment() -> PathBuf {
    if let Some(p) = std::env::var_os("PYTHON") {
        return PathBuf::from(p);
    }
    let requirement = format!("segment-analytics-python=={SEGMENT_PYTHON_VERSION}");
    let venv = provisioned("python-segment", &requirement, |dir| {
        run_step(
            Command::new("python3").arg("-m").arg("venv").arg(dir),
            "python3 -m venv",
            "cargo test needs Python 3 with its venv module (Debian: `apt-get install python3 python3-venv`)",
        )?;
        let python = dir.join("bin/python");
        run_step(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("--no-input")
                .arg(&requirement),
            &format!("pip install {requirement}"),
            "the package index must be reachable",
        )?;
        run_step(
            Command::new(&python).args(["-c", "import segment.analytics"]),
            "import segment.analytics",
            "the installed package does not import",
        )
    });
    venv.join("bin/python")
}

/// A directory holding `node_modules` from `npm ci` of tests/compat's
/// package.json and package-lock.json, installed under [`test_deps_dir`] on
/// first use (and again when the lock changes), plus a copy of every other
/// file of tests/compat, refreshed at each call. Run a script as
/// `node <this dir>/<script>.mjs` so that its imports resolve here. Blocks
/// while installing; panics with what to install when npm is missing or
/// `npm ci` fails.
pub fn node_compat_dir() -> PathBuf {
    let src = compat_source_dir();
    let manifest = ["package.json", "package-lock.json"].map(|f| {
        std::fs::read(src.join(f)).unwrap_or_else(|e| panic!("reading tests/compat/{f}: {e}"))
    });
    use sha2::Digest;
    let stamp = format!(
        "npm ci {:x}",
        sha2::Sha256::new()
            .chain_update(&manifest[0])
            .chain_update(b"\0")
            .chain_update(&manifest[1])
            .finalize()
    );
    let dir = provisioned("node-compat", &stamp, |dir| {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        for (name, bytes) in ["package.json", "package-lock.json"].iter().zip(&manifest) {
            std::fs::write(dir.join(name), bytes).map_err(|e| format!("writing {name}: {e}"))?;
        }
        run_step(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(dir),
            "npm ci (tests/compat)",
            "cargo test needs Node 20 or later with npm (Debian: `apt-get install nodejs npm`) \
             and a reachable npm registry",
        )
    });
    for entry in std::fs::read_dir(&src).expect("reading tests/compat") {
        let path = entry.expect("reading tests/compat").path();
        let name = path.file_name().unwrap().to_owned();
        if !path.is_file() || name == "package.json" || name == "package-lock.json" {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let target = dir.join(&name);
        if std::fs::read(&target).ok().as_deref() != Some(&bytes[..]) {
            write_atomically(&target, &bytes);
        }
    }
    dir
}

/// Runs one install step, returning its output as the error when it fails.
fn run_step(cmd: &mut Command, what: &str, hint: &str) -> Result<(), String> {
    match cmd.stdin(Stdio::null()).output() {
        Err(e) => Err(format!("{what} could not be started ({e}): {hint}")),
        Ok(out) if !out.status.success() => Err(format!(
            "{what} failed ({}): {hint}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Ok(_) => Ok(()),
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it over
/// `path`, so a concurrent reader sees the old content or the new, whole.
fn write_atomically(path: &Path, bytes: &[u8]) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// The finished install `name` whose stamp is `stamp`, built with `build`
/// into a fresh directory when there is none (see the section comment).
fn provisioned(
    name: &str,
    stamp: &str,
    build: impl FnOnce(&Path) -> Result<(), String>,
) -> PathBuf {
    static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let root = test_deps_dir();
    let marker = root.join(format!("{name}.ready"));
    let finished = || {
        let text = std::fs::read_to_string(&marker).ok()?;
        let (done_stamp, dir) = text.split_once('\n')?;
        let dir = root.join(dir.trim());
        (done_stamp == stamp && dir.is_dir()).then_some(dir)
    };
    if let Some(dir) = finished() {
        return dir;
    }
    // One thread of this binary builds; the others wait and reuse it.
    let _one = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(dir) = finished() {
        return dir;
    }
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    remove_abandoned(&root, name);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir_name = format!("{name}-{}-{n}", std::process::id());
    let dir = root.join(&dir_name);
    let _ = std::fs::remove_dir_all(&dir);
    say(&format!(
        "installing test prerequisite {name} ({stamp}) into {} on first use",
        dir.display()
    ));
    if let Err(e) = build(&dir) {
        let _ = std::fs::remove_dir_all(&dir);
        panic!("could not install test prerequisite {name} ({stamp}): {e}");
    }
    write_atomically(&marker, format!("{stamp}\n{dir_name}\n").as_bytes());
    dir
}

/// Removes the build directories of `name` left by processes that are gone
/// (a killed run, a lost race), except the one the marker points at.
fn remove_abandoned(root: &Path, name: &str) {
    let current = std::fs::read_to_string(root.join(format!("{name}.ready"))).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&format!("{name}-")))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        let in_use = current.lines().nth(1) == file.to_str();
        if !alive && !in_use {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The PostgreSQL server the tests use (`FORWARDER_TEST_POSTGRES`, else the
/// local one), without a database name.
pub fn pg_server() -> String {
    std::env::var("FORWARDER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".into())
}

/// A PostgreSQL database of a test's own, dropped when it goes out of
/// scope, so PostgreSQL tests run in parallel.
pub struct PgDb {
    pub name: String,
}

impl PgDb {
    /// `None` (after one loud line) when no server answers; under `CI=true`
    /// a missing server fails the test instead.
    pub async fn create() -> Option<PgDb> {
        Self::create_with("").await
    }

    /// `create` with `CREATE DATABASE` options (a locale, say).
    pub async fn create_with(options: &str) -> Option<PgDb> {
        use sqlx::Connection;
        let admin = format!("{}/test", pg_server());
        let conn =
            tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&admin)).await;
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "connect timed out".into(),
                };
                if under_ci() {
                    panic!("PostgreSQL at {admin} is required under CI: {why}");
                }
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a test")
                    .to_string();
                say(&format!(
                    "SKIPPED {test}: PostgreSQL tests need a server at {admin} ({why})"
                ));
                return None;
            }
        };
        let name = format!("cfw_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name} {options}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        Some(PgDb { name })
    }

    /// The URL to give `--database`.
    pub fn url(&self) -> String {
        format!("{}/{}", pg_server(), self.name)
    }

    /// A connection for a test's own queries.
    pub async fn conn(&self) -> sqlx::PgConnection {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&self.url())
            .await
            .expect("connect")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) =
                    sqlx::PgConnection::connect(&format!("{}/test", pg_server())).await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Turns each test body taking `db: &Path` into two tests of the same
/// behaviour, one per outbox backend, so that a contract is proved on both
/// from one text: `<name>::sqlite` gets a fresh SQLite file in a temporary
/// directory, `<name>::postgres` the URL of a fresh [`PgDb`] (skipped with
/// one loud line without a server, failed under `CI=true`). The attributes
/// written above the body (the `#[tokio::test(..)]` flavour, docs) go on
/// both tests. The body must not assume a file: derive no paths from `db`.
///
/// ```ignore
/// on_both_backends! {
///     #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
///     async fn survives_a_restart(db: &Path) { /* ... */ }
/// }
/// ```
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$attr:meta])+ async fn $name:ident($db:ident: &Path) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($db: &::std::path::Path) $body

            $(#[$attr])+
            async fn sqlite() {
                let dir = ::tempfile::tempdir().unwrap();
                body(&dir.path().join("outbox.db")).await;
            }

            $(#[$attr])+
            async fn postgres() {
                let Some(pg) = $crate::common::PgDb::create().await else {
                    return;
                };
                body(::std::path::Path::new(&pg.url())).await;
            }
        }
    )*};
}

/// The outcome a worker would report for a claimed event, under its lease.
pub fn settlement(
    c: &churnzero_forwarder::outbox::ClaimedEvent,
    outcome: churnzero_forwarder::outbox::SettleOutcome,
) -> churnzero_forwarder::outbox::Settlement {
    churnzero_forwarder::outbox::Settlement {
        id: c.id,
        lease: c.lease,
        order_key: c.order_key.clone(),
        first_attempt_at: c.first_attempt_at,
        outcome,
        actions: None,
    }
}

/// Claims until `n` events are in hand. On PostgreSQL a claim steps over a
/// key whose lock another transaction holds (a heartbeat's lease recovery
/// running beside the test's own, say) and leaves it for the next claim, so
/// one claim right after a recovery may come back short; the next one takes
/// the rest. Fails if the `n` events are not claimable within 10 s.
pub async fn claim_n<F, Fut>(
    n: usize,
    mut claim: F,
) -> Vec<churnzero_forwarder::outbox::ClaimedEvent>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<
            Output = Result<
                Vec<churnzero_forwarder::outbox::ClaimedEvent>,
                churnzero_forwarder::outbox::StoreError,
            >,
        >,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(claim(n - got.len()).await.expect("claim"));
        if got.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} events became claimable",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    got
}
