//! Validation follows Segment's spec: a known `type`, `userId` or
//! `anonymousId`, `event` on track, `groupId` on group, `previousId` on alias.
//! A valid event is normalised into the exact JSON the outbox stores, so
//! that every later delivery attempt sends an identical payload.

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde_json::{Map, Value};

/// Largest single event, measured on its decompressed JSON (Segment's limit).
pub const LIMIT_EVENT_BYTES: usize = 32 * 1024;
/// Largest request body after decompression (Segment's limit).
pub const LIMIT_REQUEST_BYTES: usize = 500 * 1024;
/// Most events in one batch request.
pub const LIMIT_BATCH_EVENTS: usize = 2500;

/// The Segment call types we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl CallType {
    pub fn parse(s: &str) -> Option<CallType> {
        Some(match s {
            "identify" => CallType::Identify,
            "track" => CallType::Track,
            "page" => CallType::Page,
            "screen" => CallType::Screen,
            "group" => CallType::Group,
            "alias" => CallType::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Identify => "identify",
            CallType::Track => "track",
            CallType::Page => "page",
            CallType::Screen => "screen",
            CallType::Group => "group",
            CallType::Alias => "alias",
        }
    }
}

/// Why one event was refused; the text goes back to the client verbatim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventError(pub String);

fn err(msg: impl Into<String>) -> EventError {
    EventError(msg.into())
}

/// What the request body said around its events: the batch-level fields
/// that apply to every event in it.
#[derive(Debug, Default)]
pub struct BatchEnvelope {
    pub write_key: Option<String>,
    pub sent_at: Option<Value>,
    pub context: Option<Map<String, Value>>,
    pub integrations: Option<Map<String, Value>>,
}

/// A valid event, normalised and ready to be stored.
#[derive(Debug, Clone)]
pub struct ValidEvent {
    pub call: CallType,
    pub message_id: String,
    /// `userId`, else `anonymousId`: events sharing it are delivered in order.
    pub order_key: String,
    /// False when `integrations` turns ChurnZero off: acknowledge, don't forward.
    pub forward: bool,
    /// The normalised event as stored in the outbox.
    pub event: Map<String, Value>,
    /// Date fields that held something else than a date: the event was
    /// kept, with the fallback timestamp, and the caller counts them.
    pub undated: Vec<&'static str>,
}

/// Splits a parsed body into its envelope and raw events. For the single-call
/// endpoints the body is one event whose type is given by the path; for
/// `batch`/`import` it is `{"batch": [...]}`.
pub fn split_request(
    path_type: Option<CallType>,
    body: Value,
) -> Result<(BatchEnvelope, Vec<Value>), EventError> {
    let Value::Object(mut obj) = body else {
        return Err(err("request body must be a JSON object"));
    };
    let write_key = match obj.remove("writeKey") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    match path_type {
        Some(call) => {
            obj.insert("type".into(), Value::String(call.as_str().into()));
            let env = BatchEnvelope {
                write_key,
                ..Default::default()
            };
            Ok((env, vec![Value::Object(obj)]))
        }
        None => {
            let events = match obj.remove("batch") {
                Some(Value::Array(items)) => items,
                Some(_) => return Err(err("`batch` must be an array of events")),
                None => return Err(err("missing `batch` array")),
            };
            if events.is_empty() {
                return Err(err("`batch` is empty"));
            }
            if events.len() > LIMIT_BATCH_EVENTS {
                return Err(err(format!(
                    "batch holds {} events, more than the limit of {LIMIT_BATCH_EVENTS}",
                    events.len()
                )));
            }
            let context = match obj.remove("context") {
                Some(Value::Object(m)) => Some(m),
                _ => None,
            };
            let integrations = match obj.remove("integrations") {
                Some(Value::Object(m)) => Some(m),
                _ => None,
            };
            let env = BatchEnvelope {
                write_key,
                sent_at: obj.remove("sentAt"),
                context,
                integrations,
            };
            Ok((env, events))
        }
    }
}

/// Parses the ISO 8601 / RFC 3339 timestamps Segment libraries send. Years
/// outside 0000-9999 are refused: RFC 3339 cannot write them, so a stored
/// event holding one could not be read back (and ChurnZero would get text
/// that is no date).
pub fn parse_timestamp(v: &Value) -> Option<DateTime<Utc>> {
    parse_timestamp_any_year(v).filter(writable)
}

