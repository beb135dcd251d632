//! The real browser library in a real browser: headless Chromium loads a
//! page from another origin (its own port) that uses `@segment/analytics-next`
//! from npm (pinned in tests/browser/package-lock.json, its prebuilt
//! `dist/umd` bundle), configured only with `cdnURL` = the forwarder. The page
//! sends identify, group, track and page with the standard strategy, then
//! again with the batching strategy. The library fetches its settings from
//! the forwarder, posts cross-origin (CORS preflights included), and the
//! mock ChurnZero must receive each mapped action exactly once: no request
//! failed, so nothing was retried. A third page runs the README's snippet
//! as written there (with the test's addresses and key), loading the
//! package's `dist/umd/standalone.js` as the self-hosted `analytics.min.js`.
//!
//! Needs /usr/bin/chromium (Debian's `chromium`) and node/npm; the npm
//! packages are installed by the test with `npm ci` into
//! target/test-deps/browser. Without Chromium the test is skipped with a
//! loud line, unless CI=true, where it fails.

mod common;

use axum::Router;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// `npm ci` of tests/browser into target/test-deps/browser, once per lock
/// file content. A lock directory (created atomically) keeps parallel runs
/// from installing over each other.
fn install_deps() -> PathBuf {
    let deps = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/browser");
    std::fs::create_dir_all(&deps).unwrap();
    let lock_text = std::fs::read(browser_dir().join("package-lock.json")).unwrap();
    let stamp = deps.join(format!("installed-{:016x}", fnv(&lock_text)));
    let lock = deps.join(".installing");
    let started = Instant::now();
    loop {
        if stamp.exists() {
            return deps;
        }
        match std::fs::create_dir(&lock) {
            Ok(()) => break,
            Err(_) if started.elapsed() < Duration::from_secs(300) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(_) => panic!(
                "{} held for 5 minutes; remove it if no install runs",
                lock.display()
            ),
        }
    }
    let result = (|| {
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(browser_dir().join(f), deps.join(f))?;
        }
        let out = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&deps)
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        std::fs::write(&stamp, b"")
    })();
    let _ = std::fs::remove_dir(&lock);
    if let Err(e) = result {
        panic!("npm ci in {} failed: {e}", deps.display());
    }
    deps
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The README's analytics.js snippet: the html block after its marker line.
fn readme_snippet() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = readme
        .split_once("<!-- snippet: analytics.js")
        .expect("README marks its snippet")
        .1;
    let block = after.split_once("```html\n").expect("an html block").1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

/// The snippet page: the README's snippet, pointed at this test's servers,
/// then the same four calls as page.html, through the snippet's stub.
fn snippet_page(page_origin: &str, forwarder: &str) -> String {
    let snippet = readme_snippet();
    for placeholder in [
        "https://static.example.com/analytics.min.js",
        "https://events.example.com",
        "my-write-key",
    ] {
        assert!(
            snippet.contains(placeholder),
            "the snippet has {placeholder}"
        );
    }
    let snippet = snippet
        .replace(
            "https://static.example.com/analytics.min.js",
            &format!("{page_origin}analytics.min.js"),
        )
        .replace("https://events.example.com", forwarder)
        .replace("my-write-key", WRITE_KEY);
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>snippet</title>
{snippet}</head><body><script>
analytics.identify('snip-user', {{ email: 'snip@example.com', accountExternalId: 'snip-acct' }});
analytics.group('snip-acct', {{ name: 'snip Inc' }});
analytics.track('snip Clicked', {{ description: 'from snip' }});
analytics.page('Docs', 'snip Home');
// The snippet's page(), then these four: five posts.
analytics.ready(function () {{ window.__done = {{ ok: true, failed: [], posts: 5 }} }});
</script></body></html>"#
    )
}

