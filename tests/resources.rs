//! Bounded resources against the real binary: one client address cannot
//! take every connection (or file descriptor), idle connections give way
//! when the connection budget is nearly used, and request bodies that stall
//! before their last bytes cannot take the memory.
//!
//! Loopback only; the client addresses are 127.0.0.x, which Linux routes to
//! the loopback interface without configuration.

mod common;

use base64::Engine;
use common::*;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Starts `serve` under `prlimit --nofile=SOFT:HARD` (when given) and waits
/// for `/readyz`.
async fn serve_limited(
    db: &Path,
    churnzero_url: &str,
    extra: &[&str],
    nofile: Option<&str>,
) -> Binary {
    let port = free_port();
    let log = db.with_extension(format!("log.{port}"));
    let logfile = std::fs::File::create(&log).unwrap();
    let mut cmd = match nofile {
        Some(limit) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={limit}"))
                .arg("--")
                .arg(binary_path());
            c
        }
        None => Command::new(binary_path()),
    };
    cmd.arg("serve")
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
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(logfile);
    let child = cmd.spawn().expect("binary starts");
    let mut b = Binary {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    b.wait_ready().await;
    b
}

fn server_addr(b: &Binary) -> SocketAddr {
    b.base.trim_start_matches("http://").parse().unwrap()
}

