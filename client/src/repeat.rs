//! "Buy it again": ranking the shopper's own past items, and blending that
//! row with the federated model's "discover" row into the one list an app
//! shows. Everything here runs on the device, from what it already holds
//! (its purchases and the global model): nothing new leaves it.
//!
//! # The buy-again score
//! Each past item gets a linear score over features of the shopper's own
//! history at the time of asking ([`Features`]: how often and how recently
//! it was bought, its share of the shopper's baskets, the shopper's
//! rhythm for it, the quantity, and the item's popularity in the global
//! model). The weights are those of a conditional logit ("which of my past
//! items do I buy next?"): [`DEFAULT_WEIGHTS`] were fitted on the
//! validation events of Online Retail's buy-again track (never its test
//! events; see `docs/quality-experiments.md`). A device with at least
//! [`MIN_REBUYS_TO_ADAPT`] re-buys in its own history moves the weights
//! towards its own habits by [`adapt`]: the same logit, fitted on its past
//! baskets replayed, with an L2 pull towards the defaults.
//!
//! # The blend
//! The next purchase is a re-buy with the shopper's own probability `r`
//! (the share of their baskets after the first that held a re-buy, shrunk
//! towards [`DEFAULT_REPEAT_SHARE`] with the weight of [`PRIOR_BASKETS`]
//! baskets, so a device with few purchases uses about the default). The
//! blended score of an item is `r · P(buy again = item) + (1 − r) ·
//! P(discover = item)`: a softmax over the buy-again scores of past items
//! and a softmax of the discover scores of the other items, standardized
//! per shopper, at the temperatures of [`Blend`] (defaults chosen on the
//! validation events of Online Retail's next-purchase track by `fedrec
//! fit-repeat`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::Purchase;

/// Seconds in a day.
const DAY: f64 = 86_400.0;

/// Number of features of a past item.
pub const FEATURES: usize = 7;

/// Feature names, in order (for documentation and reports).
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "log purchases",
    "log days since last",
    "share of baskets",
    "log baskets since last",
    "bought more than once",
    "rhythm (|log(days since last / usual gap)|, 0 if bought once)",
    "popularity percentile in the global model",
];

/// The weights of the buy-again score when the device has not adapted
/// them: fitted on the 1,708 validation re-buys of Online Retail's
/// buy-again track by [`adapt`] from zero with [`FIT_L2`] and
/// [`FIT_STEPS`] (`fedrec fit-repeat --data online_retail.csv`; see the
/// module doc).
pub const DEFAULT_WEIGHTS: [f32; FEATURES] = [
    0.390_382_56,
    -0.143_335_82,
    2.087_213_8,
    -0.264_564_1,
    -0.125_074_39,
    -0.172_561_81,
    2.566_327_3,
];

/// L2 weight with which the defaults were fitted (towards zero).
pub const FIT_L2: f32 = 0.001;

/// Gradient steps with which the defaults were fitted.
pub const FIT_STEPS: usize = 2000;

/// L2 weight of a device's pull towards the default weights when it adapts
/// them to its own history (strong: a device has tens of choices, the
/// defaults were fitted on thousands).
pub const DEFAULT_L2: f32 = 0.05;

/// Re-buys the device's own history must hold before it adapts the weights
/// (fewer: [`DEFAULT_WEIGHTS`] as they are).
pub const MIN_REBUYS_TO_ADAPT: usize = 8;

/// The share of baskets holding a re-buy assumed for a shopper without
/// history (Online Retail's validation events: about half of the baskets
/// after a customer's first hold a re-buy).
pub const DEFAULT_REPEAT_SHARE: f64 = 0.5;

/// How many baskets' worth of weight the default share has against the
/// shopper's own.
pub const PRIOR_BASKETS: f64 = 2.0;

/// The temperatures of the blend's two softmaxes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Blend {
    /// Over the standardized discover scores of items not bought before
    /// (lower: the model's best new items take more of the new-item share).
    pub discover_temperature: f64,
    /// Over the buy-again scores of past items.
    pub rebuy_temperature: f64,
}

