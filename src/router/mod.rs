//! The per-service router: the data plane that spills over to external providers when GPU
//! capacity is exhausted. Pure parts: [`admission`], [`breaker`], [`budget`].

pub mod admission;
pub mod breaker;
pub mod budget;
pub mod config;
