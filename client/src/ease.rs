//! EASE (Steck 2019), trained federatedly: an item-item model for
//! catalogues small enough to ship as one items × items matrix.
//!
//! EASE's weights are `B_ij = −P_ij / P_jj` (zero on the diagonal) with
//! `P = (XᵀX + λI)⁻¹`, where `XᵀX` is the catalogue's co-purchase matrix
//! (how many shoppers bought both items). That matrix is a sum over
//! shoppers of each one's own `x xᵀ` (their binary purchase vector's outer
//! product), so it federates in one round:
//!
//! 1. each device sends the upper triangle of its own `x xᵀ` as its update
//!    (dense, the same size whatever was bought, so that under secure
//!    aggregation the coordinator learns only the cohort's sum);
//! 2. the coordinator's `ease` step turns the cohort's sum into `P` by one
//!    Cholesky factorization and publishes `P`'s upper triangle as the new
//!    model (it replaces the old one: one round with every device is
//!    EASE on all their data);
//! 3. a device scores on its own: `score_j = Σ_{i∈h, i≠j} B_ij`, the
//!    columns of its own items summed. It downloads the whole matrix,
//!    never only its rows, so the download does not say what it bought.
//!
//! There is no private state. The model has `n(n+1)/2` values for `n`
//! items (7 million at 3,665 items: 27 MB as f32, a quarter as q8), which
//! is what bounds the catalogue ([`MAX_ITEMS`]).

use fedrec_proto::Layout;
use rand::Rng;

use crate::error::ClientError;
use crate::model::{LocalTraining, Model};

/// The name of the model's one tensor: `P`'s upper triangle, row by row.
pub const TENSOR: &str = "ease_p_upper";

/// Largest catalogue the federated EASE model is offered for: `n(n+1)/2`
/// values to upload once and to download (8.4 million values, 34 MB as f32,
/// at 4,096 items).
pub const MAX_ITEMS: usize = 4_096;

/// The federated EASE model over `items` items.
#[derive(Clone, Debug)]
pub struct Ease {
    items: usize,
}

impl Ease {
    /// A model over `items` items.
    ///
    /// # Errors
    /// No items, or more than [`MAX_ITEMS`].
    pub fn new(items: usize) -> Result<Self, ClientError> {
        if items == 0 || items > MAX_ITEMS {
            return Err(ClientError::InvalidConfig(format!(
                "the EASE model needs 1 to {MAX_ITEMS} items (it ships an items × items \
                 matrix), got {items}"
            )));
        }
        Ok(Self { items })
    }

    /// Index of `P_ij` (any order) in the upper triangle, row by row.
    fn at(&self, i: usize, j: usize) -> usize {
        let (r, c) = if i <= j { (i, j) } else { (j, i) };
        r * self.items - r * (r.saturating_sub(1)) / 2 - r + c
    }
}

/// Values in the upper triangle of an `n × n` matrix.
pub fn upper_len(n: usize) -> usize {
    n * (n + 1) / 2
}

impl Model for Ease {
    fn items(&self) -> usize {
        self.items
    }

    fn layout(&self) -> Layout {
        Layout::new(vec![(TENSOR.into(), vec![upper_len(self.items) as u64])])
    }

    /// `P = I`: every `B_ij` is 0, so scores are all equal until the first
    /// round has been aggregated.
    fn init_global(&self, _rng: &mut dyn Rng) -> Vec<f32> {
        let mut p = vec![0.0; upper_len(self.items)];
        for i in 0..self.items {
            p[self.at(i, i)] = 1.0;
        }
        p
    }

    fn init_private(&self, _rng: &mut dyn Rng) -> Vec<f32> {
        Vec::new()
    }

    fn personalize(
        &self,
        _global: &[f32],
        _private: &mut [f32],
        _history: &[u32],
        _cfg: &LocalTraining,
        _rng: &mut dyn Rng,
    ) {
    }

    /// Not used: [`train`](Model::train) returns the device's co-purchases.
    fn train_in_place(
        &self,
        _params: &mut [f32],
        _anchor: Option<&[f32]>,
        _private: &mut [f32],
        _history: &[u32],
        _cfg: &LocalTraining,
        _rng: &mut dyn Rng,
    ) {
    }

