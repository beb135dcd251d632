//! Tools for trying and measuring the forwarder, not part of the service:
//! a stand-in ChurnZero with fault injection, the demo that runs the whole
//! path against it, and the benchmark. They reach the service only through
//! its public entry points (the server, the HTTP API, the status figures),
//! so the service's modules never depend on them.

pub mod bench;
pub mod cpu_meter;
pub mod demo;
pub mod mock_churnzero;
