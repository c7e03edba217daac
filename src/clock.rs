//! Time as the pure cores see it: milliseconds on the caller's clock (wall clock in the
//! controller, a monotonic epoch in the router, virtual time in the simulator).

/// Milliseconds on the caller's clock.
pub type Millis = i64;