impl Blend {
    /// The default, chosen on Online Retail's 2,010 next-purchase
    /// validation events over [`Blend::GRID`] (see the module doc): from a
    /// discover temperature of 4 on, the blend puts the buy-again row
    /// first and the discover row after it (validation NDCG@10 0.1448,
    /// against 0.1415 at 2 and 0.1192 at 1), which is what a shop whose
    /// next purchases are mostly re-buys calls for.
    pub const DEFAULT: Blend = Blend {
        discover_temperature: 4.0,
        rebuy_temperature: 1.0,
    };

    /// The temperatures `fedrec fit-repeat` tries.
    pub const GRID: [f64; 5] = [0.5, 1.0, 2.0, 4.0, 8.0];
}

/// What the device knows about one past item at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PastItem {
    /// The item.
    pub item: u32,
    /// Purchase events (distinct times) of it.
    pub purchases: u32,
    /// The first and last purchase times.
    pub first: i64,
    /// The last purchase time.
    pub last: i64,
    /// Mean quantity per purchase.
    pub mean_quantity: f32,
}

impl PastItem {
    /// The usual time between two purchases, in days, when bought more
    /// than once.
    pub fn period_days(&self) -> Option<f64> {
        (self.purchases >= 2)
            .then(|| (self.last - self.first) as f64 / DAY / f64::from(self.purchases - 1))
    }
}

/// The shopper's history at time `now`: each item bought before `now`,
/// and the distinct purchase times (baskets) before `now`, ascending.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// Past items, by item index.
    pub items: Vec<PastItem>,
    /// Distinct purchase times before `now`.
    pub baskets: Vec<i64>,
}

impl History {
    /// Summarizes `purchases` made before `now` (purchases at the same time
    /// count as one basket; an item twice in a basket counts once).
    pub fn new(purchases: &[Purchase], now: i64) -> Self {
        let mut by_item: BTreeMap<u32, (Vec<i64>, f32, u32)> = BTreeMap::new();
        let mut baskets: Vec<i64> = Vec::new();
        for p in purchases.iter().filter(|p| p.time < now) {
            baskets.push(p.time);
            let entry = by_item.entry(p.item).or_default();
            entry.0.push(p.time);
            entry.1 += p.quantity;
            entry.2 += 1;
        }
        baskets.sort_unstable();
        baskets.dedup();
        let items = by_item
            .into_iter()
            .map(|(item, (mut times, quantity, rows))| {
                times.sort_unstable();
                times.dedup();
                PastItem {
                    item,
                    purchases: times.len() as u32,
                    first: times[0],
                    last: times[times.len() - 1],
                    mean_quantity: quantity / rows as f32,
                }
            })
            .collect();
        Self { items, baskets }
    }

    /// The features of `p` at `now`; `popularity` is the item's percentile
    /// (0 = least, 1 = most popular) in the global model.
    pub fn features(&self, p: &PastItem, now: i64, popularity: f32) -> Features {
        let days = ((now - p.last).max(0) as f64 / DAY) as f32;
        let since = self.baskets.len() - self.baskets.partition_point(|&t| t <= p.last);
        let rhythm = p.period_days().map_or(0.0, |period| {
            ((f64::from(days) + 1.0) / (period + 1.0)).ln().abs() as f32
        });
        Features([
            (p.purchases as f32).ln(),
            days.ln_1p(),
            p.purchases as f32 / self.baskets.len().max(1) as f32,
            (since as f32).ln_1p(),
            if p.purchases >= 2 { 1.0 } else { 0.0 },
            rhythm,
            popularity,
        ])
    }

    /// The shopper's share of baskets after the first that held a re-buy,
    /// shrunk towards [`DEFAULT_REPEAT_SHARE`] (see the module doc).
    pub fn repeat_share(&self, purchases: &[Purchase], now: i64) -> f64 {
        let (rebuys, later) = rebuy_baskets(purchases, now);
        (rebuys as f64 + DEFAULT_REPEAT_SHARE * PRIOR_BASKETS) / (later as f64 + PRIOR_BASKETS)
    }
}

