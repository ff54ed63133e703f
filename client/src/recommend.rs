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

/// The rows a shopping app shows, each best first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendations {
    /// "Recommended for you" (discover): items not bought before, by the
    /// model's personal score, diversified by the knob; the most popular
    /// items without a personal basis.
    pub items: Vec<u32>,
    /// "Buy it again": the shopper's own past items by the buy-again score
    /// ([`crate::repeat`]); empty without a personal basis.
    pub buy_again: Vec<u32>,
    /// The one list blending both by how often this shopper re-buys (the
    /// discover row without a personal basis).
    pub blended: Vec<u32>,
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
    /// For an item the shopper bought before (the buy-again row): how often
    /// and how regularly.
    pub rebuy: Option<RebuyReason>,
}

impl Explanation {
    /// A sentence for the app, with item numbers for the app to name: "you
    /// buy this about every 30 days", "because you bought items 12 and 40",
    /// or "popular with other shoppers".
    pub fn text(&self) -> String {
        if let Some(r) = &self.rebuy {
            return r.text();
        }
        match self.because.as_slice() {
            [] => "popular with other shoppers".to_owned(),
            [one] => format!("because you bought item {}", one.item),
            many => {
                let items: Vec<String> = many.iter().take(3).map(|c| c.item.to_string()).collect();
                format!("because you bought items {}", items.join(", "))
            }
        }
    }
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
        if basis != Basis::Personal {
            return Ok(Recommendations {
                buy_again: Vec::new(),
                blended: items.clone(),
                items,
                basis,
            });
        }
        let rows = self.row_scores(global)?;
        let mut buy_again = metrics::top_k(&rows.buy_again, &[], k.min(exclude.len()));
        buy_again.retain(|i| exclude.binary_search(i).is_ok());
        Ok(Recommendations {
            items,
            buy_again,
            blended: metrics::top_k(&rows.blended, &[], k),
            basis,
        })
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
            rebuy: self.explain_rebuy(item),
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
            rebuy: self.explain_rebuy(item),
        })
    }
}

/// One of the rankings a device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Row {
    /// The model's personal score (items already bought are left out of the
    /// discover row itself).
    Discover,
    /// The shopper's past items by the buy-again score.
    BuyAgain,
    /// Buy-again and discover blended.
    Blended,
}

/// Why a past item is in the buy-again row, in the shopper's terms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RebuyReason {
    /// The item.
    pub item: u32,
    /// How many times it was bought (distinct purchase times).
    pub purchases: u32,
    /// Days since it was last bought.
    pub days_since_last: f64,
    /// The usual number of days between two purchases of it, when bought
    /// more than once.
    pub every_days: Option<f64>,
}

impl RebuyReason {
    /// A sentence for the app: "you buy this about every 30 days", or "you
    /// bought this 3 times, last 12 days ago".
    pub fn text(&self) -> String {
        let ago = match self.days_since_last.round() {
            d if d < 1.0 => "today".to_owned(),
            d if d < 2.0 => "yesterday".to_owned(),
            d => format!("{d} days ago"),
        };
        match self.every_days {
            Some(d) if d >= 1.0 => format!("you buy this about every {} days", d.round()),
            _ if self.purchases > 1 => {
                format!("you bought this {} times, last {ago}", self.purchases)
            }
            _ => format!("you bought this {ago}"),
        }
    }
}

/// Scores of every item for the buy-again and blended rows.
#[derive(Clone, Debug, PartialEq)]
pub struct RowScores {
    /// Buy-again: past items above every other item (those in the global
    /// model's popularity order), so a ranking over the whole catalogue
    /// starts with the buy-again row.
    pub buy_again: Vec<f32>,
    /// The blended next-purchase scores (see [`crate::repeat::blend`]).
    pub blended: Vec<f32>,
    /// The shopper's re-buy share the blend used.
    pub repeat_share: f64,
}

impl Device {
    /// The buy-again and blended scores of every item at the device's
    /// current time, from its purchases, the global model's popularity and
    /// the private embedding as it is (see [`Device::personalize`]).
    pub fn row_scores(&self, global: &[f32]) -> Result<RowScores, ClientError> {
        use crate::repeat;
        self.check_global(global)?;
        let now = self.clock.unix_now();
        let purchases = &self.used_purchases();
        let mut pop = Vec::new();
        self.model.popularity(global, &mut pop);
        let pct = repeat::percentiles(&pop);
        let history = repeat::History::new(purchases, now.saturating_add(1));
        let weights = repeat::device_weights(purchases, now.saturating_add(1), &pct);
        let rebuy = repeat::buy_again(&history, now.saturating_add(1), &pct, &weights);
        let top = rebuy.iter().map(|r| r.1).fold(0.0_f32, f32::max).max(0.0);
        let floor = rebuy.iter().map(|r| r.1).fold(0.0_f32, f32::min).min(0.0);
        // Past items above every other item: the others keep their
        // popularity percentile in [0, 1], shifted below the lowest past
        // score.
        let mut buy_again: Vec<f32> = pct.iter().map(|p| floor - 2.0 + p).collect();
        for &(i, s) in &rebuy {
            buy_again[i as usize] = s;
        }
        debug_assert!(top.is_finite());
        let repeat_share = history.repeat_share(purchases, now.saturating_add(1));
        let blended = repeat::blend(
            &rebuy,
            &self.scores(global),
            repeat_share,
            &repeat::Blend::DEFAULT,
        );
        Ok(RowScores {
            buy_again,
            blended,
            repeat_share,
        })
    }

