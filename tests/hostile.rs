//! Hostile requests against the real binary: each gets its 4xx with a JSON
//! reason and stores nothing; slow clients lose their connections; then the
//! server is healthy, its peak memory stayed small, and a valid event still
//! reaches ChurnZero.

mod common;

use base64::Engine;
use common::*;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use std::io::Write;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Peak RSS the server may reach through all of this.
const PEAK_RSS_LIMIT_KIB: u64 = 300 * 1024;

fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// One hostile request: what is sent and the status it must get.
struct Case {
    name: &'static str,
    path: &'static str,
    auth: Option<String>,
    gzip: bool,
    body: Vec<u8>,
    expect: u16,
    /// A word the error must contain.
    reason: &'static str,
}

fn case(name: &'static str, path: &'static str, body: Vec<u8>, expect: u16) -> Case {
    Case {
        name,
        path,
        auth: Some(basic(WRITE_KEY)),
        gzip: false,
        body,
        expect,
        reason: "",
    }
}

fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn small_event(i: usize) -> Value {
    json!({"type": "track", "userId": format!("u{i}"), "event": "E"})
}

/// `zeros` bytes of zeros, gzipped as they stream: a few hundred KB on the
/// wire that inflate to hundreds of MB.
fn gzip_bomb(zeros: usize) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len());
        e.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    e.finish().unwrap()
}

fn cases() -> Vec<Case> {
    let valid = json_bytes(&json!({"userId": "u1", "event": "E"}));
    let cases = vec![
        Case {
            auth: None,
            reason: "write key",
            ..case("no auth", "/v1/track", valid.clone(), 401)
        },
        Case {
            auth: Some(basic("not-the-key")),
            reason: "write key",
            ..case("wrong key", "/v1/track", valid.clone(), 401)
        },
        Case {
            reason: "JSON",
            ..case(
                "invalid JSON",
                "/v1/track",
                b"{\"userId\": \"u1\", ".to_vec(),
                400,
            )
        },
        Case {
            reason: "object",
            ..case(
                "an array where an object belongs",
                "/v1/track",
                json_bytes(&json!([{"userId": "u1", "event": "E"}])),
                400,
            )
        },
        Case {
            reason: "array",
            ..case(
                "`batch` is an object, not an array",
                "/v1/batch",
                json_bytes(&json!({"batch": {"type": "track"}})),
                400,
            )
        },
        Case {
            reason: "event",
            ..case(
                "track without `event`",
                "/v1/track",
                json_bytes(&json!({"userId": "u1"})),
                400,
            )
        },
        Case {
            reason: "userId",
            ..case(
                "no user id",
                "/v1/track",
                json_bytes(&json!({"event": "E"})),
                400,
            )
        },
        Case {
            reason: "no valid event",
            ..case(
                "only unknown types",
                "/v1/batch",
                json_bytes(&json!({"batch": [
                    {"type": "bogus", "userId": "u1"},
                    {"type": "delete", "userId": "u2"},
                    {"type": 7, "userId": "u3"},
                ]})),
                400,
            )
        },
        Case {
            reason: "limit",
            ..case(
                "a 600 KB batch",
                "/v1/batch",
                json_bytes(&json!({"batch": (0..20).map(|i| {
                    let mut e = small_event(i);
                    e["properties"] = json!({"blob": "x".repeat(30_000)});
                    e
                }).collect::<Vec<_>>()})),
                413,
            )
        },
        Case {
            reason: "limit",
            ..case(
                "a 40 KB event",
                "/v1/track",
                json_bytes(&json!({"userId": "u1", "event": "E",
                    "properties": {"blob": "x".repeat(40 * 1024)}})),
                413,
            )
        },
        Case {
            reason: "limit",
            ..case(
                "3,000 events in one batch",
                "/v1/batch",
                json_bytes(&json!({"batch": (0..3000).map(small_event).collect::<Vec<_>>()})),
                413,
            )
        },
        Case {
            gzip: true,
            reason: "limit",
            ..case(
                "a gzip bomb (400 MB of zeros)",
                "/v1/batch",
                gzip_bomb(400 << 20),
                413,
            )
        },
        Case {
            gzip: true,
            reason: "gzip",
            ..case(
                "broken gzip",
                "/v1/track",
                {
                    let mut g = gzip_bomb(10_000);
                    g.truncate(g.len() / 2);
                    g[12] ^= 0xff;
                    g
                },
                400,
            )
        },
        Case {
            reason: "nesting",
            ..case(
                "50,000 levels of nesting",
                "/v1/track",
                {
                    let mut b =
                        b"{\"userId\":\"u1\",\"event\":\"E\",\"properties\":{\"p\":".to_vec();
                    b.extend(std::iter::repeat_n(b'[', 50_000));
                    b.extend(std::iter::repeat_n(b']', 50_000));
                    b.extend(b"}}");
                    b
                },
                400,
            )
        },
        Case {
            reason: "UTF-8",
            ..case(
                "invalid UTF-8",
                "/v1/track",
                {
                    let mut b = b"{\"userId\":\"u1\",\"event\":\"".to_vec();
                    b.extend([0xc3, 0x28, 0xff, 0xfe]);
                    b.extend(b"\"}");
                    b
                },
                400,
            )
        },
        Case {
            reason: "Content-Encoding",
            ..case(
                "an unknown Content-Encoding",
                "/v1/track",
                valid.clone(),
                415,
            )
        },
    ];
    // The bomb, 600 KB and nesting bodies must be what they claim.
    assert!(cases.iter().any(|c| c.body.len() > 600 * 1000));
    let bomb = cases
        .iter()
        .find(|c| c.name.starts_with("a gzip bomb"))
        .unwrap();
    assert!(
        bomb.body.len() < 500 * 1024,
        "bomb is {} bytes",
        bomb.body.len()
    );
    cases
}

