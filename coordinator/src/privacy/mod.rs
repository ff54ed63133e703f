//! User-level differential privacy: DP-FedAvg's clipping, noise, sampling
//! and budget ([`Mechanism`]), and the accountant that states (ε, δ).

pub mod accountant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

pub use accountant::{RdpAccountant, noise_multiplier_for};

use crate::config::{DpMode, PrivacyConfig};

/// What a device of a DP round must do to its update, and the guarantee
/// the round keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskPrivacy {
    /// Central or distributed.
    pub mode: DpMode,
    /// Scale the whole update down to at most this L2 norm.
    pub clip: f32,
    /// Standard deviation of the Gaussian noise the device adds to each
    /// value of its clipped update (0 in central mode).
    pub noise_std: f32,
    /// Under adaptive clipping, the noise the device adds to its "within
    /// the bound" indicator (0 in central mode); `None` without adaptive
    /// clipping.
    pub count_noise_std: Option<f32>,
    /// ε spent once this round is counted, at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// What differential privacy did in one round (the report's `privacy`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacySummary {
    /// Central or distributed.
    pub mode: DpMode,
    /// ε spent after this round, at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The noise multiplier z the accountant counts.
    pub noise_multiplier: f64,
    /// The clipping bound C of this round.
    pub clip: f32,
    /// The sampling rate q.
    pub sampling_rate: f64,
    /// The expected cohort, q × waiting devices: the mean's denominator.
    pub expected_cohort: f64,
    /// Under adaptive clipping: the noisy fraction of updates within the
    /// bound, which moved the bound for the next round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_clip: Option<f64>,
}

/// The privacy of one open round, fixed when it starts (a replicated
/// coordinator's round order carries it, as JSON, to the replicas and to
/// whichever leader ends the round).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// What the devices are told.
    pub task: TaskPrivacy,
    /// Noise multiplier of the update sum (z, or z_Δ under adaptive
    /// clipping, which spends the rest on the count).
    update_z: f64,
    /// Standard deviation of the noise on the count of updates within the
    /// bound (σ_b), under adaptive clipping.
    count_std: Option<f64>,
    /// The report's entry, completed when the round ends.
    pub summary: PrivacySummary,
    /// A replicated coordinator's key for this round's sampling, drawn
    /// fresh by the leader: every replica samples a device alike
    /// (`RoundCore::sample_keyed`), so a device waiting at two replicas is
    /// in the round at both or at neither, with probability q. Unused by a
    /// single coordinator.
    #[serde(default)]
    pub sampling_key: u64,
}

impl RoundPrivacy {
    /// The sampling rate q: each waiting device is in the round with this
    /// probability, independently.
    pub fn sampling_rate(&self) -> f64 {
        self.summary.sampling_rate
    }
}

/// The round's sum, before DP's noise and division.
#[derive(Debug)]
pub struct NoisySum<'a> {
    /// The sum of the clipped updates (with the devices' noise, in
    /// distributed mode).
    pub sum: &'a [f32],
    /// The count of updates within the bound (noisy in distributed mode),
    /// under adaptive clipping.
    pub within_clip: f64,
}

/// DP-FedAvg's state in the coordinator: the accountant, the (adaptive)
/// clipping bound and the noise RNG.
#[derive(Debug)]
pub struct Mechanism {
    config: PrivacyConfig,
    accountant: RdpAccountant,
    clip: f32,
    /// The smallest number of devices whose noise a sum holds (the
    /// coordinator never decodes a sum of fewer): distributed noise is
    /// sized for it.
    min_contributions: usize,
    rng: ChaCha20Rng,
}

/// A round was refused: the budget would be exceeded.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetExhausted(pub String);

impl Mechanism {
    /// The mechanism of a validated, enabled `config`; `seed` makes the
    /// noise reproducible (simulations), `None` draws it from the OS.
    pub fn new(config: PrivacyConfig, min_contributions: usize, seed: Option<u64>) -> Self {
        if config.mode == DpMode::Distributed && min_contributions <= 1 {
            tracing::warn!(
                "distributed differential privacy with rounds.min_updates = 1: every device adds \
                 the whole noise; raise rounds.min_updates to the fewest devices a round may keep"
            );
        }
        Self {
            clip: config.clip,
            config,
            accountant: RdpAccountant::new(),
            min_contributions: min_contributions.max(1),
            rng: match seed {
                Some(seed) => ChaCha20Rng::seed_from_u64(seed ^ 0xD1FF_E4E7_1A1C_0001),
                None => rand::make_rng(),
            },
        }
    }

