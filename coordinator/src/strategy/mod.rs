//! Server optimizers: how a round's mean update moves the global model.
//!
//! From Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2).
//! With parameters `x`, the round's weighted-mean update `Δ` (the mean of the
//! devices' changes, weighted by their example counts) and server learning
//! rate `η`:
//!
//! | strategy | update |
//! |---|---|
//! | FedAvg | `x += η Δ` |
//! | FedAvgM | `m = μ m + Δ`; `x += η m` |
//! | FedAdagrad | `v += Δ²` |
//! | FedAdam | `v = β2 v + (1−β2) Δ²` |
//! | FedYogi | `v = v − (1−β2) Δ² sign(v − Δ²)` |
//!
//! and for the three adaptive ones `m = β1 m + (1−β1) Δ`, `x += η m / (√v + τ)`,
//! with `m` initialised to 0 and `v` to `τ²`; no bias correction, as in the paper.
//!
//! `ease` replaces the model by `P = (G + λI)⁻¹` (upper triangle), where
//! `G` is the cohort's summed co-purchase matrix (the mean update times the
//! number of devices): the closed form of EASE (Steck 2019).
//!
//! `als` (fedrec's own, for the ALS loss) is a Newton step on the item
//! embeddings: each row `q_i` of the model's first tensor (items × k) moves
//! by `η H⁻¹ Δ_i`, with one k×k matrix `H` for the round built from the
//! cohort's mean `x xᵀ`, which devices send after their update
//! ([`Strategy::extra_values`] more values); every other parameter moves as
//! under FedAvg. No state. See [`als`].
//!
//! Each step is in its own file ([`fedavg`], [`momentum`], [`adaptive`],
//! [`als`], [`ease`]); [`Strategy::step`] is the one interface the round
//! core calls, with the round's mean update and what it knows of the round
//! ([`Round`]). The core never looks inside: it names no step and no loss.

use fedrec_proto::{Layout, symmetric};
use serde::{Deserialize, Serialize};

use crate::config::{Loss, StrategyConfig, StrategyName, TrainingConfig};

pub mod adaptive;
pub mod als;
pub mod ease;
pub mod fedavg;
pub mod momentum;

/// A server optimizer with its state (moments), serialisable for checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    config: StrategyConfig,
    /// First moment (FedAvgM: momentum buffer); empty for FedAvg.
    m: Vec<f32>,
    /// Second moment of the adaptive optimizers; empty otherwise.
    v: Vec<f32>,
    /// `als`: the preconditioned block, `(rows, k)`; `(0, 0)` otherwise.
    #[serde(default)]
    block: (usize, usize),
}

/// What a step knows of the round besides its mean update.
#[derive(Clone, Copy, Debug)]
pub struct Round<'a> {
    /// The round's factor of the server learning rate (its
    /// [`Schedule`](crate::config::Schedule)).
    pub lr_factor: f32,
    /// Updates in the round's mean.
    pub devices: usize,
    /// Devices joined (the population the cohort's mean stands for).
    pub joined: usize,
    /// The training settings the devices were sent.
    pub training: &'a TrainingConfig,
}

/// Why the strategy could not step; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum StepError {
    /// The result was not finite.
    #[error("the strategy produced a non-finite parameter at index {index}")]
    NonFinite {
        /// Index of the first non-finite parameter or moment.
        index: usize,
    },
    /// `als`: the round's curvature was not positive definite. The mean of
    /// honest devices' `x xᵀ` plus the ridge always is, so some device sent
    /// a malformed one.
    #[error(
        "the cohort's curvature (the mean of the devices' x xᵀ) is not positive definite, so some update carried a malformed one"
    )]
    Indefinite,
    /// `als`: the curvature's smallest Cholesky pivot fell below half the
    /// bound honest devices guarantee (see [`als`]).
    #[error(
        "the cohort's curvature (the mean of the devices' x xᵀ) is not positive semidefinite \
         (smallest pivot {smallest:.3e}, at least {floor:.3e} expected): an update carried a \
         malformed x xᵀ, or secure_aggregation.range clipped one"
    )]
    Curvature {
        /// The smallest pivot found.
        smallest: f64,
        /// Half the bound honest devices guarantee.
        floor: f64,
    },
}

impl Strategy {
    /// A fresh optimizer for a model laid out as `layout`. Fails, saying
    /// why, for `als` when the first tensor is not a matrix (items × k).
    pub fn new(config: StrategyConfig, layout: &Layout) -> Result<Self, String> {
        let num_values = layout.num_values();
        let (m_len, v_len) = match config.name {
            StrategyName::FedAvg | StrategyName::Als | StrategyName::Ease => (0, 0),
            StrategyName::FedAvgM => (num_values, 0),
            StrategyName::FedAdam | StrategyName::FedYogi | StrategyName::FedAdagrad => {
                (num_values, num_values)
            }
        };
        let block = match config.name {
            StrategyName::Als => als::block(layout)?,
            _ => (0, 0),
        };
        if config.name == StrategyName::Ease {
            ease::size(num_values)?;
        }
        Ok(Self {
            config,
            m: vec![0.0; m_len],
            v: vec![config.tau * config.tau; v_len],
            block,
        })
    }

