//! Streaming aggregation: one running weighted sum per round, and summed
//! evaluation counts.
//!
//! Memory does not grow with the cohort: an update is folded into the sum
//! straight from its encoded bytes (the buffer the service received it in)
//! and then dropped.
//!
//! The sum is kept in `f32`, the same type as the model and the wire, so that
//! [`tensor::fold_into`] folds without conversion. The rounding error of a
//! sequential `f32` sum of `n` terms is at most about `n · 6e-8` relative
//! (typically `√n · 6e-8`): about `1e-4` for a thousand devices, far below the
//! noise of the devices' local SGD steps. The total weight is exact (an
//! integer count held in `u64`), and the division by it is done in `f64`.

use fedrec_proto::secagg::payload::Totals;
use fedrec_proto::tensor::{self, TensorError};

use crate::CoordinatorError;
use crate::config::Aggregation;

/// Updates one sum can hold (2^20): with [`MAX_WEIGHTED_VALUE`], the bound
/// that keeps the `f32` sum finite.
pub const MAX_UPDATES: usize = 1 << 20;

/// Largest magnitude of `weight × value` accepted (about 1.6e32): `MAX_UPDATES`
/// such terms sum to at most half of `f32::MAX`. Real updates are many orders
/// of magnitude smaller.
pub const MAX_WEIGHTED_VALUE: f32 = f32::MAX / (2.0 * MAX_UPDATES as f32);

