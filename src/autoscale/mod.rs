//! The autoscaler: scrape engine metrics, `decide()` (pure), act on the decision.

pub mod decide;

#[cfg(test)]
mod decide_tests;
