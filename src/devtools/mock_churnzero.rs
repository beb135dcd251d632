//! A stand-in for ChurnZero's HTTP API.
//!
//! The forwarder's hardest behaviour (retries, backoff, `Retry-After`, poison
//! isolation, at-least-once delivery) only shows when the other side
//! misbehaves, and the real service cannot be asked to. This mock answers like
//! ChurnZero (200 and a GIF for anything it receives) and can be told to fail
//! in the ways a real endpoint fails: error statuses, slow answers, answers
//! that never come and connections that are reset. Tests drive it through
//! [`MockState`]; scripts and docker-compose drive it over HTTP.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The 1x1 transparent GIF ChurnZero answers with; some clients check the
/// content type, so the mock sends the real thing.
const GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x01, 0x44, 0x00, 0x3b,
];

/// Fields the design says every action carries; an action without them would
/// be dropped by ChurnZero's later validation, so the mock warns about it.
const REQUIRED_FIELDS: [&str; 4] = ["appKey", "action", "accountExternalId", "contactExternalId"];

/// Large batches of large events can exceed axum's 2 MB default; the mock
/// must not be the reason a batch fails.
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// How long `shutdown` waits for open connections before cutting them off, so
/// that a client holding a connection open cannot stall a test run.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Flags of the `mock-churnzero` subcommand. The fault flags exist so that a
/// local run or docker-compose setup can show retries without code.
#[derive(clap::Args, Debug, Clone)]
pub struct MockArgs {
    /// Address to listen on (port 0 picks a free port)
    #[arg(long, env = "MOCK_CHURNZERO_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,

    /// Fraction of /i requests, from 0.0 to 1.0, answered with --fail-status
    /// instead of 200, to exercise the forwarder's retries
    #[arg(long, env = "MOCK_CHURNZERO_FAIL_RATE", default_value_t = 0.0, value_parser = parse_fail_rate)]
    pub fail_rate: f64,

    /// Status of the answers --fail-rate injects
    #[arg(long, env = "MOCK_CHURNZERO_FAIL_STATUS", default_value_t = 503,
          value_parser = clap::value_parser!(u16).range(200..=599))]
    pub fail_status: u16,

    /// Delay added to every /i request (e.g. 250ms), to exercise timeouts and
    /// concurrency
    #[arg(long, env = "MOCK_CHURNZERO_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,

    /// Do not log a line per received action (for load tests)
    #[arg(long, env = "MOCK_CHURNZERO_QUIET")]
    pub quiet: bool,

    /// Refuse, with --poison-status, every /i request holding an action with
    /// this eventName (the rest of such a request is refused with it), to
    /// show how the forwarder isolates an event an endpoint will never take
    #[arg(long, env = "MOCK_CHURNZERO_POISON_EVENT", value_name = "EVENT_NAME")]
    pub poison_event: Option<String>,

    /// Status of the answers --poison-event causes
    #[arg(long, env = "MOCK_CHURNZERO_POISON_STATUS", default_value_t = 400,
          value_parser = clap::value_parser!(u16).range(200..=599))]
    pub poison_status: u16,

    /// Capacity model: /i requests served at once (0 = no limit). Beyond
    /// them --queue more wait their turn; the rest are answered 503 at once
    #[arg(long, env = "MOCK_CHURNZERO_CAPACITY", default_value_t = 0)]
    pub capacity: usize,

    /// Capacity model: requests that wait for a free place beyond --capacity
    #[arg(long, env = "MOCK_CHURNZERO_QUEUE", default_value_t = 0)]
    pub queue: usize,

    /// Time each /i request takes to serve once it has a place (e.g. 50ms)
    #[arg(long, env = "MOCK_CHURNZERO_SERVICE_TIME", default_value = "0s", value_parser = humantime::parse_duration)]
    pub service_time: Duration,
}

impl Default for MockArgs {
    /// The command line defaults, so that code starting a mock only spells out
    /// what it changes.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8090)),
            fail_rate: 0.0,
            fail_status: 503,
            latency: Duration::ZERO,
            quiet: false,
            poison_event: None,
            poison_status: 400,
            capacity: 0,
            queue: 0,
            service_time: Duration::ZERO,
        }
    }
}

/// The capacity model: `capacity` requests served at once, each taking
/// `service_time`; `queue` more wait for a place in arrival order; any
/// request beyond those is refused with 503 at once, as an overloaded
/// service (or its load balancer) does.
struct Capacity {
    capacity: usize,
    queue: usize,
    service_time: Duration,
    /// Places to be served; `None` when the capacity is unlimited.
    places: Option<Arc<tokio::sync::Semaphore>>,
    /// Requests served or waiting now.
    admitted: std::sync::atomic::AtomicUsize,
    in_service: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicU64,
    peak_in_service: std::sync::atomic::AtomicUsize,
    peak_queued: std::sync::atomic::AtomicUsize,
}

impl Capacity {
    fn new(capacity: usize, queue: usize, service_time: Duration) -> Capacity {
        Capacity {
            capacity,
            queue,
            service_time,
            places: (capacity > 0).then(|| Arc::new(tokio::sync::Semaphore::new(capacity))),
            admitted: Default::default(),
            in_service: Default::default(),
            refused: Default::default(),
            peak_in_service: Default::default(),
            peak_queued: Default::default(),
        }
    }

