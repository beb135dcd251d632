//! Contract tests for the mobile libraries, built from their sources:
//! the settings fetch and the batch upload, byte for byte as
//! analytics-kotlin (`HTTPClient.kt`, `EventsFileManager.kt`) and
//! analytics-swift (`Utilities/Networking/HTTPClient.swift`,
//! `Storage/Types/DirectoryStore.swift`) write them: path, headers, gzip,
//! chunked framing, the batch file's exact text with `sentAt` and
//! `writeKey` at its end and no `Authorization` header. The libraries are
//! configured with the forwarder as `cdnHost` only; the upload goes where
//! the settings answer's `apiHost` says, as the libraries do.

mod clients_support;
mod common;

use clients_support::*;
use common::*;
use serde_json::{Value, json};

/// `integrations["Segment.io"].apiHost` from a settings answer, checked
/// the way each library reads it: analytics-kotlin decodes
/// `SegmentSettings(apiKey: String, apiHost: String)`, so `apiKey` must be a
/// string; analytics-swift takes `apiHost` when it is a non-empty string.
fn api_host(settings: &Value) -> String {
    let seg = &settings["integrations"]["Segment.io"];
    assert_eq!(seg["apiKey"], WRITE_KEY, "{settings}");
    let host = seg["apiHost"].as_str().expect("apiHost is a string");
    assert!(!host.is_empty());
    host.to_string()
}

/// The path part of `https://{apiHost}/b`.
fn upload_path(api_host: &str, server: &std::net::SocketAddr) -> String {
    let prefix = api_host
        .strip_prefix(&server.to_string())
        .unwrap_or_else(|| panic!("apiHost {api_host} names the forwarder {server}"));
    format!("{prefix}/b")
}

// ---------------------------------------------------------------- kotlin

const KOTLIN_UA: &str = "analytics-kotlin/1.4.4";
/// What `HttpURLConnection` adds when the caller sets no `Accept`.
const JAVA_ACCEPT: &str = "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2";

/// Events as `EventPipeline.stringifyBaseEvent` encodes them
/// (kotlinx.serialization, constructor fields first, a blank `userId`
/// dropped), timestamps as `Instant.toString()`.
fn kotlin_events() -> Vec<String> {
    let context = r#"{"app":{"name":"Acme","version":"3.1","namespace":"com.acme","build":"31"},"device":{"id":"d-1","manufacturer":"Google","model":"Pixel 8","name":"husky","type":"android"},"library":{"name":"analytics-kotlin","version":"1.4.4"},"os":{"name":"Android","version":"14"},"screen":{"density":2.625,"height":2400,"width":1080},"network":{"wifi":true,"carrier":"","bluetooth":false,"cellular":false},"locale":"en-US","userAgent":"Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8)","timezone":"Europe/Paris","instanceId":"8f6c-kt"}"#;
    let integrations = r#"{"Segment.io":false}"#;
    vec![
        format!(
            r#"{{"userId":"kt-user","traits":{{"email":"kt@example.com","accountExternalId":"acct-kt","firstName":"Kim"}},"type":"identify","messageId":"kt-m-1","anonymousId":"kt-anon","integrations":{integrations},"context":{context},"timestamp":"2026-11-28T19:36:24.123456Z"}}"#
        ),
        format!(
            r#"{{"properties":{{"quantity":2,"description":"from android"}},"event":"Report Exported","type":"track","messageId":"kt-m-2","anonymousId":"kt-anon","integrations":{integrations},"context":{context},"userId":"kt-user","timestamp":"2026-11-28T19:36:25.5Z"}}"#
        ),
        format!(
            r#"{{"name":"Dashboard","category":"","properties":{{}},"type":"screen","messageId":"kt-m-3","anonymousId":"kt-anon","context":{context},"integrations":{integrations},"userId":"kt-user","timestamp":"2026-11-28T19:36:26.000001Z"}}"#
        ),
        format!(
            r#"{{"groupId":"acct-kt","traits":{{"name":"Kotlin Corp","plan":"pro"}},"type":"group","messageId":"kt-m-4","anonymousId":"kt-anon","integrations":{integrations},"context":{context},"userId":"kt-user","timestamp":"2026-11-28T19:36:27Z"}}"#
        ),
        format!(
            r#"{{"userId":"kt-user","previousId":"kt-anon","type":"alias","messageId":"kt-m-5","anonymousId":"kt-anon","integrations":{integrations},"context":{context},"timestamp":"2026-11-28T19:36:28.1Z"}}"#
        ),
    ]
}

