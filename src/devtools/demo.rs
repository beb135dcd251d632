//! `demo`: what a newcomer runs first. Starts a mock ChurnZero and the
//! forwarder on free ports with a temporary database, sends identify, group
//! and track calls through the real HTTP ingest, waits for delivery, and
//! prints what ChurnZero received and the final status.

use crate::config::{LogFormat, Settings};
use crate::devtools::mock_churnzero::{MockArgs, MockChurnZero};
use crate::secret::Secret;
use crate::server::Server;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Users to simulate; each is identified, joins an account and tracks events.
    #[arg(long, default_value_t = 3)]
    pub users: usize,
    /// Track calls per user.
    #[arg(long, default_value_t = 5)]
    pub events_per_user: usize,
    /// Share of mock ChurnZero requests that fail with 503, to watch retries.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Give up waiting for delivery after this long.
    #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

const DEMO_WRITE_KEY: &str = "demo-write-key";
const DEMO_APP_KEY: &str = "demo-app-key";

fn sample_traffic(users: usize, events_per_user: usize) -> Vec<Value> {
    let mut batch = Vec::new();
    for u in 0..users {
        let user = format!("user-{}", u + 1);
        let account = format!("acct-{}", u % 2 + 1);
        batch.push(json!({"type": "identify", "userId": user, "traits": {
            "firstName": format!("Ada{}", u + 1), "lastName": "Lovelace",
            "email": format!("{user}@example.com"), "plan": "pro",
            "accountExternalId": account, "contactExternalId": user}}));
        batch.push(json!({"type": "group", "userId": user, "groupId": account,
            "traits": {"name": format!("Account {}", u % 2 + 1), "employees": 42}}));
        for e in 0..events_per_user {
            batch.push(
                json!({"type": "track", "userId": user, "event": "Report Exported",
                "properties": {"quantity": e + 1, "description": format!("export #{}", e + 1)}}),
            );
        }
    }
    batch
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    crate::cli::init_logging(LogFormat::Text);
    let dir =
        std::env::temp_dir().join(format!("churnzero-forwarder-demo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let mock = MockChurnZero::start(MockArgs {
        listen: "127.0.0.1:0".parse()?,
        fail_rate: args.fail_rate,
        fail_status: 503,
        latency: Duration::ZERO,
        quiet: false,
        ..MockArgs::default()
    })
    .await
    .context("starting the mock ChurnZero")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let settings = Settings {
        listen: listener.local_addr()?,
        database: dir.join("demo.db"),
        write_keys: vec![Secret::new(DEMO_WRITE_KEY)],
        admin_token: None,
        churnzero_url: mock.url(),
        churnzero_app_key: Secret::new(DEMO_APP_KEY),
        workers: 4,
        adaptive_concurrency: true,
        max_actions_per_second: 0,
        batch_size: 100,
        flush_interval: Duration::from_millis(200),
        request_timeout: Duration::from_secs(5),
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(2),
        retry_budget: Duration::from_secs(3600),
        sync_interval: Duration::from_secs(7200),
        sync_max_per_minute: 6000,
        dedup_window: Duration::from_secs(86400),
        retention: Duration::from_secs(86400),
        max_backlog: 10_000_000,
        mapping: None,
        log_format: LogFormat::Text,
        deliver: true,
        maintenance_interval: Duration::from_secs(5),
        clients: Default::default(),
        listener: Default::default(),
    };
    let server = Server::start(settings, listener).await?;
    let base = format!("http://{}", server.addr);
    println!("mock ChurnZero listening on {}", mock.url());
    println!(
        "forwarder listening on {base} (database {})",
        dir.join("demo.db").display()
    );

    let http = reqwest::Client::new();
    let traffic = sample_traffic(args.users, args.events_per_user);
    let sent = traffic.len();
    let response = http
        .post(format!("{base}/v1/batch"))
        .basic_auth(DEMO_WRITE_KEY, Some(""))
        .json(&json!({ "batch": traffic }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    println!("POST /v1/batch with {sent} events -> {status} {body}");
    if !status.is_success() {
        bail!("ingest refused the demo batch");
    }
    // One more the way a single-call library sends it.
    let one = http
        .post(format!("{base}/v1/track"))
        .basic_auth(DEMO_WRITE_KEY, None::<&str>)
        .json(&json!({"userId": "user-1", "event": "Demo Finished"}))
        .send()
        .await?;
    println!("POST /v1/track -> {}", one.status());
    let expected = sent as i64 + 1;

    let started = Instant::now();
    let status = loop {
        let s: Value = http
            .get(format!("{base}/status"))
            .send()
            .await?
            .json()
            .await?;
        if s["delivered"].as_i64() == Some(expected) {
            break s;
        }
        if started.elapsed() > args.timeout {
            bail!(
                "not everything was delivered within {:?}: {s}",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "\nChurnZero received {} actions in {} requests:",
        mock.state().actions().len(),
        mock.state().request_count()
    );
    for action in mock.state().actions() {
        let mut shown = action.clone();
        if let Some(obj) = shown.as_object_mut() {
            obj.insert("appKey".into(), json!("***"));
        }
        println!("  {shown}");
    }
    let status: crate::outbox::OutboxStatus =
        serde_json::from_value(status).context("reading GET /status")?;
    println!(
        "\nfinal status (GET /status; `status --json` prints it as JSON):\n\n{}",
        crate::cli::format_status(&status)
    );
    println!(
        "\ndelivered {expected} of {expected} events in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    server.shutdown().await;
    mock.shutdown().await;
    Ok(())
}
