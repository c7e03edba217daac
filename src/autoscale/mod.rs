//! The autoscaler: engine metrics pages in, per-pod scaling signals out.

pub mod promtext;
pub mod signals;
