//! Everything that speaks ChurnZero: how Segment events become ChurnZero
//! actions ([`mapping`]), how those actions are sent ([`client`]), and how
//! a refused request is split to find the refused actions ([`poison`]).

pub mod client;
pub mod mapping;
pub mod poison;
