//! The presets: named coordinator recipes and their defaults (ALS, EASE,
//! movielens, retail).

use std::sync::Arc;

use anyhow::Context;
use fedrec_client::model::{MatrixFactorization, Model};
use fedrec_coordinator::config::{CoordinatorConfig, StrategyName};
use serde::Serialize;

/// The devices' model for a coordinator configuration: EASE under the
/// `ease` step, matrix factorization otherwise.
pub fn model_for(coord: &CoordinatorConfig, n_items: usize) -> anyhow::Result<Arc<dyn Model>> {
    Ok(if coord.strategy.name == StrategyName::Ease {
        Arc::new(fedrec_client::ease::Ease::new(n_items).context("invalid model configuration")?)
    } else {
        Arc::new(
            MatrixFactorization::new(n_items, coord.model.factors, coord.model.init_std)
                .context("invalid model configuration")?,
        )
    })
}

/// The federated EASE recipe: one round in which every device sends its
/// co-purchases (uniform weighting: the sum is EASE's Gram matrix) and the
/// coordinator's `ease` step solves it with λ = `lambda`.
pub fn ease_recipe(lambda: f32) -> CoordinatorConfig {
    use fedrec_coordinator::config::Weighting;
    let mut cfg = default_coordinator_config();
    cfg.rounds.rounds = 1;
    // Every device: the coordinator's sum must be the whole co-purchase
    // matrix (a simulation asks for all of its devices).
    cfg.rounds.clients_per_round = EASE_COHORT;
    cfg.strategy.name = StrategyName::Ease;
    cfg.strategy.weighting = Weighting::Uniform;
    cfg.strategy.ease_lambda = lambda;
    cfg
}

/// The cohort the EASE recipe asks for: more devices than any data set
/// here has, so that a simulation takes all of them.
pub const EASE_COHORT: usize = 1_000_000;

/// Default seed of simulations.
pub const DEFAULT_SEED: u64 = 42;
/// Default epochs of the centralized baseline: enough for SGD over all users
/// to converge on data of MovieLens-100K's size.
pub const DEFAULT_CENTRALIZED_EPOCHS: u32 = 40;
/// Default training rounds of a simulation.
pub const DEFAULT_ROUNDS: u32 = 100;
/// Default devices per round of a simulation.
pub const DEFAULT_CLIENTS_PER_ROUND: usize = 100;

/// Named starting configurations for `fedrec simulate --preset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// MovieLens-style ratings: the [`als_recipe`] with 50 rounds.
    #[value(help = "ratings such as MovieLens: ALS, 50 rounds, 32 factors")]
    Movielens,
    /// Purchase logs (Online Retail): the [`als_recipe`] with 40 rounds,
    /// 128 factors, confidence 2 and regularization 0.01.
    /// - 128 factors: a third of the held-out purchases are re-buys, and a
    ///   model must be able to reproduce each shopper's own basket to rank
    ///   them (centralized ALS at 64 factors: HR@10 / NDCG@10 0.258 / 0.161,
    ///   far below a tuned implicit ALS at 128 factors, 0.319 / 0.230).
    /// - confidence 2, regularization 0.01: purchases are not ratings (a
    ///   basket holds many items bought once, with no graded preference),
    ///   so a purchase is weighed only twice an item not bought; with a
    ///   larger catalogue and more users the loss needs less shrinkage.
    ///   Chosen on the centralized model, on the same split the `implicit`
    ///   peer is tuned on (its grid picks confidence 1, regularization
    ///   0.01): at 128 factors, the recipe's confidence 5 and
    ///   regularization 0.1 give 0.345 / 0.223 (NDCG@10 below the peer's),
    ///   confidence 1 gives 0.317 / 0.230 and confidence 2 gives 0.338 /
    ///   0.231 (regularization 0.01 and 0.1 give the same figures at
    ///   confidence 1).
    /// - 40 rounds: 1,000 of the 4,339 shoppers take part in a round, so
    ///   each takes part about 9 times; with the preconditioned step that
    ///   matches centralized ALS's 15 iterations (federated 0.338 / 0.233
    ///   against 0.338 / 0.231; FedAdam needed 120 rounds for 0.334 / 0.223).
    #[value(help = "purchase logs such as Online Retail: ALS, 40 rounds, 128 factors")]
    Retail,
    /// Any data: the [`als_recipe`] with `search.rounds` ([`DEFAULT_SEARCH_ROUNDS`](fedrec_coordinator::config::DEFAULT_SEARCH_ROUNDS)) rounds,
    /// its factors, confidence and regularization chosen by federated
    /// evaluation on the devices' validation events ([`search`]). What
    /// `--data` gets when no preset is named.
    #[value(help = "any data: ALS, settings chosen on the devices' validation purchases")]
    Auto,
}

impl Preset {
    /// The preset's coordinator configuration and centralized iterations.
    pub fn config(self) -> (CoordinatorConfig, u32) {
        let mut cfg = als_recipe();
        match self {
            Preset::Movielens => {
                (cfg.rounds.rounds, cfg.model.factors) = (50, 32);
            }
            Preset::Retail => {
                (cfg.rounds.rounds, cfg.model.factors) = (40, 128);
                (cfg.training.confidence, cfg.training.regularization) = (2.0, 0.01);
            }
            Preset::Auto => cfg.rounds.rounds = cfg.search.rounds,
        }
        (cfg, ALS_CENTRALIZED_ITERATIONS)
    }
}

