//! The recommendation model: what is global, what stays private, how it learns.
//!
//! [`MatrixFactorization`] is the model of DESIGN.md: global item embeddings
//! `Q` (items × k) and item biases `b`, and a private user embedding `p_u`
//! that never leaves the device. It is used through the [`Model`] trait so that
//! a second model can be added without touching the coordinator, which only
//! sees a [`Layout`] and a flat vector of global parameters.

use fedrec_proto::Layout;
use ndarray::ArrayView1;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use std::sync::{Arc, Mutex};

use crate::als;
use crate::error::ClientError;

/// The training objective of [`MatrixFactorization`] (shared with the
/// coordinator and the wire: [`fedrec_proto::Loss`]).
pub use fedrec_proto::Loss;

/// How this device trains on one task: the hyperparameters of its local
/// training, validated. (The coordinator's `[training]` section,
/// `fedrec_coordinator::config::TrainingConfig`, is what it asks of its
/// devices; it travels as the wire's `pb::TrainingConfig` and becomes this
/// type on the device, in [`crate::task`].)
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalTraining {
    /// Passes over the device's own purchases per round.
    pub local_epochs: u32,
    /// SGD learning rate.
    pub learning_rate: f32,
    /// L2 regularization of the parameters a step touches.
    pub regularization: f32,
    /// Sampled negatives (items not bought) per purchase.
    pub negatives: u32,
    /// FedProx proximal weight: local training minimizes the loss plus
    /// `mu/2 ||w - w_global||^2`. 0 = plain local SGD. (BPR only.)
    pub proximal_mu: f32,
    /// The training objective.
    pub loss: Loss,
    /// Confidence α of a purchase under [`Loss::Als`] (items not bought
    /// have confidence 1).
    pub confidence: f32,
    /// Under [`Loss::Als`], append the upper triangle of `x xᵀ` (the solved
    /// private vector's outer product, `k(k+1)/2` values) to the update:
    /// the coordinator's `als` strategy steps with the cohort's mean of it.
    #[serde(default)]
    pub user_moment: bool,
}

impl Default for LocalTraining {
    fn default() -> Self {
        Self {
            local_epochs: 5,
            learning_rate: 0.05,
            regularization: 0.01,
            negatives: 1,
            proximal_mu: 0.0,
            loss: Loss::Bpr,
            confidence: 5.0,
            user_moment: false,
        }
    }
}

impl LocalTraining {
    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> Result<(), ClientError> {
        self.check()
            .map_err(|(_, reason)| ClientError::InvalidConfig(reason))
    }

