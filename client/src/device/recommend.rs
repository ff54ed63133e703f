//! The device's recommendations: its rows (buy-again, discover, blended),
//! explanations and list evaluation (the types and the diversity ranking
//! are in [`crate::recommend`]).

use super::Device;
use crate::consent::Consent;
use crate::error::ClientError;
use crate::model::LocalTraining;
use crate::ranking;
use crate::recommend::*;

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
        let mut buy_again = ranking::top_k(&rows.buy_again, &[], k.min(exclude.len()));
        buy_again.retain(|i| exclude.binary_search(i).is_ok());
        Ok(Recommendations {
            items,
            buy_again,
            blended: ranking::top_k(&rows.blended, &[], k),
            basis,
        })
    }

    /// The rows before any global model is on the device (offline after a
    /// restart, or before the first download): the buy-again row from the
    /// shopper's own purchases when the consent and a history allow it
    /// (every item equally popular: popularity comes with the model),
    /// blended equal to it, and nothing to discover.
    pub fn recommendations_without_model(&self, k: usize) -> Recommendations {
        let history = self.history();
        let basis = self.basis_for(&history);
        let mut buy_again = Vec::new();
        if basis == Basis::Personal && self.shaped {
            use crate::repeat;
            let now = self.clock.unix_now().saturating_add(1);
            let purchases = self.used_purchases();
            let flat = vec![0.5_f32; self.model.items()];
            let past = repeat::History::new(&purchases, now);
            let weights = repeat::device_weights(&purchases, now, &flat);
            let mut rebuy = repeat::buy_again(&past, now, &flat, &weights);
            rebuy.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            buy_again = rebuy.into_iter().take(k).map(|(item, _)| item).collect();
        }
        Recommendations {
            items: Vec::new(),
            blended: buy_again.clone(),
            buy_again,
            basis,
        }
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
        cfg: &LocalTraining,
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
            Some(rank) => (ranking::hit_at(rank, k), ranking::ndcg_at(rank, k)),
            None => (0.0, 0.0),
        });
        Ok(ListEvaluation { items, hit_ndcg })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::Consent;
    use std::sync::Arc;

    use crate::clock::ManualClock;
    use crate::exclusion::Exclusion;
    use crate::model::{Loss, MatrixFactorization, Model};
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
        let cfg = LocalTraining {
            loss: Loss::Als,
            ..LocalTraining::default()
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
        let why = d.explain(&global, 3, &LocalTraining::default()).unwrap();
        assert_eq!(why.text(), "you buy this about every 14 days");
        let once = d.explain(&global, 4, &LocalTraining::default()).unwrap();
        assert_eq!(once.text(), "you bought this 50 days ago");
        let new = d
            .explain(&global, recs.items[0], &LocalTraining::default())
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
