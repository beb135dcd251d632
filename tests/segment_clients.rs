//! The official Segment libraries, unchanged, against the forwarder: the
//! Python library (PyPI `segment-analytics-python`) and the Node library (npm
//! `@segment/analytics-node`) each run a script from tests/compat/ as a child
//! process, with the forwarder as their `host` and the test write key.
//!
//! Each library runs twice against one forwarder and one mock ChurnZero:
//! - first through a recording pass-through proxy, so the test sees the exact
//!   requests the library makes (path, Basic auth, User-Agent, gzip, body
//!   fields) and that every one was answered 200;
//! - then straight at the forwarder, with the same fixed messageIds: nothing is
//!   stored again except the one event whose id the library assigned itself.
//!
//! The test asserts the exact ChurnZero actions the mock received (identify,
//! track, group, and a track from an aliased anonymous id), the /status counts,
//! and, in the outbox file, that the stored messageIds are the library's own.
//! The Python script also sends the largest event its library allows (32 KB
//! by the library's own measure), which the forwarder must take whole.
//!
//! The harness installs the libraries on first use into target/test-deps/
//! (a virtualenv, and `npm ci` of tests/compat's lock): `cargo test` needs
//! only Python 3 with venv and Node 20 with npm. A failed install fails the
//! tests with the reason; `CHURNZERO_SKIP_SEGMENT_CLIENTS=1` skips them.

mod common;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use common::*;
use serde_json::{Value, json};
use sqlx::ConnectOptions;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The versions tests/compat pins (package-lock.json) and the harness
/// installs.
const PYTHON_LIB_VERSION: &str = SEGMENT_PYTHON_VERSION;
const NODE_LIB_VERSION: &str = "3.1.0";

const SKIP_ENV: &str = "CHURNZERO_SKIP_SEGMENT_CLIENTS";

/// `$NODE`, else `node`.
fn node() -> String {
    std::env::var("NODE").unwrap_or_else(|_| "node".to_string())
}

/// Which official library a run uses, and how to start its script.
#[derive(Clone, Copy, Debug)]
enum Lib {
    Python,
    Node,
}

impl Lib {
    /// The script's command. The libraries come from the harness's cache
    /// under target/ (installed there on first use), the Python script runs
    /// from the source tree (it writes no bytecode), the Node one from the
    /// cache, beside the node_modules its import resolves against.
    fn command(self) -> tokio::process::Command {
        let (program, dir, script) = match self {
            Lib::Python => (
                python_with_segment().into_os_string(),
                compat_source_dir(),
                "python_client.py",
            ),
            Lib::Node => (node().into(), node_compat_dir(), "node_client.mjs"),
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg(dir.join(script))
            .current_dir(dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .kill_on_drop(true);
        cmd
    }

    fn install_hint(self) -> String {
        match self {
            Lib::Python => format!(
                "delete target/test-deps/ to reinstall segment-analytics-python=={PYTHON_LIB_VERSION} \
                 (or unset $PYTHON)"
            ),
            Lib::Node => "delete target/test-deps/ to rerun `npm ci` of tests/compat".into(),
        }
    }

    /// True when the test may run: installs the library on first use (a
    /// failed install panics with what is missing); false when
    /// `CHURNZERO_SKIP_SEGMENT_CLIENTS=1` asks to skip it outside CI.
    fn ready(self) -> bool {
        if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
            // Under CI=true this panics: CI must not pass without the test.
            skip_outside_ci(
                &format!("{SKIP_ENV}=1 asks to skip the {self:?} library"),
                &format!("unset {SKIP_ENV}"),
            );
            return false;
        }
        match self {
            Lib::Python => {
                python_with_segment();
            }
            Lib::Node => {
                if let Err(e) = std::process::Command::new(node()).arg("--version").output() {
                    panic!(
                        "`{}` cannot be started ({e}): cargo test needs Node 20 or later with npm",
                        node()
                    );
                }
                node_compat_dir();
            }
        }
        true
    }
}

/// What a client script reports on its last stdout line.
struct ClientRun {
    version: String,
    message_ids: Vec<String>,
}

/// Runs a client script against `host` and requires it to succeed, i.e. the
/// library reported no failed upload.
async fn run_client(lib: Lib, host: &str, env: &[(&str, &str)]) -> ClientRun {
    let mut cmd = lib.command();
    cmd.env("SEGMENT_HOST", host)
        .env("SEGMENT_WRITE_KEY", WRITE_KEY)
        .envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the {lib:?} client did not finish within 120 s"))
        .unwrap_or_else(|e| panic!("the {lib:?} client could not be started: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the {lib:?} client failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report from the {lib:?} client: {stdout}"));
    ClientRun {
        version: report["version"].as_str().unwrap_or_default().to_string(),
        message_ids: report["message_ids"]
            .as_array()
            .expect("message_ids in the report")
            .iter()
            .map(|v| v.as_str().expect("string messageId").to_string())
            .collect(),
    }
}

/// One request as the library sent it, and the forwarder's answer.
#[derive(Clone, Debug)]
struct Tapped {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
    status: u16,
    /// The forwarder's answer body.
    answer: Vec<u8>,
}

impl Tapped {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The JSON body, inflated when the library gzipped it.
    fn json(&self) -> Value {
        let bytes = if self.header("content-encoding") == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_end(&mut out)
                .expect("valid gzip from the library");
            out
        } else {
            self.body.clone()
        };
        serde_json::from_slice(&bytes).expect("JSON body from the library")
    }
}

