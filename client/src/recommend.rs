//! Recommendations on the device: relevance, diversity, explanations.
//!
//! - Personal ranking: the model's score for this shopper (private embedding
//!   and global model), items already bought left out. Purchases the shopper
//!   excluded ([`crate::exclusion`]) count as never made: they shape nothing,
//!   and their items may be recommended like any other.
//! - Non-personal ranking ([`Basis::PopularColdStart`], [`Basis::PopularNoConsent`]), used when there is no
//!   history (cold start) or the consent is [`Consent::None`]: the global
//!   model's own score for a shopper it knows nothing about
//!   ([`Model::popularity`]: for matrix factorization, the item biases).
//! - Diversity: maximal marginal relevance (Carbonell & Goldstein 1998) over
//!   the items' vectors in the global model. Each next item maximizes
//!   `(1 − λ)·relevance − λ·max cosine similarity to the items already
//!   chosen`, with relevance min-max scaled to [0, 1] over the candidate
//!   pool (the [`POOL`]·k best, at least [`MIN_POOL`]). λ = 0 is the pure
//!   relevance ranking.
//! - [`intra_list_diversity`]: mean pairwise `1 − cosine` of the items'
//!   vectors, the measure of a list's diversity reported by simulations.

use serde::Serialize;

use crate::consent::Consent;
use crate::device::Device;
use crate::error::ClientError;
use crate::metrics;
use crate::model::{Model, TrainingConfig};

/// Candidates considered by diversification: this many times `k`...
pub const POOL: usize = 10;
/// ...and at least this many.
pub const MIN_POOL: usize = 100;

/// Why a list is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Basis {
    /// Ranked for this shopper from their own purchases.
    Personal,
    /// The most popular items: the consent is [`Consent::None`].
    PopularNoConsent,
    /// The most popular items: no purchases are stored yet, or all of them
    /// are excluded (cold start).
    PopularColdStart,
}

/// A ranked list of items.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendations {
    /// Items, best first.
    pub items: Vec<u32>,
    /// What they were ranked on.
    pub basis: Basis,
}

/// One past purchase's share in an item's score.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Contribution {
    /// The purchased item.
    pub item: u32,
    /// Its term in the score (positive: makes the item more relevant).
    pub weight: f32,
}

/// Why an item is recommended to this shopper.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    /// The item explained.
    pub item: u32,
    /// What the ranking is based on.
    pub basis: Basis,
    /// The part of the score that does not depend on the shopper's
    /// purchases (the item's general popularity).
    pub baseline: f32,
    /// The shopper's own purchases that make it relevant, largest first
    /// (only positive contributions; empty when not personal).
    pub because: Vec<Contribution>,
}

