//! A `postgres://` `--database` is refused with a sentence that says so,
//! instead of being read as a relative file path (which used to start a
//! SQLite outbox in a directory named `postgres:`), and without repeating
//! the password the URL carries.

mod common;

use common::*;

const URL: &str = "postgres://forwarder:s3cret-pass@127.0.0.1:5432/outbox";

async fn run_in(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(binary_path())
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("binary runs");
    let stderr =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), stderr)
}

#[tokio::test]
async fn a_postgres_url_is_refused_by_serve_status_and_dead() {
    let dir = tempfile::tempdir().unwrap();
    let serve = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        URL,
        "--write-key",
        "wk",
        "--churnzero-url",
        "http://127.0.0.1:9",
        "--churnzero-app-key",
        "app",
    ];
    for args in [
        &serve[..],
        &["status", "--database", URL][..],
        &["dead", "list", "--database", URL][..],
    ] {
        let (code, out) = run_in(dir.path(), args).await;
        assert_ne!(code, 0, "{args:?} must fail: {out}");
        assert!(
            out.contains("a PostgreSQL outbox cannot be opened by this version yet"),
            "{args:?}: {out}"
        );
        assert!(
            !out.contains("s3cret-pass"),
            "{args:?} repeated the password: {out}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "nothing may be created: {left:?}");
}