    /// Why `item` is in the buy-again row: how often and how regularly the
    /// shopper bought it; `None` when it was never bought (or nothing may
    /// be stored).
    pub fn explain_rebuy(&self, item: u32) -> Option<RebuyReason> {
        if self.basis() != Basis::Personal {
            return None;
        }
        let now = self.clock.unix_now();
        let history = crate::repeat::History::new(&self.used_purchases(), now.saturating_add(1));
        let p = history.items.iter().find(|p| p.item == item)?;
        Some(RebuyReason {
            item,
            purchases: p.purchases,
            days_since_last: (now - p.last).max(0) as f64 / 86_400.0,
            every_days: p.period_days(),
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
    use std::sync::Arc;

    use crate::clock::ManualClock;
    use crate::exclusion::Exclusion;
    use crate::model::{Loss, MatrixFactorization};
    use crate::retention::RetentionPolicy;
    use crate::store::Purchase;
    use rand::SeedableRng;

    const DAY: i64 = 86_400;

    /// A shopper who buys item 3 every 14 days, item 4 once and item 5
    /// twice, asked on day 60.
    fn shopper() -> (Device, Vec<f32>) {
        let model = Arc::new(MatrixFactorization::new(30, 4, 0.1).unwrap());
        let global = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        let clock = Arc::new(ManualClock::new(60 * DAY));
        let mut d = Device::builder(model)
            .seed(1)
            .retention(RetentionPolicy::UNLIMITED)
            .clock(clock)
            .in_memory()
            .unwrap();
        d.set_consent(Consent::OnDevice).unwrap();
        for day in [0, 14, 28, 42, 56] {
            d.record(Purchase::new(3, day * DAY, 1.0)).unwrap();
        }
        d.record(Purchase::new(4, 10 * DAY, 1.0)).unwrap();
        d.record(Purchase::new(5, 20 * DAY, 1.0)).unwrap();
        d.record(Purchase::new(5, 30 * DAY, 2.0)).unwrap();
        let cfg = TrainingConfig {
            loss: Loss::Als,
            ..TrainingConfig::default()
        };
        d.personalize(&global, &cfg).unwrap();
        (d, global)
    }

    #[test]
    fn three_rows_and_their_explanations() {
        let (d, global) = shopper();
        let recs = d.recommendations(&global, 5, 0.0).unwrap();
        assert_eq!(recs.basis, Basis::Personal);
        // Buy again: only past items, the staple first.
        assert_eq!(recs.buy_again.len(), 3);
        assert_eq!(recs.buy_again[0], 3, "{recs:?}");
        // Discover: nothing already bought.
        assert!(recs.items.iter().all(|i| ![3, 4, 5].contains(i)));
        assert_eq!(recs.items.len(), 5);
        // Blended: a mixture; this shopper re-buys in most baskets, so the
        // staple leads it.
        assert_eq!(recs.blended.len(), 5);
        assert_eq!(recs.blended[0], 3);
        let why = d.explain(&global, 3, &TrainingConfig::default()).unwrap();
        assert_eq!(why.text(), "you buy this about every 14 days");
        let once = d.explain(&global, 4, &TrainingConfig::default()).unwrap();
        assert_eq!(once.text(), "you bought this 50 days ago");
        let new = d
            .explain(&global, recs.items[0], &TrainingConfig::default())
            .unwrap();
        assert!(new.rebuy.is_none());
    }

    #[test]
    fn an_excluded_item_leaves_the_buy_again_row() {
        let (mut d, global) = shopper();
        d.exclude(Exclusion::Item(3)).unwrap();
        let recs = d.recommendations(&global, 5, 0.0).unwrap();
        assert!(!recs.buy_again.contains(&3), "{recs:?}");
        assert_eq!(recs.buy_again.len(), 2);
        assert!(d.explain_rebuy(3).is_none());
    }

    #[test]
    fn without_consent_the_rows_are_popular_items() {
        let (mut d, global) = shopper();
        d.set_consent(Consent::None).unwrap();
        let recs = d.recommendations(&global, 4, 0.0).unwrap();
        assert_eq!(recs.basis, Basis::PopularNoConsent);
        assert!(recs.buy_again.is_empty());
        assert_eq!(recs.blended, recs.items);
    }

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