/// A pass-through HTTP proxy that records what goes through it, so the test
/// sees the library's requests exactly as they reach the forwarder.
#[derive(Clone)]
struct Tap {
    upstream: String,
    seen: Arc<Mutex<Vec<Tapped>>>,
}

impl Tap {
    async fn start(upstream: &str) -> (Tap, String) {
        let tap = Tap {
            upstream: upstream.to_string(),
            seen: Arc::default(),
        };
        let app = Router::new().fallback(forward).with_state(tap.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (tap, url)
    }

    fn seen(&self) -> Vec<Tapped> {
        self.seen.lock().unwrap().clone()
    }
}

async fn forward(State(tap): State<Tap>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await.unwrap();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut headers = parts.headers.clone();
    for hop in [
        header::HOST,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::ACCEPT_ENCODING,
    ] {
        headers.remove(hop);
    }
    let answer = client()
        .request(parts.method.clone(), format!("{}{path}", tap.upstream))
        .headers(headers)
        .body(body.clone())
        .send()
        .await;
    let (status, content_type, answer_body) = match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            let ct = r.headers().get(header::CONTENT_TYPE).cloned();
            (status, ct, r.bytes().await.unwrap_or_default())
        }
        Err(_) => (502, None, Default::default()),
    };
    tap.seen.lock().unwrap().push(Tapped {
        path,
        headers: parts.headers,
        body: body.to_vec(),
        status,
        answer: answer_body.to_vec(),
    });
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        Body::from(answer_body),
    )
        .into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

/// What one client script sends, as the test expects ChurnZero to get it.
struct Expected {
    lib: Lib,
    version: &'static str,
    user_agent: String,
    /// Prefix of the fixed messageIds (`py-identify-1`, ...).
    prefix: &'static str,
    user: &'static str,
    account: &'static str,
    email: &'static str,
    first_name: &'static str,
    last_name: &'static str,
    company: &'static str,
    /// The script also sends the largest event its library lets through.
    largest: bool,
}

const FIXED: [&str; 7] = [
    "identify",
    "track",
    "group",
    "page",
    "screen",
    "alias",
    "anon-track",
];
const EVENT_DATE: &str = "2026-01-15T10:30:00.123Z";

impl Expected {
    fn fixed_ids(&self) -> BTreeSet<String> {
        FIXED
            .iter()
            .chain(self.largest.then_some(&"largest"))
            .map(|k| format!("{}-{k}-1", self.prefix))
            .collect()
    }

    /// Events one run sends: the fixed ones and one the library names.
    fn events(&self) -> i64 {
        self.fixed_ids().len() as i64 + 1
    }