/// Maximal marginal relevance over `scores`: `k` items not in `exclude`
/// (sorted), best first. `diversity` is λ in [0, 1]; 0 returns exactly the
/// `k` best by score. `vector(i)` is item `i`'s vector (`None`: unlike every
/// other item).
pub fn diversify<'a>(
    scores: &[f32],
    exclude: &[u32],
    k: usize,
    diversity: f32,
    vector: impl Fn(u32) -> Option<&'a [f32]>,
) -> Vec<u32> {
    if diversity <= 0.0 || k <= 1 {
        return metrics::top_k(scores, exclude, k);
    }
    let lambda = diversity.min(1.0);
    let pool = metrics::top_k(scores, exclude, (k * POOL).max(MIN_POOL));
    let (lo, hi) = pool
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &i| {
            (lo.min(scores[i as usize]), hi.max(scores[i as usize]))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let unit: Vec<Option<Vec<f32>>> = pool.iter().map(|&i| vector(i).map(normalized)).collect();
    // For each candidate: the largest similarity to anything chosen so far.
    let mut max_sim = vec![f32::NEG_INFINITY; pool.len()];
    let mut taken = vec![false; pool.len()];
    let mut chosen = Vec::with_capacity(k.min(pool.len()));
    while chosen.len() < k.min(pool.len()) {
        let mut best: Option<(usize, f32)> = None;
        for (c, &item) in pool.iter().enumerate() {
            if taken[c] {
                continue;
            }
            let rel = (scores[item as usize] - lo) / span;
            let sim = if chosen.is_empty() { 0.0 } else { max_sim[c] };
            let value = (1.0 - lambda) * rel - lambda * sim;
            // Ties: the earlier in the pool (the more relevant).
            if best.is_none_or(|(_, v)| value > v) {
                best = Some((c, value));
            }
        }
        let Some((c, _)) = best else { break };
        taken[c] = true;
        chosen.push(pool[c]);
        for (o, m) in max_sim.iter_mut().enumerate() {
            if !taken[o] {
                *m = m.max(cosine_unit(unit[c].as_deref(), unit[o].as_deref()));
            }
        }
    }
    chosen
}

/// Mean pairwise `1 − cosine similarity` of the items' vectors (0 for fewer
/// than two items; a missing vector counts as unlike every other).
pub fn intra_list_diversity<'a>(items: &[u32], vector: impl Fn(u32) -> Option<&'a [f32]>) -> f64 {
    let unit: Vec<Option<Vec<f32>>> = items.iter().map(|&i| vector(i).map(normalized)).collect();
    let mut sum = 0.0_f64;
    let mut pairs = 0_u64;
    for a in 0..unit.len() {
        for b in a + 1..unit.len() {
            sum += 1.0 - f64::from(cosine_unit(unit[a].as_deref(), unit[b].as_deref()));
            pairs += 1;
        }
    }
    if pairs == 0 { 0.0 } else { sum / pairs as f64 }
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| x / norm).collect()
    } else {
        vec![0.0; v.len()]
    }
}

fn cosine_unit(a: Option<&[f32]>, b: Option<&[f32]>) -> f32 {
    match (a, b) {
        (Some(a), Some(b)) => a.iter().zip(b).map(|(x, y)| x * y).sum(),
        _ => 0.0,
    }
}

impl Device {
    /// What the ranking for this shopper can be based on now.
    pub fn basis(&self) -> Basis {
        self.basis_for(&self.history())
    }

    fn basis_for(&self, history: &[u32]) -> Basis {
        if !self.consent.level().stores_history() {
            Basis::PopularNoConsent
        } else if history.is_empty() {
            Basis::PopularColdStart
        } else {
            Basis::Personal
        }
    }

    /// The `k` items to show this shopper under `global`: personal (items
    /// already bought left out, unless excluded: see [`Device::exclude`])
    /// when the consent and a history allow it,
    /// otherwise the most popular; diversified by `diversity` (λ in [0, 1],
    /// 0 = pure relevance). Uses the private embedding as it is (see
    /// [`Device::personalize`]).
    pub fn recommendations(
        &self,
        global: &[f32],
        k: usize,
        diversity: f32,
    ) -> Result<Recommendations, ClientError> {
        self.check_global(global)?;
        if !(0.0..=1.0).contains(&diversity) {
            return Err(ClientError::InvalidConfig(format!(
                "diversity must be in [0, 1], got {diversity}"
            )));
        }
        let history = self.history();
        let basis = self.basis_for(&history);
        let (scores, exclude): (Vec<f32>, &[u32]) = match basis {
            Basis::Personal => (self.scores(global), &history),
            _ => {
                let mut pop = Vec::new();
                self.model.popularity(global, &mut pop);
                (pop, &[])
            }
        };
        let model = &self.model;
        let items = diversify(&scores, exclude, k, diversity, |i| {
            model.item_vector(global, i)
        });
        Ok(Recommendations { items, basis })
    }

