//! Everything that speaks ChurnZero: how Segment events become ChurnZero
//! actions ([`mapping`]) and how those actions are sent ([`client`]).

pub mod client;
pub mod mapping;