/// A TCP connection to `to` from the local address `from`.
async fn connect_from(
    from: IpAddr,
    to: SocketAddr,
    within: Duration,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(within, socket.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Opens `n` connections from `from`, each with half a request header,
/// and keeps them. Gives up after ten connects in a row time out (the
/// server's backlog is full).
async fn half_open(from: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    let mut failed_in_a_row = 0;
    for _ in 0..n {
        match connect_from(from, to, Duration::from_millis(500)).await {
            Ok(mut s) => {
                failed_in_a_row = 0;
                let _ = s
                    .write_all(b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
                    .await;
                held.push(s);
            }
            Err(_) => {
                failed_in_a_row += 1;
                if failed_in_a_row == 10 {
                    break;
                }
            }
        }
    }
    held
}

/// A track from `from` on a fresh connection, which must be answered 200
/// within `deadline`.
async fn track_from(base: &str, from: IpAddr, deadline: Duration, n: usize) {
    let client = reqwest::Client::builder()
        .local_address(from)
        .pool_max_idle_per_host(0)
        .timeout(deadline)
        .build()
        .unwrap();
    let r = client
        .post(format!("{base}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&track("u-legit", "Legit", n))
        .send()
        .await
        .unwrap_or_else(|e| panic!("try {n}: no answer within {deadline:?}: {e}"));
    assert_eq!(r.status().as_u16(), 200, "try {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_from_one_address_leave_room_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    // The common default: a soft limit below a hard one of 1,024.
    let server = serve_limited(&db, &mock.url(), &[], Some("256:1024")).await;
    let addr = server_addr(&server);
    let attacker: IpAddr = [127, 0, 0, 2].into();
    let held = half_open(attacker, addr, 2000).await;
    // The attacker keeps re-opening while the other client tries.
    let reopen = tokio::spawn(async move { half_open(attacker, addr, 1000).await });
    // Answered well inside the 15 s that a half-open connection may hold
    // its slot (the header read timeout), so no answer waited for one of
    // the attacker's slots to time out. One second was too tight on a
    // loaded 2-core CI machine, with the attacker re-opening meanwhile.
    for n in 0..5 {
        track_from(
            &server.base,
            [127, 0, 0, 1].into(),
            Duration::from_secs(5),
            n,
        )
        .await;
    }
    let more = reopen.await.unwrap();
    drop((held, more));
    let logs = server.logs();
    assert!(!logs.contains("Too many open files"), "{logs}");
    assert!(
        logs.contains("soft_at_start=256") && logs.contains("soft=1024 hard=1024"),
        "the raised open-file limit is logged: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_give_way_near_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = serve_limited(
        &db,
        &mock.url(),
        &[
            "--max-connections",
            "16",
            "--max-connections-per-client",
            "0",
        ],
        None,
    )
    .await;
    let addr = server_addr(&server);
    // Sixteen slow-header connections fill the budget.
    let mut held = half_open([127, 0, 0, 3].into(), addr, 16).await;
    assert_eq!(held.len(), 16);
    // Answered well inside the 15 s that a half-open connection may hold
    // its slot (the header read timeout), so no answer waited for one of
    // the attacker's slots to time out. One second was too tight on a
    // loaded 2-core CI machine, with the attacker re-opening meanwhile.
    for n in 0..5 {
        track_from(
            &server.base,
            [127, 0, 0, 1].into(),
            Duration::from_secs(5),
            n,
        )
        .await;
    }
    // Those that made room were closed by the server: reading gives EOF
    // (or a reset), not a timeout.
    let mut closed = 0;
    for s in &mut held {
        let mut buf = [0u8; 64];
        if let Ok(r) = tokio::time::timeout(
            Duration::from_millis(50),
            tokio::io::AsyncReadExt::read(s, &mut buf),
        )
        .await
        {
            if matches!(r, Ok(0) | Err(_)) {
                closed += 1;
            }
        }
    }
    assert!(closed >= 1, "an idle connection was closed to make room");
}

/// Size of each stalled body: just under the 500 KB request limit.
const STALLED_BODY: usize = 499 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_cannot_take_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let mut server = serve_limited(&db, &mock.url(), &[], None).await;
    let addr = server_addr(&server);
    let before = server.peak_rss_kib().expect("VmHWM readable");

    // A valid-looking batch, padded to size; its last bytes never come.
    let mut body =
        br#"{"batch":[{"type":"track","userId":"u","event":"E","properties":{"pad":""#.to_vec();
    body.resize(STALLED_BODY - 4, b'x');
    body.extend_from_slice(br#""}}]}"#);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(&body[..body.len() - 16]);
    let request: &'static [u8] = Box::leak(request.into_boxed_slice());

    let mut tasks = Vec::new();
    for i in 0..2000usize {
        let from: IpAddr = [127, 0, 0, 1 + (i % 200) as u8].into();
        tasks.push(tokio::spawn(async move {
            // A SYN dropped by a full backlog is sent again after a second.
            let mut s = connect_from(from, addr, Duration::from_secs(5))
                .await
                .ok()?;
            // Refused requests are answered and closed: the write may fail.
            let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(request)).await;
            Some(s)
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        if let Some(s) = t.await.unwrap() {
            streams.push(s);
        }
    }
    assert!(streams.len() > 1900, "connected: {}", streams.len());

    // Every byte sent is in the server's socket buffers or read by now;
    // watch the peak while the server works through them, and meanwhile a
    // client from another address is served.
    let other: IpAddr = [127, 0, 0, 250].into();
    track_from(&server.base, other, Duration::from_secs(2), 0).await;
    for n in 1..=10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let peak = server.peak_rss_kib().unwrap();
        assert!(
            peak < 256 * 1024,
            "peak RSS {} MB with 2,000 stalled bodies (was {} MB before)",
            peak / 1024,
            before / 1024
        );
        if n % 5 == 0 {
            track_from(&server.base, other, Duration::from_secs(2), n).await;
        }
    }
    eprintln!(
        "peak RSS with 2,000 stalled bodies: {} MB (before: {} MB)",
        server.peak_rss_kib().unwrap() / 1024,
        before / 1024
    );
    assert!(server.alive());
    drop(streams);
    // An ordinary batch still goes through once the stalled ones are gone.
    let (code, body) = post(
        &server.base,
        "/v1/batch",
        &json!({"batch": [track("u-after", "After", 1)]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

/// Reads what the server answers on `s` within `within`, as text.
async fn answer(s: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        loop {
            match tokio::io::AsyncReadExt::read(s, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).to_ascii_lowercase()
}

fn batch_head(auth: &str, framing: &str) -> String {
    format!(
        "POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\n{framing}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_fit_the_budget_is_refused_unread_or_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = serve_limited(&db, &mock.url(), &["--max-body-memory", "1MB"], None).await;
    let addr = server_addr(&server);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));

    // A holds 450,000 bytes of the budget with a declared body it stalls.
    let mut a = connect_from([127, 0, 0, 5].into(), addr, Duration::from_secs(5))
        .await
        .unwrap();
    a.write_all(batch_head(&auth, "Content-Length: 450000").as_bytes())
        .await
        .unwrap();
    a.write_all(&[b' '; 1000]).await.unwrap();
    // A second declared body of the same size no longer fits (large bodies
    // get three quarters of 1 MB): it is answered at once, before any of its
    // body is sent. Should the server take this one before A, it holds the
    // reservation instead, and the next one is refused; so each is kept.
    let started = std::time::Instant::now();
    let mut kept = Vec::new();
    let refused = loop {
        let mut b = connect_from([127, 0, 0, 6].into(), addr, Duration::from_secs(5))
            .await
            .unwrap();
        b.write_all(batch_head(&auth, "Content-Length: 450000").as_bytes())
            .await
            .unwrap();
        let text = answer(&mut b, Duration::from_millis(500)).await;
        if text.starts_with("http/1.1 503") {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never refused: {text}"
        );
        kept.push(b);
    };
    assert!(refused.contains("retry-after: 1"), "{refused}");

    // A chunked body reserves as it arrives, and is refused once it no
    // longer fits.
    let mut c = connect_from([127, 0, 0, 7].into(), addr, Duration::from_secs(5))
        .await
        .unwrap();
    c.write_all(batch_head(&auth, "Transfer-Encoding: chunked").as_bytes())
        .await
        .unwrap();
    let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
    let mut text = String::new();
    for _ in 0..40 {
        if c.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        text = answer(&mut c, Duration::from_millis(20)).await;
        if !text.is_empty() {
            break;
        }
    }
    assert!(text.starts_with("http/1.1 503"), "chunked body: {text:?}");
    assert!(text.contains("retry-after: 1"), "{text}");

    // A small call still fits while A stalls.
    track_from(
        &server.base,
        [127, 0, 0, 8].into(),
        Duration::from_secs(2),
        0,
    )
    .await;
    drop(a);
}

/// The allocator maps its memory in large aligned regions. Where the kernel
/// backs those with transparent huge pages (its `always` mode, or `madvise`
/// with the allocator asking for them), a few touched bytes commit 2 MiB:
/// a drain's peak RSS rose from 62 to 103 MB when claims grew from four to
/// eight requests' worth, for no speed. The process turns them off for
/// itself at start, which `/proc/<pid>/status` shows as `THP_enabled: 0`.
#[tokio::test]
async fn the_process_runs_without_transparent_huge_pages() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        own.lines().any(|l| l.starts_with("THP_enabled:")),
        "this kernel does not report THP_enabled; the test needs Linux 6.x"
    );
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = Binary::serve(&dir.path().join("o.db"), &mock.url(), &[]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}
