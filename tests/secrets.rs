//! Secrets stay secret: the real binary runs with everything logged
//! (`RUST_LOG=debug`, trace for this crate and for sqlx's statements) through
//! ChurnZero failures that echo the request (app key included) back, dead
//! letters, rejected write keys, bad bodies and admin calls with wrong and
//! right tokens. Then every log line, `/status`, `/metrics`, `/admin/dead`
//! and the CLI's `status` and `dead` output are searched for the app key,
//! the write key and the admin token, raw and in their Basic-auth form.

mod common;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post as route_post;
use base64::Engine;
use common::*;
use serde_json::{Value, json};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A ChurnZero that misbehaves in the worst way for secrets: its error
/// answers echo the whole request body (where the app key is). Events named
/// `Poison` get a 400, the first two other requests a 500, the rest 200.
async fn echoing_churnzero() -> (String, Arc<AtomicUsize>) {
    let delivered = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let d = delivered.clone();
    let app = Router::new().route(
        "/i",
        route_post(move |body: String| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let d = d.clone();
            async move {
                if body.contains("\"Poison\"") {
                    (StatusCode::BAD_REQUEST, format!("bad request: {body}"))
                } else if n < 2 {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("oops, got {body}"),
                    )
                } else {
                    let actions: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
                    d.fetch_add(actions.len(), Ordering::SeqCst);
                    (StatusCode::OK, String::new())
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, delivered)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every form in which a secret could leak.
fn forbidden() -> Vec<(String, &'static str)> {
    vec![
        (APP_KEY.to_string(), "app key"),
        (WRITE_KEY.to_string(), "write key"),
        (ADMIN_TOKEN.to_string(), "admin token"),
        (b64(&format!("{WRITE_KEY}:")), "write key (Basic)"),
        (b64(WRITE_KEY), "write key (Basic, no colon)"),
        (b64(APP_KEY), "app key (base64)"),
    ]
}

fn assert_clean(what: &str, text: &str) {
    for (secret, name) in forbidden() {
        if let Some(at) = text.find(&secret) {
            let start = at.saturating_sub(200);
            let end = (at + secret.len() + 100).min(text.len());
            panic!(
                "{name} found in {what}: ...{}...",
                text.get(start..end).unwrap_or("(not on a char boundary)")
            );
        }
    }
}

/// GETs with the admin token (dead-letter reads need it; the open
/// endpoints ignore it).
async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn post_raw(url: &str, auth: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.body(body.to_vec()).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn cli(args: &[&str], db: &std::path::Path) -> String {
    let out = Command::new(binary_path())
        .args(args)
        .arg("--database")
        .arg(db)
        .env("RUST_LOG", "trace")
        .output()
        .expect("cli runs");
    assert!(out.status.success(), "{args:?}: {out:?}");
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_logs_status_metrics_or_cli_output() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let (url, delivered) = echoing_churnzero().await;
    let mut bin = Binary::serve_with_env(
        &db,
        &url,
        &["--batch-size", "10", "--admin-token", ADMIN_TOKEN],
        &[(
            "RUST_LOG",
            "debug,churnzero_forwarder=trace,sqlx=trace,tower_http=trace",
        )],
    )
    .await;
    let base = bin.base.clone();
    let mut answers = Vec::new();

    // Good events (they meet two echoing 500s first) and a poison event
    // (an echoing 400, then dead).
    let basic = format!("Basic {}", b64(&format!("{WRITE_KEY}:")));
    for i in 0..3 {
        let (s, v) = post(&base, "/v1/track", &track("u1", "Good", i)).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = post(&base, "/v1/track", &track("u2", "Poison", 0)).await;
    assert_eq!(s, 200, "{v}");
    // The write key in the body instead of a header.
    let mut body = track("u3", "Good", 9);
    body["writeKey"] = json!(WRITE_KEY);
    answers.push(
        post_raw(
            &format!("{base}/v1/track"),
            None,
            body.to_string().as_bytes(),
        )
        .await,
    );
    assert_eq!(answers.last().unwrap().0, 200);

    // Rejections: wrong keys, bad bodies carrying the key, invalid events.
    let wrong = format!("Basic {}", b64("wrong-key:"));
    for (auth, body) in [
        (
            Some(wrong.as_str()),
            b"{\"userId\":\"u\",\"event\":\"E\"}".to_vec(),
        ),
        (
            None,
            format!("{{\"writeKey\": \"{WRITE_KEY}x\", \"userId\": \"u\", \"event\": \"E\"}}")
                .into_bytes(),
        ),
        (
            None,
            format!("{{\"writeKey\": \"{WRITE_KEY}\", \"userId\": ").into_bytes(),
        ),
        (
            Some(basic.as_str()),
            format!("{{\"writeKey\": \"{WRITE_KEY}\", \"userId\": ").into_bytes(),
        ),
        (
            Some(basic.as_str()),
            format!("{{\"writeKey\": \"{WRITE_KEY}\", \"type\": \"bogus\"}}").into_bytes(),
        ),
        (Some("Bearer test-write-key"), b"{}".to_vec()),
    ] {
        let answer = post_raw(&format!("{base}/v1/track"), auth, &body).await;
        assert!((400..500).contains(&answer.0), "{answer:?}");
        answers.push(answer);
    }
    answers.push(
        post_raw(
            &format!("{base}/v1/batch"),
            Some(&basic),
            json!({"writeKey": WRITE_KEY, "batch": [{"type": "nope", "userId": "u"}]})
                .to_string()
                .as_bytes(),
        )
        .await,
    );

    // Delivery settles: 4 good events delivered, the poison one dead.
    wait_status(&base, "dead", 1).await;
    wait_for("good events delivered", Duration::from_secs(30), || {
        let n = delivered.load(Ordering::SeqCst);
        async move { (n >= 4).then_some(()) }
    })
    .await;

    // Admin calls with a wrong token and the right one.
    for token in ["wrong-token", ADMIN_TOKEN] {
        let r = client()
            .post(format!("{base}/admin/dead/replay"))
            .bearer_auth(token)
            .json(&json!({"all": true}))
            .send()
            .await
            .unwrap();
        answers.push((r.status().as_u16(), r.text().await.unwrap()));
    }
    assert_eq!(answers[answers.len() - 2].0, 401);
    assert_eq!(answers[answers.len() - 1].0, 200);
    // The replayed poison event dies again.
    wait_for("the replay to die again", Duration::from_secs(30), || {
        let base = base.clone();
        async move {
            let s = status(&base).await;
            (s["dead"] == json!(1) && s["pending"] == json!(0) && s["in_flight"] == json!(0))
                .then_some(())
        }
    })
    .await;

    // What operators see over HTTP.
    let dead_list = get_text(&format!("{base}/admin/dead")).await;
    let dead: Value = serde_json::from_str(&dead_list).unwrap();
    let first = dead
        .as_array()
        .or_else(|| dead["items"].as_array())
        .or_else(|| dead["dead"].as_array())
        .and_then(|a| a.first())
        .unwrap_or_else(|| panic!("a dead letter listed: {dead_list}"))
        .clone();
    let id = first["id"].as_i64().unwrap();
    let reason = first["reason"].as_str().unwrap();
    assert!(
        reason.contains("400") && reason.contains("***"),
        "the echoed app key is redacted, not dropped: {reason}"
    );
    let mut outputs = vec![
        (
            "/status".to_string(),
            get_text(&format!("{base}/status")).await,
        ),
        (
            "/metrics".to_string(),
            get_text(&format!("{base}/metrics")).await,
        ),
        ("/admin/dead".to_string(), dead_list.clone()),
        (
            format!("/admin/dead/{id}"),
            get_text(&format!("{base}/admin/dead/{id}")).await,
        ),
    ];
    for (i, (status, body)) in answers.iter().enumerate() {
        outputs.push((format!("answer {i} ({status})"), body.clone()));
    }

    // Stop the server, then the offline CLI.
    bin.sigterm();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = bin.child.wait();
        bin
    })
    .await
    .map(|b| {
        outputs.push(("server log".to_string(), b.logs()));
    });
    let id_text = id.to_string();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["dead", "list"],
        vec!["dead", "list", "--json"],
        vec!["dead", "show", id_text.as_str()],
    ] {
        outputs.push((format!("cli {args:?}"), cli(&args, &db)));
    }

    let log = &outputs.iter().find(|(w, _)| w == "server log").unwrap().1;
    assert!(
        log.lines().count() > 100 && log.contains("DEBUG") && log.contains("TRACE"),
        "the log really ran at debug and trace ({} lines)",
        log.lines().count()
    );
    assert!(log.contains("HTTP 500"), "the echoing failures were logged");
    for (what, text) in &outputs {
        assert_clean(what, text);
    }
}
