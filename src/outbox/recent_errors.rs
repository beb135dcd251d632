//! The last delivery errors, for operators: a small ring kept as JSON in the
//! `meta` table and updated in the same transaction as the settlement that
//! saw the error, so `/status` reads one row instead of scanning events.
//!
//! The ring's rules live here, shared by every backend; each stores the
//! ring in its own way.
//!
//! Consecutive reports of the same error with the same outcome merge into
//! one entry (first and last time, event count): an outage that lasts an
//! hour is one line, not twenty identical ones that push older, different
//! errors out of the ring.

use super::status::ms_to_rfc3339 as rfc3339;
use serde::{Deserialize, Serialize};

/// Entries kept, newest first.
pub const KEEP: usize = 20;
/// The `meta` row holding the ring.
pub(crate) const META_NAME: &str = "recent_errors";
/// Longest error text kept in one entry.
const ERROR_CHARS: usize = 500;

/// One error (or one run of the same error) as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecentError {
    /// When it was last seen (RFC 3339).
    pub at: String,
    /// When this run of the same error began (RFC 3339).
    pub first_at: String,
    pub error: String,
    /// What happened to the events: `retry` or `dead`.
    pub outcome: String,
    /// Events that hit this error during the run.
    pub events: i64,
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Parses the stored ring; a damaged value reads as empty rather than
/// failing `/status`.
pub(crate) fn parse(value: Option<&str>) -> Vec<RecentError> {
    value
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// Adds `(error, outcome, events)` reports seen at `now` to the ring.
pub(crate) fn merge<E: AsRef<str>>(
    ring: &mut Vec<RecentError>,
    reports: &[(E, &'static str, i64)],
    now: i64,
) {
    let at = rfc3339(now);
    for (error, outcome, events) in reports {
        let error = clip(error.as_ref());
        match ring.first_mut() {
            Some(head) if head.error == error && head.outcome == *outcome => {
                head.at = at.clone();
                head.events += events;
            }
            _ => ring.insert(
                0,
                RecentError {
                    at: at.clone(),
                    first_at: at.clone(),
                    error,
                    outcome: (*outcome).to_string(),
                    events: *events,
                },
            ),
        }
    }
    ring.truncate(KEEP);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(ERROR_CHARS + 10);
        let c = clip(&long);
        assert_eq!(c.chars().count(), ERROR_CHARS + 1);
        assert!(c.ends_with('…'));
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn damaged_ring_reads_as_empty() {
        assert!(parse(Some("not json")).is_empty());
        assert!(parse(None).is_empty());
    }
}