/// `EventsFileManager`: `{"batch":[` then the events joined by `,`, then
/// `],"sentAt":"<dateTimeNowString()>","writeKey":"<key>"}`. The library's
/// `ss'.'S` pattern writes milliseconds unpadded (`.5Z` for 5 ms).
fn kotlin_file(events: &[String]) -> String {
    format!(
        r#"{{"batch":[{}],"sentAt":"2026-11-28T19:36:29.5Z","writeKey":"{WRITE_KEY}"}}"#,
        events.join(",")
    )
}

/// `RequestFactory.upload`: POST, `Content-Type: text/plain`,
/// `Content-Encoding: gzip` (`createPostConnection`), chunked streaming
/// (`setChunkedStreamingMode(0)`: HttpURLConnection's 4096-byte chunks
/// less framing), and `X-Retry-Count` on a retry.
fn kotlin_upload(path: &str, host: &str, file: &str, retry: Option<u32>) -> Vec<u8> {
    let retry = retry.map(|n| n.to_string());
    let mut headers = vec![
        ("User-Agent", KOTLIN_UA),
        ("Content-Type", "text/plain"),
        ("Content-Encoding", "gzip"),
    ];
    if let Some(r) = &retry {
        headers.push(("X-Retry-Count", r));
    }
    headers.extend([
        ("Host", host),
        ("Accept", JAVA_ACCEPT),
        ("Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"),
    ]);
    request(
        &format!("POST {path} HTTP/1.1"),
        &headers,
        &chunked(&gzip(file.as_bytes()), 4089),
    )
}

#[tokio::test]
async fn analytics_kotlin_settings_and_batch_upload() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = start(settings(&db, &mock.url())).await;
    let host = server.addr.to_string();

    // cdnHost = "<forwarder>/v1": GET https://{cdnHost}/projects/{key}/settings
    let r = raw(
        server.addr,
        &request(
            &format!("GET /v1/projects/{WRITE_KEY}/settings HTTP/1.1"),
            &[
                ("User-Agent", KOTLIN_UA),
                ("Content-Type", "application/json; charset=utf-8"),
                ("Host", &host),
                ("Accept", JAVA_ACCEPT),
                ("Connection", "keep-alive"),
            ],
            b"",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let api = api_host(&r.json());
    assert_eq!(api, format!("{host}/v1"));

    let events = kotlin_events();
    let file = kotlin_file(&events);
    let path = upload_path(&api, &server.addr);
    assert_eq!(path, "/v1/b");
    let r = raw(server.addr, &kotlin_upload(&path, &host, &file, None)).await;
    // HTTPClient.kt treats any status below 300 as success.
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"success": true}));

    // A retry of the same file (the library keeps it until a 2xx) is
    // acknowledged and stores nothing twice.
    let r = raw(server.addr, &kotlin_upload(&path, &host, &file, Some(1))).await;
    assert_eq!(r.status, 200);

    let base = format!("http://{}", server.addr);
    let st = wait_status(&base, "delivered", 5).await;
    assert_eq!(
        (st["accepted"].as_i64(), st["duplicates"].as_i64()),
        (Some(5), Some(5)),
        "{st}"
    );
    let actions = mock.state().actions();
    let track = actions
        .iter()
        .find(|a| a["action"] == "trackEvent")
        .unwrap();
    assert_eq!(track["eventName"], "Report Exported");
    assert_eq!(track["accountExternalId"], "acct-kt");
    assert_eq!(track["contactExternalId"], "kt-user");
    assert_eq!(track["eventDate"], "2026-11-28T19:36:25.500Z");
    assert_eq!(track["quantity"], 2);
    assert!(
        actions
            .iter()
            .any(|a| a["entity"] == "contact" && a["attr_Email"] == "kt@example.com")
    );
    assert!(
        actions
            .iter()
            .any(|a| a["entity"] == "account" && a["attr_Name"] == "Kotlin Corp")
    );

    let stored = stored_events(&db).await;
    let ids: Vec<&str> = stored
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kt-m-1", "kt-m-2", "kt-m-3", "kt-m-4", "kt-m-5"]);
    for e in &stored {
        assert_eq!(e["sentAt"], "2026-11-28T19:36:29.500Z");
        assert!(e.get("writeKey").is_none());
        assert_eq!(e["context"]["library"]["name"], "analytics-kotlin");
    }
    server.shutdown().await;
    mock.shutdown().await;
}

// ----------------------------------------------------------------- swift

const SWIFT_UA: &str = "analytics-ios/1.7.3";