    fn track(&self, name: &str, extra: Value) -> Value {
        let mut a = json!({"appKey": APP_KEY, "action": "trackEvent",
            "accountExternalId": self.account, "contactExternalId": self.user,
            "eventName": name, "eventDate": EVENT_DATE});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        a
    }

    /// The actions one run must produce: page and screen are off by default,
    /// alias sends nothing (it teaches the identity map, which the anonymous
    /// track then uses), and the id traits are not attributes.
    fn actions(&self) -> Vec<Value> {
        let mut actions = vec![
            json!({"appKey": APP_KEY, "action": "setAttribute",
                "accountExternalId": self.account, "contactExternalId": self.user,
                "entity": "contact", "attr_Email": self.email,
                "attr_FirstName": self.first_name, "attr_LastName": self.last_name,
                "attr_plan": "enterprise", "attr_seats": 12, "attr_beta": true}),
            self.track(
                "Report Exported",
                json!({"description": "Q3 board report", "quantity": 3}),
            ),
            json!({"appKey": APP_KEY, "action": "setAttribute",
                "accountExternalId": self.account, "contactExternalId": self.user,
                "entity": "account", "attr_Name": self.company, "attr_employees": 42}),
            self.track("Anonymous Click", json!({})),
            self.track("Library Id", json!({})),
        ];
        if self.largest {
            actions.push(self.track(
                "Largest Event",
                json!({"description": "at the library's size limit"}),
            ));
        }
        actions
    }
}

/// Actions as a sorted multiset, so batching and interleaving between
/// ordering keys do not matter, duplicates do.
fn multiset(actions: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = actions
        .iter()
        .map(|a| {
            // Sorted keys: compare content, not key order.
            let sorted: std::collections::BTreeMap<_, _> =
                a.as_object().expect("action object").iter().collect();
            serde_json::to_string(&sorted).unwrap()
        })
        .collect();
    v.sort();
    v
}

/// Waits until every accepted event is delivered and nothing else is left.
async fn settled(base: &str, delivered: i64) -> Value {
    let s = wait_status(base, "delivered", delivered).await;
    let s = if s["in_flight"] == 0 {
        s
    } else {
        wait_status(base, "in_flight", 0).await
    };
    for field in ["pending", "in_flight", "held", "dead", "filtered"] {
        assert_eq!(s[field], 0, "{field} in {s}");
    }
    s
}

/// Stored events: messageId -> (kind, payload).
async fn stored(db: &Path) -> HashMap<String, (String, Value)> {
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT message_id, kind, payload FROM events ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(id, kind, payload)| (id, (kind, serde_json::from_str(&payload).unwrap())))
        .collect()
}

