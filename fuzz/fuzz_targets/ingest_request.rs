//! The ingest request path, from body bytes to ChurnZero actions: read the
//! body (plain or gzip, within the limits), parse JSON, split the request,
//! validate and normalise each event, build its outbox row, and map it.
//! The first input byte picks the endpoint and the encoding; the rest is the
//! body. Any panic is a bug: every input must be accepted or refused.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, header};
use churnzero_forwarder::churnzero::mapping::{self, Ids, MappingConfig};
use churnzero_forwarder::ingest::{WriteKey, parse_json, read_body, to_new_event};
use churnzero_forwarder::secret::Secret;
use churnzero_forwarder::segment::{self, CallType};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    mapping: MappingConfig,
    write_key: WriteKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap(),
        mapping: MappingConfig::from_toml_str(
            "page_events = true\nscreen_events = true\naudience_traits = [\"vip\"]\n\
             event_custom_fields = [\"plan\"]\n",
        )
        .unwrap(),
        write_key: WriteKey::new(Secret::new("fuzz-write-key")),
    })
}

const PATHS: [Option<CallType>; 8] = [
    None,
    None,
    Some(CallType::Identify),
    Some(CallType::Track),
    Some(CallType::Page),
    Some(CallType::Screen),
    Some(CallType::Group),
    Some(CallType::Alias),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let path = PATHS[(selector & 7) as usize];
    let mut headers = HeaderMap::new();
    let body = if selector & 0x80 != 0 {
        // Half the inputs are gzipped so that the inflater sees valid streams
        // too; 0x40 sends the raw bytes as if they were gzip.
        let wire = if selector & 0x40 != 0 {
            body.to_vec()
        } else {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        };
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        wire
    } else {
        body.to_vec()
    };
    let Ok(bytes) = f
        .runtime
        .block_on(read_body(&headers, axum::body::Body::from(body)))
    else {
        return;
    };
    let Ok(value) = parse_json(&bytes) else {
        return;
    };
    let Ok((envelope, events)) = segment::split_request(path, value) else {
        return;
    };
    let received_at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let ids = Ids {
        account: "a".into(),
        contact: "c".into(),
    };
    for raw in events {
        let _ = mapping::map_event(&f.mapping, &raw, &ids);
        let Ok(valid) = segment::normalise_event(raw, &envelope, received_at, || "id".into())
        else {
            continue;
        };
        let event = serde_json::Value::Object(valid.event.clone());
        let actions = mapping::map_event(&f.mapping, &event, &ids);
        assert!(actions.iter().all(|a| a.get("appKey").is_none()));
        assert_eq!(actions, mapping::map_event(&f.mapping, &event, &ids));
        let _ = mapping::ids_from_event(&f.mapping, &event);
        let row = to_new_event(&f.mapping, &f.write_key, valid);
        assert!(!row.order_key.is_empty() && !row.message_id.is_empty());
    }
});