/// Whether RFC 3339 can write this instant (a four-digit year).
fn writable(t: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&t.year())
}

fn parse_timestamp_any_year(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => parse_date_text(s),
        Value::Number(n) => parse_epoch(n.as_f64()?),
        _ => None,
    }
}

/// Milliseconds since the epoch (JavaScript's `Date.now()`), or seconds
/// when the number is too small to be milliseconds of any plausible date
/// (below 10^11 ms is before March 1973; as seconds it reaches year 5138).
fn parse_epoch(n: f64) -> Option<DateTime<Utc>> {
    if !n.is_finite() {
        return None;
    }
    let ms = if n.abs() < 1e11 { n * 1000.0 } else { n };
    if ms.abs() > 1e16 {
        return None;
    }
    DateTime::from_timestamp_millis(ms as i64)
}

/// The date forms Segment's libraries and common clients write: RFC 3339
/// with or without a fraction, `Z` or an offset, `T` or a space; the basic
/// offset `+0530` (Java's `SimpleDateFormat`); one-digit months, days and
/// hours (Segment's own sample batch has `2015-2-02T00:30:08.276Z`);
/// minutes without seconds; no zone at all (read as UTC); and a date alone
/// (midnight UTC).
fn parse_date_text(text: &str) -> Option<DateTime<Utc>> {
    let s = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // A trailing `Z` is UTC; chrono's `%z` wants digits.
    let zoned = s
        .strip_suffix(['Z', 'z'])
        .map(|rest| format!("{rest}+00:00"));
    let candidate = zoned.as_deref().unwrap_or(s);
    for date_time in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        for zone in ["%#z", "%:z", "%z"] {
            let fmt = format!("{date_time}{zone}");
            if let Ok(t) = DateTime::parse_from_str(candidate, &fmt) {
                return Some(t.with_timezone(&Utc));
            }
        }
    }
    if zoned.is_none() {
        // Libraries sometimes omit the zone; Segment reads those as UTC.
        for fmt in [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M",
            "%Y-%m-%d %H:%M",
        ] {
            if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
                return Some(t.and_utc());
            }
        }
        if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
        }
    }
    None
}

/// RFC 3339, UTC, millisecond precision: the form ChurnZero gets, the same
/// on every attempt.
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn id_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A date field: `Ok(None)` when absent, `Err(())` when present but not a
/// date (the caller treats it as absent and notes it).
fn optional_timestamp(value: Option<&Value>) -> Result<Option<DateTime<Utc>>, ()> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_timestamp(v).map(Some).ok_or(()),
    }
}

/// Whether the `integrations` object lets this event reach ChurnZero:
/// `{"All": false}` turns every destination off unless ChurnZero is named
/// true; `{"ChurnZero": false}` turns it off alone.
fn forwards_to_churnzero(integrations: Option<&Map<String, Value>>) -> bool {
    let Some(int) = integrations else { return true };
    let named = ["ChurnZero", "Churnzero", "churnzero", "CHURNZERO"]
        .iter()
        .find_map(|k| int.get(*k));
    match named {
        Some(Value::Bool(b)) => *b,
        Some(Value::Object(_)) => true,
        _ => !matches!(int.get("All"), Some(Value::Bool(false))),
    }
}