    /// Takes a place among those served or waiting; `false`: refuse.
    fn enter(&self) -> bool {
        if self.places.is_none() {
            return true;
        }
        let before = self.admitted.fetch_add(1, Ordering::SeqCst);
        if before >= self.capacity + self.queue {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            self.refused.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        let queued = (before + 1).saturating_sub(self.capacity);
        self.peak_queued.fetch_max(queued, Ordering::SeqCst);
        true
    }

    /// Waits for a place to be served, then serves for the service time.
    async fn serve(&self, stopping: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopping);
        let permit = match &self.places {
            Some(places) => tokio::select! {
                p = places.clone().acquire_owned() => p.ok(),
                () = &mut stopping => return self.leave(None),
            },
            None => None,
        };
        let n = self.in_service.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_service.fetch_max(n, Ordering::SeqCst);
        if !self.service_time.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(self.service_time) => {}
                () = &mut stopping => {}
            }
        }
        self.in_service.fetch_sub(1, Ordering::SeqCst);
        self.leave(permit);
    }

    fn leave(&self, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
        drop(permit);
        if self.places.is_some() {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn stats(&self) -> Value {
        let admitted = self.admitted.load(Ordering::SeqCst);
        let in_service = self.in_service.load(Ordering::SeqCst);
        json!({
            "capacity": self.capacity,
            "queue": self.queue,
            "service_time_ms": u64::try_from(self.service_time.as_millis()).unwrap_or(u64::MAX),
            "in_service": in_service,
            "queued": admitted.saturating_sub(in_service),
            "refused": self.refused.load(Ordering::SeqCst),
            "peak_in_service": self.peak_in_service.load(Ordering::SeqCst),
            "peak_queued": self.peak_queued.load(Ordering::SeqCst),
        })
    }

    fn reset(&self) {
        self.refused.store(0, Ordering::SeqCst);
        self.peak_in_service.store(0, Ordering::SeqCst);
        self.peak_queued.store(0, Ordering::SeqCst);
    }
}

fn parse_fail_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0.0 and 1.0"))
    }
}

/// Fault injection that can change while the mock runs, so one test can walk
/// the forwarder through an outage and its recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Fraction of requests answered with `fail_status`; values outside
    /// 0.0..=1.0 act as the nearest bound.
    pub fail_rate: f64,
    pub fail_status: u16,
    pub latency: Duration,
    /// Reject (with `poison_status` and a body naming the reason) any request
    /// whose actions contain an action with this `eventName`. ChurnZero itself
    /// answers 200, but other endpoints reject whole batches, and the
    /// forwarder must then isolate the poison events and deliver the rest.
    pub poison_event_name: Option<String>,
    pub poison_status: u16,
}

impl Default for Faults {
    /// A healthy endpoint, with a 400 ready for poison events.
    fn default() -> Self {
        Self {
            fail_rate: 0.0,
            fail_status: 503,
            latency: Duration::ZERO,
            poison_event_name: None,
            poison_status: 400,
        }
    }
}

impl From<&MockArgs> for Faults {
    fn from(args: &MockArgs) -> Self {
        Self {
            fail_rate: args.fail_rate,
            fail_status: args.fail_status,
            latency: args.latency,
            poison_event_name: args.poison_event.clone(),
            poison_status: args.poison_status,
        }
    }
}

/// One answer queued with [`MockState::push_script`]. Scripted answers take
/// precedence over poison rejection and the random fail rate, so a test gets
/// exactly the sequence it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptedAnswer {
    /// Answer with this status (a GIF for 2xx, a short JSON error otherwise).
    Status(u16),
    /// Answer with this status and a `Retry-After` header (seconds or an HTTP
    /// date), as rate limiters and overloaded services do.
    StatusWithRetryAfter(u16, String),
    /// Never answer; only the client's timeout (or the mock's shutdown) ends
    /// the request.
    Hang,
    /// Close the TCP connection with a reset instead of answering, as a crashed
    /// proxy or a network failure would.
    Reset,
    /// Answer 200 and accept the actions, whatever the faults say.
    Ok,
}

/// One `/i` request as the mock saw and answered it, so tests can check what
/// was attempted and not only what succeeded.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub at: DateTime<Utc>,
    /// The status answered, or 0 when no HTTP answer was given (hang, reset).
    pub status: u16,
    pub actions: Vec<Value>,
    /// Why the request got its answer, e.g. `ok`, `injected 503`,
    /// `scripted reset`, `poison event "X"`.
    pub outcome: String,
}

/// What the mock received and how it misbehaves, shared by the server, the
/// test code holding it and the HTTP control endpoints.
#[derive(Clone)]
pub struct MockState {
    shared: Arc<Shared>,
}

struct Shared {
    quiet: bool,
    capacity: Capacity,
    inner: Mutex<Inner>,
    /// Turns true once at shutdown; hung requests and added latency wait on it
    /// so that shutdown is never held up by the mock's own faults.
    stopping: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    faults: Faults,
    script: VecDeque<ScriptedAnswer>,
    /// When set, accepted actions are only counted, not kept: a benchmark
    /// draining millions of events must not measure the mock's memory.
    count_only: bool,
    accepted_actions: u64,
}

