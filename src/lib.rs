//! churnzero-forwarder: a self-hosted, Segment-compatible event forwarder
//! for ChurnZero. Accepted events are committed to a SQLite outbox before
//! the client gets its 200, then delivered in batches with retries, per-user
//! ordering and dead letters. See DESIGN.md's data flow; one module per box.

pub mod bench;
pub mod churnzero;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod identity;
pub mod ingest;
pub mod mock_churnzero;
pub mod operator;
pub mod outbox;
pub mod secret;
pub mod segment;
pub mod server;
pub mod sync_lane;
