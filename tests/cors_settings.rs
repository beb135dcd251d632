//! The public endpoint's client-facing parts over real sockets: CORS on the
//! ingest routes only, the settings endpoint the libraries fetch first, and
//! the one-letter paths with the bodies the browser and mobile libraries
//! send (text/plain, writeKey in the body, gzip, chunked).

mod clients_support;
mod common;

use churnzero_forwarder::ingest::ClientSettings;
use churnzero_forwarder::ingest::client_addr::TrustedProxies;
use churnzero_forwarder::ingest::cors::CorsOrigins;
use churnzero_forwarder::ingest::settings::PublicUrl;
use clients_support::*;
use common::*;
use serde_json::{Value, json};
use std::path::Path;

const ALLOWED: &str = "https://app.example.com";

async fn server_with(
    db: &Path,
    churnzero: &str,
    clients: ClientSettings,
) -> churnzero_forwarder::server::Server {
    let mut s = settings(db, churnzero);
    s.clients = clients;
    start(s).await
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn preflight(base: &str, path: &str, origin: &str) -> reqwest::RequestBuilder {
    client()
        .request(reqwest::Method::OPTIONS, format!("{base}{path}"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type,authorization,x-retry-count",
        )
}

#[tokio::test]
async fn cors_allows_listed_origins_refuses_others_and_never_covers_operator_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = server_with(
        &dir.path().join("o.db"),
        &mock.url(),
        ClientSettings {
            cors_origins: CorsOrigins::parse(&[ALLOWED, "http://localhost:3000"]).unwrap(),
            ..Default::default()
        },
    )
    .await;
    let base = format!("http://{}", server.addr);

    // Preflight from an allowed origin: 204, methods, headers, max-age.
    for path in ["/v1/t", "/v1/b", "/v1/batch", "/v1/projects/k/settings"] {
        let r = preflight(&base, path, ALLOWED).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 204, "{path}");
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some(ALLOWED),
            "{path}"
        );
        let methods = header(&r, "access-control-allow-methods")
            .unwrap()
            .to_ascii_uppercase();
        assert!(
            methods.contains("POST") && methods.contains("GET"),
            "{methods}"
        );
        let headers = header(&r, "access-control-allow-headers")
            .unwrap()
            .to_ascii_lowercase();
        for h in ["content-type", "authorization", "x-retry-count"] {
            assert!(headers.contains(h), "{headers}");
        }
        assert_eq!(header(&r, "access-control-max-age"), Some("7200"));
    }

    // The real request from the allowed origin: stored, and readable by
    // the page (origin echoed, 429 headers exposed).
    let r = client()
        .post(format!("{base}/v1/t"))
        .header("Origin", ALLOWED)
        .header("Content-Type", "text/plain")
        .body(json!({"writeKey": WRITE_KEY, "userId": "u1", "event": "Allowed"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), Some(ALLOWED));
    let exposed = header(&r, "access-control-expose-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-ratelimit-reset") && exposed.contains("retry-after"),
        "{exposed}"
    );

    // A refused origin: no CORS headers, 403, and nothing stored (a
    // text/plain post needs no preflight, so the browser would send it).
    let r = preflight(&base, "/v1/t", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(header(&r, "access-control-allow-origin").is_none());
    let r = client()
        .post(format!("{base}/v1/t"))
        .header("Origin", "https://evil.example")
        .header("Content-Type", "text/plain")
        .body(json!({"writeKey": WRITE_KEY, "userId": "u1", "event": "Refused"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(header(&r, "access-control-allow-origin").is_none());
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("origin"), "{body}");

    // Server libraries send no Origin: unaffected.
    let (code, _) = post(&base, "/v1/track", &track("u1", "Server", 1)).await;
    assert_eq!(code, 200);

    // Operator and admin paths never answer cross-origin.
    for path in ["/status", "/metrics", "/healthz", "/", "/admin/dead"] {
        let r = preflight(&base, path, ALLOWED).send().await.unwrap();
        assert!(
            header(&r, "access-control-allow-origin").is_none(),
            "{path}"
        );
        assert_ne!(r.status().as_u16(), 204, "{path}");
        let r = client()
            .get(format!("{base}{path}"))
            .header("Origin", ALLOWED)
            .send()
            .await
            .unwrap();
        assert!(
            header(&r, "access-control-allow-origin").is_none(),
            "{path}"
        );
        assert!(
            header(&r, "access-control-allow-credentials").is_none(),
            "{path}"
        );
    }

    // Exactly the two allowed events were stored.
    wait_status(&base, "accepted", 2).await;
    let events = stored_events(&dir.path().join("o.db")).await;
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Allowed", "Server"]);
    server.shutdown().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn default_cors_is_any_origin() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = start(settings(&dir.path().join("o.db"), &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let r = preflight(&base, "/v1/i", "http://localhost:8000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    let r = client()
        .get(format!("{base}/status"))
        .header("Origin", "http://localhost:8000")
        .send()
        .await
        .unwrap();
    assert!(header(&r, "access-control-allow-origin").is_none());
    server.shutdown().await;
    mock.shutdown().await;
}

async fn fetch_settings(base: &str, path: &str, headers: &[(&str, &str)]) -> (u16, Value, String) {
    let mut req = client().get(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

#[tokio::test]
async fn settings_point_the_libraries_at_the_forwarder() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = server_with(
        &dir.path().join("o.db"),
        &mock.url(),
        ClientSettings {
            trusted_proxies: TrustedProxies::parse(&["127.0.0.1"]).unwrap(),
            ..Default::default()
        },
    )
    .await;
    let base = format!("http://{}", server.addr);
    let host = server.addr.to_string();

    for path in [
        format!("/v1/projects/{WRITE_KEY}/settings"),
        format!("/projects/{WRITE_KEY}/settings"),
    ] {
        let (code, s, text) = fetch_settings(&base, &path, &[]).await;
        assert_eq!(code, 200, "{path}: {text}");
        let seg = &s["integrations"]["Segment.io"];
        assert_eq!(seg["apiKey"], WRITE_KEY);
        assert_eq!(seg["apiHost"], format!("{host}/v1"));
        assert_eq!(seg["protocol"], "http");
        // Nothing that would make a library load code or send elsewhere.
        assert_eq!(s["integrations"].as_object().unwrap().len(), 1, "{s}");
        assert_eq!(s["remotePlugins"], json!([]));
        assert_eq!(s["enabledMiddleware"], json!({}));
        assert_eq!(s["metrics"]["sampleRate"], 0);
        assert_eq!(s["plan"], json!({}));
        assert_eq!(s["legacyVideoPluginsEnabled"], false);
        // No secret: neither the app key nor the admin token.
        assert!(!text.contains(APP_KEY) && !text.contains(ADMIN_TOKEN));
    }

    // A trusted proxy (the test connects from 127.0.0.1) names the
    // public host and protocol.
    let (_, s, _) = fetch_settings(
        &base,
        &format!("/v1/projects/{WRITE_KEY}/settings"),
        &[
            ("X-Forwarded-Host", "events.example.com"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    .await;
    assert_eq!(
        s["integrations"]["Segment.io"]["apiHost"],
        "events.example.com/v1"
    );
    assert_eq!(s["integrations"]["Segment.io"]["protocol"], "https");

    // An unknown write key: 404, and the answer does not depend on the key
    // nor name any real one.
    let (code, a, text_a) = fetch_settings(&base, "/v1/projects/nope/settings", &[]).await;
    let (_, b, _) = fetch_settings(&base, "/projects/other-guess/settings", &[]).await;
    assert_eq!(code, 404);
    assert_eq!(a, b);
    assert!(
        !text_a.contains(WRITE_KEY) && !text_a.contains("nope"),
        "{text_a}"
    );
    server.shutdown().await;

    // Untrusted peers' forwarding headers are ignored.
    let server = start(settings(&dir.path().join("o2.db"), &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let (_, s, _) = fetch_settings(
        &base,
        &format!("/v1/projects/{WRITE_KEY}/settings"),
        &[
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    .await;
    assert_eq!(
        s["integrations"]["Segment.io"]["apiHost"],
        format!("{}/v1", server.addr)
    );
    assert_eq!(s["integrations"]["Segment.io"]["protocol"], "http");
    server.shutdown().await;

    // --public-url wins over everything the request says.
    let server = server_with(
        &dir.path().join("o3.db"),
        &mock.url(),
        ClientSettings {
            public_url: Some(PublicUrl::parse("https://events.example.com/segment/").unwrap()),
            ..Default::default()
        },
    )
    .await;
    let base = format!("http://{}", server.addr);
    let (_, s, _) = fetch_settings(&base, &format!("/projects/{WRITE_KEY}/settings"), &[]).await;
    assert_eq!(
        s["integrations"]["Segment.io"]["apiHost"],
        "events.example.com/segment/v1"
    );
    assert_eq!(s["integrations"]["Segment.io"]["protocol"], "https");
    server.shutdown().await;
    mock.shutdown().await;
}

/// Each one-letter path with a body as the libraries send it: text/plain,
/// the write key only in the body, some gzip and some chunked.
#[tokio::test]
async fn short_paths_take_text_plain_gzip_chunked_bodies_with_the_key_in_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = start(settings(&db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let ids = json!({"accountExternalId": "acct-s", "contactExternalId": "c-s"});
    let calls = [
        (
            "i",
            json!({"userId": "u-s", "traits": {"email": "s@example.com", "accountExternalId": "acct-s"}}),
        ),
        (
            "t",
            json!({"userId": "u-s", "event": "Short Track", "properties": ids}),
        ),
        (
            "p",
            json!({"userId": "u-s", "name": "Home", "properties": ids}),
        ),
        (
            "s",
            json!({"userId": "u-s", "name": "Main", "properties": ids}),
        ),
        (
            "g",
            json!({"userId": "u-s", "groupId": "acct-s", "traits": {"name": "Short Inc"}}),
        ),
        ("a", json!({"userId": "u-s", "previousId": "anon-s"})),
    ];
    for (n, (path, body)) in calls.iter().enumerate() {
        let mut body = body.clone();
        body["writeKey"] = json!(WRITE_KEY);
        body["messageId"] = json!(format!("short-{path}"));
        let json_bytes = body.to_string().into_bytes();
        let (payload, encoding) = if n % 2 == 0 {
            (gzip(&json_bytes), Some("gzip"))
        } else {
            (json_bytes, None)
        };
        let chunk = n % 3 != 2;
        let framed = if chunk {
            chunked(&payload, 7)
        } else {
            payload.clone()
        };
        let len = payload.len().to_string();
        let mut headers = vec![
            ("Host", "127.0.0.1"),
            ("Content-Type", "text/plain"),
            ("Connection", "close"),
        ];
        if let Some(e) = encoding {
            headers.push(("Content-Encoding", e));
        }
        if chunk {
            headers.push(("Transfer-Encoding", "chunked"));
        } else {
            headers.push(("Content-Length", &len));
        }
        let r = raw(
            server.addr,
            &request(&format!("POST /v1/{path} HTTP/1.1"), &headers, &framed),
        )
        .await;
        assert_eq!(r.status, 200, "/v1/{path}: {}", r.text());
        assert_eq!(r.json(), json!({"success": true}), "/v1/{path}");
    }

    // /v1/b: a batch, chunked and gzipped, writeKey and sentAt in the body.
    let batch = json!({"batch": [
        {"type": "track", "userId": "u-s", "event": "Batched", "messageId": "short-b1", "properties": ids,
         "timestamp": "2026-11-28T19:36:24.123Z"},
    ], "sentAt": "2026-11-28T19:36:25.000Z", "writeKey": WRITE_KEY});
    let framed = chunked(&gzip(batch.to_string().as_bytes()), 16);
    let r = raw(
        server.addr,
        &request(
            "POST /v1/b HTTP/1.1",
            &[
                ("Host", "127.0.0.1"),
                ("Content-Type", "text/plain"),
                ("Content-Encoding", "gzip"),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "close"),
            ],
            &framed,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A wrong key in the body is refused, on short paths too.
    let bad = json!({"writeKey": "wrong", "userId": "u", "event": "E"}).to_string();
    for path in ["/v1/t", "/v1/b"] {
        let r = client()
            .post(format!("{base}{path}"))
            .header("Content-Type", "text/plain")
            .body(bad.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
    }
    let r = client()
        .post(format!("{base}/v1/x"))
        .basic_auth(WRITE_KEY, Some(""))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    wait_status(&base, "pending", 0).await;
    let st = wait_status(&base, "held", 0).await;
    assert_eq!(st["accepted"], 7, "{st}");
    let stored = stored_events(&db).await;
    let kinds: Vec<(&str, &str)> = stored
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["messageId"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("identify", "short-i"),
            ("track", "short-t"),
            ("page", "short-p"),
            ("screen", "short-s"),
            ("group", "short-g"),
            ("alias", "short-a"),
            ("track", "short-b1")
        ]
    );
    assert!(stored.iter().all(|e| e.get("writeKey").is_none()));
    let actions = mock.state().actions();
    let tracks: Vec<&str> = actions
        .iter()
        .filter(|a| a["action"] == "trackEvent")
        .map(|a| a["eventName"].as_str().unwrap())
        .collect();
    assert_eq!(tracks, ["Short Track", "Batched"]);
    server.shutdown().await;
    mock.shutdown().await;
}

/// The settings path carries a write key: it must not reach the logs, even
/// at debug level where every request is traced.
#[tokio::test]
async fn the_settings_path_keeps_the_write_key_out_of_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let b = Binary::serve_with_env(
        &dir.path().join("o.db"),
        &mock.url(),
        &[],
        &[("RUST_LOG", "debug")],
    )
    .await;
    for path in [
        format!("/v1/projects/{WRITE_KEY}/settings"),
        format!("/projects/{WRITE_KEY}/settings"),
        "/v1/projects/guessed-key/settings".to_string(),
    ] {
        let r = client()
            .get(format!("{}{path}", b.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() == 200 || r.status().as_u16() == 404);
    }
    // A request after them, so their log lines are written.
    let (code, _) = post(&b.base, "/v1/track", &track("u", "E", 1)).await;
    assert_eq!(code, 200);
    let logs = b.logs();
    assert!(logs.contains("/settings"), "requests are traced: {logs}");
    assert!(!logs.contains(WRITE_KEY), "write key in the logs:\n{logs}");
    assert!(!logs.contains("guessed-key"), "{logs}");
    mock.shutdown().await;
}

/// A bad value for one of these flags stops `serve` with a message naming
/// the flag and the variable's value problem, before anything starts.
#[tokio::test]
async fn bad_client_flags_stop_serve_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let db = db.to_str().unwrap();
    for (flag, value, says) in [
        ("--trusted-proxies", "10.0.0.0/33", "prefix length"),
        ("--cors-origins", "app.example.com", "not an origin"),
        ("--public-url", "events.example.com", "http://"),
        ("--client-rate-limit", "lots", "client-rate-limit"),
    ] {
        let (code, _, stderr) = run_binary(&[
            "serve",
            "--database",
            db,
            "--write-key",
            WRITE_KEY,
            "--churnzero-url",
            "http://127.0.0.1:9",
            "--churnzero-app-key",
            APP_KEY,
            "--listen",
            "127.0.0.1:0",
            flag,
            value,
        ])
        .await;
        assert_ne!(code, 0, "{flag} {value}");
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag} {value}: {stderr}"
        );
        assert!(!stderr.contains(APP_KEY));
    }
}
