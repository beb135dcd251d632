//! Property tests of the ingest path: the body parser, the Segment validator
//! and the ChurnZero mapping, fed generated input (random bytes, random JSON
//! and Segment-shaped events with hostile values). None may panic; every
//! event is either accepted, with the guarantees the outbox relies on, or
//! refused with a reason. The case count is CI-sized by default; raise it
//! with `PROPTEST_CASES=200000` for a long run by hand.

use chrono::{DateTime, Utc};
use churnzero_forwarder::churnzero::mapping::{self, Ids, MappingConfig};
use churnzero_forwarder::ingest::{MAX_DEPTH, parse_json};
use churnzero_forwarder::segment::{
    self, BatchEnvelope, CallType, LIMIT_BATCH_EVENTS, LIMIT_EVENT_BYTES, ValidEvent,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        // Failure persistence files would land in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn received_at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T12:00:00.000Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// Strings that tend to break things: empty, blank, long, multi-byte,
/// control characters, timestamps good and bad, numbers as text.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_string()),
        Just("\u{0}".to_string()),
        Just("é🎉\u{202e}".to_string()),
        Just("2026-11-28T11:00:00Z".to_string()),
        Just("2026-11-28T11:00:00.123456789+05:30".to_string()),
        Just("2026-11-28 11:00:00".to_string()),
        Just("9999-12-31T23:59:59Z".to_string()),
        Just("0000-01-01T00:00:00Z".to_string()),
        Just("-262144-01-01T00:00:00Z".to_string()),
        Just("yesterday".to_string()),
        Just("1e309".to_string()),
        "[a-zA-Z0-9 _.-]{1,12}",
        "\\PC{0,40}",
        (1usize..400).prop_map(|n| "ü".repeat(n)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        nasty_string().prop_map(Value::String),
    ]
}

/// Keys a Segment event, its traits, properties or context may carry.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "type", "userId", "anonymousId", "event", "groupId", "previousId", "messageId",
            "timestamp", "originalTimestamp", "sentAt", "traits", "properties", "context",
            "integrations", "name", "writeKey", "email", "firstName", "lastName",
            "accountExternalId", "contactExternalId", "account_id", "company", "description",
            "quantity", "personas", "computation_class", "computation_key", "All", "ChurnZero",
            "Churnzero", "batch",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{0,10}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn call_type() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["identify", "track", "page", "screen", "group", "alias"])
            .prop_map(str::to_string),
        1 => nasty_string(),
    ]
}