/// Events as analytics-swift's JSONEncoder writes them (`_metadata` from
/// the DestinationMetadata plugin), ISO 8601 with milliseconds.
fn swift_events() -> Vec<String> {
    let context = r#"{"app":{"build":"12","name":"Acme","namespace":"com.acme","version":"2.0"},"device":{"id":"D-2","manufacturer":"Apple","model":"iPhone15,2","name":"iPhone","type":"ios"},"library":{"name":"analytics-swift","version":"1.7.3"},"locale":"en-US","network":{"cellular":false,"wifi":true},"os":{"name":"iOS","version":"17.2"},"screen":{"height":852,"width":393},"timezone":"America/New_York","traits":{},"instanceId":"a1-swift"}"#;
    let meta = r#"{"bundled":[],"unbundled":[],"bundledIds":[]}"#;
    vec![
        format!(
            r#"{{"type":"identify","anonymousId":"sw-anon","messageId":"sw-m-1","userId":"sw-user","timestamp":"2026-11-28T19:40:00.001Z","context":{context},"integrations":{{}},"traits":{{"email":"sw@example.com","accountExternalId":"acct-sw"}},"_metadata":{meta}}}"#
        ),
        format!(
            r#"{{"type":"track","anonymousId":"sw-anon","messageId":"sw-m-2","userId":"sw-user","timestamp":"2026-11-28T19:40:01.002Z","context":{context},"integrations":{{}},"event":"Checkout Started","properties":{{"description":"from ios"}},"_metadata":{meta}}}"#
        ),
        format!(
            r#"{{"type":"screen","anonymousId":"sw-anon","messageId":"sw-m-3","userId":"sw-user","timestamp":"2026-11-28T19:40:02.003Z","context":{context},"integrations":{{}},"name":"Cart","properties":{{}},"_metadata":{meta}}}"#
        ),
    ]
}

/// `DirectoryStore`: each piece written by `LineStreamWriter.writeLine`
/// (a trailing newline): `{ "batch": [`, the first event, `,` + each next
/// one, then `],"sentAt":"...","writeKey":"..."}`.
fn swift_file(events: &[String]) -> String {
    let mut out = String::from("{ \"batch\": [\n");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e);
        out.push('\n');
    }
    out.push_str(&format!(
        "],\"sentAt\":\"2026-11-28T19:40:03.004Z\",\"writeKey\":\"{WRITE_KEY}\"}}\n"
    ));
    out
}

/// `HTTPClient.configuredRequest`: `Content-Type: application/json;
/// charset=utf-8`, the User-Agent, `Accept-Encoding: gzip`; the body is the
/// file itself (`uploadTask(with:fromFile:)`, sent with its length, not
/// compressed). No Authorization header: the key is only in the body.
fn swift_upload(path: &str, host: &str, file: &str) -> Vec<u8> {
    let len = file.len().to_string();
    request(
        &format!("POST {path} HTTP/1.1"),
        &[
            ("Host", host),
            ("Content-Type", "application/json; charset=utf-8"),
            ("User-Agent", SWIFT_UA),
            ("Accept-Encoding", "gzip"),
            ("Accept", "*/*"),
            ("Accept-Language", "en-US,en;q=0.9"),
            ("Content-Length", &len),
            ("Connection", "keep-alive"),
        ],
        file.as_bytes(),
    )
}

#[tokio::test]
async fn analytics_swift_settings_and_batch_upload() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = start(settings(&db, &mock.url())).await;
    let host = server.addr.to_string();

    // cdnHost = "<forwarder>" (no /v1): the path the libraries then build.
    let r = raw(
        server.addr,
        &request(
            &format!("GET /projects/{WRITE_KEY}/settings HTTP/1.1"),
            &[
                ("Host", &host),
                ("Content-Type", "application/json; charset=utf-8"),
                ("User-Agent", SWIFT_UA),
                ("Accept-Encoding", "gzip"),
                ("Accept", "*/*"),
                ("Connection", "keep-alive"),
            ],
            b"",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let api = api_host(&r.json());
    let path = upload_path(&api, &server.addr);
    assert_eq!(path, "/v1/b");

    let file = swift_file(&swift_events());
    let r = raw(server.addr, &swift_upload(&path, &host, &file)).await;
    // HTTPClient.swift: 1..<300 is success; 429 and others are retried.
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"success": true}));

    let base = format!("http://{}", server.addr);
    // identify and track; screens are not sent by default.
    wait_status(&base, "delivered", 3).await;
    let actions = mock.state().actions();
    let track = actions
        .iter()
        .find(|a| a["action"] == "trackEvent")
        .unwrap();
    assert_eq!(track["eventName"], "Checkout Started");
    assert_eq!(track["accountExternalId"], "acct-sw");
    assert_eq!(track["contactExternalId"], "sw-user");
    assert_eq!(track["eventDate"], "2026-11-28T19:40:01.002Z");
    assert_eq!(track["description"], "from ios");
    let stored = stored_events(&db).await;
    assert_eq!(stored.len(), 3);
    assert!(
        stored
            .iter()
            .all(|e| e["sentAt"] == "2026-11-28T19:40:03.004Z"
                && e.get("writeKey").is_none()
                && e["_metadata"]["bundled"] == json!([]))
    );
    server.shutdown().await;
    mock.shutdown().await;
}