/// Alternating-least-squares iterations of the centralized baseline under
/// the ALS loss (ALS converges in about 10 to 15).
pub const ALS_CENTRALIZED_ITERATIONS: u32 = 15;

/// The recipe behind the presets, with the reason for each setting:
/// - `loss = als`: every item not bought is a weighted negative (no
///   sampling noise) and the private vector is solved exactly on the device,
///   as ALS's user step does; the device's update is the exact gradient of
///   its loss, so federated training optimizes the very objective of
///   centralized ALS.
/// - `confidence = 5`, `regularization = 0.1`: the middle of the usual
///   implicit-ALS ranges (alpha 1 to 40, lambda 0.01 to 1).
/// - `strategy = als`, `server_lr = 1`: the coordinator preconditions the
///   mean gradient by the cohort's curvature `2M + 2λ/N I` (`M` the mean of
///   the devices' `x xᵀ`, which each appends to its update), so an item
///   nobody in the cohort bought takes exactly ALS's item step, and a
///   bought one a damped step. FedAdam (`server_lr` 0.01, `tau` 1e-6)
///   stops short of centralized ALS in NDCG@10 (by 2-8% on MovieLens-100K
///   over two seeds and 3.7% on Online Retail after 120 rounds), because
///   its per-coordinate steps ignore how the k factors of an item interact;
///   the preconditioned step reaches centralized quality on both data sets
///   in fewer rounds (`docs/quality-experiments.md`).
/// - `weighting = uniform`: the mean of per-device gradients is the gradient
///   of the sum of the users' losses, the objective of centralized ALS.
/// - `schedule = cosine`: with a constant rate the model keeps jumping to
///   the optimum of each round's cohort, and the last cohort decides where
///   it stops; decaying the rate to 0 lets the final rounds average over
///   many cohorts.
/// - up to 1,000 devices per round, `init_std = 0.01`, `learning_rate = 1`
///   (the update is the gradient itself; the server step sets the size).
/// - `secure_aggregation.range = 64`, `bits = 22` (used when it is turned
///   on). Each device's values span a wide scale. MovieLens-100K, in
///   process: its gradients reach 149 in the first round and stay below
///   about 2 from round 30 on. Its `x xᵀ` has a trace `‖x‖²` of up to 349
///   in the first round and below 0.4 from round 10 on, so the late
///   entries are about 1e-3. The `als` step inverts the cohort's mean
///   `x xᵀ`, so those small entries must survive quantization. The old
///   setting (range 256, 20 bits, a step of 4.9e-4) rounded them away:
///   HR@10 0.139 against 0.152 plain. 22 bits at range 64 make the step
///   3.1e-5, which gave 0.159 / 0.078 with secure aggregation against
///   0.152 / 0.076 plain. Only the first rounds' largest values are
///   clipped. At 22 bits, a cohort holds at most 1,024 devices (the sum
///   must not wrap). A range of 16 clips the early `x xᵀ` so much that
///   the curvature is no longer positive definite, and every round is
///   abandoned.
pub fn als_recipe() -> CoordinatorConfig {
    use fedrec_coordinator::config::{Loss, Schedule, StrategyName, Weighting};
    let mut cfg = default_coordinator_config();
    cfg.rounds.clients_per_round = 1000;
    cfg.training.loss = Loss::Als;
    cfg.training.confidence = 5.0;
    cfg.training.regularization = 0.1;
    cfg.training.learning_rate = 1.0;
    cfg.strategy.name = StrategyName::Als;
    cfg.strategy.server_lr = 1.0;
    cfg.strategy.weighting = Weighting::Uniform;
    cfg.strategy.schedule = Schedule::Cosine;
    cfg.model.init_std = 0.01;
    cfg.secure_aggregation.range = ALS_SECAGG_RANGE;
    cfg.secure_aggregation.bits = ALS_SECAGG_BITS;
    cfg
}

/// Where the [`als_recipe`]'s server step cannot run, under differential
/// privacy (clipping an update would distort the `x xᵀ` it carries), the
/// recipe takes FedAdam with `server_lr` 0.01 and `tau` 1e-6: each item
/// then steps by about `server_lr` whatever its gradient's scale. It comes
/// within 2-8% of centralized ALS's NDCG@10 (without DP noise). `fedrec
/// simulate --dp` applies this unless `--strategy` says otherwise.
pub fn als_under_privacy(cfg: &mut CoordinatorConfig) {
    cfg.strategy.name = fedrec_coordinator::config::StrategyName::FedAdam;
    cfg.strategy.server_lr = 0.01;
    cfg.strategy.tau = 1e-6;
}

/// `secure_aggregation.range` of the [`als_recipe`].
pub const ALS_SECAGG_RANGE: f32 = 64.0;
/// `secure_aggregation.bits` of the [`als_recipe`].
pub const ALS_SECAGG_BITS: u32 = 22;

/// The coordinator configuration a simulation starts from: the coordinator's
/// defaults with a finite number of rounds, a larger cohort, and deadlines
/// generous enough that no healthy virtual device misses one.
pub fn default_coordinator_config() -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::default();
    cfg.rounds.rounds = DEFAULT_ROUNDS;
    cfg.rounds.clients_per_round = DEFAULT_CLIENTS_PER_ROUND;
    cfg.rounds.deadline_secs = 600.0;
    cfg.rounds.checkin_window_secs = 600.0;
    cfg
}
