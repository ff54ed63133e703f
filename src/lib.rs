//! fedrec: federated recommendation.
//!
//! This crate is the `fedrec` command line and the pieces it is made of:
//! [`data`] (loaders, the synthetic generator, the leave-one-out split),
//! [`eval`] (metrics and the centralized and popularity baselines) and
//! [`sim`] (simulations of many devices against a real coordinator) and
//! [`diversity`] (coverage and list diversity against the devices' knob),
//! [`bench`](mod@bench) (benchmarks), [`certs`] (development certificates for TLS).

pub mod baselines;
pub mod bench;
pub mod certs;
pub mod cluster;
pub mod data;
pub mod diversity;
pub mod eval;
pub mod export;
pub mod plot;
pub mod sim;
pub mod tradeoff;
