//! Segment's HTTP Tracking API: the call types, request envelopes, validation
//! and timestamp normalisation, independent of HTTP and storage.

mod validate;

pub use validate::{
    BatchEnvelope, CallType, EventError, LIMIT_BATCH_EVENTS, LIMIT_EVENT_BYTES,
    LIMIT_REQUEST_BYTES, ValidEvent, format_timestamp, normalise_event, parse_timestamp,
    split_request,
};
