//! What a device feeds into secure aggregation, and how the coordinator reads
//! the sum: the device's update, its weight and its evaluation counts, in one
//! vector of `num_values + EXTRA_VALUES` values that are masked together.
//!
//! | values | content |
//! |---|---|
//! | `0..n` | the update, each value clipped to `[-range, range]`, times the weight `w` |
//! | `n` | `w · range` |
//! | `n + 1 ..= n + 5` | the evaluation counts (users, hits and NDCG@10 under full and sampled ranking), each times `range` |
//! | `n + 6` | under adaptive clipping, whether the update was within the clipping bound (1 or 0, plus the device's share of the count noise under distributed DP), times `range / INDICATOR_SPAN` |
//!
//! **Weighting.** The coordinator only learns sums, so it cannot weigh each
//! update by its device's example count after the fact. Each device
//! therefore scales its own (clipped) update by its weight and adds the
//! weight as one more value; the coordinator divides the summed updates by
//! the summed weight. That is FedAvg's weighted mean, and the coordinator
//! learns only the cohort's total weight, not each device's count. The
//! weight must lie in `(0, 1]` to stay within the quantizer's range:
//! [`Weighting::Examples`] uses `min(examples, max_examples) / max_examples`
//! (devices with more examples than the cap count as the cap), and
//! [`Weighting::Uniform`] uses 1.
//!
//! **Precision.** Every value carries an error of at most half a quantization
//! step, `range / (2^bits − 2)`. A device of weight `w` has its update
//! scaled down by `w`, so its update's relative precision is `w` times
//! coarser; the weighted mean's error per value is at most
//! `count / total_weight · range / (2^bits − 2)` (uniform: `range /
//! (2^bits − 2)`, about `1e-6 · range` at 20 bits).
//!
//! **Evaluation counts** are masked with the update, so the coordinator
//! learns the cohort's totals only (in the plain protocol each device's
//! counts are visible). Each count of one device lies in `[0, 1]`.
//!
//! ```
//! use fedrec_proto::secagg::payload::{self, Weighting};
//! use fedrec_proto::secagg::Quantizer;
//! use fedrec_proto::EvalCounts;
//!
//! let q = Quantizer::new(0.5, 20).unwrap();
//! let rule = Weighting::Examples { max_examples: 100 };
//! let a = payload::encode(&[0.2, -0.1], 50, None, rule, q.range(), 0.0);
//! let hit = EvalCounts { users: 1, hits_full: 1.0, ndcg_full: 0.5, ..EvalCounts::default() };
//! let b = payload::encode(&[0.4, 0.9], 100, Some(&hit), rule, q.range(), 0.0); // 0.9 is clipped to 0.5
//! let mut sum = vec![0_u32; a.len()];
//! q.add_quantized(&a, &mut sum).unwrap();
//! q.add_quantized(&b, &mut sum).unwrap();
//! let mut decoded = vec![0.0; sum.len()];
//! q.decode_sum(&sum, 2, &mut decoded).unwrap();
//! let total = payload::decode(&decoded, 2, rule, q.range()).unwrap();
//! assert!((total.weight - 1.5).abs() < 1e-5);
//! let mean = total.mean();
//! assert!((mean[0] - (0.5 * 0.2 + 0.4) / 1.5).abs() < 1e-5);
//! assert!((mean[1] - (0.5 * -0.1 + 0.5) / 1.5).abs() < 1e-5);
//! assert_eq!(total.counts.users, 1);
//! assert!((total.counts.ndcg_full - 0.5).abs() < 1e-5);
//! ```

use crate::EvalCounts;

use super::SecAggError;

/// Values appended to the update: the weight, five evaluation counts and
/// the clipping indicator.
pub const EXTRA_VALUES: usize = 7;

/// The clipping indicator is scaled down by this much, so that a noisy one
/// (distributed DP adds a Gaussian share to it) fits the quantizer's range:
/// it is clamped to `[-INDICATOR_SPAN, INDICATOR_SPAN]`.
pub const INDICATOR_SPAN: f32 = 16.0;