impl MockState {
    fn new(faults: Faults, quiet: bool, capacity: Capacity) -> Self {
        Self {
            shared: Arc::new(Shared {
                quiet,
                capacity,
                inner: Mutex::new(Inner {
                    faults,
                    ..Inner::default()
                }),
                stopping: watch::Sender::new(false),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data stays consistent even if a holder panicked: every update is
        // a single push, pop or assignment.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What ChurnZero would have taken: actions of requests answered 2xx, in
    /// arrival order. Duplicates are kept, since at-least-once delivery is
    /// part of what tests check.
    pub fn actions(&self) -> Vec<Value> {
        self.lock()
            .requests
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| r.actions.iter().cloned())
            .collect()
    }

    /// Every `/i` request, failed and injected ones included, to check how the
    /// forwarder retried.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// Keep (false, the default) or only count (true) accepted actions.
    pub fn set_count_only(&self, count_only: bool) {
        self.lock().count_only = count_only;
    }

    /// Actions of requests answered 2xx, counted even in count-only mode.
    pub fn accepted_action_count(&self) -> u64 {
        self.lock().accepted_actions
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Queue answers for the next requests, in order; once they are used up
    /// the faults apply again.
    pub fn push_script(&self, answers: impl IntoIterator<Item = ScriptedAnswer>) {
        self.lock().script.extend(answers);
    }

    /// Forget received requests and unused scripted answers, so one mock can
    /// serve several test phases. Faults stay: they are configuration.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.requests.clear();
        inner.script.clear();
        inner.accepted_actions = 0;
        self.shared.capacity.reset();
    }

    /// Requests the capacity model refused with 503 (over capacity and
    /// queue), since the start or the last reset.
    pub fn refused_count(&self) -> u64 {
        self.shared.capacity.refused.load(Ordering::SeqCst)
    }

    /// The capacity model's figures, as `GET /stats` shows them.
    pub fn stats(&self) -> Value {
        let mut stats = self.shared.capacity.stats();
        let inner = self.lock();
        stats["requests"] = json!(inner.requests.len());
        stats["accepted_actions"] = json!(inner.accepted_actions);
        stats
    }

    /// Records a request the capacity model refused, answered at once.
    fn refuse(&self, actions: Vec<Value>) {
        let mut inner = self.lock();
        let actions = if inner.count_only {
            Vec::new()
        } else {
            actions
        };
        self.log(&actions, 503, "over capacity", None);
        inner.requests.push(RecordedRequest {
            at: Utc::now(),
            status: 503,
            actions,
            outcome: "over capacity".to_owned(),
        });
    }

    /// Resolves once the mock is shutting down.
    async fn stopping(&self) {
        let mut rx = self.shared.stopping.subscribe();
        // The sender lives in `self`, so the only way out is the flag.
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// Records the request and decides its answer in one step, so that
    /// scripted answers follow arrival order even under concurrency.
    fn admit(&self, actions: Vec<Value>, unparsed: Option<String>) -> (Plan, Duration) {
        let mut inner = self.lock();
        let latency = inner.faults.latency;
        let (plan, mut outcome) = inner.decide(&actions);
        if let Some(reason) = &unparsed {
            outcome = format!("{outcome} (body not understood: {reason})");
        }
        let status = plan.recorded_status();
        self.log(&actions, status, &outcome, unparsed.as_deref());
        if (200..300).contains(&status) {
            inner.accepted_actions += actions.len() as u64;
        }
        let actions = if inner.count_only {
            Vec::new()
        } else {
            actions
        };
        inner.requests.push(RecordedRequest {
            at: Utc::now(),
            status,
            actions,
            outcome,
        });
        (plan, latency)
    }

    fn log(&self, actions: &[Value], status: u16, outcome: &str, unparsed: Option<&str>) {
        if let Some(reason) = unparsed {
            tracing::warn!(
                status,
                reason,
                "received a request whose body is not understood; ChurnZero would ignore it"
            );
        }
        let accepted = (200..300).contains(&status);
        if !accepted {
            if self.shared.quiet {
                tracing::debug!(
                    status,
                    outcome,
                    actions = actions.len(),
                    "request not accepted"
                );
            } else {
                tracing::info!(
                    status,
                    outcome,
                    actions = actions.len(),
                    "request not accepted"
                );
            }
            return;
        }
        for action in actions {
            let missing = missing_fields(action);
            if !missing.is_empty() {
                tracing::warn!(
                    action = str_field(action, "action"),
                    missing = missing.join(","),
                    "action lacks required fields; ChurnZero would drop it"
                );
            }
            if self.shared.quiet {
                continue;
            }
            tracing::info!(
                "received {} {} account={} contact={} appKey={}",
                str_field(action, "action").unwrap_or("(no action)"),
                describe(action),
                str_field(action, "accountExternalId").unwrap_or("-"),
                str_field(action, "contactExternalId").unwrap_or("-"),
                if action.get("appKey").is_some() {
                    "***"
                } else {
                    "(missing)"
                },
            );
        }
    }
}

impl Inner {
    fn decide(&mut self, actions: &[Value]) -> (Plan, String) {
        if let Some(answer) = self.script.pop_front() {
            return Plan::scripted(answer);
        }
        if let Some(name) = &self.faults.poison_event_name {
            let poisoned = actions
                .iter()
                .any(|a| a.get("eventName").and_then(Value::as_str) == Some(name));
            if poisoned {
                let plan = Plan::Reply {
                    status: status_code(self.faults.poison_status),
                    retry_after: None,
                    reason: Some(format!(
                        "rejected: the request contains the poison event {name:?}"
                    )),
                };
                return (plan, format!("poison event {name:?}"));
            }
        }
        let fail_rate = self.faults.fail_rate.clamp(0.0, 1.0);
        if fail_rate > 0.0 && rand::rng().random::<f64>() < fail_rate {
            let status = status_code(self.faults.fail_status);
            let plan = Plan::Reply {
                status,
                retry_after: None,
                reason: None,
            };
            return (plan, format!("injected {}", status.as_u16()));
        }
        (Plan::ok(), "ok".to_owned())
    }
}

/// How the mock will answer one request.
enum Plan {
    Reply {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        /// Error body text; the status's canonical reason when absent.
        reason: Option<String>,
    },
    Hang,
    Reset,
}

impl Plan {
    fn ok() -> Self {
        Self::Reply {
            status: StatusCode::OK,
            retry_after: None,
            reason: None,
        }
    }

    fn scripted(answer: ScriptedAnswer) -> (Self, String) {
        match answer {
            ScriptedAnswer::Ok => (Self::ok(), "scripted ok".to_owned()),
            ScriptedAnswer::Status(code) => {
                let status = status_code(code);
                let plan = Self::Reply {
                    status,
                    retry_after: None,
                    reason: None,
                };
                (plan, format!("scripted {}", status.as_u16()))
            }
            ScriptedAnswer::StatusWithRetryAfter(code, value) => {
                let status = status_code(code);
                let plan = Self::Reply {
                    status,
                    retry_after: HeaderValue::from_str(&value).ok(),
                    reason: None,
                };
                (
                    plan,
                    format!("scripted {}, Retry-After: {value}", status.as_u16()),
                )
            }
            ScriptedAnswer::Hang => (Self::Hang, "scripted hang".to_owned()),
            ScriptedAnswer::Reset => (Self::Reset, "scripted reset".to_owned()),
        }
    }

    fn recorded_status(&self) -> u16 {
        match self {
            Self::Reply { status, .. } => status.as_u16(),
            Self::Hang | Self::Reset => 0,
        }
    }
}

/// Statuses hyper cannot send as a final answer become 500, so a typo in a
/// test fails loudly at the client instead of breaking the connection.
fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn str_field<'a>(action: &'a Value, key: &str) -> Option<&'a str> {
    action.get(key).and_then(Value::as_str)
}

fn missing_fields(action: &Value) -> Vec<&'static str> {
    REQUIRED_FIELDS
        .into_iter()
        .filter(|key| match action.get(key) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        })
        .collect()
}