    /// [`validate`](Self::validate), with the refused field's name apart
    /// from why it is refused (which names it and its value too): the
    /// shared bounds of [`fedrec_proto::limits::Training`], and
    /// `user_moment` only under the ALS loss.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        fedrec_proto::limits::Training {
            local_epochs: self.local_epochs.into(),
            learning_rate: self.learning_rate.into(),
            regularization: self.regularization.into(),
            proximal_mu: self.proximal_mu.into(),
            confidence: self.confidence.into(),
            negatives: self.negatives.into(),
        }
        .check()
        .map_err(|e| (e.bound.name, e.to_string()))?;
        if self.user_moment && self.loss != Loss::Als {
            return Err((
                "user_moment",
                "user_moment is only defined under the ALS loss (the private vector is solved, not trained)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A recommendation model split into global and private parameters.
///
/// Global parameters are a flat `f32` vector laid out as [`Model::layout`];
/// the private state is a flat vector that never leaves the device.
pub trait Model: Send + Sync + std::fmt::Debug {
    /// Number of items in the catalogue.
    fn items(&self) -> usize;
    /// Names and shapes of the global parameters.
    fn layout(&self) -> Layout;
    /// Fresh global parameters (seeded).
    fn init_global(&self, rng: &mut dyn Rng) -> Vec<f32>;
    /// Fresh private state for a new device (seeded).
    fn init_private(&self, rng: &mut dyn Rng) -> Vec<f32>;
    /// Fits the private state to `history` (sorted distinct item indices) with
    /// the global parameters held fixed.
    fn personalize(
        &self,
        global: &[f32],
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    );
    /// Trains on `history`, moving `params` (global parameters) and `private`
    /// in place. With `anchor` (the global model the device received) and
    /// `cfg.proximal_mu > 0`, the FedProx term pulls `params` towards it. The
    /// centralized baseline calls this on shared parameters without anchor.
    fn train_in_place(
        &self,
        params: &mut [f32],
        anchor: Option<&[f32]>,
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    );
    /// Trains the model on every user's history in one place (the
    /// centralized baseline); by default [`fit_by_sgd`].
    fn fit_centralized(
        &self,
        params: &mut [f32],
        users: &mut [Vec<f32>],
        histories: &[Vec<u32>],
        cfg: &LocalTraining,
        epochs: u32,
        rng: &mut dyn Rng,
    ) {
        fit_by_sgd(self, params, users, histories, cfg, epochs, rng);
    }
    /// Trains on `history` starting from `global`; updates `private` in place
    /// and returns the dense change to the global parameters.
    fn train(
        &self,
        global: &[f32],
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) -> Vec<f32> {
        change(global, |local| {
            self.train_in_place(local, Some(global), private, history, cfg, rng)
        })
    }
    /// [`train`](Self::train) for a `private` that
    /// [`personalize`](Self::personalize) has just fitted to `global` and
    /// `history` under `cfg`: a model whose training starts with that same
    /// fit skips it. The result is the same as `train`'s. Default: `train`.
    fn train_fitted(
        &self,
        global: &[f32],
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) -> Vec<f32> {
        self.train(global, private, history, cfg, rng)
    }
    /// Scores every item for the user with private state `private` and
    /// purchase history `history` (sorted distinct items) into `out`
    /// (resized to `items()`).
    fn score_all(&self, global: &[f32], private: &[f32], history: &[u32], out: &mut Vec<f32>);
    /// Non-personal scores of every item into `out` (resized to `items()`):
    /// what the global model predicts for a shopper it knows nothing about,
    /// used when there is no history or no consent. Default: all equal.
    fn popularity(&self, global: &[f32], out: &mut Vec<f32>) {
        let _ = global;
        out.clear();
        out.resize(self.items(), 0.0);
    }
    /// The item's vector in the global model, for measuring how alike two
    /// items are (diversity). Default: none.
    fn item_vector<'a>(&self, global: &'a [f32], item: u32) -> Option<&'a [f32]> {
        let _ = (global, item);
        None
    }
    /// How much each purchase in `history` contributes to `item`'s score for
    /// a private state fitted to `history` under `cfg`, and the part that
    /// does not depend on the purchases: `(per-purchase terms in history
    /// order, baseline)`. Default: not available.
    fn explain(
        &self,
        global: &[f32],
        history: &[u32],
        item: u32,
        cfg: &LocalTraining,
    ) -> Option<(Vec<f32>, f32)> {
        let _ = (global, history, item, cfg);
        None
    }
}

/// Centralized training by SGD: `epochs` passes of one local epoch per user,
/// users in a fresh random order each pass.
pub fn fit_by_sgd<M: Model + ?Sized>(
    model: &M,
    params: &mut [f32],
    users: &mut [Vec<f32>],
    histories: &[Vec<u32>],
    cfg: &LocalTraining,
    epochs: u32,
    rng: &mut dyn Rng,
) {
    let one_epoch = LocalTraining {
        local_epochs: 1,
        ..*cfg
    };
    let mut order: Vec<usize> = (0..histories.len()).collect();
    for _ in 0..epochs {
        order.shuffle(rng);
        for &u in &order {
            model.train_in_place(params, None, &mut users[u], &histories[u], &one_epoch, rng);
        }
    }
}

/// Matrix factorization on implicit feedback, trained with BPR
/// (Rendle et al. 2009) over sampled negatives.
///
/// Score of item `i` for user `u`: `p_u · q_i + b_i`.
#[derive(Clone, Debug)]
pub struct MatrixFactorization {
    items: usize,
    factors: usize,
    init_std: f32,
    /// The [`als::Gram`] of the last global model seen, with that model: the
    /// Gram depends on the global model only, so devices sharing this model
    /// object (a simulation) compute it once per model version. Exact: a hit
    /// needs the very same parameters.
    gram_cache: Arc<GramCache>,
}

/// The change that `train` makes to a copy of `global`.
pub(crate) fn change(global: &[f32], train: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut local = global.to_vec();
    train(&mut local);
    for (l, g) in local.iter_mut().zip(global) {
        *l -= g;
    }
    local
}

/// Whether `a` and `b` hold the same values bit for bit (compared in
/// blocks without early exit inside a block, so it vectorizes: it runs on
/// every device's every call).
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.chunks(256).zip(b.chunks(256)).all(|(x, y)| {
            x.iter()
                .zip(y)
                .fold(0_u32, |acc, (p, q)| acc | (p.to_bits() ^ q.to_bits()))
                == 0
        })
}

