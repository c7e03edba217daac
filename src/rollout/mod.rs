//! Revisions and rollouts, the pure core: what defines a served version ([`revision`]), what a
//! step must show before traffic moves on ([`gate`]), and a rollout's course from the stable
//! revision to a candidate ([`machine`]).

pub mod drive;
pub mod gate;
pub mod machine;
pub mod record;
pub mod revision;

#[cfg(test)]
mod drive_tests;
#[cfg(test)]
mod tests;
