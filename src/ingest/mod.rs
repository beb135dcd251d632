//! The Segment HTTP Tracking API: `/v1/{identify,track,page,screen,group,
//! alias,batch,import}`. Authenticates the write key, reads the body within
//! the limits (after gzip), validates every event, and answers 200 only after
//! the outbox writer has committed them.

mod body;
pub mod connections;
pub mod tls;

use crate::churnzero::mapping::{self, MappingConfig};
use crate::outbox::{IdentityUpdate, NewEvent, Writer};
use crate::secret::{Secret, find_match};
use crate::segment::{self, CallType, EventError};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
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

/// Shared state of the ingest routes.
#[derive(Clone)]
pub struct IngestState {
    pub writer: Writer,
    pub write_keys: Arc<Vec<WriteKey>>,
    pub mapping: Arc<MappingConfig>,
}

/// The `/v1/*` routes.
pub fn router(state: IngestState) -> Router {
    Router::new()
        .route("/v1/{call}", post(ingest))
        .with_state(state)
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
    let secrets: Vec<Secret> = keys.iter().map(|k| k.key.clone()).collect();
    find_match(&secrets, candidate).map(|i| &keys[i])
}

fn unauthorized() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid write key")
}

async fn ingest(
    State(state): State<IngestState>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let path_type = match call.as_str() {
        "batch" | "import" => None,
        other => match CallType::parse(other) {
            Some(t) => Some(t),
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("unknown endpoint /v1/{other}"),
                ));
            }
        },
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

    let mut events = Vec::with_capacity(raw_events.len());
    let mut rejected = Vec::new();
    for (index, raw) in raw_events.into_iter().enumerate() {
        match segment::normalise_event(raw, &envelope, received_at, || {
            uuid::Uuid::new_v4().to_string()
        }) {
            Ok(valid) => events.push(to_new_event(&state.mapping, &write_key, valid)),
            Err(EventError(error)) => rejected.push(json!({ "index": index, "error": error })),
        }
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

    let receipt = state.writer.ingest(events).await.map_err(|e| match e {
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
    metrics::counter!("events_accepted_total").increment(receipt.stored as u64);
    metrics::counter!("events_filtered_total").increment(receipt.filtered as u64);
    metrics::counter!("events_duplicate_total").increment(receipt.duplicates as u64);
    metrics::counter!("ingest_requests_total", "status" => "200").increment(1);
    let mut body = json!({ "success": true });
    if !rejected.is_empty() {
        body["rejected"] = Value::Array(rejected);
    }
    Ok((StatusCode::OK, axum::Json(body)).into_response())
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
        payload: event.to_string(),
        forward: valid.forward,
        identity,
        audience,
    }
}

/// identify: the ids its traits carry (contact defaults to the userId);
/// group: the user belongs to the group's account; alias: previousId is the
/// same person as userId.
fn identity_update(
    mapping: &MappingConfig,
    call: CallType,
    key: &str,
    event: &Value,
) -> Option<IdentityUpdate> {
    let own = mapping::ids_from_event(mapping, event);
    match call {
        CallType::Identify => Some(IdentityUpdate {
            user_id: key.to_string(),
            account: own.account,
            contact: own.contact.or_else(|| {
                event
                    .get("userId")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }),
            previous_id: None,
        }),
        CallType::Group => Some(IdentityUpdate {
            user_id: key.to_string(),
            account: event
                .get("groupId")
                .and_then(Value::as_str)
                .map(str::to_string),
            contact: None,
            previous_id: None,
        }),
        CallType::Alias => Some(IdentityUpdate {
            user_id: key.to_string(),
            account: None,
            contact: None,
            previous_id: event
                .get("previousId")
                .and_then(Value::as_str)
                .map(str::to_string),
        }),
        _ => None,
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
