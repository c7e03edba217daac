//! The autoscaler's pure core, one file per part: one table of cases per rule of `decide()`
//! with property tests for its invariants, and the metrics-page parsers.

mod cost;
mod decide;
mod latency_objective;
mod promtext;
mod signals;
