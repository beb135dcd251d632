//! A `postgres://` `--database` is a PostgreSQL server, never a relative
//! file path (which once started a SQLite outbox in a directory named
//! `postgres:`): with no server there, serve, status and dead fail with a
//! sentence that names PostgreSQL, create nothing, and never repeat the
//! password the URL carries.

mod common;

use common::*;

/// Port 9 (discard) has no server on the test machines.
const URL: &str = "postgres://forwarder:s3cret-pass@127.0.0.1:9/outbox";

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
async fn a_postgres_url_without_a_server_fails_clearly_and_creates_nothing() {
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
        assert!(out.contains("PostgreSQL is unreachable"), "{args:?}: {out}");
        assert!(
            !out.contains("s3cret-pass"),
            "{args:?} repeated the password: {out}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "nothing may be created: {left:?}");
}