    /// The sampling rate q.
    pub fn sampling_rate(&self) -> f64 {
        self.config.sampling_rate.unwrap_or(1.0)
    }

    /// ε spent so far, at the configured δ.
    pub fn epsilon(&self) -> f64 {
        self.accountant.epsilon(self.config.delta)
    }

    /// δ of the stated guarantee.
    pub fn delta(&self) -> f64 {
        self.config.delta
    }

    /// Central or distributed.
    pub fn mode(&self) -> DpMode {
        self.config.mode
    }

    /// The noise multiplier z.
    pub fn noise_multiplier(&self) -> f64 {
        self.config.noise_multiplier
    }

    /// The accountant (its ledger goes into checkpoints).
    pub fn accountant(&self) -> &RdpAccountant {
        &self.accountant
    }

    /// The current clipping bound (it moves under adaptive clipping).
    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// Restores what a checkpoint saved: the accountant's ledger and the
    /// clipping bound.
    pub fn restore(&mut self, ledger: accountant::MechanismLog, clip: f32) {
        self.accountant = RdpAccountant::from(ledger);
        self.clip = clip;
    }

    /// Forgets every round counted and the clipping bound's moves: the
    /// state before any round.
    pub fn reset(&mut self) {
        self.accountant = RdpAccountant::new();
        self.clip = self.config.clip;
    }

    /// Counts a new training round over `waiting` devices against the
    /// budget and fixes its parameters; refuses when its ε would exceed
    /// `epsilon_budget`, with the reason. The round is counted whether or
    /// not it completes (conservative: an abandoned round still ran the
    /// sampling).
    pub fn start_round(&mut self, waiting: usize) -> Result<RoundPrivacy, BudgetExhausted> {
        let c = &self.config;
        let q = self.sampling_rate();
        let z = c.noise_multiplier;
        let after = self.accountant.epsilon_after(q, z, 1, c.delta);
        if let Some(budget) = c.epsilon_budget
            && after > budget
        {
            return Err(BudgetExhausted(format!(
                "privacy budget: another round would bring epsilon to {after:.3} at delta {}, \
                 over privacy.epsilon_budget = {budget} (spent so far: {:.3})",
                c.delta,
                self.epsilon()
            )));
        }
        self.accountant.compose(q, z, 1);
        let expected = (q * waiting as f64).max(1.0);
        // Andrew et al. 2021: σ_b = expected / 20, and the update sum gets
        // z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so that the two Gaussian queries
        // together cost what one of multiplier z does. σ_b is raised to z
        // when the cohort is too small for that split.
        let (update_z, count_std) = if c.adaptive_clip && z > 0.0 {
            let sigma_b = (expected / 20.0).max(z);
            let update_z = (z.powi(-2) - (2.0 * sigma_b).powi(-2)).powf(-0.5);
            (update_z, Some(sigma_b))
        } else {
            (z, c.adaptive_clip.then_some(0.0))
        };
        let share = match c.mode {
            DpMode::Distributed => 1.0 / (self.min_contributions as f64).sqrt(),
            _ => 0.0,
        };
        let clip = self.clip;
        Ok(RoundPrivacy {
            task: TaskPrivacy {
                mode: c.mode,
                clip,
                noise_std: (update_z * f64::from(clip) * share) as f32,
                count_noise_std: count_std.map(|s| (s * share) as f32),
                epsilon: after,
                delta: c.delta,
            },
            update_z,
            count_std,
            summary: PrivacySummary {
                mode: c.mode,
                epsilon: after,
                delta: c.delta,
                noise_multiplier: z,
                clip,
                sampling_rate: q,
                expected_cohort: expected,
                within_clip: None,
            },
            sampling_key: 0,
        })
    }

