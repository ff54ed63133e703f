//! `[model]`: the shape of the initial model and the bound on its size.

use super::*;
use crate::CoordinatorError;

use serde::{Deserialize, Serialize};

/// Default `model.factors`.
pub const DEFAULT_FACTORS: usize = 32;
/// Default `model.init_std`.
pub const DEFAULT_INIT_STD: f32 = 0.1;
/// Default `model.seed`.
pub const DEFAULT_MODEL_SEED: u64 = 42;

/// `[model]`: how the CLI builds the initial model. The coordinator core never
/// reads it: it receives a layout and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Embedding size k. Default [`DEFAULT_FACTORS`].
    pub factors: usize,
    /// Standard deviation of the initial item embeddings. Default [`DEFAULT_INIT_STD`].
    pub init_std: f32,
    /// Seed of the initial parameters. Default [`DEFAULT_MODEL_SEED`].
    pub seed: u64,
    /// `"auto"`: the coordinator chooses factors, confidence,
    /// regularization and rounds itself, by the search of `[search]`,
    /// before it trains. Default: unset (the settings as given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<ModelPreset>,
    /// Catalog size; unset = taken from the data set. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
    /// The largest model the coordinator accepts, in bytes as f32 (4 per
    /// value; `items × factors` for the CLI's matrix factorization). The
    /// coordinator holds several copies of the model (parameters, the
    /// encoded download, the round's sum, optimizer moments, each upload
    /// in flight), so its memory is several times this. Checked at
    /// start-up, before anything is allocated. Default
    /// [`DEFAULT_MODEL_MAX_BYTES`].
    pub max_bytes: u64,
}

/// Default `model.max_bytes`: 1 GiB, 268 million values (4 million items
/// × 64 factors).
pub const DEFAULT_MODEL_MAX_BYTES: u64 = 1 << 30;

impl ModelConfig {
    /// Checks that a model of `values` values (described by `what`, such as
    /// "model.items × model.factors = 100 × 32") fits `max_bytes`.
    /// The error names both numbers.
    pub fn check_size(&self, values: u64, what: &str) -> Result<(), String> {
        let bytes = values.saturating_mul(4);
        if bytes <= self.max_bytes {
            return Ok(());
        }
        Err(format!(
            "{what} = {values} values ({bytes} bytes as f32) is more than model.max_bytes = {}; \
             the coordinator holds several copies of the model, so raise model.max_bytes only \
             where the memory is there",
            self.max_bytes
        ))
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            factors: DEFAULT_FACTORS,
            init_std: DEFAULT_INIT_STD,
            seed: DEFAULT_MODEL_SEED,
            preset: None,
            items: None,
            max_bytes: DEFAULT_MODEL_MAX_BYTES,
        }
    }
}

impl ModelConfig {
    /// Checks the `[model]` ranges and its size against `max_bytes`.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let m = self;
        if m.factors < 1 {
            return Err(invalid(format!(
                "model.factors must be >= 1, got {}",
                m.factors
            )));
        }
        check_range(
            "model.init_std",
            m.init_std.into(),
            0.0,
            false,
            f64::INFINITY,
        )?;
        if m.items == Some(0) {
            return Err(invalid(
                "model.items must be >= 1 when set, got 0".to_owned(),
            ));
        }
        if let Some(items) = m.items {
            m.check_size(
                (items as u64).saturating_mul(m.factors as u64),
                &format!("model.items × model.factors = {items} × {}", m.factors),
            )
            .map_err(invalid)?;
        }
        Ok(())
    }
}