    /// Values that follow the model's in each update and in the round's
    /// mean: under `als`, the upper triangle of a k×k matrix; 0 otherwise.
    pub fn extra_values(&self) -> usize {
        match self.config.name {
            StrategyName::Als => symmetric::upper_len(self.block.1),
            _ => 0,
        }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &StrategyConfig {
        &self.config
    }

    /// The optimizer's moments (first, second), for checkpoints.
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// Restores moments saved by [`moments`](Self::moments); refuses lengths
    /// that do not fit this optimizer, or non-finite values.
    pub fn restore_moments(&mut self, m: Vec<f32>, v: Vec<f32>) -> Result<(), String> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(format!(
                "optimizer moments of lengths {} and {} do not fit {:?} (expects {} and {})",
                m.len(),
                v.len(),
                self.config.name,
                self.m.len(),
                self.v.len()
            ));
        }
        if m.iter().chain(&v).any(|x| !x.is_finite()) {
            return Err("optimizer moments hold a non-finite value".to_owned());
        }
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// Computes the next parameters from `params` and the round's mean
    /// update `mean` (same length, plus [`extra_values`](Self::extra_values)
    /// after it). Under the ALS loss the item embeddings' share of the
    /// objective is added first ([`als::regularize_items`]), whatever the
    /// step. On success the optimizer state advances and the new parameters
    /// are returned; when the step cannot be taken or a new parameter or
    /// moment would not be finite, nothing changes.
    ///
    /// # Panics
    ///
    /// When the lengths do not fit (the core always passes the model and its
    /// round's mean).
    pub fn step(
        &mut self,
        params: &[f32],
        mut mean: Vec<f32>,
        round: &Round<'_>,
    ) -> Result<Vec<f32>, StepError> {
        assert_eq!(
            params.len() + self.extra_values(),
            mean.len(),
            "params and mean update lengths differ"
        );
        if round.training.loss == Loss::Als {
            als::regularize_items(&mut mean, params, round);
        }
        let c = self.config;
        let eta = c.server_lr * round.lr_factor;
        let x = match c.name {
            StrategyName::Als => als::step(params, &mut mean, self.block, eta, round)?,
            StrategyName::Ease => ease::step(&mean, round.devices, c.ease_lambda)?,
            StrategyName::FedAvg => fedavg::step(params, &mean, eta),
            StrategyName::FedAvgM => momentum::step(params, &mean, eta, c.momentum, &mut self.m)?,
            StrategyName::FedAdam | StrategyName::FedYogi | StrategyName::FedAdagrad => {
                adaptive::step(params, &mean, eta, &c, &mut self.m, &mut self.v)?
            }
        };
        check(&x)?;
        Ok(x)
    }
}

