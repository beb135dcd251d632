//! Dead-letter admin API under `/admin/`. Reads are open like `/status`;
//! replay and purge need `Authorization: Bearer <admin token>` and are
//! refused when no token is configured.

use super::OperatorState;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

pub(super) fn router() -> Router<OperatorState> {
    Router::new()
        .route("/admin/dead", get(list))
        .route("/admin/dead/{id}", get(show))
        .route("/admin/dead/replay", post(replay))
        .route("/admin/dead/purge", post(purge))
}

/// A refusal of the admin API: a status and a JSON reason.
pub struct AdminError(StatusCode, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> AdminError {
    AdminError(status, msg.into())
}

/// Checks the bearer token in constant time.
fn authorize(state: &OperatorState, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = &state.admin_token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "no admin token is configured: set --admin-token to enable this",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(g) if token.matches(g) => Ok(()),
        _ => Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or invalid admin token",
        )),
    }
}

/// Query of `GET /admin/dead`.
#[derive(Deserialize, Default)]
pub struct ListQuery {
    pub since: Option<String>,
    pub until: Option<String>,
    pub reason: Option<String>,
    pub after: Option<i64>,
    pub limit: Option<i64>,
}

fn parse_time(name: &str, v: &Option<String>) -> Result<Option<i64>, AdminError> {
    match v {
        None => Ok(None),
        Some(s) => crate::segment::parse_timestamp(&serde_json::Value::String(s.clone()))
            .map(|t| Some(t.timestamp_millis()))
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("`{name}` is not an ISO 8601 timestamp"),
                )
            }),
    }
}

impl ListQuery {
    fn filter(&self) -> Result<crate::outbox::DeadListFilter, AdminError> {
        Ok(crate::outbox::DeadListFilter {
            since_ms: parse_time("since", &self.since)?,
            until_ms: parse_time("until", &self.until)?,
            reason_contains: self.reason.clone(),
            after_id: self.after,
            limit: self.limit.unwrap_or(100).clamp(1, 1000),
        })
    }
}

async fn list(State(state): State<OperatorState>, Query(q): Query<ListQuery>) -> Response {
    let filter = match q.filter() {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    match state.outbox.reader.dead_list(&filter).await {
        Ok(items) => {
            let next = if items.len() as i64 == filter.limit {
                items.last().map(|d| d.id)
            } else {
                None
            };
            axum::Json(json!({ "dead": items, "next_after": next })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn show(State(state): State<OperatorState>, Path(id): Path<i64>) -> Response {
    match state.outbox.reader.dead_show(id).await {
        Ok(Some(d)) => axum::Json(d).into_response(),
        Ok(None) => {
            error(StatusCode::NOT_FOUND, format!("no dead event with id {id}")).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Body of replay and purge: ids, or everything, or a time range.
#[derive(Deserialize, Default)]
pub struct Selection {
    #[serde(default)]
    pub ids: Vec<i64>,
    #[serde(default)]
    pub all: bool,
    pub since: Option<String>,
    pub until: Option<String>,
}

async fn select(state: &OperatorState, sel: &Selection) -> Result<Option<Vec<i64>>, AdminError> {
    if sel.all {
        return Ok(None);
    }
    if !sel.ids.is_empty() {
        return Ok(Some(sel.ids.clone()));
    }
    if sel.since.is_some() || sel.until.is_some() {
        let q = ListQuery {
            since: sel.since.clone(),
            until: sel.until.clone(),
            ..Default::default()
        };
        let ids = state
            .outbox
            .reader
            .dead_ids(&q.filter()?)
            .await
            .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        return Ok(Some(ids));
    }
    Err(error(
        StatusCode::BAD_REQUEST,
        "say which dead events: `ids`, `all: true`, or `since`/`until`",
    ))
}

async fn replay(
    State(state): State<OperatorState>,
    headers: HeaderMap,
    body: Option<axum::Json<Selection>>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r.into_response();
    }
    let sel = body.map(|b| b.0).unwrap_or_default();
    let ids = match select(&state, &sel).await {
        Ok(ids) => ids,
        Err(r) => return r.into_response(),
    };
    match state.outbox.writer.replay(ids).await {
        Ok(n) => {
            tracing::info!(replayed = n, "dead events replayed by an operator");
            axum::Json(json!({ "replayed": n })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn purge(
    State(state): State<OperatorState>,
    headers: HeaderMap,
    body: Option<axum::Json<Selection>>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r.into_response();
    }
    let sel = body.map(|b| b.0).unwrap_or_default();
    let ids = match select(&state, &sel).await {
        Ok(ids) => ids,
        Err(r) => return r.into_response(),
    };
    match state.outbox.writer.purge(ids).await {
        Ok(n) => {
            tracing::info!(purged = n, "dead events purged by an operator");
            axum::Json(json!({ "purged": n })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