/// Of the baskets before `now` after the first: how many held an item
/// bought in an earlier basket, and how many there were.
fn rebuy_baskets(purchases: &[Purchase], now: i64) -> (usize, usize) {
    let mut sorted: Vec<&Purchase> = purchases.iter().filter(|p| p.time < now).collect();
    sorted.sort_by_key(|p| p.time);
    let mut seen: Vec<u32> = Vec::new();
    let (mut rebuys, mut later) = (0, 0);
    let mut i = 0;
    while i < sorted.len() {
        let t = sorted[i].time;
        let j = i + sorted[i..].iter().take_while(|p| p.time == t).count();
        if !seen.is_empty() {
            later += 1;
            if sorted[i..j]
                .iter()
                .any(|p| seen.binary_search(&p.item).is_ok())
            {
                rebuys += 1;
            }
        }
        for p in &sorted[i..j] {
            if let Err(at) = seen.binary_search(&p.item) {
                seen.insert(at, p.item);
            }
        }
        i = j;
    }
    (rebuys, later)
}

/// The features of one past item (see [`FEATURE_NAMES`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Features(pub [f32; FEATURES]);

impl Features {
    /// The linear score under `weights`.
    pub fn score(&self, weights: &[f32; FEATURES]) -> f32 {
        self.0.iter().zip(weights).map(|(x, w)| x * w).sum()
    }
}

/// Percentiles of `scores` (0 for the lowest, 1 for the highest; ties get
/// the same percentile): the global model's popularity on a scale that does
/// not depend on the model.
pub fn percentiles(scores: &[f32]) -> Vec<f32> {
    let n = scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut out = vec![0.0_f32; n];
    let mut i = 0;
    while i < n {
        let j = i + order[i..]
            .iter()
            .take_while(|&&k| scores[k] == scores[order[i]])
            .count();
        let pct = if n > 1 {
            ((i + j - 1) as f32 / 2.0) / (n - 1) as f32
        } else {
            1.0
        };
        for &k in &order[i..j] {
            out[k] = pct;
        }
        i = j;
    }
    out
}

/// One choice among past items: their features, and which one was bought.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The candidates' features.
    pub candidates: Vec<Features>,
    /// The index of the one bought.
    pub chosen: usize,
}

/// Fits the conditional logit `P(chosen) = softmax(w · features)` over
/// `choices` by gradient descent, with an L2 pull of strength `l2` towards
/// `prior`, starting from it. Deterministic.
pub fn adapt(
    choices: &[Choice],
    prior: &[f32; FEATURES],
    l2: f32,
    steps: usize,
) -> [f32; FEATURES] {
    let mut w = *prior;
    if choices.is_empty() {
        return w;
    }
    let rate = 0.5_f32;
    for _ in 0..steps {
        let mut grad = [0.0_f32; FEATURES];
        for c in choices {
            let scores: Vec<f32> = c.candidates.iter().map(|f| f.score(&w)).collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            for (f, e) in c.candidates.iter().zip(&exp) {
                for (g, x) in grad.iter_mut().zip(f.0) {
                    *g += e / total * x;
                }
            }
            for (g, x) in grad.iter_mut().zip(c.candidates[c.chosen].0) {
                *g -= x;
            }
        }
        for ((wk, g), p) in w.iter_mut().zip(grad).zip(prior) {
            *wk -= rate * (g / choices.len() as f32 + l2 * (*wk - p));
        }
    }
    w
}

/// The device's own past choices: at each of its baskets before `now` (after
/// the first), every item of the basket bought before is one choice among
/// the items bought before that basket.
pub fn own_choices(purchases: &[Purchase], now: i64, popularity: &[f32]) -> Vec<Choice> {
    let history = History::new(purchases, now);
    let mut choices = Vec::new();
    for &basket in history.baskets.iter().skip(1) {
        let before = History::new(purchases, basket);
        let bought: Vec<u32> = purchases
            .iter()
            .filter(|p| p.time == basket)
            .map(|p| p.item)
            .collect();
        let candidates: Vec<Features> = before
            .items
            .iter()
            .map(|p| before.features(p, basket, pct(popularity, p.item)))
            .collect();
        for (k, p) in before.items.iter().enumerate() {
            if bought.contains(&p.item) {
                choices.push(Choice {
                    candidates: candidates.clone(),
                    chosen: k,
                });
            }
        }
    }
    choices
}