/// The first non-finite value, as the error.
fn check(values: &[f32]) -> Result<(), StepError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(StepError::NonFinite { index }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step as the core takes it: a round of `devices` updates out of
    /// as many joined, training settings under which no loss term is added
    /// (and, for `als`, the curvature is the mean `x xᵀ` itself: lr ½, λ 0).
    fn step(
        s: &mut Strategy,
        params: &[f32],
        delta: &[f32],
        lr_factor: f32,
        devices: usize,
    ) -> Result<Vec<f32>, StepError> {
        let training = TrainingConfig {
            learning_rate: 0.5,
            regularization: 0.0,
            ..TrainingConfig::default()
        };
        let round = Round {
            lr_factor,
            devices,
            joined: devices,
            training: &training,
        };
        s.step(params, delta.to_vec(), &round)
    }

    /// The `ease` step inverts the cohort's summed co-purchases plus λ I:
    /// checked against a hand inversion of a 2×2 matrix.
    #[test]
    fn ease_publishes_the_inverse_of_the_summed_co_purchases() {
        let layout = Layout::new(vec![("ease_p_upper".into(), vec![3])]);
        let mut cfg = config(StrategyName::Ease);
        cfg.ease_lambda = 1.0;
        let mut s = Strategy::new(cfg, &layout).unwrap();
        // Two devices: {0, 1} and {0}: G = [[2, 1], [1, 1]], mean = G / 2.
        let mean = [1.0, 0.5, 0.5];
        let p = step(&mut s, &[1.0, 0.0, 1.0], &mean, 1.0, 2).unwrap();
        // (G + I)⁻¹ = [[2, -1], [-1, 3]] / 5.
        let want = [0.4, -0.2, 0.6];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
        let flat = Layout::new(vec![("x".into(), vec![5])]);
        let err = Strategy::new(config(StrategyName::Ease), &flat).unwrap_err();
        assert!(err.contains("n(n+1)/2"), "{err}");
    }

    fn config(name: StrategyName) -> StrategyConfig {
        StrategyConfig {
            name,
            server_lr: 0.5,
            momentum: 0.5,
            beta1: 0.5,
            beta2: 0.75,
            tau: 0.5,
            ..StrategyConfig::default()
        }
    }

    fn new(name: StrategyName, values: u64) -> Strategy {
        Strategy::new(config(name), &Layout::new(vec![("x".into(), vec![values])])).unwrap()
    }

    /// Runs two steps from x = [1, -2] with Δ1 = [1, 0] and Δ2 = [-1, 2].
    fn two_steps(name: StrategyName) -> (Vec<f32>, Vec<f32>) {
        let mut s = new(name, 2);
        let x1 = step(&mut s, &[1.0, -2.0], &[1.0, 0.0], 1.0, 1).unwrap();
        let x2 = step(&mut s, &x1, &[-1.0, 2.0], 1.0, 1).unwrap();
        (x1, x2)
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() < 1e-6,
                "got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn fedavg() {
        // x1 = x0 + 0.5 Δ1 = [1.5, -2]; x2 = [1.5 - 0.5, -2 + 1] = [1, -1]
        let (x1, x2) = two_steps(StrategyName::FedAvg);
        assert_eq!(x1, vec![1.5, -2.0]);
        assert_eq!(x2, vec![1.0, -1.0]);
    }

    #[test]
    fn fedavgm() {
        // m1 = Δ1 = [1, 0]; x1 = [1.5, -2]
        // m2 = 0.5 m1 + Δ2 = [-0.5, 2]; x2 = x1 + 0.5 m2 = [1.25, -1]
        let (x1, x2) = two_steps(StrategyName::FedAvgM);
        assert_eq!(x1, vec![1.5, -2.0]);
        assert_eq!(x2, vec![1.25, -1.0]);
    }

    #[test]
    fn fedadagrad() {
        // v0 = τ² = 0.25, m0 = 0
        // step 1: v1 = [1.25, 0.25]; m1 = 0.5 Δ1 = [0.5, 0]
        //   x1 = [1 + 0.5·0.5/(√1.25 + 0.5), -2] = [1.154508497, -2]
        // step 2: v2 = [2.25, 4.25]; m2 = 0.5 m1 + 0.5 Δ2 = [-0.25, 1]
        //   x2 = [x1₀ - 0.125/(1.5 + 0.5), -2 + 0.5/(√4.25 + 0.5)]
        //      = [1.092008497, -1.804805898]
        let (x1, x2) = two_steps(StrategyName::FedAdagrad);
        assert_close(&x1, &[1.154_508_497, -2.0]);
        assert_close(&x2, &[1.092_008_497, -1.804_805_898]);
    }

    #[test]
    fn fedadam() {
        // step 1: v1 = 0.75 v0 + 0.25 Δ1² = [0.4375, 0.1875]; m1 = [0.5, 0]
        //   x1 = [1 + 0.25/(√0.4375 + 0.5), -2] = [1.215250437, -2]
        // step 2: v2 = [0.578125, 1.140625]; m2 = [-0.25, 1]
        //   x2 = [x1₀ - 0.125/(√0.578125 + 0.5), -2 + 0.5/(√1.140625 + 0.5)]
        //      = [1.116071269, -1.681122544]
        let (x1, x2) = two_steps(StrategyName::FedAdam);
        assert_close(&x1, &[1.215_250_437, -2.0]);
        assert_close(&x2, &[1.116_071_269, -1.681_122_544]);
    }

    #[test]
    fn fedyogi() {
        // step 1: Δ1² = [1, 0]; sign(v0 - Δ1²) = [-1, +1]
        //   v1 = [0.25 + 0.25, 0.25 - 0] = [0.5, 0.25]; m1 = [0.5, 0]
        //   x1 = [1 + 0.25/(√0.5 + 0.5), -2] = [1.207106781, -2]
        // step 2: Δ2² = [1, 4]; sign(v1 - Δ2²) = [-1, -1]
        //   v2 = [0.5 + 0.25, 0.25 + 1] = [0.75, 1.25]; m2 = [-0.25, 1]
        //   x2 = [x1₀ - 0.125/(√0.75 + 0.5), -2 + 0.5/(√1.25 + 0.5)]
        //      = [1.115600430, -1.690983006]
        let (x1, x2) = two_steps(StrategyName::FedYogi);
        assert_close(&x1, &[1.207_106_781, -2.0]);
        assert_close(&x2, &[1.115_600_430, -1.690_983_006]);
    }

    #[test]
    fn als_steps_each_item_row_by_the_inverse_curvature() {
        // Two items × k = 2, then two biases. H = [[4, 2], [2, 3]] (upper
        // triangle [4, 2, 3]), η = 0.5:
        //   row 0: Δ = [6, 5]  → H⁻¹Δ = [1, 1]   → q0 = [1, 1] + 0.5 [1, 1]
        //   row 1: Δ = [2, 1]  → H⁻¹Δ = [0.5, 0] → q1 = [0, -1] + 0.5 [0.5, 0]
        //   biases: FedAvg, b = [3, 4] + 0.5 [2, -2]
        let layout = Layout::new(vec![("q".into(), vec![2, 2]), ("b".into(), vec![2])]);
        let mut s = Strategy::new(config(StrategyName::Als), &layout).unwrap();
        assert_eq!(s.extra_values(), 3);
        let params = [1.0, 1.0, 0.0, -1.0, 3.0, 4.0];
        let delta = [6.0, 5.0, 2.0, 1.0, 2.0, -2.0, 4.0, 2.0, 3.0];
        let x = step(&mut s, &params, &delta, 1.0, 1).unwrap();
        assert_close(&x, &[1.5, 1.5, 0.25, -1.0, 4.0, 3.0]);
        // The learning-rate factor scales the step; no state carries over.
        let x = step(&mut s, &params, &delta, 0.5, 1).unwrap();
        assert_close(&x, &[1.25, 1.25, 0.125, -1.0, 3.5, 3.5]);
        assert_eq!(s.moments(), (&[][..], &[][..]));
        // An indefinite curvature (only a malformed x xᵀ makes one) is refused.
        let bad = [6.0, 5.0, 2.0, 1.0, 2.0, -2.0, 1.0, 2.0, 1.0];
        assert!(matches!(
            step(&mut s, &params, &bad, 1.0, 1),
            Err(StepError::Curvature { .. })
        ));
        // A model whose first tensor is not a matrix cannot take the step.
        let flat = Layout::new(vec![("x".into(), vec![4])]);
        let err = Strategy::new(config(StrategyName::Als), &flat).unwrap_err();
        assert!(err.contains("matrix"), "{err}");
    }

    #[test]
    fn lr_factor_scales_the_step() {
        // FedAvg at half the rate: x = 1 + 0.25·2 = 1.5.
        let mut s = new(StrategyName::FedAvg, 1);
        assert_eq!(step(&mut s, &[1.0], &[2.0], 0.5, 1).unwrap(), vec![1.5]);
    }

    #[test]
    fn cosine_schedule_decays_from_one_towards_zero() {
        use crate::config::Schedule;
        assert_eq!(Schedule::Constant.factor(7, 10), 1.0);
        assert_eq!(Schedule::Cosine.factor(1, 10), 1.0);
        // Round 6 of 10 is halfway: cos(π/2) = 0 → 0.5.
        assert!((Schedule::Cosine.factor(6, 10) - 0.5).abs() < 1e-6);
        // The last round: 0.5(1 + cos(0.9π)) = 0.024471742.
        assert!((Schedule::Cosine.factor(10, 10) - 0.024_471_742).abs() < 1e-6);
        let f: Vec<f32> = (1..=10).map(|r| Schedule::Cosine.factor(r, 10)).collect();
        assert!(f.windows(2).all(|w| w[1] < w[0]), "{f:?}");
    }

    #[test]
    fn yogi_sign_of_zero_is_zero() {
        // v0 = τ² = 0.25 = Δ²: sign(0) = 0, so v stays 0.25.
        let mut s = new(StrategyName::FedYogi, 1);
        step(&mut s, &[0.0], &[0.5], 1.0, 1).unwrap();
        assert_eq!(s.v, vec![0.25]);
    }

    #[test]
    fn non_finite_result_changes_nothing() {
        let mut s = new(StrategyName::FedAvgM, 2);
        let before = s.clone();
        let err = step(&mut s, &[f32::MAX, 0.0], &[f32::MAX, 1.0], 1.0, 1).unwrap_err();
        assert_eq!(err, StepError::NonFinite { index: 0 });
        assert_eq!(s, before);
    }

    #[test]
    fn state_serialises() {
        let mut s = new(StrategyName::FedAdam, 2);
        step(&mut s, &[1.0, -2.0], &[1.0, 0.0], 1.0, 1).unwrap();
        // TOML is the crate's only serde format; checkpoints may use another.
        let text = toml::to_string(&s).unwrap();
        assert!(text.contains("fedadam"), "{text}");
        let back: Strategy = toml::from_str(&text).unwrap();
        assert_eq!(back, s);
    }
}