/// The part of an action an operator looks for in the log: the event name or
/// which attributes were set. Never the app key.
fn describe(action: &Value) -> String {
    if let Some(name) = action.get("eventName") {
        return format!("eventName={name}");
    }
    let Some(fields) = action.as_object() else {
        return "(not a JSON object)".to_owned();
    };
    if str_field(action, "action") == Some("trackEvent") {
        return "(no eventName)".to_owned();
    }
    let attributes: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with("attr_"))
        .collect();
    let attributes = if attributes.is_empty() {
        "(no attributes)".to_owned()
    } else {
        attributes.join(",")
    };
    match str_field(action, "entity") {
        Some(entity) => format!("entity={entity} {attributes}"),
        None => attributes,
    }
}

/// Reads the actions of a request the way ChurnZero accepts them: a JSON
/// array or object, a form body, or the query string. The error names what is
/// wrong without quoting the body, which holds the app key.
fn parse_actions(
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
) -> Result<Vec<Value>, String> {
    let decoded;
    let body = if is_gzip(headers) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .take(BODY_LIMIT as u64)
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip body does not decode: {e}"))?;
        decoded = out;
        &decoded[..]
    } else {
        body
    };

    if body.iter().all(u8::is_ascii_whitespace) {
        return match query {
            Some(q) if !q.is_empty() => Ok(vec![Value::Object(form_decode(q.as_bytes()))]),
            _ => Err("no body and no query string".to_owned()),
        };
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        return Ok(vec![Value::Object(form_decode(body))]);
    }
    match serde_json::from_slice(body) {
        Ok(Value::Array(actions)) => Ok(actions),
        Ok(action @ Value::Object(_)) => Ok(vec![action]),
        Ok(_) => Err("JSON body is neither an array nor an object".to_owned()),
        Err(e) => Err(format!("body is not JSON: {e}")),
    }
}

fn is_gzip(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|enc| enc.trim().eq_ignore_ascii_case("gzip"))
}

/// `application/x-www-form-urlencoded` into a JSON object of strings; a
/// repeated key keeps its last value.
fn form_decode(input: &[u8]) -> Map<String, Value> {
    input
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            (percent_decode(key), Value::String(percent_decode(value)))
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                input.get(i + 1).copied().and_then(hex),
                input.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn router(state: MockState) -> Router {
    Router::new()
        .route("/i", get(track).post(track))
        .route("/received", get(received))
        .route("/requests", get(requests))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .route("/faults", get(faults).post(set_faults))
        .route("/script", post(script))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn track(
    State(state): State<MockState>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (actions, unparsed) = match parse_actions(&headers, query.as_deref(), &body) {
        Ok(actions) => (actions, None),
        Err(reason) => (Vec::new(), Some(reason)),
    };
    if !state.shared.capacity.enter() {
        state.refuse(actions);
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Some("over capacity: too many requests at once".to_owned()),
        );
    }
    let (plan, latency) = state.admit(actions, unparsed);
    state.shared.capacity.serve(state.stopping()).await;
    if !latency.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(latency) => {}
            () = state.stopping() => {}
        }
    }
    match plan {
        Plan::Reply {
            status,
            retry_after,
            reason,
        } => reply(status, retry_after, reason),
        Plan::Hang => {
            state.stopping().await;
            // An answer now would look like success to a client that waited
            // through the shutdown; a reset keeps the request unanswered.
            conn.reset()
        }
        Plan::Reset => conn.reset(),
    }
}

fn reply(status: StatusCode, retry_after: Option<HeaderValue>, reason: Option<String>) -> Response {
    let mut response = if status.is_success() {
        (status, [(header::CONTENT_TYPE, "image/gif")], GIF).into_response()
    } else {
        let reason = reason.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("injected failure")
                .to_owned()
        });
        (status, axum::Json(json!({ "error": reason }))).into_response()
    };
    if let Some(value) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn received(State(state): State<MockState>) -> Response {
    axum::Json(json!({
        "requests": state.request_count(),
        "actions": state.actions(),
    }))
    .into_response()
}

async fn requests(State(state): State<MockState>) -> Response {
    let list: Vec<Value> = state
        .requests()
        .iter()
        .map(|r| {
            json!({
                "at": r.at.to_rfc3339_opts(SecondsFormat::Millis, true),
                "status": r.status,
                "outcome": r.outcome,
                "actions": r.actions.len(),
            })
        })
        .collect();
    axum::Json(list).into_response()
}

async fn stats(State(state): State<MockState>) -> Response {
    axum::Json(state.stats()).into_response()
}

async fn reset(State(state): State<MockState>) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}

fn faults_json(faults: &Faults) -> Value {
    json!({
        "fail_rate": faults.fail_rate,
        "fail_status": faults.fail_status,
        "latency_ms": u64::try_from(faults.latency.as_millis()).unwrap_or(u64::MAX),
        "poison_event_name": faults.poison_event_name,
        "poison_status": faults.poison_status,
    })
}

