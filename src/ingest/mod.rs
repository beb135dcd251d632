//! The Segment HTTP Tracking API: `/v1/{identify,track,page,screen,group,
//! alias,batch,import}`, and the short paths the browser and mobile
//! libraries use (`/v1/t|i|p|g|a|s`, `/v1/b`). Authenticates the write key,
//! reads the body within the limits (after gzip), validates every event, and
//! answers 200 only after the outbox writer has committed them. Also the
//! settings object the client libraries fetch first, CORS for pages of other
//! origins, and the per-client rate limit.

mod body;
pub mod client_addr;
pub mod connections;
pub mod cors;
pub mod rate_limit;
pub mod settings;
pub mod tls;

use crate::churnzero::mapping::{self, MappingConfig};
use crate::identity::identity_update;
use crate::outbox::{NewEvent, Outbox};
use crate::secret::{Secret, find_match};
use crate::segment::{self, CallType, EventError};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use client_addr::TrustedProxies;
use cors::CorsOrigins;
use rate_limit::ClientRateLimit;
use serde_json::{Value, json};
use settings::PublicUrl;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use body::{
    BODY_READ_TIMEOUT, BodyBudget, BodyError, MAX_DEPTH, limit_body_memory, parse_json, read_body,
};

/// A configured write key and the short hash that stands for it in storage.
#[derive(Clone, Debug)]
pub struct WriteKey {
    pub key: Secret,
    pub source: String,
}

impl WriteKey {
    pub fn new(key: Secret) -> WriteKey {
        let digest = Sha256::digest(key.expose().as_bytes());
        let source = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        WriteKey { key, source }
    }
}

/// What the accept loop knows about a connection, set on every request as
/// an extension: the socket peer (for the client address) and whether it
/// came over TLS (for the protocol the settings endpoint announces).
#[derive(Debug, Clone, Copy)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Settings for browser and mobile clients: `--cors-origins`,
/// `--public-url`, `--trusted-proxies`, `--client-rate-limit`.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    pub cors_origins: CorsOrigins,
    pub public_url: Option<PublicUrl>,
    pub trusted_proxies: TrustedProxies,
    /// Events per second per client address; 0 is off.
    pub client_rate_limit: u32,
}

/// What the ingest routes keep of [`ClientSettings`], built once.
#[derive(Debug, Default)]
pub struct ClientPolicy {
    pub public_url: Option<PublicUrl>,
    pub trusted_proxies: TrustedProxies,
    pub rate_limit: Option<ClientRateLimit>,
}

impl ClientPolicy {
    pub fn new(settings: &ClientSettings) -> ClientPolicy {
        ClientPolicy {
            public_url: settings.public_url.clone(),
            trusted_proxies: settings.trusted_proxies.clone(),
            rate_limit: ClientRateLimit::new(settings.client_rate_limit),
        }
    }
}

/// Shared state of the ingest routes.
#[derive(Clone)]
pub struct IngestState {
    pub outbox: Outbox,
    pub write_keys: Arc<Vec<WriteKey>>,
    pub mapping: Arc<MappingConfig>,
    pub clients: Arc<ClientPolicy>,
}

/// The `/v1/*` routes and the settings endpoint, behind CORS for
/// `cors_origins` (the operator routes are built elsewhere and get none).
pub fn router(state: IngestState, cors_origins: &CorsOrigins) -> Router {
    let origins = cors_origins.clone();
    Router::new()
        // OPTIONS is routed so that the CORS layer sees preflights (an
        // unrouted method would get the app's 405 fallback instead).
        .route("/v1/{call}", post(ingest).options(preflight))
        .route(
            "/v1/projects/{write_key}/settings",
            get(project_settings).options(preflight),
        )
        .route(
            "/projects/{write_key}/settings",
            get(project_settings).options(preflight),
        )
        .with_state(state)
        .layer(cors_origins.layer())
        .layer(axum::middleware::from_fn(move |req, next| {
            cors::guard(origins.clone(), req, next)
        }))
}

/// The request span of the HTTP trace layer, with the write key of a
/// settings path (`/v1/projects/{writeKey}/settings`) replaced: request
/// paths are logged at debug level, and write keys never are.
pub fn trace_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %request.method(),
        uri = %redacted_path(request.uri().path()),
        version = ?request.version(),
    )
}

fn redacted_path(path: &str) -> std::borrow::Cow<'_, str> {
    match path.split_once("/projects/") {
        Some((head, rest)) => {
            let tail = rest.find('/').map_or("", |i| &rest[i..]);
            format!("{head}/projects/{{writeKey}}{tail}").into()
        }
        None => path.into(),
    }
}

/// Routed so that OPTIONS matches these paths; the CORS layer answers every
/// OPTIONS itself, so this runs only if that layer is ever removed.
async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The path's call: the long names, and the one-letter names of the browser
/// and mobile libraries (`/t`, `/b`, ...). `Ok(None)` is a batch.
fn path_call(call: &str) -> Result<Option<CallType>, ()> {
    let long = match call {
        "batch" | "import" | "b" => return Ok(None),
        "t" => "track",
        "i" => "identify",
        "p" => "page",
        "g" => "group",
        "a" => "alias",
        "s" => "screen",
        other => other,
    };
    CallType::parse(long).map(Some).ok_or(())
}