async fn send(base: &str, c: &Case) -> (u16, Value) {
    let mut req = client()
        .post(format!("{base}{}", c.path))
        .header("content-type", "application/json");
    if let Some(a) = &c.auth {
        req = req.header("authorization", a);
    }
    if c.gzip {
        req = req.header("content-encoding", "gzip");
    }
    if c.name == "an unknown Content-Encoding" {
        req = req.header("content-encoding", "br");
    }
    let r = req
        .body(c.body.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Opens a connection, sends `prefix` and nothing more, and returns how long
/// the server took to close it (with whatever it answered), or panics after
/// `limit`.
async fn stall(addr: &str, prefix: &[u8], limit: Duration) -> (Duration, String) {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {limit:?} (sent {:?}, got {:?})",
                String::from_utf8_lossy(prefix),
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (
        started.elapsed(),
        String::from_utf8_lossy(&got).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_are_refused_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let mut bin = Binary::serve(&db, &mock.url(), &[]).await;

    let cases = cases();
    let mut table = Vec::new();
    for c in &cases {
        let (status, body) = send(&bin.base, c).await;
        assert_eq!(status, c.expect, "{}: {body}", c.name);
        assert_eq!(body["success"], json!(false), "{}: {body}", c.name);
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(c.reason),
            "{}: `{error}` lacks `{}`",
            c.name,
            c.reason
        );
        table.push(format!("| {} | {status} | {error} |", c.name));
    }
    // The bomb, many times at once: memory stays flat.
    let bomb = cases
        .iter()
        .find(|c| c.name.starts_with("a gzip bomb"))
        .unwrap();
    let storm: Vec<_> = (0..16).map(|_| send(&bin.base, bomb)).collect();
    for (status, _) in futures_util::future::join_all(storm).await {
        assert_eq!(status, 413);
    }
    eprintln!("{}", table.join("\n"));

    // Nothing was stored, by the counters or in the file.
    let s = status(&bin.base).await;
    assert_eq!(s["accepted"], json!(0), "{s}");
    assert_eq!(s["pending"], json!(0), "{s}");
    let rows: i64 = {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .read_only(true)
            .connect()
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM events) + (SELECT COUNT(*) FROM message_ids)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    assert_eq!(rows, 0);

    // Still healthy, memory bounded, and a valid event flows.
    assert!(bin.alive());
    for path in ["/healthz", "/readyz"] {
        let r = client()
            .get(format!("{}{path}", bin.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}");
    }
    let (s, v) = post(&bin.base, "/v1/track", &track("after", "Still Works", 1)).await;
    assert_eq!((s, v), (200, json!({"success": true})));
    wait_for(
        "the valid event at the mock",
        Duration::from_secs(30),
        || {
            let actions = mock.state().actions();
            async move {
                actions
                    .iter()
                    .any(|a| a["eventName"] == json!("Still Works"))
                    .then_some(())
            }
        },
    )
    .await;
    let peak = bin.peak_rss_kib().expect("VmHWM readable");
    eprintln!("peak RSS (VmHWM): {peak} KiB");
    assert!(peak < PEAK_RSS_LIMIT_KIB, "peak RSS {peak} KiB");
    assert!(!bin.logs().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_lose_their_connections() {
    use churnzero_forwarder::ingest::BODY_READ_TIMEOUT;
    use churnzero_forwarder::server::HEADER_READ_TIMEOUT;
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let bin = Binary::serve(&dir.path().join("o.db"), &mock.url(), &[]).await;
    let addr = bin.base.trim_start_matches("http://").to_string();
    let margin = Duration::from_secs(10);
    let header_limit = HEADER_READ_TIMEOUT + margin;
    let body_limit = BODY_READ_TIMEOUT + margin;

    let auth = basic(WRITE_KEY);
    let partial_body = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"userId\":"
    );
    let (silent, partial_headers, trickled_body) = tokio::join!(
        // Connects and sends nothing at all.
        stall(&addr, b"", header_limit),
        // Sends half a request head.
        stall(
            &addr,
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Le",
            header_limit
        ),
        // Sends the head and 10 of 1000 body bytes.
        stall(&addr, partial_body.as_bytes(), body_limit),
    );
    eprintln!(
        "closed after: silent {:?}, partial headers {:?}, partial body {:?}",
        silent.0, partial_headers.0, trickled_body.0
    );
    assert!(
        trickled_body.1.starts_with("HTTP/1.1 408"),
        "a stalled body gets 408: {}",
        trickled_body.1
    );
    assert!(
        trickled_body.1.contains("did not arrive"),
        "{}",
        trickled_body.1
    );
    // The server is fine afterwards.
    let r = client()
        .get(format!("{}/healthz", bin.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}