fn pct(popularity: &[f32], item: u32) -> f32 {
    popularity.get(item as usize).copied().unwrap_or(0.0)
}

/// The weights a device uses: its own fit when its history holds at least
/// [`MIN_REBUYS_TO_ADAPT`] re-buys, [`DEFAULT_WEIGHTS`] otherwise.
pub fn device_weights(purchases: &[Purchase], now: i64, popularity: &[f32]) -> [f32; FEATURES] {
    let choices = own_choices(purchases, now, popularity);
    if choices.len() < MIN_REBUYS_TO_ADAPT {
        return DEFAULT_WEIGHTS;
    }
    adapt(&choices, &DEFAULT_WEIGHTS, DEFAULT_L2, 50)
}

/// Buy-again scores of the shopper's past items at `now`, under `weights`;
/// `popularity` holds the global model's popularity percentiles. Returns
/// `(item, score)` for each past item.
pub fn buy_again(
    history: &History,
    now: i64,
    popularity: &[f32],
    weights: &[f32; FEATURES],
) -> Vec<(u32, f32)> {
    history
        .items
        .iter()
        .map(|p| {
            (
                p.item,
                history
                    .features(p, now, pct(popularity, p.item))
                    .score(weights),
            )
        })
        .collect()
}

/// The blended next-purchase scores over every item: `r` times the softmax
/// of the buy-again scores over past items plus `1 − r` times the softmax
/// of the standardized `discover` scores over the other items (see the
/// module doc).
pub fn blend(rebuy: &[(u32, f32)], discover: &[f32], r: f64, t: &Blend) -> Vec<f32> {
    let n = discover.len();
    let mut past = vec![false; n];
    for &(i, _) in rebuy {
        if let Some(p) = past.get_mut(i as usize) {
            *p = true;
        }
    }
    let others: Vec<f64> = (0..n)
        .filter(|&i| !past[i])
        .map(|i| f64::from(discover[i]))
        .collect();
    let mean = others.iter().sum::<f64>() / others.len().max(1) as f64;
    let sd = (others.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / others.len().max(1) as f64)
        .sqrt()
        .max(1e-12);
    let z = |x: f32| (f64::from(x) - mean) / sd / t.discover_temperature;
    let zmax = others
        .iter()
        .map(|&x| z(x as f32))
        .fold(f64::NEG_INFINITY, f64::max);
    let new_total: f64 = (0..n)
        .filter(|&i| !past[i])
        .map(|i| (z(discover[i]) - zmax).exp())
        .sum();
    let rmax = rebuy.iter().map(|r| r.1).fold(f32::NEG_INFINITY, f32::max);
    let rw = |s: f32| (f64::from(s - rmax) / t.rebuy_temperature).exp();
    let rebuy_total: f64 = rebuy.iter().map(|r| rw(r.1)).sum();
    let mut out = vec![0.0_f32; n];
    for (i, o) in out.iter_mut().enumerate() {
        if !past[i] && new_total > 0.0 {
            *o = ((1.0 - r) * (z(discover[i]) - zmax).exp() / new_total) as f32;
        }
    }
    for &(i, s) in rebuy {
        if let Some(o) = out.get_mut(i as usize) {
            *o = (r * rw(s) / rebuy_total) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(item: u32, day: i64) -> Purchase {
        Purchase::new(item, day * 86_400, 1.0)
    }

    #[test]
    fn history_counts_baskets_and_rhythm() {
        // Item 1 every 10 days, item 2 once; asked on day 30.
        let purchases = [p(1, 0), p(2, 0), p(1, 10), p(1, 20), p(3, 40)];
        let h = History::new(&purchases, 30 * 86_400);
        assert_eq!(h.baskets.len(), 3, "day 40 is in the future");
        let one = h.items.iter().find(|x| x.item == 1).unwrap();
        assert_eq!((one.purchases, one.period_days()), (3, Some(10.0)));
        let f = h.features(one, 30 * 86_400, 0.5);
        assert!((f.0[0] - 3f32.ln()).abs() < 1e-6);
        assert!((f.0[1] - 10f32.ln_1p()).abs() < 1e-6);
        assert!((f.0[2] - 1.0).abs() < 1e-6, "in every basket");
        assert_eq!(f.0[4], 1.0);
        assert!(f.0[5].abs() < 1e-6, "due now: 10 days since, every 10 days");
        let two = h.items.iter().find(|x| x.item == 2).unwrap();
        assert_eq!(h.features(two, 30 * 86_400, 0.5).0[4], 0.0);
        // Baskets after the first: days 10 and 20 both re-buy item 1.
        assert_eq!(rebuy_baskets(&purchases, 30 * 86_400), (2, 2));
        let r = h.repeat_share(&purchases, 30 * 86_400);
        assert!(
            (r - (2.0 + DEFAULT_REPEAT_SHARE * PRIOR_BASKETS) / (2.0 + PRIOR_BASKETS)).abs()
                < 1e-12
        );
    }

    #[test]
    fn the_default_ranks_a_staple_above_a_one_off() {
        let purchases = [p(1, 0), p(2, 0), p(1, 10), p(1, 20)];
        let now = 30 * 86_400;
        let h = History::new(&purchases, now);
        let pop = vec![0.5; 3];
        let scores = buy_again(&h, now, &pop, &DEFAULT_WEIGHTS);
        let s = |i| scores.iter().find(|x| x.0 == i).unwrap().1;
        assert!(s(1) > s(2), "{scores:?}");
    }

    #[test]
    fn adapting_learns_a_habit_the_default_does_not_know() {
        // A shopper who always re-buys their least popular past item: the
        // popularity weight must fall.
        let pop = vec![0.9, 0.1, 0.9, 0.1];
        let mut purchases = Vec::new();
        for week in 0..12 {
            purchases.push(p(0, week * 7));
            purchases.push(p(1, week * 7));
            if week % 2 == 0 {
                purchases.push(p(2, week * 7 + 1));
            }
        }
        let choices = own_choices(&purchases, 100 * 86_400, &pop);
        assert!(choices.len() >= MIN_REBUYS_TO_ADAPT);
        let w = adapt(&choices, &DEFAULT_WEIGHTS, DEFAULT_L2, 50);
        assert!(w.iter().all(|x| x.is_finite()));
        assert_ne!(w, DEFAULT_WEIGHTS);
        // Few re-buys: the default as it is.
        assert_eq!(
            device_weights(&purchases[..4], 100 * 86_400, &pop),
            DEFAULT_WEIGHTS
        );
    }

    #[test]
    fn the_blend_is_a_mixture_of_the_two_rows() {
        let rebuy = [(0_u32, 1.0_f32), (1, 0.0)];
        let discover = [0.0, 0.0, 3.0, 1.0, -1.0];
        let t = Blend::DEFAULT;
        let all_rebuy = blend(&rebuy, &discover, 1.0, &t);
        assert!(all_rebuy[2] == 0.0 && all_rebuy[0] > all_rebuy[1]);
        let all_new = blend(&rebuy, &discover, 0.0, &t);
        assert!(all_new[0] == 0.0 && all_new[2] > all_new[3] && all_new[3] > all_new[4]);
        let half = blend(&rebuy, &discover, 0.5, &t);
        let total: f32 = half.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "a distribution: {half:?}");
        let past: f32 = half[0] + half[1];
        assert!((past - 0.5).abs() < 1e-5);
    }

    #[test]
    fn percentiles_are_scale_free() {
        let p = percentiles(&[5.0, 1.0, 3.0, 3.0]);
        assert_eq!(p, vec![1.0, 0.0, 0.5, 0.5]);
        assert_eq!(percentiles(&[2.0]), vec![1.0]);
    }
}
