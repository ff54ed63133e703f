//! Recommendations on the device: relevance, diversity, explanations.
//!
//! - Personal ranking: the model's score for this shopper (private embedding
//!   and global model), items already bought left out. Purchases the shopper
//!   excluded ([`crate::exclusion`]) count as never made: they shape nothing,
//!   and their items may be recommended like any other.
//! - Non-personal ranking ([`Basis::PopularColdStart`], [`Basis::PopularNoConsent`]), used when there is no
//!   history (cold start) or the consent is [`Consent::None`](crate::consent::Consent::None): the global
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

use crate::model::Model;
use crate::ranking;

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
        return ranking::top_k(scores, exclude, k);
    }
    let lambda = diversity.min(1.0);
    let pool = ranking::top_k(scores, exclude, (k * POOL).max(MIN_POOL));
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

/// A diversified list and how it fared on the device's held-out purchase.
#[derive(Clone, Debug, PartialEq)]
pub struct ListEvaluation {
    /// The list, best first.
    pub items: Vec<u32>,
    /// HR@k and NDCG@k of the held-out purchase in the list; `None`
    /// without a held-out purchase.
    pub hit_ndcg: Option<(f64, f64)>,
}

/// The intra-list diversity of `items` under `model`'s item vectors in `global`.
pub fn list_diversity(model: &dyn Model, global: &[f32], items: &[u32]) -> f64 {
    intra_list_diversity(items, |i| model.item_vector(global, i))
}