/// The last global model seen and its Gram.
type GramCache = Mutex<Option<(Vec<f32>, Arc<als::Gram>)>>;

/// The model whose layout is `layout` (as a coordinator announces it when
/// a device joins): matrix factorization (`item_factors` items × k,
/// `item_bias` items) or federated EASE (`ease_p_upper`). New embeddings
/// start with [`DEFAULT_INIT_STD`].
///
/// # Errors
/// A layout of neither kind ([`ClientError::ModelMismatch`], saying what
/// it holds).
pub fn for_layout(layout: &Layout) -> Result<Arc<dyn Model>, ClientError> {
    let t = layout.tensors();
    let unknown = || {
        ClientError::ModelMismatch(format!(
            "the coordinator trains a model this device does not know ({layout}); \
             this SDK knows matrix factorization (item_factors, item_bias) and \
             federated EASE ({})",
            crate::ease::TENSOR
        ))
    };
    match t {
        [(f, fs), (b, bs)]
            if f == "item_factors" && b == "item_bias" && fs.len() == 2 && bs.len() == 1 =>
        {
            if fs[0] != bs[0] {
                return Err(unknown());
            }
            let items = usize::try_from(fs[0]).map_err(|_| unknown())?;
            let factors = usize::try_from(fs[1]).map_err(|_| unknown())?;
            Ok(Arc::new(MatrixFactorization::new(
                items,
                factors,
                DEFAULT_INIT_STD,
            )?))
        }
        [(p, ps)] if p == crate::ease::TENSOR && ps.len() == 1 => {
            // n(n+1)/2 values for n items.
            let values = ps[0];
            let n = (((8.0 * values as f64 + 1.0).sqrt() - 1.0) / 2.0).round() as u64;
            if n * (n + 1) / 2 != values {
                return Err(unknown());
            }
            let items = usize::try_from(n).map_err(|_| unknown())?;
            Ok(Arc::new(crate::ease::Ease::new(items)?))
        }
        _ => Err(unknown()),
    }
}

/// Default number of latent factors.
pub const DEFAULT_FACTORS: usize = 32;
/// Default standard deviation of the initial embeddings.
pub const DEFAULT_INIT_STD: f32 = 0.1;

impl MatrixFactorization {
    /// A model over `items` items with `factors` latent factors.
    pub fn new(items: usize, factors: usize, init_std: f32) -> Result<Self, ClientError> {
        if items == 0 {
            return Err(ClientError::InvalidConfig(
                "items must be >= 1, got 0".into(),
            ));
        }
        if factors == 0 || factors > 1024 {
            return Err(ClientError::InvalidConfig(format!(
                "factors must be in 1..=1024, got {factors}"
            )));
        }
        if !(init_std > 0.0 && init_std.is_finite()) {
            return Err(ClientError::InvalidConfig(format!(
                "init_std must be > 0, got {init_std}"
            )));
        }
        Ok(Self {
            items,
            factors,
            init_std,
            gram_cache: Arc::default(),
        })
    }

    /// Number of latent factors.
    pub fn factors(&self) -> usize {
        self.factors
    }

    /// Number of global values: `items × factors` embeddings, then `items` biases.
    pub fn num_values(&self) -> usize {
        self.items * (self.factors + 1)
    }