/// Without the write key in the body (or a header), the upload is refused:
/// the key in the body is what authenticates these libraries.
#[tokio::test]
async fn a_batch_file_without_its_write_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = start(settings(&dir.path().join("o.db"), &mock.url())).await;
    let host = server.addr.to_string();
    let file = swift_file(&swift_events()).replace(WRITE_KEY, "not-a-key");
    let r = raw(server.addr, &swift_upload("/v1/b", &host, &file)).await;
    assert_eq!(r.status, 401);
    let file = kotlin_file(&kotlin_events()).replace(&format!(",\"writeKey\":\"{WRITE_KEY}\""), "");
    let r = raw(server.addr, &kotlin_upload("/v1/b", &host, &file, None)).await;
    assert_eq!(r.status, 401);
    server.shutdown().await;
    mock.shutdown().await;
}

// ----------------------------------------------------------- react native

/// analytics-react-native (`packages/core/src/api.ts`): with
/// `cdnProxy`/`proxy` = `https://<forwarder>/v1` and `useSegmentEndpoints`,
/// settings from `{cdnProxy}/projects/{key}/settings`, then `fetch` POSTs
/// `JSON.stringify({batch, sentAt, writeKey})` to `{proxy}/b` with
/// `Content-Type: text/plain`, uncompressed.
#[tokio::test]
async fn analytics_react_native_settings_and_batch_upload() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = start(settings(&db, &mock.url())).await;
    let host = server.addr.to_string();

    let r = raw(
        server.addr,
        &request(
            &format!("GET /v1/projects/{WRITE_KEY}/settings HTTP/1.1"),
            &[
                ("Host", &host),
                ("Accept", "*/*"),
                ("Connection", "keep-alive"),
            ],
            b"",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(api_host(&r.json()), format!("{host}/v1"));

    let body = json!({
        "batch": [
            {"type": "identify", "userId": "rn-user", "anonymousId": "rn-anon", "messageId": "rn-m-1",
             "timestamp": "2026-11-28T19:50:00.000Z", "traits": {"accountExternalId": "acct-rn"},
             "context": {"library": {"name": "@segment/analytics-react-native", "version": "2.20.0"}},
             "integrations": {}, "_metadata": {"bundled": [], "unbundled": [], "bundledIds": []}},
            {"type": "track", "userId": "rn-user", "anonymousId": "rn-anon", "messageId": "rn-m-2",
             "timestamp": "2026-11-28T19:50:01.000Z", "event": "Order Placed", "properties": {"quantity": 1},
             "context": {"library": {"name": "@segment/analytics-react-native", "version": "2.20.0"}},
             "integrations": {}, "_metadata": {"bundled": [], "unbundled": [], "bundledIds": []}}
        ],
        "sentAt": "2026-11-28T19:50:02.000Z",
        "writeKey": WRITE_KEY
    })
    .to_string();
    let len = body.len().to_string();
    let r = raw(
        server.addr,
        &request(
            "POST /v1/b HTTP/1.1",
            &[
                ("Host", &host),
                ("Content-Type", "text/plain"),
                ("Content-Length", &len),
                ("Accept", "*/*"),
                ("Connection", "keep-alive"),
            ],
            body.as_bytes(),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let base = format!("http://{}", server.addr);
    wait_status(&base, "delivered", 2).await;
    let actions = mock.state().actions();
    let track = actions
        .iter()
        .find(|a| a["action"] == "trackEvent")
        .unwrap();
    assert_eq!(
        (
            &track["eventName"],
            &track["accountExternalId"],
            &track["contactExternalId"]
        ),
        (&json!("Order Placed"), &json!("acct-rn"), &json!("rn-user"))
    );
    server.shutdown().await;
    mock.shutdown().await;
}
