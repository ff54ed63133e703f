//! `[search]`: what `[model] preset = "auto"` searches before training, and
//! its budget.

use super::*;
use crate::CoordinatorError;

use serde::{Deserialize, Serialize};

/// Default `search.rounds`: about ten visits per device at a cohort of up
/// to 1,000.
pub const DEFAULT_SEARCH_ROUNDS: u32 = 40;

/// `[model] preset`: settings the coordinator chooses itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelPreset {
    /// Factors, confidence, regularization and rounds of the ALS recipe
    /// (or federated EASE) chosen by federated evaluation on the devices'
    /// own validation purchases, within `[search]`.
    Auto,
}

/// `[search]`: the settings `[model] preset = "auto"` tries, by successive
/// halving on rounds: every combination trains an eighth of `rounds`, the
/// best third a quarter, the best third of those half; then, if `ease`,
/// federated EASE at each λ of its grid (one round each). Each trial ends
/// with an evaluation round in which devices rank their own validation
/// purchase and send counts only. The best trial of any stage is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// The rounds the stages' fractions refer to (the longest trial trains
    /// half of them). Default [`DEFAULT_SEARCH_ROUNDS`].
    pub rounds: u32,
    /// Latent factors tried. Default 32, 64, 128.
    pub factors: Vec<usize>,
    /// ALS confidences of a purchase tried. Default 2, 5, 20.
    pub confidence: Vec<f32>,
    /// L2 regularizations tried. Default 0.01, 1.
    pub regularization: Vec<f32>,
    /// Also try federated EASE (catalogues small enough for its item-item
    /// model). Default true.
    pub ease: bool,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            rounds: DEFAULT_SEARCH_ROUNDS,
            factors: vec![32, 64, 128],
            confidence: vec![2.0, 5.0, 20.0],
            regularization: vec![0.01, 1.0],
            ease: true,
        }
    }
}

impl SearchConfig {
    /// Checks the lists against the bounds devices enforce on `training`.
    pub(crate) fn validate(&self, training: &TrainingConfig) -> Result<(), CoordinatorError> {
        if self.rounds < 1 {
            return Err(invalid("search.rounds must be >= 1, got 0".to_owned()));
        }
        for (name, empty) in [
            ("factors", self.factors.is_empty()),
            ("confidence", self.confidence.is_empty()),
            ("regularization", self.regularization.is_empty()),
        ] {
            if empty {
                return Err(invalid(format!(
                    "search.{name} lists nothing to try; give at least one value"
                )));
            }
        }
        if let Some(f) = self.factors.iter().find(|&&f| f < 1) {
            return Err(invalid(format!("search.factors must be >= 1, got {f}")));
        }
        for &confidence in &self.confidence {
            for &regularization in &self.regularization {
                TrainingConfig {
                    confidence,
                    regularization,
                    ..*training
                }
                .validate()
                .map_err(|e| match e {
                    CoordinatorError::InvalidConfig(m) => invalid(format!("search: {m}")),
                    other => other,
                })?;
            }
        }
        Ok(())
    }
}