    /// The embedding of `item` within the global parameters.
    pub fn item_embedding<'a>(&self, global: &'a [f32], item: u32) -> &'a [f32] {
        let k = self.factors;
        &global[item as usize * k..(item as usize + 1) * k]
    }

    fn view<'a>(&self, params: &'a [f32]) -> als::Items<'a> {
        als::Items::new(params, self.items, self.factors)
    }

    /// The Gram of `global`, from the cache when `global` is the model it
    /// was computed for.
    fn gram(&self, global: &[f32]) -> Arc<als::Gram> {
        // A poisoned cache only means another thread panicked mid-update;
        // the value is then recomputed, so poisoning is ignored.
        let mut cache = self.gram_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((params, gram)) = cache.as_ref()
            && same_bits(params, global)
        {
            return Arc::clone(gram);
        }
        let gram = Arc::new(als::gram(self.view(global)));
        *cache = Some((global.to_vec(), Arc::clone(&gram)));
        gram
    }

    fn bias_offset(&self) -> usize {
        self.items * self.factors
    }

    /// The ALS loss's training step: one exact gradient step on `params`
    /// at `private`.
    fn als_step(&self, params: &mut [f32], private: &[f32], history: &[u32], cfg: &LocalTraining) {
        let grad = als::gradient(self.view(params), private, history, cfg.confidence);
        for (w, g) in params.iter_mut().zip(grad) {
            *w -= cfg.learning_rate * g;
        }
    }

    fn normal(&self, rng: &mut dyn Rng, n: usize) -> Vec<f32> {
        // A valid std was checked in `new`, so Normal::new cannot fail.
        let normal = Normal::new(0.0, self.init_std).expect("init_std validated in new");
        (0..n).map(|_| normal.sample(rng)).collect()
    }

    /// Samples an item not in `history` (sorted), or any item if the user has
    /// bought everything.
    fn negative(&self, history: &[u32], rng: &mut dyn Rng) -> u32 {
        for _ in 0..64 {
            let j = rng.random_range(0..self.items as u32);
            if history.binary_search(&j).is_err() {
                return j;
            }
        }
        rng.random_range(0..self.items as u32)
    }

    /// One pass of BPR over `history`. `p` always moves; the global
    /// parameters move only when `params` is writable (`&mut [f32]`).
    fn bpr_epoch<P: Params>(
        &self,
        mut params: P,
        anchor: Option<&[f32]>,
        p: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) {
        let k = self.factors;
        let bias = self.bias_offset();
        let (lr, reg) = (cfg.learning_rate, cfg.regularization);
        // FedProx: the gradient of mu/2 ||w - anchor||^2 is mu (w - anchor).
        let anchor = anchor.filter(|_| cfg.proximal_mu > 0.0);
        let mu = cfg.proximal_mu;
        let prox = |w: &[f32], at: usize| anchor.map_or(0.0, |a| mu * (w[at] - a[at]));
        let mut order: Vec<u32> = history.to_vec();
        order.shuffle(rng);
        let mut grad_p = vec![0.0_f32; k];
        for &i in &order {
            for _ in 0..cfg.negatives {
                let j = self.negative(history, rng);
                if j == i {
                    continue;
                }
                let (i, j) = (i as usize, j as usize);
                let values = params.values();
                let qi = &values[i * k..(i + 1) * k];
                let qj = &values[j * k..(j + 1) * k];
                let x = dot(p, qi) - dot(p, qj) + values[bias + i] - values[bias + j];
                let g = sigmoid(-x);
                for f in 0..k {
                    grad_p[f] = g * (qi[f] - qj[f]) - reg * p[f];
                }
                if let Some(w) = params.values_mut() {
                    for (f, &pf) in p.iter().enumerate() {
                        let (a, b) = (i * k + f, j * k + f);
                        w[a] += lr * (g * pf - reg * w[a] - prox(w, a));
                        w[b] += lr * (-g * pf - reg * w[b] - prox(w, b));
                    }
                    let (a, b) = (bias + i, bias + j);
                    w[a] += lr * (g - reg * w[a] - prox(w, a));
                    w[b] += lr * (-g - reg * w[b] - prox(w, b));
                }
                for f in 0..k {
                    p[f] += lr * grad_p[f];
                }
            }
        }
    }
}

/// Global parameters as a training pass sees them: read-only while only the
/// private embedding is fitted, writable during local training.
trait Params {
    fn values(&self) -> &[f32];
    fn values_mut(&mut self) -> Option<&mut [f32]>;
}

impl Params for &[f32] {
    fn values(&self) -> &[f32] {
        self
    }
    fn values_mut(&mut self) -> Option<&mut [f32]> {
        None
    }
}

impl Params for &mut [f32] {
    fn values(&self) -> &[f32] {
        self
    }
    fn values_mut(&mut self) -> Option<&mut [f32]> {
        Some(self)
    }
}