fn merge_missing(target: &mut Map<String, Value>, defaults: &Map<String, Value>) {
    for (k, v) in defaults {
        target.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

/// Validates one raw event and produces its stored form.
///
/// `received_at` is the server clock at the request; the stored `timestamp`
/// follows Segment's rule: the client's `timestamp` when given, else
/// `receivedAt - (sentAt - originalTimestamp)` (clock-skew correction), else
/// `originalTimestamp`, else `receivedAt`.
pub fn normalise_event(
    raw: Value,
    envelope: &BatchEnvelope,
    received_at: DateTime<Utc>,
    assign_id: impl FnOnce() -> String,
) -> Result<ValidEvent, EventError> {
    let Value::Object(mut obj) = raw else {
        return Err(err("event must be a JSON object"));
    };
    let call = match obj.get("type") {
        Some(Value::String(t)) => {
            CallType::parse(t).ok_or_else(|| err(format!("unknown event type `{t}`")))?
        }
        Some(_) => return Err(err("`type` must be a string")),
        None => return Err(err("missing `type`")),
    };
    obj.remove("writeKey");

    let user_id = id_string(obj.get("userId"));
    let anonymous_id = id_string(obj.get("anonymousId"));
    if obj.get("userId").is_some_and(|v| !v.is_null()) && user_id.is_none() {
        return Err(err("`userId` must be a non-empty string"));
    }
    if obj.get("anonymousId").is_some_and(|v| !v.is_null()) && anonymous_id.is_none() {
        return Err(err("`anonymousId` must be a non-empty string"));
    }
    let order_key = match (&user_id, &anonymous_id) {
        (Some(u), _) => u.clone(),
        (None, Some(a)) => a.clone(),
        (None, None) => return Err(err("missing `userId` or `anonymousId`")),
    };
    match user_id {
        Some(ref u) => obj.insert("userId".into(), Value::String(u.clone())),
        None => obj.remove("userId"),
    };
    match anonymous_id {
        Some(ref a) => obj.insert("anonymousId".into(), Value::String(a.clone())),
        None => obj.remove("anonymousId"),
    };

    match call {
        CallType::Track => match obj.get("event") {
            Some(Value::String(e)) if !e.trim().is_empty() => {}
            _ => return Err(err("track requires `event`, a non-empty string")),
        },
        CallType::Group => match id_string(obj.get("groupId")) {
            Some(g) => {
                obj.insert("groupId".into(), Value::String(g));
            }
            None => return Err(err("group requires `groupId`")),
        },
        CallType::Alias => {
            match id_string(obj.get("previousId")) {
                Some(p) => {
                    obj.insert("previousId".into(), Value::String(p));
                }
                None => return Err(err("alias requires `previousId`")),
            }
            if user_id.is_none() {
                return Err(err("alias requires `userId`"));
            }
        }
        CallType::Identify | CallType::Page | CallType::Screen => {}
    }
    for key in ["traits", "properties", "context", "integrations"] {
        if let Some(v) = obj.get(key) {
            if !(v.is_object() || v.is_null()) {
                return Err(err(format!("`{key}` must be an object")));
            }
        }
    }

    // Batch-level context and integrations apply where the event has none.
    if let Some(ctx) = &envelope.context {
        match obj.get_mut("context") {
            Some(Value::Object(own)) => merge_missing(own, ctx),
            _ => {
                obj.insert("context".into(), Value::Object(ctx.clone()));
            }
        }
    }
    if let Some(int) = &envelope.integrations {
        match obj.get_mut("integrations") {
            Some(Value::Object(own)) => merge_missing(own, int),
            _ => {
                obj.insert("integrations".into(), Value::Object(int.clone()));
            }
        }
    }

    // The limit holds on the event as the client sent it (with the batch's
    // context merged in), before the fields added here (an assigned
    // messageId, the normalised timestamp, receivedAt, sentAt): the official
    // libraries check 32 KB on their own form of the event, so one they
    // accept at the limit must not be refused for what the forwarder adds.
    let size = serde_json::to_vec(&obj)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > LIMIT_EVENT_BYTES {
        return Err(err(format!(
            "event is {size} bytes, more than the limit of {LIMIT_EVENT_BYTES}"
        )));
    }

    let message_id = match obj.get("messageId") {
        None | Some(Value::Null) => assign_id(),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(err(
                "`messageId` must be a string of at most 256 characters",
            ));
        }
    };
    obj.insert("messageId".into(), Value::String(message_id.clone()));

    // A value that is not a date never costs the event: it counts as
    // absent, so the timestamp falls back as if it were missing (in the
    // end to receivedAt), and the value is kept in the stored event.
    let mut undated = Vec::new();
    let mut date = |field: &'static str, value: Option<&Value>| {
        optional_timestamp(value).unwrap_or_else(|()| {
            undated.push(field);
            None
        })
    };
    let timestamp = date("timestamp", obj.get("timestamp"));
    let original = date("originalTimestamp", obj.get("originalTimestamp"));
    let sent_at_value = obj.get("sentAt").or(envelope.sent_at.as_ref()).cloned();
    let sent_at = date("sentAt", sent_at_value.as_ref());
    if timestamp.is_none() {
        if let Some(bad) = obj.get("timestamp").filter(|v| !v.is_null()).cloned() {
            // `timestamp` is rewritten below; its original value stays here.
            obj.insert("invalidTimestamp".into(), bad);
        }
    }
    let effective = match (timestamp, original, sent_at) {
        (Some(t), _, _) => t,
        // The correction of a client whose sentAt is nonsense (year 9999)
        // would land outside what can be written; its own clock is then the
        // better guess.
        (None, Some(o), Some(s)) => received_at
            .checked_sub_signed(s - o)
            .filter(writable)
            .unwrap_or(o),
        (None, Some(o), None) => o,
        (None, None, _) => received_at,
    };
    obj.insert(
        "timestamp".into(),
        Value::String(format_timestamp(effective)),
    );
    obj.insert(
        "receivedAt".into(),
        Value::String(format_timestamp(received_at)),
    );
    match (sent_at, sent_at_value) {
        (Some(s), _) => {
            obj.insert("sentAt".into(), Value::String(format_timestamp(s)));
        }
        // Not a date: kept as the client wrote it.
        (None, Some(v)) if !v.is_null() => {
            obj.insert("sentAt".into(), v);
        }
        _ => {}
    }

    let forward = forwards_to_churnzero(obj.get("integrations").and_then(Value::as_object));
    Ok(ValidEvent {
        call,
        message_id,
        order_key,
        forward,
        event: obj,
        undated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        parse_timestamp(&json!("2026-11-28T12:00:00.000Z")).unwrap()
    }

    fn one(v: Value) -> Result<ValidEvent, EventError> {
        normalise_event(v, &BatchEnvelope::default(), now(), || "assigned".into())
    }

    #[test]
    fn validates_required_fields_per_type() {
        assert!(
            one(json!({"type":"track","userId":"u"}))
                .unwrap_err()
                .0
                .contains("event")
        );
        assert!(
            one(json!({"type":"track","event":"E"}))
                .unwrap_err()
                .0
                .contains("userId")
        );
        assert!(
            one(json!({"type":"group","userId":"u"}))
                .unwrap_err()
                .0
                .contains("groupId")
        );
        assert!(
            one(json!({"type":"alias","userId":"u"}))
                .unwrap_err()
                .0
                .contains("previousId")
        );
        assert!(
            one(json!({"type":"nope","userId":"u"}))
                .unwrap_err()
                .0
                .contains("unknown")
        );
        assert!(one(json!([1])).is_err());
        let ok = one(json!({"type":"track","anonymousId":"a","event":"E"})).unwrap();
        assert_eq!(ok.order_key, "a");
        assert_eq!(ok.message_id, "assigned");
        let ok = one(json!({"type":"identify","userId":42,"anonymousId":"a"})).unwrap();
        assert_eq!(ok.order_key, "42");
    }

    #[test]
    fn clock_skew_rule() {
        let e = one(json!({"type":"track","userId":"u","event":"E",
            "originalTimestamp":"2026-11-28T11:00:00Z","sentAt":"2026-11-28T11:00:10Z"}))
        .unwrap();
        // The device clock is 1h slow; the call happened 10s before it was sent.
        assert_eq!(e.event["timestamp"], json!("2026-11-28T11:59:50.000Z"));
        let e = one(json!({"type":"track","userId":"u","event":"E",
            "timestamp":"2026-01-01T00:00:00.123456Z"}))
        .unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-01-01T00:00:00.123Z"));
        let e = one(json!({"type":"track","userId":"u","event":"E"})).unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-11-28T12:00:00.000Z"));
        assert!(e.undated.is_empty());
    }

    #[test]
    fn every_date_form_clients_write_is_read() {
        let at = |v: Value| parse_timestamp(&v).map(format_timestamp);
        for (text, expected) in [
            ("2026-11-28", "2026-11-28T00:00:00.000Z"),
            ("2026-11-28T19:36:24.1+0530", "2026-11-28T14:06:24.100Z"),
            ("2026-11-28T19:36:24.123-0800", "2026-11-29T03:36:24.123Z"),
            ("2026-11-28T19:36:24+05", "2026-11-28T14:36:24.000Z"),
            ("2015-2-02T00:30:08.276Z", "2015-02-02T00:30:08.276Z"),
            ("2015-12-2T3:04:05Z", "2015-12-02T03:04:05.000Z"),
            ("2026-11-28T19:36:24Z", "2026-11-28T19:36:24.000Z"),
            ("2026-11-28T19:36:24.123456789Z", "2026-11-28T19:36:24.123Z"),
            ("2026-11-28T19:36:24.5-05:30", "2026-11-29T01:06:24.500Z"),
            ("2026-11-28 19:36:24.123Z", "2026-11-28T19:36:24.123Z"),
            ("2026-11-28 19:36:24", "2026-11-28T19:36:24.000Z"),
            ("2026-11-28T19:36:24.12", "2026-11-28T19:36:24.120Z"),
            ("2026-11-28T19:36Z", "2026-11-28T19:36:00.000Z"),
            ("2026-11-28t19:36:24z", "2026-11-28T19:36:24.000Z"),
            // analytics-kotlin's unpadded milliseconds (`ss'.'S`).
            ("2023-04-19T04:03:46.88Z", "2023-04-19T04:03:46.880Z"),
            (" 2026-11-28T19:36:24Z ", "2026-11-28T19:36:24.000Z"),
        ] {
            assert_eq!(at(json!(text)).as_deref(), Some(expected), "{text}");
        }
        // Epoch numbers: milliseconds (Date.now()), or seconds when too
        // small to be milliseconds.
        assert_eq!(
            at(json!(1764358584123_i64)).as_deref(),
            Some("2025-11-28T19:36:24.123Z")
        );
        assert_eq!(
            at(json!(1764358584)).as_deref(),
            Some("2025-11-28T19:36:24.000Z")
        );
        assert_eq!(
            at(json!(1764358584.5)).as_deref(),
            Some("2025-11-28T19:36:24.500Z")
        );
        for bad in [
            json!("yesterday"),
            json!(""),
            json!("2026-13-01"),
            json!("2026-02-30"),
            json!(true),
            json!({}),
            json!(1e300),
        ] {
            assert_eq!(at(bad.clone()), None, "{bad}");
        }
    }

    /// A value that is still not a date costs nothing: the event is kept,
    /// the timestamp falls back, the original value stays in the event,
    /// and the field is reported.
    #[test]
    fn a_non_date_never_costs_the_event() {
        let e =
            one(json!({"type":"track","userId":"u","event":"E","timestamp":"yesterday"})).unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-11-28T12:00:00.000Z"));
        assert_eq!(e.event["invalidTimestamp"], json!("yesterday"));
        assert_eq!(e.undated, vec!["timestamp"]);

        // A bad timestamp falls back like a missing one: the skew rule.
        let e = one(
            json!({"type":"track","userId":"u","event":"E","timestamp":[1],
            "originalTimestamp":"2026-11-28T11:00:00Z","sentAt":"2026-11-28T11:00:10Z"}),
        )
        .unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-11-28T11:59:50.000Z"));
        assert_eq!(e.event["invalidTimestamp"], json!([1]));

        let e = one(json!({"type":"track","userId":"u","event":"E",
            "originalTimestamp":"soon","sentAt":"whenever"}))
        .unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-11-28T12:00:00.000Z"));
        assert_eq!(e.event["originalTimestamp"], json!("soon"));
        assert_eq!(e.event["sentAt"], json!("whenever"));
        assert_eq!(e.undated, vec!["originalTimestamp", "sentAt"]);

        // A batch's sentAt that is no date is kept on each event as sent.
        let env = BatchEnvelope {
            sent_at: Some(json!(false)),
            ..Default::default()
        };
        let e = normalise_event(
            json!({"type":"track","userId":"u","event":"E","originalTimestamp":"2026-11-28T11:00:00Z"}),
            &env,
            now(),
            || "x".into(),
        )
        .unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-11-28T11:00:00.000Z"));
        assert_eq!(e.event["sentAt"], json!(false));
        assert_eq!(e.undated, vec!["sentAt"]);
    }

    #[test]
    fn timestamps_stay_within_what_rfc3339_can_write() {
        // Found by the property tests: a sentAt in year 9999 pushed the
        // corrected timestamp to year -5947, which could not be read back.
        let e = one(json!({"type":"track","userId":"u","event":"E",
            "originalTimestamp":"2026-11-28T11:00:00Z","sentAt":"9999-12-31T23:59:59Z"}))
        .unwrap();
        assert_eq!(e.event["timestamp"], json!("2026-11-28T11:00:00.000Z"));
        // Six-digit years parse as naive dates but cannot be written back:
        // refused, and never an overflow in the skew arithmetic.
        // They are not dates, so the event falls back to receivedAt.
        for bad in [
            "+262000-01-01T00:00:00",
            "-262000-01-01T00:00:00",
            "12345-01-01 00:00:00",
        ] {
            assert!(parse_timestamp(&json!(bad)).is_none(), "{bad}");
            let e = one(json!({"type":"track","userId":"u","event":"E","timestamp":bad})).unwrap();
            assert_eq!(e.event["timestamp"], json!("2026-11-28T12:00:00.000Z"));
            let e = one(json!({"type":"track","userId":"u","event":"E",
                    "originalTimestamp":bad,"sentAt":"2026-11-28T11:00:00Z"}))
            .unwrap();
            assert_eq!(e.event["timestamp"], json!("2026-11-28T12:00:00.000Z"));
        }
        let early = one(json!({"type":"track","userId":"u","event":"E",
            "originalTimestamp":"0000-01-01T00:00:00Z","sentAt":"9999-12-31T23:59:59Z"}))
        .unwrap();
        assert_eq!(early.event["timestamp"], json!("0000-01-01T00:00:00.000Z"));
    }

    #[test]
    fn integrations_filter() {
        let f = |i: Value| {
            one(json!({"type":"track","userId":"u","event":"E","integrations":i}))
                .unwrap()
                .forward
        };
        assert!(f(json!({})));
        assert!(!f(json!({"All": false})));
        assert!(f(json!({"All": false, "ChurnZero": true})));
        assert!(f(json!({"All": false, "Churnzero": true})));
        assert!(!f(json!({"ChurnZero": false})));
    }

    #[test]
    fn batch_envelope_applies_to_events() {
        let body = json!({"writeKey":"k","sentAt":"2026-11-28T11:00:10Z","context":{"ip":"1.2.3.4"},
            "batch":[{"type":"track","userId":"u","event":"E","originalTimestamp":"2026-11-28T11:00:00Z"}]});
        let (env, events) = split_request(None, body).unwrap();
        assert_eq!(env.write_key.as_deref(), Some("k"));
        let e = normalise_event(events[0].clone(), &env, now(), || "x".into()).unwrap();
        assert_eq!(e.event["context"]["ip"], json!("1.2.3.4"));
        assert_eq!(e.event["timestamp"], json!("2026-11-28T11:59:50.000Z"));
        assert!(e.event.get("writeKey").is_none());
    }

    #[test]
    fn oversized_event_is_refused() {
        let big = "x".repeat(LIMIT_EVENT_BYTES);
        let e = one(json!({"type":"track","userId":"u","event":"E","properties":{"p":big}}));
        assert!(e.unwrap_err().0.contains("limit"));
    }

    /// An event of exactly the limit, as sent, is accepted although the
    /// stored form (receivedAt, sentAt, normalised timestamp) is larger; one
    /// byte more is refused.
    #[test]
    fn limit_holds_on_the_event_as_sent() {
        let env = BatchEnvelope {
            sent_at: Some(json!("2026-11-28T11:59:59.000Z")),
            ..Default::default()
        };
        let event = |pad: usize| {
            json!({"type":"track","userId":"u","event":"E","messageId":"m-1",
                "timestamp":"2026-11-28T11:00:00.000Z","properties":{"p":"x".repeat(pad)}})
        };
        let base = serde_json::to_vec(&event(0)).unwrap().len();
        let at_limit = event(LIMIT_EVENT_BYTES - base);
        assert_eq!(
            serde_json::to_vec(&at_limit).unwrap().len(),
            LIMIT_EVENT_BYTES
        );
        let ok = normalise_event(at_limit, &env, now(), || "x".into()).unwrap();
        assert!(serde_json::to_vec(&ok.event).unwrap().len() > LIMIT_EVENT_BYTES);
        let over = normalise_event(event(LIMIT_EVENT_BYTES - base + 1), &env, now(), || {
            "x".into()
        });
        assert!(over.unwrap_err().0.contains("32768"));
    }
}