async fn faults(State(state): State<MockState>) -> Response {
    axum::Json(faults_json(&state.faults())).into_response()
}

/// A partial update of [`Faults`]: absent fields keep their value, and
/// `"poison_event_name": null` turns poison rejection off.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsPatch {
    fail_rate: Option<f64>,
    fail_status: Option<u16>,
    latency_ms: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    poison_event_name: Option<Option<String>>,
    poison_status: Option<u16>,
}

/// Tells an explicit `null` (Some(None)) from an absent field (None).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl FaultsPatch {
    fn apply(self, faults: &mut Faults) -> Result<(), String> {
        if let Some(rate) = self.fail_rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("fail_rate {rate} is not between 0.0 and 1.0"));
            }
            faults.fail_rate = rate;
        }
        if let Some(status) = self.fail_status {
            faults.fail_status = check_status(status, "fail_status")?;
        }
        if let Some(ms) = self.latency_ms {
            faults.latency = Duration::from_millis(ms);
        }
        if let Some(name) = self.poison_event_name {
            faults.poison_event_name = name;
        }
        if let Some(status) = self.poison_status {
            faults.poison_status = check_status(status, "poison_status")?;
        }
        Ok(())
    }
}

fn check_status(status: u16, field: &str) -> Result<u16, String> {
    if (200..=599).contains(&status) {
        Ok(status)
    } else {
        Err(format!("{field} {status} is not between 200 and 599"))
    }
}

fn bad_request(error: impl Into<String>) -> Response {
    let error: String = error.into();
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": error })),
    )
        .into_response()
}

async fn set_faults(State(state): State<MockState>, body: Bytes) -> Response {
    // Parsed by hand rather than with the `Json` extractor so that a curl
    // without a content type still works.
    let patch: FaultsPatch = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(e) => return bad_request(format!("invalid faults: {e}")),
    };
    let mut faults = state.faults();
    if let Err(e) = patch.apply(&mut faults) {
        return bad_request(e);
    }
    state.set_faults(faults.clone());
    tracing::info!(faults = %faults_json(&faults), "fault injection changed");
    axum::Json(faults_json(&faults)).into_response()
}

/// One entry of `POST /script`: `{"status": 503}`,
/// `{"status": 429, "retry_after": "2"}`, `{"hang": true}` or
/// `{"reset": true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptEntry {
    status: Option<u16>,
    retry_after: Option<Value>,
    #[serde(default)]
    hang: bool,
    #[serde(default)]
    reset: bool,
}

impl TryFrom<ScriptEntry> for ScriptedAnswer {
    type Error = String;

    fn try_from(entry: ScriptEntry) -> Result<Self, String> {
        let retry_after = match entry.retry_after {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => return Err(format!("retry_after {other} is not a string or number")),
        };
        if let Some(value) = &retry_after {
            HeaderValue::from_str(value)
                .map_err(|_| format!("retry_after {value:?} is not a valid header value"))?;
        }
        match (entry.status, retry_after, entry.hang, entry.reset) {
            (None, None, true, false) => Ok(Self::Hang),
            (None, None, false, true) => Ok(Self::Reset),
            (Some(status), None, false, false) => Ok(Self::Status(check_status(status, "status")?)),
            (Some(status), Some(value), false, false) => Ok(Self::StatusWithRetryAfter(
                check_status(status, "status")?,
                value,
            )),
            _ => Err(
                "expected one of {\"status\": n}, {\"status\": n, \"retry_after\": v}, \
                 {\"hang\": true}, {\"reset\": true}"
                    .to_owned(),
            ),
        }
    }
}

async fn script(State(state): State<MockState>, body: Bytes) -> Response {
    let entries: Vec<ScriptEntry> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(items)) => match items
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
        {
            Ok(entries) => entries,
            Err(e) => return bad_request(format!("invalid script: {e}")),
        },
        Ok(item @ Value::Object(_)) => match serde_json::from_value(item) {
            Ok(entry) => vec![entry],
            Err(e) => return bad_request(format!("invalid script: {e}")),
        },
        Ok(_) => return bad_request("a script is a JSON array of answers"),
        Err(e) => return bad_request(format!("invalid script: {e}")),
    };
    // All or nothing: a half-queued script would desynchronise the test.
    let mut answers = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        match ScriptedAnswer::try_from(entry) {
            Ok(answer) => answers.push(answer),
            Err(e) => return bad_request(format!("script entry {index}: {e}")),
        }
    }
    let added = answers.len();
    state.push_script(answers);
    let queued = state.lock().script.len();
    axum::Json(json!({ "added": added, "queued": queued })).into_response()
}

/// Lets a handler cut its own connection. Hyper owns the socket, so the
/// handler flags the connection and the socket wrapper turns every further
/// read and write into an error; hyper then drops the socket, which sends a
/// TCP reset because of the zero linger set on the way out.
#[derive(Clone)]
struct ConnHandle(Arc<AtomicBool>);

impl ConnHandle {
    /// The response returned here never reaches the wire: the write fails first.
    fn reset(&self) -> Response {
        self.0.store(true, Ordering::Release);
        tracing::debug!("resetting the connection instead of answering");
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        Self(stream.io().reset.clone())
    }
}

