//! The autoscaler: scrape engine metrics, `decide()` (pure), act on the decision.

pub mod decide;
pub mod observe;
pub mod scrape;
pub mod status;

#[cfg(test)]
mod decide_tests;
