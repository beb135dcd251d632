//! The HTTP side of ChurnZero: `POST {base}/i` with a JSON array of actions.
//! The app key is added here, at send time, so it is never stored in the
//! outbox, and any echo of it in an answer is redacted before it becomes an
//! error message.

use crate::secret::Secret;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use std::borrow::Borrow;
use std::time::Duration;

/// One action as sent: `appKey` first, then the action's own members in
/// their order (an `appKey` of its own is never sent).
struct WithKey<'a> {
    key: &'a str,
    action: &'a Map<String, Value>,
}

impl Serialize for WithKey<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("appKey", self.key)?;
        for (k, v) in self.action {
            if k != "appKey" {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// Longest excerpt of an answer body kept in a dead letter's reason.
const BODY_EXCERPT: usize = 300;
/// Most bytes of an error answer read to cut that excerpt from. The rest is
/// never read: an error page of megabytes (or one that never ends) costs
/// neither memory nor the time to download it.
pub const ERROR_BODY_READ: usize = 4096;
/// Most bytes of a success answer (a 43-byte GIF from ChurnZero) read.
const SUCCESS_BODY_READ: usize = 64 * 1024;

/// How ChurnZero answered one request.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// 2xx: every action in the request is delivered.
    Accepted { status: u16 },
    /// Connection errors, timeouts, 408, 429, 5xx: try again later.
    Retryable {
        error: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// Other 4xx: the request (or an action in it) is refused for good.
    Rejected { status: u16, error: String },
}

/// A ChurnZero endpoint with its app key.
#[derive(Clone)]
pub struct ChurnZeroClient {
    http: reqwest::Client,
    endpoint: String,
    app_key: Secret,
}

impl std::fmt::Debug for ChurnZeroClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChurnZeroClient")
            .field("endpoint", &self.endpoint)
            .field("app_key", &self.app_key)
            .finish()
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs));
        }
    }
    let at = chrono::DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&chrono::Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// The first `limit` bytes of a body (fewer if it ends first or fails);
/// the connection is dropped rather than drained when more would follow.
async fn read_at_most(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut head = Vec::new();
    while head.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    head
}

impl ChurnZeroClient {
    pub fn new(base_url: &str, app_key: Secret, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("churnzero-forwarder/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(ChurnZeroClient {
            http,
            endpoint: format!("{}/i", base_url.trim_end_matches('/')),
            app_key,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn redact(&self, text: &str) -> String {
        if self.app_key.is_empty() {
            text.to_string()
        } else {
            text.replace(self.app_key.expose(), "***")
        }
    }

    /// The exact bytes sent: each action with `appKey` first. Written
    /// straight from the caller's actions: copying every action to put the
    /// key in front cost as much as writing it.
    pub fn body<A: Borrow<Map<String, Value>>>(&self, actions: &[A]) -> Vec<u8> {
        let key = self.app_key.expose();
        let with_key: Vec<WithKey> = actions
            .iter()
            .map(|a| WithKey {
                key,
                action: a.borrow(),
            })
            .collect();
        serde_json::to_vec(&with_key).expect("actions serialise")
    }

    /// Sends one request and classifies the answer.
    pub async fn send<A: Borrow<Map<String, Value>>>(&self, actions: &[A]) -> SendOutcome {
        let response = self
            .http
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(self.body(actions))
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connection error"
                } else {
                    "request error"
                };
                // reqwest's Display names the URL (no secret in it) and the cause chain.
                let mut msg = format!("{kind}: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                return SendOutcome::Retryable {
                    error: self.redact(&msg),
                    status: None,
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        if (200..300).contains(&status) {
            // Drain the GIF so the connection goes back to the pool; an
            // answer far larger than a GIF is cut off with its connection.
            let _ = read_at_most(response, SUCCESS_BODY_READ).await;
            return SendOutcome::Accepted { status };
        }
        let head = read_at_most(response, ERROR_BODY_READ).await;
        let body = String::from_utf8_lossy(&head).into_owned();
        let excerpt: String = body
            .chars()
            .filter(|c| !c.is_control())
            .take(BODY_EXCERPT)
            .collect();
        let error = self.redact(&format!("HTTP {status}: {}", excerpt.trim()));
        if status == 408 || status == 429 || status >= 500 {
            SendOutcome::Retryable {
                error,
                status: Some(status),
                retry_after,
            }
        } else {
            SendOutcome::Rejected { status, error }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn body_puts_app_key_first_and_debug_hides_it() {
        let c =
            ChurnZeroClient::new("http://x/", Secret::new("KEY"), Duration::from_secs(1)).unwrap();
        assert_eq!(c.endpoint(), "http://x/i");
        let mut a = Map::new();
        a.insert("action".into(), Value::String("trackEvent".into()));
        let body = String::from_utf8(c.body(&[&a])).unwrap();
        assert_eq!(body, r#"[{"appKey":"KEY","action":"trackEvent"}]"#);
        assert!(!format!("{c:?}").contains("KEY"));
        // An action's own `appKey` is never sent, and actions lent by
        // reference give the same bytes.
        let mut b = Map::new();
        b.insert("action".into(), Value::String("setAttribute".into()));
        b.insert("appKey".into(), Value::String("theirs".into()));
        b.insert("n".into(), Value::from(2));
        let c =
            ChurnZeroClient::new("http://x/", Secret::new("K\"1"), Duration::from_secs(1)).unwrap();
        let expected = r#"[{"appKey":"K\"1","action":"trackEvent"},{"appKey":"K\"1","action":"setAttribute","n":2}]"#;
        assert_eq!(String::from_utf8(c.body(&[&a, &b])).unwrap(), expected);
        assert_eq!(String::from_utf8(c.body(&[a, b])).unwrap(), expected);
    }
}