fn peer_of(extensions: &axum::http::Extensions) -> Option<PeerInfo> {
    extensions.get::<PeerInfo>().copied().or_else(|| {
        extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| PeerInfo {
                addr: c.0,
                tls: false,
            })
    })
}

/// The settings object for a known write key; 404 for any other, with the
/// same answer whatever the key, so that nothing can be learnt from it.
async fn project_settings(
    State(state): State<IngestState>,
    Path(write_key): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
) -> Result<Response, ApiError> {
    if authenticate(&state.write_keys, &write_key).is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown project"));
    }
    let peer = peer_of(&extensions);
    let address = settings::public_address(
        state.clients.public_url.as_ref(),
        &state.clients.trusted_proxies,
        peer.map(|p| p.addr.ip()),
        peer.is_some_and(|p| p.tls),
        &uri,
        &headers,
    )
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request names no usable Host; set --public-url",
        )
    })?;
    let body = settings::settings_object(&write_key, &address);
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    Ok(response)
}

/// A refusal: status code plus a JSON reason.
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub rejected: Vec<Value>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            rejected: Vec::new(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "success": false, "error": self.message });
        if !self.rejected.is_empty() {
            body["rejected"] = Value::Array(self.rejected);
        }
        let status_label = self.status.as_u16().to_string();
        metrics::counter!("ingest_requests_total", "status" => status_label).increment(1);
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if self.status == StatusCode::TOO_MANY_REQUESTS {
                // analytics.js waits this many seconds after a 429.
                response
                    .headers_mut()
                    .insert("x-ratelimit-reset", HeaderValue::from(secs));
            }
        }
        response
    }
}

/// The write key from `Authorization: Basic base64(key:)` (colon optional).
fn basic_auth_key(headers: &HeaderMap) -> Option<Result<String, ()>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let text = value.to_str().map_err(|_| ()).ok()?;
    let (scheme, rest) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Some(Err(()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| ());
    Some(
        decoded
            .and_then(|d| String::from_utf8(d).map_err(|_| ()))
            .map(|s| match s.split_once(':') {
                Some((user, _)) => user.to_string(),
                None => s,
            }),
    )
}

fn authenticate<'a>(keys: &'a [WriteKey], candidate: &str) -> Option<&'a WriteKey> {
    find_match(keys.iter().map(|k| &k.key), candidate).map(|i| &keys[i])
}

fn unauthorized() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid write key")
}