/// The page's own origin: a tiny static server on another port.
async fn page_server(forwarder: &str, umd: PathBuf) -> (String, tokio::task::JoinHandle<()>) {
    let html = std::fs::read_to_string(browser_dir().join("page.html"))
        .unwrap()
        .replace("__FORWARDER__", forwarder)
        .replace("__WRITE_KEY__", WRITE_KEY);
    let js = std::fs::read(umd.join("index.js")).expect("the package's dist/umd/index.js");
    let standalone = std::fs::read(umd.join("standalone.js")).expect("dist/umd/standalone.js");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let snippet = snippet_page(&url, forwarder);
    let app = Router::new()
        .route("/snippet.html", get(move || async move { Html(snippet) }))
        .route(
            "/analytics.min.js",
            get(move || async move {
                ([("content-type", "text/javascript")], standalone).into_response()
            }),
        )
        .route("/", get(move || async move { Html(html) }))
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route(
            "/analytics-next.js",
            get(move || async move { ([("content-type", "text/javascript")], js).into_response() }),
        );
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

#[tokio::test]
async fn analytics_next_in_chromium_from_another_origin() {
    if !Path::new(CHROMIUM).exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{CHROMIUM} is missing: install Debian's chromium package");
        }
        eprintln!(
            "!!!!! SKIPPED browser_clients: {CHROMIUM} not found (apt-get install chromium) !!!!!"
        );
        return;
    }
    let deps = tokio::task::spawn_blocking(install_deps).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, "page_events = true\n").unwrap();
    let mock = mock().await;
    let mut s = settings(&dir.path().join("o.db"), &mock.url());
    s.mapping = Some(mapping);
    let server = start(s).await;
    let forwarder = format!("http://{}", server.addr);
    let (page_url, page_task) = page_server(
        &forwarder,
        deps.join("node_modules/@segment/analytics-next/dist/umd"),
    )
    .await;
    assert_ne!(page_url.trim_end_matches('/'), forwarder, "two origins");

    let profiles = dir.path().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg(browser_dir().join("drive.mjs"))
            .env("DEPS_DIR", &deps)
            .env("CHROMIUM", CHROMIUM)
            .env("PAGE_URL", &page_url)
            .env("FORWARDER", &forwarder)
            .env("PROFILE_DIR", &profiles)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser run finishes within 2 minutes")
    .expect("node runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "driver failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "driver output: {e}: {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    eprintln!("browser report: {report:#}");

    for (strategy, expected_posts) in [
        ("standard", &["/v1/i", "/v1/g", "/v1/t", "/v1/p"][..]),
        ("batching", &["/v1/b"][..]),
        (
            "snippet",
            &["/v1/p", "/v1/i", "/v1/g", "/v1/t", "/v1/p"][..],
        ),
    ] {
        let r = &report[strategy];
        assert_eq!(r["outcome"]["ok"], true, "{strategy}: {r:#}");
        assert!(
            r["outcome"]["failed"]
                .as_array()
                .unwrap()
                .iter()
                .all(Value::is_null),
            "{strategy}: a call failed: {r:#}"
        );
        assert_eq!(
            r["failed"],
            serde_json::json!([]),
            "{strategy}: a request failed (CORS?)"
        );
        let cors_errors: Vec<&Value> = r["consoleErrors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.as_str().unwrap_or("").contains("CORS"))
            .collect();
        assert!(cors_errors.is_empty(), "{strategy}: {cors_errors:?}");
        let seen = r["seen"].as_array().unwrap();
        // The settings fetch came to the forwarder...
        assert!(
            seen.iter().any(|x| x["method"] == "GET"
                && x["path"] == format!("/v1/projects/{WRITE_KEY}/settings")
                && x["status"] == 200),
            "{strategy}: {seen:?}"
        );
        // ...and every post to it was answered 200, once per call.
        let posts: Vec<&str> = seen
            .iter()
            .filter(|x| x["method"] == "POST")
            .map(|x| {
                assert_eq!(x["status"], 200, "{strategy}: {x}");
                x["path"].as_str().unwrap()
            })
            .collect();
        // The snippet replays its buffered calls at once: answers may come
        // in any order.
        let (mut posts, mut expected_posts) = (posts, expected_posts.to_vec());
        posts.sort_unstable();
        expected_posts.sort_unstable();
        assert_eq!(posts, expected_posts, "{strategy}");
    }

    // Each mapped action reached ChurnZero exactly once. The snippet's own
    // `analytics.page()` (no name) is a 13th event: delivered as `Viewed
    // Page` when the library has applied the buffered identify to it,
    // else held as an anonymous visitor's.
    let base = forwarder.clone();
    let st = wait_for("all 13 events settled", Duration::from_secs(60), || {
        let base = base.clone();
        async move {
            let s = status(&base).await;
            let settled = s["delivered"].as_i64()? + s["held"].as_i64()?;
            (settled == 13 && s["pending"] == 0 && s["in_flight"] == 0).then_some(s)
        }
    })
    .await;
    assert_eq!(st["accepted"], 13, "{st}");
    assert_eq!(st["duplicates"], 0, "a call was sent twice: {st}");
    let actions = mock.state().actions();
    let snippet_page_views = actions
        .iter()
        .filter(|a| a["eventName"] == "Viewed Page")
        .count();
    assert_eq!(
        snippet_page_views as i64,
        1 - st["held"].as_i64().unwrap(),
        "{actions:#?}"
    );
    for p in ["std", "batch", "snip"] {
        let count = |pred: &dyn Fn(&Value) -> bool| actions.iter().filter(|a| pred(a)).count();
        let acct = format!("{p}-acct");
        let user = format!("{p}-user");
        let mine = |a: &Value| {
            a["accountExternalId"] == acct.as_str() && a["contactExternalId"] == user.as_str()
        };
        assert_eq!(
            count(&|a| mine(a)
                && a["entity"] == "contact"
                && a["attr_Email"] == format!("{p}@example.com")),
            1,
            "{p} identify: {actions:#?}"
        );
        assert_eq!(
            count(&|a| mine(a) && a["entity"] == "account" && a["attr_Name"] == format!("{p} Inc")),
            1,
            "{p} group"
        );
        assert_eq!(
            count(&|a| mine(a) && a["eventName"] == format!("{p} Clicked")),
            1,
            "{p} track"
        );
        assert_eq!(
            count(&|a| mine(a) && a["eventName"] == format!("Viewed {p} Home Page")),
            1,
            "{p} page"
        );
    }
    assert_eq!(actions.len(), 12 + snippet_page_views, "{actions:#?}");
    page_task.abort();
    server.shutdown().await;
    mock.shutdown().await;
}
