//! The autoscaler: scrape engine metrics, parse them, `decide()` (pure), act on the decision.

pub mod decide;
pub mod promtext;
pub mod signals;

#[cfg(test)]
mod decide_tests;