struct ResettableListener(TcpListener);

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own implementation retries and logs accept errors.
        let (stream, addr) = Listener::accept(&mut self.0).await;
        let _ = stream.set_nodelay(true);
        let stream = ResettableStream {
            stream,
            reset: Arc::default(),
        };
        (stream, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

struct ResettableStream {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    fn check(&self) -> io::Result<()> {
        if self.reset.load(Ordering::Acquire) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by mock ChurnZero",
            ))
        } else {
            Ok(())
        }
    }
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Acquire) {
            // With a zero linger, closing sends RST instead of FIN and never
            // blocks, so the client sees a reset rather than an empty answer.
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A running mock. Dropping it stops the server too, so a failing test does
/// not leave a listener behind; `shutdown` also waits for it to finish.
pub struct MockChurnZero {
    addr: SocketAddr,
    state: MockState,
    server: Option<JoinHandle<()>>,
}

impl MockChurnZero {
    /// Returns once the socket is bound, so callers can send at once.
    pub async fn start(args: MockArgs) -> io::Result<MockChurnZero> {
        let listener = TcpListener::bind(args.listen).await?;
        let addr = listener.local_addr()?;
        let capacity = Capacity::new(args.capacity, args.queue, args.service_time);
        let state = MockState::new(Faults::from(&args), args.quiet, capacity);
        let app = router(state.clone()).into_make_service_with_connect_info::<ConnHandle>();
        let stopping = state.clone();
        let server = axum::serve(ResettableListener(listener), app)
            .with_graceful_shutdown(async move { stopping.stopping().await });
        let server = tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "mock ChurnZero server failed");
            }
        });
        Ok(MockChurnZero {
            addr,
            state,
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `--churnzero-url`; an unspecified listen
    /// address is replaced by loopback, which is where a local client connects.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    pub fn state(&self) -> MockState {
        self.state.clone()
    }

    /// Ends hung requests (with a reset), lets other open requests finish and
    /// waits a bounded time for the server to stop.
    pub async fn shutdown(mut self) {
        self.state.shared.stopping.send_replace(true);
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
            {
                tracing::warn!("mock ChurnZero connections still open at shutdown; closing them");
                server.abort();
            }
        }
    }
}

impl Drop for MockChurnZero {
    fn drop(&mut self) {
        self.state.shared.stopping.send_replace(true);
    }
}

/// The `mock-churnzero` subcommand. Stops on SIGTERM as well as Ctrl-C, since
/// that is how docker-compose and process supervisors stop it.
pub async fn run(args: MockArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let mock = MockChurnZero::start(args.clone())
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        url = %mock.url(),
        fail_rate = args.fail_rate,
        fail_status = args.fail_status,
        latency = %humantime::format_duration(args.latency),
        poison_event = args.poison_event.as_deref().unwrap_or("none"),
        poison_status = args.poison_status,
        capacity = args.capacity,
        queue = args.queue,
        service_time = %humantime::format_duration(args.service_time),
        "mock ChurnZero listening; point --churnzero-url at it"
    );
    let signal = stop_signal().await;
    tracing::info!("stopping mock ChurnZero");
    mock.shutdown().await;
    signal
}

