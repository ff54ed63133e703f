//! `[strategy]`: the server step and how updates are weighted and combined.

use super::*;
use crate::CoordinatorError;

use serde::{Deserialize, Serialize};

/// Default `strategy.server_lr`.
pub const DEFAULT_SERVER_LR: f32 = 1.0;
/// Default `strategy.momentum`.
pub const DEFAULT_MOMENTUM: f32 = 0.9;
/// Default `strategy.beta1`.
pub const DEFAULT_BETA1: f32 = 0.9;
/// Default `strategy.beta2`.
pub const DEFAULT_BETA2: f32 = 0.99;
/// Default `strategy.tau`.
pub const DEFAULT_TAU: f32 = 1e-3;

/// Which server optimizer combines the round's mean update into the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    /// `x += server_lr * mean_update` (McMahan et al. 2017).
    #[default]
    FedAvg,
    /// FedAvg with server momentum.
    FedAvgM,
    /// Adaptive: Adam on the server (Reddi et al. 2021).
    FedAdam,
    /// Adaptive: Yogi on the server (Reddi et al. 2021).
    FedYogi,
    /// Adaptive: Adagrad on the server (Reddi et al. 2021).
    FedAdagrad,
    /// Under `training.loss = "als"` only: each item embedding moves by
    /// `server_lr (2M + 2λ/N I)⁻¹ Δ_i`, the mean gradient preconditioned by
    /// the loss's curvature, where `M` is the cohort's mean of `x xᵀ` over
    /// the devices' solved private vectors (each device appends its `x xᵀ`
    /// to its update; only the cohort's mean is used), `λ` the
    /// regularization and `N` the number of joined devices. For an item
    /// nobody in the cohort bought this is the exact item step of
    /// centralized ALS; so federated training converges in about as many
    /// visits per shopper as ALS needs iterations. Not with differential
    /// privacy: clipping the update would clip `x xᵀ` with it.
    Als,
    /// EASE (Steck 2019), for the client's `Ease` model: each device's
    /// update is the upper triangle of its own co-purchase matrix `x xᵀ`;
    /// the step sums the cohort's (mean × devices), adds `ease_lambda` to
    /// the diagonal and publishes the inverse's upper triangle as the new
    /// model, replacing the old one. One round with every device is EASE
    /// on all their data. Needs uniform weighting and the plain mean.
    Ease,
}

/// `[strategy]`: the server optimizer and its hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    /// The optimizer. Default `fedavg`.
    pub name: StrategyName,
    /// Server learning rate η. Default [`DEFAULT_SERVER_LR`].
    pub server_lr: f32,
    /// Momentum μ of `fedavgm`. Default [`DEFAULT_MOMENTUM`].
    pub momentum: f32,
    /// First-moment decay β1 of the adaptive optimizers. Default [`DEFAULT_BETA1`].
    pub beta1: f32,
    /// Second-moment decay β2 of `fedadam` and `fedyogi`. Default [`DEFAULT_BETA2`].
    pub beta2: f32,
    /// Adaptivity τ of the adaptive optimizers (also `sqrt` of the initial
    /// second moment). Default [`DEFAULT_TAU`].
    pub tau: f32,
    /// How updates are weighted in the round's mean. Default `examples`.
    pub weighting: Weighting,
    /// Under `weighting = "examples"` in plain rounds: the most examples an
    /// update's weight counts (a device claiming more weighs this much), so
    /// that no device sets the round's mean by claiming a huge
    /// `num_examples`; the count is self-reported and unverifiable. Secure
    /// rounds cap at `secure_aggregation.max_examples` instead. Default
    /// [`DEFAULT_MAX_EXAMPLES`].
    pub max_examples: u64,
    /// How the server learning rate changes over the rounds. Default `constant`.
    pub schedule: Schedule,
    /// How a round's updates are combined: "mean", or, against broken or
    /// hostile devices, "trimmed_mean" or "median" (coordinate-wise; they
    /// keep every update of the round in memory and need individual updates,
    /// so not with secure aggregation or differential privacy). Default "mean".
    pub aggregation: Aggregation,
    /// Under "trimmed_mean": the fraction of values dropped at each end of
    /// every coordinate, in `[0, 0.5)`. Default [`DEFAULT_TRIM_FRACTION`].
    pub trim_fraction: f64,
    /// Scale every plain update down to at most this L2 norm before
    /// aggregating it (norm bounding). With secure aggregation the
    /// coordinator cannot see norms; devices clip then under `[privacy]`.
    /// Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f32>,
    /// Under `ease`: the L2 weight λ added to the co-purchase matrix's
    /// diagonal. Default [`DEFAULT_EASE_LAMBDA`].
    pub ease_lambda: f32,
}