async fn ingest(
    State(state): State<IngestState>,
    Path(call): Path<String>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let Ok(path_type) = path_call(&call) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown endpoint /v1/{call}"),
        ));
    };
    let received_at = chrono::Utc::now();

    // Header auth first: an unauthenticated client learns nothing about
    // its body.
    let header_key = match basic_auth_key(&headers) {
        Some(Ok(k)) => match authenticate(&state.write_keys, &k) {
            Some(wk) => Some(wk.clone()),
            None => return Err(unauthorized()),
        },
        Some(Err(())) => return Err(unauthorized()),
        None => None,
    };

    // Size and encoding errors reveal nothing about the body: report them
    // even before the body's own write key is known.
    let bytes = read_body(&headers, body).await?;
    let parsed: Result<Value, _> = parse_json(&bytes);
    let parsed = match (parsed, &header_key) {
        (Ok(v), _) => v,
        (Err(_), None) => return Err(unauthorized()),
        (Err(e), Some(_)) => return Err(ApiError::new(StatusCode::BAD_REQUEST, e)),
    };
    let (envelope, raw_events) = match segment::split_request(path_type, parsed) {
        Ok(x) => x,
        Err(_) if header_key.is_none() => return Err(unauthorized()),
        Err(EventError(msg)) => {
            let status = if msg.contains("more than the limit") {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Err(ApiError::new(status, msg));
        }
    };
    let write_key = match header_key {
        Some(k) => k,
        None => match envelope
            .write_key
            .as_deref()
            .and_then(|k| authenticate(&state.write_keys, k))
        {
            Some(k) => k.clone(),
            None => return Err(unauthorized()),
        },
    };

    // Counted before validation: invalid events cost work too.
    if let Some(limit) = &state.clients.rate_limit {
        let client = client_ip(&state.clients.trusted_proxies, &extensions, &headers);
        if let Err(wait) = limit.check(client, raw_events.len()) {
            metrics::counter!("events_rate_limited_total").increment(raw_events.len() as u64);
            return Err(ApiError {
                retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u32),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many events from this client address; retry later",
                )
            });
        }
    }

    let mut events = Vec::with_capacity(raw_events.len());
    let mut rejected = Vec::new();
    let mut undated: Vec<(String, &'static str, i64)> = Vec::new();
    for (index, raw) in raw_events.into_iter().enumerate() {
        match segment::normalise_event(raw, &envelope, received_at, || {
            uuid::Uuid::new_v4().to_string()
        }) {
            Ok(valid) => {
                for field in &valid.undated {
                    metrics::counter!("events_undated_total", "field" => *field).increment(1);
                    let note = format!("`{field}` is not a date; stored with receivedAt");
                    match undated.iter_mut().find(|(n, _, _)| *n == note) {
                        Some(entry) => entry.2 += 1,
                        None => undated.push((note, "kept", 1)),
                    }
                }
                events.push(to_new_event(&state.mapping, &write_key, valid))
            }
            Err(EventError(error)) => rejected.push(json!({ "index": index, "error": error })),
        }
    }
    if !undated.is_empty() {
        let outbox = state.outbox.clone();
        tokio::spawn(async move {
            if let Err(e) = outbox.note_errors(undated).await {
                tracing::warn!(error = %e, "recording an undated event in recent_errors failed");
            }
        });
    }
    metrics::counter!("events_rejected_total").increment(rejected.len() as u64);
    if events.is_empty() {
        let message = if rejected.len() == 1 {
            rejected[0]["error"]
                .as_str()
                .unwrap_or("invalid event")
                .to_string()
        } else {
            "no valid event in the request".to_string()
        };
        let status = if message.contains("more than the limit") {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        return Err(ApiError {
            status,
            message,
            rejected,
            retry_after: None,
        });
    }

    let receipt = state.outbox.ingest(events).await.map_err(|e| match e {
        e if e.is_transient() => {
            tracing::warn!(error = %e, "ingest refused: outbox cannot take events now");
            ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
        e => {
            tracing::error!(error = %e, "ingest failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storing the events failed",
            )
        }
    })?;
    // Each look-up through the recorder formats and hashes the name (4% of
    // a `/v1/track` request's instructions for these four): a count of zero
    // is not looked up, and the series exist from the start anyway.
    for (name, n) in [
        ("events_accepted_total", receipt.stored),
        ("events_filtered_total", receipt.filtered),
        ("events_duplicate_total", receipt.duplicates),
    ] {
        if n > 0 {
            metrics::counter!(name).increment(n as u64);
        }
    }
    metrics::counter!("ingest_requests_total", "status" => "200").increment(1);
    let mut body = json!({ "success": true });
    if !rejected.is_empty() {
        body["rejected"] = Value::Array(rejected);
    }
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// The client address for the rate limit: the socket peer, or what trusted
/// proxies say in `X-Forwarded-For`. Unspecified when the router runs
/// without a socket (in-process tests).
fn client_ip(
    trusted: &TrustedProxies,
    extensions: &axum::http::Extensions,
    headers: &HeaderMap,
) -> IpAddr {
    match peer_of(extensions) {
        Some(peer) => trusted.client_addr(peer.addr.ip(), headers),
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    }
}

/// Turns a valid event into an outbox row, with what it teaches the identity
/// map and the audience updates it carries.
pub fn to_new_event(
    mapping: &MappingConfig,
    write_key: &WriteKey,
    valid: segment::ValidEvent,
) -> NewEvent {
    let event = Value::Object(valid.event);
    let identity = identity_update(mapping, valid.call, &valid.order_key, &event);
    let audience = if valid.call == CallType::Identify {
        mapping::audience_updates(mapping, &event)
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect()
    } else {
        Vec::new()
    };
    NewEvent {
        source: write_key.source.clone(),
        message_id: valid.message_id,
        kind: valid.call.as_str(),
        order_key: valid.order_key,
        // Straight into a byte buffer: `Value`'s `Display` writes the same
        // text through the formatter, one small write at a time, which
        // cost batch ingest more than parsing the events did. A `Value`
        // (string keys, finite numbers) has no way to fail here; `Display`
        // would have panicked on the same error.
        payload: serde_json::to_string(&event).expect("a JSON value always serialises"),
        forward: valid.forward,
        identity,
        audience,
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        let status = match e {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyError::BadGzip(_) | BodyError::Read(_) => StatusCode::BAD_REQUEST,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::NoMemory => {
                return ApiError {
                    retry_after: Some(body::NO_MEMORY_RETRY_AFTER),
                    ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                };
            }
        };
        ApiError::new(status, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_letter_paths_are_the_calls() {
        for (short, long) in [
            ("t", "track"),
            ("i", "identify"),
            ("p", "page"),
            ("g", "group"),
            ("a", "alias"),
            ("s", "screen"),
        ] {
            assert_eq!(path_call(short), path_call(long), "{short}");
            assert!(path_call(short).unwrap().is_some());
        }
        for batch in ["b", "batch", "import"] {
            assert_eq!(path_call(batch), Ok(None));
        }
        assert!(path_call("x").is_err());
        assert!(path_call("m").is_err());
    }

    #[test]
    fn settings_paths_are_traced_without_their_key() {
        assert_eq!(
            redacted_path("/v1/projects/s3cret/settings"),
            "/v1/projects/{writeKey}/settings"
        );
        assert_eq!(
            redacted_path("/projects/s3cret/settings"),
            "/projects/{writeKey}/settings"
        );
        assert_eq!(redacted_path("/projects/s3cret"), "/projects/{writeKey}");
        assert_eq!(redacted_path("/v1/track"), "/v1/track");
    }
}
