//! Dead-letter admin API under `/admin/`. Dead letters are personal data
//! (event payloads, user ids, emails), so every endpoint here, reads
//! included, needs `Authorization: Bearer <admin token>` and is refused
//! outright when no token is configured. The counts, ages and reasons that
//! carry no payload stay open on `/status` and `/metrics`. Every answer,
//! refusals included, is JSON.

use super::OperatorState;
use crate::outbox::{DeadListFilter, DeadSelection};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

/// Largest page of `GET /admin/dead`.
pub const MAX_PAGE: i64 = 1000;
/// Page size when the query gives none.
pub const DEFAULT_PAGE: i64 = 100;

pub(super) fn router() -> Router<OperatorState> {
    Router::new()
        .route("/admin/dead", get(list))
        .route("/admin/dead/replay", post(replay))
        .route("/admin/dead/purge", post(purge))
        .route("/admin/dead/{id}", get(show))
}

/// A refusal of the admin API: a status and a JSON reason.
#[derive(Debug)]
pub struct AdminError(StatusCode, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let mut response = (self.0, axum::Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"churnzero-forwarder admin\""),
            );
        }
        response
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> AdminError {
    AdminError(status, msg.into())
}

fn unavailable(e: crate::outbox::StoreError) -> AdminError {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Checks the bearer token in constant time. Without a configured token the
/// admin API is off: 403, whatever the request carries.
fn authorize(state: &OperatorState, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = &state.admin_token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "no admin token is configured: start serve with --admin-token (FORWARDER_ADMIN_TOKEN) to enable this",
        ));
    };
    match bearer(headers) {
        Some(given) if token.matches(given) => Ok(()),
        Some(_) => {
            tracing::warn!("admin request refused: wrong bearer token");
            Err(error(StatusCode::UNAUTHORIZED, "invalid admin token"))
        }
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send Authorization: Bearer <admin token>",
        )),
    }
}

/// Query of `GET /admin/dead`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Died at or after (RFC 3339).
    pub since: Option<String>,
    /// Died before (RFC 3339).
    pub until: Option<String>,
    /// Reason contains this text, case-insensitive.
    pub reason: Option<String>,
    /// Keyset paging: ids after this one.
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
                    format!("`{name}` is not an RFC 3339 timestamp: {s:?}"),
                )
            }),
    }
}

fn filter(
    since: &Option<String>,
    until: &Option<String>,
    reason: &Option<String>,
) -> Result<DeadListFilter, AdminError> {
    Ok(DeadListFilter {
        since_ms: parse_time("since", since)?,
        until_ms: parse_time("until", until)?,
        reason_contains: reason.clone().filter(|r| !r.is_empty()),
        ..Default::default()
    })
}

async fn list(
    State(state): State<OperatorState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match list_inner(&state, &headers, query.as_deref().unwrap_or("")).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn list_inner(
    state: &OperatorState,
    headers: &HeaderMap,
    query: &str,
) -> Result<Response, AdminError> {
    authorize(state, headers)?;
    let q: ListQuery = serde_urlencoded_query(query)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    let mut f = filter(&q.since, &q.until, &q.reason)?;
    f.after_id = q.after;
    f.limit = limit;
    let (items, next) = state.outbox.dead_page(&f).await.map_err(unavailable)?;
    Ok(axum::Json(json!({ "dead": items, "next_after": next })).into_response())
}

/// Parses a query string with a JSON error instead of axum's plain text.
fn serde_urlencoded_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, AdminError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| error(StatusCode::BAD_REQUEST, "malformed query string"))?,
    )
    .map(|q| q.0)
    .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn show(
    State(state): State<OperatorState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a dead event id (a number)"),
        )
        .into_response();
    };
    match state.outbox.dead_show(id).await {
        Ok(Some(d)) => axum::Json(d).into_response(),
        Ok(None) => {
            error(StatusCode::NOT_FOUND, format!("no dead event with id {id}")).into_response()
        }
        Err(e) => unavailable(e).into_response(),
    }
}

/// Body of replay and purge: exactly one of `ids` (all must be dead events,
/// else 404 and nothing changes), `all: true`, or a range (`since`, `until`
/// and/or `reason`).
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default)]
    pub ids: Vec<i64>,
    #[serde(default)]
    pub all: bool,
    pub since: Option<String>,
    pub until: Option<String>,
    pub reason: Option<String>,
}

/// Which dead events a selection means. Ranges and `all` are matched a
/// chunk at a time as the writer goes, never read whole.
async fn select(state: &OperatorState, body: &Bytes) -> Result<DeadSelection, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "missing body: send {\"ids\": [..]}, {\"all\": true} or {\"since\": .., \"until\": ..}",
        ));
    }
    let sel: Selection = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let ranged = sel.since.is_some() || sel.until.is_some() || sel.reason.is_some();
    let chosen = [!sel.ids.is_empty(), sel.all, ranged]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "say which dead events with exactly one of: `ids`, `all: true`, or `since`/`until`/`reason`",
        ));
    }
    if sel.all {
        return Ok(DeadSelection::Matching(DeadListFilter::default()));
    }
    if !sel.ids.is_empty() {
        return match state
            .outbox
            .dead_selection(&sel.ids)
            .await
            .map_err(unavailable)?
        {
            Ok(ids) => Ok(DeadSelection::Ids(ids)),
            Err(reason) => Err(error(StatusCode::NOT_FOUND, reason)),
        };
    }
    Ok(DeadSelection::Matching(filter(
        &sel.since,
        &sel.until,
        &sel.reason,
    )?))
}

async fn replay(State(state): State<OperatorState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let which = select(&state, &body).await?;
        let n = state
            .outbox
            .replay_selected(which)
            .await
            .map_err(unavailable)?;
        tracing::info!(replayed = n, "dead events replayed by an operator");
        Ok::<_, AdminError>(axum::Json(json!({ "replayed": n })).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn purge(State(state): State<OperatorState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let which = select(&state, &body).await?;
        let n = state
            .outbox
            .purge_selected(which)
            .await
            .map_err(unavailable)?;
        tracing::info!(purged = n, "dead events purged by an operator");
        Ok::<_, AdminError>(axum::Json(json!({ "purged": n })).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bEaReR  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