/// How a device weighs its update in the cohort's mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weighting {
    /// Every update counts once: the mean of the updates.
    Uniform,
    /// By the device's number of examples, capped at `max_examples` (FedAvg).
    Examples {
        /// The cap; at least 1.
        max_examples: u64,
    },
}

impl Weighting {
    /// The weight, in `[0, 1]`, of a device with `examples` examples.
    pub fn weight(self, examples: u64) -> f32 {
        match self {
            Self::Uniform => 1.0,
            Self::Examples { max_examples } => {
                let max = max_examples.max(1);
                (examples.min(max) as f64 / max as f64) as f32
            }
        }
    }
}

/// The values a device masks: its update clipped to `[-range, range]` and
/// scaled by its weight, then the weight and its evaluation counts (zero
/// without counts), each times `range`, and the clipping indicator
/// `within_clip` (0 when unused). Non-finite update values are kept as
/// they are, for the quantizer to refuse.
pub fn encode(
    update: &[f32],
    examples: u64,
    counts: Option<&EvalCounts>,
    weighting: Weighting,
    range: f32,
    within_clip: f32,
) -> Vec<f32> {
    let w = weighting.weight(examples);
    let mut out = Vec::with_capacity(update.len() + EXTRA_VALUES);
    out.extend(update.iter().map(|v| {
        if v.is_finite() {
            v.clamp(-range, range) * w
        } else {
            *v
        }
    }));
    let c = counts.copied().unwrap_or_default();
    let unit = |x: f64| (x.clamp(0.0, 1.0) as f32) * range;
    out.extend([
        w * range,
        unit(c.users as f64),
        unit(c.hits_full),
        unit(c.ndcg_full),
        unit(c.hits_sampled),
        unit(c.ndcg_sampled),
        within_clip.clamp(-INDICATOR_SPAN, INDICATOR_SPAN) * (range / INDICATOR_SPAN),
    ]);
    out
}

/// The cohort's totals, read from a decoded sum.
#[derive(Clone, Debug, PartialEq)]
pub struct Totals {
    /// The sum of the weighted, clipped updates.
    pub weighted_sum: Vec<f32>,
    /// The sum of the weights (for [`Weighting::Uniform`], exactly the
    /// number of updates).
    pub weight: f64,
    /// The summed evaluation counts.
    pub counts: EvalCounts,
    /// The summed clipping indicators: the count of updates within the
    /// clipping bound (plus the devices' noise under distributed DP).
    pub within_clip: f64,
}

impl Totals {
    /// The weighted mean update: the weighted sum over the summed weight.
    pub fn mean(&self) -> Vec<f32> {
        self.weighted_sum
            .iter()
            .map(|s| (f64::from(*s) / self.weight) as f32)
            .collect()
    }
}

