//! `[privacy]`: user-level differential privacy (DP-FedAvg) and its budget.

use super::*;
use crate::CoordinatorError;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Default `privacy.noise_multiplier`.
pub const DEFAULT_NOISE_MULTIPLIER: f64 = 1.0;
/// Default `privacy.clip`.
pub const DEFAULT_CLIP: f32 = 1.0;
/// Default `privacy.delta`.
pub const DEFAULT_DELTA: f64 = 1e-5;
/// Default `privacy.target_quantile`.
pub const DEFAULT_TARGET_QUANTILE: f64 = 0.5;
/// Default `privacy.clip_learning_rate`.
pub const DEFAULT_CLIP_LEARNING_RATE: f64 = 0.2;

/// Where the Gaussian noise of DP-FedAvg is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpMode {
    /// No differential privacy.
    #[default]
    Off,
    /// The coordinator clips each plain update (devices clip too) and adds
    /// the noise to the sum: the coordinator is trusted with the noise.
    Central,
    /// Each device clips its update and adds its share of the noise before
    /// secure aggregation, so the coordinator never sees a sum with less
    /// noise than promised. Needs `secure_aggregation.enabled`.
    Distributed,
}

impl fmt::Display for DpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Central => "central",
            Self::Distributed => "distributed",
        })
    }
}

/// `[privacy]`: user-level DP-FedAvg (McMahan et al. 2018).
///
/// Every training round Poisson-samples its cohort (each waiting device
/// with probability `sampling_rate`), bounds each device's update to L2
/// norm `clip`, adds Gaussian noise of standard deviation
/// `noise_multiplier × clip` to the sum, and divides by the expected cohort
/// (`sampling_rate ×` the devices waiting), never by the count received. A
/// Rényi-DP accountant states the (ε, δ) spent; a round that would exceed
/// `epsilon_budget` is refused and training ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// "off", "central" or "distributed". Default "off".
    pub mode: DpMode,
    /// z: the noise's standard deviation over the clipping bound. Default
    /// [`DEFAULT_NOISE_MULTIPLIER`].
    pub noise_multiplier: f64,
    /// C: the L2 bound of each device's whole update (the starting bound
    /// under `adaptive_clip`). Default [`DEFAULT_CLIP`].
    pub clip: f32,
    /// q: the probability that a waiting device is sampled into a training
    /// round. Required when `mode` is not "off".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// The largest ε the training may spend at `delta`; unset = no limit
    /// (ε is still reported). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_budget: Option<f64>,
    /// δ of the stated (ε, δ); keep it below 1 / population. Default
    /// [`DEFAULT_DELTA`].
    pub delta: f64,
    /// Adapt the clipping bound to a quantile of the update norms (Andrew
    /// et al. 2021), with part of the noise budget spent on a noisy count of
    /// the updates within the bound. Default false.
    pub adaptive_clip: bool,
    /// Under `adaptive_clip`: the fraction of updates the bound aims to
    /// leave unclipped. Default [`DEFAULT_TARGET_QUANTILE`].
    pub target_quantile: f64,
    /// Under `adaptive_clip`: the bound's geometric learning rate. Default
    /// [`DEFAULT_CLIP_LEARNING_RATE`].
    pub clip_learning_rate: f64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            mode: DpMode::Off,
            noise_multiplier: DEFAULT_NOISE_MULTIPLIER,
            clip: DEFAULT_CLIP,
            sampling_rate: None,
            epsilon_budget: None,
            delta: DEFAULT_DELTA,
            adaptive_clip: false,
            target_quantile: DEFAULT_TARGET_QUANTILE,
            clip_learning_rate: DEFAULT_CLIP_LEARNING_RATE,
        }
    }
}

impl PrivacyConfig {
    /// Differential privacy is on.
    pub fn enabled(&self) -> bool {
        self.mode != DpMode::Off
    }
}

impl PrivacyConfig {
    /// Checks the `[privacy]` ranges.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let p = self;
        check_range(
            "privacy.noise_multiplier",
            p.noise_multiplier,
            0.0,
            false,
            1e4,
        )?;
        check_range("privacy.clip", p.clip.into(), 0.0, true, 1e30)?;
        check_range("privacy.delta", p.delta, 0.0, true, 0.1)?;
        if let Some(eps) = p.epsilon_budget {
            check_range("privacy.epsilon_budget", eps, 0.0, true, 1e6)?;
        }
        check_range(
            "privacy.target_quantile",
            p.target_quantile,
            0.0,
            false,
            1.0,
        )?;
        check_range(
            "privacy.clip_learning_rate",
            p.clip_learning_rate,
            0.0,
            false,
            10.0,
        )?;
        Ok(())
    }
}