/// Default `strategy.ease_lambda` (the middle of the EASE grid the
/// baselines search; `--preset auto` chooses it on validation).
pub const DEFAULT_EASE_LAMBDA: f32 = 200.0;

/// Default `strategy.max_examples` (and `secure_aggregation.max_examples`):
/// 1,000 purchases, more than nearly every shopper's history, so honest
/// devices keep their FedAvg weights while one device weighs at most 1,000
/// times the smallest.
pub const DEFAULT_MAX_EXAMPLES: u64 = 1000;

/// Default `strategy.trim_fraction`.
pub const DEFAULT_TRIM_FRACTION: f64 = 0.1;

/// How a round's updates are combined into one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The weighted mean (FedAvg), folded as updates arrive.
    #[default]
    Mean,
    /// Per coordinate, the mean of the values left after dropping
    /// `trim_fraction` of them at each end (Yin et al. 2018); unweighted.
    TrimmedMean,
    /// Per coordinate, the median; unweighted.
    Median,
}

/// The server learning rate of each round, as a multiple of `server_lr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `server_lr` in every round.
    #[default]
    Constant,
    /// Cosine decay from `server_lr` in the first round towards 0 after the
    /// last (`rounds.rounds` must be finite): late rounds take small steps,
    /// so the final model is an average over many cohorts rather than the
    /// last cohort's noisy step (Loshchilov & Hutter 2017).
    Cosine,
}

impl Schedule {
    /// The multiplier of `server_lr` in round `round` (1-based) of `total`.
    pub fn factor(self, round: u64, total: u64) -> f32 {
        match self {
            Self::Constant => 1.0,
            Self::Cosine => {
                let progress = round.saturating_sub(1) as f64 / total.max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())) as f32
            }
        }
    }
}

/// The weight of each device's update in the round's mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// By the device's number of examples (FedAvg, McMahan et al. 2017).
    #[default]
    Examples,
    /// Every device equally: the mean of per-device gradients, which is the
    /// gradient of the sum of the users' losses (right for the "als" loss).
    Uniform,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            name: StrategyName::FedAvg,
            server_lr: DEFAULT_SERVER_LR,
            momentum: DEFAULT_MOMENTUM,
            beta1: DEFAULT_BETA1,
            beta2: DEFAULT_BETA2,
            tau: DEFAULT_TAU,
            weighting: Weighting::Examples,
            max_examples: DEFAULT_MAX_EXAMPLES,
            schedule: Schedule::Constant,
            aggregation: Aggregation::Mean,
            trim_fraction: DEFAULT_TRIM_FRACTION,
            norm_bound: None,
            ease_lambda: DEFAULT_EASE_LAMBDA,
        }
    }
}

impl StrategyConfig {
    /// Checks the `[strategy]` ranges.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let st = self;
        check_range(
            "strategy.server_lr",
            st.server_lr.into(),
            0.0,
            true,
            f64::INFINITY,
        )?;
        check_range(
            "strategy.momentum",
            st.momentum.into(),
            0.0,
            false,
            0.999_999,
        )?;
        check_range("strategy.beta1", st.beta1.into(), 0.0, false, 0.999_999)?;
        check_range("strategy.beta2", st.beta2.into(), 0.0, false, 0.999_999)?;
        check_range("strategy.tau", st.tau.into(), 0.0, true, f64::INFINITY)?;
        if st.max_examples < 1 {
            return Err(invalid(
                "strategy.max_examples must be >= 1, got 0".to_owned(),
            ));
        }
        check_range(
            "strategy.trim_fraction",
            st.trim_fraction,
            0.0,
            false,
            0.499_999,
        )?;
        if let Some(bound) = st.norm_bound {
            check_range("strategy.norm_bound", bound.into(), 0.0, true, 1e30)?;
        }
        Ok(())
    }
}
