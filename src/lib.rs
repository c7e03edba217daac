//! spillway: a Kubernetes operator for self-hosted GPU inference.
//!
//! Parts of the system, one folder each:
//! - [`api`]: the `InferenceService` and `ScalingPolicy` custom resources.
//! - [`autoscale`]: reads engine metrics pages and turns them into scaling signals.
//! - [`controller`]: reconciles services into owned objects (pure rendering, I/O at the edge).
//! - [`engine_sim`]: a simulated inference engine for tests, benchmarks and GPU-less demos.

pub mod api;
pub mod autoscale;
pub mod clock;
pub mod controller;
pub mod crdgen;
pub mod engine_sim;
pub mod router;
pub mod runtime;
pub mod sim;
pub mod telemetry;

#[cfg(test)]
mod packaging_tests;
