//! spillway: a Kubernetes operator for self-hosted GPU inference.
//!
//! Layers, lowest first; a module imports only from layers below its own:
//! 1. [`api`]: the `InferenceService` and `ScalingPolicy` custom resources; [`clock`]: the
//!    millisecond type the pure cores count time in.
//! 2. Pure cores, plain functions over plain data: [`autoscale`] (metrics pages, pods, the
//!    scaling decision and its status), [`rollout`] (revisions, the gate, a rollout's course)
//!    and the router's own (`router::admission`, `breaker`,
//!    `budget`, `usage`, `config`, `outcome`, and the HTTP/1.1 framing in `router::engine`).
//! 3. Drivers, the I/O around them: [`controller`] (reconcile, the autoscaler loop, leader
//!    election), [`router`] (the per-service data plane), [`sim`] (the simulator),
//!    [`engine_sim`] (a simulated engine), [`crdgen`] (the CRDs as YAML).
//! 4. Process plumbing shared by the subcommands: [`runtime`] (signals, accept) and
//!    [`telemetry`] (logging).

pub mod api;
pub mod autoscale;
pub mod clock;
pub mod controller;
pub mod crdgen;
pub mod engine_sim;
pub mod rollout;
pub mod router;
pub mod runtime;
pub mod sim;
pub mod telemetry;

#[cfg(test)]
mod test_support;
