//! Differential privacy on the device (user-level DP-FedAvg): before an
//! update leaves, it is scaled down to the task's L2 bound and, in the
//! distributed mode, given its share of the Gaussian noise.
//!
//! The coordinator sizes the share so that the sum of the fewest updates it
//! will ever decode carries noise of standard deviation `z · C`; the device
//! only applies what the task says (a malformed task is refused when it is
//! converted, see [`crate::task`]).

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// What the task asks the device to do to its update; made from the wire
/// task's, checked, by the [`Task`](crate::task::Task) conversion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSpec {
    /// The update's L2 norm is scaled down to at most this.
    pub clip: f32,
    /// Standard deviation of the Gaussian noise added to every value of the
    /// clipped update (0: the coordinator adds the noise).
    pub noise_std: f32,
    /// Under adaptive clipping: report whether the update was within the
    /// bound, plus Gaussian noise of this standard deviation.
    pub count_noise_std: Option<f32>,
}

/// Scales `update` down to L2 norm at most `spec.clip` and adds the noise.
/// Returns the clipping indicator to report (1 when the update was within
/// the bound, else 0, plus its noise), or 0 when it is not reported.
pub fn privatize(update: &mut [f32], spec: &DpSpec, rng: &mut impl Rng) -> f32 {
    let norm = update
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    let clip = f64::from(spec.clip);
    let within = norm <= clip;
    if !within {
        let scale = if norm.is_finite() { clip / norm } else { 0.0 };
        for v in update.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
    if let Some(normal) = normal(spec.noise_std) {
        for v in update.iter_mut() {
            *v += normal.sample(rng);
        }
    }
    match spec.count_noise_std {
        Some(std) => {
            let indicator = if within { 1.0 } else { 0.0 };
            indicator + normal(std).map_or(0.0, |n| n.sample(rng))
        }
        None => 0.0,
    }
}

fn normal(std: f32) -> Option<Normal<f32>> {
    (std > 0.0).then(|| Normal::new(0.0, std).expect("a finite, positive std"))
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn no_update_leaves_longer_than_the_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..500 {
            let len = 1 + case % 40;
            let scale = 10f32.powi((case % 9) - 4);
            let mut update: Vec<f32> = (0..len)
                .map(|_| (rng.random::<f32>() - 0.5) * scale)
                .collect();
            let before = update.clone();
            let clip = 10f32.powi((case % 5) - 2);
            let spec = DpSpec {
                clip,
                noise_std: 0.0,
                count_noise_std: Some(0.0),
            };
            let within = privatize(&mut update, &spec, &mut rng);
            assert!(
                norm(&update) <= f64::from(clip) * (1.0 + 1e-6),
                "case {case}"
            );
            let was_within = norm(&before) <= f64::from(clip);
            assert_eq!(within, if was_within { 1.0 } else { 0.0 }, "case {case}");
            if was_within {
                assert_eq!(update, before, "an update within the bound is untouched");
            } else {
                // Scaled, not truncated: the direction is kept.
                let ratio = f64::from(clip) / norm(&before);
                for (u, b) in update.iter().zip(&before) {
                    let want = ratio * f64::from(*b);
                    assert!((f64::from(*u) - want).abs() <= 1e-6 * want.abs() + 1e-30);
                }
            }
        }
    }

    #[test]
    fn the_device_noise_has_the_stated_deviation() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 200_000;
        let mut update = vec![0.0_f32; n];
        let spec = DpSpec {
            clip: 1.0,
            noise_std: 0.25,
            count_noise_std: None,
        };
        assert_eq!(privatize(&mut update, &spec, &mut rng), 0.0);
        let mean = update.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
        let var = update
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        // The sample std of 200,000 normal draws is within 1% of the true
        // one with overwhelming probability (its own std is 0.16%).
        assert!((var.sqrt() - 0.25).abs() < 0.0025, "std {}", var.sqrt());
        assert!(mean.abs() < 0.003, "mean {mean}");
    }
}