impl Model for MatrixFactorization {
    fn items(&self) -> usize {
        self.items
    }

    fn layout(&self) -> Layout {
        Layout::new(vec![
            (
                "item_factors".into(),
                vec![self.items as u64, self.factors as u64],
            ),
            ("item_bias".into(), vec![self.items as u64]),
        ])
    }

    fn init_global(&self, rng: &mut dyn Rng) -> Vec<f32> {
        let mut v = self.normal(rng, self.items * self.factors);
        v.resize(self.num_values(), 0.0);
        v
    }

    fn init_private(&self, rng: &mut dyn Rng) -> Vec<f32> {
        self.normal(rng, self.factors)
    }

    fn personalize(
        &self,
        global: &[f32],
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) {
        if history.is_empty() {
            return;
        }
        if cfg.loss == Loss::Als {
            let x = als::solve_user(
                self.view(global),
                &self.gram(global),
                history,
                cfg.confidence.into(),
                cfg.regularization.into(),
            );
            private.copy_from_slice(&x);
            return;
        }
        // Only `p` moves, so the global parameters are read in place.
        for _ in 0..cfg.local_epochs {
            self.bpr_epoch(global, None, private, history, cfg, rng);
        }
    }

    fn train_fitted(
        &self,
        global: &[f32],
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) -> Vec<f32> {
        if cfg.loss != Loss::Als {
            return self.train(global, private, history, cfg, rng);
        }
        // `train_in_place` would solve `private` again, to the same value.
        change(global, |local| self.als_step(local, private, history, cfg))
    }

    fn train_in_place(
        &self,
        params: &mut [f32],
        anchor: Option<&[f32]>,
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) {
        if cfg.loss == Loss::Als {
            // One exact gradient step at the exactly solved private vector.
            self.personalize(params, private, history, cfg, rng);
            self.als_step(params, private, history, cfg);
            return;
        }
        for _ in 0..cfg.local_epochs {
            self.bpr_epoch(&mut *params, anchor, private, history, cfg, rng);
        }
    }

    fn fit_centralized(
        &self,
        params: &mut [f32],
        users: &mut [Vec<f32>],
        histories: &[Vec<u32>],
        cfg: &LocalTraining,
        epochs: u32,
        rng: &mut dyn Rng,
    ) {
        if cfg.loss != Loss::Als {
            return fit_by_sgd(self, params, users, histories, cfg, epochs, rng);
        }
        // Alternating least squares: exact user steps, exact item steps.
        let (alpha, lambda) = (f64::from(cfg.confidence), f64::from(cfg.regularization));
        let mut buyers = vec![Vec::new(); self.items];
        for (u, h) in histories.iter().enumerate() {
            for &i in h {
                buyers[i as usize].push(u as u32);
            }
        }
        for _ in 0..epochs {
            let w = self.view(params);
            let g = als::gram(w);
            // Each user's solve is independent: the result does not depend
            // on how rayon splits them.
            users
                .par_iter_mut()
                .zip(histories)
                .for_each(|(x, h)| *x = als::solve_user(w, &g, h, alpha, lambda));
            als::item_step(
                params,
                self.items,
                self.factors,
                users,
                &buyers,
                alpha,
                lambda,
            );
        }
    }

    /// The item biases `b_i`: the score of a shopper whose embedding is 0,
    /// which the model learns to rank the items most bought overall first.
    /// The item biases when the model has them (BPR); under the ALS loss,
    /// which keeps them at 0, each item embedding's squared norm: ALS solves
    /// `q_i` from the sum of its buyers' vectors, so the norm grows with how
    /// many bought it (on MovieLens-100K this ranks as well as purchase
    /// counts: HR@10 0.091 against 0.086).
    fn popularity(&self, global: &[f32], out: &mut Vec<f32>) {
        out.clear();
        let biases = &global[self.bias_offset()..self.num_values()];
        if biases.iter().any(|&b| b != 0.0) {
            out.extend_from_slice(biases);
            return;
        }
        let q = self.view(global).q;
        out.extend(q.rows().into_iter().map(|q| q.dot(&q)));
    }

