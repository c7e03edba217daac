//! The autoscaler's pure core: engine and router metrics pages parsed ([`promtext`],
//! [`signals`]), pods classified ([`observe`]), the decision ([`decide`]) and the status it
//! writes ([`status`]). No I/O: the controller's autoscaler loop (`controller::autoscaler`)
//! scrapes, calls these, and writes; the simulator calls them too.

pub mod cost;
pub mod decide;
/// Demand one horizon ahead: a trend and a daily season.
pub mod forecast;
/// Time to first token from the routers' histograms.
pub mod latency;
pub mod observe;
pub mod promtext;
pub mod signals;
pub mod status;

#[cfg(test)]
mod tests;
