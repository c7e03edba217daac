//! The autoscaler: scrape engine metrics, parse them, `decide()` (pure), act on the decision.

pub mod decide;
pub mod driver;
pub mod observe;
pub mod promtext;
pub mod scrape;
pub mod signals;
pub mod status;

#[cfg(test)]
mod decide_tests;
#[cfg(test)]
mod driver_tests;