/// Reads the totals from `decoded`, the decoded sum of `count` inputs made
/// by [`encode`]. Refuses a vector too short to hold the extra values, and
/// a total weight that is not positive (nothing to average).
pub fn decode(
    decoded: &[f32],
    count: usize,
    weighting: Weighting,
    range: f32,
) -> Result<Totals, SecAggError> {
    let Some(n) = decoded.len().checked_sub(EXTRA_VALUES) else {
        return Err(SecAggError::WrongLength {
            expected: EXTRA_VALUES,
            got: decoded.len(),
        });
    };
    let extra = &decoded[n..];
    let unit = |x: f32| f64::from(x) / f64::from(range);
    let weight = match weighting {
        Weighting::Uniform => count as f64,
        Weighting::Examples { .. } => unit(extra[0]),
    };
    if !(weight > 0.0 && weight.is_finite()) {
        return Err(SecAggError::Malformed(format!(
            "the summed weight of {count} updates is {weight}, not positive"
        )));
    }
    // Counts of honest devices are whole or in [0, 1] each: round the user
    // count, and keep the others within what `users` devices can report.
    let users = unit(extra[1]).round().clamp(0.0, count as f64);
    let bounded = |x: f32| unit(x).clamp(0.0, users);
    Ok(Totals {
        weighted_sum: decoded[..n].to_vec(),
        weight,
        counts: EvalCounts {
            users: users as u64,
            hits_full: bounded(extra[2]),
            ndcg_full: bounded(extra[3]),
            hits_sampled: bounded(extra[4]),
            ndcg_sampled: bounded(extra[5]),
        },
        within_clip: f64::from(extra[6]) * f64::from(INDICATOR_SPAN) / f64::from(range),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::Quantizer;

    #[test]
    fn weights_are_capped_fractions() {
        let rule = Weighting::Examples { max_examples: 200 };
        assert_eq!(rule.weight(50), 0.25);
        assert_eq!(rule.weight(200), 1.0);
        assert_eq!(rule.weight(5000), 1.0);
        assert_eq!(rule.weight(0), 0.0);
        assert_eq!(Weighting::Uniform.weight(5000), 1.0);
        assert_eq!(Weighting::Examples { max_examples: 0 }.weight(3), 1.0);
    }

    #[test]
    fn encode_clips_then_scales_and_appends() {
        let rule = Weighting::Examples { max_examples: 4 };
        let v = encode(&[3.0, -0.5, f32::NAN], 2, None, rule, 1.0, 1.0);
        assert_eq!(v[..2], [0.5, -0.25]);
        assert!(v[2].is_nan());
        assert_eq!(v[3..], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0 / INDICATOR_SPAN]);
        let noisy = encode(&[0.0], 1, None, rule, 1.0, -40.0);
        assert_eq!(
            noisy[EXTRA_VALUES], -1.0,
            "a noisy indicator is clamped to the span"
        );
    }

    #[test]
    fn mean_is_the_weighted_mean_within_the_stated_error() {
        let q = Quantizer::new(0.1, 16).unwrap();
        let rule = Weighting::Examples { max_examples: 10 };
        let updates = [
            (vec![0.05_f32, -0.02, 0.3], 3_u64),
            (vec![-0.01, 0.04, -0.3], 10),
            (vec![0.0, 0.1, 0.02], 7),
        ];
        let mut sum = vec![0_u32; 3 + EXTRA_VALUES];
        let counts = EvalCounts {
            users: 1,
            hits_full: 1.0,
            ndcg_full: 0.63,
            hits_sampled: 1.0,
            ndcg_sampled: 1.0,
        };
        for (i, (u, e)) in updates.iter().enumerate() {
            let within = if i == 1 { 0.0 } else { 1.0 };
            let x = encode(u, *e, Some(&counts), rule, q.range(), within);
            q.add_quantized(&x, &mut sum).unwrap();
        }
        let mut decoded = vec![0.0; sum.len()];
        q.decode_sum(&sum, 3, &mut decoded).unwrap();
        let totals = decode(&decoded, 3, rule, q.range()).unwrap();
        assert!((totals.weight - 2.0).abs() < 1e-3, "{}", totals.weight);
        assert_eq!(totals.counts.users, 3);
        assert!((totals.counts.ndcg_full - 1.89).abs() < 1e-3);
        assert!(
            (totals.within_clip - 2.0).abs() < 1e-3,
            "{}",
            totals.within_clip
        );
        let mean = totals.mean();
        let total_weight: f64 = updates.iter().map(|(_, e)| *e as f64 / 10.0).sum();
        for (i, m) in mean.iter().enumerate() {
            let exact: f64 = updates
                .iter()
                .map(|(u, e)| f64::from(u[i].clamp(-0.1, 0.1)) * *e as f64 / 10.0)
                .sum::<f64>()
                / total_weight;
            let bound = 3.0 / total_weight * q.max_error() * 1.01 + 1e-6;
            assert!(
                (f64::from(*m) - exact).abs() <= bound,
                "{i}: {m} vs {exact}"
            );
        }
        let err = decode(&decoded[..3], 3, rule, 0.1).unwrap_err();
        assert_eq!(err.reason(), "wrong_length");
        let zero = vec![0.0; 4 + EXTRA_VALUES];
        assert!(decode(&zero, 2, rule, 0.1).is_err());
        assert_eq!(
            decode(&zero, 2, Weighting::Uniform, 0.1).unwrap().weight,
            2.0
        );
    }
}
