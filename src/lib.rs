//! churnzero-forwarder: a self-hosted, Segment-compatible event forwarder
//! for ChurnZero. Accepted events are committed to a SQLite outbox before
//! the client gets its 200, then delivered in batches with retries, per-user
//! ordering and dead letters. See DESIGN.md's data flow; one module per box.

pub mod churnzero;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod devtools;
pub mod identity;
pub mod ingest;
pub mod operator;
pub mod outbox;
pub mod secret;
pub mod segment;
pub mod server;
pub mod sync_lane;

// The dev tools' paths from before they moved under devtools/, kept for
// the command line and the integration tests that name them.
pub use devtools::{bench, demo, mock_churnzero};
