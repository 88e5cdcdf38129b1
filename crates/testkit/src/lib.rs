//! What Chorus's tests and benchmarks share, written once: fixtures and harnesses used by the
//! gateway's and the writer's integration tests, the end-to-end tests and the benchmarks. A
//! dev-only crate (`publish = false`): no service binary depends on it.
//!
//! - [`fake_gateway`]: a scripted stand-in for a gateway, for the client libraries' tests.
//! - [`gateway`]: a gateway in this process with no writer and no SNS: an in-memory log whose
//!   appends come back over the gateway's own `/sns`, as SNS delivers them.
//! - [`sns`]: SNS envelopes as SNS posts them, signed with a key and certificate generated for
//!   the run, and a loopback server for that certificate.
//! - [`tokens`]: client JWTs (as an auth service mints them) and service tokens (as a gateway
//!   calls the writer).
//! - [`logs`]: logs captured in memory, for what a service must (not) log.
//! - [`wait`]: waits that end on progress — readiness and metrics — never on a wall clock.
//! - [`emulator`]: the AWS emulator the end-to-end tests and the benchmarks run against.
//!
//! The gateway's own fakes (`MemoryLog`, `ConfirmedAtOnce`) live in `chorus_gateway::test_support`
//! behind its `test-support` feature, so that the gateway's unit tests use the same ones.

pub mod emulator;
pub mod fake_gateway;
pub mod gateway;
pub mod logs;
pub mod sns;
pub mod tokens;
pub mod wait;
