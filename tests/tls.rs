//! HTTPS served by the binary itself (`--tls-cert`, `--tls-key`): a
//! self-signed certificate made here, curl over HTTP/2 and HTTP/1.1, the
//! official Node library (npm `@segment/analytics-node`, unchanged) trusting
//! the certificate through NODE_EXTRA_CA_CERTS, the connection budget on TLS
//! connections, and bad files that stop `serve` with a message naming them.

mod common;

use common::*;
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM
/// files into `dir`: (certificate, key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn https_client(ca: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Starts `serve` over TLS and waits until `/readyz` answers over https.
async fn serve_tls(
    db: &Path,
    churnzero_url: &str,
    cert: &Path,
    key: &Path,
    extra: &[&str],
) -> Binary {
    let port = free_port();
    let log = db.with_extension(format!("log.{port}"));
    let logfile = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary_path())
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--database")
        .arg(db)
        .args([
            "--write-key",
            WRITE_KEY,
            "--churnzero-url",
            churnzero_url,
            "--churnzero-app-key",
            APP_KEY,
            "--flush-interval",
            "50ms",
        ])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(logfile)
        .spawn()
        .expect("binary starts");
    let mut b = Binary {
        child,
        base: format!("https://127.0.0.1:{port}"),
        log,
    };
    let client = https_client(cert);
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{}/readyz", b.base)).send().await {
            if r.status().is_success() {
                return b;
            }
        }
        if !b.alive() || started.elapsed() > Duration::from_secs(30) {
            panic!("TLS server not ready: {}", b.logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn https_status(client: &reqwest::Client, base: &str) -> Value {
    client
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// curl posts one track; returns (HTTP status, HTTP version curl used).
async fn curl_track(base: &str, ca: &Path, version_flag: &str, id: &str) -> (String, String) {
    let body = json!({"type": "track", "userId": "u-tls", "event": "Over TLS", "messageId": id,
        "properties": {"description": id},
        "context": {"traits": {"accountExternalId": "acct", "contactExternalId": "u-tls"}}});
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", version_flag, "--cacert"])
        .arg(ca)
        .args(["-u", &format!("{WRITE_KEY}:")])
        .args(["-H", "Content-Type: application/json"])
        .args(["-d", &body.to_string()])
        .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
        .arg(format!("{base}/v1/track"))
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, version) = text.split_once(' ').unwrap();
    (code.to_string(), version.to_string())
}

#[tokio::test]
async fn curl_posts_over_https_with_http2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = serve_tls(&db, &mock.url(), &cert, &key, &[]).await;
    assert_eq!(
        curl_track(&server.base, &cert, "--http2", "tls-h2").await,
        ("200".into(), "2".into()),
        "HTTP/2 chosen by ALPN"
    );
    assert_eq!(
        curl_track(&server.base, &cert, "--http1.1", "tls-h1").await,
        ("200".into(), "1.1".into())
    );
    // reqwest negotiates HTTP/2 too.
    let client = https_client(&cert);
    let r = client
        .post(format!("{}/v1/track", server.base))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&track("u-tls", "Over TLS", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status().as_u16(), 200);
    let started = Instant::now();
    loop {
        let s = https_status(&client, &server.base).await;
        if s["delivered"] == json!(3) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let descriptions: Vec<String> = mock
        .state()
        .actions()
        .iter()
        .filter_map(|a| a["description"].as_str().map(String::from))
        .collect();
    assert!(
        descriptions.contains(&"tls-h2".to_string()),
        "{descriptions:?}"
    );
    assert!(
        descriptions.contains(&"tls-h1".to_string()),
        "{descriptions:?}"
    );
}

/// Plain TCP connections that never start their handshake hold places like
/// slow-header ones; near the budget they give way, and a client from
/// another address is served.
#[tokio::test]
async fn stalled_handshakes_give_way_and_per_client_caps_hold_on_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = serve_tls(
        &db,
        &mock.url(),
        &cert,
        &key,
        &[
            "--max-connections",
            "8",
            "--max-connections-per-client",
            "4",
        ],
    )
    .await;
    let addr: SocketAddr = server.base.trim_start_matches("https://").parse().unwrap();
    let connect = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(IpAddr::from([127, 0, 0, last]), 0))
            .unwrap();
        socket.connect(addr).await.unwrap()
    };
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(connect(2).await);
    }
    // A fifth from 127.0.0.2 is over its cap: closed at once, before any
    // handshake.
    let mut fifth = connect(2).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut fifth, &mut buf),
    )
    .await
    .expect("the connection over the cap is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    for last in [3u8, 4] {
        for _ in 0..4 {
            stalled.push(connect(last).await);
        }
    }
    // The budget of 8 is full of stalled handshakes; curl still gets in.
    for n in 0..3 {
        assert_eq!(
            curl_track(&server.base, &cert, "--http2", &format!("budget-{n}"))
                .await
                .0,
            "200"
        );
    }
    drop(stalled);
}