async fn library_against_forwarder(exp: Expected, first_env: &[(&str, &str)]) {
    let lib = exp.lib;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = start(settings(&db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let (tap, tap_url) = Tap::start(&base).await;

    // First run, through the tap.
    let first = run_client(lib, &tap_url, first_env).await;
    assert_eq!(
        first.version,
        exp.version,
        "tests/compat pins {lib:?} library {}, but {} is installed: {}",
        exp.version,
        first.version,
        lib.install_hint()
    );
    let ids: BTreeSet<String> = first.message_ids.iter().cloned().collect();
    let fixed = exp.fixed_ids();
    let n = exp.events();
    assert_eq!(ids.len() as i64, n, "{:?}", first.message_ids);
    assert!(ids.is_superset(&fixed), "{ids:?}");
    let first_auto = ids.difference(&fixed).next().unwrap().clone();

    let requests = tap.seen();
    assert!(!requests.is_empty(), "the tap saw no request");
    let gzip = first_env.contains(&("SEGMENT_GZIP", "1"));
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    let mut wire_ids = BTreeSet::new();
    for r in &requests {
        assert_eq!(r.path, "/v1/batch", "{r:?}");
        assert_eq!(r.status, 200, "the forwarder refused {r:?}");
        // A `rejected` list would mean events lost silently: the libraries
        // take any 200 as delivered.
        let answer: Value = serde_json::from_slice(&r.answer).expect("JSON answer");
        assert_eq!(answer, json!({"success": true}));
        assert_eq!(r.header("authorization"), Some(auth.as_str()));
        assert_eq!(r.header("user-agent"), Some(exp.user_agent.as_str()));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.header("content-encoding"),
            gzip.then_some("gzip"),
            "Content-Encoding"
        );
        let body = r.json();
        assert_eq!(
            body["writeKey"], WRITE_KEY,
            "the body repeats the write key"
        );
        assert!(body["sentAt"].is_string(), "sentAt in {body}");
        for event in body["batch"].as_array().expect("a batch") {
            assert!(event["timestamp"].is_string(), "{event}");
            assert!(event["context"]["library"]["name"].is_string(), "{event}");
            wire_ids.insert(event["messageId"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(wire_ids, ids, "messageIds on the wire");

    let s = settled(&base, n).await;
    assert_eq!(s["accepted"], n, "{s}");
    assert_eq!(s["duplicates"], 0, "{s}");
    let expected = exp.actions();
    assert_eq!(multiset(&mock.state().actions()), multiset(&expected));

    // The outbox holds the library's own messageIds, its library context and
    // sentAt, the event's timestamp as given, and not the write key.
    let rows = stored(&db).await;
    assert_eq!(rows.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, (kind, payload)) in &rows {
        assert_eq!(payload["messageId"], id.as_str());
        assert_eq!(payload["type"], kind.as_str());
        assert!(payload.get("writeKey").is_none(), "{payload}");
        assert!(payload["sentAt"].is_string(), "{payload}");
        assert!(
            payload["context"]["library"]["version"] == exp.version,
            "{payload}"
        );
    }
    let track = &rows[&format!("{}-track-1", exp.prefix)].1;
    assert_eq!(track["timestamp"], EVENT_DATE);

    // Second run, straight at the forwarder: the fixed ids are duplicates,
    // only the id the library assigns is new.
    let second = run_client(lib, &base, &[]).await;
    let ids2: BTreeSet<String> = second.message_ids.iter().cloned().collect();
    assert!(ids2.is_superset(&fixed), "{ids2:?}");
    let second_auto = ids2.difference(&fixed).next().unwrap().clone();
    assert_ne!(first_auto, second_auto, "the library reused its own id");

    let s = settled(&base, n + 1).await;
    assert_eq!(s["accepted"], n + 1, "{s}");
    assert_eq!(s["duplicates"], n - 1, "{s}");
    let mut expected = expected;
    expected.push(exp.track("Library Id", json!({})));
    assert_eq!(multiset(&mock.state().actions()), multiset(&expected));
    assert_eq!(
        tap.seen().len(),
        requests.len(),
        "the second run bypasses the tap"
    );
    assert!(stored(&db).await.contains_key(&second_auto));

    server.shutdown().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn python_library_is_accepted_forwarded_and_deduplicated() {
    if !Lib::Python.ready() {
        return;
    }
    let exp = Expected {
        lib: Lib::Python,
        version: PYTHON_LIB_VERSION,
        user_agent: format!("analytics-python/{PYTHON_LIB_VERSION}"),
        prefix: "py",
        user: "py-user",
        account: "py-account",
        email: "ada@example.com",
        first_name: "Ada",
        last_name: "Lovelace",
        company: "Analytical Engines Ltd",
        largest: true,
    };
    // The library's gzip is off by default: the first run turns it on, the
    // second leaves it off.
    library_against_forwarder(exp, &[("SEGMENT_GZIP", "1")]).await;
}

#[tokio::test]
async fn node_library_is_accepted_forwarded_and_deduplicated() {
    if !Lib::Node.ready() {
        return;
    }
    let exp = Expected {
        lib: Lib::Node,
        version: NODE_LIB_VERSION,
        user_agent: "analytics-node-next/latest".into(),
        prefix: "node",
        user: "node-user",
        account: "node-account",
        email: "grace@example.com",
        first_name: "Grace",
        last_name: "Hopper",
        company: "Compiler Works Inc",
        // The Node library's own size estimate is not a byte count, so it has
        // no exact limit to probe.
        largest: false,
    };
    library_against_forwarder(exp, &[]).await;
}
