//! `[training]`: the hyperparameters sent to devices with each task.

use super::*;
use crate::CoordinatorError;

use serde::{Deserialize, Serialize};

/// Default `training.local_epochs`.
pub const DEFAULT_LOCAL_EPOCHS: u32 = 5;
/// Default `training.learning_rate`.
pub const DEFAULT_LEARNING_RATE: f32 = 0.05;
/// Default `training.regularization`.
pub const DEFAULT_REGULARIZATION: f32 = 0.01;
/// Default `training.negatives`.
pub const DEFAULT_NEGATIVES: u32 = 1;
/// Default `training.proximal_mu`: no proximal term (FedAvg's local SGD).
pub const DEFAULT_PROXIMAL_MU: f32 = 0.0;
/// Default `training.confidence`: a purchase weighs 5 times an item not bought.
pub const DEFAULT_CONFIDENCE: f32 = 5.0;

/// `[training]`: local-training hyperparameters sent to devices with each task.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Local epochs over the device's purchases. Default [`DEFAULT_LOCAL_EPOCHS`].
    pub local_epochs: u32,
    /// Local SGD learning rate. Default [`DEFAULT_LEARNING_RATE`].
    pub learning_rate: f32,
    /// L2 regularization. Default [`DEFAULT_REGULARIZATION`].
    pub regularization: f32,
    /// Sampled negatives per positive. Default [`DEFAULT_NEGATIVES`].
    pub negatives: u32,
    /// FedProx proximal weight mu on the devices: the local objective gains
    /// `mu/2 ||w - w_global||^2`, which keeps local training near the global
    /// model. 0 = plain local SGD. Default [`DEFAULT_PROXIMAL_MU`].
    pub proximal_mu: f32,
    /// The devices' training objective: "bpr" (sampled negatives, local SGD)
    /// or "als" (weighted least squares over all items, exact private
    /// vector, one exact gradient per round). Default "bpr".
    pub loss: Loss,
    /// Confidence of a purchase under "als". Default [`DEFAULT_CONFIDENCE`].
    pub confidence: f32,
}

/// The devices' training objective (one enum with the wire and the device).
pub use fedrec_proto::Loss;

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_epochs: DEFAULT_LOCAL_EPOCHS,
            learning_rate: DEFAULT_LEARNING_RATE,
            regularization: DEFAULT_REGULARIZATION,
            negatives: DEFAULT_NEGATIVES,
            proximal_mu: DEFAULT_PROXIMAL_MU,
            loss: Loss::Bpr,
            confidence: DEFAULT_CONFIDENCE,
        }
    }
}

impl TrainingConfig {
    /// Checks the `[training]` settings against the bounds devices enforce (one definition, `fedrec_proto::limits`).
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let t = self;
        fedrec_proto::limits::Training {
            local_epochs: t.local_epochs.into(),
            learning_rate: t.learning_rate.into(),
            regularization: t.regularization.into(),
            proximal_mu: t.proximal_mu.into(),
            confidence: t.confidence.into(),
            negatives: t.negatives.into(),
        }
        .check()
        .map_err(|e| {
            invalid(format!(
                "training.{e}: devices refuse a task outside this range"
            ))
        })?;

        Ok(())
    }
}