async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot watch for Ctrl-C"),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot watch for Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    async fn start() -> MockChurnZero {
        start_with(MockArgs::default()).await
    }

    async fn start_with(args: MockArgs) -> MockChurnZero {
        let args = MockArgs {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ..args
        };
        MockChurnZero::start(args).await.expect("mock starts")
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    fn event(name: &str) -> Value {
        json!({
            "appKey": "secret-app-key",
            "action": "trackEvent",
            "accountExternalId": "acme",
            "contactExternalId": "jane@acme.test",
            "eventName": name,
            "eventDate": "2024-05-01T12:00:00.000Z",
        })
    }

    async fn post_json(mock: &MockChurnZero, body: &Value) -> reqwest::Response {
        client()
            .post(format!("{}/i", mock.url()))
            .json(body)
            .send()
            .await
            .expect("request answered")
    }

    async fn assert_gif(response: reqwest::Response) {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "image/gif");
        assert_eq!(&response.bytes().await.unwrap()[..], GIF);
    }

    #[tokio::test]
    async fn json_array_is_accepted_with_a_gif() {
        let mock = start().await;
        let batch = json!([event("Signed Up"), event("Logged In")]);

        assert_gif(post_json(&mock, &batch).await).await;

        let state = mock.state();
        assert_eq!(state.actions(), batch.as_array().unwrap().clone());
        assert_eq!(state.request_count(), 1);
        let request = &state.requests()[0];
        assert_eq!((request.status, request.outcome.as_str()), (200, "ok"));
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn single_object_is_one_action() {
        let mock = start().await;
        assert_gif(post_json(&mock, &event("Signed Up")).await).await;
        assert_eq!(mock.state().actions(), vec![event("Signed Up")]);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn form_body_is_decoded() {
        let mock = start().await;
        let response = client()
            .post(format!("{}/i", mock.url()))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(
                "appKey=k&action=trackEvent&accountExternalId=acme\
                 &contactExternalId=jane%40acme.test&eventName=Signed+Up%21",
            )
            .send()
            .await
            .unwrap();
        assert_gif(response).await;
        assert_eq!(
            mock.state().actions(),
            vec![json!({
                "appKey": "k",
                "action": "trackEvent",
                "accountExternalId": "acme",
                "contactExternalId": "jane@acme.test",
                "eventName": "Signed Up!",
            })]
        );
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn get_query_string_is_one_action() {
        let mock = start().await;
        let response = client()
            .get(format!("{}/i", mock.url()))
            .query(&[
                ("appKey", "k"),
                ("action", "setAttribute"),
                ("entity", "contact"),
                ("accountExternalId", "acme"),
                ("contactExternalId", "jane"),
                ("attr_Email", "jane@acme.test"),
            ])
            .send()
            .await
            .unwrap();
        assert_gif(response).await;
        let actions = mock.state().actions();
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0]["action"], "setAttribute");
        assert_eq!(actions[0]["attr_Email"], "jane@acme.test");
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn gzip_body_is_decoded() {
        let mock = start().await;
        let batch = json!([event("Signed Up")]);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(batch.to_string().as_bytes()).unwrap();
        let response = client()
            .post(format!("{}/i", mock.url()))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(encoder.finish().unwrap())
            .send()
            .await
            .unwrap();
        assert_gif(response).await;
        assert_eq!(mock.state().actions(), vec![event("Signed Up")]);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn unreadable_body_is_answered_like_churnzero_and_noted() {
        let mock = start().await;
        let response = client()
            .post(format!("{}/i", mock.url()))
            .body("not json")
            .send()
            .await
            .unwrap();
        assert_gif(response).await;
        let requests = mock.state().requests();
        assert!(requests[0].actions.is_empty());
        assert!(requests[0].outcome.contains("body not understood"));
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn scripted_503_then_200() {
        let mock = start().await;
        let state = mock.state();
        state.push_script([ScriptedAnswer::Status(503), ScriptedAnswer::Ok]);

        let first = post_json(&mock, &json!([event("A")])).await;
        assert_eq!(first.status(), 503);
        assert!(state.actions().is_empty());

        assert_gif(post_json(&mock, &json!([event("A")])).await).await;
        assert_eq!(state.actions(), vec![event("A")]);

        let requests = state.requests();
        let answers: Vec<(u16, &str)> = requests
            .iter()
            .map(|r| (r.status, r.outcome.as_str()))
            .collect();
        assert_eq!(answers, [(503, "scripted 503"), (200, "scripted ok")]);
        assert_eq!(requests[0].actions, vec![event("A")]);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn retry_after_header_is_sent() {
        let mock = start().await;
        mock.state()
            .push_script([ScriptedAnswer::StatusWithRetryAfter(429, "2".into())]);
        let response = post_json(&mock, &json!([event("A")])).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn reset_is_a_connection_error_not_a_status() {
        let mock = start().await;
        let state = mock.state();
        state.push_script([ScriptedAnswer::Reset]);
        let client = client();

        let error = client
            .post(format!("{}/i", mock.url()))
            .json(&json!([event("A")]))
            .send()
            .await
            .expect_err("a reset connection has no answer");
        assert!(!error.is_timeout() && error.status().is_none(), "{error:?}");
        let mut source: Option<&dyn std::error::Error> = Some(&error);
        let mut io_kind = None;
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                io_kind = Some(io.kind());
            }
            source = e.source();
        }
        assert_eq!(io_kind, Some(io::ErrorKind::ConnectionReset), "{error:?}");

        // The next request gets a fresh connection and an answer.
        let response = client
            .post(format!("{}/i", mock.url()))
            .json(&json!([event("B")]))
            .send()
            .await
            .unwrap();
        assert_gif(response).await;
        assert_eq!(state.actions(), vec![event("B")]);
        assert_eq!(
            (
                state.requests()[0].status,
                state.requests()[0].outcome.as_str()
            ),
            (0, "scripted reset")
        );
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn hang_times_out_and_shutdown_still_completes() {
        let mock = start().await;
        mock.state().push_script([ScriptedAnswer::Hang]);
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let url = format!("{}/i", mock.url());
        let error = client
            .post(&url)
            .json(&json!([event("A")]))
            .send()
            .await
            .expect_err("a hung request has no answer");
        assert!(error.is_timeout(), "{error:?}");

        // A hang still pending at shutdown must not hold the shutdown up.
        mock.state().push_script([ScriptedAnswer::Hang]);
        let pending = tokio::spawn(async move {
            reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .post(url)
                .json(&json!([event("B")]))
                .send()
                .await
        });
        while mock.state().request_count() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        mock.shutdown().await;
        assert!(
            started.elapsed() < SHUTDOWN_GRACE,
            "{:?}",
            started.elapsed()
        );
        assert!(pending.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn poison_event_rejects_its_request_only() {
        let mock = start().await;
        let state = mock.state();
        state.set_faults(Faults {
            poison_event_name: Some("Bad Event".into()),
            ..Faults::default()
        });

        let rejected = post_json(&mock, &json!([event("A"), event("Bad Event")])).await;
        assert_eq!(rejected.status(), 400);
        let body = rejected.text().await.unwrap();
        assert!(body.contains("Bad Event"), "{body}");

        assert_gif(post_json(&mock, &json!([event("A")])).await).await;
        assert_eq!(state.actions(), vec![event("A")]);
        assert_eq!(state.requests()[0].outcome, "poison event \"Bad Event\"");
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn fail_rate_and_latency_apply_to_every_request() {
        let mock = start_with(MockArgs {
            fail_rate: 1.0,
            fail_status: 502,
            latency: Duration::from_millis(150),
            quiet: true,
            ..MockArgs::default()
        })
        .await;
        let started = Instant::now();
        let response = post_json(&mock, &json!([event("A")])).await;
        assert_eq!(response.status(), 502);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(mock.state().requests()[0].outcome, "injected 502");

        mock.state().set_faults(Faults::default());
        assert_gif(post_json(&mock, &json!([event("A")])).await).await;
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn capacity_serves_some_queues_some_and_refuses_the_rest_at_once() {
        let mock = start_with(MockArgs {
            capacity: 2,
            queue: 1,
            service_time: Duration::from_millis(300),
            quiet: true,
            ..MockArgs::default()
        })
        .await;
        let url = mock.url();
        // Five at once: two served, one queued, two refused.
        let sends: Vec<_> = (0..5)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let r = client()
                        .post(format!("{url}/i"))
                        .json(&json!([event("A")]))
                        .send()
                        .await
                        .unwrap();
                    (r.status().as_u16(), started.elapsed())
                })
            })
            .collect();
        let mut answers = Vec::new();
        for s in sends {
            answers.push(s.await.unwrap());
        }
        let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 503).collect();
        assert_eq!(refused.len(), 2, "{answers:?}");
        let mut served: Vec<Duration> = answers
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, t)| *t)
            .collect();
        served.sort();
        assert_eq!(served.len(), 3, "{answers:?}");
        // The queued one waited for a place, then was served; the refused
        // ones were answered before any served one.
        assert!(served[0] >= Duration::from_millis(300), "{served:?}");
        assert!(served[2] >= Duration::from_millis(600), "{served:?}");
        for (_, took) in &refused {
            assert!(*took < served[0], "refused late: {answers:?}");
        }
        let stats: Value = client()
            .get(format!("{url}/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stats["refused"], 2, "{stats}");
        assert_eq!(stats["requests"], 5, "{stats}");
        assert_eq!(stats["peak_in_service"], 2, "{stats}");
        assert_eq!(stats["peak_queued"], 1, "{stats}");
        assert_eq!(stats["in_service"], 0, "{stats}");
        assert_eq!(stats["accepted_actions"], 3, "{stats}");
        assert_eq!(mock.state().refused_count(), 2);
        let outcomes: Vec<String> = mock
            .state()
            .requests()
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(outcomes.iter().filter(|o| *o == "over capacity").count(), 2);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn http_control_endpoints() {
        let mock = start().await;
        let client = client();
        let url = mock.url();

        let faults: Value = client
            .post(format!("{url}/faults"))
            .body(r#"{"poison_event_name": "Bad", "poison_status": 422, "latency_ms": 5}"#)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(faults["poison_status"], 422);
        assert_eq!(mock.state().faults().latency, Duration::from_millis(5));

        let script = client
            .post(format!("{url}/script"))
            .body(
                r#"[{"status":503},{"status":429,"retry_after":"2"},{"hang":true},
                    {"reset":true},{"status":200}]"#,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(script.status(), 200);
        assert_eq!(
            mock.state().lock().script,
            [
                ScriptedAnswer::Status(503),
                ScriptedAnswer::StatusWithRetryAfter(429, "2".into()),
                ScriptedAnswer::Hang,
                ScriptedAnswer::Reset,
                ScriptedAnswer::Status(200),
            ]
        );
        let invalid = client
            .post(format!("{url}/script"))
            .body(r#"[{"status":503},{"hang":true,"reset":true}]"#)
            .send()
            .await
            .unwrap();
        assert_eq!(invalid.status(), 400);
        assert!(invalid.text().await.unwrap().contains("entry 1"));
        assert_eq!(mock.state().lock().script.len(), 5);

        let reset = client.post(format!("{url}/reset")).send().await.unwrap();
        assert_eq!(reset.status(), 204);
        assert!(mock.state().lock().script.is_empty());

        let faults: Value = client
            .post(format!("{url}/faults"))
            .body(r#"{"poison_event_name": null, "latency_ms": 0}"#)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(faults["poison_event_name"], Value::Null);
        assert_eq!(faults["poison_status"], 422);

        mock.state().push_script([ScriptedAnswer::Status(503)]);
        post_json(&mock, &json!([event("A")])).await;
        post_json(&mock, &json!([event("B"), event("C")])).await;

        let received: Value = client
            .get(format!("{url}/received"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            received,
            json!({"requests": 2, "actions": [event("B"), event("C")]})
        );

        let requests: Value = client
            .get(format!("{url}/requests"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(requests[0]["status"], 503);
        assert_eq!(requests[0]["actions"], 1);
        assert_eq!(requests[1]["outcome"], "ok");
        assert_eq!(requests[1]["actions"], 2);
        assert!(requests[1]["at"].as_str().unwrap().ends_with('Z'));
        mock.shutdown().await;
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    // A current-thread runtime keeps the server on this thread, where the
    // capturing subscriber is installed.
    #[tokio::test(flavor = "current_thread")]
    async fn logs_name_the_action_but_never_the_app_key() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let mock = start().await;
        let identify = json!({
            "appKey": "secret-app-key",
            "action": "setAttribute",
            "entity": "contact",
            "accountExternalId": "acme",
            "contactExternalId": "jane",
            "attr_Email": "jane@acme.test",
        });
        post_json(&mock, &json!([event("Signed Up"), identify])).await;
        mock.state().push_script([ScriptedAnswer::Status(500)]);
        post_json(&mock, &json!([event("Signed Up")])).await;
        client()
            .get(format!(
                "{}/i?appKey=secret-app-key&action=trackEvent",
                mock.url()
            ))
            .send()
            .await
            .unwrap();
        mock.shutdown().await;

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("eventName=\"Signed Up\""), "{logs}");
        assert!(logs.contains("attr_Email"), "{logs}");
        assert!(logs.contains("account=acme"), "{logs}");
        assert!(logs.contains("appKey=***"), "{logs}");
        assert!(
            logs.contains(r#"missing="accountExternalId,contactExternalId""#),
            "{logs}"
        );
        assert!(!logs.contains("secret-app-key"), "{logs}");
    }

    #[test]
    fn command_line_defaults_and_validation() {
        use clap::Parser;

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            mock: MockArgs,
        }

        let args = Cli::try_parse_from(["mock"]).unwrap().mock;
        let defaults = MockArgs::default();
        assert_eq!(args.listen, defaults.listen);
        assert_eq!(args.fail_rate, defaults.fail_rate);
        assert_eq!(args.fail_status, defaults.fail_status);
        assert_eq!(args.latency, defaults.latency);
        assert_eq!(args.quiet, defaults.quiet);

        let args = Cli::try_parse_from([
            "mock",
            "--listen",
            "0.0.0.0:9000",
            "--fail-rate",
            "0.25",
            "--fail-status",
            "500",
            "--latency",
            "250ms",
            "--quiet",
        ])
        .unwrap()
        .mock;
        assert_eq!(args.fail_rate, 0.25);
        assert_eq!(args.fail_status, 500);
        assert_eq!(args.latency, Duration::from_millis(250));
        assert!(args.quiet);

        assert!(Cli::try_parse_from(["mock", "--fail-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--fail-status", "99"]).is_err());
    }

    #[test]
    fn url_uses_loopback_for_an_unspecified_address() {
        let mock = MockChurnZero {
            addr: "0.0.0.0:8090".parse().unwrap(),
            state: MockState::new(Faults::default(), true, Capacity::new(0, 0, Duration::ZERO)),
            server: None,
        };
        assert_eq!(mock.url(), "http://127.0.0.1:8090");
    }
}