    /// The round's mean update: the sum plus the central noise (central
    /// mode), over the expected cohort. Under adaptive clipping, moves the
    /// bound for the next round by the noisy fraction within it.
    pub fn finish_round(&mut self, round: &mut RoundPrivacy, total: NoisySum<'_>) -> Vec<f32> {
        let expected = round.summary.expected_cohort;
        let central = round.task.mode == DpMode::Central;
        let std = if central {
            round.update_z * f64::from(round.task.clip)
        } else {
            0.0
        };
        let normal = (std > 0.0).then(|| Normal::new(0.0, std).expect("a finite, positive std"));
        let rng = &mut self.rng;
        let mean = total
            .sum
            .iter()
            .map(|v| {
                let noise = normal.map_or(0.0, |n| n.sample(rng));
                ((f64::from(*v) + noise) / expected) as f32
            })
            .collect();
        if let Some(count_std) = round.count_std {
            let noise = if central {
                gaussian(count_std, &mut self.rng)
            } else {
                0.0
            };
            let fraction = (total.within_clip + noise) / expected;
            let c = &self.config;
            let factor = (-c.clip_learning_rate * (fraction - c.target_quantile)).exp();
            self.clip = (f64::from(self.clip) * factor).clamp(1e-6, 1e30) as f32;
            round.summary.within_clip = Some(fraction);
        }
        mean
    }
}

/// One draw of N(0, std²); 0 when `std` is 0.
pub fn gaussian(std: f64, rng: &mut impl Rng) -> f64 {
    if std > 0.0 {
        Normal::new(0.0, std).map_or(0.0, |n| n.sample(rng))
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use fedrec_client::privacy::{DpSpec, privatize};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::config::DEFAULT_DELTA;

    fn config(mode: DpMode, z: f64, clip: f32) -> PrivacyConfig {
        PrivacyConfig {
            mode,
            noise_multiplier: z,
            clip,
            sampling_rate: Some(0.1),
            ..PrivacyConfig::default()
        }
    }

    #[test]
    fn distributed_noise_of_the_fewest_devices_sums_to_z_times_clip() {
        let (z, clip, m) = (1.5, 0.8_f32, 16);
        let mut mechanism = Mechanism::new(config(DpMode::Distributed, z, clip), m, Some(1));
        let mut round = mechanism.start_round(200).unwrap();
        assert_eq!(round.summary.expected_cohort, 20.0);
        let spec = DpSpec {
            clip: round.task.clip,
            noise_std: round.task.noise_std,
            count_noise_std: round.task.count_noise_std,
        };
        let n = 20_000;
        let mut sum = vec![0.0_f64; n];
        for device in 0..m {
            let mut rng = ChaCha8Rng::seed_from_u64(device as u64);
            let mut update = vec![0.0_f32; n];
            privatize(&mut update, &spec, &mut rng);
            for (s, u) in sum.iter_mut().zip(&update) {
                *s += f64::from(*u);
            }
        }
        let std = (sum.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
        let want = z * f64::from(clip);
        // 20,000 draws: the sample std's own relative std is 0.5%.
        assert!((std / want - 1.0).abs() < 0.025, "std {std}, want {want}");
        // The coordinator adds nothing more in this mode.
        let zeros = vec![0.0_f32; 8];
        let mean = mechanism.finish_round(
            &mut round,
            NoisySum {
                sum: &zeros,
                within_clip: 0.0,
            },
        );
        assert!(mean.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn central_mode_tells_devices_to_add_no_noise_and_adaptive_splits_the_budget() {
        let mut central = Mechanism::new(config(DpMode::Central, 1.0, 2.0), 1, Some(1));
        let round = central.start_round(1000).unwrap();
        assert_eq!(round.task.noise_std, 0.0);
        assert_eq!(round.task.count_noise_std, None);
        assert_eq!(round.update_z, 1.0);

        let mut c = config(DpMode::Central, 1.0, 2.0);
        c.adaptive_clip = true;
        let mut adaptive = Mechanism::new(c, 1, Some(1));
        let round = adaptive.start_round(1000).unwrap();
        // Expected cohort 100: σ_b = 5, z_Δ = (1 − 1/100)^(−1/2).
        assert_eq!(round.count_std, Some(5.0));
        assert!((round.update_z - (1.0_f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        // Both count against one mechanism of multiplier z.
        assert!(
            (adaptive.epsilon() - RdpAccountant::epsilon_for(0.1, 1.0, 1, DEFAULT_DELTA)).abs()
                < 1e-12
        );
    }
}
