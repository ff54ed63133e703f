//! A device: its purchases, its private state, and what it does with a task.
//!
//! [`Device`] is the sans-IO heart of the SDK. Given the global parameters it
//! trains locally and returns a [`LocalUpdate`] (the dense change to the
//! global parameters and nothing else), evaluates, or recommends. Moving bytes
//! to and from a coordinator is the [`crate::participant`]'s job.

use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::ClientError;
use crate::metrics::{self, EvalCounts};
use crate::model::{Model, TrainingConfig};
use crate::store::{Purchase, PurchaseStore};

/// What a device sends back after local training.
#[derive(Clone, Debug)]
pub struct LocalUpdate {
    /// Dense change to the global parameters (same length whatever was bought).
    pub delta: Vec<f32>,
    /// FedAvg weight: the number of distinct purchases trained on.
    pub num_examples: u64,
    /// Evaluation of the received model, when it was asked for.
    pub evaluation: Option<EvalCounts>,
}

/// One shopper's device.
#[derive(Debug)]
pub struct Device {
    model: Arc<dyn Model>,
    store: PurchaseStore,
    /// The private user embedding: it never leaves the device.
    private: Vec<f32>,
    rng: ChaCha8Rng,
    /// A purchase kept out of training to evaluate the model on, and the seed
    /// of its sampled candidates (fixed, so every evaluation uses the same ones).
    held_out: Option<(u32, u64)>,
}

impl Device {
    /// A device with an empty store, seeded for reproducible training.
    pub fn new(model: Arc<dyn Model>, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let private = model.init_private(&mut rng);
        Self {
            store: PurchaseStore::new(model.items()),
            model,
            private,
            rng,
            held_out: None,
        }
    }

    /// Records a purchase in the local store.
    pub fn record(&mut self, purchase: Purchase) -> Result<(), ClientError> {
        self.store.record(purchase)
    }

    /// Keeps `item` out of training as this device's evaluation target; its
    /// 99 sampled competitors are drawn from `candidate_seed`, so every
    /// evaluation (and a centralized baseline using the same seed) ranks it
    /// against the same items.
    pub fn hold_out(&mut self, item: u32, candidate_seed: u64) -> Result<(), ClientError> {
        if item as usize >= self.model.items() {
            return Err(ClientError::UnknownItem {
                item,
                items: self.model.items(),
            });
        }
        self.held_out = Some((item, candidate_seed));
        Ok(())
    }

    /// The local store.
    pub fn store(&self) -> &PurchaseStore {
        &self.store
    }

    /// The model this device trains.
    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }

    /// The private user embedding (for on-device use and tests; never sent).
    pub fn private_embedding(&self) -> &[f32] {
        &self.private
    }

    fn check_global(&self, global: &[f32]) -> Result<(), ClientError> {
        let want = self.model.layout().num_values();
        if global.len() != want {
            return Err(ClientError::ModelMismatch(format!(
                "expected {want} global values, got {}",
                global.len()
            )));
        }
        Ok(())
    }

    /// Fits the private embedding to `global` and, if asked, evaluates; then
    /// trains locally and returns the update.
    pub fn train(
        &mut self,
        global: &[f32],
        cfg: &TrainingConfig,
        evaluate: bool,
    ) -> Result<LocalUpdate, ClientError> {
        self.check_global(global)?;
        cfg.validate()?;
        self.model.personalize(
            global,
            &mut self.private,
            self.store.items(),
            cfg,
            &mut self.rng,
        );
        let evaluation = if evaluate {
            self.score_held_out(global)
        } else {
            None
        };
        let history = self.store.items();
        let delta = self
            .model
            .train(global, &mut self.private, history, cfg, &mut self.rng);
        Ok(LocalUpdate {
            delta,
            num_examples: history.len() as u64,
            evaluation,
        })
    }

    /// Fits the private embedding to `global` and evaluates it on the held-out
    /// purchase; `None` when there is none.
    pub fn evaluate(
        &mut self,
        global: &[f32],
        cfg: &TrainingConfig,
    ) -> Result<Option<EvalCounts>, ClientError> {
        self.check_global(global)?;
        cfg.validate()?;
        self.model.personalize(
            global,
            &mut self.private,
            self.store.items(),
            cfg,
            &mut self.rng,
        );
        Ok(self.score_held_out(global))
    }

    /// Scores of every item. Not kept: an idle device holds no per-item buffer.
    fn scores(&self, global: &[f32]) -> Vec<f32> {
        let mut scores = Vec::with_capacity(self.model.items());
        self.model.score_all(global, &self.private, &mut scores);
        scores
    }

    fn score_held_out(&self, global: &[f32]) -> Option<EvalCounts> {
        let (target, seed) = self.held_out?;
        Some(metrics::evaluate_user(
            &self.scores(global),
            self.store.items(),
            target,
            &mut ChaCha8Rng::seed_from_u64(seed),
        ))
    }

    /// The `k` best items for this shopper under `global`, excluding what was
    /// already bought, best first. Uses the private embedding as it is.
    pub fn recommend(&mut self, global: &[f32], k: usize) -> Result<Vec<u32>, ClientError> {
        self.check_global(global)?;
        Ok(metrics::top_k(&self.scores(global), self.store.items(), k))
    }
}
