//! The ChurnZero client reads only the head of an error answer: an error
//! page of megabytes, here one whose rest never arrives, yields its excerpt
//! at once instead of being downloaded whole (or waited for until the
//! request timeout).

use churnzero_forwarder::churnzero::client::{ChurnZeroClient, SendOutcome};
use churnzero_forwarder::secret::Secret;
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server that answers every request with a 400 announcing 8 MB of body,
/// sends the first 64 KB of it and then stalls with the connection open.
async fn stalling_error_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // The request: headers, then its Content-Length of body.
                let mut seen = Vec::new();
                let mut buf = [0u8; 8192];
                let body_start = loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let head = String::from_utf8_lossy(&seen[..body_start]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while seen.len() - body_start < length {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\
                          content-length: 8000000\r\n\r\n",
                    )
                    .await;
                let _ = sock.write_all(&[b'x'; 64 * 1024]).await;
                tokio::time::sleep(Duration::from_secs(120)).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_endless_error_body_is_cut_to_its_excerpt_without_being_read_whole() {
    let url = stalling_error_server().await;
    // The request timeout is far away: only a bounded read ends this soon.
    let client = ChurnZeroClient::new(&url, Secret::new("k"), Duration::from_secs(60)).unwrap();
    let mut action = Map::new();
    action.insert("action".into(), Value::String("trackEvent".into()));
    let outcome = tokio::time::timeout(Duration::from_secs(20), client.send(&[action]))
        .await
        .expect("the client waited for the rest of an 8 MB error body");
    match outcome {
        SendOutcome::Rejected { status, error } => {
            assert_eq!(status, 400);
            assert_eq!(error, format!("HTTP 400: {}", "x".repeat(300)));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}