/// Segment-shaped events: mostly the right fields, with values drawn from
/// the nasty set, so that both the accept and the refuse paths are walked.
fn segment_event() -> impl Strategy<Value = Value> {
    (
        call_type(),
        prop::option::of(prop_oneof![nasty_string().prop_map(Value::String), leaf()]),
        prop::option::of(nasty_string().prop_map(Value::String)),
        prop::option::of(nasty_string().prop_map(Value::String)),
        prop::option::of(leaf()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(segment_context()),
        prop::collection::vec((key(), json_value()), 0..4),
    )
        .prop_map(|(t, user, anon, event, ts, traits, props, ctx, extra)| {
            let mut m = Map::new();
            for (k, v) in extra {
                m.insert(k, v);
            }
            m.insert("type".into(), Value::String(t));
            for (k, v) in [
                ("userId", user),
                ("anonymousId", anon),
                ("event", event),
                ("timestamp", ts),
                ("traits", traits),
                ("properties", props),
                ("context", ctx),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            // Half the time give it what its type requires, so that the
            // accept path gets as much traffic as the refusals.
            m.entry("groupId").or_insert(json!("g-1"));
            m.entry("previousId").or_insert(json!("p-1"));
            Value::Object(m)
        })
}

/// A `context`: any JSON, or one shaped like a library's, with ids in
/// `traits` or `groupId`, an Engage audience in `personas` (naming a key that
/// the event's traits may carry), and what libraries add beside them.
fn segment_context() -> impl Strategy<Value = Value> {
    let personas = (
        prop::sample::select(vec!["audience", "trait", "computed"]),
        key(),
    )
        .prop_map(|(class, key)| json!({"computation_class": class, "computation_key": key}));
    let shaped = (
        prop::option::of(json_value()),
        prop::option::of(prop_oneof![nasty_string().prop_map(Value::String), leaf()]),
        prop::option::of(personas),
        prop::collection::vec((key(), json_value()), 0..4),
        any::<bool>(),
    )
        .prop_map(|(traits, group, personas, extra, library_first)| {
            let mut m = Map::new();
            if library_first {
                m.insert(
                    "library".into(),
                    json!({"name": "analytics.js", "version": "1"}),
                );
            }
            for (k, v) in [
                ("traits", traits),
                ("groupId", group),
                ("personas", personas),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            for (k, v) in extra {
                m.insert(k, v);
            }
            Value::Object(m)
        });
    prop_oneof![json_value(), shaped]
}

/// Events as libraries send them, every call type, with objects for traits
/// and properties and a library-shaped context whose audience (if any)
/// names one of the event's traits, as Engage's do.
fn library_event() -> impl Strategy<Value = Value> {
    let object = || {
        prop::collection::vec((key(), json_value()), 0..6)
            .prop_map(|kv| Value::Object(kv.into_iter().collect()))
    };
    (
        prop::sample::select(vec![
            "identify", "track", "page", "screen", "group", "alias",
        ]),
        object(),
        object(),
        segment_context(),
        prop::option::of(nasty_string()),
    )
        .prop_map(|(t, mut traits, properties, context, name)| {
            let audience = context
                .pointer("/personas/computation_key")
                .and_then(Value::as_str);
            if let (Some(a), Value::Object(traits)) = (audience, &mut traits) {
                traits.insert(a.to_string(), Value::Bool(true));
            }
            json!({
                "type": t, "userId": "u-1", "event": name, "name": name, "groupId": "g-1",
                "timestamp": "2026-11-28T11:00:00Z", "traits": traits,
                "properties": properties, "context": context,
            })
        })
}

/// What an accepted event must satisfy for the outbox and delivery.
fn check_valid(v: &ValidEvent) -> Result<(), TestCaseError> {
    prop_assert!(!v.order_key.trim().is_empty());
    prop_assert!(!v.message_id.is_empty() && v.message_id.chars().count() <= 256);
    let event = Value::Object(v.event.clone());
    prop_assert_eq!(event["type"].as_str(), Some(v.call.as_str()));
    prop_assert_eq!(event["messageId"].as_str(), Some(v.message_id.as_str()));
    prop_assert!(
        event.get("writeKey").is_none(),
        "write keys are never stored"
    );
    let ts = event["timestamp"].as_str().unwrap_or_default();
    prop_assert!(
        segment::parse_timestamp(&json!(ts)).is_some(),
        "timestamp {}",
        ts
    );
    // No size bound on the stored form: the 32 KB limit holds on the event
    // as sent, and the stored form adds to it (see `size_as_sent`).
    match v.call {
        CallType::Track => prop_assert!(
            event["event"]
                .as_str()
                .is_some_and(|e| !e.trim().is_empty())
        ),
        CallType::Group => prop_assert!(event["groupId"].is_string()),
        CallType::Alias => {
            prop_assert!(event["previousId"].is_string() && event["userId"].is_string())
        }
        _ => {}
    }
    Ok(())
}

/// Stable payloads (ChurnZero's duplicate filter relies on them): whatever
/// the identity map and the mapping file say by the time of a later attempt
/// (a retry, a restart with another mapping, a replay), the event sends the
/// bytes its first attempt resolved it to.
fn check_stable_payload(cfg: &MappingConfig, event: &Value) -> Result<(), TestCaseError> {
    use churnzero_forwarder::delivery::{Attempt, attempt, stored_form};
    let kind = event["type"].as_str().unwrap_or("");
    let first_map = (
        Some("acct-first".to_string()),
        Some("contact-first".to_string()),
    );
    let moved_map = (
        Some("acct-second".to_string()),
        Some("contact-second".to_string()),
    );
    let other_cfg = MappingConfig::from_toml_str(
        "event_custom_fields = [\"seats\"]\ndescription_property = \"note\"\n\
         quantity_property = \"seats\"\npage_events = false\n\n[traits]\nplan = { field = \"Tier\" }\n",
    )
    .expect("test mapping parses");
    let first = attempt(cfg, kind, event, None, Some(&first_map));
    let Attempt::Send {
        actions,
        fresh: true,
    } = first
    else {
        // Nothing to send (or not sendable): nothing can drift either.
        return Ok(());
    };
    let stored = stored_form(&actions);
    let later = [
        attempt(cfg, kind, event, Some(&stored), Some(&moved_map)),
        attempt(&other_cfg, kind, event, Some(&stored), Some(&moved_map)),
        attempt(&MappingConfig::default(), kind, event, Some(&stored), None),
    ];
    for again in later {
        match again {
            Attempt::Send {
                actions: again,
                fresh,
            } => {
                prop_assert!(!fresh, "stored actions are sent as stored");
                prop_assert_eq!(
                    serde_json::to_string(&again).unwrap(),
                    serde_json::to_string(&actions).unwrap()
                );
            }
            other => prop_assert!(false, "a later attempt must send again: {:?}", other),
        }
    }
    Ok(())
}

/// What every mapped action must satisfy, for any event and any ids.
fn check_actions(cfg: &MappingConfig, event: &Value) -> Result<(), TestCaseError> {
    let ids = Ids {
        account: "acct".into(),
        contact: "contact".into(),
    };
    let actions = mapping::map_event(cfg, event, &ids);
    check_stable_payload(cfg, event)?;
    for a in &actions {
        prop_assert!(
            a.get("appKey").is_none(),
            "the app key is added at send time only"
        );
        prop_assert!(a["action"].is_string());
        prop_assert!(a.contains_key("accountExternalId") && a.contains_key("contactExternalId"));
        if let Some(d) = a.get("description") {
            prop_assert!(d.as_str().is_some_and(|d| d.chars().count() <= 255));
        }
        serde_json::to_vec(a).unwrap();
    }
    if event["type"] == "track" {
        if let Some(name) = event["event"].as_str().filter(|n| !n.is_empty()) {
            prop_assert_eq!(actions.len(), 1);
            prop_assert_eq!(actions[0]["eventName"].as_str(), Some(name));
        }
    }
    let ids = mapping::ids_from_event(cfg, event);
    for id in [&ids.account, &ids.contact].into_iter().flatten() {
        prop_assert!(!id.is_empty());
    }
    let _ = mapping::audience_updates(cfg, event);
    check_read_for_mapping(cfg, event, &actions)
}

/// Delivery reads a stored payload with `parse_for_mapping`, which drops
/// what mapping never reads: whatever the event, it must map, resolve and
/// attempt exactly as the whole payload does.
fn check_read_for_mapping(
    cfg: &MappingConfig,
    event: &Value,
    actions: &[Map<String, Value>],
) -> Result<(), TestCaseError> {
    use churnzero_forwarder::delivery::attempt;
    let text = serde_json::to_string(event).unwrap();
    let view = mapping::parse_for_mapping(&text).expect("serialised JSON reads");
    let ids = Ids {
        account: "acct".into(),
        contact: "contact".into(),
    };
    prop_assert_eq!(mapping::map_event(cfg, &view, &ids), actions.to_vec());
    prop_assert_eq!(
        mapping::ids_from_event(cfg, &view),
        mapping::ids_from_event(cfg, event)
    );
    prop_assert_eq!(
        mapping::audience_updates(cfg, &view),
        mapping::audience_updates(cfg, event)
    );
    let kind = event["type"].as_str().unwrap_or("");
    let known = (Some("acct-known".to_string()), None);
    for known in [None, Some(&known)] {
        prop_assert_eq!(
            attempt(cfg, kind, &view, None, known),
            attempt(cfg, kind, event, None, known)
        );
    }
    Ok(())
}

fn mapping_config() -> MappingConfig {
    MappingConfig::from_toml_str(
        "page_events = true\nscreen_events = true\nevent_custom_fields = [\"plan\", \"seats\"]\n\
         audience_traits = [\"vip\"]\n",
    )
    .expect("test mapping parses")
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes: parsed or refused with a reason, never a panic.
    #[test]
    fn parse_json_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match parse_json(&bytes) {
            Ok(_) => prop_assert!(std::str::from_utf8(&bytes).is_ok()),
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    /// Serialised JSON parses back to the same value (within the depth limit).
    #[test]
    fn parse_json_round_trips(v in json_value()) {
        let text = serde_json::to_vec(&v).unwrap();
        prop_assert_eq!(parse_json(&text).expect("valid JSON parses"), v);
    }

    /// Nesting past the limit is refused whatever the brackets, never a stack
    /// overflow; at the limit it parses.
    #[test]
    fn nesting_is_bounded(depth in 1usize..2000, open in prop::collection::vec(any::<bool>(), 1..8)) {
        let mut text = String::new();
        for i in 0..depth {
            text.push_str(if open[i % open.len()] { "[" } else { "{\"k\":" });
        }
        text.push('1');
        for i in (0..depth).rev() {
            text.push(if open[i % open.len()] { ']' } else { '}' });
        }
        let r = parse_json(text.as_bytes());
        if depth > MAX_DEPTH {
            prop_assert!(r.unwrap_err().contains("nesting"));
        } else {
            prop_assert!(r.is_ok());
        }
    }

    /// Any JSON body at any endpoint: split into events or refused, and every
    /// event validated or refused with a reason.
    #[test]
    fn any_body_is_accepted_or_refused(
        body in json_value(),
        path in prop::option::of(prop::sample::select(vec![
            CallType::Identify, CallType::Track, CallType::Page, CallType::Screen,
            CallType::Group, CallType::Alias,
        ])),
    ) {
        match segment::split_request(path, body) {
            Err(e) => prop_assert!(!e.0.is_empty()),
            Ok((envelope, events)) => {
                prop_assert!(!events.is_empty() && events.len() <= LIMIT_BATCH_EVENTS);
                for raw in events {
                    let size = size_as_sent(&raw, &envelope);
                    match segment::normalise_event(raw, &envelope, received_at(), || "assigned".into()) {
                        Ok(valid) => {
                            prop_assert!(size <= LIMIT_EVENT_BYTES);
                            check_valid(&valid)?
                        }
                        Err(e) => {
                            prop_assert!(!e.0.is_empty());
                            prop_assert!(!refused_for_size(&e.0) || size > LIMIT_EVENT_BYTES);
                        }
                    }
                }
            }
        }
    }

    /// Segment-shaped events with hostile values: accepted with the outbox's
    /// guarantees, or refused with a reason; accepted ones map to well-formed
    /// ChurnZero actions, and a stored event normalises to itself again (its
    /// payload is stable across restarts and attempts).
    #[test]
    fn segment_events_validate_and_map(
        raw in segment_event(),
        sent_at in prop::option::of(nasty_string()),
        batch_context in prop::option::of(json_value()),
    ) {
        let envelope = BatchEnvelope {
            sent_at: sent_at.map(Value::String),
            context: batch_context.and_then(|c| c.as_object().cloned()),
            ..BatchEnvelope::default()
        };
        let cfg = mapping_config();
        check_actions(&cfg, &raw)?;
        match segment::normalise_event(raw, &envelope, received_at(), || "assigned".into()) {
            Err(e) => prop_assert!(!e.0.is_empty()),
            Ok(valid) => {
                check_valid(&valid)?;
                let stored = Value::Object(valid.event.clone());
                check_actions(&cfg, &stored)?;
                check_actions(&MappingConfig::default(), &stored)?;
                let again = segment::normalise_event(
                    stored.clone(), &BatchEnvelope::default(), received_at(), || "other".into(),
                ).expect("a stored event is valid");
                prop_assert_eq!(Value::Object(again.event), stored);
            }
        }
    }

    /// Library-shaped events, read as delivery reads them, map exactly as
    /// the whole payload does (`check_read_for_mapping`).
    #[test]
    fn a_payload_read_for_mapping_maps_as_the_whole_payload(event in library_event()) {
        check_actions(&mapping_config(), &event)?;
        check_actions(&MappingConfig::default(), &event)?;
    }

    /// Arbitrary JSON where an event belongs: the mapping never panics.
    #[test]
    fn mapping_takes_any_json(event in json_value()) {
        check_actions(&MappingConfig::default(), &event)?;
        check_actions(&mapping_config(), &event)?;
    }
}

/// The size the 32 KB limit applies to: the event as the client sent it,
/// with the batch's `context` and `integrations` merged in where it lacks
/// them, without the write key (never stored) and with its ids as the
/// strings they are stored as; not the stored form, which also carries what
/// the forwarder adds (an assigned messageId, receivedAt, sentAt, the
/// normalised timestamp). The official libraries measure their own form of
/// the event, so one they accept at the limit must not be refused for what
/// the forwarder adds.
fn size_as_sent(raw: &Value, envelope: &BatchEnvelope) -> usize {
    let mut obj = raw.as_object().cloned().unwrap_or_default();
    obj.remove("writeKey");
    for id in ["userId", "anonymousId"] {
        match obj.get(id) {
            Some(Value::Null) => {
                obj.remove(id);
            }
            Some(Value::Number(n)) => {
                let s = n.to_string();
                obj.insert(id.into(), Value::String(s));
            }
            _ => {}
        }
    }
    for (key, batch) in [
        ("context", &envelope.context),
        ("integrations", &envelope.integrations),
    ] {
        let Some(batch) = batch else { continue };
        match obj.get_mut(key) {
            Some(Value::Object(own)) => {
                for (k, v) in batch {
                    own.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            _ => {
                obj.insert(key.into(), Value::Object(batch.clone()));
            }
        }
    }
    serde_json::to_vec(&obj).unwrap().len()
}

/// Whether a refusal is the size limit's.
fn refused_for_size(reason: &str) -> bool {
    reason.contains("more than the limit")
}

/// A track that passes every other check, so that only its size decides.
fn valid_track() -> impl Strategy<Value = Value> {
    (
        "[a-z]{1,8}",
        "[A-Za-z][A-Za-z ]{0,19}",
        prop::option::of("[a-z0-9-]{1,40}"),
        prop::option::of(json_value()),
    )
        .prop_map(|(user, event, id, props)| {
            let mut m = Map::new();
            m.insert("type".into(), json!("track"));
            m.insert("userId".into(), json!(user));
            m.insert("event".into(), json!(event));
            m.insert("timestamp".into(), json!("2026-11-28T11:00:00.000Z"));
            if let Some(id) = id {
                m.insert("messageId".into(), json!(id));
            }
            if let Some(Value::Object(p)) = props {
                m.insert("properties".into(), Value::Object(p));
            }
            Value::Object(m)
        })
}

/// Pads `event` with a top-level field so that its size as sent (see
/// [`size_as_sent`]) is `LIMIT_EVENT_BYTES + offset` where it can get there
/// (an event already larger stays as it is). The padding mixes one-byte,
/// multi-byte and escaped characters, so bytes and characters differ.
fn pad_to(mut event: Value, envelope: &BatchEnvelope, offset: i64, unit: &str) -> Value {
    let Some(obj) = event.as_object_mut() else {
        return event;
    };
    obj.insert("padding".into(), json!(""));
    let base = size_as_sent(&event, envelope) as i64;
    let missing = LIMIT_EVENT_BYTES as i64 + offset - base;
    if missing > 0 {
        let width = serde_json::to_vec(&json!(unit)).unwrap().len() as i64 - 2;
        let mut pad = unit.repeat((missing / width) as usize);
        pad.push_str(&"x".repeat((missing % width) as usize));
        event["padding"] = json!(pad);
    }
    event
}

/// Events around the limit, as sent: exactly at it, a byte either side, or
/// within a few hundred bytes; valid tracks (only the size can refuse them)
/// and hostile Segment-shaped events, under a batch context that counts.
fn near_limit_event() -> impl Strategy<Value = (Value, BatchEnvelope, bool)> {
    (
        prop_oneof![
            1 => valid_track().prop_map(|e| (e, true)),
            1 => segment_event().prop_map(|e| (e, false)),
        ],
        prop_oneof![Just(0i64), Just(1), Just(-1), -400i64..=400],
        prop::option::of(json_value()),
        prop::option::of(prop_oneof![
            Just("2026-11-28T11:59:59.000Z".to_string()),
            nasty_string()
        ]),
        prop::sample::select(vec!["x", "é", "🎉", "\"", "\u{1}", "\\"]),
    )
        .prop_map(|((event, clean), offset, context, sent_at, unit)| {
            let envelope = BatchEnvelope {
                sent_at: sent_at
                    .filter(|s| !clean || s.starts_with("2026"))
                    .map(Value::String),
                context: context.and_then(|c| c.as_object().cloned()),
                ..BatchEnvelope::default()
            };
            let event = pad_to(event, &envelope, offset, unit);
            (event, envelope, clean)
        })
}

proptest! {
    #![proptest_config(config())]

    /// The 32 KB limit holds on the event as sent, whatever the forwarder
    /// adds: a valid event at the limit is accepted (its stored form may be
    /// larger), one byte more is refused for its size, and no event is
    /// refused for its size below the limit or accepted above it.
    #[test]
    fn size_limit_holds_on_the_event_as_sent(
        (raw, envelope, clean) in near_limit_event(),
    ) {
        let size = size_as_sent(&raw, &envelope);
        match segment::normalise_event(raw, &envelope, received_at(), || "assigned".into()) {
            Ok(valid) => {
                prop_assert!(size <= LIMIT_EVENT_BYTES, "accepted at {} bytes as sent", size);
                check_valid(&valid)?;
            }
            Err(e) => {
                if refused_for_size(&e.0) {
                    prop_assert!(size > LIMIT_EVENT_BYTES, "refused at {} bytes: {}", size, e.0);
                }
                // Only its size can refuse a valid track.
                prop_assert!(!clean || refused_for_size(&e.0), "{} bytes: {}", size, e.0);
            }
        }
    }
}
