//! User-level differential privacy: the accountant that states (ε, δ).

pub mod accountant;

pub use accountant::{RdpAccountant, noise_multiplier_for};