fn decode(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The error for the first value of `bytes` that fails the check of
/// [`Aggregator::add`] (only called once the check has failed).
fn first_bad_value(bytes: &[u8], w: f32) -> CoordinatorError {
    for (index, b) in bytes.chunks_exact(4).enumerate() {
        let value = decode(b);
        if !value.is_finite() {
            return TensorError::NotFinite { index, value }.into();
        }
        if (w * value).abs() > MAX_WEIGHTED_VALUE {
            return CoordinatorError::Overflow { index, value };
        }
    }
    CoordinatorError::Internal("a value failed the range check but none is out of range".into())
}

/// A running weighted sum of dense updates; or, under a robust
/// [`Aggregation`], every update of the round, combined at the end.
#[derive(Clone, Debug)]
pub struct Aggregator {
    sum: Vec<f32>,
    total_weight: u64,
    count: usize,
    /// Updates that [`add_clipped`](Self::add_clipped) found within the bound.
    within_clip: u64,
    rule: Aggregation,
    trim_fraction: f64,
    /// Under a robust rule: the (scaled) updates of the round.
    kept: Vec<Vec<f32>>,
}

impl Aggregator {
    /// An empty sum for updates of `num_values` values.
    pub fn new(num_values: usize) -> Self {
        Self::with_rule(num_values, Aggregation::Mean, 0.0)
    }

    /// An empty aggregate under `rule`; `trim_fraction` is used by
    /// [`Aggregation::TrimmedMean`]. The robust rules keep every update
    /// (4 bytes per value each) until the round ends.
    pub fn with_rule(num_values: usize, rule: Aggregation, trim_fraction: f64) -> Self {
        Self {
            sum: vec![0.0; num_values],
            total_weight: 0,
            count: 0,
            within_clip: 0,
            rule,
            trim_fraction,
            kept: Vec::new(),
        }
    }

    /// Checks the encoded update and, only if every check passes, adds
    /// `weight × update` to the sum. A rejected update leaves the sum untouched.
    ///
    /// Rejected: a byte length that is not a multiple of 4 or not 4 values per
    /// parameter, a NaN or infinite value, a weighted value beyond
    /// [`MAX_WEIGHTED_VALUE`] (which could make the sum overflow), a zero
    /// weight, and more than [`MAX_UPDATES`] updates in one sum.
    ///
    /// Two passes over the bytes, neither with a branch per value, so both
    /// vectorize: a check of every weighted value against the bound, then the
    /// fold. The bound makes the second pass safe without looking at the sum:
    /// `MAX_UPDATES` terms of at most `MAX_WEIGHTED_VALUE` cannot overflow `f32`.
    pub fn add(&mut self, bytes: &[u8], weight: u64) -> Result<(), CoordinatorError> {
        self.add_discounted(bytes, None, weight, 1.0, 0)
    }

    /// Like [`add`](Self::add), but first scales the update down to L2
    /// norm at most `clip` (DP-FedAvg's clipping, or norm bounding); counts
    /// it as within the bound when it needed no scaling.
    pub fn add_clipped(
        &mut self,
        bytes: &[u8],
        clip: f32,
        weight: u64,
    ) -> Result<(), CoordinatorError> {
        self.add_discounted(bytes, Some(clip), weight, 1.0, 0)
    }

    /// The general form of [`add`](Self::add) and
    /// [`add_clipped`](Self::add_clipped): adds `discount × weight × update`
    /// (clipped first when `clip` is given) to the sum but the full `weight`
    /// to the total weight, so a discounted update pulls the mean less
    /// (async mode's staleness weighting, FedBuff's `s(τ)`). The discount
    /// applies to the first `discounted` values (the model's); values after
    /// them (a strategy's statistics, such as the `als` step's `x xᵀ`)
    /// describe the devices rather than a step and are not discounted
    /// (clipping, when asked, scales the whole update).
    pub fn add_discounted(
        &mut self,
        bytes: &[u8],
        clip: Option<f32>,
        weight: u64,
        discount: f32,
        discounted: usize,
    ) -> Result<(), CoordinatorError> {
        if weight == 0 {
            return Err(CoordinatorError::ZeroExamples);
        }
        let (scale, within) = match clip {
            Some(clip) => {
                self.check_shape(bytes)?;
                // Non-finite values make the norm non-finite: `add_scaled`
                // then names the first bad value.
                let norm = bytes
                    .chunks_exact(4)
                    .map(|b| f64::from(decode(b)).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let within = norm <= f64::from(clip);
                let scale = if within || !norm.is_finite() {
                    1.0
                } else {
                    (f64::from(clip) / norm) as f32
                };
                (scale, Some(within))
            }
            None => (1.0, None),
        };
        let w = scale * weight as f32;
        let head = (4 * discounted).min(bytes.len());
        self.add_scaled(bytes, (discount * w, head, w), weight)?;
        if let Some(within) = within {
            self.within_clip += u64::from(within);
        }
        Ok(())
    }

    fn check_shape(&self, bytes: &[u8]) -> Result<(), CoordinatorError> {
        if !bytes.len().is_multiple_of(4) {
            return Err(TensorError::Misaligned(bytes.len()).into());
        }
        if bytes.len() / 4 != self.sum.len() {
            return Err(TensorError::WrongLength {
                expected: self.sum.len(),
                got: bytes.len() / 4,
            }
            .into());
        }
        Ok(())
    }

    /// Adds `w × update` (checked) and `weight` to the total weight, where
    /// `w` is `w_head` for the first `head` bytes and `w_tail` after them.
    fn add_scaled(
        &mut self,
        bytes: &[u8],
        (w_head, head, w_tail): (f32, usize, f32),
        weight: u64,
    ) -> Result<(), CoordinatorError> {
        self.check_shape(bytes)?;
        if self.count >= MAX_UPDATES {
            return Err(CoordinatorError::Malformed(format!(
                "the round already holds the maximum of {MAX_UPDATES} updates"
            )));
        }
        let total_weight = self.total_weight.checked_add(weight).ok_or_else(|| {
            CoordinatorError::Malformed(format!(
                "num_examples {weight} overflows the round's total weight"
            ))
        })?;
        // Checked against the larger weight; `!(x <= bound)` also catches
        // NaN, and ±inf exceeds any bound.
        let w = w_head.abs().max(w_tail.abs());
        if !tensor::all_values(bytes, |v| (w * v).abs() <= MAX_WEIGHTED_VALUE) {
            return Err(first_bad_value(bytes, w));
        }
        let (head_bytes, tail_bytes) = bytes.split_at(head);
        if self.rule == Aggregation::Mean {
            let (sum_head, sum_tail) = self.sum.split_at_mut(head / 4);
            tensor::fold_into(sum_head, head_bytes, w_head)?;
            tensor::fold_into(sum_tail, tail_bytes, w_tail)?;
        } else {
            // Robust rules weigh every update the same: undo the weight.
            let (scale_head, scale_tail) = (w_head / weight as f32, w_tail / weight as f32);
            let mut update = tensor::decode(bytes)?;
            let (h, t) = update.split_at_mut(head / 4);
            h.iter_mut().for_each(|v| *v *= scale_head);
            t.iter_mut().for_each(|v| *v *= scale_tail);
            self.kept.push(update);
        }
        self.total_weight = total_weight;
        self.count += 1;
        Ok(())
    }

    /// Number of updates folded in.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the updates' weights.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// The weighted mean of the updates, or `None` when there are none.
    pub fn mean(&self) -> Option<Vec<f32>> {
        if self.count == 0 {
            return None;
        }
        let total = self.total_weight as f64;
        Some(
            self.sum
                .iter()
                .map(|s| (f64::from(*s) / total) as f32)
                .collect(),
        )
    }

    /// The sum, total weight and clipping count, or `None` when no update
    /// was added. Under a robust rule, the combined update times the count
    /// over a weight of the count (so that [`Totals::mean`] is the result).
    pub fn totals(&self) -> Option<Totals> {
        if self.count == 0 {
            return None;
        }
        let (weighted_sum, weight) = match self.rule {
            Aggregation::Mean => (self.sum.clone(), self.total_weight as f64),
            rule => {
                let n = self.kept.len();
                let trim = match rule {
                    Aggregation::TrimmedMean => (self.trim_fraction * n as f64).floor() as usize,
                    _ => 0,
                };
                let mut column = Vec::with_capacity(n);
                let center = (0..self.sum.len())
                    .map(|j| {
                        column.clear();
                        column.extend(self.kept.iter().map(|u| u[j]));
                        let value = if rule == Aggregation::Median {
                            median(&mut column)
                        } else {
                            column.sort_unstable_by(f32::total_cmp);
                            let kept = &column[trim..n - trim];
                            (kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64)
                                as f32
                        };
                        value * n as f32
                    })
                    .collect();
                (center, n as f64)
            }
        };
        Some(Totals {
            weighted_sum,
            weight,
            counts: EvalCounts::default(),
            within_clip: self.within_clip as f64,
        })
    }

    /// Empties the sum for the next round, keeping its allocation.
    pub fn reset(&mut self) {
        self.sum.fill(0.0);
        self.total_weight = 0;
        self.count = 0;
        self.within_clip = 0;
        self.kept.clear();
    }
}

/// The median of `values` (the mean of the two middle ones for an even
/// count); reorders them.
fn median(values: &mut [f32]) -> f32 {
    let n = values.len();
    let (_, upper, _) = values.select_nth_unstable_by(n / 2, f32::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        return upper;
    }
    let lower = values[..n / 2]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    (lower + upper) / 2.0
}

pub use fedrec_proto::EvalCounts;

/// Checks that every count is finite, non-negative and at most `users`
/// (a user contributes at most one hit and an NDCG of at most 1).
pub fn validate_counts(counts: &EvalCounts) -> Result<(), CoordinatorError> {
    let users = counts.users as f64;
    for (field, value) in [
        ("hits_full", counts.hits_full),
        ("ndcg_full", counts.ndcg_full),
        ("hits_sampled", counts.hits_sampled),
        ("ndcg_sampled", counts.ndcg_sampled),
    ] {
        if !(value.is_finite() && value >= 0.0 && value <= users) {
            return Err(CoordinatorError::BadEvaluation {
                field,
                value,
                users: counts.users,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedrec_proto::tensor::encode;

    #[test]
    fn weighted_mean() {
        let mut agg = Aggregator::new(2);
        assert_eq!(agg.mean(), None);
        agg.add(&encode(&[1.0, 2.0]), 1).unwrap();
        agg.add(&encode(&[-1.0, 0.5]), 3).unwrap();
        assert_eq!(agg.count(), 2);
        assert_eq!(agg.total_weight(), 4);
        // (1·[1, 2] + 3·[-1, 0.5]) / 4 = [-0.5, 0.875]
        assert_eq!(agg.mean().unwrap(), vec![-0.5, 0.875]);
        agg.reset();
        assert_eq!(agg.mean(), None);
    }

    #[test]
    fn a_discount_scales_the_model_values_only() {
        // Two model values, then one statistic (the als step's x xᵀ).
        let mut agg = Aggregator::new(3);
        agg.add_discounted(&encode(&[2.0, 4.0, 8.0]), None, 1, 0.5, 2)
            .unwrap();
        agg.add(&encode(&[0.0, 0.0, 0.0]), 1).unwrap();
        // ([1, 2, 8] + [0, 0, 0]) / 2: the weight counts in full.
        assert_eq!(agg.mean().unwrap(), vec![0.5, 1.0, 4.0]);
        let mut robust = Aggregator::with_rule(3, Aggregation::Median, 0.0);
        robust
            .add_discounted(&encode(&[2.0, 4.0, 8.0]), None, 3, 0.5, 2)
            .unwrap();
        assert_eq!(robust.kept, vec![vec![1.0, 2.0, 8.0]]);
    }

    #[test]
    fn rejected_updates_leave_the_sum_untouched() {
        let mut agg = Aggregator::new(2);
        agg.add(&encode(&[1.0, 1.0]), 2).unwrap();
        let cases: Vec<(Vec<u8>, u64, &str)> = vec![
            (encode(&[1.0, 1.0]).to_vec(), 0, "zero_examples"),
            (vec![0; 7], 1, "misaligned"),
            (encode(&[1.0]).to_vec(), 1, "wrong_length"),
            (encode(&[1.0, f32::NAN]).to_vec(), 1, "not_finite"),
            (encode(&[f32::NEG_INFINITY, 1.0]).to_vec(), 1, "not_finite"),
            (encode(&[1.0, f32::MAX]).to_vec(), 4, "overflow"),
            (encode(&[1.0, 1.0]).to_vec(), u64::MAX, "malformed"),
        ];
        for (bytes, weight, reason) in cases {
            let err = agg.add(&bytes, weight).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
            assert_eq!(agg.count(), 1);
            assert_eq!(agg.mean().unwrap(), vec![1.0, 1.0]);
        }
        agg.add(&encode(&[3.0, -1.0]), 2).unwrap();
        assert_eq!(agg.mean().unwrap(), vec![2.0, 0.0]);
    }

    #[test]
    fn eval_counts() {
        let mut total = EvalCounts::default();
        let one = EvalCounts {
            users: 1,
            hits_full: 1.0,
            ndcg_full: 0.5,
            hits_sampled: 1.0,
            ndcg_sampled: 1.0,
        };
        validate_counts(&one).unwrap();
        total.add(&one);
        total.add(&EvalCounts {
            users: 1,
            ..EvalCounts::default()
        });
        assert_eq!(total.hit_rate_full(), Some(0.5));
        assert_eq!(total.ndcg_full_mean(), Some(0.25));
        assert_eq!(EvalCounts::default().hit_rate_full(), None);

        let bad = EvalCounts {
            users: 1,
            ndcg_full: f64::NAN,
            ..EvalCounts::default()
        };
        assert!(
            validate_counts(&bad)
                .unwrap_err()
                .to_string()
                .contains("ndcg_full")
        );
        let bad = EvalCounts {
            users: 1,
            hits_sampled: -1.0,
            ..EvalCounts::default()
        };
        assert_eq!(
            validate_counts(&bad).unwrap_err().reason(),
            "bad_evaluation"
        );
        let bad = EvalCounts {
            users: 0,
            hits_full: 1.0,
            ..EvalCounts::default()
        };
        assert!(validate_counts(&bad).is_err());
    }
}

#[cfg(test)]
mod robust_tests {
    use super::*;
    use fedrec_proto::tensor::encode;

    fn combined(rule: Aggregation, trim: f64, updates: &[[f32; 2]]) -> Vec<f32> {
        let mut agg = Aggregator::with_rule(2, rule, trim);
        for (i, u) in updates.iter().enumerate() {
            // Weights are ignored by the robust rules.
            agg.add(&encode(u), i as u64 + 1).unwrap();
        }
        agg.totals().unwrap().mean()
    }

    #[test]
    fn median_and_trimmed_mean_ignore_a_few_wild_updates() {
        let mut updates = vec![[1.0, -1.0]; 9];
        updates[3] = [1e6, -1e6];
        updates.push([-5e5, 3e7]);
        let median = combined(Aggregation::Median, 0.0, &updates);
        assert_eq!(median, vec![1.0, -1.0]);
        let trimmed = combined(Aggregation::TrimmedMean, 0.1, &updates);
        assert_eq!(trimmed, vec![1.0, -1.0]);
        let mean = combined(Aggregation::Mean, 0.0, &updates);
        assert!(mean[0].abs() > 1e4, "the mean is pulled away: {mean:?}");
    }

    #[test]
    fn median_of_an_even_count_is_the_middle_mean_and_trim_zero_is_the_mean() {
        assert_eq!(
            combined(Aggregation::Median, 0.0, &[[1.0, 4.0], [3.0, 2.0]]),
            vec![2.0, 3.0]
        );
        assert_eq!(
            combined(
                Aggregation::TrimmedMean,
                0.0,
                &[[1.0, 4.0], [3.0, 2.0], [5.0, 0.0]]
            ),
            vec![3.0, 2.0]
        );
    }

    #[test]
    fn norm_bounding_caps_each_update_and_keeps_its_direction() {
        let mut agg = Aggregator::new(2);
        agg.add_clipped(&encode(&[30.0, 40.0]), 5.0, 1).unwrap();
        agg.add_clipped(&encode(&[0.3, 0.4]), 5.0, 1).unwrap();
        let t = agg.totals().unwrap();
        assert_eq!(t.weighted_sum, vec![3.3, 4.4]);
        assert_eq!(t.within_clip, 1.0);
        // A rejected update leaves the aggregate untouched.
        assert!(agg.add_clipped(&encode(&[f32::NAN, 0.0]), 5.0, 1).is_err());
        assert_eq!(agg.count(), 2);
    }
}