    /// The device's contribution to the co-purchase matrix: the upper
    /// triangle of `x xᵀ` for its binary purchase vector `x` (a 1 for each
    /// pair of items it bought, each item with itself included).
    fn train(
        &self,
        _global: &[f32],
        _private: &mut [f32],
        history: &[u32],
        _cfg: &LocalTraining,
        _rng: &mut dyn Rng,
    ) -> Vec<f32> {
        let mut g = vec![0.0; upper_len(self.items)];
        for (a, &i) in history.iter().enumerate() {
            for &j in &history[a..] {
                if let Some(v) = g.get_mut(self.at(i as usize, j as usize)) {
                    *v = 1.0;
                }
            }
        }
        g
    }

    /// `score_j = −(Σ_{i∈h} P_ij − [j∈h] P_jj) / P_jj`.
    fn score_all(&self, global: &[f32], _private: &[f32], history: &[u32], out: &mut Vec<f32>) {
        let n = self.items;
        out.clear();
        out.resize(n, 0.0);
        for &i in history {
            let i = i as usize;
            if i >= n {
                continue;
            }
            for (j, o) in out.iter_mut().enumerate() {
                *o += global[self.at(i, j)];
            }
            out[i] -= global[self.at(i, i)];
        }
        for (j, o) in out.iter_mut().enumerate() {
            let d = global[self.at(j, j)];
            *o = if d > 0.0 { -*o / d } else { 0.0 };
        }
    }

    /// Without a history: items by `1 / P_jj`, which grows with how many
    /// bought the item (`P_jj ≈ 1/(G_jj + λ)` for a weakly linked item).
    fn popularity(&self, global: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend((0..self.items).map(|j| {
            let d = global[self.at(j, j)];
            if d > 0.0 { 1.0 / d } else { 0.0 }
        }));
    }

    /// Exactly one term per purchase: `B_ij = −P_ij / P_jj`, no baseline.
    fn explain(
        &self,
        global: &[f32],
        history: &[u32],
        item: u32,
        _cfg: &LocalTraining,
    ) -> Option<(Vec<f32>, f32)> {
        let j = item as usize;
        if j >= self.items || global.len() != upper_len(self.items) {
            return None;
        }
        let d = global[self.at(j, j)];
        let terms = history
            .iter()
            .map(|&i| {
                if i as usize == j || d <= 0.0 {
                    0.0
                } else {
                    -global[self.at(i as usize, j)] / d
                }
            })
            .collect();
        Some((terms, 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn upper_triangle_indices_cover_the_matrix_once() {
        let m = Ease::new(5).unwrap();
        let mut seen = vec![false; upper_len(5)];
        for i in 0..5 {
            for j in i..5 {
                assert_eq!(m.at(i, j), m.at(j, i));
                assert!(!seen[m.at(i, j)]);
                seen[m.at(i, j)] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn the_update_is_the_devices_own_co_purchases() {
        let m = Ease::new(4).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let g = m.train(
            &m.init_global(&mut rng),
            &mut [],
            &[1, 3],
            &LocalTraining::default(),
            &mut rng,
        );
        assert_eq!(g.len(), 10, "dense whatever was bought");
        for i in 0..4 {
            for j in i..4 {
                let bought = [1, 3].contains(&i) && [1, 3].contains(&j);
                assert_eq!(g[m.at(i, j)], if bought { 1.0 } else { 0.0 }, "({i}, {j})");
            }
        }
    }

    #[test]
    fn scores_follow_b_and_leave_the_item_itself_out() {
        // P for 3 items (symmetric), as the coordinator would publish it.
        let m = Ease::new(3).unwrap();
        let p = [[2.0_f32, -0.5, -1.0], [-0.5, 1.0, 0.2], [-1.0, 0.2, 4.0]];
        let mut global = vec![0.0; 6];
        for i in 0..3 {
            for j in i..3 {
                global[m.at(i, j)] = p[i][j];
            }
        }
        let mut out = Vec::new();
        m.score_all(&global, &[], &[0, 1], &mut out);
        // score_j = Σ_{i∈h, i≠j} −P_ij / P_jj
        let want = [0.5 / 1.0 * 0.0 + 0.5 / 2.0, 0.5 / 1.0, (1.0 - 0.2) / 4.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        let (terms, base) = m
            .explain(&global, &[0, 1], 2, &LocalTraining::default())
            .unwrap();
        assert!((terms.iter().sum::<f32>() + base - out[2]).abs() < 1e-6);
    }

    #[test]
    fn a_catalogue_over_the_limit_is_refused_with_the_reason() {
        let err = Ease::new(MAX_ITEMS + 1).unwrap_err().to_string();
        assert!(err.contains("items × items"), "{err}");
    }
}