    fn item_vector<'a>(&self, global: &'a [f32], item: u32) -> Option<&'a [f32]> {
        ((item as usize) < self.items).then(|| self.item_embedding(global, item))
    }

    /// The exact split of the score under the least-squares (ALS) fit of the
    /// private embedding (Hu, Koren & Volinsky 2008, §5), with `cfg`'s
    /// confidence and regularization; exact when the embedding was fitted
    /// that way (`personalize` with [`Loss::Als`]).
    fn explain(
        &self,
        global: &[f32],
        history: &[u32],
        item: u32,
        cfg: &LocalTraining,
    ) -> Option<(Vec<f32>, f32)> {
        if item as usize >= self.items || global.len() != self.num_values() {
            return None;
        }
        let (terms, baseline) = als::explain(
            self.view(global),
            &self.gram(global),
            history,
            cfg.confidence.into(),
            cfg.regularization.into(),
            item,
        );
        Some((terms.iter().map(|&t| t as f32).collect(), baseline as f32))
    }

    fn score_all(&self, global: &[f32], private: &[f32], _history: &[u32], out: &mut Vec<f32>) {
        let w = self.view(global);
        let scores = w.q.dot(&ArrayView1::from(private)) + w.bias;
        out.clear();
        out.extend(scores);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    #[test]
    fn for_layout_builds_the_model_the_layout_names() {
        let mf = MatrixFactorization::new(100, 8, DEFAULT_INIT_STD).unwrap();
        let built = for_layout(&mf.layout()).unwrap();
        assert_eq!(built.layout(), mf.layout());
        let ease = crate::ease::Ease::new(37).unwrap();
        assert_eq!(for_layout(&ease.layout()).unwrap().layout(), ease.layout());
        let odd = Layout::new(vec![("ease_p_upper".into(), vec![4])]);
        let err = for_layout(&odd).err().unwrap().to_string();
        assert!(
            err.contains("ease_p_upper 4") && err.contains("does not know"),
            "{err}"
        );
    }

    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn update_norm(mu: f32) -> f32 {
        let model = MatrixFactorization::new(40, 8, 0.1).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let global = model.init_global(&mut rng);
        let mut p = model.init_private(&mut rng);
        let cfg = LocalTraining {
            local_epochs: 20,
            learning_rate: 0.1,
            proximal_mu: mu,
            ..LocalTraining::default()
        };
        let delta = model.train(&global, &mut p, &[1, 2, 3, 4, 5], &cfg, &mut rng);
        delta.iter().map(|d| d * d).sum::<f32>().sqrt()
    }

    /// `train_fitted` after `personalize` is `train`, bit for bit, under
    /// either loss (under ALS it skips the second, identical solve).
    #[test]
    fn training_a_fitted_private_vector_is_training() {
        let model = MatrixFactorization::new(40, 8, 0.1).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let global = model.init_global(&mut rng);
        let history = [1, 4, 9, 16, 25];
        for loss in [Loss::Als, Loss::Bpr] {
            let cfg = LocalTraining {
                loss,
                ..LocalTraining::default()
            };
            let start = model.init_private(&mut rng);
            let (mut a, mut b) = (start.clone(), start);
            let (mut rng_a, mut rng_b) =
                (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(5));
            model.personalize(&global, &mut a, &history, &cfg, &mut rng_a);
            let plain = model.train(&global, &mut a, &history, &cfg, &mut rng_a);
            model.personalize(&global, &mut b, &history, &cfg, &mut rng_b);
            let fitted = model.train_fitted(&global, &mut b, &history, &cfg, &mut rng_b);
            assert!(same_bits(&plain, &fitted), "{loss:?}: the update");
            assert!(same_bits(&a, &b), "{loss:?}: the private vector");
            assert_eq!(rng_a, rng_b, "{loss:?}: the random numbers drawn");
            assert!(
                plain.iter().any(|d| *d != 0.0),
                "{loss:?}: training moved nothing"
            );
        }
    }

    #[test]
    fn the_proximal_term_keeps_local_training_near_the_global_model() {
        let plain = update_norm(0.0);
        let prox = update_norm(1.0);
        assert!(plain > 0.0);
        assert!(prox < 0.8 * plain, "FedProx update {prox} vs plain {plain}");
    }

    #[test]
    fn invalid_hyperparameters_are_named() {
        let cfg = LocalTraining {
            proximal_mu: -1.0,
            ..LocalTraining::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("proximal_mu") && err.contains("-1"), "{err}");
    }
}