    /// Which of the shopper's own purchases (not excluded) make `item` relevant, and how
    /// much, under the least-squares fit with `cfg`'s confidence and
    /// regularization (exact when the private embedding was fitted by
    /// [`Device::personalize`] with the ALS loss). Not personal (no
    /// contributions) with [`Consent::None`] or no history.
    pub fn explain(
        &self,
        global: &[f32],
        item: u32,
        cfg: &TrainingConfig,
    ) -> Result<Explanation, ClientError> {
        self.check_global(global)?;
        if item as usize >= self.model.items() {
            return Err(ClientError::UnknownItem {
                item,
                items: self.model.items(),
            });
        }
        let history = self.history();
        let basis = self.basis_for(&history);
        let mut pop = Vec::new();
        self.model.popularity(global, &mut pop);
        let popular = Explanation {
            item,
            basis,
            baseline: pop[item as usize],
            because: Vec::new(),
        };
        if basis != Basis::Personal || self.consent.level() < Consent::OnDevice {
            return Ok(popular);
        }
        let Some((terms, baseline)) = self.model.explain(global, &history, item, cfg) else {
            return Ok(popular);
        };
        let mut because: Vec<Contribution> = history
            .iter()
            .zip(terms)
            .filter(|(_, w)| *w > 0.0)
            .map(|(&item, weight)| Contribution { item, weight })
            .collect();
        because.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.item.cmp(&b.item)));
        Ok(Explanation {
            item,
            basis,
            baseline,
            because,
        })
    }
}

/// A diversified list and how it fared on the device's held-out purchase.
#[derive(Clone, Debug, PartialEq)]
pub struct ListEvaluation {
    /// The list, best first.
    pub items: Vec<u32>,
    /// HR@k and NDCG@k of the held-out purchase in the list; `None`
    /// without a held-out purchase.
    pub hit_ndcg: Option<(f64, f64)>,
}

impl Device {
    /// Leave-one-out evaluation of a diversified list (simulations): the
    /// `k` items by [`diversify`] with `diversity` over the personal scores
    /// (`popular`: the non-personal scores of [`Model::popularity`]), with
    /// the purchases left out that the held-out purchase's track leaves out
    /// (all of them for discover, none for buy-again and next purchase).
    /// Only counts leave the device in a deployment; a simulation reads the
    /// list too, for coverage and diversity.
    pub fn evaluate_list(
        &self,
        global: &[f32],
        k: usize,
        diversity: f32,
        popular: bool,
    ) -> Result<ListEvaluation, ClientError> {
        self.check_global(global)?;
        let scores = if popular {
            let mut pop = Vec::new();
            self.model.popularity(global, &mut pop);
            pop
        } else {
            self.scores(global)
        };
        let target = self.held_out.map(|h| h.item);
        let history = self.history();
        let exclude: &[u32] = match self.held_out {
            Some(h) if !h.exclude_history => &[],
            _ => &history,
        };
        let model = &self.model;
        let items = diversify(&scores, exclude, k, diversity, |i| {
            model.item_vector(global, i)
        });
        let hit_ndcg = target.map(|t| match items.iter().position(|&i| i == t) {
            Some(rank) => (metrics::hit_at(rank, k), metrics::ndcg_at(rank, k)),
            None => (0.0, 0.0),
        });
        Ok(ListEvaluation { items, hit_ndcg })
    }
}

/// The intra-list diversity of `items` under `model`'s item vectors in `global`.
pub fn list_diversity(model: &dyn Model, global: &[f32], items: &[u32]) -> f64 {
    intra_list_diversity(items, |i| model.item_vector(global, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_diversity_is_the_relevance_ranking() {
        let scores = [0.9, 0.8, 0.7, 0.1, 0.5];
        let v = |_| None;
        assert_eq!(diversify(&scores, &[1], 3, 0.0, v), vec![0, 2, 4]);
    }

    #[test]
    fn diversity_skips_near_duplicates() {
        // Items 0 and 1 point the same way, 2 elsewhere; 1 is more relevant than 2.
        let vecs = [[1.0_f32, 0.0], [1.0, 0.01], [0.0, 1.0]];
        let scores = [1.0, 0.9, 0.8];
        let v = |i: u32| Some(&vecs[i as usize][..]);
        assert_eq!(diversify(&scores, &[], 2, 0.0, v), vec![0, 1]);
        assert_eq!(diversify(&scores, &[], 2, 0.5, v), vec![0, 2]);
        assert!(intra_list_diversity(&[0, 2], v) > intra_list_diversity(&[0, 1], v));
        assert!((intra_list_diversity(&[0, 2], v) - 1.0).abs() < 1e-6);
    }
}