#[tokio::test]
async fn bad_tls_files_stop_serve_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let db = dir.path().join("o.db");
    let db_arg = db.to_str().unwrap();
    let base = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        db_arg,
        "--write-key",
        WRITE_KEY,
        "--churnzero-url",
        "http://127.0.0.1:9",
        "--churnzero-app-key",
        APP_KEY,
    ];
    let run = |extra: Vec<String>| {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(extra);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, _, stderr) = run_binary(&args).await;
            assert_ne!(code, 0, "serve must not start: {stderr}");
            stderr
        }
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let stderr = run(vec![
        "--tls-cert".into(),
        p(&garbage),
        "--tls-key".into(),
        p(&key),
    ])
    .await;
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("garbage.pem"),
        "{stderr}"
    );
    assert!(stderr.contains("no certificate"), "{stderr}");

    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let stderr = run(vec![
        "--tls-cert".into(),
        p(&broken),
        "--tls-key".into(),
        p(&key),
    ])
    .await;
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("broken.pem"),
        "{stderr}"
    );

    let missing = dir.path().join("missing-key.pem");
    let stderr = run(vec![
        "--tls-cert".into(),
        p(&cert),
        "--tls-key".into(),
        p(&missing),
    ])
    .await;
    assert!(
        stderr.contains("--tls-key") && stderr.contains("missing-key.pem"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );

    // A key file holding a certificate only.
    let stderr = run(vec![
        "--tls-cert".into(),
        p(&cert),
        "--tls-key".into(),
        p(&cert),
    ])
    .await;
    assert!(
        stderr.contains("--tls-key") && stderr.contains("no private key"),
        "{stderr}"
    );

    // The key of another certificate.
    let other = tempfile::tempdir().unwrap();
    let (_, other_key) = self_signed(other.path());
    let stderr = run(vec![
        "--tls-cert".into(),
        p(&cert),
        "--tls-key".into(),
        p(&other_key),
    ])
    .await;
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("--tls-key"),
        "{stderr}"
    );
    assert!(stderr.contains("does not belong"), "{stderr}");

    // One without the other.
    let stderr = run(vec!["--tls-cert".into(), p(&cert)]).await;
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let stderr = run(vec!["--tls-key".into(), p(&key)]).await;
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(!db.exists(), "nothing was created before the refusal");
}

#[tokio::test]
async fn the_official_node_library_posts_over_https() {
    // The pinned library, installed under target/ on first use.
    let dir = tokio::task::spawn_blocking(common::node_compat_dir)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(tmp.path());
    let db = tmp.path().join("o.db");
    let mock = mock().await;
    let server = serve_tls(&db, &mock.url(), &cert, &key, &[]).await;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(std::env::var("NODE").unwrap_or_else(|_| "node".into()))
            .arg(dir.join("node_client.mjs"))
            .current_dir(&dir)
            .env("SEGMENT_HOST", &server.base)
            .env("SEGMENT_WRITE_KEY", WRITE_KEY)
            .env("NODE_EXTRA_CA_CERTS", &cert)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Node client finishes")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Node client failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        report["message_ids"].as_array().map(Vec::len),
        Some(8),
        "{report}"
    );
    let client = https_client(&cert);
    let started = Instant::now();
    loop {
        let names: Vec<String> = mock
            .state()
            .actions()
            .iter()
            .filter_map(|a| a["eventName"].as_str().map(String::from))
            .collect();
        if names.iter().any(|n| n == "Report Exported") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing from the Node library at the mock: {names:?}; status {}",
            https_status(&client, &server.base).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that connects and never starts its handshake loses the
/// connection at the handshake deadline (10 s), rather than holding it.
#[tokio::test]
async fn a_handshake_that_never_starts_is_closed_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = serve_tls(&db, &mock.url(), &cert, &key, &[]).await;
    let addr: SocketAddr = server.base.trim_start_matches("https://").parse().unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("closed by the server within 20 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "not before its deadline: {:?}",
        started.elapsed()
    );
}

/// An HTTP/2 connection that carries no request is closed after the header
/// deadline (15 s), as an idle HTTP/1.1 connection is: HTTP/2 has no such
/// deadline of its own.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_at_the_header_deadline() {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = serve_tls(&db, &mock.url(), &cert, &key, &[]).await;
    let addr: SocketAddr = server.base.trim_start_matches("https://").parse().unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The connection preface and an empty SETTINGS frame, then nothing.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's SETTINGS and its ACK
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection stayed open");
    assert!(
        started.elapsed() >= Duration::from_secs(14),
        "not before the deadline: {:?}",
        started.elapsed()
    );
}
